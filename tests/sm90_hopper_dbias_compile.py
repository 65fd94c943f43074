"""Compile the Gluon Hopper bias-gradient pass (kernels/hopper_dbias.py) for sm_90a on a machine
without a GPU; run as a subprocess by test_hopper_dbias.py. argv[1]: a JSON list of cases {"d",
"causal", "gqa", "dtype", "seqlen_q", "seqlen_k", "bias"} with bias "heads" (1, h, sq, sk: summed
over the batch), "full" (b, h, sq, sk) or "shared" (1, 1, sq, sk: summed over batch and heads).
Prints one JSON line per case (as sm90_hopper_compile.py)."""

import torch

import sm90_compile  # installs the stand-in driver and the compile-only launch
from tritonflash.kernels import hopper_dbias


def run_case(d, causal, gqa=1, dtype="bfloat16", seqlen_q=200, seqlen_k=304, bias="heads"):
    b, h, dt, q, k, lse = sm90_compile.backward_operands(d, gqa, dtype, seqlen_q, seqlen_k)
    shape = {"heads": (1, h), "full": (b, h), "shared": (1, 1)}[bias] + (seqlen_q, seqlen_k)
    bias_t = torch.empty(shape, dtype=dt)
    return sm90_compile.gluon_row(lambda: hopper_dbias.hopper_dbias(q, k, k, q, lse, lse, bias_t, causal, 0.125))


if __name__ == "__main__":
    sm90_compile.print_cases(run_case)
