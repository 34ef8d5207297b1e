"""Shared test configuration.

* ``@pytest.mark.gpu``: the test needs a CUDA device (skips with a reason elsewhere).
* ``require_backend(name, device_type, dtype)``: skip with the dispatch's reason when a
  backend cannot run here, unless ``SELHN_REQUIRE`` (comma-separated backend names) lists
  it, in which case the test fails: CI sets it so a missing build is never a silent skip.
* Without a CUDA device, ``TRITON_INTERPRET=1`` is set for the whole run.
* ``SELHN_STRICT_SKIPS=1``: any skip outside a ``gpu`` test fails the run.
* The terminal summary prints how many tests passed per backend (the ``backend``
  parameter of a parametrized test, or ``@pytest.mark.backend("name")``).
"""

from __future__ import annotations

import collections
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton kernels run on CPU tensors through the interpreter, which must be chosen
    # before triton (or selhn_ext) is first imported; conftest loads before any test module.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REQUIRED = {name for name in os.environ.get("SELHN_REQUIRE", "").split(",") if name.strip()}
STRICT_SKIPS = os.environ.get("SELHN_STRICT_SKIPS", "") == "1"

_passed_per_backend: collections.Counter = collections.Counter()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "backend(name): the backend this test exercises")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run by bench/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def require_backend(name: str, device_type: str = "cpu", dtype=torch.float32) -> None:
    """Skip (or fail, when SELHN_REQUIRE names it) if backend ``name`` cannot run here."""
    from selhn_ext import dispatch

    reasons = dispatch.unsupported_reasons(name, device_type, dtype)
    if not reasons:
        return
    message = f"backend {name!r} unavailable: " + "; ".join(reasons)
    if name in REQUIRED:
        pytest.fail(message + " (required by SELHN_REQUIRE)")
    pytest.skip(message)


def _backend_of(item) -> str | None:
    marker = item.get_closest_marker("backend")
    if marker is not None:
        return marker.args[0]
    callspec = getattr(item, "callspec", None)
    if callspec is not None and isinstance(callspec.params.get("backend"), str):
        return callspec.params["backend"]
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and STRICT_SKIPS and "gpu" not in item.keywords:
        report.outcome = "failed"
        report.longrepr = (
            f"skipped outside the gpu marker (SELHN_STRICT_SKIPS=1): {report.longrepr}"
        )
    if report.when == "call" and report.passed:
        backend = _backend_of(item)
        if backend is not None:
            _passed_per_backend[backend] += 1


def pytest_terminal_summary(terminalreporter):
    if _passed_per_backend:
        terminalreporter.section("passed tests per backend")
        for name, count in sorted(_passed_per_backend.items()):
            terminalreporter.write_line(f"{name}: {count}")
