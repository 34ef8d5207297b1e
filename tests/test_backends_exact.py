"""Exact cases on every backend, against values derived here with Python loops.

``img = I`` (D = B) makes S = img @ txt.T equal to txt.T exactly in every dtype and on
every backend (selhn-loss.md §4), so with dyadic scores and a dyadic margin every hinge
argument, gap and decision is exact: every backend, the reference included, must return
the same decisions as the brute force below, per anchor, and the same values up to the
rounding of the output dtype.

* NaN: one NaN in ``img`` (one row of S all NaN, so each caption anchor has one NaN
  negative among finite ones) and, separately, one in ``txt`` (one column of S all NaN:
  each image anchor has one NaN negative). Per anchor: the NaN pattern of the losses,
  the finite losses, ``hardest_index`` (the NaN's index), ``gap`` and the gates.
* Hinges exactly at zero: a hinge is active iff its argument is > 0 (strict), so an
  argument of exactly 0 adds nothing to the loss and nothing to the gradient, on the
  dense (gated) path, on the hardest-negative path and in the diagonal's active count.
* 16-bit inputs on random batches: gradients, including the gated (dense) ones, within
  the rounding of the output dtype relative to the largest entry.

``brute_force`` imports nothing from selhn_ext: it follows the formulas of selhn-loss.md
§2 and §3 with explicit loops over anchors and negatives.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import HAS_CUDA, assert_relative_close, require_backend

from selhn_ext import selhn_loss
from selhn_ext.reference import selhn_loss_reference

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
BACKENDS = ["reference", "chunked", "cpu", "triton", "cuda"]
NEEDS_GPU = {"cuda"}  # its cases carry the gpu marker (triton runs in the interpreter here)
# fp64 is not a case for the GPU fused backends: they decline it by design (§4).
TAKES_F64 = {"reference", "chunked", "cpu"}
MODES = ["selhn", "hardest", "all", "sum_hinges"]


def backend_dtype_cases(dtypes, extra=((),), extra_ok=lambda dtype, *extra: True):
    """(backend, dtype, *extra) for every backend and every dtype it takes; the cuda
    cases carry the gpu marker. Combinations ``extra_ok`` rejects are not generated
    (strict skips would fail a skip)."""
    cases = []
    for name in BACKENDS:
        marks = (pytest.mark.gpu,) if name in NEEDS_GPU else ()
        for dtype in dtypes:
            if dtype == F64 and name not in TAKES_F64:
                continue
            for more in extra:
                if not extra_ok(dtype, *more):
                    continue
                label = "-".join([name, str(dtype).removeprefix("torch."), *map(str, more)])
                cases.append(pytest.param(name, dtype, *more, marks=marks, id=label))
    return cases


def device_of(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def exact_inputs(s: torch.Tensor, dtype, device):
    """img = I and txt = S.T, so img @ txt.T == S exactly (S must be exact in ``dtype``)."""
    batch = s.shape[0]
    txt = s.T.contiguous().to(dtype)
    assert torch.equal(txt.double().T, s.double()), "S must be exact in the input dtype"
    return torch.eye(batch, dtype=dtype, device=device), txt.to(device)


# ----------------------------------------------------------------------------- brute force


def _beats(v: float, best: float | None) -> bool:
    """Does a later candidate replace the best so far? NaN beats every number; ties and
    later NaNs keep the earlier (smaller) index."""
    if best is None:
        return True
    if math.isnan(best):
        return False
    return math.isnan(v) or v > best


def brute_force(s, margin, eps, mode, upstream, ids=None):
    """Per-anchor losses (2, B), decisions and G (B, B) of §2 and §3, with loops.

    ``s`` is a B x B list of Python floats (exact), ``upstream`` a (2, B) list; returns a
    dict of lists. G is the matrix with dL/dimg = G @ txt and dL/dtxt = G.T @ img.
    """
    batch = len(s)
    g = [[0.0] * batch for _ in range(batch)]
    out = {"loss": [], "gated": [], "hardest_index": [], "gap": []}
    for direction in (0, 1):

        def score(a, c, direction=direction):  # anchor a, candidate c
            return s[a][c] if direction == 0 else s[c][a]

        def add(a, c, w, direction=direction):  # w on pair (anchor a, negative c)
            i, j = (a, c) if direction == 0 else (c, a)
            g[i][j] += w
            g[a][a] -= w  # d_a = S_aa: every active hinge carries -d_a

        losses, gates, hardest, gaps = [], [], [], []
        for a in range(batch):
            d = score(a, a)
            negs = [c for c in range(batch) if c != a and (ids is None or ids[a] != ids[c])]
            best, index = None, -1
            for c in negs:
                if _beats(score(a, c), best):
                    best, index = score(a, c), c
            gap = d - best if negs else math.nan
            near_tie = abs(gap) < eps  # False for NaN
            gated = bool(negs) and {"selhn": near_tie, "hardest": False}.get(mode, True)
            args = [(c, (margin + score(a, c)) - d) for c in negs]
            hinges = [x if (x > 0 or math.isnan(x)) else 0.0 for _, x in args]
            u = upstream[direction][a]
            if not negs:
                loss = 0.0
            elif gated:
                scale = 1.0 if mode == "sum_hinges" else 1.0 / len(negs)
                loss = sum(hinges) * scale
                for c, x in args:
                    if x > 0:  # strictly positive: a hinge at exactly 0 is inactive
                        add(a, c, u * scale)
            else:
                hard_arg = (margin + best) - d
                loss = hard_arg if (hard_arg > 0 or math.isnan(hard_arg)) else 0.0
                if hard_arg > 0:
                    add(a, index, u)
            losses.append(loss + 0.0 * d)  # NaN in the anchor's own pair reaches its loss
            gates.append(gated)
            hardest.append(index)
            gaps.append(gap)
        out["loss"].append(losses)
        out["gated"].append(gates)
        out["hardest_index"].append(hardest)
        out["gap"].append(gaps)
    out["g"] = g
    return out


def kernel_paths(backend: str) -> list[str | None]:
    """The C++ kernel's vector paths (AVX-512 through SIMDe on machines without it, AVX2,
    portable): each runs its own fold code, so each must pass. None: the default."""
    if backend != "cpu":
        return [None]
    return list(torch.ops.selhn._cpu_simd_paths())


@contextlib.contextmanager
def kernel_path(path: str | None):
    if path is None:
        yield
        return
    torch.ops.selhn._cpu_set_simd_path(path)
    try:
        yield
    finally:
        torch.ops.selhn._cpu_set_simd_path("best")


def run_backend(backend, img, txt, **options):
    """(per-anchor loss, stats, grad img, grad txt) of selhn_loss on leaves of the inputs."""
    upstream = options.pop("upstream", None)
    x = img.detach().clone().requires_grad_(True)
    y = txt.detach().clone().requires_grad_(True)
    loss, stats = selhn_loss(x, y, reduction="none", backend=backend, return_stats=True, **options)
    if upstream is not None:
        (loss * upstream.to(loss.device, loss.dtype)).sum().backward()
    return loss.detach(), stats, x.grad, y.grad


def assert_decisions_equal(stats, expected, what):
    device = stats.gated.device
    gated = torch.tensor(expected["gated"], device=device)
    index = torch.tensor(expected["hardest_index"], device=device)
    gap = torch.tensor(expected["gap"], dtype=stats.gap.dtype, device=device)
    for k in (0, 1):
        side = f"{what}, {'image' if k == 0 else 'caption'} anchors"
        assert torch.equal(stats.hardest_index[k], index[k]), (
            f"{side}: hardest_index {stats.hardest_index[k].tolist()} != {index[k].tolist()}"
        )
        assert torch.equal(stats.gated[k], gated[k]), (
            f"{side}: gated {stats.gated[k].tolist()} != {gated[k].tolist()}"
        )
        same = (stats.gap[k] == gap[k]) | (torch.isnan(stats.gap[k]) & torch.isnan(gap[k]))
        assert bool(same.all()), f"{side}: gap {stats.gap[k].tolist()} != {gap[k].tolist()}"


def assert_losses_equal(loss, expected, what):
    """Same NaN pattern per anchor; finite losses equal up to the compute dtype's rounding
    (the only rounding left in exact cases is the division by n)."""
    want = torch.tensor(expected, dtype=torch.float64)
    got = loss.double().cpu()
    nan_got, nan_want = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_got, nan_want), (
        f"{what}: NaN losses at {nan_got.nonzero().tolist()}, expected at "
        f"{nan_want.nonzero().tolist()}"
    )
    rel = 1e-13 if loss.dtype == torch.float64 else 2**-22
    finite = ~nan_want
    for k in range(got.shape[0]):
        for b in range(got.shape[1]):
            if finite[k, b]:
                w = float(want[k, b])
                assert abs(float(got[k, b]) - w) <= rel * abs(w), (
                    f"{what}: loss[{k}, {b}] = {float(got[k, b])!r}, expected {w!r}"
                )


# ------------------------------------------------------------------------------------ NaN


def nan_batch(batch: int, seed: int) -> torch.Tensor:
    """A dyadic S (multiples of 1/8 in [-1, 1], exact in every dtype) with a mix of close
    and clear gaps, so the NaN-free anchors take both branches of the gate."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randint(-8, 5, (batch, batch), generator=gen).double() / 8
    s.fill_diagonal_(0.5)
    return s


