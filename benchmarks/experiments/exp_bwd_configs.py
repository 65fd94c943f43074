"""Experiment: per-kernel CUDA time of the no-bias backward passes for tile configs beyond the
candidate lists, and for FlexAttention's kernels on the same inputs. ``--which dbias``: the
bias-gradient pass instead, with a learned (1, h, s, s) bf16 bias (the bias_grad suite's case),
its configs forced one at a time (the other passes on the library's tiles; Flex not run).

    PYTHONPATH=src python benchmarks/experiments/exp_bwd_configs.py [--d 128 64] [--seqlens 4096] [--which dkdv dq | dbias]
"""

# ruff: noqa: B023  (each lambda is timed before its loop variables move on)
import argparse

import torch
import triton

from tritonflash import flash_attn_func
from tritonflash.kernels import backward


def cfg(bm, bn, w, s):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


DKDV = [cfg(64, 128, 8, 1), cfg(64, 128, 8, 2), cfg(64, 128, 8, 3), cfg(64, 128, 8, 4), cfg(32, 128, 4, 2),
        cfg(32, 128, 4, 3), cfg(32, 128, 4, 4), cfg(64, 64, 4, 3), cfg(32, 64, 4, 3)]
DQ = [cfg(128, 64, 8, 2), cfg(128, 64, 8, 3), cfg(128, 64, 8, 4), cfg(128, 128, 8, 2), cfg(64, 64, 4, 3),
      cfg(128, 32, 8, 3), cfg(128, 32, 4, 3), cfg(64, 128, 8, 2), cfg(256, 64, 8, 2)]
# The autotuner's pick at d64 first (64, 64, 4, 3); then 16 warps, which halve the registers a
# thread holds of the three score-sized fp32 tiles (S, dP, the dbias sum): compiled for sm_90a
# at d64, (128, 64, 16, 2) and (64, 128, 16, 2) use 128 registers without spills, (128, 128, 16, 2)
# spills 580 bytes, (128, 128, 8, 2) 976 bytes, (128, 64, 8, 3) 235 registers without spills.
# The d128 pick is (64, 128, 8, 2): listed last, for a d128 baseline.
DBIAS = [cfg(64, 64, 4, 3), cfg(128, 64, 16, 2), cfg(64, 128, 16, 2), cfg(128, 128, 16, 2), cfg(128, 64, 8, 3),
         cfg(64, 128, 8, 2)]


def dbias_times(d, s, causal, configs):
    """CUDA time of the dbias pass per forced config, learned (1, h, s, s) bf16 bias, 16k tokens."""
    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, h, s, s, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    flops = 4 * b * h * s * s * d / (2 if causal else 1)  # its 2 recomputed matmuls over every summed batch
    for c in configs:
        backward._launch_dbias.forced = c
        try:
            t = kernel_times(lambda: torch.autograd.grad(flash_attn_func(q, k, v, bias, causal), (q, k, v, bias), do))
            ms = sum(v_ for key, v_ in t.items() if key.startswith("_attn_bwd_dbias"))
            print(f"d{d} s{s} causal={causal} dbias {c.kwargs['BLOCK_M']},{c.kwargs['BLOCK_N']},{c.num_warps}w,{c.num_stages}s "
                  f"{ms:.3f} ms {flops / ms * 1e-9:.0f} TFLOP/s", flush=True)
        except Exception as e:  # noqa: BLE001 (experiment: report and go on)
            print(f"d{d} s{s} causal={causal} dbias {c} FAILED {type(e).__name__}: {str(e)[:120]}", flush=True)
        finally:
            backward._launch_dbias.forced = None


def kernel_times(fn, reps=5):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {ev.key: ev.device_time_total / reps / 1000 for ev in prof.key_averages() if ev.device_time_total > 0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[4096])
    ap.add_argument("--which", nargs="+", default=["dkdv", "dq"])
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args()
    if "dbias" in args.which:
        for d in args.d:
            for s in args.seqlens:
                for causal in (False, True):
                    dbias_times(d, s, causal, DBIAS)
        return
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    torch._dynamo.config.cache_size_limit = 1000
    flex = torch.compile(flex_attention)
    for d in args.d:
        for s in args.seqlens:
            b, h = 16384 // s, 2048 // d
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            do = torch.randn_like(q)
            for causal in (False, True):
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                tag = f"d{d} s{s} causal={causal}"
                # Flex on (b, h, s, d) views of the same data.
                qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
                mask = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, s, s) if causal else None
                if not args.no_flex:
                    t = kernel_times(lambda: flex(qt, kt, vt, block_mask=mask).backward(do.transpose(1, 2)))
                    print(tag, "flex fwd+bwd kernels:", {key[:40]: round(ms, 3) for key, ms in t.items() if ms > 0.01}, flush=True)
                t = kernel_times(lambda: flash_attn_func(q, k, v, causal=causal).backward(do))
                print(tag, "tritonflash autotuned kernels:", {key[:40]: round(ms, 3) for key, ms in t.items() if ms > 0.01}, flush=True)
                for name, launcher in (("dkdv", backward._launch_dkdv), ("dq", backward._launch_dq)):
                    if name not in args.which:
                        continue
                    kname = "_attn_bwd_dkdv" if name == "dkdv" else "_attn_bwd_dq"
                    for c in (DKDV if name == "dkdv" else DQ):
                        launcher.forced = c
                        try:
                            t = kernel_times(lambda: flash_attn_func(q, k, v, causal=causal).backward(do))
                            ms = sum(v_ for key, v_ in t.items() if key.startswith(kname))
                            # The pass's share of the fwd+bwd FLOPs: dK/dV 4 of 7 matmuls, dQ 3 of 7.
                            share = (4 if name == "dkdv" else 3) / 2 * flops
                            print(f"{tag} {name} {c.kwargs['BLOCK_M']},{c.kwargs['BLOCK_N']},{c.num_warps}w,{c.num_stages}s "
                                  f"{ms:.3f} ms {share / ms * 1e-9:.0f} TFLOP/s", flush=True)
                        except Exception as e:  # noqa: BLE001 (experiment: report and go on)
                            print(f"{tag} {name} {c} FAILED {type(e).__name__}: {str(e)[:120]}", flush=True)
                        finally:
                            launcher.forced = None


if __name__ == "__main__":
    main()
