"""The reference (the spec) and the chunked backend against an independent brute force.

``brute_force_loss`` uses explicit Python loops over anchors and negatives and imports
nothing from selhn_ext.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_relative_close

from selhn_ext import selhn_loss
from selhn_ext.chunked import ChunkedBackend
from selhn_ext.reference import Decisions, selhn_loss_reference

MODES = ["selhn", "hardest", "all", "sum_hinges"]
REDUCTIONS = ["mean", "sum", "none"]


def brute_force_loss(img, txt, margin, eps, mode, reduction, ids=None):
    """Per-anchor SelHN losses with Python loops, float64, from the written-out formulas."""
    batch = img.shape[0]
    s = [[float(img[i] @ txt[j]) for j in range(batch)] for i in range(batch)]

    def negative(i, j):
        return i != j and (ids is None or int(ids[i]) != int(ids[j]))

    def anchor_loss(score, i):
        # score(i, j): similarity of anchor i with candidate j in this direction.
        d = score(i, i)
        negs = [j for j in range(batch) if negative(i, j)]
        if not negs:
            return 0.0
        hinges = [max(0.0, margin + score(i, j) - d) for j in negs]
        hardest = max(score(i, j) for j in negs)
        gated = {"selhn": abs(d - hardest) < eps, "hardest": False}.get(mode, True)
        if not gated:
            return max(0.0, margin + hardest - d)
        if mode == "sum_hinges":
            return sum(hinges)
        return sum(hinges) / len(negs)

    rows = [anchor_loss(lambda i, j: s[i][j], i) for i in range(batch)]
    cols = [anchor_loss(lambda j, i: s[i][j], j) for j in range(batch)]
    if reduction == "mean":
        return torch.tensor((sum(rows) + sum(cols)) / (2 * batch), dtype=torch.float64)
    if reduction == "sum":
        return torch.tensor(sum(rows) + sum(cols), dtype=torch.float64)
    return torch.tensor([rows, cols], dtype=torch.float64)


def random_batch(batch, dim, seed, dtype=torch.float64, collapse=0.0):
    """Unit embeddings; ``collapse`` in [0, 1) pulls every row toward one direction,
    so gaps shrink and more anchors fall within eps (as early in training)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=g, dtype=torch.float64)
    img = torch.randn(batch, dim, generator=g, dtype=torch.float64) * (1 - collapse)
    txt = torch.randn(batch, dim, generator=g, dtype=torch.float64) * (1 - collapse)
    img = torch.nn.functional.normalize(img + collapse * common * 3, dim=1)
    txt = torch.nn.functional.normalize(txt + collapse * common * 3, dim=1)
    return img.to(dtype), txt.to(dtype)


