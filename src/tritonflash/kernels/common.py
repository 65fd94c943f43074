"""Shared ``@triton.jit`` helpers: the score modification (scale, bias, ALiBi, masks) and
the tensor-core product, used by the forward and both backward kernels.

Scores are kept in log2 units (the natural-log score times log2(e)) so that the softmax
uses ``exp2``; the launchers fold log2(e) into ``qk_scale`` and into the ALiBi slope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .configs import INTERPRET

# Globals read inside @triton.jit must be tl.constexpr instances (an annotation is not enough).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot(a, b, acc, INTERP_BF16: tl.constexpr):
    # Triton 3.6's interpreter multiplies the raw uint16 bits of bf16 operands, so under
    # the interpreter bf16 operands are upcast (exact: a bf16 product fits in fp32).
    if INTERP_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    # Triton 3.6's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even;
    # round by hand there so both give the same bits (finite values).
    if INTERP_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _ptr_offset(rows, cols, strides, WIDE: tl.constexpr):
    """Offsets of a 2-D tile inside one (batch, head) slice from row/column indices and a
    (row, col) stride pair; the slice base is int64. ``WIDE`` (chosen by the launcher, see
    ``needs_wide``) widens rows to int64 when row * row_stride can pass 2**31 inside a slice
    (batch-1 packed qkv, a 46k x 46k bias). Otherwise int32: per-element 64-bit products in the
    inner loops cost 2-9%, and loop-invariant 2-D pointer tensors moved by a scalar made ptxas
    serialise wgmma (docs/perf-notes.md, changes 3 and 4)."""
    if WIDE:
        off = rows.to(tl.int64) * strides[0] + cols * strides[1]
    else:
        off = rows * strides[0] + cols * strides[1]
    return off


@triton.jit
def _shift(start, stride):
    """Scalar offset of the tile that starts ``start`` rows further on (int64: no overflow)."""
    return tl.cast(start, tl.int64) * stride


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a tile, masking rows >= n_rows and/or cols >= n_cols (read as 0) only when asked."""
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=(rows < n_rows) & (cols < n_cols), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows < n_rows, other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=cols < n_cols, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _seq_span(CuSeqlens, off_b, seqlen, IS_VARLEN: tl.constexpr):
    """(first row, length) of batch entry ``off_b``: from ``cu_seqlens`` for packed
    variable-length batches (rows of all sequences stacked, batch stride 0), else (0, seqlen)."""
    if IS_VARLEN:
        start = tl.load(CuSeqlens + off_b)
        seqlen = tl.load(CuSeqlens + off_b + 1) - start
        start = start.to(tl.int64)
    else:
        start = 0
    return start, seqlen


@triton.jit
def _batch_head(pid, batch, nheads, BATCH_INNER: tl.constexpr):
    """(batch, head) of a program from its index along the batch*heads grid axis (int64).
    ``BATCH_INNER`` (used with a bias that has a row dimension) runs the batches of one head
    next to each other: a bias shared by the batch is then read from HBM once and from L2 by
    the other batches. Otherwise the heads of one batch are adjacent (GQA groups share K/V)."""
    pid = pid.to(tl.int64)
    if BATCH_INNER:
        off_b = pid % batch
        off_h = pid // batch
    else:
        off_b = pid // nheads
        off_h = pid % nheads
    return off_b, off_h