# 9 pairs: one tile, a positive NaN. 150 pairs: several row and column tiles of the C++
# kernel (64 x 128) and of the Triton kernels, so maxima from different tiles are merged
# in both directions, and a negative NaN; in fp32 and fp64 only.
NAN_CASES = backend_dtype_cases(
    [F64, F32, BF16, F16],
    extra=[(batch, where) for batch in (9, 150) for where in ("img", "txt")],
    extra_ok=lambda dtype, batch, where: batch == 9 or dtype in (F32, F64),
)


@pytest.mark.parametrize("backend,dtype,batch,where", NAN_CASES)
def test_one_nan_poisons_exactly_the_anchors_that_see_it(backend, dtype, batch, where):
    """A NaN in img[r] makes row r of S NaN: caption anchor j != r has the NaN negative r,
    image anchor r has a NaN positive. A NaN in txt[r] makes column r NaN: image anchor
    i != r has the NaN negative r. Every other anchor stays finite and exact."""
    device = device_of(backend)
    require_backend(backend, device, dtype)
    s = nan_batch(batch, seed=batch)
    # Not the first negative of any anchor or of any tile: a max that drops a NaN it
    # meets after a finite value must show here.
    r = batch // 2 + 1
    img, txt = exact_inputs(s, dtype, device)
    # Both signs of NaN (x86 arithmetic makes negative ones, Python positive ones): a rule
    # that orders a NaN by its bits would put the negative one below every number.
    negative = batch > 9
    target = img if where == "img" else txt
    target[r, batch // 3] = -float("nan") if negative else float("nan")
    assert bool(torch.signbit(target[r, batch // 3])) == negative
    s_nan = s.clone()
    if where == "img":
        s_nan[r, :] = float("nan")
    else:
        s_nan[:, r] = float("nan")
    what = f"{backend} {dtype} B={batch} NaN in {where}[{r}]"
    for mode in MODES:
        expected = brute_force(s_nan.tolist(), 0.25, 0.0625, mode, [[1.0] * batch] * 2)
        for path in kernel_paths(backend):
            where = f"{what} {mode} path={path}"
            with kernel_path(path):
                loss, stats, _, _ = run_backend(
                    backend, img, txt, margin=0.25, eps=0.0625, mode=mode
                )
            assert_decisions_equal(stats, expected, where)
            assert_losses_equal(loss, expected["loss"], where)
            # The data is what the test claims: each side has NaN and finite losses.
            poisoned = torch.isnan(loss.cpu())
            assert poisoned.any(dim=1).all() and (~poisoned).any(), where
            if mode == "selhn":
                assert stats.gated.any(), where  # the gated path saw NaN-free anchors too


# ------------------------------------------------------------------- hinges exactly at 0

ZERO_BATCH = 9  # n = 8 negatives without ids: 1/n is exact, so are the losses
ZERO_EPS = 0.0625  # with scores on a 1/8 grid, gated iff the hardest negative ties d
ZERO_IDS = [0, 0, 1, 2, 3, 4, 5, 6, 7]  # anchors 0 and 1 are not negatives of each other
# Relative rounding of one gradient entry in the output dtype (twice half an ulp), and the
# compute dtype's share of the largest entry (fp32 sums for 16- and 32-bit inputs).
GRAD_REL = {F64: 1e-13, F32: 2**-22, BF16: 2**-7, F16: 2**-10}
COMPUTE_REL = {F64: 1e-13, F32: 1e-5, BF16: 1e-5, F16: 1e-5}
# Tensor-core backwards multiply the coefficient matrix W rounded to the 16-bit input dtype
# (half an ulp of each entry), so entry (i, k) of W @ y may move by that share of
# sum_j |W_ij| |y_jk|; an error that is a whole term (a dropped gated gradient) is not.
PRODUCT_REL = {F64: 0.0, F32: 0.0, BF16: 2**-8, F16: 2**-10}


def _hinge_cases(s, margin, direction):
    """Per anchor of one direction: (gated, argument of each negative's hinge, hardest
    hinge argument), for mode selhn at ZERO_EPS without ids."""
    batch = len(s)
    out = []
    for a in range(batch):
        row = [s[a][c] if direction == 0 else s[c][a] for c in range(batch)]
        d = row[a]
        negs = [row[c] for c in range(batch) if c != a]
        best = max(negs)
        out.append((abs(d - best) < ZERO_EPS, [(margin + v) - d for v in negs], margin + best - d))
    return out


def zero_hinge_batch(margin: float) -> torch.Tensor:
    """A 9 x 9 S on a 1/8 grid where, in both directions, gated anchors have hinges at
    exactly 0 and active ones, and hardest-negative anchors have a hardest hinge at exactly
    0 and active ones. The first seed that gives all of it; S depends only on the margin."""
    for seed in range(1000):
        gen = torch.Generator().manual_seed(seed)
        d = 0.5 + torch.randint(0, 2, (ZERO_BATCH,), generator=gen).double() / 8
        # Offsets from d_i - margin, the row anchor's zero: 0 is a hinge at exactly 0 and
        # +margin ties the positive (gated).
        choice = torch.tensor([-0.25, -0.125, 0.0, 0.0, 0.125, margin], dtype=torch.float64)
        pick = torch.randint(0, len(choice), (ZERO_BATCH, ZERO_BATCH), generator=gen)
        s = d[:, None] - margin + choice[pick]
        s[range(ZERO_BATCH), range(ZERO_BATCH)] = d
        s_list = s.tolist()
        ok = True
        for direction in (0, 1):
            cases = _hinge_cases(s_list, margin, direction)
            gated = [args for g, args, _ in cases if g]
            hard = [h for g, _, h in cases if not g]
            ok &= any(0.0 in args for args in gated) and any(max(a) > 0 for a in gated)
            ok &= 0.0 in hard and any(h > 0 for h in hard)
        if ok:
            return s
    raise AssertionError("no seed gives every exact-zero case")  # pragma: no cover


ZERO_CASES = backend_dtype_cases([F64, F32, BF16, F16], extra=[(0.25,), (0.5,)])


@pytest.mark.parametrize("backend,dtype,margin", ZERO_CASES)
def test_hinges_exactly_at_zero_add_nothing(backend, dtype, margin):
    """Loss, decisions and both gradients against the brute force, every mode, with and
    without ids. A hinge argument of exactly 0 is inactive (strictly positive counts): it
    must not add its coefficient to the dense gradient, to the diagonal's active count,
    or (as the hardest hinge) a gradient of 1."""
    device = device_of(backend)
    require_backend(backend, device, dtype)
    s = zero_hinge_batch(margin)
    img, txt = exact_inputs(s, dtype, device)
    gen = torch.Generator().manual_seed(3)
    upstream = torch.randint(1, 5, (2, ZERO_BATCH), generator=gen).double() / 2  # dyadic
    for ids in (None, ZERO_IDS):
        ids_t = None if ids is None else torch.tensor(ids, device=device)
        for mode, path in ((m, p) for m in MODES for p in kernel_paths(backend)):
            what = f"{backend} {dtype} margin={margin} {mode} ids={ids is not None} path={path}"
            expected = brute_force(s.tolist(), margin, ZERO_EPS, mode, upstream.tolist(), ids)
            with kernel_path(path):
                loss, stats, grad_img, grad_txt = run_backend(
                    backend, img, txt, margin=margin, eps=ZERO_EPS, mode=mode, ids=ids_t,
                    upstream=upstream,
                )  # fmt: skip
            assert_decisions_equal(stats, expected, what)
            assert_losses_equal(loss, expected["loss"], what)
            g = torch.tensor(expected["g"], dtype=torch.float64)
            x, y = img.double().cpu(), txt.double().cpu()
            for got, want, size, name in (
                (grad_img, g @ y, g.abs() @ y.abs(), "img.grad"),
                (grad_txt, g.T @ x, g.T.abs() @ x.abs(), "txt.grad"),
            ):
                assert got.dtype == dtype, f"{what} {name}: dtype {got.dtype}"
                assert_gradient_close(got, want, size, dtype, f"{what} {name}")


def assert_gradient_close(got, want, size, dtype, what):
    """Each entry within the output dtype's rounding of itself, plus the compute dtype's
    share of the largest entry, plus the 16-bit rounding of W's share of ``size`` (the
    entry's sum of absolute terms, |W| @ |y|)."""
    got, want = got.detach().double().cpu(), want.double()
    scale = want.abs().max().item()
    assert scale > 0, f"{what}: the expected gradient is zero; the case proves nothing"
    bound = GRAD_REL[dtype] * want.abs() + COMPUTE_REL[dtype] * scale + PRODUCT_REL[dtype] * size
    bad = (got - want).abs() > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} entries off, e.g. at {bad.nonzero()[0].tolist()}: "
        f"{got[bad][0].item()!r} vs {want[bad][0].item()!r}"
    )


def test_zero_hinge_batch_has_exact_zero_arguments():
    """The batch is what the test above relies on (checked here once, in plain numbers)."""
    for margin in (0.25, 0.5):
        s = zero_hinge_batch(margin)
        assert torch.equal(s * 8, (s * 8).round()) and s.abs().max() <= 1
        zero_rows = ((margin + s) - s.diagonal()[:, None] == 0).fill_diagonal_(False)
        zero_cols = ((margin + s) - s.diagonal()[None, :] == 0).fill_diagonal_(False)
        assert zero_rows.sum() >= 3 and zero_cols.sum() >= 3


# ----------------------------------------------------------- 16-bit inputs, random batch

RANDOM_CASES = backend_dtype_cases([F32, BF16, F16])


def random_batch(dtype, batch=130, dim=64, seed=5):
    """Unit pairs whose positives score about like their hardest negatives, rounded to
    ``dtype`` (the fp64 copies are exactly the inputs)."""
    gen = torch.Generator().manual_seed(seed)
    target = math.sqrt(2 * math.log(batch) / dim)
    img = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen, dtype=F64))
    noise = torch.randn(batch, dim, generator=gen, dtype=F64) / math.sqrt(dim)
    txt = torch.nn.functional.normalize(img + math.sqrt(1 / target**2 - 1) * noise)
    return img.to(dtype), txt.to(dtype)


