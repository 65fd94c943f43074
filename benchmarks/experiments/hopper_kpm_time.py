"""Forward time with a key padding mask: the Hopper kernel (default at d128) against the tl kernel
(TRITONFLASH_HOPPER_FWD=0, read per call) and against no mask, d128 bf16, 16 heads, 16384 tokens
per batch. Masks: 'right' (each sequence keeps its first 50-100% of keys: padding in the last
blocks only) and 'random' (every key kept with probability 0.9: a padded key in every block, the
worst case for the V-row zeroing). Median of triton.testing.do_bench, ms.

    PYTHONPATH=src python3 benchmarks/experiments/hopper_kpm_time.py
"""

import os

import torch
import triton

from tritonflash import flash_attn_func


def main():
    torch.manual_seed(0)
    print(f"{'seqlen':>6} {'causal':>6} {'mask':>6} {'hopper ms':>10} {'tl ms':>8} {'tl/hopper':>9} {'no-mask hopper ms':>17}")
    for s in (1024, 4096, 16384):
        b = 16384 // s
        q, k, v = (torch.randn(b, s, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        lens = torch.randint(s // 2, s + 1, (b,), device="cuda")
        masks = {"right": (torch.arange(s, device="cuda")[None] < lens[:, None]),
                 "random": torch.rand(b, s, device="cuda") < 0.9}
        for causal in (False, True):
            os.environ.pop("TRITONFLASH_HOPPER_FWD", None)
            plain = triton.testing.do_bench(lambda q=q, k=k, v=v, causal=causal: flash_attn_func(q, k, v, causal=causal))
            for name, m in masks.items():
                def run(q=q, k=k, v=v, causal=causal, m=m):
                    return flash_attn_func(q, k, v, causal=causal, key_padding_mask=m)
                os.environ.pop("TRITONFLASH_HOPPER_FWD", None)
                hop = triton.testing.do_bench(run)
                os.environ["TRITONFLASH_HOPPER_FWD"] = "0"
                tl_ms = triton.testing.do_bench(run)
                os.environ.pop("TRITONFLASH_HOPPER_FWD", None)
                print(f"{s:>6} {str(causal):>6} {name:>6} {hop:>10.4f} {tl_ms:>8.4f} {tl_ms / hop:>9.3f} {plain:>17.4f}", flush=True)


if __name__ == "__main__":
    main()
