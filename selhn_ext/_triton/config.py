"""Host side of the Triton backend shared by the forward and backward launchers: block
configurations, grid splits, test switches and argument preparation.

Nothing in the launchers synchronises with the device: grids are sized from shapes only
(worst case where a device-side count decides the work), and every O(B) step around the
kernels is a glue kernel (glue.py) or, for the fixed-order sum of deterministic slots, a
plain PyTorch op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from ..dispatch import TRITON_INTERPRET, TRITON_MAX_COLUMNS
from ..kernel_interface import Block


@dataclass(frozen=True)
class BlockConfig:
    """One tiling per input dtype; the backward recomputes S with the same one."""

    BM: int  # rows of S per tile
    BN: int  # columns of S per tile
    BK: int  # K step of the S product
    BD: int  # embedding columns per step of the gradient products
    forward_warps: int  # warps of the forward's partials_kernel
    num_warps: int  # warps of the exact fix-up, and of weights_kernel with ids
    weights_warps: int  # warps of the backward's S recompute (weights_kernel) without ids
    num_stages: int

    def backward_warps(self, has_ids: bool) -> int:
        """Warps of weights_kernel: with ids, a 64-bit id per column sits beside S and
        4 warps would spill, so it takes num_warps."""
        return self.num_warps if has_ids else self.weights_warps


# Large blocks: tensor-core friendly on sm_90 and few programs in the interpreter. Every
# tl.dot dimension is >= 16, which the sm_90 compiler requires. The 16-bit forward and the
# backward's S recompute without ids at 4 warps fit two CTAs per SM without spills (255
# registers; bench/static_profile.py), so that one's epilogue runs under the other's MMA;
# the recompute with ids keeps 8 warps (one CTA per SM).
CONFIGS: dict[torch.dtype, BlockConfig] = {
    torch.bfloat16: BlockConfig(
        BM=128, BN=128, BK=64, BD=64, forward_warps=4, num_warps=8, weights_warps=4, num_stages=3
    ),
    torch.float16: BlockConfig(
        BM=128, BN=128, BK=64, BD=64, forward_warps=4, num_warps=8, weights_warps=4, num_stages=3
    ),
    torch.float32: BlockConfig(
        BM=64, BN=64, BK=32, BD=64, forward_warps=4, num_warps=4, weights_warps=4, num_stages=3
    ),
}


# Inner splits of the backward: enough programs to fill the GPU (a multiple of its SM
# count); on CPU (the interpreter) a few, so that merging across splits is exercised.
PROGRAMS_PER_SM = 4
CPU_SPLITS = 3
# The forward's persistent grid: two programs per SM (the kept forward configurations
# fit two CTAs per SM: registers and shared memory); on CPU a few, so that merging
# across programs is always exercised.
FORWARD_PROGRAMS_PER_SM = 2
FORWARD_CPU_PROGRAMS = 3
# The forward visits row blocks in groups whose row tiles take about this much memory,
# so that they stay in L2 while the column tiles stream past.
L2_GROUP_BYTES = 16 * 2**20


@dataclass
class TestingSwitches:
    """Test-only switches; both change kernel specializations, neither is for production.

    ``reverse_block_order``: every kernel visits its program ids in reverse order.
    ``tile_counter``: a (1,) int32 device tensor the backward kernels increment once per
    recomputed S tile.
    ``panel_size``: the backward's P, gated anchors per panel (a positive multiple of
    PANEL_UNIT), so that small batches span several panels (None: ``panel_size()``).
    """

    reverse_block_order: bool = False
    tile_counter: Tensor | None = None
    panel_size: int | None = None


testing = TestingSwitches()


def precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """tl.dot input precision: IEEE fp32 unless TF32 is allowed (16-bit inputs ignore it)."""
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def upcast(dtype: torch.dtype) -> bool:
    """Under the interpreter, bfloat16 products go through an exact fp32 upcast."""
    return TRITON_INTERPRET and dtype == torch.bfloat16


def block_config(dtype: torch.dtype) -> BlockConfig:
    if dtype not in CONFIGS:
        raise TypeError(f"the Triton kernels take float16, bfloat16 or float32, got {dtype}")
    return CONFIGS[dtype]


def sm_count(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def column_splits(outer_blocks: int, inner_blocks: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, inner blocks per split) with no empty split."""
    sms = sm_count(device)
    if sms is None:
        wanted = CPU_SPLITS
    else:
        wanted = triton.cdiv(PROGRAMS_PER_SM * sms, max(outer_blocks, 1))
    wanted = max(1, min(wanted, inner_blocks))
    per_split = triton.cdiv(inner_blocks, wanted)
    return triton.cdiv(inner_blocks, per_split), per_split


def tma_allowed(x: Tensor, allow_tf32: bool) -> bool:
    """Whether the forward reads ``x`` through a tensor descriptor (TMA on sm_90): for
    tensor-core products (16-bit, or fp32 with TF32; the fp32 FMA product keeps pointer
    loads, spill-free), with unit stride along D and 16-byte aligned rows, on sm_90+ or
    in the interpreter (which runs descriptors too). Other cases take the pointer loads
    of the same kernel."""
    if precision(x.dtype, allow_tf32) == "ieee" and x.dtype == torch.float32:
        return False
    aligned = x.stride(1) == 1 and (x.stride(0) * x.element_size()) % 16 == 0
    aligned = aligned and x.data_ptr() % 16 == 0
    if x.device.type == "cuda":
        return aligned and torch.cuda.get_device_capability(x.device)[0] >= 9
    return aligned and TRITON_INTERPRET


def ids_or_placeholder(ids: Tensor | None, device: torch.device) -> tuple[Tensor, bool]:
    """ids as contiguous int64 (one kernel specialization), or an empty int64 placeholder."""
    if ids is None:
        return torch.empty(0, dtype=torch.int64, device=device), False
    return ids.to(torch.int64).contiguous(), True


def check_block(block: Block) -> None:
    """The kernels' own limit (dispatch.py knows it too, and reports it before a call)."""
    if block.n > TRITON_MAX_COLUMNS:
        raise ValueError(f"the Triton kernels index columns with int32, got N = {block.n}")
