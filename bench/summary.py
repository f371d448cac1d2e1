"""The summary of a benchmark run: rows/s per benchmark, mlkv's ratio to each system it is
compared with, and the targets of the issues; as a dict (``conftest.py`` writes it into the
results JSON) and as markdown (``report.py``).

Nothing here imports pytest: ``report.py`` uses it as a plain script.
"""

from __future__ import annotations

from benchlib import DISTS


#: (scenario, op) -> {other system: minimum mlkv/other ratio} from issue 2
TARGETS = {
    ("resident", "get"): {"ceiling": 0.5, "rocksdict": 10.0, "lmdb": 4.0},
    ("resident", "put"): {"ceiling": 0.5, "rocksdict": 10.0, "lmdb": 4.0},
    # issue 4: forward + backward + update at least 1.5x torch's sparse embedding
    ("train", "sgd"): {"torch": 1.5},
    ("train", "adagrad"): {"torch": 1.5},
    ("train", "adam"): {"torch": 1.5},
    ("train2", "sgd"): {"torch": 1.5},
    ("train2", "adagrad"): {"torch": 1.5},
    ("train2", "adam"): {"torch": 1.5},
}
STARTUP_TARGET_S = {"warm": 1.5}
ORDER = {"mlkv": 0, "ceiling": 1, "rocksdict": 2, "lmdb": 3, "torch": 4, "dense": 5}
#: the three rates a result row carries: (key, label)
RATES = (("rows_per_s", "median round"), ("rows_per_s_best", "best round"),
         ("rows_per_cpu_s", "per CPU-second"))


def rows_per_s(bench: dict, stat: str = "median") -> float | None:
    """Rows per second of the ``stat`` ("median", "mean" or "min") round time."""
    rows = bench.get("extra_info", {}).get("rows_per_round")
    t = (bench.get("stats") or {}).get(stat)
    if rows and t:
        return rows / t
    return None


def summarize(benchmarks: list) -> dict:
    """Rows/s per (scenario, op, dist, system) and mlkv's ratios against the others.

    The headline rate is rows per second of the median round (robust to a few rounds that a
    busy machine disturbed); the best round's rate and, where measured, rows per CPU-second of
    the calling thread are kept beside it, and ratios are given for all three.
    """
    rows, startup = [], []
    for b in benchmarks:
        info = b.get("extra_info", {})
        st = b.get("stats") or {}
        if info.get("scenario") == "startup":
            startup.append({"system": info.get("system"), "cache": info.get("cache"),
                            "op": info.get("op", "first_get"),
                            "median_s": st.get("median"), "mean_s": st.get("mean"),
                            "min_s": st.get("min"), "max_s": st.get("max"),
                            "rounds": st.get("rounds")})
            continue
        if "scenario" not in info:
            continue
        row = {k: info.get(k) for k in (
            "scenario", "op", "dist", "system", "policy", "disk_bytes_per_row", "hit_ratio",
            "store_bytes_read_per_row", "direct_io", "table_bytes", "memory_bytes",
            "rows_per_cpu_s", "cold_rows_per_s", "loadavg")}
        row.update(rows_per_s=rows_per_s(b, "median"), rows_per_s_mean=rows_per_s(b, "mean"),
                   rows_per_s_best=rows_per_s(b, "min"), name=b.get("name"))
        rows.append(row)
    ratios = []
    for r in rows:
        if r["system"] != "mlkv":
            continue
        for other in rows:
            if (other["system"] == "mlkv" or other["scenario"] != r["scenario"]
                    or other["op"] != r["op"] or other["dist"] != r["dist"]):
                continue
            entry = {"scenario": r["scenario"], "op": r["op"], "dist": r["dist"],
                     "policy": r["policy"], "vs": other["system"]}
            for key, _ in RATES:
                a, b = r.get(key), other.get(key)
                entry[key.replace("rows_per", "ratio")] = a / b if a and b else None
            entry["ratio"] = entry.pop("ratio_s")
            target = TARGETS.get((r["scenario"], r["op"]), {}).get(other["system"])
            entry["target"] = target
            entry["met"] = (None if target is None or entry["ratio"] is None
                            else bool(entry["ratio"] >= target))
            ratios.append(entry)
    for s in startup:
        target = (STARTUP_TARGET_S.get(s["cache"])
                  if s["system"] == "mlkv" and s["op"] == "first_get" else None)
        s["target_s"] = target
        s["met"] = (None if target is None or s["median_s"] is None
                    else bool(s["median_s"] < target))
    return {"rows": rows, "ratios": ratios, "startup": startup}


def _fmt_rate(x):
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    return f"{x / 1e3:.0f} k"


def _fmt_ratio(x):
    return "" if x is None else f"{x:.2f}x"


