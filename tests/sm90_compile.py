"""Compile the kernels for sm_90 on a machine without a GPU (run as a subprocess by
test_compile_sm90.py, since the test process runs Triton in interpreter mode).

Triton's frontend and NVIDIA backend (LLVM, ptxas) need no GPU; only the driver does. A stand-in
driver reports an sm_90 target, and ``JITFunction.run`` is made compile-only, so the real
launchers (``attn_fwd``/``attn_bwd``) build exactly the arguments a GPU launch would get.
Prints one JSON line per compiled kernel: name, variant, shared memory, whether wgmma is used.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITONFLASH_AUTOTUNE"] = "0"

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.runtime import driver, jit  # noqa: E402


class _SM90Driver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda


driver.set_active(_SM90Driver())
_compiled = []
_run = jit.JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    _compiled.append((self.fn.__name__, kernel))
    return kernel


jit.JITFunction.run = _compile_only

from tritonflash.kernels import Varlen, attn_bwd, attn_fwd, backward, forward  # noqa: E402
from tritonflash.kernels.common import Features  # noqa: E402


def run_case(d, causal, bias, alibi, kpm, gqa, varlen, dtype, bias_dtype="float32", seqlen=96, window=(-1, -1), softcap=0.0,
             sinks=False, dropout=0.0, amask=False):
    b, s, h = 2, seqlen, 4
    hk = 2 if gqa else h
    dt = getattr(torch, dtype)
    vl = None
    if varlen:
        q = torch.empty(2 * s, h, d, dtype=dt)
        k = torch.empty(2 * s, hk, d, dtype=dt)
        cu = torch.tensor([0, s, 2 * s], dtype=torch.int32)
        vl = Varlen(cu, cu, s, s)
    else:
        q = torch.empty(b, s, h, d, dtype=dt)
        k = torch.empty(b, s, hk, d, dtype=dt)
    bias_t, rows = None, 0
    if bias == "row":
        bias_t, rows = torch.empty(1, h, s, s, dtype=getattr(torch, bias_dtype)).expand(b, h, s, s), s
    elif bias == "vec":
        bias_t, rows = torch.empty(1, h, 1, s), 1
    slopes = torch.empty(1, h) if alibi else None
    mask = torch.empty(b, s, dtype=torch.uint8) if kpm else None
    feats = Features(window=tuple(window), softcap=softcap, sinks=torch.empty(h) if sinks else None, dropout_p=dropout,
                     seed=torch.zeros(1, dtype=torch.int64) if dropout else None,
                     attn_mask=torch.empty(b, 1, s, s, dtype=torch.bool) if amask else None)
    out, lse = attn_fwd(q, k, k, bias_t, slopes, mask, causal, 0.1, varlen=vl, features=feats)
    attn_bwd(out, q, k, k, out, lse, bias_t, slopes, mask, causal, 0.1, bias_grad=rows > 0, varlen=vl, features=feats,
             sinks_grad=sinks)


def backward_operands(d, gqa, dtype, seqlen_q, seqlen_k):
    """Stand-in operands of a Gluon backward pass's compile case (never read): batch 2, 2 k/v
    heads times ``gqa`` query heads. Returns (b, h, dtype, q, k, lse)."""
    dt = getattr(torch, dtype)
    b, hk = 2, 2
    h = hk * gqa
    return b, h, dt, torch.empty(b, seqlen_q, h, d, dtype=dt), torch.empty(b, seqlen_k, hk, d, dtype=dt), torch.empty(b, h, seqlen_q)


def run_decode_case(d, dtype, nheads, nheads_k, seqlen_q=1, page=None, alibi=False, bias=False, window=(-1, -1), softcap=0.0,
                    causal=True, cbi=False, splits=4):
    """The decode kernel (issue 14) as flash_attn_with_kvcache launches it."""
    from tritonflash.kernels.decode import attn_decode

    b, cap = 2, 512
    dt = getattr(torch, dtype)
    q = torch.empty(b, seqlen_q, nheads, d, dtype=dt)
    table = None
    if page:
        kc = torch.empty(b * cap // page, page, nheads_k, d, dtype=dt)
        table = torch.zeros(b, cap // page, dtype=torch.int32)
    else:
        kc = torch.empty(b, cap, nheads_k, d, dtype=dt)
    bias_t = torch.empty(b, nheads, seqlen_q, cap) if bias else None
    attn_decode(q, kc, kc, torch.zeros(b, dtype=torch.int32), torch.zeros(b, dtype=torch.int32) if cbi else None, table, bias_t,
                torch.empty(1, nheads) if alibi else None, causal, 0.1, Features(window=tuple(window), softcap=softcap),
                num_splits=splits)


def run_ptxas(ptx: str, sass: bool = False) -> tuple[int, str, str]:
    """ptxas -v on the PTX for sm_90a: (return code, its log, and with ``sass`` the cubin's
    ``cuobjdump -sass`` listing when it compiled and cuobjdump is beside ptxas, else "")."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        ptxas = get_ptxas(90).path
        proc = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", cubin], capture_output=True, text=True)
        cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
        listing = ""
        if sass and proc.returncode == 0 and os.path.exists(cuobjdump):
            listing = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
    return proc.returncode, proc.stdout + proc.stderr, listing


