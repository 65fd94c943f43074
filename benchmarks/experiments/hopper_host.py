"""Host cost of the Hopper forward's launch against the tl kernel's (issue 15).

The first library-path benchmark (be67e6f) timed kernels/hopper.py at 0.6-0.8 ms a call at 1k
whatever the shape: a host-bound number. This script separates the two costs on an sm_90 GPU:

- host microseconds a call (perf_counter over many calls, no synchronisation inside: the GPU
  queue absorbs them), for hopper_fwd and attn_fwd's tl kernel, and for the pieces of the
  Hopper launch (hopper_supports, the four descriptors);
- GPU milliseconds a call, from a CUDA graph of the same call (no host in the loop);
- a cProfile of the Hopper calls (the top entries by cumulative time) with --profile.

    PYTHONPATH=src python benchmarks/experiments/hopper_host.py [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from unittest import mock

import torch
import triton

from tritonflash.kernels import forward, hopper
from tritonflash.kernels.common import NO_FEATURES

SHAPES = [(16, 1024, 16, 128, False), (16, 1024, 16, 128, True), (4, 4096, 16, 128, False), (4, 4096, 16, 128, True),
          (16, 1024, 32, 64, True)]


def host_us(fn, n=300) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def _tl_only(timer, fn):
    """``timer(fn)`` with the Hopper forward off (attn_fwd's tl kernel)."""
    with mock.patch.dict(os.environ, {forward.HOPPER_ENV: "0"}):
        return timer(fn)


def measure(b, s, h, d, causal, profile: bool) -> None:
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = d ** -0.5
    call = (q, k, v, None, None, None, causal, scale)
    os.environ[forward.HOPPER_ENV] = "1"
    assert hopper.hopper_supports(q, k, v, None, None, None, None, causal, scale, None, NO_FEATURES)

    def hop():
        return hopper.hopper_fwd(q, k, v, None, causal, scale)

    def attn():
        return forward.attn_fwd(*call)

    row = {
        "hopper_fwd host us": host_us(hop),
        "attn_fwd(hopper) host us": host_us(attn),
        # The switch is read per call: set once around the timing, not inside the timed calls.
        "attn_fwd(tl) host us": _tl_only(host_us, attn),
        "hopper_supports us": host_us(lambda: hopper.hopper_supports(q, k, v, None, None, None, None, causal, scale, None,
                                                                      NO_FEATURES)),
        "4 descriptors us": host_us(lambda: [hopper._descriptor(t, r) for t, r in ((q, 64), (k, 128), (v, 128), (q, 64))]),
        "hopper GPU ms": triton.testing.do_bench_cudagraph(hop),
        "tl GPU ms": _tl_only(triton.testing.do_bench_cudagraph, attn),
    }
    print(f"b{b} s{s} h{h} d{d} {'causal' if causal else 'full'}: " + ", ".join(f"{k_} {v_:.4g}" for k_, v_ in row.items()))
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(300):
            hop()
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(35)
        print(buf.getvalue())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    for b, s, h, d, causal in SHAPES:
        measure(b, s, h, d, causal, args.profile and s == 1024 and not causal and d == 128)


if __name__ == "__main__":
    main()
