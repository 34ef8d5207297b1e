"""The registry (dispatch.py): every reason a backend cannot take inputs, sizes included,
read from shapes alone, shown by ``backend_status`` and raised when the backend is named."""

from __future__ import annotations

import pytest
import torch

import selhn_ext
from selhn_ext import dispatch


def _huge(batch: int, dim: int = 4, dtype=torch.float32) -> torch.Tensor:
    """A (batch, dim) tensor that holds one element: shapes are all the checks read."""
    return torch.zeros(1, 1, dtype=dtype).expand(batch, dim)


def test_backend_status_reports_a_batch_over_the_compiled_backend_limit():
    limit = dispatch.COMPILED_MAX_COLUMNS
    over, at = _huge(limit + 1), _huge(limit)
    reason = f"takes at most N = {limit:,} pairs"
    status = selhn_ext.backend_status(over, over)
    assert reason in status["cpu"]
    assert status["chunked"] is None and status["reference"] is None
    assert reason not in (selhn_ext.backend_status(at, at)["cpu"] or "")
    # Asked for by name, the backend raises with that reason before touching the data.
    with pytest.raises(selhn_ext.BackendUnavailableError, match=reason):
        selhn_ext.selhn_loss(over, over, backend="cpu")


def test_size_limits_of_every_backend_from_shapes_alone():
    def size_reasons(name, device_type, dtype, columns, rows=None):
        reasons = dispatch.unsupported_reasons(name, device_type, dtype, columns, rows)
        return [r for r in reasons if "takes at most" in r]

    f16 = torch.float16
    # CUDA: 65535 tiles of 64 per grid axis, for the columns and the local rows alike.
    cuda_max = dispatch.CUDA_MAX_TILES * dispatch.CUDA_TILE
    assert cuda_max == 4_194_240
    assert not size_reasons("cuda", "cuda", f16, cuda_max)
    assert "got N = 4,194,241" in size_reasons("cuda", "cuda", f16, cuda_max + 1)[0]
    assert "got b = 4,194,241" in size_reasons("cuda", "cuda", f16, 2**30, cuda_max + 1)[-1]
    # C++ kernels (CPU and CUDA): int32 column indices.
    assert size_reasons("cpu", "cpu", torch.float64, 2**31)
    assert not size_reasons("cpu", "cpu", torch.float64, 2**31 - 1)
    # Triton: int32 indices.
    assert not size_reasons("triton", "cuda", f16, 2**31 - 1)
    assert "int32" in size_reasons("triton", "cuda", f16, 2**31)[0]
    # The PyTorch backends take any size.
    for name in ("chunked", "reference"):
        assert not size_reasons(name, "cpu", torch.float32, 2**40)
    # auto passes over a backend that cannot take the size.
    assert dispatch.choose_backend("auto", "cpu", torch.float32, 2**31) == "chunked"


def test_status_shows_the_variant_and_use_variant_checks_names():
    status = selhn_ext.backend_status(_huge(4), _huge(4))
    assert status.variants == {"triton": dispatch.variant("triton")}
    assert "variants: triton:" in repr(status)
    assert dispatch.variant("chunked") is None
    with pytest.raises(ValueError, match="not a variant of 'chunked'"):
        with dispatch.use_variant("chunked", "tiles"):
            pass


def test_use_backend_restores_the_backend_object():
    from selhn_ext.chunked import ChunkedBackend

    before = dispatch.backend("chunked")
    replacement = ChunkedBackend(chunk_rows=3)
    with dispatch.use_backend("chunked", replacement):
        assert dispatch.backend("chunked") is replacement
    assert dispatch.backend("chunked") is before