def clear_batch(dtype, margin=0.2, clear=1e-5):
    """The first random batch (rounded to ``dtype``) whose decisions are all at least
    ``clear`` from their flip in fp64, with eps halfway between the two middle |gap|s so
    that about half the anchors are gated: every hardest index (top-2 margin), every gate
    (| |gap| - eps |), every gated anchor's hinges and every other anchor's hardest hinge
    (|argument|). fp32 computes S within about 1e-6 here, so each decision is clear."""
    for seed in range(100):
        img, txt = random_batch(dtype, seed=seed)
        x, y = img.double(), txt.double()
        s = x @ y.T
        d = s.diagonal()
        off = ~torch.eye(len(s), dtype=torch.bool)
        tops = [sc.masked_fill(~off, float("-inf")).topk(2, dim=1).values for sc in (s, s.T)]
        gaps = torch.cat([d - top[:, 0] for top in tops]).abs().sort().values
        mid = len(gaps) // 2
        eps = float(gaps[mid - 1] + gaps[mid]) / 2
        distances = []
        for scores, top in zip((s, s.T), tops, strict=True):
            args = (margin + scores) - d[:, None]
            gated = (d - top[:, 0]).abs() < eps
            distances += [
                (top[:, 0] - top[:, 1]).min(),
                ((d - top[:, 0]).abs() - eps).abs().min(),
                args[gated][off[gated]].abs().min(),
                ((margin + top[:, 0]) - d)[~gated].abs().min(),
            ]
        if min(float(v) for v in distances) > clear:
            return img, txt, eps
    raise AssertionError("no random batch clear of every decision")  # pragma: no cover


