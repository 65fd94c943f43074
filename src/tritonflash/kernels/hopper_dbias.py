"""Hopper (sm_90) bias-gradient pass in Gluon, warp-specialised and persistent (issue 15, item
3). ``attn_bwd`` runs it by default (``backward._hopper_dbias_module``; ``TRITONFLASH_HOPPER_DBIAS=0``
turns it off) for the calls ``hopper_dbias_supports`` accepts: 1.1-1.9x the ``tl`` pass on an
H200 (docs/perf-notes.md, change 20).

It computes what ``backward._attn_bwd_dbias`` computes for a bias with a row dimension: dbias =
dS = P * (dP - delta) summed over the bias's broadcast batch and head dims, P = exp(scale * q.k +
bias - lse), dP = dO V^T, delta = rowsum(dO * O); deterministically (each CTA owns its dbias tile
and adds the summed slices in one order, no atomics). The ``tl`` pass holds 64 x 64 tiles (larger
ones spill) and is bound by L2-to-SM traffic: it streams Q, dO, K and V for every summed slice.

Structure (a tile is 128 query rows x BN keys of one dbias slice; BN = 128 at d64, 64 at d128,
where shared memory allows 2 stages; one CTA per SM walks the tiles, ``_dbias_tile``):
- a producer warp loads each tile's bias (two 64-row halves) into one of two bias buffers, then
  for every summed (batch, head) the two 64-row halves of Q and dO and the BN rows of K and V by
  TMA into a 2-stage ring (a ready barrier with expect-tx, an empty barrier with one arrival per
  consumer); ring and buffers run on from one tile to the next;
- two consumer warpgroups, each owning 64 query rows, issue S = Q K^T and dP = dO V^T back to back
  (async wgmma, both operands in shared memory), compute P from S while dP runs (the bias read
  from shared memory in the accumulator layout every step), and add P * (dP - delta) to an fp32
  sum in registers. No matmul uses P or dS: a warpgroup holds three [64, BN] fp32 tiles (S, dP,
  the sum). Under causal masking the mask is folded into the warpgroup's bias half once, as -inf
  (which also drops a NaN or +inf bias at a hidden key), P is 0 there whatever S is and dS is 0
  wherever P is (so a NaN or inf in a hidden key's K or V does not reach the sum); a tile no row
  sees gets zeros, no loop and no bias load;
- epilogue: the sum in the bias dtype, staged in the warpgroup's bias half, stored by TMA; the
  buffer is released for the tile after next once the store has read it.

Ragged ends. Q/dO rows past seqlen_q are zero-filled and their lse is read as +inf (delta 0), so
P = 0 there; a 64-row half wholly past seqlen_q is neither loaded nor stored (its warpgroup
computes on whatever the buffers hold, in step with the other, and its rows are never stored).
Keys past seqlen_k read zeros; their columns are clipped by the TMA store. A row with no visible
key (lse -inf) gets P = 0, as the tl pass gives.
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

from .hopper import LOG2E, WARP_SPECIALISED, _bias_descriptor, _bias_ok, _descriptor, _tma_box, on_sm90, plain_scores
from .hopper_bwd import _stream_barriers, backward_operands_ok

HALF_M = 64  # query rows per consumer warpgroup; a CTA has two
BLOCK_M = 2 * HALF_M
STAGES = gl.constexpr(2)  # ring stages: d128 holds 2 x 96 KB of Q/dO/K/V + the 16 KB bias tile


BIAS_BUFFERS = 2  # a tile's bias loads while the tile before is summed: 2 x 32 KB at d64, 2 x 16 KB at d128
SM_COUNT_COMPILE_ONLY = 132  # H100 SXM / H200: the grid of a compile-only run (CPU tensors)


def _sm_count(device) -> int:
    """The persistent grid's size: one CTA per SM (its shared memory allows no second)."""
    if device.type != "cuda":
        return SM_COUNT_COMPILE_ONLY
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def block_n(head_dim: int) -> int:
    """Keys per CTA: 128 at d64 (2 x 64 KB stages + a 32 KB bias tile), 64 at d128 (shared memory)."""
    return 128 if head_dim <= 64 else 64