@triton.jit
def _alibi_slope(Slopes, off_b, off_h, stride_slopes, HAS_ALIBI: tl.constexpr):
    """ALiBi slope of one (batch, head), times -log2(e) so that it adds in log2 units."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + off_b * stride_slopes[0] + off_h * stride_slopes[1]).to(tl.float32) * -LOG2E
    return slope


@triton.jit
def _bias_ptrs(bias_ptr, offs_m, offs_n, stride_bias, HAS_BIAS: tl.constexpr, BIAS_ROW: tl.constexpr, TRANS: tl.constexpr):
    """Pointers of the bias tile at query rows ``offs_m`` and keys ``offs_n`` (1-D): a
    [M, N] tile ([N, M] when ``TRANS``, the dK/dV pass), or one [N] vector when the bias has
    no row dimension."""
    ptrs = bias_ptr
    if HAS_BIAS:
        if BIAS_ROW:
            if TRANS:
                ptrs = bias_ptr + _ptr_offset(offs_n[:, None], offs_m[None, :], (stride_bias[1], stride_bias[0]), True)
            else:
                ptrs = bias_ptr + _ptr_offset(offs_m[:, None], offs_n[None, :], stride_bias, True)
        else:
            ptrs = bias_ptr + offs_n * stride_bias[1]
    return ptrs


@triton.jit
def _load_bias(ptrs, shift, offs_m, offs_n, seqlen_q, seqlen_k, HAS_BIAS: tl.constexpr, BIAS_ROW: tl.constexpr,
               TRANS: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """The bias at ``ptrs + shift`` (from ``_bias_ptrs``), for query rows ``offs_m`` and keys
    ``offs_n`` (1-D, already shifted), as a [M, N] tile, or [N, M] when ``TRANS`` (the dK/dV
    pass). A bias without a row dimension is one vector per key block. A [N, M] tile is read
    through transposed pointers: Triton coalesces it along its contiguous first dim, with no
    tl.trans in registers (docs/perf-notes.md, change 7). Triton 3.6 streams the forward's and
    dQ's [M, N] tile through shared memory (cp.async) but loads this one synchronously.
    Rows / columns are bounds-checked only when asked: the callers clamp the indices that do
    not move (a clamped row or key is never used)."""
    if HAS_BIAS:
        if BIAS_ROW:
            if TRANS:
                bias = _load_tile(ptrs + shift, offs_n[:, None], seqlen_k, offs_m[None, :], seqlen_q, MASK_COLS, MASK_ROWS)
            else:
                bias = _load_tile(ptrs + shift, offs_m[:, None], seqlen_q, offs_n[None, :], seqlen_k, MASK_ROWS, MASK_COLS)
        else:
            if MASK_COLS:
                vec = tl.load(ptrs + shift, mask=offs_n < seqlen_k, other=0.0)
            else:
                vec = tl.load(ptrs + shift)
            if TRANS:
                bias = vec[:, None]
            else:
                bias = vec[None, :]
    else:
        bias = 0.0
    return bias


@triton.jit
def _score(
    qk,
    bias,
    offs_m,
    offs_n,
    seqlen_q,
    seqlen_k,
    qk_scale,
    slope,
    kpm_ptr,
    HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_KPM: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    MASK_N: tl.constexpr,
):
    """Scores in log2 units, -inf where a key is not visible.

    ``offs_m`` and ``offs_n`` broadcast against ``qk``: ([M, 1], [1, N]) for a [M, N] tile
    or ([1, M], [N, 1]) for the transposed tile of the dK/dV pass; ``bias`` comes from
    ``_load_bias`` in the same orientation. ``slope`` is the ALiBi slope times -log2(e).
    """
    s = qk * qk_scale
    if HAS_BIAS:
        # Entries <= bias.MASKED_BIAS (finfo.min-style masks) overflow to -inf here, as the
        # reference masks them; no per-element test needed.
        s += bias.to(tl.float32) * LOG2E
    if HAS_ALIBI:
        dist = tl.abs(offs_m + (seqlen_k - seqlen_q) - offs_n).to(tl.float32)
        s += slope * dist
    if HAS_KPM:
        keep = tl.load(kpm_ptr + offs_n, mask=offs_n < seqlen_k, other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    if MASK_CAUSAL:
        s = tl.where(offs_n <= offs_m + (seqlen_k - seqlen_q), s, float("-inf"))
    if MASK_N:
        s = tl.where(offs_n < seqlen_k, s, float("-inf"))
    return s


@triton.jit
def _causal_split(start_m, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key range of a query block: ``[0, split)`` needs no mask, ``[split, hi)`` does.

    Causal is aligned bottom-right: query i sees key j iff j <= i + seqlen_k - seqlen_q.
    ``split`` is a multiple of BLOCK_N; the partial last key block is always in the
    masked range.
    """
    full_n = (seqlen_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        diag = start_m * BLOCK_M + seqlen_k - seqlen_q
        hi = tl.minimum(tl.maximum(diag + BLOCK_M, 0), seqlen_k)
        split = tl.minimum((tl.maximum(diag + 1, 0) // BLOCK_N) * BLOCK_N, full_n)
        split = tl.minimum(split, hi)
    else:
        hi = seqlen_k
        split = full_n
    return split, hi


@dataclass
class LaunchMeta:
    """Optional inputs turned into kernel arguments: tensors (or None), stride tuples and the
    boolean constexprs that select the kernel variant."""

    bias: torch.Tensor | None
    stride_bias: tuple
    slopes: torch.Tensor | None
    stride_slopes: tuple
    kpm: torch.Tensor | None
    stride_kpm: tuple
    constexprs: dict


def needs_wide(pb, tensors, bias) -> bool:
    """Whether an offset inside one (batch, head) slice can pass 2**31 - 1 (``_ptr_offset``):
    rows of q/k/v-like tensors (with a margin for padded tiles and the bias prefetch one block
    past the end) times their row stride, or the bias's (seqlen_q, seqlen_k) extent."""
    limit, pad = 2**31 - 1, 256
    rows = max(pb.seqlen_q, pb.seqlen_k) + pad
    for x in tensors:
        st = pb.strides(x)
        if rows * abs(st[1]) + pb.head_dim * abs(st[3]) > limit:
            return True
    if bias is not None:
        # The bias tile itself is always addressed in int64 (_bias_ptrs); its gradient is a
        # contiguous (.., seqlen_q, seqlen_k) tensor indexed with _ptr_offset.
        if (pb.seqlen_q + pad) * (pb.seqlen_k + pad) > limit:
            return True
    return False


def launch_meta(pb, q, causal, bias, alibi_slopes, key_padding_mask, tensors) -> LaunchMeta:
    """``bias`` is a rank-4 view with stride 0 on broadcast dims; ``alibi_slopes`` is
    (1 or batch, nheads) fp32; ``key_padding_mask`` is (batch, seqlen_k) uint8; ``tensors``
    every q/k/v-like tensor the kernels index (for ``needs_wide``)."""
    if pb.varlen is not None and bias is not None:
        # The public API refuses this too; the kernels have no per-sequence bias offsets.
        raise ValueError("an additive bias is not supported with variable-length (packed) batches")
    head_dim = pb.head_dim
    block_d = max(16, triton.next_power_of_2(head_dim))
    stride_bias = (0, 0, 0, 0)
    bias_row = False
    if bias is not None:
        stride_bias = tuple(st if sz > 1 else 0 for st, sz in zip(bias.stride(), bias.shape))
        bias_row = stride_bias[2] != 0
    stride_slopes = (0, 0)
    if alibi_slopes is not None:
        stride_slopes = (alibi_slopes.stride(0) if alibi_slopes.shape[0] > 1 else 0, alibi_slopes.stride(1))
    stride_kpm = (key_padding_mask.stride(0),) if key_padding_mask is not None else (0,)
    return LaunchMeta(
        bias=bias,
        stride_bias=stride_bias,
        slopes=alibi_slopes,
        stride_slopes=stride_slopes,
        kpm=key_padding_mask,
        stride_kpm=stride_kpm,
        constexprs=dict(
            BLOCK_D=block_d,
            EVEN_D=head_dim == block_d,
            CAUSAL=bool(causal),
            HAS_BIAS=bias is not None,
            BIAS_ROW=bias_row,
            HAS_ALIBI=alibi_slopes is not None,
            HAS_KPM=key_padding_mask is not None,
            INTERP_BF16=INTERPRET and q.dtype == torch.bfloat16,
            WIDE=needs_wide(pb, tensors, bias),
        ),
    )


class Varlen(NamedTuple):
    """Packed variable-length batch: rows of all sequences stacked, int32 cumulative lengths."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


@dataclass
class Problem:
    """Sizes of one launch and the 4-D (batch, row, head, dim) strides the kernels index with."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    head_dim: int
    varlen: Varlen | None = None
    total_q: int = 0  # rows of a packed varlen q

    def strides(self, x):
        # A packed varlen tensor (total, heads, dim) is a batch of one with batch stride 0;
        # each program adds its sequence's first row.
        return x.stride() if self.varlen is None else (0,) + tuple(x.stride())

    def lse_empty(self, device):
        if self.varlen is None:
            lse = torch.empty((self.batch, self.nheads, self.seqlen_q), device=device, dtype=torch.float32)
            return lse, lse.stride()
        # Varlen lse is (nheads, total_q), as flash-attn returns it.
        lse = torch.empty((self.nheads, self.total_q), device=device, dtype=torch.float32)
        return lse, (0,) + lse.stride()

    def varlen_args(self):
        if self.varlen is None:
            return dict(CuSeqQ=None, CuSeqK=None, IS_VARLEN=False)
        return dict(CuSeqQ=self.varlen.cu_seqlens_q, CuSeqK=self.varlen.cu_seqlens_k, IS_VARLEN=True)


def problem(q, k, varlen: Varlen | None = None) -> Problem:
    if varlen is None:
        batch, seqlen_q, nheads, head_dim = q.shape
        return Problem(batch, seqlen_q, k.shape[1], nheads, k.shape[2], head_dim)
    return Problem(varlen.cu_seqlens_q.numel() - 1, varlen.max_seqlen_q, varlen.max_seqlen_k,
                   q.shape[1], k.shape[1], q.shape[2], varlen, total_q=q.shape[0])