@pytest.mark.parametrize("backend,dtype", RANDOM_CASES)
def test_gated_and_hardest_gradients_within_output_rounding(backend, dtype):
    """Two-step (§4) on a random batch where about half the anchors are gated: every
    decision is clear of its flip in fp64, so the decisions must equal the reference's,
    and loss and gradients must equal the fp64 reference within the output dtype's
    rounding relative to each entry (a 16-bit gradient entry is about 1e-3 here: an
    absolute tolerance of that size would pass an all-zero gradient)."""
    device = device_of(backend)
    require_backend(backend, device, dtype)
    img, txt, eps = clear_batch(dtype)
    x64, y64 = img.double(), txt.double()
    gen = torch.Generator().manual_seed(9)
    upstream = torch.rand(2, img.shape[0], generator=gen, dtype=F64) + 0.5
    for mode, path in ((m, p) for m in ("selhn", "all", "hardest") for p in kernel_paths(backend)):
        what = f"{backend} {dtype} {mode} path={path}"
        with kernel_path(path):
            loss, stats, grad_img, grad_txt = run_backend(
                backend, img.to(device), txt.to(device), eps=eps, mode=mode, upstream=upstream
            )
        ref_x, ref_y = x64.clone().requires_grad_(), y64.clone().requires_grad_()
        ref, ref_stats = selhn_loss_reference(ref_x, ref_y, eps=eps, mode=mode, reduction="none")
        (ref * upstream).sum().backward()
        assert torch.equal(stats.gated.cpu(), ref_stats["gated"]), what
        assert torch.equal(stats.hardest_index.cpu(), ref_stats["hardest_index"]), what
        if mode == "selhn":
            fraction = stats.gated.float().mean().item()
            assert 0.2 < fraction < 0.8, f"{what}: gated fraction {fraction}"
        assert_relative_close(loss, ref, 1e-5, f"{what} loss")
        w = coefficient_matrix(x64, y64, eps, mode, upstream).abs()
        size_img, size_txt = w @ y64.abs(), w.T @ x64.abs()
        assert_gradient_close(grad_img, ref_x.grad, size_img, dtype, f"{what} img.grad")
        assert_gradient_close(grad_txt, ref_y.grad, size_txt, dtype, f"{what} txt.grad")


