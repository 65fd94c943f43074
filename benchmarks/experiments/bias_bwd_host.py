"""Host cost against GPU time of a learned-bias backward with the Gluon dK/dV pass (the default of
``TRITONFLASH_HOPPER_BWD`` for the calls with a bias in ``hopper_bwd.AUTO_BIAS``) and without it (``=0``, the tl pass),
on an sm_90 GPU: is a short call host-bound, and does the Gluon launch add host time?

For each shape (the bias_grad suite's: d64, 32 heads, 16k tokens, a (1, h, s, s) bf16 bias with
its gradient) and switch value: host microseconds of one ``attn_bwd`` (perf_counter over many
calls, no synchronisation inside), GPU milliseconds of it under a CUDA graph, and the
protocol's number (``do_bench`` median of forward + backward through ``flash_attn_func``).

    PYTHONPATH=src python benchmarks/experiments/bias_bwd_host.py [--causal-only]
"""

from __future__ import annotations

import os
import sys

import torch
import triton
from hopper_host import host_us  # this folder is on sys.path when a script here runs

from tritonflash import flash_attn_func
from tritonflash.kernels import attn_bwd, attn_fwd, backward

SHAPES = [(16, 1024, 32, 64, True), (8, 2048, 32, 64, True), (16, 1024, 32, 64, False), (16, 1024, 16, 128, False)]


def measure(b, s, h, d, causal) -> None:
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    bias = torch.randn(1, h, s, s, device="cuda", dtype=torch.bfloat16)
    scale = d ** -0.5
    out, lse = attn_fwd(q, k, v, bias, None, None, causal, scale)
    qg, kg, vg, bg = (t.clone().requires_grad_() for t in (q, k, v, bias))

    def bwd():
        return attn_bwd(do, q, k, v, out, lse, bias, None, None, causal, scale, bias_grad=True)

    def fwdbwd():
        flash_attn_func(qg, kg, vg, bg, causal).backward(do)

    parts = []
    for mode in ("0", "auto"):
        os.environ[backward.HOPPER_BWD_ENV] = mode  # read per call: fixed in the captured graph
        parts.append(f"switch {mode}: attn_bwd host {host_us(bwd):.0f} us, GPU {triton.testing.do_bench_cudagraph(bwd):.3f} ms, "
                     f"fwd+bwd host {host_us(fwdbwd, 50):.0f} us, do_bench {triton.testing.do_bench(fwdbwd, return_mode='median'):.3f} ms")
    print(f"b{b} s{s} h{h} d{d} {'causal' if causal else 'full'}: " + "; ".join(parts), flush=True)


def main() -> None:
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    torch.manual_seed(0)
    for shape in SHAPES:
        if shape[-1] or "--causal-only" not in sys.argv[1:]:
            measure(*shape)


if __name__ == "__main__":
    main()
