"""Shared fixtures of mlkv's benchmarks (see bench/README.md).

Sizes come from environment variables so a run can be scaled to the machine:

=============================  ==========  =======================================================
``MLKV_BENCH_RESIDENT_ROWS``   1048576     rows of the resident-table benchmarks
``MLKV_BENCH_RESIDENT_MEMORY`` 512 MiB     mlkv ``memory_bytes`` / rocksdict block cache there
``MLKV_BENCH_DISK_MEMORY``     64 MiB      ``memory_bytes`` of the larger-than-memory benchmarks
``MLKV_BENCH_DISK_FACTOR``     8           table size (rows * 64 * 4 bytes) / that memory
``MLKV_BENCH_DIR``             pytest tmp  where stores are built (must be a real disk, not
                                           tmpfs, for O_DIRECT and read_bytes to mean anything)
``MLKV_BENCH_SMOKE``           unset       1: tiny sizes (the default when benchmarks are disabled)
=============================  ==========  =======================================================

With ``--benchmark-disable`` (the project's default ``addopts``) every benchmark body runs once
on tiny tables: a smoke test that the benchmarks still work, not a measurement.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

import benchlib
import summary
from benchlib import DIM

MiB = 1 << 20


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def benchmarks_enabled(config) -> bool:
    try:
        return not (config.getoption("benchmark_disable")
                    and not config.getoption("benchmark_enable"))
    except ValueError:  # pytest-benchmark not installed
        return False


@dataclasses.dataclass(frozen=True)
class Sizes:
    smoke: bool
    resident_rows: int
    resident_memory: int
    disk_memory: int
    disk_factor: int
    #: batches of BATCH keys in one timed round
    resident_batches: int
    disk_batches: int
    rounds: int
    disk_rounds: int
    startup_rounds: int
    startup_cold_rounds: int

    @property
    def disk_rows(self) -> int:
        return self.disk_factor * self.disk_memory // (DIM * 4)


@pytest.fixture(scope="session")
def sizes(request) -> Sizes:
    smoke = os.environ.get("MLKV_BENCH_SMOKE") == "1" or not benchmarks_enabled(request.config)
    if smoke:
        return Sizes(True, resident_rows=_env_int("MLKV_BENCH_RESIDENT_ROWS", 1 << 15),
                     resident_memory=_env_int("MLKV_BENCH_RESIDENT_MEMORY", 16 * MiB),
                     disk_memory=_env_int("MLKV_BENCH_DISK_MEMORY", 4 * MiB),
                     disk_factor=_env_int("MLKV_BENCH_DISK_FACTOR", 8), resident_batches=2,
                     disk_batches=2, rounds=1, disk_rounds=1, startup_rounds=1,
                     startup_cold_rounds=1)
    return Sizes(False, resident_rows=_env_int("MLKV_BENCH_RESIDENT_ROWS", 1 << 20),
                 resident_memory=_env_int("MLKV_BENCH_RESIDENT_MEMORY", 512 * MiB),
                 disk_memory=_env_int("MLKV_BENCH_DISK_MEMORY", 64 * MiB),
                 disk_factor=_env_int("MLKV_BENCH_DISK_FACTOR", 8),
                 resident_batches=_env_int("MLKV_BENCH_RESIDENT_BATCHES", 32),
                 disk_batches=_env_int("MLKV_BENCH_DISK_BATCHES", 8),
                 rounds=_env_int("MLKV_BENCH_ROUNDS", 5),
                 disk_rounds=_env_int("MLKV_BENCH_DISK_ROUNDS", 3),
                 startup_rounds=_env_int("MLKV_BENCH_STARTUP_ROUNDS", 5),
                 startup_cold_rounds=_env_int("MLKV_BENCH_STARTUP_COLD_ROUNDS", 2))


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory):
    """A scratch directory for the stores of this session, removed at its end."""
    base = os.environ.get("MLKV_BENCH_DIR")
    if base:
        os.makedirs(base, exist_ok=True)
        import tempfile
        path = tempfile.mkdtemp(prefix="mlkv-bench-", dir=base)
    else:
        path = str(tmp_path_factory.mktemp("mlkv-bench"))
    yield path
    if not os.environ.get("MLKV_BENCH_KEEP"):
        benchlib.rmtree(path)


@pytest.fixture(scope="session")
def zipf_sampler():
    """The seeded Zipf(0.99) sampler class (``ZipfSampler(n, a, seed)``)."""
    return benchlib.ZipfSampler


# ---- pytest-benchmark hooks: machine, command, ratios in the JSON ------------------------------

def _command(config) -> str:
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                   if k.startswith("MLKV_BENCH_"))
    args = " ".join(config.invocation_params.args)
    return f"{env + ' ' if env else ''}python -m pytest {args}"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["mlkv_bench"] = benchlib.machine()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["mlkv_command"] = _command(config)
    output_json["mlkv_summary"] = summary.summarize(output_json.get("benchmarks", []))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled or not session.benchmarks:
        return
    dicts = []
    for b in session.benchmarks:
        try:
            dicts.append(b.as_dict(include_data=False))
        except Exception:  # noqa: BLE001 -- a summary must never fail the run
            continue
    text = summary.markdown(summary.summarize(dicts))
    if text:
        terminalreporter.write_sep("=", "mlkv benchmark summary (rows/s and ratios)")
        terminalreporter.write_line(text)
