"""Issue 15: a Gluon Hopper forward spike with FlashAttention-3's structure (NOT the library's path).

Scope: bf16, head dim 64 or 128, non-causal or causal (bottom-right aligned, seqlen_k >= seqlen_q),
GQA/MQA (nheads_k dividing nheads), optional in-kernel ALiBi (slopes (nheads,) fp32), no other
bias; q/k/v/out (batch, seqlen, heads, dim) contiguous, seqlen_q and seqlen_k multiples of 128;
returns out and lse (batch, heads, seqlen_q), natural log.

Structure (one CTA per 128 query rows of one (batch, head)):
- a producer partition (1 warp, 24 registers) loads the two 64-row Q halves once, then K and V
  tiles (BLOCK_N x head dim) by TMA into a STAGES-deep shared-memory ring; per stage a K-ready and
  a V-ready mbarrier (expect-tx) and an empty mbarrier (2 arrivals: one per consumer);
- two consumer warpgroups (the default partition and one 4-warp worker), each owning 64 query
  rows, with async wgmma for S = Q K^T (Q and K from shared memory) and O += P V (P from
  registers), online softmax (exp2, scale folded) in registers;
- in-warpgroup overlap as in FA3: iteration j issues S_j and then O += P_{j-1} V_{j-1}, waits
  for S_j only (wgmma wait 1), does the softmax of block j while the PV wgmma runs;
- PINGPONG=True: the two warpgroups take turns issuing their wgmmas (two mbarriers, one per
  warpgroup, alternately completed), so that one warpgroup's softmax overlaps the other's
  matmuls (FA3's warp-scheduler barriers; Gluon 3.6 has no named-barrier builtin, so mbarriers);
- causal: the CTA visits key blocks [0, n_end) only (up to its diagonal); blocks [1, n_full) run
  the unmasked step, [max(n_full, 1), n_end) the masked one (same step, MASK constexpr), block 0
  (peeled) is always masked; CTAs are ordered longest first (last query blocks first) within
  sections of heads whose K/V fit in L2;
- epilogue: O normalised, written through the warpgroup's own Q buffer and a TMA store.

Run every case on an H200 (one device call: the checks about 1 minute with a cold Triton cache,
the timings about 1 minute per sequence length):

    PYTHONPATH=src python benchmarks/experiments/gluon_fwd.py --all --check --bench

or one case: ``--headdim 64 --causal --gqa 4 --alibi --variants s3_pingpong --check --bench``.

Compile for sm_90a on a machine without a GPU (stand-in driver, compile-only; prints one JSON
line per case and variant: shared memory, registers, wgmma async, ptxas C7515, warps per
partition; every case unless a case flag is given):

    PYTHONPATH=src python benchmarks/experiments/gluon_fwd.py --compile-only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# The CTA order (longest first under causal) and the score mod are the library's, which grew out
# of this spike; both compile to the spike's own former PTX. The spike's only mask is the causal
# one (its lengths are tile multiples): _score_mod's CAUSAL=True flavour, with 0 for seqlen_k,
# which only the non-causal mask reads. _block_range stays the spike's own: the library's also
# handles partial key blocks and past-the-end query rows, a few more instructions per CTA.
# The section size of that CTA order is the library's too.
from tritonflash.kernels.hopper import _heads_per_l2_section, _ring_barriers, _score_mod, _tile_coords

BLOCK_M = 128  # query rows per CTA (two warpgroups x 64)
HALF_M = 64  # query rows per consumer warpgroup
# Keys per K/V tile, per head dim. d64 keeps 128: the S tile (and so the softmax work per key)
# is the same as d128's, and the ring has room for more stages instead.
BLOCK_N = {64: 128, 128: 128}
SM90_SHARED_LIMIT = 232448  # bytes per block on H100/H200
PRODUCER_WARPS = 1
PRODUCER_REGS = 24
CONSUMER_REGS = 240  # the worker consumer; the default partition keeps what setmaxnreg leaves
VARIANTS = {  # name: (STAGES, PINGPONG)
    "s2_pingpong": (2, True),
    "s2_free": (2, False),
    "s3_pingpong": (3, True),
    "s4_pingpong": (4, True),  # d64 only (d128: 4 stages of K and V do not fit in shared memory)
}
LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class Case:
    """One compiled kernel family of the spike: what the constexprs and the head counts cover."""

    head_dim: int = 128
    causal: bool = False
    gqa: int = 1  # query heads per k/v head
    alibi: bool = False

    @property
    def name(self) -> str:
        return f"d{self.head_dim}" + ("_causal" if self.causal else "") + (f"_gqa{self.gqa}" if self.gqa > 1 else "") + \
            ("_alibi" if self.alibi else "")


# Every case with the variants it is compiled, checked and timed with: the three measured
# variants for the measured case, the best of them (s3_pingpong) for the new d128 cases, and
# for d64 also 4 stages (a stage is half as big).
CASES = {
    Case(): ("s2_pingpong", "s2_free", "s3_pingpong"),
    Case(causal=True): ("s3_pingpong",),
    Case(gqa=4): ("s3_pingpong",),
    Case(causal=True, gqa=4): ("s3_pingpong",),
    Case(causal=True, alibi=True): ("s3_pingpong",),
    Case(alibi=True): ("s3_pingpong",),
    Case(head_dim=64): ("s3_pingpong", "s4_pingpong"),
    Case(head_dim=64, causal=True): ("s3_pingpong", "s4_pingpong"),
}


def shared_bytes(head_dim: int, stages: int) -> int:
    """Shared memory of one CTA: the two Q halves, STAGES K and V tiles, the mbarriers."""
    bars = 8 * (1 + 3 * stages + 2)
    return 2 * (BLOCK_M * head_dim + 2 * stages * BLOCK_N[head_dim] * head_dim) + bars


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------
#
# Barrier phases. Every wait in the kernel has a parity that is a function of the GLOBAL key
# block index j only: stage j % STAGES, K/V-ready parity (j // STAGES) & 1, empty parity
# ((j // STAGES) & 1) ^ 1 for the producer, turn parity (j + 1 - WG) & 1. The producer walks
# j = 0 .. n_end - 1; each consumer walks j = 0 (peeled), then [1, n_full) unmasked, then
# [max(n_full, 1), n_end) masked: the same j sequence, in order, each j once, so the causal split
# changes no barrier's arrival count or phase relative to the non-causal kernel with
# seqlen_k = n_end * BLOCK_N (which was run on an H200). n_end is computed once per CTA before
# warp_specialize and is the same for the producer and both consumers (the two warpgroups of a
# CTA must visit the same blocks: the empty barriers count 2 arrivals and the turn barriers
# alternate); the rows a warpgroup must not see in a block are removed by the mask, not by a
# shorter loop.


@gluon.jit
def _block_range(m0, seqlen_q, seqlen_k, BM: gl.constexpr, BN: gl.constexpr, CAUSAL: gl.constexpr):
    """(n_full, n_end) for the BM query rows from m0: key blocks [0, n_full) are visible to every
    row (no mask), [n_full, n_end) partly (masked), blocks from n_end on to none (skipped)."""
    n_end = seqlen_k // BN
    n_full = n_end
    if CAUSAL:
        # Query i sees key j iff j <= i + seqlen_k - seqlen_q: the last row's limit bounds the
        # range, the first row's limit the unmasked part.
        off = seqlen_k - seqlen_q
        n_end = gl.minimum(n_end, (m0 + BM + off + BN - 1) // BN)
        n_full = gl.minimum(n_end, (m0 + off + 1) // BN)
    return n_full, n_end


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, n_end, q_row, kv_row, q_col,
              kv_col, STAGES: gl.constexpr):
    HM: gl.constexpr = q_desc.block_type.shape[0]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [q_row + HM, q_col], q_bar, q_smem.index(1))
    for j in range(n_end):
        s = j % STAGES
        # Fresh barrier: waiting for parity 1 passes at once (the producer starts one phase ahead).
        mbarrier.wait(empty_bar.index(s), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(k_bar.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + j * BN, kv_col], k_bar.index(s), k_smem.index(s))
        mbarrier.expect(v_bar.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [kv_row + j * BN, kv_col], v_bar.index(s), v_smem.index(s))


@gluon.jit
def _kv_step(j, WG: gl.constexpr, q, kv_smem, bars, acc, p, m_i, l_i, s_zero, row0, alibi_c, qk_scale, STAGES: gl.constexpr,
             PINGPONG: gl.constexpr, ALIBI: gl.constexpr, MASK: gl.constexpr):
    """Key block j >= 1 of one consumer warpgroup: S_j = Q K_j^T and O += P_{j-1} V_{j-1} issued
    back to back, softmax of S_j while the PV wgmma runs. Returns (acc, p, m_i, l_i) with p the
    probabilities of block j (its PV is the next step's, or the epilogue's)."""
    k_smem, v_smem = kv_smem
    k_bar, v_bar, empty_bar, turn_bar = bars
    BN: gl.constexpr = k_smem.shape[1]
    o_layout: gl.constexpr = acc.type.layout
    p_layout: gl.constexpr = p.type.layout
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    s = j % STAGES
    ph = (j // STAGES) & 1
    sp = (j - 1) % STAGES  # stage of block j - 1
    php = ((j - 1) // STAGES) & 1
    mbarrier.wait(k_bar.index(s), ph)
    if PINGPONG:
        # Turn j of this warpgroup: WG0 starts, WG1 waits for WG0's issue of the same block.
        mbarrier.wait(turn_bar.index(WG), (j + 1 - WG) & 1)
    s_tok = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.wait(v_bar.index(sp), php)
    acc_tok = warpgroup_mma(p, v_smem.index(sp), acc, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn_bar.index(1 - WG), count=1)
    # S_j done; the PV wgmma issued after it may still run (wgmma groups complete in order).
    sc = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
    sc = _score_mod(sc, j * BN, row0, 0, alibi_c, MASK, True, ALIBI, False)
    # m_i is finite (block 0 gives every row a visible key), so a row that sees no key of block j
    # gets m_new = m_i, pf = exp2(-inf) = 0 and alpha = 1, never a NaN.
    m_new = gl.maximum(m_i, gl.max(sc, axis=1) * qk_scale)
    pf = gl.exp2(sc * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(pf, axis=1)
    m_i = m_new
    p_next = gl.convert_layout(pf.to(gl.bfloat16), p_layout)
    acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok, p))
    gl.thread_barrier()  # every warp of the group is past its wait before the stage is released
    mbarrier.arrive(empty_bar.index(sp), count=1)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
    return acc, p_next, m_i, l_i


@gluon.jit
def _consumer(WG: gl.constexpr, q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr,
              n_full, n_end, q_row, q_col, lse_off, row0, alibi_c, qk_scale, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
              CAUSAL: gl.constexpr, ALIBI: gl.constexpr):
    HM: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    BN: gl.constexpr = k_smem.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    q = q_smem.index(WG)
    row0 = row0 + WG * HM  # i + seqlen_k - seqlen_q of this warpgroup's first row
    acc = gl.zeros([HM, D], gl.float32, o_layout)
    s_zero = gl.zeros([HM, BN], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)

    # Block 0 (peeled: an async wgmma token cannot flow through an if/else in Gluon 3.6). Under
    # CAUSAL it is always masked: it is the diagonal block of the first query blocks, and the
    # mask is exact (all-true) for the others. Every row sees key 0 (seqlen_k >= seqlen_q), so
    # m_i is finite from here on.
    mbarrier.wait(k_bar.index(0), 0)
    if PINGPONG:
        mbarrier.wait(turn_bar.index(WG), (1 - WG) & 1)
    s_tok = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn_bar.index(1 - WG), count=1)
    sc = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
    sc = _score_mod(sc, 0, row0, 0, alibi_c, CAUSAL, True, ALIBI, False)
    m_i = gl.max(sc, axis=1) * qk_scale
    pf = gl.exp2(sc * qk_scale - gl.expand_dims(m_i, 1))
    l_i = gl.sum(pf, axis=1)
    p = gl.convert_layout(pf.to(gl.bfloat16), p_layout)

    kv_smem = (k_smem, v_smem)
    bars = (k_bar, v_bar, empty_bar, turn_bar)
    # Blocks below the diagonal (all of them when not CAUSAL), then the diagonal blocks; see the
    # note on barrier phases above: both loops index by the global j.
    for j in range(1, n_full):
        acc, p, m_i, l_i = _kv_step(j, WG, q, kv_smem, bars, acc, p, m_i, l_i, s_zero, row0, alibi_c, qk_scale, STAGES,
                                    PINGPONG, ALIBI, False)
    if CAUSAL:
        for j in range(gl.maximum(n_full, 1), n_end):
            acc, p, m_i, l_i = _kv_step(j, WG, q, kv_smem, bars, acc, p, m_i, l_i, s_zero, row0, alibi_c, qk_scale, STAGES,
                                        PINGPONG, ALIBI, True)

    # Last block's PV.
    sl = (n_end - 1) % STAGES
    mbarrier.wait(v_bar.index(sl), ((n_end - 1) // STAGES) & 1)
    acc = warpgroup_mma(p, v_smem.index(sl), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

    l_o = gl.convert_layout(l_i, row_o)
    out = acc / gl.expand_dims(l_o, 1)
    LN2: gl.constexpr = 0.6931471805599453
    lse = (m_i + gl.log2(l_i)) * LN2
    rows = gl.arange(0, HM, layout=row_s)
    gl.store(lse_ptr + lse_off + WG * HM + rows, lse)
    # Q of this warpgroup is no longer read: reuse its buffer to stage O for the TMA store.
    q.store(out.to(gl.bfloat16))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row + WG * HM, q_col], q)
    tma.store_wait(pendings=0)


@gluon.jit
def _consumer0(q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, q_row,
               q_col, lse_off, row0, alibi_c, qk_scale, STAGES: gl.constexpr, PINGPONG: gl.constexpr, CAUSAL: gl.constexpr,
               ALIBI: gl.constexpr):
    _consumer(0, q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, q_row,
              q_col, lse_off, row0, alibi_c, qk_scale, STAGES, PINGPONG, CAUSAL, ALIBI)


@gluon.jit
def _consumer1(q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, q_row,
               q_col, lse_off, row0, alibi_c, qk_scale, STAGES: gl.constexpr, PINGPONG: gl.constexpr, CAUSAL: gl.constexpr,
               ALIBI: gl.constexpr):
    _consumer(1, q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end, q_row,
              q_col, lse_off, row0, alibi_c, qk_scale, STAGES, PINGPONG, CAUSAL, ALIBI)


@gluon.jit(do_not_specialize=["heads_per_section"])
def gluon_attn_fwd(q_desc, k_desc, v_desc, o_desc, lse_ptr, alibi_ptr, seqlen_q, seqlen_k, nheads, group, heads_per_section,
                   qk_scale, STAGES: gl.constexpr, PINGPONG: gl.constexpr, CAUSAL: gl.constexpr, ALIBI: gl.constexpr,
                   P_WARPS: gl.constexpr, P_REGS: gl.constexpr, C_REGS: gl.constexpr):
    HM: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    BM: gl.constexpr = 2 * HM
    gl.static_assert(k_desc.block_type.shape[1] == D, "K/V tiles have Q's head dim")
    gl.static_assert(BM % BN == 0 or BN % BM == 0, "the causal block range assumes nested tiles")
    n_m = seqlen_q // BM
    pid_m, b, h = _tile_coords(n_m, gl.num_programs(0) // n_m, nheads, heads_per_section, CAUSAL, False)
    m0 = pid_m * BM
    q_row = b * seqlen_q + m0  # rows of the (batch * seqlen, heads * dim) views
    kv_row = b * seqlen_k
    q_col = h * D
    kv_col = (h // group) * D  # GQA: query heads [g * group, (g + 1) * group) read k/v head g
    lse_off = (b * nheads + h).to(gl.int64) * seqlen_q + m0
    row0 = m0 + seqlen_k - seqlen_q
    n_full, n_end = _block_range(m0, seqlen_q, seqlen_k, BM, BN, CAUSAL)
    if ALIBI:
        # The bias -slope * |i + sk - sq - j| is in units of the scaled score; the kernel adds it
        # to q.k before the softmax multiplies by qk_scale = scale * log2(e).
        L2E: gl.constexpr = 1.4426950408889634
        alibi_c = gl.load(alibi_ptr + h) * (L2E / qk_scale)
    else:
        alibi_c = qk_scale * 0.0  # unused: _score_mod reads it only under ALIBI

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, HM, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BN, D], v_desc.layout)
    q_bar, k_bar, v_bar, empty_bar, turn_bar = _ring_barriers(STAGES)

    consumer_args = (q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, turn_bar, lse_ptr, n_full, n_end,
                     q_row, q_col, lse_off, row0, alibi_c, qk_scale, STAGES, PINGPONG, CAUSAL, ALIBI)
    gl.warp_specialize([
        (_consumer0, consumer_args),
        (_consumer1, consumer_args),
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, n_end, q_row, kv_row,
                     q_col, kv_col, STAGES)),
    ], [4, P_WARPS], [C_REGS, P_REGS])


# --------------------------------------------------------------------------------------------
# Host
# --------------------------------------------------------------------------------------------

def _descriptors(q, k, v, out):
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    bn = BLOCK_N[d]
    q_layout = gl.NVMMASharedLayout.get_default_for([HALF_M, d], gl.bfloat16)
    kv_layout = gl.NVMMASharedLayout.get_default_for([bn, d], gl.bfloat16)

    def desc(t, rows, heads, block, layout):
        return TensorDescriptor(t, [rows, heads * d], [heads * d, 1], block, layout)

    return (desc(q, b * sq, h, [HALF_M, d], q_layout), desc(k, b * sk, hk, [bn, d], kv_layout),
            desc(v, b * sk, hk, [bn, d], kv_layout), desc(out, b * sq, h, [HALF_M, d], q_layout))


def check_supported(q, k, v, causal, alibi_slopes, variant):
    b, sq, h, d = q.shape
    problems = []
    if q.dtype != torch.bfloat16 or k.dtype != q.dtype or v.dtype != q.dtype:
        problems.append("bf16 only")
    if d not in BLOCK_N or k.shape[-1] != d or v.shape[-1] != d:
        problems.append(f"head dim in {sorted(BLOCK_N)} only, the same for q, k and v")
    if v.shape != k.shape or k.shape[0] != b or h % k.shape[2]:
        problems.append(f"nheads ({h}) a multiple of nheads_k ({k.shape[2]}), k and v of one shape, same batch")
    if sq % BLOCK_M or k.shape[1] % BLOCK_N.get(d, 128):
        problems.append(f"seqlen_q % {BLOCK_M} == 0 and seqlen_k % {BLOCK_N.get(d, 128)} == 0 only")
    if causal and k.shape[1] < sq:
        problems.append("causal needs seqlen_k >= seqlen_q (rows that see no key are not handled)")
    if alibi_slopes is not None and (alibi_slopes.shape != (h,) or alibi_slopes.dtype != torch.float32):
        problems.append(f"alibi_slopes ({h},) fp32 only")
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        problems.append("contiguous (batch, seqlen, heads, dim) only")
    if variant not in VARIANTS:
        problems.append(f"variant one of {list(VARIANTS)}")
    elif d in BLOCK_N and shared_bytes(d, VARIANTS[variant][0]) > SM90_SHARED_LIMIT:
        problems.append(f"{variant} needs {shared_bytes(d, VARIANTS[variant][0])} bytes of shared memory at d{d}")
    if problems:
        raise ValueError("gluon spike: " + "; ".join(problems))


def gluon_attention(q, k, v, softmax_scale=None, causal=False, alibi_slopes=None, variant="s3_pingpong", warmup=False):
    """(out, lse) for the spike's cases; warmup=True compiles only (no launch) and returns the kernel."""
    check_supported(q, k, v, causal, alibi_slopes, variant)
    b, sq, h, d = q.shape
    stages, pingpong = VARIANTS[variant]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    qd, kd, vd, od = _descriptors(q, k, v, out)
    grid = (sq // BLOCK_M * b * h,)
    meta = dict(STAGES=stages, PINGPONG=pingpong, CAUSAL=causal, ALIBI=alibi_slopes is not None, P_WARPS=PRODUCER_WARPS,
                P_REGS=PRODUCER_REGS, C_REGS=CONSUMER_REGS, num_warps=4)
    args = dict(q_desc=qd, k_desc=kd, v_desc=vd, o_desc=od, lse_ptr=lse, alibi_ptr=alibi_slopes, seqlen_q=sq,
                seqlen_k=k.shape[1], nheads=h, group=h // k.shape[2], heads_per_section=_heads_per_l2_section(k, h),
                qk_scale=scale * LOG2E)
    if warmup:
        return gluon_attn_fwd.warmup(**args, grid=grid, **meta)
    gluon_attn_fwd[grid](**args, **meta)
    return out, lse


# --------------------------------------------------------------------------------------------
# Compile-only on a machine without a GPU (sm_90a through a stand-in driver)
# --------------------------------------------------------------------------------------------

def _install_sm90_stand_in_driver():
    """The tests' stand-in sm_90 driver (tests/sm90_compile.py): importing it makes Triton target
    sm_90 without a GPU, and every JIT launch compile-only (this script only warms up)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    import sm90_compile  # noqa: F401


def compile_facts(kernel) -> dict:
    """Facts from one compiled kernel: shared memory, registers (ptxas -v on its PTX for sm_90a),
    async wgmma, ptxas C7515 (wgmma serialised), warps per partition and their register requests."""
    import sm90_compile  # on sys.path since _install_sm90_stand_in_driver

    ptx = kernel.asm["ptx"]
    ttgir = kernel.asm.get("ttgir", "")
    rc, log, sass = sm90_compile.run_ptxas(ptx, sass=True)
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores", log)
    ws = re.findall(r"partition\d+\(.*?\) num_warps\((\d+)\)", ttgir)
    req = re.search(r"requestedRegisters = array<i32: ([\d, ]+)>", ttgir)
    return {
        "shared": kernel.metadata.shared,
        "total_warps": kernel.metadata.num_warps,  # with the warpgroup padding of the worker partitions
        "default_partition_warps": 4,
        "worker_warps": [int(x) for x in ws],
        "requested_regs": [int(x) for x in req.group(1).split(",")] if req else None,
        "setmaxnreg": [f"{a} {n}" for a, n in re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)],
        "ptxas_regs": int(regs[0]) if regs else None,
        "spill_stores": int(spill[0]) if spill else None,
        "wgmma_async": "wgmma.mma_async" in ptx,
        "wgmma_count": ptx.count("wgmma.mma_async"),
        "wgmma_wait_groups": sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx))),
        "tma_copies": ptx.count("cp.async.bulk.tensor"),
        "sass_hgmma": sass.count("HGMMA") if sass else None,
        "sass_local_mem": len(re.findall(r"\b(?:LDL|STL)\b", sass)) if sass else None,
        "c7515": "C7515" in log,
        "ptxas_rc": rc,
        "ptxas_warnings": [line for line in log.splitlines() if "warning" in line.lower()][:5],
    }


def make_inputs(case: Case, b, seqlen_q, seqlen_k, nheads_k, device, make=torch.randn):
    """q, k, v (bf16) and the ALiBi slopes (or None) of one case; nheads = nheads_k * case.gqa."""
    h = nheads_k * case.gqa
    q = make(b, seqlen_q, h, case.head_dim, device=device, dtype=torch.bfloat16)
    k, v = (make(b, seqlen_k, nheads_k, case.head_dim, device=device, dtype=torch.bfloat16) for _ in range(2))
    # The usual geometric ALiBi slopes 2^(-8 i / h), i = 1 .. h.
    slopes = torch.exp2(-8.0 * torch.arange(1, h + 1, device=device, dtype=torch.float32) / h) if case.alibi else None
    return q, k, v, slopes


def compile_only(plan) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    _install_sm90_stand_in_driver()
    bad = 0
    for case, variants in plan:
        q, k, v, slopes = make_inputs(case, 1, 256, 256, 2, "cpu", make=torch.empty)
        for name in variants:
            t0 = time.time()
            try:
                kernel = gluon_attention(q, k, v, causal=case.causal, alibi_slopes=slopes, variant=name, warmup=True)
                row = {"case": case.name, "variant": name, **compile_facts(kernel)}
            except Exception as e:  # noqa: BLE001 - reported as a row
                bad += 1
                row = {"case": case.name, "variant": name, "error": f"{type(e).__name__}: {e}"[-3000:]}
            row["compile_s"] = round(time.time() - t0, 1)
            print(json.dumps(row), flush=True)
    return bad


# --------------------------------------------------------------------------------------------
# GPU: correctness (docs/testing.md's rule) and timing against the library and cuDNN
# --------------------------------------------------------------------------------------------

# (batch, seqlen_q, seqlen_k, nheads_k) of the correctness check; nheads = nheads_k * gqa.
# The last shape has seqlen_k > seqlen_q: the bottom-right causal offset and a partly visible
# last key block for some rows.
CHECK_SHAPES = ((2, 1024, 1024, 2), (1, 2048, 2048, 3), (1, 1024, 2048, 2))


def _err_budget(x, x_ref, x_pt, factor=2.0):
    xr = x_ref.float()
    err = (x.float() - xr).abs().max().item()
    err_pt = (x_pt.float() - xr).abs().max().item()
    ref_lp = x_ref.to(x.dtype)
    floor = 2 * ((ref_lp + 0.3 - 0.3).float() - ref_lp.float()).abs().max().item()
    ok = bool(torch.isfinite(x).all()) and err <= factor * err_pt + floor
    return ok, err, factor * err_pt + floor


def check(plan) -> bool:
    from tritonflash.reference import attention_ref

    torch.manual_seed(0)
    all_ok = True
    for case, variants in plan:
        for b, sq, sk, hk in CHECK_SHAPES:
            q, k, v, slopes = make_inputs(case, b, sq, sk, hk, "cuda")
            kw = dict(causal=case.causal, alibi_slopes=slopes, return_lse=True)
            out_ref, lse_ref = attention_ref(q, k, v, upcast=True, **kw)
            out_pt, lse_pt = attention_ref(q, k, v, upcast=False, reorder_ops=True, **kw)
            label = f"{case.name}/{{}} b{b} sq{sq} sk{sk} h{q.shape[2]} hk{hk}"
            for name in variants:
                try:
                    out, lse = gluon_attention(q, k, v, causal=case.causal, alibi_slopes=slopes, variant=name)
                    torch.cuda.synchronize()
                    ok_o, err_o, bud_o = _err_budget(out, out_ref, out_pt)
                    ok_l, err_l, bud_l = _err_budget(lse, lse_ref, lse_pt)
                    ok = ok_o and ok_l
                    print(f"CHECK {label.format(name)}: {'PASS' if ok else 'FAIL'}  out err {err_o:.3g} (budget {bud_o:.3g}), "
                          f"lse err {err_l:.3g} (budget {bud_l:.3g})", flush=True)
                except Exception as e:  # noqa: BLE001 - a broken spike is a result, not a crash
                    ok = False
                    print(f"CHECK {label.format(name)}: ERROR {type(e).__name__}: {str(e)[:1500]}", flush=True)
                    if "illegal" in str(e).lower() or "CUDA error" in str(e):
                        print("CHECK: CUDA context is poisoned; stopping the run here", flush=True)
                        raise SystemExit(3) from e
                all_ok &= ok
            del q, k, v, out_ref, out_pt
    return all_ok


def _provenance() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"cuDNN {torch.backends.cudnn.version()}, commit {commit}")


def bench(plan, seqlens, tokens, nheads) -> None:
    print(f"BENCH {_provenance()}", flush=True)
    for case, variants in plan:
        print(f"BENCH {case.name}: bf16, heads {nheads} (k/v heads {nheads // case.gqa}), batch*seqlen = {tokens}; "
              f"TFLOP/s (do_bench median{', causal counted as half the FLOPs' if case.causal else ''})", flush=True)
        for s in seqlens:
            _bench_one(case, variants, s, max(1, tokens // s), nheads)
            torch.cuda.empty_cache()


def _bench_one(case: Case, variants, s, b, nheads) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import tritonflash

    q, k, v, slopes = make_inputs(case, b, s, s, nheads // case.gqa, "cuda")
    flops = 4 * b * nheads * s * s * case.head_dim // (2 if case.causal else 1)
    # cuDNN gets k/v expanded to nheads (expanded outside the timing) and no ALiBi (a dense
    # (h, s, s) bias would be a different kernel); its row is named after what it ran.
    k_x, v_x = (t.repeat_interleave(case.gqa, dim=2).transpose(1, 2) for t in (k, v))
    q_t = q.transpose(1, 2)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q_t, k_x, v_x, is_causal=case.causal)

    cudnn_name = "sdpa_cudnn" + ("_kv_expanded" if case.gqa > 1 else "") + ("_no_alibi" if case.alibi else "")
    runners = {"tritonflash": lambda: tritonflash.flash_attn_func(q, k, v, causal=case.causal, alibi_slopes=slopes),
               cudnn_name: cudnn}
    for name in variants:
        runners[f"gluon_{name}"] = (lambda n: lambda: gluon_attention(q, k, v, causal=case.causal, alibi_slopes=slopes,
                                                                      variant=n))(name)
    res = {}
    for name, fn in runners.items():
        try:
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            res[name] = flops / (ms * 1e-3) / 1e12
        except Exception as e:  # noqa: BLE001
            res[name] = None
            print(f"BENCH {case.name} s{s} {name}: ERROR {type(e).__name__}: {str(e)[:500]}", flush=True)
    cud, tf = res.get(cudnn_name), res.get("tritonflash")
    for name, t in res.items():
        if t is None:
            continue
        ratios = []
        if cud:
            ratios.append(f"x cuDNN {t / cud:.3f}")
        if tf:
            ratios.append(f"x tritonflash {t / tf:.3f}")
        print(f"BENCH {case.name} s{s} b{b} h{nheads} {name:28s} {t:7.1f} TFLOP/s  " + "  ".join(ratios), flush=True)


def _plan(a, ap):
    """[(case, variants)] the command line asks for: every case with --all (or a bare
    --compile-only), else the one case of --headdim/--causal/--gqa/--alibi."""
    only = [x for x in a.variants.split(",") if x] if a.variants else None
    if only and set(only) - set(VARIANTS):
        ap.error(f"unknown variant(s) {sorted(set(only) - set(VARIANTS))}; known: {list(VARIANTS)}")
    one = Case(head_dim=a.headdim, causal=a.causal, gqa=a.gqa, alibi=a.alibi)
    if a.gqa < 1:
        ap.error("--gqa is the number of query heads per k/v head, >= 1")
    if a.all or (a.compile_only and one == Case() and only is None):
        plan = [(case, tuple(v for v in variants if only is None or v in only)) for case, variants in CASES.items()]
        return [(case, variants) for case, variants in plan if variants]
    if only is None:
        only = CASES.get(one) or [v for v, (st, _) in VARIANTS.items() if shared_bytes(a.headdim, st) <= SM90_SHARED_LIMIT]
    return [(one, tuple(only))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with attention_ref (docs/testing.md's rule) on the GPU")
    ap.add_argument("--bench", action="store_true", help="time against tritonflash and SDPA cuDNN on the GPU")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile for sm_90a through a stand-in driver (no GPU); every case unless a case flag is given")
    ap.add_argument("--all", action="store_true", help=f"every case: {[c.name for c in CASES]}")
    ap.add_argument("--headdim", type=int, choices=sorted(BLOCK_N), default=128)
    ap.add_argument("--causal", action="store_true", help="causal, bottom-right aligned")
    ap.add_argument("--gqa", type=int, default=1, help="query heads per k/v head (1: MHA)")
    ap.add_argument("--alibi", action="store_true", help="in-kernel ALiBi, slopes 2^(-8 i / nheads)")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated subset of {list(VARIANTS)} (default: the case's variants in CASES)")
    ap.add_argument("--seqlens", default="4096,8192,16384")
    ap.add_argument("--tokens", type=int, default=32768, help="batch * seqlen per case")
    ap.add_argument("--nheads", type=int, default=16)
    a = ap.parse_args(argv)
    plan = _plan(a, ap)
    if a.compile_only:
        return 1 if compile_only(plan) else 0
    if not (a.check or a.bench):
        ap.error("give --check and/or --bench (GPU), or --compile-only")
    if any(a.nheads % case.gqa for case, _ in plan):
        ap.error(f"--nheads {a.nheads} must be a multiple of every case's --gqa")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("needs an sm_90 GPU (H100/H200)", flush=True)
        return 2
    # Compile every case and variant first (one launch on one query block, so n_end = 1 and under
    # causal n_full = 0), so that a compile failure is reported and the others still run.
    usable = []
    for case, variants in plan:
        q, k, v, slopes = make_inputs(case, 1, BLOCK_M, BLOCK_M, 1, "cuda")
        ok_variants = []
        for name in variants:
            t0 = time.time()
            print(f"COMPILE {case.name}/{name}: compiling and launching once (a hang here is a barrier deadlock)", flush=True)
            try:
                gluon_attention(q, k, v, causal=case.causal, alibi_slopes=slopes, variant=name)
                torch.cuda.synchronize()
                ok_variants.append(name)
                print(f"COMPILE {case.name}/{name}: ok in {time.time() - t0:.1f} s", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"COMPILE {case.name}/{name}: FAILED {type(e).__name__}: {str(e)[:2000]}", flush=True)
                traceback.print_exc()
                if "illegal" in str(e).lower():
                    return 3
        if ok_variants:
            usable.append((case, tuple(ok_variants)))
    ok = True
    if a.check:
        ok = check(usable)
        print(f"CHECK overall: {'PASS' if ok else 'FAIL (timings below are of a wrong kernel)'}", flush=True)
    if a.bench:
        bench(usable, [int(s) for s in a.seqlens.split(",")], a.tokens, a.nheads)
    n_asked = sum(len(v) for _, v in plan)
    return 0 if ok and sum(len(v) for _, v in usable) == n_asked else 1


if __name__ == "__main__":
    sys.exit(main())