def _train_table(summary: dict, scenario: str, threads: str) -> list:
    """The markdown lines of the training results of ``scenario``."""
    out = []
    train = [r for r in summary["rows"] if r["scenario"] == scenario]
    if train:
        out += [f"### Training step, {threads}: forward + backward + update (table in "
                "memory)", "",
                f"ids/s of the median round (batches of 4,096 ids, dim 64, {threads}: torch's "
                "intra-op threads, and `KVEmbedding(threads=...)`; "
                "`out = emb(ids); out.backward(w)`, no loss); torch is "
                "`nn.Embedding(sparse=True)` with `SGD` / `Adagrad` / `SparseAdam`, mlkv is "
                "`KVEmbedding` with the update fused into backward; dense (sgd only) is "
                "the SGD step by hand with torch's ops on a dense table: `W[ids]`, "
                "`W.index_add_(0, ids, w, alpha=-lr)`; ceiling (sgd only) is the same step "
                "in `@njit` loops over a dense array." + (
                    " Per CPU-s counts the calling thread alone: with two threads each, both "
                    "systems also keep a second core busy." if scenario != "train" else ""),
                "",
                "| optimizer | ids | system | ids/s | per CPU-s | mlkv / torch | (CPU) | "
                "target | met | mlkv / dense | mlkv / ceiling |",
                "|---|---|---|---:|---:|---:|---:|---:|:---:|---:|---:|"]
        for op in ("sgd", "adagrad", "adam"):
            for dist in DISTS:
                for r in [r for r in train if r["op"] == op and r["dist"] == dist]:
                    x, dense, ceiling = (
                        next((x for x in summary["ratios"] if x["scenario"] == scenario
                              and x["op"] == op and x["dist"] == dist and x["vs"] == vs), None)
                        for vs in ("torch", "dense", "ceiling"))
                    mine = r["system"] == "mlkv"
                    out.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                        op, dist, r["system"], _fmt_rate(r["rows_per_s"]),
                        _fmt_rate(r["rows_per_cpu_s"]),
                        _fmt_ratio(x and x["ratio"]) if mine else "",
                        _fmt_ratio(x and x["ratio_cpu_s"]) if mine else "",
                        f"≥ {x['target']:g}x" if mine and x and x["target"] else "",
                        ("yes" if x["met"] else "**no**") if mine and x and x["target"]
                        else "", _fmt_ratio(dense and dense["ratio"]) if mine else "",
                        _fmt_ratio(ceiling and ceiling["ratio"]) if mine else ""))
        out.append("")
    return out


def markdown(summary: dict) -> str:
    """Markdown tables of a :func:`summarize` result."""
    out = []
    rows = summary["rows"]
    resident = [r for r in rows if r["scenario"] == "resident"]
    if resident:
        out += ["### Resident rows (table fits in memory_bytes)", "",
                "rows/s of the median round, of the best round, and per CPU-second of the "
                "calling thread; mlkv / system is the ratio of those rates; *met* judges the "
                "median-round ratio.", "",
                "| op | keys | system | rows/s | best round | per CPU-s | mlkv / system | "
                "(best) | (CPU) | target | met |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
        for op in ("get", "put"):
            for dist in DISTS:
                group = [r for r in resident if r["op"] == op and r["dist"] == dist]
                for r in sorted(group, key=lambda r: ORDER.get(r["system"], 9)):
                    x = next((x for x in summary["ratios"] if x["scenario"] == "resident"
                              and x["op"] == op and x["dist"] == dist
                              and x["vs"] == r["system"]), None)
                    out.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                        op, dist, r["system"], _fmt_rate(r["rows_per_s"]),
                        _fmt_rate(r["rows_per_s_best"]), _fmt_rate(r["rows_per_cpu_s"]),
                        _fmt_ratio(x and x["ratio"]), _fmt_ratio(x and x["ratio_s_best"]),
                        _fmt_ratio(x and x["ratio_cpu_s"]),
                        f"≥ {x['target']:g}x" if x and x["target"] else "",
                        ("yes" if x["met"] else "**no**") if x and x["target"] else ""))
        out.append("")
    disk = [r for r in rows if r["scenario"] == "disk"]
    if disk:
        r0 = disk[0]
        out += ["### Table 8x larger than memory (page cache dropped first)", ""]
        if r0.get("table_bytes") and r0.get("memory_bytes"):
            out += [f"Table {r0['table_bytes'] / 2**20:.0f} MiB of values, memory "
                    f"{r0['memory_bytes'] / 2**20:.0f} MiB for each system.", ""]
        out += ["| keys | system | rows/s | best round | first (cold) round | disk bytes read "
                "/ row | hit ratio | mlkv / rocksdict |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for dist in DISTS:
            group = [r for r in disk if r["dist"] == dist]
            rocks = next((r for r in group if r["system"] == "rocksdict"), None)
            for r in sorted(group, key=lambda r: (r["system"] != "mlkv", r["policy"] or "")):
                label = f"mlkv ({r['policy']})" if r["system"] == "mlkv" else r["system"]
                ratio = ""
                if r["system"] == "mlkv" and rocks and rocks["rows_per_s"] and r["rows_per_s"]:
                    ratio = _fmt_ratio(r["rows_per_s"] / rocks["rows_per_s"])
                bpr, hit = r.get("disk_bytes_per_row"), r.get("hit_ratio")
                out.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
                    dist, label, _fmt_rate(r["rows_per_s"]), _fmt_rate(r["rows_per_s_best"]),
                    _fmt_rate(r.get("cold_rows_per_s")),
                    "-" if bpr is None else f"{bpr:.0f}",
                    "-" if hit is None else f"{hit:.3f}", ratio))
        out.append("")
    for scenario, threads in (("train", "one thread each"), ("train2", "two threads each")):
        out += _train_table(summary, scenario, threads)
    if summary["startup"]:
        out += ["### Fresh process to first answer", "",
                "Until: `first_get`, a `get` of 4,096 rows from disk answered; `first_step_*`, "
                "one training step of a new `KVEmbedding` with that optimizer done (torch "
                "imported); floors, the import alone.", "",
                "| what | until | Numba cache | median s | min s | max s | rounds | target | met |",
                "|---|---|---|---:|---:|---:|---:|---:|:---:|"]

        def fmt(v):
            return "-" if v is None else f"{v:.2f}"

        for s in summary["startup"]:
            out.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                s["system"], "import" if s["system"] != "mlkv" else s["op"], s["cache"] or "-", fmt(s["median_s"]), fmt(s["min_s"]),
                fmt(s["max_s"]), s["rounds"] or "-",
                f"< {s['target_s']:g} s" if s["target_s"] else "",
                ("yes" if s["met"] else "**no**") if s["met"] is not None else ""))
        out.append("")
    return "\n".join(out)
