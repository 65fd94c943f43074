"""Compile the Gluon Hopper forward (kernels/hopper.py) for sm_90a on a machine without a GPU;
run as a subprocess by test_hopper_fwd.py (the test process runs Triton in interpreter mode).

Importing sm90_compile installs its stand-in sm_90 driver and makes every JIT launch
compile-only, so ``hopper_fwd`` builds exactly the arguments (descriptors included) a GPU
launch would get. argv[1]: a JSON list of cases {"d", "causal", "alibi", "gqa", "dtype",
"seqlen_q", "seqlen_k"}. Prints one JSON line per case: shared memory, ptxas return code,
registers, spill bytes, C7515 (wgmma serialised), async wgmma and TMA copies in the PTX.
"""

import json
import sys

import torch

import sm90_compile  # installs the stand-in driver and the compile-only launch
from tritonflash.kernels import hopper


def run_case(d, causal, alibi, gqa=1, dtype="bfloat16", seqlen_q=200, seqlen_k=300):
    dt = getattr(torch, dtype)
    b, hk = 2, 2
    h = hk * gqa
    q = torch.empty(b, seqlen_q, h, d, dtype=dt)
    k = torch.empty(b, seqlen_k, hk, d, dtype=dt)
    slopes = torch.empty(1, h) if alibi else None
    sm90_compile._compiled.clear()
    hopper.hopper_fwd(q, k, k, slopes, causal, 0.125)
    (name, kernel), = sm90_compile._compiled
    ptx = kernel.asm["ptx"]
    return {"kernel": name, "shared": kernel.metadata.shared, "wgmma_async": "wgmma.mma_async" in ptx,
            "tma_copies": ptx.count("cp.async.bulk.tensor"), "tma_4d": "cp.async.bulk.tensor.4d" in ptx, **sm90_compile.ptxas_facts(ptx)}


def main():
    for case in json.loads(sys.argv[1]):
        try:
            row = run_case(**case)
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            row = {"error": f"{type(e).__name__}: {e}"[-3000:]}
        print(json.dumps({"case": case, **row}), flush=True)


if __name__ == "__main__":
    main()