def ptxas_facts(ptx: str) -> dict:
    """ptxas -v on the PTX for sm_90a: return code, registers, spill bytes, and warning C7515
    (wgmma serialised because other instructions write its accumulator registers inside a
    pipeline stage: register pressure; it cost 10-15% on the H200)."""
    rc, log, _ = run_ptxas(ptx)
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log) + re.findall(r"(\d+) bytes spill loads", log)
    return {"ptxas_rc": rc, "ptxas_regs": int(regs[0]) if regs else None,
            "spill_bytes": sum(int(x) for x in spills) if spills else None, "c7515": "C7515" in log,
            "ptxas_log": log[-1500:] if rc else ""}


def gluon_row(launch) -> dict:
    """Compile one Gluon kernel through ``launch()`` (a library launcher called on CPU tensors)
    and describe it: name, shared memory, async wgmma, TMA copies, and ptxas_facts."""
    _compiled.clear()
    launch()
    (name, kernel), = _compiled
    ptx = kernel.asm["ptx"]
    return {"kernel": name, "shared": kernel.metadata.shared, "wgmma_async": "wgmma.mma_async" in ptx,
            "tma_copies": ptx.count("cp.async.bulk.tensor"), "tma_4d": "cp.async.bulk.tensor.4d" in ptx, **ptxas_facts(ptx)}


def print_cases(run_case):
    """For each case of the JSON list in argv[1], print one JSON line: the case and
    ``run_case(**case)``'s row, or the error it raised (which the calling test reports)."""
    for case in json.loads(sys.argv[1]):
        try:
            row = run_case(**case)
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            row = {"error": f"{type(e).__name__}: {e}"[-3000:]}
        print(json.dumps({"case": case, **row}), flush=True)


def main():
    spec = json.loads(sys.argv[1])
    launchers = {"fwd": forward._launch_fwd, "dkdv": backward._launch_dkdv, "dq": backward._launch_dq,
                 "dbias": backward._launch_dbias}
    for case in spec["cases"]:
        forced = case.pop("force", None)
        check_serial = case.pop("check_serial", False)
        if forced:
            which, (bm, bn, warps, stages) = forced
            launchers[which].forced = next(
                c for c in launchers[which].candidates
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == (bm, bn, warps, stages)
            )
        _compiled.clear()
        label = json.dumps({**case, "force": forced}, sort_keys=True)
        kind = case.pop("kind", "attn")
        try:
            (run_decode_case if kind == "decode" else run_case)(**case)
            for name, kern in _compiled:
                row = {"case": label, "kernel": name, "shared": kern.metadata.shared, "wgmma": "wgmma.mma_async" in kern.asm["ptx"]}
                if check_serial:
                    row["serialised"] = ptxas_facts(kern.asm["ptx"])["c7515"]
                print(json.dumps(row), flush=True)
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            print(json.dumps({"case": label, "error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)
        finally:
            for launcher in launchers.values():
                launcher.forced = None


if __name__ == "__main__":
    main()
