"""KV-cache decoding benchmark (issue 14), a skeleton: time per decoding step and achieved
bandwidth (bytes of K/V read / time) of ``flash_attn_with_kvcache`` against its peers, beside a
large device-to-device copy measured in the same run (the issue's target: >= 80% of it when the
cache read is >= 256 MB).

    PYTHONPATH=src python benchmarks/bench_decode.py                 # the issue's shapes (GPU)
    PYTHONPATH=src python benchmarks/bench_decode.py --quick         # batch 1/8, 8k/32k
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/bench_decode.py --smoke   # CPU: tiny, checks only

Methods: ``tf_decode`` (flash_attn_with_kvcache; contiguous and paged), ``tf_decode_alibi`` and
``tf_decode_bias`` (the ALiBi / (b, h, 1, L) bias cost), ``tf_prefill`` (flash_attn_func with
seqlen_q = 1 over the valid keys: what the layers did before), ``sdpa_gqa``
(scaled_dot_product_attention with enable_gqa on the cache view). Not yet: FlexAttention's
decoding, the layers' concat path timed end to end, the plot, and wiring this into
bench_attention.py as the ``decode`` suite of ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from tritonflash import flash_attn_func, flash_attn_with_kvcache, gen_slopes
from tritonflash.reference import kvcache_attention_ref

NHEADS, HEADDIM = 32, 128
FULL = dict(batches=[1, 8, 64], lengths=[1024, 8192, 32768, 131072], nheads_k=[8, 1], pages=[None, 256])
QUICK = dict(batches=[1, 8], lengths=[8192, 32768], nheads_k=[8], pages=[None, 256])
SMOKE = dict(batches=[1, 2], lengths=[40], nheads_k=[2, 1], pages=[None, 16])
SMOKE_HEADS, SMOKE_DIM = 4, 32
MAX_CACHE_BYTES = 40 * 2**30  # skip cases whose K/V cache would not fit beside the peers


def copy_bandwidth(device, nbytes=2**30) -> float:
    """Bytes moved per second (read + write) by a large device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src))
    return 2 * nbytes / t


def time_fn(fn, reps=50) -> float:
    """Median seconds of one call (CUDA events; the first call warms up)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def make_case(batch, length, nheads, nheads_k, d, page, device, dtype=torch.bfloat16):
    """q (batch, 1, h, d), a cache holding ``length`` valid keys per sequence (contiguous, or
    paged with shuffled blocks), its block table."""
    q = torch.randn(batch, 1, nheads, d, device=device, dtype=dtype)
    if page is None:
        kc = torch.randn(batch, length, nheads_k, d, device=device, dtype=dtype)
        return q, kc, torch.randn_like(kc), None
    blocks = -(-length // page)
    kc = torch.randn(batch * blocks, page, nheads_k, d, device=device, dtype=dtype)
    table = torch.randperm(batch * blocks, device=device).view(batch, blocks).to(torch.int32)
    return q, kc, torch.randn_like(kc), table


def methods(q, kc, vc, table, length):
    nheads = q.shape[2]
    slopes = gen_slopes(nheads, device=q.device)
    bias = torch.randn(q.shape[0], nheads, 1, kc.shape[1] if table is None else table.shape[1] * kc.shape[1], device=q.device)
    common = dict(cache_seqlens=length, block_table=table, causal=True)
    out = {
        "tf_decode": lambda: flash_attn_with_kvcache(q, kc, vc, **common),
        "tf_decode_alibi": lambda: flash_attn_with_kvcache(q, kc, vc, alibi_slopes=slopes, **common),
        "tf_decode_bias": lambda: flash_attn_with_kvcache(q, kc, vc, bias=bias, **common),
    }
    if table is None:
        k, v = kc[:, :length], vc[:, :length]
        out["tf_prefill"] = lambda: flash_attn_func(q, k, v, causal=True)
        out["sdpa_gqa"] = lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                                 enable_gqa=True)
    return out, dict(alibi_slopes=slopes, bias=bias)


def check(q, kc, vc, table, length, extra) -> float:
    """Largest error of the decode kernel (with ALiBi) against the reference."""
    got = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=length, block_table=table, causal=True,
                                  alibi_slopes=extra["alibi_slopes"])
    want = kvcache_attention_ref(q, kc, vc, cache_seqlens=length, block_table=table, causal=True,
                                 alibi_slopes=extra["alibi_slopes"])
    return (got.float() - want.float()).abs().max().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, correctness only (CPU with TRITON_INTERPRET=1)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    if smoke and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        print("note: without a GPU set TRITON_INTERPRET=1 to run the kernels (else the reference runs)", file=sys.stderr)
    grid = SMOKE if smoke else (QUICK if args.quick else FULL)
    nheads, d = (SMOKE_HEADS, SMOKE_DIM) if smoke else (NHEADS, HEADDIM)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    copy_bw = None if smoke else copy_bandwidth(device)
    if copy_bw:
        print(f"device copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    for nheads_k in grid["nheads_k"]:
        for page in grid["pages"]:
            for batch in grid["batches"]:
                for length in grid["lengths"]:
                    kv_bytes = 2 * batch * length * nheads_k * d * 2
                    if kv_bytes > MAX_CACHE_BYTES:
                        continue
                    torch.manual_seed(0)
                    q, kc, vc, table = make_case(batch, length, nheads, nheads_k, d, page, device)
                    fns, extra = methods(q, kc, vc, table, length)
                    with torch.no_grad():
                        err = check(q, kc, vc, table, length, extra)
                        row = dict(batch=batch, length=length, nheads=nheads, nheads_k=nheads_k, d=d, page=page,
                                   kv_bytes=kv_bytes, max_err=err)
                        if not smoke:
                            for name, fn in fns.items():
                                t = time_fn(fn)
                                row[f"{name}_us"] = t * 1e6
                                row[f"{name}_GBps"] = kv_bytes / t / 1e9
                            row["copy_fraction"] = row["tf_decode_GBps"] * 1e9 / copy_bw
                        else:
                            for fn in fns.values():
                                fn()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(copy_bandwidth=copy_bw, rows=rows), f, indent=1)
    bad = [r for r in rows if not r["max_err"] < 2e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
