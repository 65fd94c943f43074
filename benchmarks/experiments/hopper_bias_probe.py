"""Where the Hopper BIAS variant's cost goes (docs/perf-notes.md, change 18: 26-50% over the
no-bias forward at d128). Patched copies of kernels/hopper.py, written next to it and imported
as modules, each remove one part of the bias path; GPU time under a CUDA graph, (1, 16, s, s)
bf16 bias, d128, 16384 tokens, interleaved repeats:

- ``bias``: the library's kernel (the baseline of the column "vs bias");
- ``noread``: the producer loads the tile and the consumers wait for it, but do not read it from
  shared memory nor add it (the consumer's ldmatrix + convert + FMA per score removed);
- ``notma``: the producer issues no bias TMA (it arrives on the tile's barrier instead), the
  consumers read whatever shared memory holds (L2/DRAM traffic of the bias removed);
- ``neither``: both removed: what is left is the variant's structure (2 stages, every block masked,
  the -inf-safe softmax; the compiler drops the unused bias ring: 164 KB of shared memory);
- ``nobias``: the library's kernel without a bias (3 stages, the unmasked loop);
- ``nobias2``: the same with a 2-stage K/V ring, as the bias variant has at d128 (how much of
  ``neither`` - ``nobias`` the ring depth is).

The patched kernels compute wrong outputs (timing only). Needs a GPU; run under ``timeout``.
All four compile for sm_90a without spills or C7515 (168 registers, checked with tests/sm90_compile.py's
stand-in driver at 6a03d43+).

    PYTHONPATH=src python3 benchmarks/experiments/hopper_bias_probe.py [--compile-only]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "src" / "tritonflash" / "kernels"

READ = """    t = b_smem.index(s).slice(WG * HM, HM).load(sc.type.layout)
    return sc + t.to(gl.float32) * inv_scale"""
TMA = """        mbarrier.expect(b_bar.index(s), bias_desc.block_type.nbytes)
        tile = b_smem.index(s)
        tma.async_copy_global_to_shared(bias_desc, [bb, bh, m0, j * BN], b_bar.index(s),
                                        tile.reshape([1, 1, tile.shape[0], tile.shape[1]]))"""
NO_READ = "    return sc"
NO_TMA = "        mbarrier.arrive(b_bar.index(s), count=1)"
PATCHES = {"noread": ((READ, NO_READ),), "notma": ((TMA, NO_TMA),), "neither": ((READ, NO_READ), (TMA, NO_TMA)),
           "nobias2": (("STAGES = gl.constexpr(3)", "STAGES = gl.constexpr(2)"),)}
NO_BIAS = {"nobias2"}  # copies timed without a bias


def patched_modules() -> dict:
    """name -> module: the library's hopper and one patched copy per PATCHES entry."""
    source = (KERNELS / "hopper.py").read_text()
    mods = {"bias": importlib.import_module("tritonflash.kernels.hopper")}
    for name, patches in PATCHES.items():
        text = source
        for old, new in patches:
            if text.count(old) != 1:
                sys.exit(f"{name}: the patched text is not in kernels/hopper.py once; update this script")
            text = text.replace(old, new)
        (KERNELS / f"hopper_probe_{name}.py").write_text(text)
        mods[name] = importlib.import_module(f"tritonflash.kernels.hopper_probe_{name}")
    return mods


def time_shape(mods: dict, s: int, causal: bool, repeats: int) -> dict:
    """Median ms of each module's hopper_fwd with the bias, and of the library's without it."""
    import torch
    import triton
    q, k, v = (torch.randn(16384 // s, s, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(1, 16, s, s, device="cuda", dtype=torch.bfloat16)
    runs = {n: (lambda mod=mod, b=None if n in NO_BIAS else bias: mod.hopper_fwd(q, k, v, None, causal, 0.125, bias=b))
            for n, mod in mods.items()}
    runs["nobias"] = lambda: mods["bias"].hopper_fwd(q, k, v, None, causal, 0.125)
    times = {n: [] for n in runs}
    for _ in range(repeats):
        for n, fn in runs.items():
            times[n].append(triton.testing.do_bench_cudagraph(fn))
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile-only", action="store_true", help="write and import the copies only (no GPU)")
    args = p.parse_args()
    try:
        mods = patched_modules()
        if args.compile_only:
            print("modules:", ", ".join(mods))
            return 0
        import torch
        import triton
        print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
        torch.manual_seed(0)
        print(f"{'seqlen':>6} {'causal':>6} " + " ".join(f"{n + ' ms':>10}" for n in [*mods, "nobias"]))
        for s in (2048, 4096, 8192):
            for causal in (False, True):
                med = time_shape(mods, s, causal, args.repeats)
                print(f"{s:>6} {str(causal):>6} " + " ".join(f"{med[n]:>10.4f}" for n in med), flush=True)
    finally:
        for name in PATCHES:
            (KERNELS / f"hopper_probe_{name}.py").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
