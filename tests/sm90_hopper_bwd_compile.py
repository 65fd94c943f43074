"""Compile the Gluon Hopper dK/dV pass (kernels/hopper_bwd.py) for sm_90a on a machine without
a GPU; run as a subprocess by test_hopper_bwd.py. argv[1]: a JSON list of cases {"d", "causal",
"gqa", "dtype", "seqlen_q", "seqlen_k"}. Prints one JSON line per case (as sm90_hopper_compile.py)."""

import json
import sys

import torch

import sm90_compile  # installs the stand-in driver and the compile-only launch
from tritonflash.kernels import hopper_bwd


def run_case(d, causal, gqa=1, dtype="bfloat16", seqlen_q=200, seqlen_k=300):
    dt = getattr(torch, dtype)
    b, hk = 2, 2
    h = hk * gqa
    q = torch.empty(b, seqlen_q, h, d, dtype=dt)
    k = torch.empty(b, seqlen_k, hk, d, dtype=dt)
    lse = torch.empty(b, h, seqlen_q)
    sm90_compile._compiled.clear()
    hopper_bwd.hopper_bwd_dkdv(q, k, k, q, lse, lse, torch.empty_like(k), torch.empty_like(k), causal, 0.125)
    (name, kernel), = sm90_compile._compiled
    ptx = kernel.asm["ptx"]
    return {"kernel": name, "shared": kernel.metadata.shared, "wgmma_async": "wgmma.mma_async" in ptx,
            "tma_copies": ptx.count("cp.async.bulk.tensor"), **sm90_compile.ptxas_facts(ptx)}


def main():
    for case in json.loads(sys.argv[1]):
        try:
            row = run_case(**case)
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            row = {"error": f"{type(e).__name__}: {e}"[-3000:]}
        print(json.dumps({"case": case, **row}), flush=True)


if __name__ == "__main__":
    main()
