"""Throughput benchmarks (pytest-benchmark): run only when asked for.

    pytest tests/bench --benchmark-only        # or: -m bench, or VFE_BENCH=1

In a normal test run the tests marked ``bench`` are skipped (they busy-poll
both cores for about a minute); the project-wide way to leave them out is
``-m "not bench"``.
"""
import os

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "bench: throughput benchmarks (pytest-benchmark); run explicitly")


def _requested(config) -> bool:
    if os.environ.get("VFE_BENCH") == "1":
        return True
    try:
        if config.getoption("benchmark_only"):
            return True
    except (ValueError, AttributeError):
        pass
    expr = config.getoption("markexpr", "") or ""
    return "bench" in expr and "not bench" not in expr


def pytest_collection_modifyitems(config, items):
    if _requested(config):
        return
    skip = pytest.mark.skip(reason="benchmark: run with `pytest tests/bench --benchmark-only`, "
                                   "-m bench or VFE_BENCH=1")
    for item in items:
        if item.get_closest_marker("bench"):
            item.add_marker(skip)
