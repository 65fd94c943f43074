"""Hopper (sm_90) forward in Gluon with FlashAttention-3's structure (issue 15).

``attn_fwd`` (forward.py) calls ``hopper_fwd`` when ``hopper_supports`` accepts the call and the
head dim is in DEFAULT_HEAD_DIMS (``TRITONFLASH_HOPPER_FWD`` unset or ``auto``), or any head dim of
HEAD_DIMS with ``TRITONFLASH_HOPPER_FWD=1``; ``TRITONFLASH_HOPPER_FWD=0`` turns it off. Everything
else runs the ``tl`` kernel. First verified on an H200 at be67e6f (tests/test_hopper_fwd.py).
Grown from the measured spike benchmarks/experiments/gluon_fwd.py (variant s3_pingpong: a 3-stage
ring, the best there at head dim 128 and equal to 4 stages at 64).

Structure (one CTA per 128 query rows of one (batch, head)):
- a producer partition (1 warp, 24 registers) loads the two 64-row Q halves once, then K and V
  tiles (128 keys x head dim) by TMA into a 3-deep shared-memory ring; per stage a K-ready and a
  V-ready mbarrier (expect-tx) and an empty mbarrier (2 arrivals: one per consumer);
- two consumer warpgroups (the default partition and one 4-warp worker), each owning 64 query
  rows: async wgmma for S = Q K^T (both from shared memory) and O += P V (P from registers),
  online softmax (exp2, scale folded) in registers. Step j issues S_j and then PV_{j-1}, waits
  for S_j only, and does the softmax of block j while the PV wgmma runs;
- ping-pong: the warpgroups take turns issuing their wgmmas (two mbarriers, alternately
  completed), so that one warpgroup's softmax overlaps the other's matmuls;
- key blocks: block 0 peeled (an async wgmma token cannot flow through an if/else in Gluon 3.6)
  and always masked, then [1, n_full) unmasked and [max(n_full, 1), n_end) masked: the causal
  diagonal and a partial last block (every block with key padding). Causal CTAs run longest
  first within sections of heads whose K/V fit in L2;
- epilogue: O / l written through the warpgroup's own Q buffer and a TMA store, lse by a
  masked store.

Sequence lengths that are not multiples of the tiles. The descriptors are 4-D over q/k/v/out
as they are, (batch, seqlen, heads, head dim) with their own strides, and a tile is one
(batch, head) box [1, rows, 1, head dim]. TMA bounds every dimension separately, so a tile that
runs past seqlen stops at its own sequence's end: rows past it load as zeros and are not
stored. A 2-D (batch * seqlen, heads * head dim) view, as the spike used, would instead read
the next sequence's first rows into the tile (their V could be NaN, and 0 * NaN is NaN in the
PV wgmma even where P is 0) and its TMA store would overwrite the next sequence's output. With
the 4-D boxes: K rows past seqlen_k are zeros (their scores are also masked to -inf, non-causal
in the masked range, causal by the diagonal since seqlen_k >= seqlen_q), V rows past it zeros,
Q rows past seqlen_q zeros in a half that has a real row (a half without one is not loaded,
see below; such rows are never stored, and lse is stored under a row mask). The coordinates are
per dimension, so no int32 offset overflows.

Covered (``hopper_supports``): sm_90, fp16/bf16, head dim 64/128, GQA/MQA, causal (with
seqlen_k >= seqlen_q, so that without key padding every row sees key 0) or not, ALiBi or not,
key padding or not, softmax_scale > 0 (the running max is taken on unscaled scores) and at
least MIN_SOFTMAX_SCALE = 2^-32 (see below), TMA-compatible strides; an additive bias of q's
dtype whose (seqlen_q, seqlen_k) plane is real and TMA-addressable (unit key stride, 16-byte
aligned base and row stride; batch and head dims full or broadcast), not with key padding
(``_bias_ok``). Not covered: other biases (row biases (.., 1, seqlen_k), fp32, unaligned rows,
bias with key padding), varlen, window, softcap, sinks, dropout, attn_mask.

Bias (BIAS variant): the producer loads the bias tile of key block j for the CTA's 128 query
rows by TMA (a 4-D descriptor over the bias view, box (1, 1, 128, 128), zeros out of bounds; a
broadcast batch or head dim is sliced to one element on the host and read at coordinate 0)
into a bias ring with K/V's stage index, on its own ready mbarriers; the empty barrier frees it
with the K/V stage. The ring is 2 stages at d128 (2 * (32 + 32 + 32) KB + 32 KB of Q), 3 at d64.
Each consumer warpgroup reads its 64 rows of the tile from shared memory in the score layout
just before use and adds bias / softmax_scale to q.k; every key block is masked (one key loop)
and the softmax is the -inf-safe one (as KPM), so a row whose keys all have a -inf bias gets
output 0 and lse -inf. Order: in block 0 before ALiBi and the mask, as the tl kernel; in later
blocks after them (ptxas spilled otherwise at d128), so there a NaN or +inf bias entry at a key
that the causal diagonal hides from a row makes that row NaN (the tl kernel masks it). -inf
biased keys need finite K and V (docs/semantics.md), as in the tl kernel.

Key padding (KPM, a (batch, seqlen_k) uint8 mask, nonzero = keep): every key block is masked
(n_full = 0). Each consumer warpgroup reads a block's 128 mask bytes as four int32 bit words
(_kpm_words; keys past seqlen_k are 0) while its S wgmma runs, masks S with one select a score
(_drop_padded, whatever K holds), and before the block's PV wgmma zeroes the padded keys' rows
of the V stage in shared memory (_zero_padded_keys: only blocks and 32-row slices that have
one; 0 * NaN would be NaN in the wgmma), so NaN/inf in padded K or V never reaches a row. The
online softmax is -inf-safe in this variant only (_finite_max, l = 0 -> 1): a row with no
visible key gets output 0 and lse -inf (docs/semantics.md). KPM=False compiles to the same PTX
as before the mask was added (separate partition functions, so KPM stays a real constexpr), and
the same holds for BIAS (_consumer0_bias, _producer_bias).

Known difference from docs/semantics.md ("Invisible keys"), documented there: under causal, a
non-finite V in a key that a row cannot see but a later row of the same 128-key block can see
reaches that row as 0 * inf = NaN (the ``tl`` kernel zeroes such values in its masked blocks).
Keys past seqlen_k are safe (TMA zero-fills them), and so are padded keys (zeroed, above).
tests/test_hopper_fwd.py carries it as a strict xfail.

ALiBi in q.k units, c = slope / softmax_scale (times log2 e, divided by qk_scale): non-causal,
the kernel subtracts c * |i + sk - sq - j| from q.k before scaling; causal, it adds the column
term c * (j - row0) only and subtracts the row term from lse (``_score_mod``, ALIBI_ROW_SHIFT).
The products are fp32: they overflow where c * distance (distance up to seqlen) exceeds ~3.4e38,
and a row whose first block of scores all overflow to -inf would get a NaN max, where the ``tl``
kernel, which scales first, stays finite. hopper_supports refuses scales below
MIN_SOFTMAX_SCALE (2^-32) on the host float, so it takes a slope above ~7.9e28 / seqlen (slopes
are never read on the host) to get there.

Query rows past seqlen_q: warpgroup 1's Q half is not loaded when all its rows lie past seqlen_q
(seqlen_q % 128 in [1, 64], or seqlen_q <= 64), so that q_bar never waits for a box wholly out of
bounds; that warpgroup then computes on stale shared memory, in step with the other (same
barriers, same key blocks), and stores nothing (TMA store clipped, lse masked).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .configs import device_properties

BLOCK_M = 128  # query rows per CTA (two warpgroups x 64)
HALF_M = 64  # query rows per consumer warpgroup
BLOCK_N = 128  # keys per K/V tile; at d64 too (the spike: same softmax work per key, room for stages)
# K/V ring depth (a constexpr: the kernel reads it as a global): d128 needs 229,728 B of shared
# memory (limit 232,448); at d64 the spike measured 4 stages equal to 3.
STAGES = gl.constexpr(3)
# The bias variant's ring at d128 (K, V and a 128 x 128 bias tile a stage): 2 * 96 KB + 32 KB of Q.
BIAS_STAGES_D128 = gl.constexpr(2)
HEAD_DIMS = (64, 128)
# Taken by default (TRITONFLASH_HOPPER_FWD unset, kernels/forward.py); the others of HEAD_DIMS
# with TRITONFLASH_HOPPER_FWD=1. At d64 it measured no faster than the tl kernel on an H200
# (0.89x its speed at 1k causal, 0.93-1.01x at 4k; docs/perf-notes.md).
DEFAULT_HEAD_DIMS = (128,)
GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
PRODUCER_WARPS = 1
PRODUCER_REGS = 24
CONSUMER_REGS = 240  # the worker consumer; the default partition keeps what setmaxnreg leaves
# The launch options of a kernel with this partition layout (producer warp, two consumer
# warpgroups): the backward's Gluon pass (hopper_bwd.py) uses the same.
WARP_SPECIALISED = dict(P_WARPS=PRODUCER_WARPS, P_REGS=PRODUCER_REGS, C_REGS=CONSUMER_REGS, num_warps=4)
LOG2E = 1.4426950408889634
L2_BYTES_DEFAULT = 50 * 1024 * 1024  # H100/H200; a compile-only run has no device to ask
# Smallest softmax_scale taken (hopper_supports): the kernel divides the ALiBi slope by the scale,
# finite below slopes of 2^-32 * 3.4e38 ~ 7.9e28; any practical scale is far above it.
MIN_SOFTMAX_SCALE = 2.0**-32


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------
#
# Barrier phases. Every wait has a parity that is a function of the global key block index j
# only: stage j % STAGES, K/V-ready parity (j // STAGES) & 1, empty parity ((j // STAGES) & 1) ^ 1
# for the producer, turn parity (j + 1 - WG) & 1. The producer walks j = 0 .. n_end - 1; each
# consumer walks j = 0 (peeled), [1, n_full), [max(n_full, 1), n_end): the same sequence, in
# order, each j once, so the masked/unmasked split changes no arrival count or phase. n_end is
# computed once per CTA before warp_specialize and is the same for the producer and both
# consumers (the empty barriers count 2 arrivals and the turn barriers alternate); rows that
# must not see part of a block are removed by the mask, not by a shorter loop.


@gluon.jit
def _tile_coords(n_m, n_bh, nheads, heads_per_section, CAUSAL: gl.constexpr, BATCH_INNER: gl.constexpr):
    """(query block, batch, head) of this CTA in a 1-D grid of n_m * n_bh CTAs.

    Non-causal: the query blocks of one head are adjacent (they share its K/V in L2). Causal:
    longest first: the (batch, head) pairs are cut into sections of heads_per_section whose K/V
    fit in L2, and inside a section the CTAs go from the last query block (most key blocks) to
    the first. BATCH_INNER (a bias shared by every batch, BIAS variant): the CTAs that read the
    same bias rows are adjacent so the tile is read from DRAM once and from L2 by the others:
    non-causal, batch fastest, then query block, then head; causal, the pairs are numbered
    batch-fastest (same sections)."""
    pid = gl.program_id(0)
    if CAUSAL:
        per_section = heads_per_section * n_m
        section = pid // per_section
        r = pid - section * per_section
        heads_here = gl.minimum(heads_per_section, n_bh - section * heads_per_section)  # the last one may be short
        pid_m = n_m - 1 - r // heads_here
        bh = section * heads_per_section + r % heads_here
    elif BATCH_INNER:
        batch = n_bh // nheads
        r = pid // batch
        pid_m = r % n_m
        bh = (pid % batch) * nheads + r // n_m
    else:
        pid_m = pid % n_m
        bh = pid // n_m
    if CAUSAL and BATCH_INNER:
        batch = n_bh // nheads
        return pid_m, bh % batch, bh // batch
    return pid_m, bh // nheads, bh % nheads


@gluon.jit
def _block_range(m0, seqlen_q, seqlen_k, BM: gl.constexpr, BN: gl.constexpr, CAUSAL: gl.constexpr,
                 ALL_MASKED: gl.constexpr):
    """(n_full, n_end) for the query rows [m0, m0 + BM): key blocks [0, n_full) are visible to
    every row and end before seqlen_k (no mask), [n_full, n_end) partly (masked); blocks from
    n_end on are skipped. n_end >= 1: without key padding every row sees key 0 (causal needs
    seqlen_k >= seqlen_q). ALL_MASKED (the KPM and BIAS variants): n_full = 0, every block masked
    (any key may be padded; the bias variant's consumers run one key loop, see _hopper_attn_fwd)."""
    n_end = (seqlen_k + BN - 1) // BN
    n_full = seqlen_k // BN
    if CAUSAL:
        # Query i sees key j iff j <= i + seqlen_k - seqlen_q: the last real row bounds the
        # range (rows past seqlen_q are never stored), the first row the unmasked part.
        off = seqlen_k - seqlen_q
        last = gl.minimum(m0 + BM, seqlen_q) - 1
        n_end = gl.minimum(n_end, (last + off) // BN + 1)
        n_full = gl.minimum(n_full, (m0 + off + 1) // BN)
    if ALL_MASKED:
        n_full = n_full * 0
    return n_full, n_end


@gluon.jit
def _score_mod(sc, n0, row0, seqlen_k, alibi_c, MASK: gl.constexpr, CAUSAL: gl.constexpr, ALIBI: gl.constexpr,
               ALIBI_ROW_SHIFT: gl.constexpr):
    """The scores of one tile with ALiBi and the mask, still in q.k units (the softmax applies
    scale * log2(e)). sc: (HM, BN) fp32 for keys n0 .. n0 + BN - 1 and the query rows whose
    i + seqlen_k - seqlen_q starts at row0; alibi_c: the slope in q.k units. The mask is the
    causal one under CAUSAL (for real rows it implies j < seqlen_k), else j < seqlen_k.

    ALIBI_ROW_SHIFT (causal only): every visible key has j <= i' (i' = i + seqlen_k - seqlen_q),
    so the bias -c * (i' - j) is c * (j - row0) - c * (i' - row0): a column term and a row term.
    The tile gets the column term only (one add per score instead of a subtract, an abs and a
    multiply-add); the row term shifts each row's scores by a constant, which the softmax
    ignores and ``_consumer`` subtracts from lse. The values stay small where
    they matter: a key far from the diagonal has a large negative column term, and a weight of
    2^-(c * distance * scale * log2 e) next to the row's maximum."""
    HM: gl.constexpr = sc.shape[0]
    BN: gl.constexpr = sc.shape[1]
    layout: gl.constexpr = sc.type.layout
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, layout)).to(gl.float32)
    # Nested ifs, no `not`: inside a warp_specialize partition the constexpr flags arrive as
    # constant i1 values (Triton 3.6), so `not FLAG` is a runtime value and every branch is
    # built (and must type-check); the constant conditions are folded away afterwards (the
    # causal ALiBi PTX has no abs.f32).
    if ALIBI:
        if ALIBI_ROW_SHIFT:
            # (n0 - row0) exact in fp32 (|values| < 2^24); c * (j - row0) per column, then one add per score.
            sc = sc + gl.expand_dims(alibi_c * (cols + (n0 - row0).to(gl.float32)), 0)
    if MASK or ALIBI:
        # Relative to the block (exact in fp32: |values| < 2^24): a per-row value minus the
        # column inside the tile, so the per-element work is a subtract, a multiply-add, a select.
        rows = (row0 - n0 + gl.arange(0, HM, layout=gl.SliceLayout(1, layout))).to(gl.float32)
        rel = gl.expand_dims(rows, 1) - gl.expand_dims(cols, 0)  # (HM, BN): i + sk - sq - j
        if ALIBI:
            if ALIBI_ROW_SHIFT:
                pass  # added above
            else:
                sc = sc - alibi_c * gl.abs(rel)
        if MASK:
            if CAUSAL:
                sc = gl.where(rel >= 0.0, sc, float("-inf"))
            else:
                # Keys past seqlen_k (TMA read them as zeros). A column vector broadcast in the
                # select: a second (HM, BN) index tile, or a per-row bound on rel, made d128 +
                # ALiBi spill (ptxas, Triton 3.6).
                sc = gl.where(gl.expand_dims(cols, 0) < (seqlen_k - n0), sc, float("-inf"))
    return sc


@gluon.jit
def _ring_barriers(NS: gl.constexpr):
    """The mbarriers of the ring, initialised and fenced: q_bar (the Q halves' TMA), per stage
    k_bar and v_bar (TMA, expect-tx) and empty_bar (2 arrivals: one per consumer warpgroup),
    and turn_bar[2] (the ping-pong turns)."""
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty_bar = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    turn_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NS):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
        mbarrier.init(empty_bar.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(turn_bar.index(i), count=1)
    fence_async_shared()
    return q_bar, k_bar, v_bar, empty_bar, turn_bar


@gluon.jit
def _tma_box(buf):
    """A 2-D (rows, head dim) tile buffer as the (1, rows, 1, head dim) box of the 4-D descriptors."""
    return buf.reshape([1, buf.shape[0], 1, buf.shape[1]])


@gluon.jit
def _kpm_words(kpm, n0, seqlen_k, BN: gl.constexpr):
    """Which keys n0 .. n0 + BN - 1 a row may see by the key padding mask and seqlen_k, as four
    int32 words (a tuple of scalars, the same in every thread): bit i of word w is key
    n0 + 32 w + i, 1 = kept; keys past seqlen_k are 0. kpm: (the (batch, seqlen_k) uint8 mask,
    nonzero = keep, unit stride; the int64 offset of this sequence's row).

    Each warp reads the BN bytes itself (4 a lane, the layout replicated over the warps) and
    sums disjoint bits across its lanes: no shared memory, no barrier. Bits rather than the
    bytes in the score layout, where each thread holds 32 columns: 32 more live registers in the
    softmax made d128 spill. (The row offset is added to the integer offset, not to the pointer
    beforehand: a lane's ``base + 4 * lane`` was hoisted out of the partition and spilled.)"""
    gl.static_assert(BN == 128, "four 32-bit words")
    # (word, bit) -> key 32 word + bit: lane i holds bit i of the four words, in its registers;
    # the warps hold copies (the layout's 16 rows over a 4-row tensor).
    layout: gl.constexpr = gl.BlockedLayout([4, 1], [1, 32], [4, 1], [1, 0])
    word = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(1, layout)), 1)
    bit = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, layout)), 0)
    keys = word * 32 + bit
    base, row = kpm
    keep = gl.load(base + (row + (n0 + keys)), mask=keys < seqlen_k - n0, other=0) != 0
    # Bit 31 is the sign bit: the sums wrap, and the bits are disjoint, so they are ORs.
    words = gl.sum(gl.where(keep, 1 << bit, 0), axis=1)  # (4,), every word in each thread
    w = gl.arange(0, 4, layout=gl.SliceLayout(1, layout))
    return (gl.sum(gl.where(w == 0, words, 0), axis=0), gl.sum(gl.where(w == 1, words, 0), axis=0),
            gl.sum(gl.where(w == 2, words, 0), axis=0), gl.sum(gl.where(w == 3, words, 0), axis=0))


