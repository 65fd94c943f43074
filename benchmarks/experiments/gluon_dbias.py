"""Timing and check of the Gluon bias-gradient pass (issue 15, item 3; kernels/hopper_dbias.py,
default in the library on sm_90, off with TRITONFLASH_HOPPER_DBIAS=0) against the library's ``tl`` pass
(``_attn_bwd_dbias``), for the bias_grad suite's case: a learned (1, h, s, s) bias shared by the
batch, d64 and d128, 16k tokens, causal and not (docs/perf-notes.md, change 20).

``--check`` first compares with the library's default bias gradient (small GQA cases with
seqlen_k > seqlen_q, then the timed shapes, and bitwise reproducibility). ``--formula`` checks,
on the CPU, the kernel's arithmetic written in torch (formula_dbias) against autograd through
the library's reference: it guards the math, not the kernel. Needs a GPU except ``--formula``;
run under ``timeout`` (a wrong barrier phase hangs).

    PYTHONPATH=src python3 benchmarks/experiments/gluon_dbias.py [--formula] [--check] [--seqlens 1024,4096]
        [--headdims 64,128]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import triton

from tritonflash.kernels.backward import HOPPER_DBIAS_ENV
from tritonflash.kernels.hopper import LOG2E
from tritonflash.kernels.hopper_dbias import hopper_dbias


def _rel_err(ours, theirs) -> float:
    """Largest difference relative to the largest reference value."""
    return ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max().clamp_min(1e-6)).item()


def formula_dbias(q, k, v, dout, out, lse, bias, causal, softmax_scale):
    """The kernel's arithmetic in torch (CPU or GPU, any float dtype): the causal mask folded into
    the bias as -inf, P = exp2(q.k * scale * log2 e + bias * log2 e - lse * log2 e) with a row's
    lse of -inf read as +inf (and, under causal masking, P = 0 at a folded -inf and dS = 0 where
    P = 0), then dS = P * (dP - delta) summed over the batch. Shapes as
    hopper_dbias; returns (1, h, sq, sk) in q's dtype."""
    batch, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    k, v = (x.repeat_interleave(h // hk, dim=2) for x in (k, v))  # query head h reads kv head h // group
    b = bias.to(q.dtype)
    if causal:
        hidden = torch.arange(sk, device=q.device)[None, :] > torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        b = b.masked_fill(hidden, float("-inf"))
    lse2 = (lse * LOG2E).masked_fill(lse == float("-inf"), float("inf"))
    delta = (out.to(q.dtype) * dout).sum(-1).transpose(1, 2)  # (batch, h, sq)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k)
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, v)
    x = s * (softmax_scale * LOG2E) + b * LOG2E - lse2[..., None]
    if causal:
        x = x.masked_fill(b == float("-inf"), float("-inf"))  # P = 0 at a hidden key whatever S is
    p = torch.exp2(x)
    ds = p * (dp - delta[..., None])
    if causal:
        ds = ds.masked_fill(p == 0, 0.0)  # and dS = 0 wherever P is, whatever dP is
    return ds.sum(0, keepdim=True)


def formula_check() -> float:
    """formula_dbias against autograd through tritonflash.reference.attention_ref (fp32 on the
    CPU: GQA, seqlen_k > seqlen_q, causal and not, a row whose every key has a -inf bias and a
    NaN bias at a causally hidden key). Returns the largest error relative to the largest value."""
    from tritonflash.reference import attention_ref

    torch.manual_seed(0)
    worst = 0.0
    for causal in (False, True):
        b, sq, sk, h, hk, d = 3, 24, 40, 4, 2, 16
        q = torch.randn(b, sq, h, d)
        k, v = (torch.randn(b, sk, hk, d) for _ in range(2))
        dout = torch.randn(b, sq, h, d)
        bias = torch.randn(1, h, sq, sk)
        bias[0, 1, 5] = float("-inf")  # a row that sees no key
        if causal:
            bias[0, 2, 0, sk - 1] = float("nan")  # hidden from row 0 by the causal mask
        bias.requires_grad_()
        out, lse = attention_ref(q, k, v, bias, causal, d ** -0.5, return_lse=True)
        (grad,) = torch.autograd.grad(out, bias, dout)
        ours = formula_dbias(q, k, v, dout, out.detach(), lse.detach(), bias.detach(), causal, d ** -0.5)
        if not (torch.isfinite(ours).all() and torch.isfinite(grad).all()):
            return float("inf")
        worst = max(worst, _rel_err(ours, grad))
    return worst


def _library_dbias(q, k, v, bias, causal, dout):
    """The library's bias gradient through its public API (flash_attn_func, autograd)."""
    from tritonflash import flash_attn_func
    bias = bias.detach().requires_grad_()
    out = flash_attn_func(q, k, v, bias, causal)
    return torch.autograd.grad(out, bias, dout)[0]


def _library_dbias_ms(q, k, v, bias, causal, dout):
    """CUDA time of the library's _attn_bwd_dbias kernel in a fwd+bwd (torch profiler)."""
    from exp_bwd_configs import kernel_times  # this folder (run as a script)

    from tritonflash import flash_attn_func
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    bias = bias.detach().requires_grad_()
    times = kernel_times(lambda: torch.autograd.grad(flash_attn_func(qq, kk, vv, bias, causal), (qq, kk, vv, bias), dout))
    return sum(ms for key, ms in times.items() if key.startswith("_attn_bwd_dbias"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--check", action="store_true", help="compare with the library's bias gradient first")
    p.add_argument("--seqlens", default="1024,4096")
    p.add_argument("--headdims", default="64,128")
    p.add_argument("--formula", action="store_true",
                   help="check the kernel's arithmetic, written in torch, against autograd on the CPU (no GPU)")
    args = p.parse_args(argv)
    if args.formula:
        err = formula_check()
        print(f"formula check {'passed' if err < 1e-4 else 'FAILED'} (max rel diff {err:.2e})")
        return 0 if err < 1e-4 else 1
    from tritonflash import flash_attn_func

    # "library" is the tl pass: the Gluon pass is the library's default on sm_90.
    os.environ[HOPPER_DBIAS_ENV] = "0"
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    worst = 0.0
    if args.check:
        # Small cases the timed shapes do not cover: GQA, seqlen_k > seqlen_q (causal offset and
        # all-zero tiles), each head dim.
        for d in (int(x) for x in args.headdims.split(",")):
            for causal in (False, True):
                torch.manual_seed(1)
                q, dout = (torch.randn(2, 256, 8, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
                k, v = (torch.randn(2, 512, 2, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
                bias = torch.randn(1, 8, 256, 512, device="cuda", dtype=torch.bfloat16)
                out, lse = flash_attn_func(q, k, v, bias, causal, return_lse=True)
                delta = (out.float() * dout.float()).sum(-1).transpose(1, 2).contiguous()
                ours = hopper_dbias(q, k, v, dout, lse.contiguous(), delta, bias, causal, d ** -0.5)
                theirs = _library_dbias(q, k, v, bias, causal, dout)
                err = _rel_err(ours, theirs)
                worst = max(worst, err)
                print(f"check d{d} gqa 8/2 sq 256 sk 512 causal={causal}: max rel diff {err:.2e}", flush=True)
    print(f"{'d':>3} {'seqlen':>6} {'causal':>6} {'gluon ms':>9} {'library ms':>10} {'library/gluon':>13} {'max rel diff':>12}")
    for d in (int(x) for x in args.headdims.split(",")):
        for s in (int(x) for x in args.seqlens.split(",")):
            b, h = 16384 // s, 2048 // d  # the bias_grad suite's shapes
            torch.manual_seed(0)
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            bias = torch.randn(1, h, s, s, device="cuda", dtype=torch.bfloat16)
            dout = torch.randn_like(q)
            for causal in (False, True):
                scale = d ** -0.5
                out, lse = flash_attn_func(q, k, v, bias, causal, return_lse=True)
                delta = (out.float() * dout.float()).sum(-1).transpose(1, 2).contiguous()
                lse = lse.contiguous()
                run = functools.partial(hopper_dbias, q, k, v, dout, lse, delta, bias, causal, scale)
                err = float("nan")
                if args.check:
                    ours, again = run(), run()
                    theirs = _library_dbias(q, k, v, bias, causal, dout)
                    err = _rel_err(ours, theirs)
                    worst = max(worst, err)
                    if not torch.equal(ours, again):
                        print("  not bitwise reproducible")
                        worst = float("inf")
                t_g = triton.testing.do_bench(run)
                t_l = _library_dbias_ms(q, k, v, bias, causal, dout)
                print(f"{d:>3} {s:>6} {str(causal):>6} {t_g:>9.4f} {t_l:>10.4f} {t_l / t_g:>13.3f} {err:>12.2e}", flush=True)
    if args.check:
        print("check", "passed" if worst < 2e-2 else "FAILED", f"(worst {worst:.2e})")
        return 0 if worst < 2e-2 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
