"""ALiBi cost of the Hopper forward, GPU time only (issue 15's target: <= 5% over no bias).

The benchmark protocol's do_bench rows carry host time and L2 flushes; this times the kernel
under a CUDA graph, with and without ALiBi slopes, for each kernel module named on the command
line (``hopper`` is the library's; a candidate copied next to it, e.g. ``hopper_slope``, is
compared in the same process). Repeats interleave the modules so that clock drift hits both.

    PYTHONPATH=src python benchmarks/experiments/alibi_cost.py [--modules hopper,hopper_slope]
"""

from __future__ import annotations

import argparse
import importlib
import statistics

import torch
import triton

SHAPES = [(16, 1024, 16, 128, True), (4, 4096, 16, 128, True), (2, 8192, 16, 128, True), (4, 4096, 16, 128, False)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--modules", default="hopper")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    mods = {name: importlib.import_module(f"tritonflash.kernels.{name}") for name in args.modules.split(",")}
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    torch.manual_seed(0)
    for b, s, h, d, causal in SHAPES:
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        slopes = torch.exp2(-8.0 * torch.arange(1, h + 1, device="cuda", dtype=torch.float32) / h)[None]
        scale = d ** -0.5
        times = {(name, alibi): [] for name in mods for alibi in (False, True)}
        for _ in range(args.repeats):
            for name, mod in mods.items():
                for alibi in (False, True):
                    sl = slopes if alibi else None
                    times[(name, alibi)].append(triton.testing.do_bench_cudagraph(
                        lambda mod=mod, sl=sl, qkv=(q, k, v), causal=causal, scale=scale: mod.hopper_fwd(*qkv, sl, causal, scale)))
        ref = {name: mods[name].hopper_fwd(q, k, v, slopes, causal, scale) for name in mods}
        first = next(iter(ref.values()))
        for name in mods:
            same = all(torch.equal(a, b_) for a, b_ in zip(ref[name], first))  # (out, lse)
            t0, t1 = statistics.median(times[(name, False)]), statistics.median(times[(name, True)])
            print(f"b{b} s{s} h{h} d{d} {'causal' if causal else 'full'} {name}: no bias {t0:.4f} ms, "
                  f"alibi {t1:.4f} ms, cost {100 * (t1 / t0 - 1):+.1f}%, bits equal to {next(iter(mods))}: {same}")


if __name__ == "__main__":
    main()