@gluon.jit
def _drop_padded(sc, words, n0, row0, CAUSAL: gl.constexpr):
    """The scores sc (rows, BN keys n0 ..) with -inf where a row cannot see the key: dropped by
    ``words`` (_kpm_words: padded or past seqlen_k) or, under CAUSAL, past the diagonal (rows
    as in _score_mod, row0 = i + seqlen_k - seqlen_q of the first). One select a score, so a
    NaN or inf score of a padded key (from its K) never gets through. Causal: a dropped key's
    column index becomes +inf, so that one comparison with the diagonal drops it too."""
    HM: gl.constexpr = sc.shape[0]
    BN: gl.constexpr = sc.shape[1]
    layout: gl.constexpr = sc.type.layout
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    w0, w1, w2, w3 = words
    w = gl.where(cols < 64, gl.where(cols < 32, w0, w1), gl.where(cols < 96, w2, w3))
    keep = ((w >> (cols % 32)) & 1) != 0
    if CAUSAL:
        colf = gl.where(keep, cols.to(gl.float32), float("inf"))
        rows = (row0 - n0 + gl.arange(0, HM, layout=gl.SliceLayout(1, layout))).to(gl.float32)
        sc = gl.where(gl.expand_dims(rows, 1) - gl.expand_dims(colf, 0) >= 0.0, sc, float("-inf"))
    else:
        sc = gl.where(gl.expand_dims(keep, 0), sc, float("-inf"))
    return sc


