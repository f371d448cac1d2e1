"""Training through a table 8x larger than memory: what lookahead and bounded staleness buy.

    python bench/train_pipeline.py --out bench/results/pipeline-2026-12-04.json
    python bench/train_pipeline.py --render RESULTS.json [--md RESULTS.md]   # markdown again

A training loop of the embedding part of a model: ``KVEmbedding(64, optimizer="adagrad")``
over a store whose table is ``--factor`` (8) times its ``memory_bytes`` (64 MiB), batches
of 4,096 ids drawn Zipf(0.99) or uniform over the table's rows, and a small dense head (a
2-layer MLP, 64 -> ``--hidden`` -> 1, MSE loss to random targets, torch Adagrad) so a batch
has some compute for the disk reads and the table updates to overlap. One step::

    rows = emb(ids)                                   # read (through the read gate, if any)
    loss = mse(head(rows), y); opt.zero_grad()
    loss.backward(); opt.step()                       # the table's update (or its hand-off)

Configurations (lookahead k, staleness s):

- ``plain``: the loop above over the list of batches, no :class:`Pipeline`;
- ``Pipeline(lookahead=k, staleness=s)`` for k in {0, 4} and s in {None, 0, 2, 8}
  (``staleness=None``: no hooks, the module updates synchronously; lookahead=0 with
  staleness=None would be the plain loop again and is not run);
- ``head only``: the dense head on random rows, no table: the compute floor of a step.

Method
------
The table is built once (``store.put`` of random rows in chunks, then a checkpoint on close).
Every run gets a fresh copy of it, its files synced and dropped from the page cache
(``POSIX_FADV_DONTNEED``; ``fincore`` records what stayed cached; the store reads with
``O_DIRECT`` where the file system allows, so the page cache should not serve reads anyway),
and runs in a fresh Python process that opens the copy: every configuration starts from the
same rows, an empty buffer pool and no other thread. The training thread uses one torch
thread (``torch.set_num_threads(1)``) so the pipeline's threads have the other core.

All batches (ids and targets) are drawn before the loop, from the same seeds for every
configuration, so every run sees the same sequence and the loader costs nothing. A run is
``--warmup`` batches (the buffer pool fills; Numba kernels load) and then ``--batches``
timed batches in the same pass; the window ends when the pass has ended, that is after the
pipeline applied every pending update. Reported per run:

- ids/s: ids (samples) in the timed window over its wall time; "vs plain" is the ratio to
  the plain loop's ids/s of the same key distribution (in the same repeat and the best one);
- disk rows/batch: growth of ``store.stats()["misses"]`` (rows read from disk by any thread:
  the training thread, the lookahead thread, the update worker) per timed batch, and
  device bytes read per batch;
- hit ratio (training reads): the share of the rows the training step read
  (``get_or_init``) that it found in memory; counted by wrapping the store's ``get_or_init``
  under the store's lock, so no other thread's reads are mixed in. The JSON also has
  ``hits / (hits + misses)`` over all reads (``hit_ratio``), which counts the lookahead's
  reads and the update's re-reads of resident rows too;
- read ms / step ms: training-thread wall time per batch in ``emb(ids)`` (gate waits and
  disk reads included) and in the whole step; the pipeline's own counters
  (``Pipeline.stats()``) are kept in the JSON.

With ``--repeat 2`` (default) every configuration runs twice, the repeats interleaved (all
configurations once, then all again) so slow phases of a shared machine hit them alike; the
table shows both and uses the better one for the ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402
import numpy as np  # noqa: E402
from benchlib import BATCH, DISTS  # noqa: E402

MIB = 1 << 20
_RESULT = "MLKV_PIPELINE_RESULT "

#: (name, pipeline?, lookahead, staleness), in the order they run and are reported
CONFIGS = [
    ("head only", False, None, None),
    ("plain", False, None, None),
    ("pipeline k=0 s=0", True, 0, 0),
    ("pipeline k=0 s=2", True, 0, 2),
    ("pipeline k=0 s=8", True, 0, 8),
    ("pipeline k=4 s=None", True, 4, None),
    ("pipeline k=4 s=0", True, 4, 0),
    ("pipeline k=4 s=2", True, 4, 2),
    ("pipeline k=4 s=8", True, 4, 8),
]


def _configs(lookahead: int) -> list[dict]:
    out = []
    for name, pipe, k, s in CONFIGS:
        if pipe and k:
            k = lookahead
            name = f"pipeline k={k} s={s}"
        out.append({"name": name, "pipeline": pipe, "lookahead": k, "staleness": s})
    return out


# ---------------------------------------------------------------------------------------------
# the parent: build, copy, run each configuration in its own process, report


def build_table(path: str, args) -> dict:
    """Create the store the runs copy: ``rows`` random rows, adagrad state zero, closed."""
    from mlkv.frameworks.torch import KVEmbedding

    t0 = time.perf_counter()
    emb = KVEmbedding(args.dim, path=path, optimizer="adagrad", lr=args.lr,
                      memory_bytes=args.memory_mib * MIB)
    store = emb.store
    record_bytes = store.stats()["record_bytes"]
    rows = args.rows or args.factor * args.memory_mib * MIB // record_bytes
    rng = np.random.default_rng(7)
    chunk = 1 << 16
    for lo in range(0, rows, chunk):
        hi = min(rows, lo + chunk)
        values = rng.random((hi - lo, args.dim), dtype=np.float32) * np.float32(0.2) - \
            np.float32(0.1)
        store.put(np.arange(lo, hi, dtype=np.int64), values)
    st = store.stats()
    emb.close()                                    # a checkpoint: the runs reopen this state
    return {"rows": int(rows), "record_bytes": int(record_bytes),
            "table_bytes": int(rows) * int(record_bytes), "memory_bytes": args.memory_mib * MIB,
            "factor": int(rows) * int(record_bytes) / (args.memory_mib * MIB),
            "page_bytes": 1 << store.settings.page_bits, "disk_bytes": benchlib.dir_bytes(path),
            "direct_io": None, "build_s": round(time.perf_counter() - t0, 1),
            "rows_in_store": st["rows"]}


def _torch_version() -> str:
    import torch
    return torch.__version__


def run_child(spec: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False,
                          timeout=spec["timeout"] * 3)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"run {spec['config']['name']} ({spec['dist']}) failed with exit "
                           f"code {proc.returncode}; output:\n{proc.stdout[-4000:]}")
    return json.loads(lines[-1][len(_RESULT):])


def parent(args) -> int:
    started = time.perf_counter()
    base = args.dir or os.environ.get("MLKV_BENCH_DIR") or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    root = tempfile.mkdtemp(prefix="mlkv-pipeline-bench-", dir=base)
    template, work = os.path.join(root, "table"), os.path.join(root, "run")
    configs = [c for c in _configs(args.lookahead)
               if not args.configs or c["name"] in args.configs]
    dists = args.dists
    try:
        print(f"building the table in {root} ...", file=sys.stderr, flush=True)
        table = build_table(template, args)
        print(f"  {table['rows']:,} rows x {table['record_bytes']} B = "
              f"{table['table_bytes'] / MIB:.0f} MiB, memory_bytes {args.memory_mib} MiB "
              f"({table['factor']:.2f}x), built in {table['build_s']} s", file=sys.stderr)
        runs = []
        for rep in range(args.repeat):
            for dist in dists:
                for cfg in configs:
                    if cfg["name"] == "head only" and dist != dists[0]:
                        continue                 # no table: the key distribution is moot
                    t0 = time.perf_counter()
                    spec = {"path": work, "dist": dist, "config": cfg, "rows": table["rows"],
                            "dim": args.dim, "hidden": args.hidden, "lr": args.lr,
                            "threads": args.threads,
                            "memory_bytes": args.memory_mib * MIB, "batches": args.batches,
                            "warmup": args.warmup, "seed": 100 + DISTS.index(dist),
                            "timeout": args.timeout}
                    prep = {}
                    if cfg["name"] != "head only":
                        shutil.rmtree(work, ignore_errors=True)
                        shutil.copytree(template, work)
                        prep["page_cache"] = benchlib.drop_page_cache([work])
                        prep["page_cache_bytes_before"] = benchlib.page_cache_bytes([work])
                    prep["loadavg_before"] = [round(x, 2) for x in os.getloadavg()]
                    result = run_child(spec)
                    result.update(prep, repeat=rep + 1, dist=dist,
                                  loadavg_after=[round(x, 2) for x in os.getloadavg()],
                                  run_s=round(time.perf_counter() - t0, 1))
                    runs.append(result)
                    shutil.rmtree(work, ignore_errors=True)
                    print(f"  run {rep + 1} {dist:7} {cfg['name']:22} "
                          f"{result['ids_per_s'] / 1e3:8.1f} k ids/s  "
                          f"disk rows/batch {result.get('disk_rows_per_batch', 0):7.0f}  "
                          f"({result['run_s']} s)", file=sys.stderr, flush=True)
        table["direct_io"] = next((r["direct_io"] for r in runs if "direct_io" in r), None)
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    data = {
        "what": "training through a table larger than memory: lookahead and staleness",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in
                                        [os.path.relpath(os.path.abspath(__file__))]
                                        + sys.argv[1:]),
        "machine": {**benchlib.machine(), "torch": _torch_version()},
        "settings": {"dim": args.dim, "batch": BATCH, "optimizer": "adagrad", "lr": args.lr,
                     "threads": args.threads,
                     "hidden": args.hidden, "warmup_batches": args.warmup,
                     "timed_batches": args.batches, "repeat": args.repeat, "dists": dists,
                     "torch_threads_training": 1, "zipf_a": benchlib.ZIPF_A,
                     "policy": "second_chance (the store's default)"},
        "table": table,
        "runs": runs,
        "total_s": round(time.perf_counter() - started, 1),
    }
    data["summary"] = summarize(runs, args.repeat)
    text = markdown(data)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        md = args.md or os.path.splitext(args.out)[0] + ".md"
        with open(md, "w") as f:
            f.write(text)
    return 0


def summarize(runs: list, repeat: int) -> list:
    """One row per (dist, config): ids/s of each repeat, the best, and its ratio to plain."""
    rows = []
    for dist in dict.fromkeys(r["dist"] for r in runs):
        group = [r for r in runs if r["dist"] == dist or (r["config"]["name"] == "head only")]
        names = list(dict.fromkeys(r["config"]["name"] for r in group))
        best_of = {}
        for name in names:
            mine = [r for r in group if r["config"]["name"] == name]
            best_of[name] = max(mine, key=lambda r: r["ids_per_s"])
        plain = best_of.get("plain")
        for name in names:
            mine = sorted((r for r in group if r["config"]["name"] == name),
                          key=lambda r: r["repeat"])
            best = best_of[name]
            same_rep = []
            for r in mine:
                p = next((x for x in runs if x["dist"] == dist and x["repeat"] == r["repeat"]
                          and x["config"]["name"] == "plain"), None)
                same_rep.append(r["ids_per_s"] / p["ids_per_s"] if p else None)
            rows.append({
                "dist": dist, "config": name, "lookahead": best["config"]["lookahead"],
                "staleness": best["config"]["staleness"],
                "ids_per_s": [r["ids_per_s"] for r in mine], "best_ids_per_s": best["ids_per_s"],
                "vs_plain_best": best["ids_per_s"] / plain["ids_per_s"] if plain else None,
                "vs_plain_same_repeat": same_rep,
                "best_repeat": best["repeat"],
                "disk_rows_per_batch": best.get("disk_rows_per_batch"),
                "bytes_read_per_batch": best.get("bytes_read_per_batch"),
                "hit_ratio": best.get("hit_ratio"),
                "train_read_hit_ratio": best.get("train_read_hit_ratio"),
                "read_ms": best.get("read_ms_per_batch"), "step_ms": best.get("step_ms_per_batch"),
                "gate_wait_ms": best.get("gate_wait_ms_per_batch"),
                "queue_wait_ms": best.get("queue_wait_ms_per_batch"),
                "loader_wait_ms": best.get("loader_wait_ms_per_batch"),
            })
    return rows


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def markdown(data: dict) -> str:
    m, t, s = data["machine"], data["table"], data["settings"]
    lines = ["# Training pipeline: lookahead and bounded staleness (issue 4)", "",
             f"Run {data['date']}, {data['total_s']:.0f} s in all.", "", "## Machine", ""]
    for key, label in (("mlkv_commit", "mlkv code at"), ("nproc", "nproc"), ("cpu", "CPU"),
                       ("mem_gib", "memory (GiB)"), ("disk", "disk"), ("platform", "platform"),
                       ("python", "python"), ("numpy", "numpy"), ("numba", "numba"),
                       ("torch", "torch")):
        if key in m:
            lines.append(f"- {label}: {m[key]}")
    loads = [x for r in data["runs"] for x in r["loadavg_before"][:1] + r["loadavg_after"][:1]]
    if loads:
        lines.append(f"- load average (1 min) around the runs: {min(loads):.1f}-{max(loads):.1f}")
    lines += ["", "## Command", "", "```", data["command"], "```", "", "## Setup", "",
              (f"- table: {t['rows']:,} rows, dim {s['dim']} float32 with adagrad state: "
              f"{t['record_bytes']} B a record, {t['table_bytes'] / MIB:.0f} MiB = "
              f"{t['factor']:.2f}x `memory_bytes` ({t['memory_bytes'] / MIB:.0f} MiB); "
              f"O_DIRECT: {t['direct_io']}; policy {s['policy']}"),
              (f"- batches of {s['batch']:,} ids, Zipf({s['zipf_a']}) (scrambled) or uniform over "
              f"the rows; {s['warmup_batches']} warm-up batches, then {s['timed_batches']} timed "
              f"ones; each run in a fresh process on a fresh copy of the table, its page cache "
              f"dropped"),
              (f"- step: `KVEmbedding` (adagrad, lr {s['lr']}) -> Linear({s['dim']}, "
              f"{s['hidden']}) -> ReLU -> Linear({s['hidden']}, 1), MSE to random targets, "
              f"torch Adagrad for the head; 1 torch thread"),
              (f"- {s['repeat']} repeat(s), interleaved; *vs plain, each run* is the ratio to "
              f"the plain loop of the same repeat; *best vs plain* compares each "
              f"configuration's faster repeat (bold) with plain's faster one"), "",
              ("k = lookahead (batches), s = staleness (None: no update hooks, synchronous "
              "updates). Per timed batch, of the best repeat: *batch ms* is wall time "
              "(4,096 ids / ids/s), *read ms* the training thread's time in `emb(ids)` "
              "(read-gate waits included), *step ms* its whole step (read, head, backward, "
              "the table's update or its hand-off); batch ms - step ms is the wait for the "
              "next batch (the lookahead) or for the update worker. *disk rows* are rows read "
              "from disk by any thread (`store.stats()` misses); *hit ratio (training reads)* "
              "is the share of the rows the training step read that were in memory. The "
              "JSON has the hit ratio over all reads, device bytes, the pipeline's counters "
              "and the load average around each run."), ""]
    for dist in s["dists"]:
        rows = [r for r in data["summary"] if r["dist"] == dist]
        if not rows:
            continue
        reps = max(len(r["ids_per_s"]) for r in rows)
        head = " | ".join(f"ids/s run {i + 1}" for i in range(reps))
        lines += [f"## {dist} ids", "",
                  (f"| config | {head} | vs plain, each run | best vs plain | batch ms | read ms "
                  f"| step ms | disk rows / batch | hit ratio (training reads) |"),
                  "|---|" + "---:|" * reps + "---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            rates = " | ".join(
                (f"**{x / 1e3:.1f} k**" if reps > 1 and x == r["best_ids_per_s"]
                 else f"{x / 1e3:.1f} k") for x in r["ids_per_s"])
            rates += " | -" * (reps - len(r["ids_per_s"]))
            each = " / ".join(_f(x, ".2f") + "x" if x is not None else "-"
                              for x in r["vs_plain_same_repeat"])
            lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                r["config"], rates, each, _f(r["vs_plain_best"], ".2f") + "x"
                if r["vs_plain_best"] is not None else "-",
                _f(BATCH * 1e3 / r["best_ids_per_s"], ".1f"), _f(r["read_ms"], ".1f"),
                _f(r["step_ms"], ".1f"), _f(r["disk_rows_per_batch"], ",.0f"),
                _f(r["train_read_hit_ratio"], ".3f")))
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# a child: one configuration on one copy of the table


def child(spec: dict) -> int:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from mlkv.frameworks.torch import KVEmbedding, Pipeline

    torch.set_num_threads(1)
    torch.manual_seed(spec["seed"])
    cfg, dim, n = spec["config"], spec["dim"], spec["warmup"] + spec["batches"]
    draw = benchlib.sampler(spec["dist"], spec["rows"], spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    batches = [(torch.from_numpy(draw(BATCH)), torch.randn(BATCH, 1, generator=gen))
               for _ in range(n)]
    head = nn.Sequential(nn.Linear(dim, spec["hidden"]), nn.ReLU(), nn.Linear(spec["hidden"], 1))
    opt = torch.optim.Adagrad(head.parameters(), lr=0.01)
    timers = {"read": 0.0, "step": 0.0}
    head_only = cfg["name"] == "head only"

    if head_only:
        emb = store = None
        inputs = [torch.randn(BATCH, dim, generator=gen) for _ in range(n)]

        def lookup(i, ids):
            return inputs[i].requires_grad_()
    else:
        emb = KVEmbedding(dim, path=spec["path"], optimizer="adagrad", lr=spec["lr"],
                          memory_bytes=spec["memory_bytes"], threads=spec.get("threads", 1))
        store = emb.store
        train = {"hits": 0, "misses": 0}
        original = store.get_or_init

        def get_or_init(keys):
            # the training step's own reads: counted under the store's lock, so reads of the
            # lookahead thread and the update worker are not mixed in
            with store._lock:
                counts = store.engine.counts
                h, m = counts["hits"], counts["misses"]
                out = original(keys)
                train["hits"] += counts["hits"] - h
                train["misses"] += counts["misses"] - m
            return out

        store.get_or_init = get_or_init

        def lookup(i, ids):
            return emb(ids)

    def step(i, ids, y):
        t0 = time.perf_counter()
        rows = lookup(i, ids)
        t1 = time.perf_counter()
        loss = F.mse_loss(head(rows), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        timers["read"] += t1 - t0
        timers["step"] += t2 - t0
        return loss

    pipe = None
    if cfg["pipeline"]:
        pipe = Pipeline(batches, {emb: lambda b: b[0]}, lookahead=cfg["lookahead"],
                        staleness=cfg["staleness"], timeout=spec["timeout"])

    def snapshot():
        snap = {"t": time.perf_counter(), "cpu": time.process_time(),
                "io_read_bytes": benchlib.read_bytes(), **timers}
        if store is not None:
            st = store.stats()
            snap.update({k: st[k] for k in ("hits", "misses", "bytes_read", "bytes_written",
                                            "lookaheads", "updates", "compactions")})
            snap.update(train_hits=train["hits"], train_misses=train["misses"])
        if pipe is not None:
            snap["pipe"] = pipe.stats()
        return snap

    start = None
    loss = None
    for i, (ids, y) in enumerate(pipe if pipe is not None else batches):
        if i == spec["warmup"]:
            start = snapshot()
        loss = step(i, ids, y)
    end = snapshot()                  # the pass has ended: every pending update is applied
    if pipe is not None:
        pipe.close()
    b = spec["batches"]
    wall = end["t"] - start["t"]
    out = {"config": cfg, "ids_per_s": b * BATCH / wall, "wall_s": wall,
           "cpu_s": end["cpu"] - start["cpu"], "batches": b, "final_loss": float(loss.detach()),
           "read_ms_per_batch": (end["read"] - start["read"]) * 1e3 / b,
           "step_ms_per_batch": (end["step"] - start["step"]) * 1e3 / b,
           "io_read_bytes_per_batch": (end["io_read_bytes"] - start["io_read_bytes"]) / b,
           "torch": torch.__version__}
    if store is not None:
        d = {k: end[k] - start[k] for k in ("hits", "misses", "bytes_read", "bytes_written",
                                             "lookaheads", "updates", "compactions",
                                             "train_hits", "train_misses")}
        out.update(
            disk_rows_per_batch=d["misses"] / b, bytes_read_per_batch=d["bytes_read"] / b,
            bytes_written_per_batch=d["bytes_written"] / b,
            hit_ratio=d["hits"] / max(1, d["hits"] + d["misses"]),
            train_read_hit_ratio=d["train_hits"] / max(1, d["train_hits"] + d["train_misses"]),
            compactions=d["compactions"], lookahead_rows_per_batch=d["lookaheads"] / b,
            direct_io=bool(store.engine.device.direct), window=d)
    if pipe is not None:
        p0, p1 = start["pipe"], end["pipe"]
        delta = {k: p1[k] - p0[k] for k in p1 if k != "max_pending_seen"}
        delta["max_pending_seen"] = p1["max_pending_seen"]
        out["pipeline_stats"] = delta
        for k in ("gate_wait", "queue_wait", "loader_wait", "update", "lookahead"):
            out[f"{k}_ms_per_batch"] = delta[f"{k}_seconds"] * 1e3 / b
    if store is not None:
        store.close(checkpoint=False)   # the copy is thrown away: no checkpoint to wait for
    print(_RESULT + json.dumps(out), flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="results JSON (a markdown file is written beside it)")
    parser.add_argument("--md", help="markdown path (default: --out with .md)")
    parser.add_argument("--batches", type=int, default=100, help="timed batches a run (100)")
    parser.add_argument("--warmup", type=int, default=40, help="warm-up batches a run (40)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each configuration (2)")
    parser.add_argument("--memory-mib", type=int, default=64, help="memory_bytes in MiB (64)")
    parser.add_argument("--factor", type=int, default=8,
                        help="table bytes (records with adagrad state) / memory_bytes (8)")
    parser.add_argument("--rows", type=int, default=0, help="rows (default: from --factor)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, choices=(1, 2),
                        help="the table's threads (2: mlkv's helper thread; default 1)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden units of the head")
    parser.add_argument("--lr", type=float, default=0.05, help="the table's adagrad lr")
    parser.add_argument("--lookahead", type=int, default=4, help="k of the lookahead runs (4)")
    parser.add_argument("--dists", nargs="+", default=["zipf", "uniform"], choices=DISTS)
    parser.add_argument("--configs", nargs="+", help="only these configuration names")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="Pipeline timeout, and a third of a run's limit (s)")
    parser.add_argument("--dir", help="where to build the table (default $MLKV_BENCH_DIR or "
                        "the temp dir; a real disk, not tmpfs)")
    parser.add_argument("--keep", action="store_true", help="keep the built table")
    parser.add_argument("--render", metavar="JSON",
                        help="only write the markdown of an earlier results JSON (to --md, "
                        "else print it)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    if args.render:
        with open(args.render) as f:
            text = markdown(json.load(f))
        if args.md:
            with open(args.md, "w") as f:
                f.write(text)
        else:
            print(text)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