@gluon.jit
def _dbias_tile(base, n_n, n_m, n_tiles, dbias_heads, n_steps_all, seqlen_q, seqlen_k, BM: gl.constexpr, BN: gl.constexpr,
                CAUSAL: gl.constexpr):
    """(m0, n0, db, dh, n_steps, valid) of this CTA's tile in the round starting at tile ``base``.
    Under causal masking rounds alternate direction (CTA p takes base + p, then base + grid - 1 -
    p): about half the tiles have no step, in a pattern a fixed stride hands unevenly to the CTAs
    (up to 2x the mean at 1k); alternating pairs them out (measured 1k 0.40 -> 0.32 ms, 2k 0.78 ->
    0.67 ms at d64). Without it the stride is fixed (alternating cost 4-8% there). Tiles: key blocks fastest (the
    CTAs side by side read the same Q/dO rows), then query blocks, then dbias slices, so a round
    keeps a few query blocks of one slice, with their K/V and Q/dO, in L2. (db, dh) is the tile's
    dbias (batch, head), 0 on a summed (size-1) dim: also its first summed slice. A tile past the
    last (``valid`` false, in the last round) has no step and is not stored."""
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    tile = base + pid
    if CAUSAL:
        tile = base + gl.where((base // nprog) % 2 == 0, pid, nprog - 1 - pid)
    valid = tile < n_tiles
    n0 = (tile % n_n) * BN
    m0 = ((tile // n_n) % n_m) * BM
    slice_id = tile // (n_n * n_m)
    n_steps = gl.where(valid, n_steps_all, 0)
    if CAUSAL:
        # No row of the tile sees its first key: the tile is all zeros (no Q/dO/K/V loads, no loop).
        n_steps = gl.where(n0 <= m0 + BM - 1 + seqlen_k - seqlen_q, n_steps, 0)
    return m0, n0, slice_id // dbias_heads, slice_id % dbias_heads, n_steps, valid


@gluon.jit
def _dbias_producer(q_desc, do_desc, k_desc, v_desc, bias_desc, q_smem, do_smem, k_smem, v_smem, b_smem, b_ready, b_empty,
                    ready_bar, empty_bar, n_n, n_m, n_tiles, dbias_heads, n_steps_all, sum_heads, kv_group, seqlen_q,
                    seqlen_k, CAUSAL: gl.constexpr):
    NS: gl.constexpr = k_smem.shape[0]
    NB: gl.constexpr = b_smem.shape[0] // 2
    HM: gl.constexpr = q_smem.shape[1]
    BN: gl.constexpr = b_smem.shape[2]
    HALF_BYTES: gl.constexpr = q_desc.block_type.nbytes + do_desc.block_type.nbytes
    KV_BYTES: gl.constexpr = k_desc.block_type.nbytes + v_desc.block_type.nbytes
    BIAS_BYTES: gl.constexpr = bias_desc.block_type.nbytes
    g = 0  # ring steps issued so far, over all of this CTA's tiles
    i = 0  # tiles so far
    for base in range(0, n_tiles, gl.num_programs(0)):
        m0, n0, db, dh, n_steps, valid = _dbias_tile(base, n_n, n_m, n_tiles, dbias_heads, n_steps_all, seqlen_q, seqlen_k,
                                                     2 * HM, BN, CAUSAL)
        bb = gl.minimum(db, bias_desc.shape[0] - 1)  # the bias's own coordinates (one element if broadcast)
        bh = gl.minimum(dh, bias_desc.shape[1] - 1)
        # The tile's bias buffer, once its consumers have stored the tile before from it (a fresh
        # barrier: waiting for parity 1 passes at once). A tile with no step needs no bias (its
        # consumers store zeros): a plain arrival completes the phase.
        j = i % NB
        mbarrier.wait(b_empty.index(j), ((i // NB) & 1) ^ 1)
        work = n_steps > 0
        # The second 64-row half only if it has a real row (a wholly out-of-bounds box is not
        # relied on to signal its bytes); the byte counts are immediates, hence complementary
        # predicates.
        second = m0 + HM < seqlen_q
        mbarrier.expect(b_ready.index(j), 2 * BIAS_BYTES, pred=work & second)
        mbarrier.expect(b_ready.index(j), BIAS_BYTES, pred=work & (m0 + HM >= seqlen_q))
        mbarrier.arrive(b_ready.index(j), count=1, pred=n_steps == 0)
        tma.async_copy_global_to_shared(bias_desc, [bb, bh, m0, n0], b_ready.index(j),
                                        b_smem.index(2 * j).reshape([1, 1, HM, BN]), pred=work)
        tma.async_copy_global_to_shared(bias_desc, [bb, bh, m0 + HM, n0], b_ready.index(j),
                                        b_smem.index(2 * j + 1).reshape([1, 1, HM, BN]), pred=work & second)
        for t in range(n_steps):  # the summed (batch, head) slices, heads fastest
            b = db + t // sum_heads
            h = dh + t % sum_heads
            hk = h // kv_group
            s = (g + t) % NS
            mbarrier.wait(empty_bar.index(s), (((g + t) // NS) & 1) ^ 1)
            bar = ready_bar.index(s)
            mbarrier.expect(bar, 2 * HALF_BYTES + KV_BYTES, pred=second)
            mbarrier.expect(bar, HALF_BYTES + KV_BYTES, pred=m0 + HM >= seqlen_q)
            tma.async_copy_global_to_shared(q_desc, [b, m0, h, 0], bar, _tma_box(q_smem.index(2 * s)))
            tma.async_copy_global_to_shared(do_desc, [b, m0, h, 0], bar, _tma_box(do_smem.index(2 * s)))
            tma.async_copy_global_to_shared(q_desc, [b, m0 + HM, h, 0], bar, _tma_box(q_smem.index(2 * s + 1)), pred=second)
            tma.async_copy_global_to_shared(do_desc, [b, m0 + HM, h, 0], bar, _tma_box(do_smem.index(2 * s + 1)), pred=second)
            tma.async_copy_global_to_shared(k_desc, [b, n0, hk, 0], bar, _tma_box(k_smem.index(s)))
            tma.async_copy_global_to_shared(v_desc, [b, n0, hk, 0], bar, _tma_box(v_smem.index(s)))
        g += n_steps
        i += 1


@gluon.jit
def _dbias_consumer(WG: gl.constexpr, dbias_desc, q_smem, do_smem, k_smem, v_smem, b_smem, b_ready, b_empty, ready_bar,
                    empty_bar, lse_ptr, delta_ptr, n_n, n_m, n_tiles, dbias_heads, n_steps_all, sum_heads, nheads, seqlen_q,
                    seqlen_k, qk_scale, CAUSAL: gl.constexpr):
    NS: gl.constexpr = k_smem.shape[0]
    NB: gl.constexpr = b_smem.shape[0] // 2
    HM: gl.constexpr = q_smem.shape[1]
    BN: gl.constexpr = b_smem.shape[2]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    LOG2E_C: gl.constexpr = 1.4426950408889634
    rows = gl.arange(0, HM, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
    g = 0  # ring steps consumed so far, over all of this CTA's tiles
    i = 0
    for base in range(0, n_tiles, gl.num_programs(0)):
        m0, n0, db, dh, n_steps, valid = _dbias_tile(base, n_n, n_m, n_tiles, dbias_heads, n_steps_all, seqlen_q, seqlen_k,
                                                     2 * HM, BN, CAUSAL)
        row0 = m0 + WG * HM
        in_q = (row0 + rows) < seqlen_q
        j = i % NB
        bias_t = b_smem.index(2 * j + WG)
        acc = gl.zeros([HM, BN], gl.float32, s_layout)
        mbarrier.wait(b_ready.index(j), (i // NB) & 1)  # also when n_steps = 0: the buffer is then free to stage zeros
        if CAUSAL:
            # -inf where key j is hidden from query i (j > i + seqlen_k - seqlen_q), once per tile:
            # the loop then runs the non-causal code (a mask built in the loop is loop-invariant,
            # was hoisted and spilled 56-68 bytes at d64). Each thread rewrites the elements it reads.
            visible = gl.expand_dims(cols, 0) <= gl.expand_dims(rows + (row0 + seqlen_k - seqlen_q - n0), 1)
            bias_t.store(gl.where(visible, bias_t.load(s_layout), float("-inf")).to(bias_t.dtype))
            gl.thread_barrier()
        for t in range(n_steps):
            b = db + t // sum_heads  # (db, dh) is the first summed slice: 0 on a summed dim
            h = dh + t % sum_heads
            s = (g + t) % NS
            # lse and delta of the slice's rows, read before the wait (their latency overlaps the
            # TMA). Rows past seqlen_q and rows that see no key (lse -inf) get lse +inf: P = 0.
            stat = (b * nheads + h).to(gl.int64) * seqlen_q + row0
            lse2 = gl.load(lse_ptr + stat + rows, mask=in_q, other=float("inf")) * LOG2E_C
            lse2 = gl.where(lse2 == float("-inf"), float("inf"), lse2)
            delta = gl.load(delta_ptr + stat + rows, mask=in_q, other=0.0)
            mbarrier.wait(ready_bar.index(s), ((g + t) // NS) & 1)
            s_tok = warpgroup_mma(q_smem.index(2 * s + WG), k_smem.index(s).permute((1, 0)),
                                  gl.zeros([HM, BN], gl.float32, s_layout), use_acc=False, is_async=True)
            dp_tok = warpgroup_mma(do_smem.index(2 * s + WG), v_smem.index(s).permute((1, 0)),
                                   gl.zeros([HM, BN], gl.float32, s_layout), use_acc=False, is_async=True)
            sc = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
            # P in log2 units: q.k * scale * log2 e + bias * log2 e - lse * log2 e.
            bias = bias_t.load(s_layout).to(gl.float32)
            x = sc * qk_scale + bias * LOG2E_C - gl.expand_dims(lse2, 1)
            if CAUSAL:
                # A key the diagonal hides (folded -inf) gets P = 0 even when its K is not finite
                # (S NaN), and dS = 0 below even when its V is not (dP NaN, 0 * NaN): such keys
                # never reach the sum (docs/semantics.md, "Invisible keys"), as the tl pass zeroes
                # dS there.
                x = gl.where(bias == float("-inf"), float("-inf"), x)
            p = gl.exp2(x)
            dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp_tok,))
            gl.thread_barrier()  # every warp of the group is past its wait before the stage is released
            mbarrier.arrive(empty_bar.index(s), count=1)
            ds = p * (dp - gl.expand_dims(delta, 1))
            if CAUSAL:
                ds = gl.where(p == 0.0, 0.0, ds)  # P = 0 makes dS 0 whatever dP is
            acc += ds
        g += n_steps
        if valid & (row0 < seqlen_q):
            # The bias half is read for the last time above: it stages the sum for the store,
            # which drops the rows past seqlen_q and the keys past seqlen_k.
            bias_t.store(acc.to(bias_t.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(dbias_desc, [db, dh, row0, n0], bias_t.reshape([1, 1, HM, BN]))
            tma.store_wait(pendings=0)
        gl.thread_barrier()  # the store has read the buffer (and every warp is done with it) before it is released
        mbarrier.arrive(b_empty.index(j), count=1)
        i += 1


# One wrapper per consumer warpgroup: WG is a literal (a flag passed through warp_specialize is
# not a real constexpr in Gluon 3.6, see hopper.py).
@gluon.jit
def _dbias_consumer0(dbias_desc, q_smem, do_smem, k_smem, v_smem, b_smem, b_ready, b_empty, ready_bar, empty_bar, lse_ptr,
                     delta_ptr, n_n, n_m, n_tiles, dbias_heads, n_steps_all, sum_heads, nheads, seqlen_q, seqlen_k, qk_scale,
                     CAUSAL: gl.constexpr):
    _dbias_consumer(0, dbias_desc, q_smem, do_smem, k_smem, v_smem, b_smem, b_ready, b_empty, ready_bar, empty_bar, lse_ptr,
                    delta_ptr, n_n, n_m, n_tiles, dbias_heads, n_steps_all, sum_heads, nheads, seqlen_q, seqlen_k, qk_scale,
                    CAUSAL)


@gluon.jit
def _dbias_consumer1(dbias_desc, q_smem, do_smem, k_smem, v_smem, b_smem, b_ready, b_empty, ready_bar, empty_bar, lse_ptr,
                     delta_ptr, n_n, n_m, n_tiles, dbias_heads, n_steps_all, sum_heads, nheads, seqlen_q, seqlen_k, qk_scale,
                     CAUSAL: gl.constexpr):
    _dbias_consumer(1, dbias_desc, q_smem, do_smem, k_smem, v_smem, b_smem, b_ready, b_empty, ready_bar, empty_bar, lse_ptr,
                    delta_ptr, n_n, n_m, n_tiles, dbias_heads, n_steps_all, sum_heads, nheads, seqlen_q, seqlen_k, qk_scale,
                    CAUSAL)


@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k"])
def _hopper_attn_bwd_dbias(
    q_desc, do_desc, k_desc, v_desc,  # 4-D (batch, seqlen, heads, head dim), boxes of 64 (q, do) / BN (k, v) rows
    bias_desc,  # 4-D (batch or 1, heads or 1, seqlen_q, seqlen_k), broadcast dims sliced to one element; box (1, 1, 64, BN)
    dbias_desc,  # 4-D, the gradient (the bias view's shape, contiguous); box (1, 1, 64, BN)
    lse_ptr, delta_ptr,  # (batch, nheads, seqlen_q) fp32, contiguous; lse natural log
    dbias_heads, dbias_slices, n_steps_all, sum_heads, nheads, kv_group, seqlen_q, seqlen_k, qk_scale,
    CAUSAL: gl.constexpr, BIAS_BUFFERS: gl.constexpr, P_WARPS: gl.constexpr, P_REGS: gl.constexpr, C_REGS: gl.constexpr,
):
    """Persistent: a grid of at most one CTA per SM walks the dbias tiles (tile pid, pid + grid,
    ...), the ring and BIAS_BUFFERS bias buffers running on from one tile to the next."""
    HM: gl.constexpr = q_desc.block_type.shape[1]
    D: gl.constexpr = q_desc.block_type.shape[3]
    BN: gl.constexpr = k_desc.block_type.shape[1]
    n_n = (seqlen_k + BN - 1) // BN
    n_m = (seqlen_q + 2 * HM - 1) // (2 * HM)
    n_tiles = dbias_slices * n_n * n_m

    dtype: gl.constexpr = q_desc.dtype
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HM, D], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], dtype)
    b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HM, BN], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [2 * STAGES, HM, D], q_layout)  # stage s, warpgroup w: 2 * s + w
    do_smem = gl.allocate_shared_memory(dtype, [2 * STAGES, HM, D], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], kv_layout)
    b_smem = gl.allocate_shared_memory(dtype, [2 * BIAS_BUFFERS, HM, BN], b_layout)  # buffer j, warpgroup w: 2 * j + w
    _, ready_bar, empty_bar = _stream_barriers(STAGES)
    # Per bias buffer: ready (the producer's expect-tx, or its plain arrival for a tile with no
    # step) and empty (one arrival per consumer warpgroup, after its store).
    b_ready = gl.allocate_shared_memory(gl.int64, [BIAS_BUFFERS, 1], mbarrier.MBarrierLayout())
    b_empty = gl.allocate_shared_memory(gl.int64, [BIAS_BUFFERS, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(BIAS_BUFFERS):
        mbarrier.init(b_ready.index(j), count=1)
        mbarrier.init(b_empty.index(j), count=2)
    fence_async_shared()

    consumer_args = (dbias_desc, q_smem, do_smem, k_smem, v_smem, b_smem, b_ready, b_empty, ready_bar, empty_bar, lse_ptr,
                     delta_ptr, n_n, n_m, n_tiles, dbias_heads, n_steps_all, sum_heads, nheads, seqlen_q, seqlen_k, qk_scale,
                     CAUSAL)
    gl.warp_specialize([
        (_dbias_consumer0, consumer_args),
        (_dbias_consumer1, consumer_args),
        (_dbias_producer, (q_desc, do_desc, k_desc, v_desc, bias_desc, q_smem, do_smem, k_smem, v_smem, b_smem, b_ready,
                           b_empty, ready_bar, empty_bar, n_n, n_m, n_tiles, dbias_heads, n_steps_all, sum_heads, kv_group,
                           seqlen_q, seqlen_k, CAUSAL)),
    ], [4, P_WARPS], [C_REGS, P_REGS])


# --------------------------------------------------------------------------------------------
# Host
# --------------------------------------------------------------------------------------------

def hopper_dbias_supports(q, k, v, dout, lse, bias, alibi_slopes, key_padding_mask, causal, softmax_scale, varlen, features,
                          capability=None) -> bool:
    """Whether ``hopper_dbias`` computes this ``attn_bwd`` call's bias gradient (its arguments,
    validated, with a bias that requires grad): sm_90 (``capability`` (major, minor), else q's
    device), no ALiBi, key padding, varlen or score feature, a finite softmax_scale, operands
    ``hopper_bwd.backward_operands_ok`` accepts, and a bias of q's dtype with a real (seqlen_q,
    seqlen_k) plane that TMA can read (``hopper._bias_ok``) and a gradient TMA can write
    (seqlen_k * 2 bytes a multiple of 16)."""
    if not on_sm90(q, capability) or bias is None or alibi_slopes is not None or not abs(softmax_scale) < float("inf"):
        return False
    if not plain_scores(key_padding_mask, varlen, features, causal):
        return False
    if not backward_operands_ok(q, k, v, dout, lse, causal):
        return False
    return _bias_ok(bias, q, k.shape[1]) and (k.shape[1] * bias.element_size()) % 16 == 0


def hopper_dbias(q, k, v, dout, lse, delta, bias, causal, softmax_scale):
    """The bias gradient, (bias.shape) in the bias dtype, contiguous, for a call
    ``hopper_dbias_supports`` accepted: dS summed over the bias's size-1 batch and head dims.
    lse, delta: (batch, nheads, seqlen_q) fp32 contiguous (natural-log lse from the forward,
    delta = rowsum(o * do))."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    bn = block_n(head_dim)
    dbias = torch.empty(bias.shape, device=q.device, dtype=bias.dtype)
    n_tiles = bias.shape[0] * bias.shape[1] * triton.cdiv(seqlen_q, BLOCK_M) * triton.cdiv(seqlen_k, bn)
    grid = (min(n_tiles, _sm_count(q.device)),)
    _hopper_attn_bwd_dbias[grid](
        q_desc=_descriptor(q, HALF_M),
        do_desc=_descriptor(dout, HALF_M),
        k_desc=_descriptor(k, bn),
        v_desc=_descriptor(v, bn),
        bias_desc=_bias_descriptor(bias, bias.dtype, HALF_M, bn),
        dbias_desc=_bias_descriptor(dbias, dbias.dtype, HALF_M, bn),
        lse_ptr=lse,
        delta_ptr=delta,
        dbias_heads=bias.shape[1],
        dbias_slices=bias.shape[0] * bias.shape[1],
        n_steps_all=(batch if bias.shape[0] == 1 else 1) * (nheads if bias.shape[1] == 1 else 1),
        sum_heads=nheads if bias.shape[1] == 1 else 1,
        nheads=nheads,
        kv_group=nheads // nheads_k,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        qk_scale=float(softmax_scale) * LOG2E,
        CAUSAL=bool(causal),
        BIAS_BUFFERS=BIAS_BUFFERS,
        **WARP_SPECIALISED,
    )
    return dbias
