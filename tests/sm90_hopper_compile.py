"""Compile the Gluon Hopper forward (kernels/hopper.py) for sm_90a on a machine without a GPU;
run as a subprocess by test_hopper_fwd.py (the test process runs Triton in interpreter mode).

Importing sm90_compile installs its stand-in sm_90 driver and makes every JIT launch
compile-only, so ``hopper_fwd`` builds exactly the arguments (descriptors included) a GPU
launch would get. argv[1]: a JSON list of cases {"d", "causal", "alibi", "gqa", "dtype",
"seqlen_q", "seqlen_k", "kpm"}. Prints one JSON line per case: shared memory, ptxas return code,
registers, spill bytes, C7515 (wgmma serialised), async wgmma and TMA copies in the PTX.
"""

import torch

import sm90_compile  # installs the stand-in driver and the compile-only launch
from tritonflash.kernels import hopper


def run_case(d, causal, alibi, gqa=1, dtype="bfloat16", seqlen_q=200, seqlen_k=300, kpm=False):
    dt = getattr(torch, dtype)
    b, hk = 2, 2
    h = hk * gqa
    q = torch.empty(b, seqlen_q, h, d, dtype=dt)
    k = torch.empty(b, seqlen_k, hk, d, dtype=dt)
    slopes = torch.empty(1, h) if alibi else None
    mask = torch.empty(b, seqlen_k, dtype=torch.uint8) if kpm else None
    return sm90_compile.gluon_row(lambda: hopper.hopper_fwd(q, k, k, slopes, causal, 0.125, key_padding_mask=mask))


if __name__ == "__main__":
    sm90_compile.print_cases(run_case)
