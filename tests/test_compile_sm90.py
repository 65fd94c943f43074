"""The kernels compile for Hopper (sm_90) — checked on the CPU tier, without a GPU.

Guards what the interpreter cannot see: Triton compile errors that only the GPU path raises
(e.g. a module global that is not a ``tl.constexpr``: once every GPU test failed on it while the
CPU tier was green), autotune candidates that the prune keeps but that exceed sm_90's shared
memory (head dim 256 and a dQ tile once did, with OutOfResources at launch), and the use of
wgmma (Hopper's tensor-core instruction) by every attention kernel.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ON_GPU
from helpers import SM90_SHARED_LIMIT, run_compile_script
from tritonflash.kernels import configs
from tritonflash.kernels.common import Variant

HERE = Path(__file__).parent

pytestmark = pytest.mark.skipif(ON_GPU, reason="the GPU tier compiles and runs these for real")

VARIANTS = [
    dict(d=64, causal=False, bias=None, alibi=False, kpm=False, gqa=False, varlen=False, dtype="bfloat16"),
    dict(d=128, causal=True, bias=None, alibi=True, kpm=False, gqa=True, varlen=False, dtype="float16"),
    dict(d=59, causal=True, bias="row", alibi=False, kpm=True, gqa=False, varlen=False, dtype="bfloat16"),
    dict(d=40, causal=False, bias="vec", alibi=True, kpm=True, gqa=True, varlen=False, dtype="float16"),
    dict(d=256, causal=True, bias="row", alibi=True, kpm=False, gqa=False, varlen=False, dtype="bfloat16"),
    dict(d=16, causal=True, bias=None, alibi=True, kpm=False, gqa=True, varlen=True, dtype="bfloat16"),
    # Score features (issue 12): window + softcap + sinks + dropout + boolean mask with a bias
    # gradient; a window with sinks and dropout on varlen.
    dict(d=128, causal=True, bias="row", alibi=True, kpm=True, gqa=True, varlen=False, dtype="bfloat16", window=(64, -1),
         softcap=30.0, sinks=True, dropout=0.1, amask=True),
    dict(d=64, causal=False, bias=None, alibi=False, kpm=False, gqa=True, varlen=True, dtype="float16", window=(32, 16),
         sinks=True, dropout=0.2),
]


def _candidate_cases():
    """Per kernel and head dim, the kept candidate with the most estimated shared memory (the
    one that would overflow first) and the one with the largest tile: a covering set, since
    compiling every kept candidate took minutes of the CPU tier."""
    cases = []
    for which, prune in (("fwd", configs.prune_fwd), ("dkdv", configs.prune_bwd_dkdv), ("dq", configs.prune_bwd_dq),
                         ("dbias", configs.prune_bwd_dbias)):
        candidates = {"fwd": configs.FWD_CONFIGS, "dkdv": configs.BWD_DKDV_CONFIGS, "dq": configs.BWD_DQ_CONFIGS,
                      "dbias": configs.BWD_DBIAS_CONFIGS}[which]
        for d in (64, 128, 256):
            # The cases below carry an fp32 (1, h, s, s) bias: prune for it.
            var = Variant(CAUSAL=True, HAS_BIAS=True, BIAS_ROW=True, HAS_ALIBI=True, BLOCK_D=d)
            args = dict(VAR=var, score=SimpleNamespace(bias=torch.empty(1, dtype=torch.float32)))
            kept = prune(candidates, {}, **args)
            picks = {max(kept, key=lambda c: configs.smem_estimate(which, c, args)),
                     max(kept, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))}
            for c in picks:
                cfg = [c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages]
                cases.append(dict(d=d, causal=True, bias="row", alibi=True, kpm=False, gqa=False, varlen=False,
                                  dtype="bfloat16", force=[which, cfg]))
    return cases


def _compile(cases):
    proc, rows = run_compile_script(HERE / "sm90_compile.py", json.dumps({"cases": cases}), timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return rows


def test_every_variant_compiles_for_sm90_with_wgmma():
    rows = _compile([dict(v) for v in VARIANTS])
    errors = [r for r in rows if "error" in r]
    assert not errors, "\n".join(f"{r['case']}: {r['error']}" for r in errors)
    names = {r["kernel"] for r in rows}
    assert {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_bwd_dbias", "_attn_bwd_preprocess"} <= names
    for r in rows:
        assert r["shared"] <= SM90_SHARED_LIMIT, r
        if r["kernel"] != "_attn_bwd_preprocess":
            assert r["wgmma"], f"{r['kernel']} does not use wgmma for {r['case']}"


def test_every_kept_autotune_candidate_fits_sm90_shared_memory():
    """configs.prune_* must drop every candidate that would fail with OutOfResources on sm_90."""
    rows = _compile(_candidate_cases())
    errors = [r for r in rows if "error" in r]
    assert not errors, "\n".join(f"{r['case']}: {r['error']}" for r in errors)
    too_big = [r for r in rows if r["shared"] > SM90_SHARED_LIMIT]
    assert not too_big, "\n".join(f"{r['case']} {r['kernel']}: {r['shared']} bytes" for r in too_big)


def test_hot_kernels_do_not_serialise_wgmma():
    """ptxas must not serialise wgmma (warning C7515) in the forward, dQ and dK/dV kernels
    without bias, nor in the forward and dQ with a 16-bit (1, h, sq, sk) bias, at head dims 64
    and 128. A hand prefetch of the bias tile, or 2-D pointer tiles kept across the key loop,
    once triggered it and cost 10-15% on the H200 (docs/perf-notes.md, changes 4 and 6)."""
    # seqlen 96 fills every query block of the default dK/dV tile (32 rows), so that pass is
    # compiled without row bounds checks (EVEN_M); at 100 it keeps them. (The dbias pass is
    # not a hot kernel here.)
    # Every combination at head dim 128 (the most register pressure), and at 64 the two that
    # once serialised: a bias with rows not 16-aligned, and full query blocks in dK/dV.
    combos = [(128, causal, bias, seqlen) for causal in (False, True) for bias in (None, "row") for seqlen in (96, 100)]
    combos += [(64, True, "row", 100), (64, False, None, 96)]
    cases = [dict(d=d, causal=causal, bias=bias, alibi=False, kpm=False, gqa=False, varlen=False, dtype="bfloat16",
                  bias_dtype="bfloat16", check_serial=True, seqlen=seqlen) for d, causal, bias, seqlen in combos]
    rows = _compile(cases)
    errors = [r for r in rows if "error" in r]
    assert not errors, "\n".join(f"{r['case']}: {r['error']}" for r in errors)
    hot = {None: {"_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv"}, "row": {"_attn_fwd", "_attn_bwd_dq"}}
    serial = [f"{r['kernel']} {r['case']}" for r in rows
              if r["kernel"] in hot[json.loads(r["case"])["bias"]] and r["serialised"]]
    assert not serial, "wgmma serialised (ptxas C7515):\n" + "\n".join(serial)


DECODE_VARIANTS = [
    # The benchmark shape (GQA 32/8, paged 256, ALiBi), MQA with a bias row, window and
    # softcap over a contiguous cache with sq > 1 and cache_batch_idx, and head dim 256 paged 16.
    dict(kind="decode", d=128, dtype="bfloat16", nheads=32, nheads_k=8, page=256, alibi=True),
    dict(kind="decode", d=64, dtype="float16", nheads=8, nheads_k=1, seqlen_q=3, bias=True, window=(128, 0), softcap=30.0,
         cbi=True),
    dict(kind="decode", d=256, dtype="bfloat16", nheads=4, nheads_k=4, page=16, causal=False),
    dict(kind="decode", d=40, dtype="float16", nheads=12, nheads_k=4, seqlen_q=8, page=48),
]


def test_decode_kernel_compiles_for_sm90():
    """The KV-cache decode kernel (issue 14) compiles for Hopper and fits its shared memory.
    Its M tile is 16-64 rows (a GQA group times the query rows), so it may use mma.sync
    rather than wgmma: not asserted here."""
    rows = _compile([dict(v) for v in DECODE_VARIANTS])
    errors = [r for r in rows if "error" in r]
    assert not errors, "\n".join(f"{r['case']}: {r['error']}" for r in errors)
    decode = [r for r in rows if r["kernel"] == "_attn_decode"]
    assert len(decode) == len(DECODE_VARIANTS), rows
    for r in decode:
        assert r["shared"] <= SM90_SHARED_LIMIT, r
