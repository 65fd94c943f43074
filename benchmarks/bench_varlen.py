"""Varlen benchmark (issue: GQA/varlen): 16k tokens in sequences of mixed lengths, causal.

Methods, same inputs, same process: tritonflash varlen (packed, no padding); tritonflash on the
padded batch with key_padding_mask; FlexAttention on the packed sequence with a document mask.
FLOPs count useful work only (sum over sequences of the causal attention of each), so TFLOP/s
compare directly. Each method is checked against tritonflash.attention_ref on one sequence and
must agree with the varlen output on every real row before it is timed.
Usage: python benchmarks/bench_varlen.py [--out DIR] [--commit SHA]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import triton

from tritonflash import attention_ref, flash_attn_func, flash_attn_varlen_func, pad_input

LENGTHS = [4096, 3000, 2048, 2000, 1500, 1024, 1000, 700, 600, 316, 64, 30, 6]  # sums to 16384
HEADS, HEAD_DIM, DTYPE = 16, 128, torch.bfloat16


def rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--commit", default=None)
    args = ap.parse_args(argv)
    assert sum(LENGTHS) == 16384
    dev = "cuda"
    torch.manual_seed(0)
    total, batch, max_len = sum(LENGTHS), len(LENGTHS), max(LENGTHS)
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(total, HEADS, HEAD_DIM, dtype=DTYPE, device=dev, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    flops_fwd = sum(4 * HEADS * s * s * HEAD_DIM / 2 for s in LENGTHS)

    # Padded layout of the same tokens.
    mask = torch.arange(max_len, device=dev)[None, :] < torch.tensor(LENGTHS, device=dev)[:, None]
    indices = torch.nonzero(mask.flatten()).flatten()

    def padded(x):
        return pad_input(x, indices, batch, max_len)

    doc = torch.repeat_interleave(torch.arange(batch, device=dev), torch.tensor(LENGTHS, device=dev))

    def run_varlen():
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)

    def run_padded():
        # Right-padded rows: bottom-right causal with sq == sk is top-left, and padded keys come
        # after every real query's visible range, so the key padding mask only guards pad rows.
        out = flash_attn_func(padded(q), padded(k), padded(v), causal=True, key_padding_mask=mask)
        return out.flatten(0, 1)[indices]

    methods = {"tritonflash_varlen": run_varlen, "tritonflash_padded": run_padded}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def doc_causal(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)

        block_mask = create_block_mask(doc_causal, 1, 1, total, total, device=dev)
        flex = torch.compile(flex_attention)

        def run_flex():
            o = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block_mask)
            return o[0].transpose(0, 1)

        methods["flex_document_mask"] = run_flex
    except Exception as e:  # noqa: BLE001 - a missing peer is a row, not a crash
        print("flex unavailable:", e)

    ref_out = None
    s0, s1 = LENGTHS[0], LENGTHS[0] + LENGTHS[1]  # check the second sequence against the oracle
    oracle = attention_ref(q[s0:s1][None], k[s0:s1][None], v[s0:s1][None], causal=True)[0]
    rows = []
    for name, fn in methods.items():
        row = dict(suite="varlen", headdim=HEAD_DIM, causal=True, seqlen=total, lengths=LENGTHS, method=name)
        try:
            out = fn()
            err_oracle = rel_err(out[s0:s1], oracle)
            err_varlen = 0.0 if ref_out is None else rel_err(out, ref_out)
            if ref_out is None:
                ref_out = out.detach()
            if err_oracle > 2e-2 or err_varlen > 2e-2:
                raise RuntimeError(f"failed correctness check: rel err {err_oracle:.2e} vs oracle, {err_varlen:.2e} vs varlen")
            for p in ("fwd", "fwdbwd"):
                if p == "fwd":
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                    flops = flops_fwd
                else:
                    ms = triton.testing.do_bench(lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), dout), warmup=25, rep=100,
                                                 return_mode="median")
                    flops = 3.5 * flops_fwd
                rows.append(dict(row, **{"pass": p, "ms": ms, "tflops": flops / ms / 1e9}))
                print(f"{name:22s} {p:7s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s")
        except Exception as e:  # noqa: BLE001
            for p in ("fwd", "fwdbwd"):
                rows.append(dict(row, **{"pass": p, "ms": None, "tflops": None, "error": f"{type(e).__name__}: {e}"[:400]}))
            print(f"{name:22s} ERROR {type(e).__name__}: {str(e)[:200]}")
        torch.cuda.empty_cache()

    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    gpu = torch.cuda.get_device_name()
    short = "h100" if "H100" in gpu else ("h200" if "H200" in gpu else gpu.split()[-1].lower())
    args.out.mkdir(parents=True, exist_ok=True)
    doc_out = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "commit": commit or "unknown", "rows": rows}
    path = args.out / f"{short}-varlen.json"
    path.write_text(json.dumps(doc_out, indent=1))
    print("wrote", path)
    base = {r["pass"]: r["tflops"] for r in rows if r["method"] == "tritonflash_varlen"}
    for r in rows:
        if r["method"] != "tritonflash_varlen" and r.get("tflops"):
            print(f"varlen / {r['method']} {r['pass']}: {base[r['pass']] / r['tflops']:.2f}x")
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("bench_varlen needs a CUDA GPU", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("TRITONFLASH_AUTOTUNE", "1")
    sys.exit(main())
