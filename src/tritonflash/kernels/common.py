"""What every kernel shares: the variant description, the score and its mask, the block
ranges, pointer arithmetic and the program prologue.

A score/mask feature lives in these places here (docs/architecture.md lists them):
``Variant`` (its compile-time switch, set in ``launch_meta``), ``ScoreArgs`` (its runtime
scalars), ``_visible``/``_score`` (what it does to one tile) and ``_key_range``/``_query_range``
(which blocks it lets a program skip or must mask). The kernels never name a feature.

Scores are kept in log2 units (the natural-log score times log2(e)) so that the softmax
uses ``exp2``; ``launch_meta`` folds log2(e) into ``qk_scale`` and ``_score_ctx`` into the
ALiBi slope.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .configs import INTERPRET

# Globals read inside @triton.jit must be tl.constexpr instances (an annotation is not enough).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


class Variant(NamedTuple):
    """The kernel variant: every compile-time choice that follows from the inputs, passed to
    every kernel and helper as one ``tl.constexpr`` (``VAR``). Tile sizes and EVEN_M (the dK/dV
    and dbias passes) follow from the chosen config instead and stay separate constexprs. The
    defaults (plain attention, head dim 64) are for tests and tools; ``launch_meta`` sets every
    field."""

    CAUSAL: bool = False  # right edge: key j <= i + seqlen_k - seqlen_q + window_right (causal: window_right = 0)
    LOCAL: bool = False  # left edge of a sliding window: key j >= i + seqlen_k - seqlen_q - window_left
    HAS_BIAS: bool = False  # additive bias tensor
    BIAS_ROW: bool = False  # the bias has a query-row dimension ([M, N] tiles, not one [N] vector)
    HAS_ALIBI: bool = False  # in-kernel ALiBi from per-(batch, head) slopes
    HAS_KPM: bool = False  # key padding mask
    MASK_BOTH_EDGES: bool = False  # block ranges have a masked edge on both sides (a sliding window); else only the causal/tail one
    IS_VARLEN: bool = False  # packed variable-length batch (cu_seqlens)
    SOFTCAP: bool = False  # scores capped: softcap * tanh(scale * q.k / softcap), before bias and ALiBi
    HAS_SINKS: bool = False  # one extra per-head logit in every row's softmax, without a value
    DROPOUT: bool = False  # dropout on the normalised probabilities (Philox keep-mask per (b, h, i, j))
    HAS_AMASK: bool = False  # boolean attention mask tensor (True = attend), read through its strides
    BLOCK_D: int = 64  # head dim rounded up to a power of two (>= 16)
    EVEN_D: bool = True  # head dim == BLOCK_D: no column masks on q/k/v tiles
    WIDE: bool = False  # int64 in-slice offsets (see needs_wide)
    INTERP_BF16: bool = False  # bf16 under the interpreter (its bf16 dot and cast need help)


class ScoreArgs(NamedTuple):
    """Runtime inputs of the score, one kernel argument. Absent tensors are replaced by a
    placeholder that is never read (Triton cannot build a tuple holding None). Flat: Triton
    3.6 loses a specialised stride (1) of a tuple nested in a namedtuple argument when a loop
    copies its scope ("cannot convert None to tensor")."""

    qk_scale: float  # softmax scale * log2(e)
    bias: torch.Tensor  # rank-4 bias, broadcast dims with stride 0 (VAR.HAS_BIAS)
    stride_bias_b: int
    stride_bias_h: int
    stride_bias_m: int
    stride_bias_n: int
    slopes: torch.Tensor  # (1 | batch, nheads) fp32 ALiBi slopes (VAR.HAS_ALIBI)
    stride_slopes_b: int
    stride_slopes_h: int
    kpm: torch.Tensor  # (batch, seqlen_k) uint8 key padding mask, nonzero = keep (VAR.HAS_KPM)
    stride_kpm_b: int
    window_left: int  # VAR.LOCAL: keys up to this many before the diagonal
    window_right: int  # VAR.CAUSAL: keys up to this many after the diagonal (causal: 0)
    softcap: float  # VAR.SOFTCAP: softcap * log2(e) (qk_scale is then softmax scale / softcap)
    sinks: torch.Tensor  # (nheads,) fp32 sink logits (VAR.HAS_SINKS)
    stride_sinks: int
    seed: torch.Tensor  # (1,) int64 dropout seed drawn from the device's generator (VAR.DROPOUT)
    dropout_threshold: int  # a 16-bit draw u is kept iff u >= this (= ceil(dropout_p * 65536))
    dropout_scale: float  # 1 / (1 - dropout_p)
    amask: torch.Tensor  # rank-4 uint8 mask, nonzero = attend, broadcast dims with stride 0 (VAR.HAS_AMASK)
    stride_amask_b: int
    stride_amask_h: int
    stride_amask_m: int
    stride_amask_n: int


class ScoreCtx(NamedTuple):
    """``ScoreArgs`` resolved for one (batch, head): what ``_score`` and ``_visible`` read."""

    qk_scale: float
    slope: float  # ALiBi slope times -log2(e)
    bias_ptr: tl.tensor  # the bias of this (batch, head), or the placeholder
    stride_bias_m: int
    stride_bias_n: int
    kpm_ptr: tl.tensor  # this batch's key padding row, or the placeholder
    window_left: int
    window_right: int
    softcap: float
    sink: float  # this head's sink logit in log2 units (-inf without sinks)
    off_b: tl.tensor  # int32 (batch, head): the dropout draw's counters
    off_h: tl.tensor
    seed: tl.tensor  # int64 dropout seed, or 0
    dropout_threshold: int
    dropout_scale: float
    amask_ptr: tl.tensor  # the mask of this (batch, head), or the placeholder
    stride_amask_m: int
    stride_amask_n: int


class Span(NamedTuple):
    """One program's place: its block along the axis it owns, its batch entry and heads, and
    the rows of its sequences (``start_*`` the first packed row, ``seqlen_*`` the length)."""

    block: tl.tensor
    off_b: tl.tensor
    off_h: tl.tensor  # query head (q-owning kernels) or kv head (the dK/dV pass)
    start_q: tl.tensor
    seqlen_q: tl.tensor
    start_k: tl.tensor
    seqlen_k: tl.tensor


# ---------------------------------------------------------------------------------------------
# Arithmetic and memory


@triton.jit
def _dot(a, b, acc, VAR: tl.constexpr):
    # Triton 3.6's interpreter multiplies the raw uint16 bits of bf16 operands, so under
    # the interpreter bf16 operands are upcast (exact: a bf16 product fits in fp32).
    if VAR.INTERP_BF16:
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
def _slice(Base, strides, off_b, row0, off_h):
    """One (batch, head) slice of a (batch, row, head, dim) tensor from row ``row0`` on: its
    base pointer (int64 arithmetic) and its (row, dim) strides."""
    return Base + off_b * strides[0] + row0 * strides[1] + off_h * strides[2], (strides[1], strides[3])


@triton.jit
def _stat_ptr(Base, strides, off_b, off_h, row0):
    """Row statistics (lse, delta) of one (batch, head), laid out (batch, head, row)."""
    return Base + off_b * strides[0] + off_h * strides[1] + row0 * strides[2]


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
def _load_rows(slc, offs_r, n_rows, offs_d, head_dim, MASK_ROWS: tl.constexpr, VAR: tl.constexpr):
    """[len(offs_r), BLOCK_D] tile of a ``_slice``: rows ``offs_r``, the head dim."""
    ptr, rc = slc
    return _load_tile(ptr + _ptr_offset(offs_r[:, None], offs_d[None, :], rc, VAR.WIDE),
                      offs_r[:, None], n_rows, offs_d[None, :], head_dim, MASK_ROWS=MASK_ROWS, MASK_COLS=not VAR.EVEN_D)


@triton.jit
def _store_rows(slc, x, offs_r, n_rows, offs_d, head_dim, VAR: tl.constexpr):
    """Store a [len(offs_r), BLOCK_D] fp32 tile into a ``_slice`` in its element type."""
    ptr, rc = slc
    rows, cols = offs_r[:, None], offs_d[None, :]
    tl.store(ptr + _ptr_offset(rows, cols, rc, VAR.WIDE), _cast(x, ptr.dtype.element_ty, VAR.INTERP_BF16),
             mask=(rows < n_rows) & (cols < head_dim))


# ---------------------------------------------------------------------------------------------
# Program prologue


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
    """(batch, head) of a program from its (batch, head) index (int64). ``BATCH_INNER`` (used
    with a bias that has a row dimension) runs the batches of one head next to each other: a
    bias shared by the batch is then read from HBM once and from L2 by the other batches.
    Otherwise the heads of one batch are adjacent (GQA groups share K/V)."""
    pid = pid.to(tl.int64)
    if BATCH_INNER:
        off_b = pid % batch
        off_h = pid // batch
    else:
        off_b = pid // nheads
        off_h = pid % nheads
    return off_b, off_h


@triton.jit
def _span(n_blocks, batch, nheads, seqlen_q, seqlen_k, CuSeqQ, CuSeqK, REVERSE: tl.constexpr, VAR: tl.constexpr):
    """Decode the program id of a 1-D grid of ``n_blocks * batch * nheads`` programs, blocks
    fastest (the programs of one (batch, head) run together and share its K/V in L2). One
    grid axis: axes 1 and 2 hold at most 65535 programs, fewer than batch * nheads can be.
    ``REVERSE`` starts the last block first (causal: later query blocks see more keys, so
    the tail of the grid is short)."""
    pid = tl.program_id(0)
    block = pid % n_blocks
    if REVERSE:
        block = n_blocks - 1 - block
    off_b, off_h = _batch_head(pid // n_blocks, batch, nheads, VAR.BIAS_ROW)
    start_q, len_q = _seq_span(CuSeqQ, off_b, seqlen_q, VAR.IS_VARLEN)
    start_k, len_k = _seq_span(CuSeqK, off_b, seqlen_k, VAR.IS_VARLEN)
    return Span(block, off_b, off_h, start_q, len_q, start_k, len_k)


@triton.jit
def _score_ctx(args, off_b, off_h, VAR: tl.constexpr):
    """``ScoreArgs`` of one (batch, query head)."""
    slope = 0.0
    if VAR.HAS_ALIBI:
        slope = tl.load(args.slopes + off_b * args.stride_slopes_b + off_h * args.stride_slopes_h).to(tl.float32) * -LOG2E
    bias_ptr = args.bias
    if VAR.HAS_BIAS:
        bias_ptr = args.bias + off_b * args.stride_bias_b + off_h * args.stride_bias_h
    kpm_ptr = args.kpm
    if VAR.HAS_KPM:
        kpm_ptr = args.kpm + off_b * args.stride_kpm_b
    sink = float("-inf")
    if VAR.HAS_SINKS:
        sink = tl.load(args.sinks + off_h * args.stride_sinks).to(tl.float32) * LOG2E
    seed = 0
    if VAR.DROPOUT:
        seed = tl.load(args.seed)
    amask_ptr = args.amask
    if VAR.HAS_AMASK:
        amask_ptr = args.amask + off_b * args.stride_amask_b + off_h * args.stride_amask_h
    return ScoreCtx(args.qk_scale, slope, bias_ptr, args.stride_bias_m, args.stride_bias_n, kpm_ptr, args.window_left,
                    args.window_right, args.softcap, sink, off_b.to(tl.int32), off_h.to(tl.int32), seed, args.dropout_threshold,
                    args.dropout_scale, amask_ptr, args.stride_amask_m, args.stride_amask_n)


# ---------------------------------------------------------------------------------------------
# Block ranges


@triton.jit
def _key_range(start_m, seqlen_q, seqlen_k, ctx, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VAR: tl.constexpr):
    """Key range of the query block starting at row ``start_m``: (lo, full_lo, full_hi, hi).
    Key blocks in [full_lo, full_hi) need no per-element mask, those in [full_hi, hi) do, and
    so do those in [lo, full_lo) when ``VAR.MASK_BOTH_EDGES`` (the kernels skip that range
    otherwise: lo == full_lo). Keys outside [lo, hi) are invisible to every row of the block,
    so their blocks are never visited (a sliding window costs work in proportion to its
    width). Bounds are multiples of BLOCK_N except ``hi``; the partial last key block is
    always in a masked range.

    Edges are aligned bottom-right: query i sees key j iff
    i + seqlen_k - seqlen_q - window_left <= j <= i + seqlen_k - seqlen_q + window_right
    (the left edge with ``VAR.LOCAL``, the right one with ``VAR.CAUSAL``, causal: right 0)."""
    full_n = (seqlen_k // BLOCK_N) * BLOCK_N
    lo = 0
    full_lo = 0
    if VAR.CAUSAL:
        diag = start_m + seqlen_k - seqlen_q + ctx.window_right
        hi = tl.minimum(tl.maximum(diag + BLOCK_M, 0), seqlen_k)
        full_hi = tl.minimum((tl.maximum(diag + 1, 0) // BLOCK_N) * BLOCK_N, full_n)
        full_hi = tl.minimum(full_hi, hi)
    else:
        hi = seqlen_k
        full_hi = full_n
    if VAR.LOCAL:
        first = start_m + seqlen_k - seqlen_q - ctx.window_left  # first key of the block's first row
        lo = tl.minimum((tl.maximum(first, 0) // BLOCK_N) * BLOCK_N, hi)
        # Keys every row of the block sees on the left: from the last row's first key on.
        full_lo = tl.cdiv(tl.maximum(first + BLOCK_M - 1, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
        # A window narrower than a block: no unmasked middle, the two masked ranges meet.
        full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_range(start_n, seqlen_q, seqlen_k, ctx, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VAR: tl.constexpr):
    """Query range of the key block starting at ``start_n``, the mirror of ``_key_range``:
    (lo, full_lo, full_hi, hi). Query blocks in [lo, full_lo) need the per-element mask, those
    in [full_lo, full_hi) do not, and those in [full_hi, hi) do when ``VAR.MASK_BOTH_EDGES``
    (skipped otherwise: full_hi == hi). Rows past seqlen_q are neutralised by their LSE (+inf),
    so ``hi`` is a multiple of BLOCK_M."""
    end_m = tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M
    lo = 0
    full_lo = 0
    hi = end_m
    full_hi = end_m
    if VAR.CAUSAL:
        # Row i sees key j on the right edge iff i >= j - (seqlen_k - seqlen_q) - window_right.
        shift = seqlen_k - seqlen_q + ctx.window_right
        first_row = tl.maximum(start_n - shift, 0)
        lo = tl.minimum((first_row // BLOCK_M) * BLOCK_M, end_m)
        full_row = tl.maximum(start_n + BLOCK_N - 1 - shift, 0)
        full_lo = tl.minimum(tl.cdiv(full_row, BLOCK_M) * BLOCK_M, end_m)
    if VAR.LOCAL:
        # Row i sees key j on the left edge iff i <= j - (seqlen_k - seqlen_q) + window_left.
        shift = seqlen_k - seqlen_q - ctx.window_left
        last_row = start_n + BLOCK_N - 1 - shift  # the last row that sees the block's last key
        hi = tl.minimum(tl.cdiv(tl.maximum(last_row + 1, 0), BLOCK_M) * BLOCK_M, end_m)
        full_row = start_n - shift  # the last row that sees the block's first key
        full_hi = tl.minimum((tl.maximum(full_row + 1, 0) // BLOCK_M) * BLOCK_M, hi)
        lo = tl.minimum(lo, hi)
        full_lo = tl.minimum(full_lo, hi)
        full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


# ---------------------------------------------------------------------------------------------
# The score and its mask


@triton.jit
def _bias_ptrs(ctx, offs_m, offs_n, TRANS: tl.constexpr, VAR: tl.constexpr):
    """Pointers of the bias tile at query rows ``offs_m`` and keys ``offs_n`` (1-D): a
    [M, N] tile ([N, M] when ``TRANS``, the dK/dV pass), or one [N] vector when the bias has
    no row dimension. Always int64 (a bias can pass 2**31 elements on its own)."""
    ptrs = ctx.bias_ptr
    if VAR.HAS_BIAS:
        if VAR.BIAS_ROW:
            if TRANS:
                ptrs = ctx.bias_ptr + _ptr_offset(offs_n[:, None], offs_m[None, :], (ctx.stride_bias_n, ctx.stride_bias_m), True)
            else:
                ptrs = ctx.bias_ptr + _ptr_offset(offs_m[:, None], offs_n[None, :], (ctx.stride_bias_m, ctx.stride_bias_n), True)
        else:
            ptrs = ctx.bias_ptr + offs_n * ctx.stride_bias_n
    return ptrs


@triton.jit
def _load_bias(ptrs, shift, offs_m, offs_n, seqlen_q, seqlen_k, TRANS: tl.constexpr, MASK_ROWS: tl.constexpr,
               MASK_COLS: tl.constexpr, VAR: tl.constexpr):
    """The bias at ``ptrs + shift`` (from ``_bias_ptrs``), for query rows ``offs_m`` and keys
    ``offs_n`` (1-D, already shifted), as a [M, N] tile, or [N, M] when ``TRANS`` (the dK/dV
    pass). A bias without a row dimension is one vector per key block. A [N, M] tile is read
    through transposed pointers: Triton coalesces it along its contiguous first dim, with no
    tl.trans in registers (docs/perf-notes.md, change 7). Triton 3.6 streams the forward's and
    dQ's [M, N] tile through shared memory (cp.async) but loads this one synchronously.
    Rows / columns are bounds-checked only when asked: the callers clamp the indices that do
    not move (a clamped row or key is never used)."""
    if VAR.HAS_BIAS:
        if VAR.BIAS_ROW:
            if TRANS:
                bias = _load_tile(ptrs + shift, offs_n[:, None], seqlen_k, offs_m[None, :], seqlen_q, MASK_ROWS=MASK_COLS, MASK_COLS=MASK_ROWS)
            else:
                bias = _load_tile(ptrs + shift, offs_m[:, None], seqlen_q, offs_n[None, :], seqlen_k, MASK_ROWS=MASK_ROWS, MASK_COLS=MASK_COLS)
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
def _key_keep(ctx, cols, seqlen_k, VAR: tl.constexpr):
    """Keys that the key padding mask keeps, in the orientation of ``cols`` (key indices as
    [1, N] or [N, 1]); True without a mask."""
    if VAR.HAS_KPM:
        keep = tl.load(ctx.kpm_ptr + cols, mask=cols < seqlen_k, other=0) != 0
    else:
        keep = True
    return keep


@triton.jit
def _amask_ptrs(ctx, rows, cols):
    """Pointers of the boolean mask at (``rows``, ``cols``), broadcast like ``_visible``'s
    (int64: the mask can pass 2**31 elements on its own)."""
    return ctx.amask_ptr + rows.to(tl.int64) * ctx.stride_amask_m + cols.to(tl.int64) * ctx.stride_amask_n


@triton.jit
def _visible(rows, cols, seqlen_q, seqlen_k, keep, ctx, MASK: tl.constexpr, VAR: tl.constexpr):
    """Which (query, key) pairs of a tile a query may see, besides the bias: ``rows`` and
    ``cols`` broadcast against the tile ([M, 1] and [1, N], or [1, M] and [N, 1] for the
    transposed tiles of the dK/dV pass); ``keep`` from ``_key_keep`` in the same orientation.
    ``MASK``: the tile is in a masked range of ``_key_range``/``_query_range`` (causal or
    window edge, past seqlen_k); elsewhere only the key padding mask and the boolean mask
    apply. True when nothing is masked (then ``_score`` and ``_probs_ds`` apply no mask)."""
    if MASK:
        vis = cols < seqlen_k
        if VAR.CAUSAL:
            vis = vis & (cols <= rows + (seqlen_k - seqlen_q + ctx.window_right))
        if VAR.LOCAL:
            vis = vis & (cols >= rows + (seqlen_k - seqlen_q - ctx.window_left))
        if VAR.HAS_KPM:
            vis = vis & keep
    else:
        vis = keep
    if VAR.HAS_AMASK:
        inside = (rows < seqlen_q) & (cols < seqlen_k)
        vis = vis & (tl.load(_amask_ptrs(ctx, rows, cols), mask=inside, other=0) != 0)
    return vis


@triton.jit
def _tanh(x):
    # exp2-based (the interpreter and the GPU agree): +-1 for large |x|, never NaN.
    return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def _score(qk, bias, rows, cols, seqlen_q, seqlen_k, vis, ctx, MASK: tl.constexpr, VAR: tl.constexpr):
    """Scores in log2 units from ``qk`` (q . k), capped (``VAR.SOFTCAP``), then the bias tile
    (``_load_bias``, same orientation) and ALiBi added; -inf where ``vis`` (``_visible``) is
    False. A non-finite ``qk`` at an invisible pair is -inf too (tl.where selects, NaN never
    leaks)."""
    if VAR.SOFTCAP:
        s = _tanh(qk * ctx.qk_scale) * ctx.softcap
    else:
        s = qk * ctx.qk_scale
    if VAR.HAS_BIAS:
        # Entries <= bias.MASKED_BIAS (finfo.min-style masks) overflow to -inf here, as the
        # reference masks them; no per-element test needed.
        s += bias.to(tl.float32) * LOG2E
    if VAR.HAS_ALIBI:
        dist = tl.abs(rows + (seqlen_k - seqlen_q) - cols).to(tl.float32)
        s += ctx.slope * dist
    if MASK or VAR.HAS_KPM or VAR.HAS_AMASK:
        s = tl.where(vis, s, float("-inf"))
    return s


@triton.jit
def _dropout_keep(ctx, offs_m, start_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TRANS: tl.constexpr,
                  VAR: tl.constexpr):
    """The dropout keep-mask of query rows ``offs_m`` and keys [start_n, start_n + BLOCK_N), as
    [M, N] ([N, M] when ``TRANS``); True without dropout. A function of the seed and of
    (batch, head, i, j) only, so every pass and tile size regenerates the same mask:
    Philox-4x32 (7 rounds) with counters (j // 8, i, batch, head) and key ``seed`` gives 128
    bits, whose 16-bit halves in order are the draws u of keys 8 * (j // 8) .. + 7; a key is
    kept iff u >= dropout_threshold. ``reference.dropout_keep_mask`` computes the same bits."""
    if VAR.DROPOUT:
        GROUPS: tl.constexpr = BLOCK_N // 8
        groups = (start_n // 8 + tl.arange(0, GROUPS)).to(tl.int32)
        c0 = tl.broadcast_to(groups[None, :], [BLOCK_M, GROUPS])
        c1 = tl.broadcast_to(offs_m[:, None].to(tl.int32), [BLOCK_M, GROUPS])
        zero = c0 * 0
        r0, r1, r2, r3 = tl.philox(ctx.seed, c0, c1, zero + ctx.off_b, zero + ctx.off_h, n_rounds=7)
        # join appends a minor dim: join(join(r0, r2), join(r1, r3))[..., i, j] is word 2 * i + j.
        words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK_M, GROUPS, 4])
        draws = tl.reshape(tl.join(words & 0xFFFF, words >> 16), [BLOCK_M, BLOCK_N])
        keep = draws.to(tl.int32) >= ctx.dropout_threshold
        if TRANS:
            keep = tl.trans(keep)
    else:
        keep = True
    return keep


@triton.jit
def _load_keys(slc, offs_n, seqlen_k, offs_d, head_dim, ctx, MASK: tl.constexpr, VAR: tl.constexpr):
    """[BLOCK_N, BLOCK_D] K or V tile, with the keys that the padding mask drops (and, in a
    masked range, the keys past seqlen_k) read as 0: their values (NaN in an uninitialised
    cache) must never reach a matmul, where 0 * NaN = NaN. Masked in the load, not with a
    tl.where on the tile: changing a wgmma operand in registers made ptxas serialise wgmma."""
    if VAR.HAS_KPM:
        ptr, rc = slc
        rows, cols = offs_n[:, None], offs_d[None, :]
        mask = _key_keep(ctx, rows, seqlen_k, VAR)
        if not VAR.EVEN_D:
            mask = mask & (cols < head_dim)
        x = tl.load(ptr + _ptr_offset(rows, cols, rc, VAR.WIDE), mask=mask, other=0.0)
    else:
        x = _load_rows(slc, offs_n, seqlen_k, offs_d, head_dim, MASK_ROWS=MASK, VAR=VAR)
    return x


@triton.jit
def _finite_rows(x):
    """A [N, D] tile with its non-finite entries zeroed, and which rows had one ([N])."""
    fin = tl.abs(x.to(tl.float32)) < float("inf")
    bad = tl.max(tl.where(fin, 0, 1), 1) != 0
    return tl.where(fin, x, 0.0), bad


@triton.jit
def _row_stats(lse_ptr, delta_ptr, offs_m, stride_m, seqlen_q, MASK_ROWS: tl.constexpr):
    """LSE (in log2 units) and delta of a block of query rows. A row with no visible key
    (lse = -inf) and a row past seqlen_q both get +inf, so that P = exp2(s - lse) = 0.
    Rows are bounds-checked unless ``MASK_ROWS`` is False (every row is < seqlen_q)."""
    if MASK_ROWS:
        lse = tl.load(lse_ptr + offs_m * stride_m, mask=offs_m < seqlen_q, other=float("-inf"))
        delta = tl.load(delta_ptr + offs_m * stride_m, mask=offs_m < seqlen_q, other=0.0)
    else:
        lse = tl.load(lse_ptr + offs_m * stride_m)
        delta = tl.load(delta_ptr + offs_m * stride_m)
    lse = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    return lse, delta


@triton.jit
def _probs_ds(a, b, da, db, bias, lse, delta, rows, cols, seqlen_q, seqlen_k, vis, drop, ctx, MASK: tl.constexpr,
              VAR: tl.constexpr):
    """The value weights and dS of one tile, P recomputed from the LSE (log2 units), in either
    orientation: (a, b, da, db) = (q, k, do, v) gives [M, N] tiles (rows/cols/lse/delta as
    [M, 1]/[1, N]); (k, q, v, do) gives the [N, M] tiles of the dK/dV pass ([1, M]/[N, 1]).
    ``drop``: the dropout keep-mask in the same orientation (``_dropout_keep``).
    Returns (W, dS, dS_qk): W = P with dropout applied (what multiplies V: dV = W^T dO),
    dS = P * (dP - delta) the gradient of the score after the cap (the bias gradient), and
    dS_qk that of the scaled q.k before it (dQ, dK; dS times the cap's derivative).
    In masked tiles dS is zeroed where invisible: there P = 0, but dP can be NaN when an
    invisible key holds NaN, and 0 * NaN would leak; so is dS_qk (the cap's derivative of a
    NaN q.k is NaN too)."""
    qk = _dot(a, tl.trans(b), None, VAR)
    s = _score(qk, bias, rows, cols, seqlen_q, seqlen_k, vis, ctx, MASK=MASK, VAR=VAR)
    p = tl.math.exp2(s - lse)
    dp = _dot(da, tl.trans(db), None, VAR)
    w = p
    if VAR.DROPOUT:
        dp = tl.where(drop, dp * ctx.dropout_scale, 0.0)
        w = tl.where(drop, p * ctx.dropout_scale, 0.0)
    ds = p * (dp - delta)
    if MASK or VAR.HAS_AMASK:
        ds = tl.where(vis, ds, 0.0)
    ds_qk = ds
    if VAR.SOFTCAP:
        t = _tanh(qk * ctx.qk_scale)
        ds_qk = ds * (1.0 - t * t)  # the passes multiply dQ and dK by the softmax scale at the end
        if MASK or VAR.HAS_AMASK:
            ds_qk = tl.where(vis, ds_qk, 0.0)
    return w, ds, ds_qk


# ---------------------------------------------------------------------------------------------
# Launch metadata


@dataclass
class LaunchMeta:
    """What the launchers pass every kernel besides q/k/v-like tensors: the variant and the
    score's runtime arguments."""

    variant: Variant
    score: ScoreArgs


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


class Features(NamedTuple):
    """The score features beyond bias, ALiBi and key padding, as the checks normalise them
    (docs/semantics.md): ``window`` (left, right) with -1 unbounded (causal is passed on its
    own and means right = 0); ``softcap`` 0 = off; ``sinks`` (nheads,) fp32 or None;
    ``dropout_p`` with its ``seed`` ((1,) int64 on the device, drawn from its generator);
    ``attn_mask`` a rank-4 bool view (True = attend) or None."""

    window: tuple = (-1, -1)
    softcap: float = 0.0
    sinks: torch.Tensor | None = None
    dropout_p: float = 0.0
    seed: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None


NO_FEATURES = Features()


def _broadcast_strides(x):
    return tuple(st if sz > 1 else 0 for st, sz in zip(x.stride(), x.shape))


def launch_meta(pb, q, causal, bias, alibi_slopes, key_padding_mask, softmax_scale, tensors,
                features: Features = NO_FEATURES) -> LaunchMeta:
    """``bias`` is a rank-4 view with stride 0 on broadcast dims; ``alibi_slopes`` is
    (1 or batch, nheads) fp32; ``key_padding_mask`` is (batch, seqlen_k) uint8; ``tensors``
    every q/k/v-like tensor the kernels index (for ``needs_wide``); ``features`` the rest."""
    if pb.varlen is not None:
        # The public API refuses these too; the kernels have no per-sequence bias/mask offsets.
        for name, x in (("an additive bias", bias), ("attn_mask", features.attn_mask)):
            if x is not None:
                raise ValueError(f"{name} is not supported with variable-length (packed) batches")
    block_d = max(16, triton.next_power_of_2(pb.head_dim))
    stride_bias = (0, 0, 0, 0) if bias is None else _broadcast_strides(bias)
    stride_slopes = (0, 0)
    if alibi_slopes is not None:
        stride_slopes = (alibi_slopes.stride(0) if alibi_slopes.shape[0] > 1 else 0, alibi_slopes.stride(1))
    left, right = features.window
    if causal:
        right = 0
    amask = None if features.attn_mask is None else features.attn_mask.view(torch.uint8)
    stride_amask = (0, 0, 0, 0) if amask is None else _broadcast_strides(amask)
    softcap = float(features.softcap)
    dropout_p = float(features.dropout_p)
    variant = Variant(
        CAUSAL=right >= 0,
        LOCAL=left >= 0,
        HAS_BIAS=bias is not None,
        BIAS_ROW=stride_bias[2] != 0,
        HAS_ALIBI=alibi_slopes is not None,
        HAS_KPM=key_padding_mask is not None,
        MASK_BOTH_EDGES=left >= 0,
        IS_VARLEN=pb.varlen is not None,
        SOFTCAP=softcap > 0.0,
        HAS_SINKS=features.sinks is not None,
        DROPOUT=dropout_p > 0.0,
        HAS_AMASK=amask is not None,
        BLOCK_D=block_d,
        EVEN_D=pb.head_dim == block_d,
        WIDE=needs_wide(pb, tensors, bias),
        INTERP_BF16=INTERPRET and q.dtype == torch.bfloat16,
    )
    score = ScoreArgs(
        qk_scale=softmax_scale / softcap if softcap > 0.0 else softmax_scale * 1.4426950408889634,
        bias=q if bias is None else bias,
        stride_bias_b=stride_bias[0],
        stride_bias_h=stride_bias[1],
        stride_bias_m=stride_bias[2],
        stride_bias_n=stride_bias[3],
        slopes=q if alibi_slopes is None else alibi_slopes,
        stride_slopes_b=stride_slopes[0],
        stride_slopes_h=stride_slopes[1],
        kpm=q if key_padding_mask is None else key_padding_mask,
        stride_kpm_b=key_padding_mask.stride(0) if key_padding_mask is not None else 0,
        window_left=max(left, 0),
        window_right=max(right, 0),
        softcap=softcap * 1.4426950408889634,
        sinks=q if features.sinks is None else features.sinks,
        stride_sinks=0 if features.sinks is None else features.sinks.stride(0),
        seed=q if features.seed is None else features.seed,
        dropout_threshold=dropout_threshold(dropout_p),
        dropout_scale=1.0 / (1.0 - dropout_p),
        amask=q if amask is None else amask,
        stride_amask_b=stride_amask[0],
        stride_amask_h=stride_amask[1],
        stride_amask_m=stride_amask[2],
        stride_amask_n=stride_amask[3],
    )
    return LaunchMeta(variant, score)


def dropout_threshold(dropout_p: float) -> int:
    """A 16-bit draw u (0 .. 65535) is kept iff u >= this, i.e. iff u / 65536 >= dropout_p."""
    return min(math.ceil(dropout_p * 65536), 65536)


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

    def operands(self, **tensors):
        """Kernel arguments for q/k/v-like tensors: each tensor by its kernel name and its 4-D
        strides as ``stride_<name lowercased>``."""
        args = dict(tensors)
        for name, x in tensors.items():
            args[f"stride_{name.lower()}"] = self.strides(x)
        return args

    def sizes(self):
        """Size arguments every attention kernel takes."""
        return dict(batch=self.batch, seqlen_q=self.seqlen_q, seqlen_k=self.seqlen_k, head_dim=self.head_dim,
                    kv_group=self.nheads // self.nheads_k)

    def varlen_args(self):
        if self.varlen is None:
            return dict(CuSeqQ=None, CuSeqK=None)
        return dict(CuSeqQ=self.varlen.cu_seqlens_q, CuSeqK=self.varlen.cu_seqlens_k)


def problem(q, k, varlen: Varlen | None = None) -> Problem:
    if varlen is None:
        batch, seqlen_q, nheads, head_dim = q.shape
        return Problem(batch, seqlen_q, k.shape[1], nheads, k.shape[2], head_dim)
    return Problem(varlen.cu_seqlens_q.numel() - 1, varlen.max_seqlen_q, varlen.max_seqlen_k,
                   q.shape[1], k.shape[1], q.shape[2], varlen, total_q=q.shape[0])
