"""Compile the Gluon Hopper dK/dV pass (kernels/hopper_bwd.py) for sm_90a on a machine without
a GPU; run as a subprocess by test_hopper_bwd.py. argv[1]: a JSON list of cases {"d", "causal",
"gqa", "dtype", "seqlen_q", "seqlen_k", "bias"} (bias: None, "heads" (1, h, sq, sk) or "full"
(b, h, sq, sk), the BIAS variant). Prints one JSON line per case (as sm90_hopper_compile.py)."""

import torch

import sm90_compile  # installs the stand-in driver and the compile-only launch
from tritonflash.kernels import hopper_bwd


def run_case(d, causal, gqa=1, dtype="bfloat16", seqlen_q=200, seqlen_k=300, bias=None):
    b, h, dt, q, k, lse = sm90_compile.backward_operands(d, gqa, dtype, seqlen_q, seqlen_k)
    bias_t = None
    if bias:
        row = (seqlen_k + 7) // 8 * 8
        bias_t = torch.empty(b if bias == "full" else 1, h, seqlen_q, row, dtype=dt)[..., :seqlen_k]
    return sm90_compile.gluon_row(
        lambda: hopper_bwd.hopper_bwd_dkdv(q, k, k, q, lse, lse, torch.empty_like(k), torch.empty_like(k), causal, 0.125,
                                           bias=bias_t))


if __name__ == "__main__":
    sm90_compile.print_cases(run_case)
