"""Per-kernel CUDA time of one learned-bias forward+backward (the bias_grad suite's 1k case):
which backward kernel the time goes to. Usage: PYTHONPATH=src python benchmarks/experiments/profile_bias_bwd.py [seqlen]"""
import sys

import torch

from tritonflash import flash_attn_func

s = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
b, h, d = 16384 // s, 32, 64
q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
bias = torch.randn(1, h, s, s, device="cuda", dtype=torch.bfloat16, requires_grad=True)
do = torch.randn_like(q)
for causal in (False, True):
    for _ in range(3):  # compile and autotune outside the profile
        flash_attn_func(q, k, v, bias, causal).backward(do)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            flash_attn_func(q, k, v, bias, causal).backward(do)
        torch.cuda.synchronize()
    print(f"seqlen {s} batch {b} causal {causal}: CUDA time per fwd+bwd by kernel")
    for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
        print(f"  {ev.key[:60]:60} {ev.device_time_total / 5 / 1000:8.3f} ms")
