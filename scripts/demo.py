"""tritonflash in one minute: causal attention with ALiBi, forward and backward, checked against
the fp32 reference, timed beside PyTorch's scaled_dot_product_attention.

    make demo        (or: PYTHONPATH=src python scripts/demo.py)

ALiBi is given two ways: as a (1, heads, 1, seqlen) bias tensor (MPT's build_alibi_bias; any
broadcastable additive bias works the same way), and as per-head slopes that the kernel turns
into the bias itself (no bias tensor at all). On a machine without a CUDA GPU the same Triton
kernels run on CPU in Triton's interpreter, at a small size, and are only checked, not timed.
Exit status 1 if a check fails.
"""

from __future__ import annotations

import os
import sys

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # The interpreter must be chosen before Triton is imported (tritonflash imports it).
    os.environ["TRITON_INTERPRET"] = "1"

import tritonflash  # noqa: E402
from tritonflash import attention_ref, build_alibi_bias, flash_attn_func, gen_slopes  # noqa: E402

REL_TOL = 2e-2  # ||x - ref|| / ||ref||; bf16 rounding alone gives a few 1e-3


def relative_error(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def check(name, q, k, v, dout, bias=None, slopes=None):
    """Run tritonflash forward+backward, then compare batch 0, heads 0-1 (output and the gradients
    of q, k, v) with attention_ref in fp32 on the same slice of the same inputs."""
    out = flash_attn_func(q, k, v, bias, causal=True, alibi_slopes=slopes)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)

    def cut(t):  # batch 0, heads 0-1, as fp32 leaves for the reference's gradients
        return t[:1, :, :2].detach().float().requires_grad_(True)

    q_s, k_s, v_s = cut(q), cut(k), cut(v)
    out_ref = attention_ref(
        q_s, k_s, v_s, None if bias is None else bias[:, :2].float(), causal=True,
        alibi_slopes=None if slopes is None else slopes[:2],
    )
    grads_ref = torch.autograd.grad(out_ref, (q_s, k_s, v_s), dout[:1, :, :2])
    errors = {
        "out": relative_error(out[:1, :, :2], out_ref),
        **{g: relative_error(mine[:1, :, :2], ref) for g, mine, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), grads_ref)},
    }
    ok = all(e <= REL_TOL for e in errors.values())  # False for NaN too
    detail = "  ".join(f"{n} {e:.1e}" for n, e in errors.items())
    print(f"  {name:<34} {detail}   {'PASS' if ok else 'FAIL'}")
    return ok


def measure(fn, q, k, v, dout, flops_fwd):
    """Median time of forward and of forward+backward (triton.testing.do_bench), TFLOP/s, and the
    peak memory one forward+backward allocates beyond its inputs."""
    import triton.testing

    def fwd_bwd():
        return torch.autograd.grad(fn(), (q, k, v), dout)

    fwd_bwd()  # warm-up: compile and autotune outside the timings
    ms_fwd = triton.testing.do_bench(fn, return_mode="median")
    ms_fb = triton.testing.do_bench(fwd_bwd, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    tflops = lambda ms, flops: flops / (ms * 1e-3) / 1e12
    return ms_fwd, tflops(ms_fwd, flops_fwd), ms_fb, tflops(ms_fb, 3.5 * flops_fwd), peak


def main() -> int:
    torch.manual_seed(0)
    if ON_GPU:
        batch, seqlen, heads, headdim = 4, 4096, 16, 128
        device = "cuda"
        print(f"tritonflash {tritonflash.__version__} on {torch.cuda.get_device_name()} "
              f"(torch {torch.__version__})")
    else:
        batch, seqlen, heads, headdim = 1, 128, 2, 64
        device = "cpu"
        print("No CUDA GPU found. Running the Triton kernels on CPU in Triton's interpreter "
              "(TRITON_INTERPRET=1) at a small size, checking them against the fp32 reference; "
              "timing and memory need a GPU.")
    print(f"shape: batch {batch}, seqlen {seqlen}, heads {heads}, headdim {headdim}, bf16, causal, ALiBi\n")

    dtype = torch.bfloat16
    q, k, v = (torch.randn(batch, seqlen, heads, headdim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    # MPT's per-key ALiBi vector (equal to the distance form under causal, up to a per-row constant
    # that softmax ignores), rounded to bf16 as MPT uses it.
    bias = build_alibi_bias(heads, seqlen, device=device).to(dtype)  # (1, heads, 1, seqlen)
    slopes = gen_slopes(heads, device=device)  # (heads,) fp32

    print(f"correctness: forward and backward, batch 0 heads 0-1 vs fp32 attention_ref "
          f"(relative error, budget {REL_TOL:g})")
    ok = check("bias=(1,h,1,s) bf16 tensor", q, k, v, dout, bias=bias)
    ok &= check("alibi_slopes=gen_slopes(h)", q, k, v, dout, slopes=slopes)

    if ON_GPU:
        import torch.nn.functional as F

        # SDPA takes no is_causal together with a mask: its users fold the causal -inf into the
        # bias, materialised to (1, heads, seqlen, seqlen).
        future = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).triu(1)
        mask = bias.expand(1, heads, seqlen, seqlen).masked_fill(future, float("-inf"))
        sdpa = lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        methods = {
            "tritonflash, bias tensor": lambda: flash_attn_func(q, k, v, bias, causal=True),
            "tritonflash, alibi_slopes": lambda: flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes),
            "PyTorch SDPA + (1,h,s,s) mask": lambda: sdpa().transpose(1, 2),
        }
        flops_fwd = 4 * batch * heads * seqlen * seqlen * headdim / 2  # causal: half the matrix
        print("\nspeed (median of triton.testing.do_bench) and peak memory of one forward+backward beyond its inputs")
        print(f"(SDPA's materialised mask, {mask.numel() * mask.element_size() / 2**20:.0f} MiB, is an input: not counted)")
        print(f"  {'method':<32}{'fwd ms':>9}{'TFLOP/s':>9}{'fwd+bwd ms':>12}{'TFLOP/s':>9}{'peak MiB':>10}")
        for name, fn in methods.items():
            try:
                ms_f, tf_f, ms_fb, tf_fb, peak = measure(fn, q, k, v, dout, flops_fwd)
                print(f"  {name:<32}{ms_f:>9.3f}{tf_f:>9.1f}{ms_fb:>12.3f}{tf_fb:>9.1f}{peak / 2**20:>10.0f}")
            except Exception as exc:  # a peer that cannot run here is reported, not fatal
                print(f"  {name:<32} could not run: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    else:
        print("\nThose were the Triton kernels themselves, run by the interpreter on CPU. "
              "Run this on a CUDA GPU for the full-size case, timings and memory.")

    print("\nPASS" if ok else "\nFAIL: a result is off the fp32 reference by more than the budget")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
