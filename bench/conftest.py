"""pytest-benchmark setup for the kernel benches: `pytest bench/ --benchmark-only`.

Collects bench_*.py (pytest only looks at test_*.py by default). BENCH_QUICK=1 keeps only the
smallest shape of each op (a ~1 minute smoke run); the full run covers the issue's goal shapes.
"""
import os

import pytest

QUICK = os.environ.get("BENCH_QUICK") == "1"


def pytest_collect_file(file_path, parent):
    # Files named on the command line are already collected by pytest itself.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def require_memory(gib: float) -> None:
    """Skip (with the numbers) when this machine cannot hold a shape right now."""
    free = mem_available_gib()
    if free < gib:
        pytest.skip(f"needs ~{gib:.0f} GiB free memory, {free:.1f} GiB available")
