"""The Gluon dK/dV pass (kernels/hopper_bwd.py) against the tl one: the whole backward
(``attn_bwd``: preprocess, dK/dV, dQ) timed with TRITONFLASH_HOPPER_BWD=0 and =1 under a CUDA
graph, and the largest dK/dV difference between the two. Without ``--bias``: d128, b*s = 16k
tokens, 16 heads. With ``--bias``: a learned (1, h, s, s) bf16 bias with its gradient (the
Gluon dbias pass in both columns), b*s = 16k, d64 with 32 heads (the bias_grad suite's shape)
and d128 with 16 heads, which is how the default of ``TRITONFLASH_HOPPER_BWD`` (auto: the calls
with a bias in ``hopper_bwd.AUTO_BIAS``) was chosen.

    PYTHONPATH=src python benchmarks/experiments/hopper_bwd_time.py [--bias]
"""

from __future__ import annotations

import os
import sys

import torch
import triton

from tritonflash.kernels import attn_bwd, attn_fwd, backward, hopper_bwd

SHAPES = [(4, 4096, 16, 128, False), (4, 4096, 16, 128, True), (16, 1024, 16, 128, False), (16, 1024, 16, 128, True)]
BIAS_SHAPES = [(b, s, h, d, causal) for s in (1024, 4096) for h, d in ((32, 64), (16, 128)) for causal in (False, True)
               for b in (16384 // s,)]


CALLS = [0]
_real_dkdv = hopper_bwd.hopper_bwd_dkdv


def _counted_dkdv(*args, **kwargs):
    CALLS[0] += 1
    return _real_dkdv(*args, **kwargs)


hopper_bwd.hopper_bwd_dkdv = _counted_dkdv


def measure(b, s, h, d, causal, with_bias=False) -> None:
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    bias = torch.randn(1, h, s, s, device="cuda", dtype=torch.bfloat16) if with_bias else None
    scale = d ** -0.5
    out, lse = attn_fwd(q, k, v, bias, None, None, causal, scale)

    def run():
        return attn_bwd(do, q, k, v, out, lse, bias, None, None, causal, scale, bias_grad=with_bias)

    res = {}
    for mode in ("0", "1"):
        os.environ[backward.HOPPER_BWD_ENV] = mode  # read per call: fixed in the captured graph
        before = CALLS[0]
        res[mode] = (triton.testing.do_bench_cudagraph(run), run())
        # The Gluon pass must have run with the switch on (and only then): equal bits prove nothing otherwise.
        assert (CALLS[0] > before) == (mode == "1"), f"switch {mode}: Gluon dK/dV calls {CALLS[0] - before}"
    flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)  # the backward's 5 matmuls (FA convention)
    dk_diff = (res["0"][1][1].float() - res["1"][1][1].float()).abs().max().item()
    dv_diff = (res["0"][1][2].float() - res["1"][1][2].float()).abs().max().item()
    print(f"b{b} s{s} h{h} d{d} {'causal' if causal else 'full'}{' bias' if with_bias else ''}: backward tl {res['0'][0]:.3f} ms "
          f"({flops / res['0'][0] / 1e9:.0f} TFLOP/s), gluon dK/dV {res['1'][0]:.3f} ms ({flops / res['1'][0] / 1e9:.0f}), "
          f"max |dk diff| {dk_diff:.3e}, |dv diff| {dv_diff:.3e}", flush=True)


def main() -> None:
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    torch.manual_seed(0)
    with_bias = "--bias" in sys.argv[1:]
    for shape in BIAS_SHAPES if with_bias else SHAPES:
        measure(*shape, with_bias=with_bias)


if __name__ == "__main__":
    main()