@gluon.jit
def _finite_max(m):
    """The running max with -inf (a row that has seen no visible key yet) as 0: subtracted in the
    exponentials, exp2(-inf - 0) = 0 where exp2(-inf - -inf) would be NaN."""
    return gl.where(m == float("-inf"), 0.0, m)


@gluon.jit
def _padded_bits(w, lim, i: gl.constexpr):
    """The keys 32 i .. 32 i + 31 of a block that are below ``lim`` (seqlen_k - n0) but dropped
    by word ``w`` of its _kpm_words: the padded keys, as bits."""
    n = gl.minimum(gl.maximum(lim - 32 * i, 0), 32)
    return ~w & gl.where(n >= 32, -1, (1 << gl.minimum(n, 31)) - 1)


@gluon.jit
def _zero_padded_keys(v, words, lim):
    """Zero the rows of the V tile ``v`` (shared memory, BN keys by head dim) whose keys the
    padding mask drops (``words`` from _kpm_words; lim = seqlen_k - n0, the rows from lim on
    are TMA's zeros already), before a PV wgmma reads it: P is 0 there, but 0 * NaN (or inf) in
    the matmul is NaN, and a padded key's V may hold anything (a KV cache from torch.empty).
    Called by all 4 warps of one consumer warpgroup, after the stage's V-ready wait.

    The checks are on the words, the same in every thread: a block without a padded key costs
    a few scalar operations, and only the 32-row slices (one word) with one are rewritten (load,
    zero the padded rows, store: 32 / 16 values a thread at d128 / d64; Triton puts a barrier
    before each load and each store, as the slices share an allocation). Then a proxy fence
    (generic-proxy writes before the async-proxy wgmma read) and a warpgroup barrier (each
    warp's wgmma reads rows that the other warps wrote).

    Both consumer warpgroups do this for the same stage, unsynchronised: one may rewrite rows
    while the other's wgmma reads them. That is benign: each group reads the stage only after
    its own zeroing, so a padded row then already holds zeros and a kept row the TMA's values,
    and the other group's stores write exactly those bytes again (zeros, or the values it
    loaded, which nobody changes). The producer refills the stage only after both groups
    released it (empty barrier, after their PV wgmma)."""
    BN: gl.constexpr = v.shape[0]
    D: gl.constexpr = v.shape[1]
    ROWS: gl.constexpr = 32  # one word a slice
    VEC: gl.constexpr = 8  # 16-bit values: 16 bytes a thread, a vector of the 128B swizzle
    w0, w1, w2, w3 = words
    pad = (_padded_bits(w0, lim, 0), _padded_bits(w1, lim, 1), _padded_bits(w2, lim, 2), _padded_bits(w3, lim, 3))
    if (pad[0] | pad[1] | pad[2] | pad[3]) != 0:
        rows_layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // (D // VEC), D // VEC], [4, 1], [1, 0])
        rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, rows_layout))
        for r0 in gl.static_range(0, BN, ROWS):
            bits = pad[r0 // ROWS]
            if bits != 0:
                tile = v.slice(r0, ROWS)
                x = tile.load(rows_layout)
                drop = ((bits >> rows) & 1) != 0
                tile.store(gl.where(gl.expand_dims(drop, 1), gl.zeros_like(x), x))
        fence_async_shared()
        gl.thread_barrier()


@gluon.jit
def _load_q(q_desc, q_smem, q_bar, b, m0, h, seqlen_q):
    """The producer's first loads: the CTA's two Q halves into q_smem on q_bar.

    The second half is loaded only if warpgroup 1 has a real row: whether TMA signals a box
    that lies wholly past seqlen_q with its full byte count is not something to rely on (a
    short count would hang q_bar). Otherwise warpgroup 1 computes on whatever its buffer holds;
    none of its rows is stored (TMA store clipped, lse masked). The expected byte count is a
    constant (expect_tx immediate), hence two complementary predicated expects."""
    HM: gl.constexpr = q_smem.shape[1]
    Q_BYTES: gl.constexpr = q_desc.block_type.nbytes
    second = m0 + HM < seqlen_q
    mbarrier.expect(q_bar, 2 * Q_BYTES, pred=second)
    mbarrier.expect(q_bar, Q_BYTES, pred=m0 + HM >= seqlen_q)
    tma.async_copy_global_to_shared(q_desc, [b, m0, h, 0], q_bar, _tma_box(q_smem.index(0)))
    tma.async_copy_global_to_shared(q_desc, [b, m0 + HM, h, 0], q_bar, _tma_box(q_smem.index(1)), pred=second)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, n_end, b, m0, h, hk, seqlen_q):
    NS: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    _load_q(q_desc, q_smem, q_bar, b, m0, h, seqlen_q)
    for j in range(n_end):
        s = j % NS
        # Fresh barrier: waiting for parity 1 passes at once (the producer starts one phase ahead).
        mbarrier.wait(empty_bar.index(s), ((j // NS) & 1) ^ 1)
        mbarrier.expect(k_bar.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, j * BN, hk, 0], k_bar.index(s), _tma_box(k_smem.index(s)))
        mbarrier.expect(v_bar.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [b, j * BN, hk, 0], v_bar.index(s), _tma_box(v_smem.index(s)))


@gluon.jit
def _producer_bias(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, n_end, b, m0, h, hk, seqlen_q,
                   bias_desc, b_smem, b_bar):
    """_producer with the bias ring (BIAS variant): per key block j, the bias tile of the CTA's
    BM query rows and keys j * BN .. (a (1, 1, BM, BN) box, zeros out of bounds) into b_smem's
    stage j % NS on b_bar (expect-tx), between K_j and V_j; the stage is freed by the same empty
    barrier as K/V (the consumers read the bias of block j in step j, before they release it).
    A broadcast batch or head dim of the bias has one element in the descriptor: coordinate 0."""
    NS: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    _load_q(q_desc, q_smem, q_bar, b, m0, h, seqlen_q)
    bb = gl.minimum(b, bias_desc.shape[0] - 1)
    bh = gl.minimum(h, bias_desc.shape[1] - 1)
    for j in range(n_end):
        s = j % NS
        mbarrier.wait(empty_bar.index(s), ((j // NS) & 1) ^ 1)
        mbarrier.expect(k_bar.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, j * BN, hk, 0], k_bar.index(s), _tma_box(k_smem.index(s)))
        mbarrier.expect(b_bar.index(s), bias_desc.block_type.nbytes)
        tile = b_smem.index(s)
        tma.async_copy_global_to_shared(bias_desc, [bb, bh, m0, j * BN], b_bar.index(s),
                                        tile.reshape([1, 1, tile.shape[0], tile.shape[1]]))
        mbarrier.expect(v_bar.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [b, j * BN, hk, 0], v_bar.index(s), _tma_box(v_smem.index(s)))


@gluon.jit
def _add_bias(sc, bias, s, j, NS: gl.constexpr, WG: gl.constexpr):
    """sc (this warpgroup's HM rows, BN keys of block j, q.k units) plus the bias tile of stage s
    in the same units (times inv_scale = 1 / softmax_scale), read from shared memory in the
    score layout just before use (32 more live registers earlier spilled the KPM variant at
    d128). ``bias``: (b_smem, b_bar, inv_scale). -inf entries stay -inf (masks as biases)."""
    b_smem, b_bar, inv_scale = bias
    HM: gl.constexpr = sc.shape[0]
    mbarrier.wait(b_bar.index(s), (j // NS) & 1)
    t = b_smem.index(s).slice(WG * HM, HM).load(sc.type.layout)
    return sc + t.to(gl.float32) * inv_scale


@gluon.jit
def _kv_step(j, WG: gl.constexpr, q, ring, state, s_zero, row0, seqlen_k, alibi_c, qk_scale, kpm, bias, MASK: gl.constexpr,
             CAUSAL: gl.constexpr, ALIBI: gl.constexpr, KPM: gl.constexpr, BIAS: gl.constexpr, SAFE: gl.constexpr):
    """Key block j >= 1 of one consumer warpgroup: S_j = Q K_j^T and O += P_{j-1} V_{j-1} issued
    back to back, softmax of S_j while the PV wgmma runs. ``ring``: (k_smem, v_smem, k_bar,
    v_bar, empty_bar, turn_bar); ``state``: (acc, p, m_i, l_i) with p the probabilities of block
    j - 1 on entry and of block j on return (its PV is the next step's, or the epilogue's).
    KPM (a real constexpr, see _consumer0_kpm): ``kpm`` is as in _consumer, and ``state``
    carries a fifth entry, the mask words (_kpm_words) of p's block: its padded keys' V rows are
    zeroed before its PV, and those of block j are masked in S_j. BIAS: ``bias`` as in _add_bias,
    added to S_j after ALiBi and the mask. SAFE (KPM or BIAS): the -inf-safe softmax."""
    k_smem, v_smem, k_bar, v_bar, empty_bar, turn_bar = ring
    if KPM:
        acc, p, m_i, l_i, words = state
    else:
        acc, p, m_i, l_i = state
    NS: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    row_o: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    s = j % NS
    sp = (j - 1) % NS  # stage of block j - 1
    if KPM:
        # Before this warpgroup's turn (the other's matmuls run meanwhile) and before S_j holds
        # registers. V_{j-1} was loaded before K_j; the second wait below passes at once.
        mbarrier.wait(v_bar.index(sp), ((j - 1) // NS) & 1)
        _zero_padded_keys(v_smem.index(sp), words, seqlen_k - (j - 1) * BN)
    mbarrier.wait(k_bar.index(s), (j // NS) & 1)
    # Turn j of this warpgroup: WG0 starts, WG1 waits for WG0's issue of the same block.
    mbarrier.wait(turn_bar.index(WG), (j + 1 - WG) & 1)
    s_tok = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.wait(v_bar.index(sp), ((j - 1) // NS) & 1)
    acc_tok = warpgroup_mma(p, v_smem.index(sp), acc, is_async=True)
    mbarrier.arrive(turn_bar.index(1 - WG), count=1)
    if KPM:
        words = _kpm_words(kpm, j * BN, seqlen_k, BN)  # while S_j runs
    # S_j done; the PV wgmma issued after it may still run (wgmma groups complete in order).
    sc = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
    if KPM:
        # The words drop the keys past seqlen_k too: only the causal mask is left to _score_mod.
        sc = _drop_padded(_score_mod(sc, j * BN, row0, seqlen_k, alibi_c, False, CAUSAL, ALIBI, CAUSAL), words, j * BN, row0, CAUSAL)
    else:
        sc = _score_mod(sc, j * BN, row0, seqlen_k, alibi_c, MASK, CAUSAL, ALIBI, CAUSAL)
    if BIAS:
        # After ALiBi and the mask, unlike block 0 (_consumer) and the tl kernel: before them,
        # ptxas spilled 32-100 bytes at d128 without ALiBi. The same scores, except that a NaN
        # or +inf bias entry at a key masked by the causal diagonal reaches its row (docstring).
        sc = _add_bias(sc, bias, s, j, NS, WG)
    m_new = gl.maximum(m_i, gl.max(sc, axis=1) * qk_scale)
    if SAFE:
        # A row may have seen no visible key yet (m_new = m_i = -inf): subtract 0 instead, so
        # pf = 0 and alpha = exp2(-inf) = 0 (acc and l_i are 0 then), never -inf - -inf = NaN.
        m_safe = _finite_max(m_new)
        pf = gl.exp2(sc * qk_scale - gl.expand_dims(m_safe, 1))
        alpha = gl.exp2(m_i - m_safe)
    else:
        # Without KPM or a bias, m_i is finite (every row sees key 0, in block 0), so a row that
        # sees no key of block j gets m_new = m_i, pf = exp2(-inf) = 0 and alpha = 1, never a NaN.
        pf = gl.exp2(sc * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(pf, axis=1)
    p_next = gl.convert_layout(pf.to(q.dtype), p.type.layout)
    acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok, p))
    gl.thread_barrier()  # every warp of the group is past its wait before the stage is released
    mbarrier.arrive(empty_bar.index(sp), count=1)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
    if KPM:
        return acc, p_next, m_new, l_i, words
    else:
        return acc, p_next, m_new, l_i


@gluon.jit
def _consumer(WG: gl.constexpr, o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full,
              n_end, b, m0, h, lse_off, seqlen_q, seqlen_k, alibi, qk_scale, kpm, bias, CAUSAL: gl.constexpr, ALIBI: gl.constexpr,
              KPM: gl.constexpr, BIAS: gl.constexpr, SAFE: gl.constexpr):
    """One consumer warpgroup. ``alibi``: the ALiBi slope in q.k units (fp32), or a pointer to
    the slope, which this warpgroup then reads itself (see _hopper_attn_fwd). ``kpm``: under
    KPM (the key padding mask's pointer, the int64 offset of this sequence's row), else None.
    ``bias``: under BIAS (b_smem, b_bar, inv_scale: _add_bias), else None. KPM, BIAS and SAFE
    (KPM or BIAS: the -inf-safe softmax) are real constexprs (_consumer0_kpm/_bias pass them as
    literals; the partition flags CAUSAL and ALIBI arrive as i1)."""
    HM: gl.constexpr = q_smem.shape[1]
    D: gl.constexpr = q_smem.shape[2]
    NS: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

    q = q_smem.index(WG)
    first = m0 + WG * HM  # this warpgroup's first query row
    row0 = first + seqlen_k - seqlen_q  # i + seqlen_k - seqlen_q of that row
    if alibi.type.is_ptr():  # a compile-time choice: the argument's type
        # Inside a partition the constexpr flags arrive as constant i1 values: both branches of
        # `if ALIBI` are built, so they must agree in type (the pointer is valid either way).
        L2E: gl.constexpr = 1.4426950408889634
        alibi_c = qk_scale * 0.0
        if ALIBI:
            alibi_c = gl.load(alibi) * (L2E / qk_scale)
    else:
        alibi_c = alibi
    acc = gl.zeros([HM, D], gl.float32, o_layout)
    s_zero = gl.zeros([HM, BN], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)

    # Block 0, peeled and always masked: the causal diagonal of the first query blocks (the mask
    # is all-true for the others), or the only, partial, key block when seqlen_k < BN.
    mbarrier.wait(k_bar.index(0), 0)
    mbarrier.wait(turn_bar.index(WG), (1 - WG) & 1)
    s_tok = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.arrive(turn_bar.index(1 - WG), count=1)
    if KPM:
        words = _kpm_words(kpm, 0, seqlen_k, BN)
    sc = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
    if BIAS:
        sc = _add_bias(sc, bias, 0, 0, NS, WG)
    if KPM:
        # Key 0 may be padded: a row may see no key of block 0 (m_i = -inf, pf = 0, l_i = 0).
        sc = _drop_padded(_score_mod(sc, 0, row0, seqlen_k, alibi_c, False, CAUSAL, ALIBI, CAUSAL), words, 0, row0, CAUSAL)
        m_i = gl.max(sc, axis=1) * qk_scale
        pf = gl.exp2(sc * qk_scale - gl.expand_dims(_finite_max(m_i), 1))
    else:
        sc = _score_mod(sc, 0, row0, seqlen_k, alibi_c, True, CAUSAL, ALIBI, CAUSAL)
        m_i = gl.max(sc, axis=1) * qk_scale
        if SAFE:
            # A -inf bias may hide every key of block 0 from a row (m_i = -inf, pf = 0, l_i = 0).
            pf = gl.exp2(sc * qk_scale - gl.expand_dims(_finite_max(m_i), 1))
        else:
            pf = gl.exp2(sc * qk_scale - gl.expand_dims(m_i, 1))
    l_i = gl.sum(pf, axis=1)
    if KPM:
        state = (acc, gl.convert_layout(pf.to(q.dtype), p_layout), m_i, l_i, words)
    else:
        state = (acc, gl.convert_layout(pf.to(q.dtype), p_layout), m_i, l_i)

    ring = (k_smem, v_smem, k_bar, v_bar, empty_bar, turn_bar)
    if BIAS:
        pass  # n_full = 0 (_hopper_attn_fwd): the masked loop only, one loop fewer in the code
    else:
        for j in range(1, n_full):
            state = _kv_step(j, WG, q, ring, state, s_zero, row0, seqlen_k, alibi_c, qk_scale, kpm, bias, False, CAUSAL, ALIBI, KPM, BIAS, SAFE)
    for j in range(gl.maximum(n_full, 1), n_end):
        state = _kv_step(j, WG, q, ring, state, s_zero, row0, seqlen_k, alibi_c, qk_scale, kpm, bias, True, CAUSAL, ALIBI, KPM, BIAS, SAFE)
    if KPM:
        acc, p, m_i, l_i, words = state
    else:
        acc, p, m_i, l_i = state

    # The last block's PV.
    sl = (n_end - 1) % NS
    mbarrier.wait(v_bar.index(sl), ((n_end - 1) // NS) & 1)
    if KPM:
        _zero_padded_keys(v_smem.index(sl), words, seqlen_k - (n_end - 1) * BN)
    acc = warpgroup_mma(p, v_smem.index(sl), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

    if SAFE:
        # A row with no visible key (every key padded or -inf biased, or none it can see kept):
        # l_i = 0 and acc = 0 (every P is 0; padded V rows zeroed, -inf biased keys' V finite
        # by the contract): output 0, lse -inf (docs/semantics.md).
        out = acc / gl.expand_dims(gl.convert_layout(gl.where(l_i == 0.0, 1.0, l_i), gl.SliceLayout(1, o_layout)), 1)
    else:
        out = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
    LN2: gl.constexpr = 0.6931471805599453
    lse2 = m_i + gl.log2(l_i)
    if CAUSAL and ALIBI:
        # The row term that _score_mod left out (ALIBI_ROW_SHIFT): -c * (i' - row0) in q.k
        # units, times qk_scale for log2 units.
        r = gl.arange(0, HM, layout=gl.SliceLayout(1, s_layout)).to(gl.float32)
        lse2 = lse2 - (alibi_c * qk_scale) * r
    lse = lse2 * LN2
    if SAFE:
        lse = gl.where(l_i == 0.0, float("-inf"), lse)  # m_i + log2(0) is -inf too: explicit, not left to lg2.approx
    rows = first + gl.arange(0, HM, layout=gl.SliceLayout(1, s_layout))
    gl.store(lse_ptr + lse_off + rows, lse, mask=rows < seqlen_q)
    # Q of this warpgroup is no longer read: its buffer stages O for the TMA store, which drops
    # the rows past seqlen_q (the box is bounded by this sequence, see the module docstring).
    q.store(out.to(q.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [b, first, h, 0], _tma_box(q))
    tma.store_wait(pendings=0)


@gluon.jit
def _consumer0(o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, b, m0, h, lse_off,
               seqlen_q, seqlen_k, alibi, qk_scale, CAUSAL: gl.constexpr, ALIBI: gl.constexpr):
    _consumer(0, o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, b, m0, h,
              lse_off, seqlen_q, seqlen_k, alibi, qk_scale, None, None, CAUSAL, ALIBI, False, False, False)


@gluon.jit
def _consumer1(o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, b, m0, h, lse_off,
               seqlen_q, seqlen_k, alibi, qk_scale, CAUSAL: gl.constexpr, ALIBI: gl.constexpr):
    _consumer(1, o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, b, m0, h,
              lse_off, seqlen_q, seqlen_k, alibi, qk_scale, None, None, CAUSAL, ALIBI, False, False, False)


# The consumers of the key padding variant: separate partition functions, so that KPM reaches
# _consumer as a literal constexpr (a flag passed through warp_specialize arrives as a constant
# i1, and both branches of `if KPM` would be built, the kpm ones with kpm = None), and so that
# the variants without KPM capture exactly what they did before (their PTX is unchanged).
@gluon.jit
def _consumer0_kpm(o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, b, m0, h,
                   lse_off, seqlen_q, seqlen_k, alibi, qk_scale, kpm, CAUSAL: gl.constexpr, ALIBI: gl.constexpr):
    _consumer(0, o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, b, m0, h,
              lse_off, seqlen_q, seqlen_k, alibi, qk_scale, kpm, None, CAUSAL, ALIBI, True, False, True)


@gluon.jit
def _consumer1_kpm(o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, b, m0, h,
                   lse_off, seqlen_q, seqlen_k, alibi, qk_scale, kpm, CAUSAL: gl.constexpr, ALIBI: gl.constexpr):
    _consumer(1, o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, b, m0, h,
              lse_off, seqlen_q, seqlen_k, alibi, qk_scale, kpm, None, CAUSAL, ALIBI, True, False, True)


# The consumers of the bias variant (BIAS and SAFE literal, as for _consumer0_kpm).
@gluon.jit
def _consumer0_bias(o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, b, m0, h,
                    lse_off, seqlen_q, seqlen_k, alibi, qk_scale, bias, CAUSAL: gl.constexpr, ALIBI: gl.constexpr):
    _consumer(0, o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, b, m0, h,
              lse_off, seqlen_q, seqlen_k, alibi, qk_scale, None, bias, CAUSAL, ALIBI, False, True, True)


@gluon.jit
def _consumer1_bias(o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, b, m0, h,
                    lse_off, seqlen_q, seqlen_k, alibi, qk_scale, bias, CAUSAL: gl.constexpr, ALIBI: gl.constexpr):
    _consumer(1, o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, b, m0, h,
              lse_off, seqlen_q, seqlen_k, alibi, qk_scale, None, bias, CAUSAL, ALIBI, False, True, True)


@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k", "heads_per_section", "stride_kpm_b"])
def _hopper_attn_fwd(
    q_desc, k_desc, v_desc, o_desc,  # 4-D (batch, seqlen, heads, head dim) TMA descriptors
    lse_ptr,  # (batch, nheads, seqlen_q) fp32, contiguous
    alibi_ptr, stride_alibi,  # (batch or 1, nheads) fp32 slopes and their strides (batch stride 0 if shared); None without ALiBi
    kpm_ptr, stride_kpm_b,  # (batch, seqlen_k) uint8 key padding mask (nonzero = keep, unit last stride), batch stride; None without KPM
    bias_desc, inv_scale,  # 4-D (batch or 1, heads or 1, seqlen_q, seqlen_k) bias descriptor, 1 / softmax_scale (fp32); None without BIAS
    seqlen_q, seqlen_k, nheads, kv_group, heads_per_section, qk_scale,
    CAUSAL: gl.constexpr, ALIBI: gl.constexpr, KPM: gl.constexpr, P_WARPS: gl.constexpr, P_REGS: gl.constexpr,
    C_REGS: gl.constexpr, BIAS: gl.constexpr, BATCH_INNER: gl.constexpr = False,
):
    HM: gl.constexpr = q_desc.block_type.shape[1]
    D: gl.constexpr = q_desc.block_type.shape[3]
    BN: gl.constexpr = k_desc.block_type.shape[1]
    BM: gl.constexpr = 2 * HM
    gl.static_assert(k_desc.block_type.shape[3] == D, "K/V tiles have Q's head dim")
    gl.static_assert(BM % BN == 0 or BN % BM == 0, "the causal block range assumes nested tiles")
    n_m = (seqlen_q + BM - 1) // BM
    pid_m, b, h = _tile_coords(n_m, gl.num_programs(0) // n_m, nheads, heads_per_section, CAUSAL, BATCH_INNER)
    hk = h // kv_group  # GQA: query heads [g * kv_group, (g + 1) * kv_group) read k/v head g
    m0 = pid_m * BM
    lse_off = (b * nheads + h).to(gl.int64) * seqlen_q
    n_full, n_end = _block_range(m0, seqlen_q, seqlen_k, BM, BN, CAUSAL, KPM or BIAS)
    # The bias -slope * |i + sk - sq - j| is in units of the scaled score; the kernel adds it to
    # q.k, before the softmax multiplies by qk_scale = scale * log2(e). Under causal masking the
    # consumers read the slope themselves, after warp_specialize: a load here delays the
    # producer's first TMA loads in every CTA (ALiBi cost at 4k causal 9-10% -> 7%, measured on
    # the H200: docs/perf-notes.md, change 14). Without causal masking that measured 2 points
    # slower (12 -> 13-15%), so there the slope is read here and passed as a value.
    if CAUSAL:
        if ALIBI:
            alibi = alibi_ptr + b.to(gl.int64) * stride_alibi[0] + h * stride_alibi[1]
        else:
            alibi = lse_ptr  # a valid fp32 pointer that is never read (see _consumer)
    else:
        if ALIBI:
            L2E: gl.constexpr = 1.4426950408889634
            alibi = gl.load(alibi_ptr + b.to(gl.int64) * stride_alibi[0] + h * stride_alibi[1]) * (L2E / qk_scale)
        else:
            alibi = qk_scale * 0.0  # unused: _score_mod reads it only under ALIBI

    dtype: gl.constexpr = q_desc.dtype
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HM, D], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [2, HM, D], q_layout)
    if BIAS:
        # The bias ring (32 KB a stage) takes the stages' place: at d128, 2 K/V/bias stages
        # (2 * 96 KB + 32 KB of Q) fit the 227 KB where 3 do not; d64 keeps 3 (3 * 64 + 16 KB).
        NS: gl.constexpr = BIAS_STAGES_D128 if D == 128 else STAGES
        # n_full = 0 (_block_range), every key block masked as with KPM: the consumers run one key
        # loop instead of two (with both, ptxas spilled loop-invariant values at d128; the mask
        # is one select a score).
        k_smem = gl.allocate_shared_memory(dtype, [NS, BN, D], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [NS, BN, D], kv_layout)
        b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BN], dtype)
        b_smem = gl.allocate_shared_memory(dtype, [NS, BM, BN], b_layout)
        b_bar = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NS):
            mbarrier.init(b_bar.index(i), count=1)
        q_bar, k_bar, v_bar, empty_bar, turn_bar = _ring_barriers(NS)  # fences b_bar's init too
        producer_args = (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, n_end, b, m0, h, hk,
                         seqlen_q, bias_desc, b_smem, b_bar)
        consumer_args = (o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, b, m0,
                         h, lse_off, seqlen_q, seqlen_k, alibi, qk_scale, (b_smem, b_bar, inv_scale), CAUSAL, ALIBI)
        gl.warp_specialize([
            (_consumer0_bias, consumer_args),
            (_consumer1_bias, consumer_args),
            (_producer_bias, producer_args),
        ], [4, P_WARPS], [C_REGS, P_REGS])
    else:
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], kv_layout)
        q_bar, k_bar, v_bar, empty_bar, turn_bar = _ring_barriers(STAGES)

        producer_args = (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, n_end, b, m0, h, hk, seqlen_q)
        if KPM:
            kpm = (kpm_ptr, b.to(gl.int64) * stride_kpm_b)  # the mask and this sequence's row (see _kpm_words)
            consumer_args = (o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, b, m0,
                             h, lse_off, seqlen_q, seqlen_k, alibi, qk_scale, kpm, CAUSAL, ALIBI)
            gl.warp_specialize([
                (_consumer0_kpm, consumer_args),
                (_consumer1_kpm, consumer_args),
                (_producer, producer_args),
            ], [4, P_WARPS], [C_REGS, P_REGS])
        else:
            consumer_args = (o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, b, m0,
                             h, lse_off, seqlen_q, seqlen_k, alibi, qk_scale, CAUSAL, ALIBI)
            gl.warp_specialize([
                (_consumer0, consumer_args),
                (_consumer1, consumer_args),
                (_producer, producer_args),
            ], [4, P_WARPS], [C_REGS, P_REGS])


# --------------------------------------------------------------------------------------------
# Host
# --------------------------------------------------------------------------------------------

def _tma_ok(t: torch.Tensor) -> bool:
    """A (batch, seqlen, heads, head dim) tensor a TMA descriptor can address: unit last stride,
    16-byte aligned base and strides, no zero stride on a dim of more than one element (the
    stride of a dim of one element is never used: ``_unchecked_descriptor`` replaces it)."""
    size = t.element_size()
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    return all(n == 1 or (st > 0 and (st * size) % 16 == 0) for st, n in zip(t.stride()[:-1], t.shape[:-1]))


def on_sm90(t: torch.Tensor, capability=None) -> bool:
    """Whether the GPU is an sm_90 one: ``capability`` (major, minor) if given, else t's device
    (a CPU tensor: False)."""
    if capability is None:
        if t.device.type != "cuda":
            return False
        props = device_properties(t.device.index)
        capability = (props.major, props.minor)
    return tuple(capability) == (9, 0)


def plain_scores(key_padding_mask, varlen, features, causal) -> bool:
    """No key padding, varlen or score feature but causal masking (which may come as window
    (-1, 0)): what the Gluon kernels take (ALiBi and a bias tensor are each kernel's own choice
    (_bias_ok), and so is key padding: the forward checks a mask itself and passes None here)."""
    if varlen is not None or key_padding_mask is not None:
        return False
    left, right = features.window
    if left != -1 or right not in ((-1, 0) if causal else (-1,)):
        return False
    return features.softcap == 0 and features.sinks is None and features.dropout_p == 0 and features.attn_mask is None


def _kpm_ok(mask, batch, seqlen_k) -> bool:
    """A key padding mask the forward kernel reads: (batch, seqlen_k) uint8 (attn_fwd's bool mask
    viewed as bytes), unit last stride (any stride for one key); any batch stride."""
    if mask.dtype != torch.uint8 or mask.dim() != 2 or tuple(mask.shape) != (batch, seqlen_k):
        return False
    return mask.stride(1) == 1 or seqlen_k == 1


def _bias_ok(bias, q, seqlen_k) -> bool:
    """An additive bias (attn_fwd's rank-4 view broadcastable to (batch, nheads, seqlen_q,
    seqlen_k)) the BIAS variant reads by TMA: q's dtype, a real (seqlen_q, seqlen_k) plane
    (no row bias, no broadcast key dim) with unit key stride and a 16-byte aligned base and row
    stride; batch and head dims full size with 16-byte aligned strides, or broadcast (one
    element or stride 0: _bias_descriptor keeps one element of them)."""
    batch, seqlen_q, nheads, _ = q.shape
    if bias.dim() != 4 or bias.dtype != q.dtype or tuple(bias.shape[2:]) != (seqlen_q, seqlen_k):
        return False
    size = bias.element_size()
    if bias.stride(3) != 1 or bias.data_ptr() % 16:
        return False
    if seqlen_q > 1 and not (bias.stride(2) > 0 and (bias.stride(2) * size) % 16 == 0):
        return False
    for dim, full in ((0, batch), (1, nheads)):
        n, st = bias.shape[dim], bias.stride(dim)
        if n == 1 or st == 0:
            continue
        if n != full or st < 0 or (st * size) % 16:
            return False
    return True


def hopper_supports(q, k, v, out, bias, alibi_slopes, key_padding_mask, causal, softmax_scale, varlen, features,
                    capability=None) -> bool:
    """Whether ``hopper_fwd`` computes this ``attn_fwd`` call (same arguments, validated).
    ``capability``: the GPU's (major, minor); None asks q's device (CPU tensors: False)."""
    # The forward takes key padding or a bias (their own checks, below), not both;
    # plain_scores still refuses key padding for the backward's Gluon passes.
    if bias is not None and key_padding_mask is not None:
        return False
    if not on_sm90(q, capability) or not plain_scores(None, varlen, features, causal):
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.dtype not in GL_DTYPES or not (k.dtype == v.dtype == q.dtype):
        return False
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if head_dim not in HEAD_DIMS or k.shape[3] != head_dim or v.shape != k.shape or k.shape[0] != batch:
        return False
    if min(batch, seqlen_q, seqlen_k, nheads, nheads_k) < 1 or nheads % nheads_k:
        return False
    # The running max is taken on unscaled scores (scale folded into exp2): a negative scale would
    # turn it into a minimum and -inf masks into +inf. A tiny one is refused too (checked on the
    # host float, no slope read): qk_scale = scale * log2(e) must stay a normal fp32 number (0
    # would make the -inf mask 0 * -inf = NaN) and ALiBi's slope / scale finite for any slope
    # below MIN_SOFTMAX_SCALE * 3.4e38 (inf there would be inf * 0 = NaN on the diagonal).
    if not softmax_scale >= MIN_SOFTMAX_SCALE:
        return False
    # Every row must see key 0 (the kernel's running max starts from block 0): causal rows with
    # no visible key (seqlen_k < seqlen_q) take the tl kernel. With key padding too: the variant
    # is -inf-safe, but a CTA whose rows all lie before the diagonal would get n_end <= 0.
    if causal and seqlen_k < seqlen_q:
        return False
    if alibi_slopes is not None and (alibi_slopes.dtype != torch.float32 or alibi_slopes.dim() != 2):
        return False
    if key_padding_mask is not None and not _kpm_ok(key_padding_mask, batch, seqlen_k):
        return False
    if bias is not None and not _bias_ok(bias, q, seqlen_k):
        return False
    return all(_tma_ok(t) for t in (q, k, v) + ((out,) if out is not None else ()))


def _heads_per_l2_section(k, nheads) -> int:
    """(batch, head) pairs per causal scheduling section: as many k/v heads as fill half of L2
    (the other half for the Q/O streams), times the query heads that share each."""
    l2 = L2_BYTES_DEFAULT
    if k.is_cuda:
        l2 = device_properties(k.device.index).L2_cache_size
    kv_head_bytes = 2 * k.shape[1] * k.shape[3] * k.element_size()
    return max(1, (l2 // 2) // kv_head_bytes) * (nheads // k.shape[2])


@functools.cache
def _box_layout(rows: int, head_dim: int, dtype: torch.dtype):
    """The shared layout of a (1, rows, 1, head dim) box: that of the kernel's 2-D tile buffers
    (same swizzle). Asked once per shape (get_default_for costs ~8 us a call on the host)."""
    return gl.NVMMASharedLayout.get_default_for([1, rows, 1, head_dim], GL_DTYPES[dtype])


def _unchecked_descriptor(t, block_shape, layout):
    """A TensorDescriptor over the 4-D view t, boxes of ``block_shape``, zeros out of bounds. A
    dim of one element gets the stride it would have if t were contiguous from there in, rounded
    up to 16 bytes: torch gives such dims any stride (0 from an expand, 1 from a slice), which
    TMA could refuse (the kernels never step along them).

    Built without TensorDescriptor's constructor: its checks (rank, alignment, strides, block
    shape) are those ``hopper_supports`` made already (_tma_ok, _bias_ok, HEAD_DIMS, the fixed
    boxes), and they cost ~10 us a descriptor, four or five a call, on the host of a launch that
    is host-bound below ~0.3 ms of GPU time (benchmarks/experiments/hopper_host.py)."""
    strides = list(t.stride())
    align = 16 // t.element_size()
    for i in range(2, -1, -1):
        if t.shape[i] == 1:
            strides[i] = -(-strides[i + 1] * t.shape[i + 1] // align) * align
    desc = object.__new__(TensorDescriptor)
    desc.base, desc.shape, desc.strides = t, list(t.shape), strides
    desc.block_shape, desc.layout, desc.padding = block_shape, layout, "zero"
    return desc


def _descriptor(t, rows):
    """A 4-D descriptor over t (batch, seqlen, heads, head dim) with one (batch, head) box of
    ``rows`` rows (_unchecked_descriptor; the rounding is a no-op here: _tma_ok checked the
    strides)."""
    d = t.shape[3]
    return _unchecked_descriptor(t, [1, rows, 1, d], _box_layout(rows, d, t.dtype))


def _bias_descriptor(bias, dtype, rows=BLOCK_M, cols=BLOCK_N):
    """A 4-D descriptor over a bias _bias_ok accepted (or its gradient), (batch or 1, heads or 1,
    seqlen_q, seqlen_k), box (1, 1, rows, cols) (the forward's BLOCK_M x BLOCK_N tile by
    default): a broadcast batch or head dim sliced to one element (the kernel's coordinate there
    is 0), so that TMA never sees a zero stride; one-element dims as in _unchecked_descriptor."""
    if bias.stride(0) == 0:
        bias = bias[:1]
    if bias.stride(1) == 0:
        bias = bias[:, :1]
    return _unchecked_descriptor(bias, [1, 1, rows, cols], _bias_layout(dtype, rows, cols))


@functools.cache
def _bias_layout(dtype: torch.dtype, rows=BLOCK_M, cols=BLOCK_N):
    """The shared layout of a (1, 1, rows, cols) bias box: that of the kernels' bias buffers."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, cols], GL_DTYPES[dtype])


def _bias_shared_by_batches(bias, batch) -> bool:
    """Whether several batches read the same bias rows (batch dim of one element or stride 0):
    the kernel then schedules them side by side (_tile_coords, BATCH_INNER)."""
    return bias is not None and batch > 1 and (bias.shape[0] == 1 or bias.stride(0) == 0)


def hopper_fwd(q, k, v, alibi_slopes, causal, softmax_scale, out=None, key_padding_mask=None, bias=None):
    """(out, lse) as ``attn_fwd`` returns them, for a call ``hopper_supports`` accepted: out
    like q (or the given ``out``), lse (batch, nheads, seqlen_q) fp32, natural log.
    alibi_slopes: (1 or batch, nheads) fp32 or None; key_padding_mask: (batch, seqlen_k) uint8,
    nonzero = keep, unit last stride, or None; bias: a rank-4 view _bias_ok accepted (not with
    key padding), or None."""
    batch, seqlen_q, nheads, _ = q.shape
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty((batch, nheads, seqlen_q), device=q.device, dtype=torch.float32)
    stride_alibi = (0, 0)
    if alibi_slopes is not None:
        stride_alibi = (alibi_slopes.stride(0) if alibi_slopes.shape[0] > 1 else 0, alibi_slopes.stride(1))
    grid = (triton.cdiv(seqlen_q, BLOCK_M) * batch * nheads,)
    # A bias shared by the batches: their CTAs side by side; a causal section then holds
    # batches of one head (no GQA group factor: its pairs do not share K/V).
    batch_inner = _bias_shared_by_batches(bias, batch)
    _hopper_attn_fwd[grid](
        q_desc=_descriptor(q, HALF_M),
        k_desc=_descriptor(k, BLOCK_N),
        v_desc=_descriptor(v, BLOCK_N),
        o_desc=_descriptor(out, HALF_M),
        lse_ptr=lse,
        alibi_ptr=alibi_slopes,
        stride_alibi=stride_alibi,
        kpm_ptr=key_padding_mask,
        stride_kpm_b=None if key_padding_mask is None else key_padding_mask.stride(0),
        bias_desc=None if bias is None else _bias_descriptor(bias, q.dtype),
        inv_scale=None if bias is None else 1.0 / float(softmax_scale),
        seqlen_q=seqlen_q,
        seqlen_k=k.shape[1],
        nheads=nheads,
        kv_group=nheads // k.shape[2],
        heads_per_section=_heads_per_l2_section(k, k.shape[2] if batch_inner else nheads),
        qk_scale=float(softmax_scale) * LOG2E,
        CAUSAL=bool(causal),
        ALIBI=alibi_slopes is not None,
        KPM=key_padding_mask is not None,
        BIAS=bias is not None,
        BATCH_INNER=batch_inner,
        **WARP_SPECIALISED,
    )
    return out, lse
