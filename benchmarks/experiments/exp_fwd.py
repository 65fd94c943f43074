"""Experiment: forward-kernel variants for the no-bias case (not the library's kernel).

Compares, on one GPU and the same inputs, a minimal forward written four ways:
pointer loads vs on-device tensor descriptors (TMA), with or without Triton's Hopper warp
specialisation, and the score scaling as a separate multiply or folded into one FMA.
Prints TFLOP/s per variant and the library's own forward beside them.

    PYTHONPATH=src python benchmarks/experiments/exp_fwd.py [--d 128] [--seqlens 1024,4096,16384]
"""

# ruff: noqa: B023  (each lambda is timed before its loop variables move on)
import argparse
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _exp_fwd(Q, K, V, Out, sq, sk, nheads, sb, ss, sh, qk_scale,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
             CAUSAL: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr, FMA: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    base = b.to(tl.int64) * sb + h * sh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    if TMA:
        qd = tl.make_tensor_descriptor(Q + base, [sq, D], [ss, 1], [BLOCK_M, D])
        kd = tl.make_tensor_descriptor(K + base, [sk, D], [ss, 1], [BLOCK_N, D])
        vd = tl.make_tensor_descriptor(V + base, [sk, D], [ss, 1], [BLOCK_N, D])
        q = qd.load([pid_m * BLOCK_M, 0])
    else:
        q = tl.load(Q + base + offs_m[:, None] * ss + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    hi = sk
    if CAUSAL:
        hi = (pid_m + 1) * BLOCK_M
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=WS):
        if TMA:
            k = kd.load([start_n, 0])
        else:
            k = tl.load(K + base + (start_n + offs_n0)[:, None] * ss + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k))
        if CAUSAL:
            qk = tl.where(offs_m[:, None] >= start_n + offs_n0[None, :], qk, float("-inf"))
        if FMA:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        else:
            s = qk * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if TMA:
            v = vd.load([start_n, 0])
        else:
            v = tl.load(V + base + (start_n + offs_n0)[:, None] * ss + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(Out + base + offs_m[:, None] * ss + offs_d[None, :], acc.to(Out.dtype.element_ty))


def run_variant(q, k, v, causal, tma, ws, fma, bm, bn, warps, stages):
    b, s, h, d = q.shape
    out = torch.empty_like(q)
    grid = (s // bm, b * h)
    _exp_fwd[grid](q, k, v, out, s, s, h, q.stride(0), q.stride(1), q.stride(2), d ** -0.5 * 1.4426950408889634,
                   BLOCK_M=bm, BLOCK_N=bn, D=d, CAUSAL=causal, TMA=tma, WS=ws, FMA=fma,
                   num_warps=warps, num_stages=stages)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--seqlens", default="1024,4096,16384")
    args = ap.parse_args()
    sys.path.insert(0, "src")
    from tritonflash import flash_attn_func

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    variants = []
    for causal in (False, True):
        for tma in (False, True):
            for ws in ((False, True) if tma else (False,)):
                for fma in (False, True):
                    variants.append((causal, tma, ws, fma))
    cfgs = {128: [(128, 128, 8, 2), (128, 64, 8, 3)], 64: [(128, 64, 8, 3), (128, 128, 8, 3)]}
    # Triton 3.6's Hopper warp specialisation engages with num_warps=4: it adds a producer
    # warpgroup and splits BLOCK_M over two consumer warpgroups (12 warps in all).
    ws_cfgs = {128: [(128, 128, 4, 2), (128, 64, 4, 3), (128, 64, 4, 4)], 64: [(128, 128, 4, 2), (128, 128, 4, 3), (128, 64, 4, 4)]}
    for d in args.d:
        for s in map(int, args.seqlens.split(",")):
            b, h = 16384 // s, 2048 // d
            torch.manual_seed(0)
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            for causal in (False, True):
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                ref = torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
                ms = triton.testing.do_bench(lambda: flash_attn_func(q, k, v, causal=causal))
                print(f"d{d} s{s} causal={causal} library {flops / ms * 1e-9:.0f}", flush=True)
                for (c, tma, ws, fma) in variants:
                    if c != causal:
                        continue
                    for cfg in (ws_cfgs if ws else cfgs)[d]:
                        name = f"d{d} s{s} causal={causal} tma={tma:d} ws={ws:d} fma={fma:d} cfg={cfg}"
                        try:
                            out = run_variant(q, k, v, causal, tma, ws, fma, *cfg)
                            err = (out.float() - ref.float()).abs().max().item()
                            ms = triton.testing.do_bench(lambda: run_variant(q, k, v, causal, tma, ws, fma, *cfg))
                            print(f"{name} {flops / ms * 1e-9:.0f} TFLOP/s err {err:.2e}", flush=True)
                        except Exception as e:  # noqa: BLE001 (experiment: report and go on)
                            print(f"{name} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
