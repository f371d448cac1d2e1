"""The ``mlkv`` command: ``info`` reports what the store holds, ``demo`` checks every row."""

import json
import os
import subprocess
import sys

import numpy as np

import mlkv
from mlkv import cli, demo


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
    assert info["checkpoint_id"] >= 1


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
