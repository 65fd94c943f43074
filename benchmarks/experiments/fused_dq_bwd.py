"""Spike for issue 15's fwd+bwd target: one backward pass that produces dK, dV *and* dQ,
deterministically, instead of the library's dK/dV pass plus a dQ pass that recomputes S and dP
(7 matmuls per tile pair -> 5).

Each program owns one key block of one (batch, head) and walks the query blocks it sees. Its dQ
contribution for query block m is added in fp32 to a global accumulator (one atomic add per
element) only when every lower key block of the same head has added its own: a counter per
(batch, head, query block) holds the number of key blocks that have added, the program spins on
it (acquire) until it equals its key block index, adds, and then stores index + 1 (release). The
order of the additions is therefore fixed (key block 0, 1, 2, ...), so the sums are bitwise
reproducible. A program only ever waits for lower key blocks, which the grid order (key block
slowest) dispatches first, so it cannot deadlock.

Under causal masking the key blocks that see query block m are 0 .. (m * BLOCK_M) // BLOCK_N, a
prefix, and key block n starts at the diagonal, where key block n - 1 arrives one step earlier:
each program waits about one step. Without causal masking every key block starts at query
block 0, so key block n waits about n steps (a staircase): the spike times it too, but the lever
is the causal case.

Scope: bf16/fp16, no bias, MHA, seqlen_q == seqlen_k a multiple of both tiles. Timed against the
library's backward (``attn_bwd``) on the same forward output; ``--check`` compares dq/dk/dv with
it. ``--cpu`` runs a small case in the Triton interpreter (no GPU).

    PYTHONPATH=src python3 benchmarks/experiments/fused_dq_bwd.py [--check] [--cpu] [--unordered]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys


@functools.cache
def _kernel():
    """The kernel, made on first use (after --cpu has set TRITON_INTERPRET, which triton.jit reads)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _fused_bwd(Q, K, V, DO, LSE, DELTA, DK, DV, DQA, SEM,
                   stride_b, stride_s, stride_h,  # of q, k, v, do, dk, dv, dq_acc: (batch, seqlen, heads, D), unit last stride
                   nheads, seqlen, sm_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr,
                   ORDERED: tl.constexpr):
        n_n = seqlen // BLOCK_N
        n_m = seqlen // BLOCK_M
        pid = tl.program_id(0)
        n_bh = tl.num_programs(0) // n_n
        n = pid // n_bh  # key block slowest: every lower key block of this head is dispatched first
        bh = pid % n_bh
        base = (bh // nheads).to(tl.int64) * stride_b + (bh % nheads) * stride_h
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        k = tl.load(K + base + offs_n[:, None] * stride_s + offs_d[None, :])
        v = tl.load(V + base + offs_n[:, None] * stride_s + offs_d[None, :])
        dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        stat = bh.to(tl.int64) * seqlen
        qk_scale = sm_scale * 1.4426950408889634
        m_lo = (n * BLOCK_N) // BLOCK_M if CAUSAL else 0
        for m in range(m_lo, n_m):
            offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
            rows = base + offs_m[:, None] * stride_s + offs_d[None, :]
            q = tl.load(Q + rows)
            do = tl.load(DO + rows)
            lse = tl.load(LSE + stat + offs_m) * 1.4426950408889634
            delta = tl.load(DELTA + stat + offs_m)
            s_t = tl.dot(k, tl.trans(q))  # [BLOCK_N, BLOCK_M]
            p_t = tl.exp2(s_t * qk_scale - lse[None, :])
            if CAUSAL:
                p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
            dk += tl.dot(ds_t, q)
            dq = tl.dot(tl.trans(ds_t), k)  # [BLOCK_M, D], this key block's part of dQ
            if ORDERED:
                sem = SEM + bh * n_m + m
                while tl.atomic_add(sem, 0, sem="acquire") != n:
                    pass
                tl.atomic_add(DQA + rows, dq, sem="relaxed")
                tl.debug_barrier()  # every thread's adds issued before the release below
                tl.atomic_xchg(sem, n + 1, sem="release")
            else:
                tl.atomic_add(DQA + rows, dq, sem="relaxed")  # --unordered: any order (not reproducible)
        cols = base + offs_n[:, None] * stride_s + offs_d[None, :]
        tl.store(DK + cols, (dk * sm_scale).to(k.dtype))
        tl.store(DV + cols, dv.to(v.dtype))

    return _fused_bwd


def fused_bwd(q, k, v, out, dout, lse, causal, sm_scale, block_m=32, block_n=128, num_warps=8, num_stages=2, ordered=True):
    """(dq, dk, dv) of softmax(scale q k^T (+ causal mask)) v, from the forward's out and lse
    (natural log, (batch, heads, seqlen) fp32); q/k/v/out/dout (batch, seqlen, heads, D) contiguous."""
    import torch
    b, s, h, d = q.shape
    assert k.shape == v.shape == q.shape and s % block_m == 0 and s % block_n == 0, "spike scope: see the docstring"
    assert all(t.is_contiguous() for t in (q, k, v, out, dout))
    delta = (out.float() * dout.float()).sum(-1).transpose(1, 2).contiguous()  # (b, h, s)
    dq_acc = torch.zeros(b, s, h, d, device=q.device, dtype=torch.float32)
    sem = torch.zeros(b * h * (s // block_m), device=q.device, dtype=torch.int32)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    grid = ((s // block_n) * b * h,)
    _kernel()[grid](q, k, v, dout, lse, delta, dk, dv, dq_acc, sem, q.stride(0), q.stride(1), q.stride(2), h, s, sm_scale,
                  BLOCK_M=block_m, BLOCK_N=block_n, D=d, CAUSAL=causal, ORDERED=ordered, num_warps=num_warps,
                  num_stages=num_stages)
    return (dq_acc * sm_scale).to(q.dtype), dk, dv


# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried per head dim, the first the default. Compiled for
# sm_90a here: d128 (32, 128, 8, *) 220-226 registers, no spills; (64, 128, 8, 2) spills 156-164
# bytes (kept to see what the spill costs); d64 (64, 128, 8, 2) ~205 registers, (64, 64, 4, 3)
# ~210, no spills; none has ptxas's C7515.
TILES = {128: [(32, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 2)], 64: [(64, 128, 8, 2), (64, 64, 4, 3)]}


def _inputs(b, s, h, d, dtype, device, causal):
    import torch

    from tritonflash import flash_attn_func
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype) for _ in range(3))
    out, lse = flash_attn_func(q, k, v, causal=causal, return_lse=True)
    dout = torch.randn_like(out)
    return q, k, v, out.contiguous(), dout, lse.contiguous()


def _compare(ours, theirs, label):
    worst = 0.0
    for name, a, b in zip(("dq", "dk", "dv"), ours, theirs):
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
        worst = max(worst, err)
        print(f"{label} {name}: max |diff| / max |library| = {err:.2e}")
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cpu", action="store_true", help="a small case in the Triton interpreter")
    p.add_argument("--check", action="store_true")
    p.add_argument("--headdims", default="128,64")
    p.add_argument("--seqlens", default="1024,4096,16384")
    p.add_argument("--unordered", action="store_true",
                   help="also time the pass without the ordering (dQ atomics in any order: not reproducible), "
                        "to split the cost of the order from that of the fused pass itself")
    args = p.parse_args(argv)
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton

    from tritonflash.kernels import attn_bwd

    if args.cpu:
        ok = True
        for causal in (True, False):
            q, k, v, out, dout, lse = _inputs(1, 256, 2, 32, torch.float16, "cpu", causal)
            ours = fused_bwd(q, k, v, out, dout, lse, causal, 32 ** -0.5, block_m=32, block_n=64, num_warps=4)
            again = fused_bwd(q, k, v, out, dout, lse, causal, 32 ** -0.5, block_m=32, block_n=64, num_warps=4)
            theirs = attn_bwd(dout, q, k, v, out, lse, None, None, None, causal, 32 ** -0.5)[:3]
            ok &= _compare(ours, theirs, f"cpu causal={causal}") < 2e-2
            ok &= all(torch.equal(a, b) for a, b in zip(ours, again))
        print("cpu check", "passed" if ok else "FAILED")
        return 0 if ok else 1
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    print(f"{'d':>3} {'seqlen':>6} {'causal':>6} {'tile':>22} {'fused ms':>9} {'library ms':>10} {'library/fused':>13}")
    for d in (int(x) for x in args.headdims.split(",")):
        for s in (int(x) for x in args.seqlens.split(",")):
            b, h = 16384 // s, 16
            for causal in (True, False):
                q, k, v, out, dout, lse = _inputs(b, s, h, d, torch.bfloat16, "cuda", causal)
                scale = d ** -0.5
                t_l = triton.testing.do_bench(functools.partial(attn_bwd, dout, q, k, v, out, lse, None, None, None, causal, scale))
                for bm, bn, warps, stages in TILES[d]:
                    run = functools.partial(fused_bwd, q, k, v, out, dout, lse, causal, scale, block_m=bm, block_n=bn,
                                            num_warps=warps, num_stages=stages)
                    if args.check:
                        ours, again = run(), run()
                        theirs = attn_bwd(dout, q, k, v, out, lse, None, None, None, causal, scale)[:3]
                        _compare(ours, theirs, f"d{d} s{s} causal={causal} tile {bm}x{bn}")
                        print("  bitwise reproducible:", all(torch.equal(a, b_) for a, b_ in zip(ours, again)))
                    tile = f"{bm}x{bn} w{warps} s{stages}"
                    for ordered in (True, False) if args.unordered else (True,):
                        t_f = triton.testing.do_bench(functools.partial(run, ordered=ordered))
                        label = tile if ordered else tile + " unord"
                        print(f"{d:>3} {s:>6} {str(causal):>6} {label:>22} {t_f:>9.4f} {t_l:>10.4f} {t_l / t_f:>13.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
