"""Shared test helpers: input factories and the tolerance rule of docs/testing.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tritonflash import attention_ref

SM90_SHARED_LIMIT = 232448  # bytes of shared memory a block may use on H100/H200
SRC = Path(__file__).resolve().parent.parent / "src"


def run_compile_script(script, *args, timeout, cwd=None):
    """Run a script that compiles kernels for sm_90 without a GPU (tests/sm90_compile.py's
    stand-in driver) in a subprocess, outside the Triton interpreter the test process runs in.
    Returns (the finished process, the JSON rows it printed, one per line starting with '{')."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=cwd)
    return proc, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

def spy_calls(monkeypatch, module, name):
    """Wrap ``module.name`` (a launcher whose first argument is q) for this test: returns the
    list of q's shapes, one per call that reached it."""
    calls = []
    real = getattr(module, name)

    def spy(q, *args, **kwargs):
        calls.append(tuple(q.shape))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def compile_gluon_cases(script, cases, case_id):
    """Compile each case with a tests/sm90_*_compile.py script (one subprocess); its rows by
    ``case_id(case)``."""
    script = Path(script)
    proc, rows = run_compile_script(script, json.dumps(cases), timeout=900, cwd=script.parent)
    assert len(rows) == len(cases), proc.stderr[-3000:]
    return {case_id(r["case"]): r for r in rows}


def assert_gluon_compiled(r, max_spill_bytes=0):
    """A ``sm90_compile.gluon_row``: compiled and assembled for sm_90a, within shared memory,
    async wgmma that ptxas did not serialise, 4-D TMA boxes, at most ``max_spill_bytes`` spilled."""
    assert "error" not in r, r["error"]
    assert r["ptxas_rc"] == 0, r["ptxas_log"]
    assert r["shared"] <= SM90_SHARED_LIMIT, r
    assert r["spill_bytes"] <= max_spill_bytes, r
    assert r["wgmma_async"] and not r["c7515"], f"wgmma missing or serialised by ptxas: {r}"
    assert r["tma_4d"], f"expected 4-D (batch, seqlen, heads, dim) TMA boxes: {r}"


FWD_FACTOR = 2
GRAD_FACTOR = 3


def assert_close_to_ref(name, x, x_ref, x_pt, factor):
    """err(x, x_ref) <= factor * err(x_pt, x_ref) + floor, floor = 2 rounding steps of x's dtype.

    x_ref: fp32 oracle; x_pt: the reference in the kernel's own precision."""
    assert x.shape == x_ref.shape, f"{name}: shape {tuple(x.shape)} != reference {tuple(x_ref.shape)}"
    assert torch.isfinite(x).all() or not torch.isfinite(x_ref).all(), f"{name}: non-finite values in the kernel output"
    xr = x_ref.float()
    # -inf entries (lse of dead rows) must match exactly; compare the rest.
    inf_ref = torch.isinf(xr)
    assert torch.equal(torch.isinf(x.float()), inf_ref), f"{name}: infinite entries differ from the reference"
    assert torch.equal(x.float()[inf_ref], xr[inf_ref]), f"{name}: infinite entries differ in sign"
    assert not torch.isnan(x).any(), f"{name}: NaN in the kernel output"
    fin = ~inf_ref
    xf, xpf, xrf = x.float()[fin], x_pt.float()[fin], xr[fin]
    if xf.numel() == 0:
        return
    err = (xf - xrf).abs().max().item()
    err_pt = (xpf - xrf).abs().max().item()
    ref_lp = x_ref[fin].to(x.dtype)
    if not ref_lp.any():
        # An identically zero reference (e.g. dq when each row sees one key) makes the rule's
        # floor 0; any non-zero element would make it ~ulp(0.3), so use that.
        ref_lp = torch.full_like(ref_lp[:1], 1e-3)
    floor = 2 * ((ref_lp + 0.3 - 0.3).float() - ref_lp.float()).abs().max().item()
    budget = factor * err_pt + floor
    assert err <= budget, (
        f"{name}: max error {err:.3e} > budget {budget:.3e} "
        f"({factor} x reference error {err_pt:.3e} + floor {floor:.3e})"
    )


