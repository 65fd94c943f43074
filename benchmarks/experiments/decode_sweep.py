"""Issue 14: sweep the decode kernel's launch constants on the GPU (one device call).

For a few decode shapes (bf16, d 128, 32 query heads), times ``kernels.decode.attn_decode``
(split kernel + merge) with every (key tile, pipeline stages, warps) combination and a few split
counts around ``choose_splits``' pick, each step's GPU time from CUDA-graph replay, and prints the
achieved K/V bandwidth as a fraction of a device-to-device copy measured in the same run. Checks
each configuration against ``kvcache_attention_ref`` first.

    PYTHONPATH=src python benchmarks/experiments/decode_sweep.py [--out results.json]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_decode import copy_bandwidth, make_case, time_graph  # noqa: E402
from tritonflash.kernels import decode  # noqa: E402
from tritonflash.reference import kvcache_attention_ref  # noqa: E402

SHAPES = [  # batch, cache length, nheads_k, page
    (1, 32768, 8, None), (8, 32768, 8, None), (64, 8192, 8, None), (1, 131072, 8, None), (8, 32768, 1, None),
    (8, 32768, 8, 256), (64, 8192, 8, 256),
]
TILES, STAGES, WARPS = (64, 128), (2, 3, 4), (4, 8)


def run(q, kc, vc, table, length, splits):
    b = q.shape[0]
    lens = torch.full((b,), length, dtype=torch.int32, device=q.device)
    return decode.attn_decode(q, kc, vc, lens, None, table, None, None, True, q.shape[-1] ** -0.5, num_splits=splits,
                              max_keys=length)[0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget", type=float, default=500.0, help="seconds; stop sweeping after this")
    args = ap.parse_args()
    dev = torch.device("cuda")
    copy_bw = copy_bandwidth(dev)
    print(f"{torch.cuda.get_device_name()} copy {copy_bw / 1e9:.0f} GB/s", flush=True)
    rows, t0 = [], time.perf_counter()
    for (b, length, hk, page) in SHAPES:
        torch.manual_seed(0)
        q, kc, vc, table = make_case(b, length, 32, hk, 128, page, dev)
        kv_bytes = 2 * b * length * hk * 128 * 2
        want = kvcache_attention_ref(q, kc, vc, cache_seqlens=length, block_table=table, causal=True).float()
        for tile, stages, warps in itertools.product(TILES, STAGES, WARPS):
            if time.perf_counter() - t0 > args.budget:
                break
            decode.MAX_BLOCK_N, decode.DECODE_STAGES, decode.DECODE_WARPS = tile, stages, warps
            # The tile and split count attn_decode itself picks (its row block: the GQA group x 1 query).
            block_m = max(16, min(32 // hk, decode.MAX_BLOCK_M))
            bn = decode.key_tile(page, 128, 2, decode._shared_limit(dev), block_m)
            auto = decode.choose_splits(b, hk, 1, length, bn, dev, 128, 2, paged=page is not None, block_m=block_m)
            for splits in sorted({max(1, auto // 2), auto, min(decode.MAX_SPLITS, auto * 2)}):
                row = dict(batch=b, length=length, nheads_k=hk, page=page, tile=bn, stages=stages, warps=warps, splits=splits,
                           auto=splits == auto)
                try:
                    err = (run(q, kc, vc, table, length, splits).float() - want).abs().max().item()
                    if not err < 2e-2:
                        row["error"] = f"max error {err:.3g}"
                    else:
                        t = time_graph(functools.partial(run, q, kc, vc, table, length, splits))
                        row.update(us=t * 1e6, frac=kv_bytes / t / copy_bw)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                rows.append(row)
                print(json.dumps(row), flush=True)
        best = max((r for r in rows if r.get("frac") and (r["batch"], r["length"], r["nheads_k"], r["page"]) == (b, length, hk, page)),
                   key=lambda r: r["frac"], default=None)
        print("BEST", json.dumps(best), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), copy_bandwidth=copy_bw, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
