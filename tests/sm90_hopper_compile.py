"""Compile the Gluon Hopper forward (kernels/hopper.py) for sm_90a on a machine without a GPU;
run as a subprocess by test_hopper_fwd.py (the test process runs Triton in interpreter mode).

Importing sm90_compile installs its stand-in sm_90 driver and makes every JIT launch
compile-only, so ``hopper_fwd`` builds exactly the arguments (descriptors included) a GPU
launch would get. argv[1]: a JSON list of cases {"d", "causal", "alibi", "gqa", "dtype",
"seqlen_q", "seqlen_k", "kpm", "bias"}; bias: None, "full" (batch, heads, seqlen_q, seqlen_k)
or "heads" (1, heads, ..., expanded over the batch), rows padded to 16 bytes. Prints one JSON
line per case: shared memory, ptxas return code, registers, spill bytes, C7515 (wgmma
serialised), async wgmma and TMA copies in the PTX.
"""

import torch

import sm90_compile  # installs the stand-in driver and the compile-only launch
from tritonflash.kernels import hopper


def run_case(d, causal, alibi, gqa=1, dtype="bfloat16", seqlen_q=200, seqlen_k=300, kpm=False, bias=None):
    dt = getattr(torch, dtype)
    b, hk = 2, 2
    h = hk * gqa
    q = torch.empty(b, seqlen_q, h, d, dtype=dt)
    k = torch.empty(b, seqlen_k, hk, d, dtype=dt)
    slopes = torch.empty(1, h) if alibi else None
    mask = torch.empty(b, seqlen_k, dtype=torch.uint8) if kpm else None
    bias_t = None
    if bias:
        row = (seqlen_k + 7) // 8 * 8
        bias_t = torch.empty(b if bias == "full" else 1, h, seqlen_q, row, dtype=dt)[..., :seqlen_k].expand(b, h, seqlen_q, seqlen_k)
        assert hopper._bias_ok(bias_t, q, seqlen_k)
    return sm90_compile.gluon_row(lambda: hopper.hopper_fwd(q, k, k, slopes, causal, 0.125, key_padding_mask=mask, bias=bias_t))


if __name__ == "__main__":
    sm90_compile.print_cases(run_case)