def make_qkv(batch, seqlen_q, seqlen_k, nheads, head_dim, dtype, device, nheads_k=None, requires_grad=True):
    nheads_k = nheads if nheads_k is None else nheads_k
    q = torch.randn(batch, seqlen_q, nheads, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, seqlen_k, nheads_k, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, seqlen_k, nheads_k, head_dim, dtype=dtype, device=device)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def check_against_reference(fn_out, q, k, v, dout, *, bias=None, causal=False, softmax_scale=None,
                            alibi_slopes=None, key_padding_mask=None, lse=None, check_grads=True, **features):
    """Compare a kernel's out (and lse, and gradients of q, k, v, bias, sinks) with the rule.
    ``features``: the reference's keywords (window_size, softcap, sinks, dropout_p with
    dropout_mask, attn_mask)."""
    kwargs = dict(alibi_slopes=alibi_slopes, key_padding_mask=key_padding_mask, return_lse=True, **features)
    out_ref, lse_ref = attention_ref(q, k, v, bias, causal, softmax_scale, upcast=True, **kwargs)
    out_pt, lse_pt = attention_ref(q, k, v, bias, causal, softmax_scale, upcast=False, reorder_ops=True, **kwargs)
    assert_close_to_ref("out", fn_out, out_ref, out_pt, FWD_FACTOR)
    if lse is not None:
        assert_close_to_ref("lse", lse, lse_ref, lse_pt, FWD_FACTOR)
    if not check_grads:
        return
    inputs = [("dq", q), ("dk", k), ("dv", v), ("dbias", bias), ("dsinks", features.get("sinks"))]
    inputs = [(n, t) for n, t in inputs if t is not None and t.requires_grad]
    tensors = [t for _, t in inputs]
    g = torch.autograd.grad(fn_out, tensors, dout, retain_graph=True)
    g_ref = torch.autograd.grad(out_ref, tensors, dout, retain_graph=True)
    g_pt = torch.autograd.grad(out_pt, tensors, dout, retain_graph=True)
    for (name, t), a, r, p in zip(inputs, g, g_ref, g_pt):
        assert a.shape == t.shape and a.dtype == t.dtype, f"{name}: got {tuple(a.shape)} {a.dtype}, want {tuple(t.shape)} {t.dtype}"
        assert_close_to_ref(name, a, r, p, GRAD_FACTOR)


def refused_by_gluon_backward(b, sq, sk, h, d):
    """pytest params (``over`` dict, False) of the calls both Gluon backward passes leave to the
    tl passes (hopper_bwd_supports, hopper_dbias_supports), for their tests' stand-in calls of
    these sizes: ALiBi, key padding, varlen, score features, a stride-0 dout, a transposed lse."""
    import pytest

    from tritonflash.kernels.common import Features, Varlen

    cases = [
        (dict(alibi_slopes=torch.empty(1, h)), "alibi"),
        (dict(key_padding_mask=torch.empty(b, sk, dtype=torch.uint8)), "key-padding"),
        (dict(varlen=Varlen(torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), 1, 1)), "varlen"),
        (dict(features=Features(window=(16, -1))), "window"),
        (dict(features=Features(softcap=30.0)), "softcap"),
        (dict(features=Features(sinks=torch.empty(h))), "sinks"),
        (dict(features=Features(dropout_p=0.1, seed=torch.zeros(1, dtype=torch.int64))), "dropout"),
        (dict(features=Features(attn_mask=torch.empty(1, 1, sq, sk, dtype=torch.bool))), "attn-mask"),
        (dict(dout=torch.empty(b, sq, 1, d, dtype=torch.bfloat16).expand(b, sq, h, d)), "dout-stride0"),
        (dict(lse=torch.empty(b, sq, h).transpose(1, 2)), "lse-not-contiguous"),
    ]
    return [pytest.param(over, False, id=name) for over, name in cases]


def learned_bias(shape, dtype, device, row_pad=0):
    """A bias of ``shape`` that requires grad (values ~N(0, 4)), its rows padded in memory by
    ``row_pad`` elements (a row stride TMA can read when seqlen_k * 2 bytes is not a multiple of 16)."""
    *lead, sk = shape
    return torch.randn(*lead, sk + row_pad, device=device).mul(2).to(dtype)[..., :sk].requires_grad_()

