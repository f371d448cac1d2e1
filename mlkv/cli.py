"""The ``mlkv`` command (also ``python -m mlkv``)."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    from .store import open as open_store
    with open_store(args.path, readonly=True) as store:
        stats = store.stats()
        settings = store.settings.to_json()
        info = {
            "path": args.path,
            "settings": settings,
            "rows": stats["rows"],
            "record_bytes": stats["record_bytes"],
            "addresses": stats["addresses"],
            "checkpoint_id": stats["checkpoint_id"],
            "content_id": stats["content_id"],
            "dead_bytes": int(stats["dead_fraction"] * (stats["addresses"]["tail"]
                                                         - stats["addresses"]["begin"])),
            "disk_bytes": stats["disk_bytes"],
            "segments": stats["segments"],
            "dead_fraction": stats["dead_fraction"],
            "memory_bytes": stats["memory_bytes"],
            "index_bytes": stats["index_bytes"],
            "policy": stats["policy"],
        }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    mib = 1 << 20
    s = settings
    print(f"store       {args.path}")
    print(f"settings    dim={s['dim']} dtype={s['dtype']} state_dim={s['state_dim']} "
          f"init={s['init']}({s['init_scale']}) seed={s['seed']} page_bits={s['page_bits']} "
          f"segment_bits={s['segment_bits']} format={s['format_version']}")
    print(f"rows        {info['rows']:,} ({info['record_bytes']} bytes a record)")
    a = info["addresses"]
    print(f"markers     begin={a['begin']:,} head={a['head']:,} read_only={a['read_only']:,} "
          f"tail={a['tail']:,}")
    print(f"checkpoint  {info['checkpoint_id']} (rows last changed at checkpoint "
          f"{info['content_id']})")
    print(f"disk        {info['disk_bytes'] / mib:,.1f} MiB in {info['segments']} segment files, "
          f"{info['dead_bytes'] / mib:,.1f} MiB ({info['dead_fraction']:.0%}) of the log dead")
    print(f"memory      buffer pool {info['memory_bytes'] / mib:,.1f} MiB, index "
          f"{info['index_bytes'] / mib:,.1f} MiB; policy {info['policy']}")
    return 0


def _verify(args) -> int:
    from .store import open as open_store
    with open_store(args.path, readonly=True) as store:
        report = store.verify(progress=None if args.progress else False)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0 if report["ok"] else 1
    for page in report["damaged_pages"]:
        slots = ", ".join(str(s) for s in page["slots"][:8])
        more = " ..." if len(page["slots"]) > 8 else ""
        what = "missing" if page["problem"] == "missing" else f"damaged record slots {slots}{more}"
        print(f"page {page['page']:,} ({page['location']}): {what}")
    for entry in report["bad_entries"]:
        print(f"key {entry['key']} points at log address {entry['address']:,}, "
              f"which does not hold its row")
    listed = len(report["damaged_pages"]) + len(report["bad_entries"])
    if listed < report["n_damaged_pages"] + report["n_bad_entries"]:
        print("... (more not listed)")
    verdict = "ok" if report["ok"] else (f"DAMAGED: {report['n_damaged_pages']:,} pages, "
                                         f"{report['n_bad_entries']:,} index entries")
    print(f"{verdict} ({report['pages_checked']:,} pages checked)")
    return 0 if report["ok"] else 1


def _compact(args) -> int:
    from .store import open as open_store
    with open_store(args.path) as store:
        result = store.compact(progress=None if args.progress else False)
        stats = store.stats()
    mib = 1 << 20
    print(f"moved {result['rows_moved']:,} rows, freed {result['bytes_freed'] / mib:,.1f} MiB; "
          f"{stats['disk_bytes'] / mib:,.1f} MiB in {stats['segments']} segment files, "
          f"{stats['dead_fraction']:.0%} dead")
    return 0


def _demo(args) -> int:
    from . import demo
    store = None if args.train_only else dict(memory_mib=args.memory_mib, ratio=args.ratio,
                                              dim=args.dim, batch=args.batch)
    train = None if args.no_train else dict(epochs=args.epochs, pages=args.pages,
                                            lookahead=args.lookahead, staleness=args.staleness,
                                            seed=args.seed)
    return demo.main(store, train, path=args.path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mlkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="settings, rows, markers, disk and memory use of a store")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)
    p = sub.add_parser("verify", help="read every page and check it; exit status 1 on damage")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (it is drawn only on a terminal anyway)")
    p.set_defaults(func=_verify)
    p = sub.add_parser("compact", help="reclaim the disk held by dead records")
    p.add_argument("path")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (it is drawn only on a terminal anyway)")
    p.set_defaults(func=_compact)
    p = sub.add_parser(
        "demo", help="a table 8x larger than memory written and read back; then a model "
                     "trained in memory and with its tables on disk, compared",
        description="Two parts. Store: write a table --ratio times larger than its memory "
                    "budget, read every row back at random and check it. Training: train a "
                    "matrix-factorisation model on MovieLens-100K twice from the same rows "
                    "and seeds, with nn.Embedding tables in memory and with KVEmbedding "
                    "tables whose buffer pools hold a fraction of them (most rows are read "
                    "from disk), through Pipeline(lookahead, staleness); print the test "
                    "RMSE, samples/s and disk reads of each epoch. Exit status 1 if the "
                    "final RMSEs differ by more than 2% or a row reads back wrong. The "
                    "training part needs torch (pip install torch==2.13.0) and the recbole "
                    "wheel's data (pip install --no-deps recbole); without them it is "
                    "skipped with that hint (exit status 1 only with --train-only).")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--no-train", action="store_true", help="run the store part only")
    which.add_argument("--train-only", action="store_true", help="run the training part only")
    p.add_argument("--path", default=None,
                   help="keep the stores here (default: a temporary directory, removed)")
    g = p.add_argument_group("store part")
    g.add_argument("--memory-mib", type=int, default=32, help="buffer pool budget (MiB)")
    g.add_argument("--ratio", type=int, default=8, help="table size / memory budget")
    g.add_argument("--dim", type=int, default=64, help="values a row")
    g.add_argument("--batch", type=int, default=4096, help="rows a read or write")
    g = p.add_argument_group("training part")
    g.add_argument("--epochs", type=int, default=8, help="passes over the training ratings")
    g.add_argument("--pages", type=int, default=24,
                   help="each mlkv table's memory_bytes, in 4 KiB pages")
    g.add_argument("--lookahead", type=int, default=2, help="batches read ahead")
    g.add_argument("--staleness", type=int, default=2,
                   help="pending updates a row's read may miss (0: the serial numbers)")
    g.add_argument("--seed", type=int, default=0, help="initial rows and batch order")
    p.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # the command line shows the error, not a traceback
        from .errors import MlkvError
        if isinstance(exc, (MlkvError, OSError, ValueError)):
            print(f"mlkv: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
