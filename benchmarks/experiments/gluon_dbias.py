"""Spike for issue 15's learned-bias target (item 3): the bias-gradient pass in Gluon, with
larger tiles than the ``tl`` pass can hold and TMA loads in a ring.

What it computes: for a bias shared by the batch, (1, h, seqlen_q, seqlen_k) with a gradient,
dbias[h] = sum over batches b of dS[b, h] = P * (dP - delta), P = exp(scale * q.k + bias - lse),
dP = dO.V^T, delta = rowsum(dO * O): what the library's ``_attn_bwd_dbias`` pass writes
(docs/semantics.md, "bias"). That pass is bound by L2-to-SM traffic (docs/perf-notes.md,
change 15): one program per 64 x 64 dbias tile streams Q, dO, K and V tiles for every batch,
32 KB per step for 1 MFLOP of matmuls, ~17 GB at 4k; 128 x 128 tiles need three [128, 128] fp32
tiles in registers and spill.

Structure (one CTA per 128 query rows x BN keys of one head; BN = 128 at d64, 64 at d128):
- a producer warp loads the CTA's bias tile once (two 64-row halves), then for every batch the
  two 64-row halves of Q and dO and the BN rows of K and V by TMA into a 2-stage ring (ready
  barrier with expect-tx, empty barrier with one arrival per consumer);
- two consumer warpgroups, each owning 64 query rows, issue S = Q K^T and dP = dO V^T back to
  back (async wgmma, both operands in shared memory), compute P from S while dP runs (the bias
  read from shared memory in the accumulator layout each step, as the forward's bias tile), then
  add P * (dP - delta) to an fp32 accumulator in registers (under causal masking the mask is
  folded into the bias tile in shared memory once, as -inf). No matmul uses P or dS, so a step
  holds three [64, BN] fp32 tiles per warpgroup (S, dP, the sum): 64 registers each at BN = 128;
- epilogue: the sum, in the bias dtype, through the warpgroup's half of the bias buffer and a
  TMA store. Under causal masking a tile no query row sees gets zeros without a loop.

At d64, 4k, per step and CTA: 64 KB of loads for 4 MFLOP (16 KB per MFLOP against the tl
pass's 32), so about half the traffic; if the pass stays L2-bound at the same ~4.5 TB/s it
takes ~1.9 ms instead of 3.8 at 4k non-causal, the learned-bias fwd+bwd ~1.3-1.4x Flex instead
of 1.14x (docs/perf-notes.md, change 20, expected).

Scope: bf16/fp16, a (1, h, sq, sk) bias of q's dtype with unit key stride (contiguous), MHA or
GQA, causal or not (bottom-right, seqlen_k >= seqlen_q), seqlen_q a multiple of 128 and seqlen_k
of BN (full boxes: the spike does not handle ragged ends), no ALiBi, key padding or varlen.
Needs a GPU except ``--compile-only`` (sm_90a through tests/sm90_compile.py's stand-in driver);
run under ``timeout`` (a wrong barrier phase hangs).

    PYTHONPATH=src python3 benchmarks/experiments/gluon_dbias.py [--compile-only [--gqa 1,4]] [--formula]
        [--check] [--seqlens 1024,4096] [--headdims 64,128]

``--formula`` checks, on the CPU, the kernel's arithmetic written in torch (formula_dbias)
against autograd through the library's reference: it guards the math, not the kernel.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

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

from tritonflash.kernels.hopper import GL_DTYPES, LOG2E, WARP_SPECIALISED, _descriptor, _tma_box, _unchecked_descriptor

HALF_M = 64  # query rows per consumer warpgroup; a CTA has two
BLOCK_M = 2 * HALF_M
NS = gl.constexpr(2)  # ring stages (d128: 2 x 96 KB + the 16 KB bias tile)


def block_n(head_dim: int) -> int:
    """Keys per CTA: 128 at d64 (2 x 64 KB stages + 32 KB bias), 64 at d128 (shared memory)."""
    return 128 if head_dim <= 64 else 64


@gluon.jit
def _dbias_producer(q_desc, do_desc, k_desc, v_desc, bias_desc, q_smem, do_smem, k_smem, v_smem, b_smem, b_bar, ready_bar,
                    empty_bar, h, hk, m0, n0, n_steps):
    HM: gl.constexpr = q_smem.shape[1]
    BN: gl.constexpr = b_smem.shape[2]
    STEP_BYTES: gl.constexpr = 2 * q_desc.block_type.nbytes + 2 * do_desc.block_type.nbytes + k_desc.block_type.nbytes + \
        v_desc.block_type.nbytes
    mbarrier.expect(b_bar, 2 * bias_desc.block_type.nbytes)
    for wg in gl.static_range(2):
        tile = b_smem.index(wg)
        tma.async_copy_global_to_shared(bias_desc, [0, h, m0 + wg * HM, n0], b_bar, tile.reshape([1, 1, HM, BN]))
    for t in range(n_steps):  # t: the batch
        s = t % NS
        # Fresh barrier: waiting for parity 1 passes at once (the producer starts one phase ahead).
        mbarrier.wait(empty_bar.index(s), ((t // NS) & 1) ^ 1)
        bar = ready_bar.index(s)
        mbarrier.expect(bar, STEP_BYTES)
        for wg in gl.static_range(2):
            tma.async_copy_global_to_shared(q_desc, [t, m0 + wg * HM, h, 0], bar, _tma_box(q_smem.index(2 * s + wg)))
            tma.async_copy_global_to_shared(do_desc, [t, m0 + wg * HM, h, 0], bar, _tma_box(do_smem.index(2 * s + wg)))
        tma.async_copy_global_to_shared(k_desc, [t, n0, hk, 0], bar, _tma_box(k_smem.index(s)))
        tma.async_copy_global_to_shared(v_desc, [t, n0, hk, 0], bar, _tma_box(v_smem.index(s)))


@gluon.jit
def _dbias_consumer(WG: gl.constexpr, dbias_desc, q_smem, do_smem, k_smem, v_smem, b_smem, b_bar, ready_bar, empty_bar,
                    lse_ptr, delta_ptr, h, nheads, m0, n0, n_steps, seqlen_q, seqlen_k, qk_scale, CAUSAL: gl.constexpr):
    HM: gl.constexpr = q_smem.shape[1]
    BN: gl.constexpr = b_smem.shape[2]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    LOG2E_C: gl.constexpr = 1.4426950408889634
    row0 = m0 + WG * HM
    rows = gl.arange(0, HM, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
    bias_t = b_smem.index(WG)
    acc = gl.zeros([HM, BN], gl.float32, s_layout)
    mbarrier.wait(b_bar, 0)  # also before the epilogue overwrites the buffer when n_steps = 0
    if CAUSAL:
        # The mask folded into this warpgroup's bias half once: -inf where key j is hidden from
        # query i (j > i + seqlen_k - seqlen_q), which also drops a NaN or +inf bias there. The
        # loop then runs the non-causal code (a mask built in the loop is loop-invariant, was
        # hoisted and spilled 56-68 bytes at d64).
        lim = row0 + seqlen_k - seqlen_q - n0
        visible = gl.expand_dims(cols, 0) <= gl.expand_dims(rows + lim, 1)
        bias_t.store(gl.where(visible, bias_t.load(s_layout), float("-inf")).to(bias_t.dtype))
        gl.thread_barrier()
    for t in range(n_steps):
        s = t % NS
        # lse and delta of batch t's rows, read before the wait (their latency overlaps the TMA).
        # A row that sees no key (lse -inf: every visible key has a -inf bias) gets P = 0.
        stat = (t * nheads + h).to(gl.int64) * seqlen_q + row0
        lse2 = gl.load(lse_ptr + stat + rows) * LOG2E_C
        lse2 = gl.where(lse2 == float("-inf"), float("inf"), lse2)
        delta = gl.load(delta_ptr + stat + rows)
        mbarrier.wait(ready_bar.index(s), (t // NS) & 1)
        k = k_smem.index(s).permute((1, 0))
        v = v_smem.index(s).permute((1, 0))
        s_tok = warpgroup_mma(q_smem.index(2 * s + WG), k, gl.zeros([HM, BN], gl.float32, s_layout), use_acc=False,
                              is_async=True)
        dp_tok = warpgroup_mma(do_smem.index(2 * s + WG), v, gl.zeros([HM, BN], gl.float32, s_layout), use_acc=False,
                               is_async=True)
        sc = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
        # P in log2 units: q.k * scale * log2 e + bias * log2 e - lse * log2 e.
        bias = bias_t.load(s_layout).to(gl.float32)
        p = gl.exp2(sc * qk_scale + bias * LOG2E_C - gl.expand_dims(lse2, 1))
        dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp_tok,))
        gl.thread_barrier()  # every warp of the group is past its wait before the stage is released
        mbarrier.arrive(empty_bar.index(s), count=1)
        acc += p * (dp - gl.expand_dims(delta, 1))
    # This warpgroup's bias half is read for the last time above: it stages the sum for the store.
    bias_t.store(acc.to(bias_t.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dbias_desc, [0, h, row0, n0], bias_t.reshape([1, 1, HM, BN]))
    tma.store_wait(pendings=0)


@gluon.jit
def _dbias_consumer0(dbias_desc, q_smem, do_smem, k_smem, v_smem, b_smem, b_bar, ready_bar, empty_bar, lse_ptr, delta_ptr, h,
                     nheads, m0, n0, n_steps, seqlen_q, seqlen_k, qk_scale, CAUSAL: gl.constexpr):
    _dbias_consumer(0, dbias_desc, q_smem, do_smem, k_smem, v_smem, b_smem, b_bar, ready_bar, empty_bar, lse_ptr, delta_ptr, h,
                    nheads, m0, n0, n_steps, seqlen_q, seqlen_k, qk_scale, CAUSAL)


@gluon.jit
def _dbias_consumer1(dbias_desc, q_smem, do_smem, k_smem, v_smem, b_smem, b_bar, ready_bar, empty_bar, lse_ptr, delta_ptr, h,
                     nheads, m0, n0, n_steps, seqlen_q, seqlen_k, qk_scale, CAUSAL: gl.constexpr):
    _dbias_consumer(1, dbias_desc, q_smem, do_smem, k_smem, v_smem, b_smem, b_bar, ready_bar, empty_bar, lse_ptr, delta_ptr, h,
                    nheads, m0, n0, n_steps, seqlen_q, seqlen_k, qk_scale, CAUSAL)


@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k"])
def _gluon_attn_bwd_dbias(
    q_desc, do_desc, k_desc, v_desc,  # 4-D (batch, seqlen, heads, head dim), boxes of 64 (q, do) / BN (k, v) rows
    bias_desc, dbias_desc,  # 4-D (1, heads, seqlen_q, seqlen_k), boxes (1, 1, 64, BN)
    lse_ptr, delta_ptr,  # (batch, nheads, seqlen_q) fp32, contiguous; lse natural log
    batch, nheads, kv_group, seqlen_q, seqlen_k, qk_scale,
    CAUSAL: gl.constexpr, P_WARPS: gl.constexpr, P_REGS: gl.constexpr, C_REGS: gl.constexpr,
):
    HM: gl.constexpr = q_desc.block_type.shape[1]
    D: gl.constexpr = q_desc.block_type.shape[3]
    BN: gl.constexpr = k_desc.block_type.shape[1]
    BM: gl.constexpr = 2 * HM
    # Key blocks fastest (the CTAs side by side read the same Q/dO rows), then query blocks, then
    # heads: a wave of CTAs covers a few query blocks of one head, whose K/V and Q/dO stay in L2.
    n_n = (seqlen_k + BN - 1) // BN
    n_m = (seqlen_q + BM - 1) // BM
    pid = gl.program_id(0)
    n0 = (pid % n_n) * BN
    m0 = ((pid // n_n) % n_m) * BM
    h = pid // (n_n * n_m)
    hk = h // kv_group
    n_steps = batch
    if CAUSAL:
        # No row of the tile sees its first key: the tile is all zeros (no loads, no loop).
        n_steps = gl.where(n0 <= m0 + BM - 1 + seqlen_k - seqlen_q, batch, 0)

    dtype: gl.constexpr = q_desc.dtype
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HM, D], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], dtype)
    b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HM, BN], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [2 * NS, HM, D], q_layout)  # stage s, warpgroup w: 2 * s + w
    do_smem = gl.allocate_shared_memory(dtype, [2 * NS, HM, D], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [NS, BN, D], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [NS, BN, D], kv_layout)
    b_smem = gl.allocate_shared_memory(dtype, [2, HM, BN], b_layout)
    b_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready_bar = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty_bar = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    mbarrier.init(b_bar, count=1)
    for i in gl.static_range(NS):
        mbarrier.init(ready_bar.index(i), count=1)
        mbarrier.init(empty_bar.index(i), count=2)
    fence_async_shared()

    consumer_args = (dbias_desc, q_smem, do_smem, k_smem, v_smem, b_smem, b_bar, ready_bar, empty_bar, lse_ptr, delta_ptr, h,
                     nheads, m0, n0, n_steps, seqlen_q, seqlen_k, qk_scale, CAUSAL)
    gl.warp_specialize([
        (_dbias_consumer0, consumer_args),
        (_dbias_consumer1, consumer_args),
        (_dbias_producer, (q_desc, do_desc, k_desc, v_desc, bias_desc, q_smem, do_smem, k_smem, v_smem, b_smem, b_bar,
                           ready_bar, empty_bar, h, hk, m0, n0, n_steps)),
    ], [4, P_WARPS], [C_REGS, P_REGS])


def _plane_descriptor(t, bn):
    """A 4-D descriptor over a (1, heads, seqlen_q, seqlen_k) plane, boxes (1, 1, 64, bn)."""
    block = [1, 1, HALF_M, bn]
    return _unchecked_descriptor(t, block, gl.NVMMASharedLayout.get_default_for(block, GL_DTYPES[t.dtype]))


def gluon_dbias(q, k, v, dout, lse, delta, bias, causal, softmax_scale):
    """dbias (1, h, sq, sk) in the bias's dtype. q/dout (b, sq, h, d), k/v (b, sk, hk, d); lse and
    delta (b, h, sq) fp32 contiguous; bias (1, h, sq, sk) contiguous, q's dtype."""
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    bn = block_n(d)
    assert seqlen_q % BLOCK_M == 0 and seqlen_k % bn == 0, "spike scope: full tiles (see the docstring)"
    assert bias.shape == (1, nheads, seqlen_q, seqlen_k) and bias.is_contiguous() and bias.dtype == q.dtype
    assert not causal or seqlen_k >= seqlen_q
    dbias = torch.empty_like(bias)
    grid = (nheads * (seqlen_q // BLOCK_M) * (seqlen_k // bn),)
    _gluon_attn_bwd_dbias[grid](
        q_desc=_descriptor(q, HALF_M), do_desc=_descriptor(dout, HALF_M), k_desc=_descriptor(k, bn), v_desc=_descriptor(v, bn),
        bias_desc=_plane_descriptor(bias, bn), dbias_desc=_plane_descriptor(dbias, bn), lse_ptr=lse, delta_ptr=delta,
        batch=batch, nheads=nheads, kv_group=nheads // nheads_k, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
        qk_scale=float(softmax_scale) * LOG2E, CAUSAL=bool(causal), **WARP_SPECIALISED,
    )
    return dbias


def compile_only(head_dims, gqas) -> int:
    """Compile each case (head dim x causal x GQA group) for sm_90a without a GPU; one JSON line
    each (tests/sm90_compile.py's row)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    import sm90_compile  # noqa: F401 - installs the stand-in driver and the compile-only launch

    ok = True
    for d in head_dims:
        for causal in (False, True):
            for gqa in gqas:
                b, s, hk = 2, 256, 2
                h = hk * gqa
                q = torch.empty(b, s, h, d, dtype=torch.bfloat16)
                k = torch.empty(b, s, hk, d, dtype=torch.bfloat16)
                stat = torch.empty(b, h, s)
                bias = torch.empty(1, h, s, s, dtype=torch.bfloat16)
                case = {"d": d, "causal": causal, "gqa": gqa}
                try:
                    row = sm90_compile.gluon_row(functools.partial(gluon_dbias, q, k, k, q, stat, stat, bias, causal, 0.125))
                except Exception as e:  # noqa: BLE001 - reported, and the exit code says it
                    row = {"error": f"{type(e).__name__}: {e}"[-3000:]}
                    ok = False
                print(json.dumps({"case": case, **row}), flush=True)
    return 0 if ok else 1


def formula_dbias(q, k, v, dout, out, lse, bias, causal, softmax_scale):
    """The kernel's arithmetic in torch (CPU or GPU, any float dtype): the causal mask folded into
    the bias as -inf, P = exp2(q.k * scale * log2 e + bias * log2 e - lse * log2 e) with a row's
    lse of -inf read as +inf, then dS = P * (dP - delta) summed over the batch. Shapes as
    gluon_dbias; returns (1, h, sq, sk) in q's dtype."""
    batch, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    k, v = (x.repeat_interleave(h // hk, dim=2) for x in (k, v))  # query head h reads kv head h // group
    b = bias.to(q.dtype)
    if causal:
        hidden = torch.arange(sk, device=q.device)[None, :] > torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        b = b.masked_fill(hidden, float("-inf"))
    lse2 = (lse * LOG2E).masked_fill(lse == float("-inf"), float("inf"))
    delta = (out.to(q.dtype) * dout).sum(-1).transpose(1, 2)  # (batch, h, sq)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k)
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, v)
    p = torch.exp2(s * (softmax_scale * LOG2E) + b * LOG2E - lse2[..., None])
    return (p * (dp - delta[..., None])).sum(0, keepdim=True)


def formula_check() -> float:
    """formula_dbias against autograd through tritonflash.reference.attention_ref (fp32 on the
    CPU: GQA, seqlen_k > seqlen_q, causal and not, a row whose every key has a -inf bias and a
    NaN bias at a causally hidden key). Returns the largest error relative to the largest value."""
    from tritonflash.reference import attention_ref

    torch.manual_seed(0)
    worst = 0.0
    for causal in (False, True):
        b, sq, sk, h, hk, d = 3, 24, 40, 4, 2, 16
        q = torch.randn(b, sq, h, d)
        k, v = (torch.randn(b, sk, hk, d) for _ in range(2))
        dout = torch.randn(b, sq, h, d)
        bias = torch.randn(1, h, sq, sk)
        bias[0, 1, 5] = float("-inf")  # a row that sees no key
        if causal:
            bias[0, 2, 0, sk - 1] = float("nan")  # hidden from row 0 by the causal mask
        bias.requires_grad_()
        out, lse = attention_ref(q, k, v, bias, causal, d ** -0.5, return_lse=True)
        (grad,) = torch.autograd.grad(out, bias, dout)
        ours = formula_dbias(q, k, v, dout, out.detach(), lse.detach(), bias.detach(), causal, d ** -0.5)
        if not (torch.isfinite(ours).all() and torch.isfinite(grad).all()):
            return float("inf")
        worst = max(worst, ((ours - grad).abs().max() / grad.abs().max()).item())
    return worst


def _library_dbias(q, k, v, bias, causal, dout):
    """The library's bias gradient through its public API (flash_attn_func, autograd)."""
    from tritonflash import flash_attn_func
    bias = bias.detach().requires_grad_()
    out = flash_attn_func(q, k, v, bias, causal)
    return torch.autograd.grad(out, bias, dout)[0]


def _library_dbias_ms(q, k, v, bias, causal, dout):
    """CUDA time of the library's _attn_bwd_dbias kernel in a fwd+bwd (torch profiler)."""
    from exp_bwd_configs import kernel_times  # this folder (run as a script)

    from tritonflash import flash_attn_func
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    bias = bias.detach().requires_grad_()
    times = kernel_times(lambda: torch.autograd.grad(flash_attn_func(qq, kk, vv, bias, causal), (qq, kk, vv, bias), dout))
    return sum(ms for key, ms in times.items() if key.startswith("_attn_bwd_dbias"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--compile-only", action="store_true", help="compile for sm_90a without a GPU")
    p.add_argument("--check", action="store_true", help="compare with the library's bias gradient first")
    p.add_argument("--seqlens", default="1024,4096")
    p.add_argument("--headdims", default="64,128")
    p.add_argument("--gqa", default="1,4", help="--compile-only: the GQA group sizes compiled")
    p.add_argument("--formula", action="store_true",
                   help="check the kernel's arithmetic, written in torch, against autograd on the CPU (no GPU)")
    args = p.parse_args(argv)
    if args.formula:
        err = formula_check()
        print(f"formula check {'passed' if err < 1e-4 else 'FAILED'} (max rel diff {err:.2e})")
        return 0 if err < 1e-4 else 1
    if args.compile_only:
        return compile_only([int(x) for x in args.headdims.split(",")], [int(x) for x in args.gqa.split(",")])
    from tritonflash import flash_attn_func

    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    worst = 0.0
    if args.check:
        # Small cases the timed shapes do not cover: GQA, seqlen_k > seqlen_q (causal offset and
        # all-zero tiles), each head dim.
        for d in (int(x) for x in args.headdims.split(",")):
            for causal in (False, True):
                torch.manual_seed(1)
                q, dout = (torch.randn(2, 256, 8, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
                k, v = (torch.randn(2, 512, 2, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
                bias = torch.randn(1, 8, 256, 512, device="cuda", dtype=torch.bfloat16)
                out, lse = flash_attn_func(q, k, v, bias, causal, return_lse=True)
                delta = (out.float() * dout.float()).sum(-1).transpose(1, 2).contiguous()
                ours = gluon_dbias(q, k, v, dout, lse.contiguous(), delta, bias, causal, d ** -0.5)
                theirs = _library_dbias(q, k, v, bias, causal, dout)
                err = ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()
                worst = max(worst, err)
                print(f"check d{d} gqa 8/2 sq 256 sk 512 causal={causal}: max rel diff {err:.2e}", flush=True)
    print(f"{'d':>3} {'seqlen':>6} {'causal':>6} {'gluon ms':>9} {'library ms':>10} {'library/gluon':>13} {'max rel diff':>12}")
    for d in (int(x) for x in args.headdims.split(",")):
        for s in (int(x) for x in args.seqlens.split(",")):
            b, h = 16384 // s, 2048 // d  # the bias_grad suite's shapes
            torch.manual_seed(0)
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            bias = torch.randn(1, h, s, s, device="cuda", dtype=torch.bfloat16)
            dout = torch.randn_like(q)
            for causal in (False, True):
                scale = d ** -0.5
                out, lse = flash_attn_func(q, k, v, bias, causal, return_lse=True)
                delta = (out.float() * dout.float()).sum(-1).transpose(1, 2).contiguous()
                lse = lse.contiguous()
                run = functools.partial(gluon_dbias, q, k, v, dout, lse, delta, bias, causal, scale)
                err = float("nan")
                if args.check:
                    ours, again = run(), run()
                    theirs = _library_dbias(q, k, v, bias, causal, dout)
                    err = ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max().clamp_min(1e-6)).item()
                    worst = max(worst, err)
                    if not torch.equal(ours, again):
                        print("  not bitwise reproducible")
                        worst = float("inf")
                t_g = triton.testing.do_bench(run)
                t_l = _library_dbias_ms(q, k, v, bias, causal, dout)
                print(f"{d:>3} {s:>6} {str(causal):>6} {t_g:>9.4f} {t_l:>10.4f} {t_l / t_g:>13.3f} {err:>12.2e}", flush=True)
    if args.check:
        print("check", "passed" if worst < 2e-2 else "FAILED", f"(worst {worst:.2e})")
        return 0 if worst < 2e-2 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
