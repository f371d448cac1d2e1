"""The ``mlkv`` command: ``info`` reports what the store holds, ``demo`` checks every row and
trains a model in memory and on mlkv tables."""

import json
import os
import re
import subprocess
import sys

import numpy as np

import mlkv
import mlkv.datasets
from mlkv import cli, demo, demo_train


def _make_store(path, rows=1000, dim=8):
    with mlkv.open(path, dim=dim, memory_bytes=16 * 4096, page_bits=12) as store:
        keys = np.arange(rows, dtype=np.int64)
        store.put(keys, np.ones((rows, dim)))
        store.delete(keys[:10])
    return rows - 10


def test_info_json_matches_the_store(tmp_path, capsys):
    path = str(tmp_path / "s")
    rows = _make_store(path)
    assert cli.main(["info", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == rows
    assert info["settings"]["dim"] == 8 and info["settings"]["page_bits"] == 12
    a = info["addresses"]
    assert a["begin"] <= a["head"] <= a["read_only"] <= a["tail"]
    segment_bytes = sum(os.path.getsize(tmp_path / "s" / f) for f in os.listdir(tmp_path / "s")
                        if f.startswith("segment-"))
    assert info["disk_bytes"] == segment_bytes > 0
    assert info["checkpoint_id"] >= 1 and 1 <= info["content_id"] <= info["checkpoint_id"]
    # dead bytes: the log's bytes not held by a live row (10 deleted rows, their tombstones)
    log_bytes = a["tail"] - a["begin"]
    live = rows * info["record_bytes"]
    assert abs(info["dead_bytes"] - (log_bytes - live)) <= 1


def test_info_text_and_python_dash_m(tmp_path):
    path = str(tmp_path / "s")
    rows = _make_store(path)
    out = subprocess.run([sys.executable, "-m", "mlkv", "info", path], capture_output=True,
                         text=True, check=True).stdout
    assert f"rows        {rows:,}" in out
    assert "dim=8" in out and "markers" in out and "segment files" in out


def test_info_on_a_missing_store_is_an_error_not_a_traceback(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mlkv: error:") and "Traceback" not in err


def test_demo_checks_every_row_and_reports(tmp_path):
    lines = []
    result = demo.run(memory_mib=1, ratio=4, dim=16, batch=512, path=str(tmp_path),
                      out=lines.append)
    layout_rows = 4 * (1 << 20) // (16 + 16 * 4)
    assert result["rows"] == layout_rows
    assert result["wrong"] == 0
    assert result["read_rows_per_s"] > 0 and result["disk_bytes_per_row"] >= 0
    text = "\n".join(lines)
    assert "rows checked, 0 wrong" in text and "resident" in text


def test_demo_store_part_only(tmp_path, capsys):
    argv = ["demo", "--no-train", "--memory-mib", "1", "--ratio", "2", "--dim", "16",
            "--batch", "512", "--path", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "rows checked, 0 wrong" in out
    assert "training" not in out and "RMSE" not in out


def _final_rmses(out):
    line = next(x for x in out.splitlines() if x.strip().startswith("final test RMSE"))
    numbers = re.findall(r"\d+\.\d+", line)
    return float(numbers[0]), float(numbers[1])


def test_demo_training_part_prints_both_rmses(tmp_path, capsys):
    argv = ["demo", "--train-only", "--epochs", "1", "--path", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "rows checked" not in out                      # the store part did not run
    assert "nn.Embedding(sparse=True)" in out and "Pipeline(lookahead=2, staleness=2)" in out
    assert "larger than memory" in out
    epoch = next(x for x in out.splitlines() if x.split()[:1] == ["1"])
    assert "rows," in epoch and "read from disk" in out
    memory, kv = _final_rmses(out)
    assert 0.85 < memory < 1.05 and abs(kv - memory) <= 0.02 * memory
    assert "within the 2% allowed" in out and "done in" in out


def test_demo_training_figures_and_serial_numbers(tmp_path):
    lines = []
    result = demo_train.run(epochs=1, staleness=0, path=str(tmp_path), out=lines.append)
    assert result["skipped"] is None and result["ok"]
    fig = result["epochs"][0]
    assert fig["disk_rows"] > 0 and fig["disk_bytes"] > 0     # rows were read back from disk
    assert fig["samples_per_s_memory"] > 0 and fig["samples_per_s_mlkv"] > 0
    # staleness 0: the numbers of serial training, so the two models agree to rounding
    assert abs(result["rmse_mlkv"] - result["rmse_memory"]) < 1e-4


def test_demo_training_without_recbole_says_what_to_install(tmp_path, monkeypatch, capsys):
    def missing():
        raise FileNotFoundError("the 'recbole' wheel is not installed")
    monkeypatch.setattr(mlkv.datasets, "movielens_100k", missing)
    assert cli.main(["demo", "--train-only"]) == 1            # nothing asked for could run
    assert "pip install --no-deps recbole" in capsys.readouterr().out
    store = dict(memory_mib=1, ratio=2, dim=16, batch=512)
    lines = []
    assert demo.main(store, {}, path=str(tmp_path), out=lines.append) == 0
    text = "\n".join(lines)
    assert "rows checked, 0 wrong" in text and "skipped" in text


def test_demo_training_without_torch_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)           # `import torch` fails
    assert cli.main(["demo", "--train-only"]) == 1
    out = capsys.readouterr().out
    assert "skipped: torch is not installed" in out and "pip install torch==2.13.0" in out


def test_demo_fails_when_the_rmses_differ(monkeypatch, capsys):
    far = {"skipped": None, "ok": False, "rmse_memory": 0.9, "rmse_mlkv": 1.0,
           "relative_difference": 0.1 / 0.9, "tolerance": 0.02}
    monkeypatch.setattr(demo_train, "run", lambda **kwargs: far)
    assert cli.main(["demo", "--train-only"]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "1.0000" in err and "0.9000" in err and "2%" in err


def test_demo_modules_do_not_import_torch():
    code = ("import sys, mlkv, mlkv.cli, mlkv.demo, mlkv.demo_train; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