def coefficient_matrix(x, y, eps, mode, upstream):
    """W = d(sum upstream * loss)/dS of the fp64 reference, so that dimg = W @ y: the loss
    of img = I and txt = S.T has the same S, and its txt gradient is W.T @ I."""
    s_t = (x @ y.T).T.clone().requires_grad_()
    eye = torch.eye(len(x), dtype=x.dtype)
    loss, _ = selhn_loss_reference(eye, s_t, eps=eps, mode=mode, reduction="none")
    (loss * upstream).sum().backward()
    return s_t.grad.T


@pytest.mark.parametrize("backend,dtype", backend_dtype_cases([F32]))
def test_subnormal_upstream_gives_finite_gradients(backend, dtype):
    """An upstream gradient so small that every gated coefficient is subnormal (below
    2**-126 in fp32): the gradients stay finite and equal the fp64 reference within the
    relative tolerance plus the subnormal spacing (2**-149) of each of the 2 B rounded
    terms an entry sums. The expected entries are about 2**-140, well above that
    allowance, so an all-zero or NaN gradient fails."""
    device = device_of(backend)
    require_backend(backend, device, dtype)
    img, txt, eps = clear_batch(dtype)
    x64, y64 = img.double(), txt.double()
    gen = torch.Generator().manual_seed(11)
    upstream = (torch.rand(2, img.shape[0], generator=gen, dtype=F64) + 0.5) * 2.0**-135
    _, stats, grad_img, grad_txt = run_backend(
        backend, img.to(device), txt.to(device), eps=eps, mode="selhn", upstream=upstream
    )
    assert stats.gated.any(), "the case needs gated anchors"
    ref_x, ref_y = x64.clone().requires_grad_(), y64.clone().requires_grad_()
    ref, _ = selhn_loss_reference(ref_x, ref_y, eps=eps, mode="selhn", reduction="none")
    (ref * upstream).sum().backward()
    allowance = 2 * img.shape[0] * 2.0**-149
    for got, want, name in ((grad_img, ref_x.grad, "img"), (grad_txt, ref_y.grad, "txt")):
        got = got.detach().double().cpu()
        assert torch.isfinite(got).all(), f"{backend} {name}.grad: non-finite entries"
        assert want.abs().max() > 8 * allowance, "the case must be larger than its allowance"
        err = (got - want).abs().max().item()
        bound = 1e-5 * want.abs().max().item() + allowance
        assert err <= bound, f"{backend} {name}.grad: error {err:.3g} > {bound:.3g}"
