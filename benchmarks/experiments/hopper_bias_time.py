"""Forward time with an additive (1, h, s, s) bf16 bias: the Hopper BIAS variant
(TRITONFLASH_HOPPER_FWD=1, read per call) against the tl kernel (TRITONFLASH_HOPPER_FWD=0) and
against the Hopper kernel without a bias (mode 1 too), 16 heads, 16384 tokens per batch, head
dims 64 and 128. Each row also prints the largest |hopper - tl| output difference. Median of
triton.testing.do_bench, ms.

    PYTHONPATH=src python3 benchmarks/experiments/hopper_bias_time.py
"""

import os

import torch
import triton

from tritonflash import flash_attn_func


def _timed(mode, fn):
    if mode is None:
        os.environ.pop("TRITONFLASH_HOPPER_FWD", None)
    else:
        os.environ["TRITONFLASH_HOPPER_FWD"] = mode
    try:
        return triton.testing.do_bench(fn), fn()
    finally:
        os.environ.pop("TRITONFLASH_HOPPER_FWD", None)


def main():
    torch.manual_seed(0)
    print(f"{'d':>3} {'seqlen':>6} {'causal':>6} {'hopper ms':>10} {'tl ms':>8} {'tl/hopper':>9} "
          f"{'no-bias ms':>10} {'bias cost':>9} {'max |diff|':>10}")
    for d in (128, 64):
        for s in (1024, 2048, 4096, 8192):
            b = 16384 // s
            q, k, v = (torch.randn(b, s, 16, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            bias = torch.randn(1, 16, s, s, device="cuda", dtype=torch.bfloat16)
            for causal in (False, True):
                def run(q=q, k=k, v=v, causal=causal, bias=bias):
                    return flash_attn_func(q, k, v, causal=causal, bias=bias)

                def plain(q=q, k=k, v=v, causal=causal):
                    return flash_attn_func(q, k, v, causal=causal)
                hop, o_hop = _timed("1", run)
                tl_ms, o_tl = _timed("0", run)
                nob, _ = _timed("1", plain)
                diff = (o_hop.float() - o_tl.float()).abs().max().item()
                print(f"{d:>3} {s:>6} {str(causal):>6} {hop:>10.4f} {tl_ms:>8.4f} {tl_ms / hop:>9.3f} "
                      f"{nob:>10.4f} {hop / nob - 1:>9.1%} {diff:>10.2e}", flush=True)
            del q, k, v, bias


if __name__ == "__main__":
    main()