def some_ids(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(1, batch // 2), (batch,), generator=g)


@pytest.mark.parametrize("batch,dim", [(2, 3), (3, 1), (17, 8), (64, 5)])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_ids", [False, True])
def test_reference_equals_brute_force(batch, dim, mode, with_ids):
    img, txt = random_batch(batch, dim, seed=batch * 7 + dim)
    ids = some_ids(batch, seed=batch) if with_ids else None
    eps = 0.05  # large enough that some anchors are gated in selhn mode
    for reduction in REDUCTIONS:
        expected = brute_force_loss(img, txt, 0.2, eps, mode, reduction, ids)
        got, _ = selhn_loss_reference(
            img, txt, margin=0.2, eps=eps, mode=mode, reduction=reduction, ids=ids
        )
        assert_relative_close(got, expected, 1e-12, f"{mode}/{reduction}")


@pytest.mark.backend("chunked")
@pytest.mark.parametrize("batch,dim", [(2, 3), (3, 1), (17, 8), (64, 5)])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_ids", [False, True])
def test_chunked_equals_reference(batch, dim, mode, with_ids, monkeypatch):
    # A block smaller than B, so column statistics are merged across blocks.
    from selhn_ext import dispatch

    monkeypatch.setitem(dispatch._LOADED, "chunked", ChunkedBackend(chunk_rows=5))
    img, txt = random_batch(batch, dim, seed=batch + 100 * dim, collapse=0.5)
    ids = some_ids(batch, seed=batch + 1) if with_ids else None
    for reduction in REDUCTIONS:
        a = img.clone().requires_grad_()
        b = txt.clone().requires_grad_()
        kwargs = dict(margin=0.2, eps=0.05, mode=mode, reduction=reduction, ids=ids)
        expected = brute_force_loss(img, txt, 0.2, 0.05, mode, reduction, ids)
        got, stats = selhn_loss(a, b, backend="chunked", return_stats=True, **kwargs)
        assert_relative_close(got, expected, 1e-12, f"loss {mode}/{reduction}")
        ra = img.clone().requires_grad_()
        rb = txt.clone().requires_grad_()
        ref, ref_stats = selhn_loss_reference(ra, rb, **kwargs)
        up = torch.randn_like(ref) if reduction == "none" else torch.ones_like(ref)
        (got * up).sum().backward()
        (ref * up).sum().backward()
        assert_relative_close(a.grad, ra.grad, 1e-12, f"img.grad {mode}/{reduction}")
        assert_relative_close(b.grad, rb.grad, 1e-12, f"txt.grad {mode}/{reduction}")
        for name in ("gated", "near_tie", "hardest_index", "gated_fraction"):
            assert torch.equal(getattr(stats, name), ref_stats[name]), name
        torch.testing.assert_close(stats.gap, ref_stats["gap"], rtol=1e-12, atol=0, equal_nan=True)


def test_reference_gradients_equal_explicit_g_matrix():
    """§3 of the design notes: dL/dimg = G @ txt, dL/dtxt = G.T @ img with G built by hand."""
    batch, dim, margin, eps = 12, 6, 0.2, 0.05
    img, txt = random_batch(batch, dim, seed=3, collapse=0.6)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9])
    for mode in MODES:
        a = img.clone().requires_grad_()
        b = txt.clone().requires_grad_()
        loss, stats = selhn_loss_reference(
            a, b, margin=margin, eps=eps, mode=mode, reduction="none", ids=ids
        )
        up = torch.randn(2, batch, dtype=torch.float64)
        (loss * up).sum().backward()

        s = img @ txt.T
        d = s.diagonal()
        valid = (ids[:, None] != ids[None, :]) & ~torch.eye(batch, dtype=torch.bool)
        n = valid.sum(1).to(torch.float64)
        scale = torch.ones_like(n) if mode == "sum_hinges" else 1 / n.clamp(min=1)
        gated_r, gated_c = stats["gated"].to(torch.float64)
        k, q = stats["hardest_index"]

        def w_row(i, j):  # Wr_ij without the upstream factor
            dense = gated_r[i] * float(margin + s[i, j] - d[i] > 0) * scale[i]
            hard = float(j == k[i]) * float(margin + s[i, k[i]] - d[i] > 0)
            return dense + (1 - gated_r[i]) * hard

        def w_col(i, j):  # Wc_ij without the upstream factor
            dense = gated_c[j] * float(margin + s[i, j] - d[j] > 0) * scale[j]
            hard = float(i == q[j]) * float(margin + s[q[j], j] - d[j] > 0)
            return dense + (1 - gated_c[j]) * hard

        g = torch.zeros(batch, batch, dtype=torch.float64)
        for i in range(batch):
            for j in range(batch):
                if valid[i, j]:
                    g[i, j] = up[0, i] * w_row(i, j) + up[1, j] * w_col(i, j)
        for i in range(batch):
            g[i, i] = -sum(up[0, i] * w_row(i, j) for j in range(batch) if valid[i, j]) - sum(
                up[1, i] * w_col(j, i) for j in range(batch) if valid[j, i]
            )
        assert g.abs().max() > 0, mode  # the case has active hinges
        assert_relative_close(a.grad, g @ txt, 1e-12, f"img.grad {mode}")
        assert_relative_close(b.grad, g.T @ img, 1e-12, f"txt.grad {mode}")


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(backend, mode):
    # Random unit vectors in D = 16 have clear gaps: no decision flips under the
    # finite-difference step.
    img, txt = random_batch(6, 16, seed=11)
    ids = torch.tensor([0, 1, 1, 2, 3, 4])
    eps = 0.3 if mode == "selhn" else 0.01

    def f(a, b):
        return selhn_loss(a, b, mode=mode, eps=eps, ids=ids, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(
        f, (img.requires_grad_(), txt.requires_grad_()), eps=1e-6, atol=1e-7
    )


def test_decisions_override_changes_the_branch():
    img, txt = random_batch(8, 4, seed=5)
    loss, stats = selhn_loss_reference(img, txt, reduction="none", mode="selhn", eps=0.0)
    assert not stats["gated"].any()
    forced = Decisions(torch.ones(2, 8, dtype=torch.bool), stats["hardest_index"])
    forced_loss, _ = selhn_loss_reference(
        img, txt, reduction="none", mode="selhn", eps=0.0, decisions=forced
    )
    all_loss, _ = selhn_loss_reference(img, txt, reduction="none", mode="all")
    assert_relative_close(forced_loss, all_loss, 1e-12, "forced gates vs mode all")
    assert not torch.allclose(forced_loss, loss)


def test_brute_force_is_not_trivially_zero():
    img, txt = random_batch(5, 3, seed=1)
    values = brute_force_loss(img, txt, 0.2, 0.01, "selhn", "none")
    assert values.abs().sum() > 0
    assert math.isfinite(float(values.sum()))
