"""Turn a pytest-benchmark results JSON of mlkv's benchmarks into markdown.

    python bench/report.py bench/results/<name>.json [--out bench/results/<name>.md]

Prints (or writes) the machine, the command, and tables of rows/s with mlkv's ratio to each
system it is compared with and the targets of issue 2. Ratios are recomputed from each
benchmark's mean round time and ``extra_info["rows_per_round"]``, so any results JSON of these
benchmarks works, including ones saved by ``--benchmark-autosave``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import summary  # noqa: E402


def render(data: dict, source: str = "") -> str:
    machine = data.get("machine_info", {})
    mb = machine.get("mlkv_bench", {})
    lines = ["# mlkv benchmark results", ""]
    if source:
        lines += [f"Results: `{source}` ({data.get('datetime', '')})", ""]
    lines += ["## Machine", ""]
    for key, label in (("mlkv_commit", "mlkv code at"), ("nproc", "nproc"), ("cpu", "CPU"),
                       ("mem_gib", "memory (GiB)"),
                       ("disk", "disk"), ("platform", "platform"), ("python", "python"),
                       ("numpy", "numpy"), ("numba", "numba"), ("rocksdict", "rocksdict"),
                       ("lmdb", "lmdb (py)"), ("lmdb_c", "LMDB (C)")):
        if key in mb:
            lines.append(f"- {label}: {mb[key]}")
    commit = data.get("commit_info", {})
    if commit.get("id"):
        lines.append(f"- commit: {commit['id'][:12]}{' (dirty)' if commit.get('dirty') else ''}")
    lines.append("")
    if data.get("mlkv_command"):
        lines += ["## Command", "", "```", data["mlkv_command"], "```", ""]
    lines += ["## Results", "", "Rows/s are rows per second of the median timed round; a round "
              "is a fixed list of batches of 4,096 keys.", "",
              summary.markdown(summary.summarize(data.get("benchmarks", [])))]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a JSON written by --benchmark-json")
    parser.add_argument("--out", help="write the markdown here instead of printing it")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    text = render(data, os.path.relpath(args.results))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
