"""Benchmark tritonflash against PyTorch SDPA (flash, cuDNN, efficient), FlexAttention (its Triton
and its FLASH backend) and FlashAttention-4.

The protocol (benchmarks/README.md): bf16, batch * seqlen = 16384 tokens, nheads = 2048 / headdim,
seqlen 1k..16k, headdim 64 and 128, causal off and on, forward and forward+backward, every method
timed in this process on the same inputs with ``triton.testing.do_bench`` (median).

Every (case, method, pass) first goes through a correctness gate against the fp32
``attention_ref``; a method that fails it, cannot run the case, raises or runs out of memory gets
a row with ``"tflops": null`` and an ``"error"``, never a time. Results go to
``<out>/<gpu>.json`` (merged with an earlier file of the same GPU, versions and commit), one PNG
per suite, and a table of tritonflash / peer ratios is printed last.

    PYTHONPATH=src python benchmarks/bench_attention.py                      # everything
    PYTHONPATH=src python benchmarks/bench_attention.py --suite alibi --quick
    PYTHONPATH=src python benchmarks/bench_attention.py --smoke --out /tmp/b  # CPU plumbing check

FlashAttention-4 (``fa4``) and Flex's FLASH backend (``flex_flash``) need the ``flash-attn-4``
package; on the GPU machines it is carried as wheels into a folder that ``--peers-dir`` (or
TRITONFLASH_PEERS_DIR) adds with ``site.addsitedir`` (docs/benchmarking.md, "Peers FA4 and
Flex-FLASH"). Without it their rows carry an error saying so.

The ``decode`` suite (KV-cache decoding, issue 14) is ``benchmarks/bench_decode.py``, which
``make bench`` runs after this script with the same arguments; ``--suite decode`` alone does
nothing here.

The variant suites (``window``, ``softcap``, ``sinks_window``, ``dropout``) use model-like shapes
and their own seqlens (``VARIANTS``); ``window`` and ``dropout`` also time tritonflash without
the feature (methods ``tritonflash_full``, ``tritonflash_nodropout``) for the derived ratios
(``derived_metrics``) that the table and the JSON's ``"derived"`` list report.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib.util
import json
import math
import os
import re
import site
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("tritonflash") is None:
    sys.path.insert(0, str(ROOT / "src"))

TOKENS = 16384  # batch * seqlen
HEADS_X_HEADDIM = 2048  # nheads * headdim
SEQLENS = [1024, 2048, 4096, 8192, 16384]
QUICK_SEQLENS = [1024, 4096]
BIAS_GRAD_MAX_SEQLEN = 4096
GQA_GROUP = 8  # nheads / nheads_k
DTYPE = torch.bfloat16

PEERS = ["sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex", "flex_flash", "fa4"]
DEFAULT_METHODS = ["tritonflash", *PEERS]
SMOKE_METHODS = ["tritonflash", "sdpa_math"]
MEM_PASS = "fwdbwd_mem"
PEERS_DIR_ENV = "TRITONFLASH_PEERS_DIR"
FA4_DIST = "flash-attn-4"
FLEX_FLASH_OPTIONS = {"BACKEND": "FLASH"}  # Flex on FA4's CuTe-DSL kernels (torch >= 2.10)
UNBOUNDED = (-1, -1)  # window_size: no window


@dataclasses.dataclass(frozen=True)
class Variant:
    """A suite of one attention variant (issue 12) on a model-like shape."""

    headdims: tuple
    causals: tuple
    seqlens: tuple  # the full sweep
    quick: tuple  # --quick: one seqlen each, so that the four suites run in ~4 min on an H200 (Flex compiles per case)
    heads: tuple | None = None  # (nheads, nheads_k); None: the protocol's 2048 / headdim, no GQA
    tokens: int = TOKENS  # batch * seqlen
    window: tuple = UNBOUNDED
    softcap: float = 0.0
    sinks: bool = False
    dropout_p: float = 0.0
    # --smoke: headdim 32, seqlen 64, batch 1, these heads and window (tiny, in the interpreter)
    smoke_heads: tuple = (2, 2)
    smoke_window: tuple = UNBOUNDED
    smoke_causals: tuple = (True,)


VARIANTS = {
    # Mistral 7B: 32 query / 8 kv heads, d128, causal with a 4096-key window; 32k tokens a batch.
    "window": Variant((128,), (True,), (4096, 8192, 16384, 32768), (32768,), heads=(32, 8), tokens=32768,
                      window=(4096, 0), smoke_heads=(4, 1), smoke_window=(16, 0)),
    # Gemma 2 9B: 16 query / 8 kv heads, d256, logits capped at 50 (attn_logit_softcapping).
    "softcap": Variant((256,), (True,), (1024, 4096, 8192), (4096,), heads=(16, 8), softcap=50.0,
                       smoke_heads=(2, 1)),
    # gpt-oss: 64 query / 8 kv heads, d64, 128-key window, one learned fp32 sink logit per head.
    "sinks_window": Variant((64,), (True,), (1024, 4096, 16384), (4096,), heads=(64, 8), window=(128, 0),
                            sinks=True, smoke_heads=(4, 1), smoke_window=(8, 0)),
    # attention dropout (MPT/BERT attn_pdrop) on the protocol's shapes.
    "dropout": Variant((64, 128), (False, True), (1024, 4096), (4096,), dropout_p=0.1),
}
SUITES = ["nobias", "alibi", "bias_grad", "gqa", "memory", *VARIANTS]

# tritonflash without the suite's feature, timed beside it (when tritonflash is among the
# methods) for the derived ratios: method -> the Case fields it changes.
BASELINES = {
    "window": {"tritonflash_full": {"window": UNBOUNDED}},
    "dropout": {"tritonflash_nodropout": {"dropout_p": 0.0}},
}
# Derived ratios (lower is better) and their targets (docs/benchmarking.md).
WINDOW_TARGET = 1.15  # window time / (work_fraction * full causal time)
DROPOUT_TARGET = 0.15  # dropout time / no-dropout time - 1
SOFTCAP_LOGIT_STD = 0.3  # softcap suite: q's std, as a fraction of the cap
# SDPA with sinks gets a (1, h, s, s + 1) mask rebuilt from the sinks every call (and a
# gradient as large); above this it is recorded as not fitting instead of tried.
SDPA_SINK_MASK_BYTES = 4 << 30

# Correctness gate: ||x - ref|| / ||ref|| against the fp32 oracle. bf16 rounding alone gives a few
# 1e-3; a wrong mask, bias or gradient gives far more.
REL_TOL = 2e-2
# The oracle materialises fp32 scores for the checked slice; this bounds one copy of them
# (the oracle holds a handful), so the gate fits beside a 16k case on an 80 GB GPU.
REF_SCORE_BYTES = 1 << 30

# do_bench budgets (ms): warm-up and measurement.
BENCH_MS = {"full": (25, 100), "quick": (10, 40)}
SMOKE_REPS = 1


@functools.cache
def visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool, window: tuple) -> int:
    """How many (i, j) a query sees: j in [i + sk - sq - left, i + sk - sq + right] within
    [0, sk) (-1 = unbounded; causal means right = 0), counted exactly."""
    left, right = window
    if causal:
        right = 0
    diag = torch.arange(seqlen_q, dtype=torch.int64) + (seqlen_k - seqlen_q)
    lo = (diag - left).clamp(min=0) if left >= 0 else torch.zeros_like(diag)
    hi = (diag + right).clamp(max=seqlen_k - 1) if right >= 0 else torch.full_like(diag, seqlen_k - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


@dataclasses.dataclass(frozen=True)
class Case:
    suite: str  # the row's suite: nobias | alibi | bias_grad | gqa | one of VARIANTS
    headdim: int
    causal: bool
    seqlen: int
    batch: int
    nheads: int
    nheads_k: int
    bias: str  # none | alibi (slopes) | learned ((1, h, s, s) bias that requires grad)
    passes: tuple  # ("fwd", "fwdbwd") or (MEM_PASS,)
    window: tuple = UNBOUNDED  # window_size (left, right), -1 = unbounded
    softcap: float = 0.0
    sinks: bool = False  # a learned (h,) fp32 sink logit that requires grad
    dropout_p: float = 0.0

    @property
    def label(self) -> str:
        kv = f"/{self.nheads_k}" if self.nheads_k != self.nheads else ""
        extra = (f" w{self.window[0]},{self.window[1]}" * (self.window != UNBOUNDED) + f" cap{self.softcap:g}" * bool(self.softcap)
                 + " sinks" * self.sinks + f" p{self.dropout_p:g}" * bool(self.dropout_p))
        return (f"{self.suite} d{self.headdim} {'causal' if self.causal else 'full'} s{self.seqlen} "
                f"b{self.batch} h{self.nheads}{kv}{extra}")

    @property
    def work_fraction(self) -> float:
        """Visible (i, j) pairs with the window / without it (same causal): the share of the
        work a kernel that skips the blocks outside the window still has to do."""
        if self.window == UNBOUNDED:
            return 1.0
        s = self.seqlen
        return visible_pairs(s, s, self.causal, tuple(self.window)) / visible_pairs(s, s, self.causal, UNBOUNDED)

    def flops(self, pass_: str) -> float:
        """flash-attn convention: 4*b*h*sq*sk*d forward, halved when causal; fwd+bwd = 3.5x.
        With a window, times ``work_fraction`` (the visible pairs, counted exactly)."""
        fwd = 4.0 * self.batch * self.nheads * self.seqlen * self.seqlen * self.headdim
        if self.causal:
            fwd /= 2
        fwd *= self.work_fraction
        return 3.5 * fwd if pass_ == "fwdbwd" else fwd


def method_case(case: Case, method: str) -> Case:
    """What ``method`` computes on ``case``: the case itself, or for a baseline the case without
    the suite's feature."""
    changes = BASELINES.get(case.suite, {}).get(method)
    return dataclasses.replace(case, **changes) if changes else case


def case_methods(case: Case, methods: list[str]) -> list[str]:
    """The methods run on ``case``: ``methods``, with the suite's baselines after tritonflash."""
    out = []
    for m in methods:
        out.append(m)
        if m == "tritonflash":
            out += list(BASELINES.get(case.suite, {}))
    return out


def make_cases(suites, headdims, seqlens, smoke: bool, quick: bool = False) -> list[Case]:
    """The protocol's cases for ``suites``; ``headdims`` (if given) overrides every suite's, and
    ``seqlens`` (if given) every suite's own (the protocol's 1k..16k, 1k and 4k with ``quick``;
    a variant suite's own list otherwise)."""
    cases = []
    for suite in suites:
        if suite in VARIANTS:
            cases += variant_cases(suite, headdims, seqlens, smoke, quick)
            continue
        proto = seqlens or (QUICK_SEQLENS if quick else SEQLENS)
        row_suite = "alibi" if suite == "memory" else suite
        passes = (MEM_PASS,) if suite == "memory" else ("fwd", "fwdbwd")
        bias = {"alibi": "alibi", "bias_grad": "learned"}.get(row_suite, "none")
        if smoke:
            # Tiny and few: the interpreter runs each kernel program in Python. Both causal
            # settings once (nobias), the causal path for the rest.
            dims, causals, lens = [32], ([False, True] if row_suite == "nobias" else [True]), [64]
        else:
            dims = {"alibi": [128], "bias_grad": [64]}.get(row_suite, [64, 128])
            causals = [False, True]
            lens = [s for s in proto if row_suite != "bias_grad" or s <= BIAS_GRAD_MAX_SEQLEN]
            if not lens:
                print(f"note: suite {suite} has no seqlen in {proto} (it runs at <= {BIAS_GRAD_MAX_SEQLEN})")
        if row_suite == "alibi":
            causals = [True]
        for d in headdims or dims:
            for causal in causals:
                for s in lens:
                    if smoke:
                        batch, nheads, group = 1, 2, 2
                    else:
                        batch, nheads, group = max(1, TOKENS // s), max(1, HEADS_X_HEADDIM // d), GQA_GROUP
                    nheads_k = max(1, nheads // group) if suite == "gqa" else nheads
                    cases.append(Case(row_suite, d, causal, s, batch, nheads, nheads_k, bias, passes))
    return cases


def variant_cases(suite, headdims, seqlens, smoke: bool, quick: bool) -> list[Case]:
    v = VARIANTS[suite]
    if smoke:
        dims, causals, lens = [32], v.smoke_causals, [64]
    else:
        dims, causals, lens = v.headdims, v.causals, list(seqlens or (v.quick if quick else v.seqlens))
    cases = []
    for d in headdims or dims:
        for causal in causals:
            for s in lens:
                if smoke:
                    batch, (nheads, nheads_k), window = 1, v.smoke_heads, v.smoke_window
                else:
                    batch, window = max(1, v.tokens // s), v.window
                    nheads, nheads_k = v.heads or (max(1, HEADS_X_HEADDIM // d),) * 2
                cases.append(Case(suite, d, causal, s, batch, nheads, nheads_k, "none", ("fwd", "fwdbwd"), window=window,
                                  softcap=v.softcap, sinks=v.sinks, dropout_p=v.dropout_p))
    return cases


@dataclasses.dataclass
class Inputs:
    q: torch.Tensor  # (b, s, h, d), requires grad
    k: torch.Tensor  # (b, s, h_k, d), requires grad
    v: torch.Tensor  # (b, s, h_k, d), requires grad
    dout: torch.Tensor  # (b, s, h, d)
    slopes: torch.Tensor | None  # (h,) fp32, ALiBi
    bias: torch.Tensor | None  # (1, h, s, s) bf16, learned, requires grad
    sinks: torch.Tensor | None = None  # (h,) fp32, learned, requires grad

    @property
    def wrt(self) -> list[torch.Tensor]:
        """What fwd+bwd differentiates: q, k, v, then the learned bias and the sinks when there are."""
        return [self.q, self.k, self.v] + [t for t in (self.bias, self.sinks) if t is not None]


def make_inputs(case: Case, device) -> Inputs:
    import tritonflash

    gen = torch.Generator(device=device).manual_seed(0)
    b, s, h, hk, d = case.batch, case.seqlen, case.nheads, case.nheads_k, case.headdim

    def randn(*shape, grad=True):
        return torch.randn(*shape, generator=gen, device=device, dtype=DTYPE).requires_grad_(grad)

    q, k, v = randn(b, s, h, d), randn(b, s, hk, d), randn(b, s, hk, d)
    if case.softcap:
        # Scaled logits of std 0.3 * softcap (15 at 50), so that the cap changes them (a kernel
        # that ignored it would fail the gate); unit logits would be capped by < 0.1%.
        q = q.detach().mul_(SOFTCAP_LOGIT_STD * case.softcap).requires_grad_(True)
    dout = randn(b, s, h, d, grad=False)
    slopes = tritonflash.gen_slopes(h, device=device) if case.bias == "alibi" else None
    bias = randn(1, h, s, s) if case.bias == "learned" else None
    sinks = None
    if case.sinks:
        sinks = torch.randn(h, generator=gen, device=device, dtype=torch.float32).requires_grad_(True)
    return Inputs(q, k, v, dout, slopes, bias, sinks)


class Unsupported(Exception):
    """The method cannot express this case (recorded as an error row without trying)."""


@dataclasses.dataclass
class Runner:
    # forward on the case's inputs -> out (b, s, h, d); reads x.q, x.k, x.v when called (the
    # dropout gate swaps them)
    fn: Callable[[], torch.Tensor]
    ref_bias: torch.Tensor | None = None  # the bias the method was given, for the oracle
    ref_slopes: torch.Tensor | None = None  # the ALiBi slopes the method was given
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    case: Case | None = None  # what it computes when that is not the row's case (baselines)


def tritonflash_features(case: Case, x: Inputs) -> dict:
    """The keyword arguments of the case's variant features (none for the protocol's suites)."""
    kw = {}
    if case.window != UNBOUNDED:
        kw["window_size"] = tuple(case.window)
    if case.softcap:
        kw["softcap"] = case.softcap
    if case.sinks:
        kw["sinks"] = x.sinks
    if case.dropout_p:
        kw["dropout_p"] = case.dropout_p
    return kw


def build_tritonflash(case: Case, x: Inputs) -> Runner:
    import tritonflash

    bias = x.bias if case.bias == "learned" else None
    features = tritonflash_features(case, x)

    def fn():
        return tritonflash.flash_attn_func(x.q, x.k, x.v, bias, case.causal, alibi_slopes=x.slopes, **features)

    return Runner(fn, ref_bias=bias, ref_slopes=x.slopes)


def build_tritonflash_tl(case: Case, x: Inputs) -> Runner:
    """tritonflash with the ``tl`` kernels only (the Hopper forward off: attn_fwd reads
    TRITONFLASH_HOPPER_FWD per call): the lever's baseline."""
    from tritonflash.kernels.forward import HOPPER_ENV

    runner = build_tritonflash(case, x)
    runner.context = lambda: mock.patch.dict(os.environ, {HOPPER_ENV: "0"})
    return runner


def baseline_builder(method: str) -> Callable[[Case, Inputs], Runner]:
    """tritonflash on the case without the suite's feature (BASELINES), on the same inputs."""

    def build(case: Case, x: Inputs) -> Runner:
        sem = method_case(case, method)
        runner = build_tritonflash(sem, x)
        runner.case = sem
        return runner

    return build


def alibi_mask(slopes, seqlen_q, seqlen_k, causal, dtype) -> torch.Tensor:
    """The materialised (1, h, sq, sk) ALiBi mask SDPA users build: -slope*|i + sk - sq - j|, and
    -inf above the causal diagonal (SDPA takes no is_causal together with a mask). Built one head
    at a time so that no fp32 (1, h, sq, sk) temporary exists at 16k."""
    dev = slopes.device
    i = torch.arange(seqlen_q, device=dev, dtype=torch.float32).view(-1, 1)
    j = torch.arange(seqlen_k, device=dev, dtype=torch.float32).view(1, -1)
    dist = (i + (seqlen_k - seqlen_q) - j).abs_()  # [sq, sk], exact integers in fp32
    mask = torch.empty(1, slopes.numel(), seqlen_q, seqlen_k, device=dev, dtype=dtype)
    for h, slope in enumerate(slopes.tolist()):
        mask[0, h] = dist * -slope
    del dist
    if causal:
        mask.masked_fill_(j > i + (seqlen_k - seqlen_q), float("-inf"))
    return mask


def causal_additive_mask(seqlen_q, seqlen_k, device, dtype) -> torch.Tensor:
    i = torch.arange(seqlen_q, device=device).view(-1, 1)
    j = torch.arange(seqlen_k, device=device).view(1, -1)
    zeros = torch.zeros(seqlen_q, seqlen_k, device=device, dtype=dtype)
    return zeros.masked_fill_(j > i + (seqlen_k - seqlen_q), float("-inf"))  # [sq, sk]


def visible_mask(seqlen_q, seqlen_k, causal, window, device) -> torch.Tensor:
    """[sq, sk] bool, True where query i sees key j (bottom-right causal and window)."""
    left, right = window
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device).view(-1, 1) + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device).view(1, -1)
    vis = torch.ones(seqlen_q, seqlen_k, device=device, dtype=torch.bool)
    if right >= 0:
        vis &= j <= i + right
    if left >= 0:
        vis &= j >= i - left
    return vis


def window_additive_mask(seqlen_q, seqlen_k, causal, window, device, dtype) -> torch.Tensor:
    """[sq, sk]: 0 where visible, -inf elsewhere (what SDPA users pass for a sliding window)."""
    vis = visible_mask(seqlen_q, seqlen_k, causal, window, device)
    return torch.zeros(seqlen_q, seqlen_k, device=device, dtype=dtype).masked_fill_(~vis, float("-inf"))


def sdpa_builder(backend_name: str) -> Callable[[Case, Inputs], Runner]:
    def build(case: Case, x: Inputs) -> Runner:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        if case.softcap:
            raise Unsupported("SDPA has no softcap: the tanh acts on the scores inside the kernel, which no attn_mask "
                              "can express")
        if backend_name == "FLASH_ATTENTION":
            for needed, what in ((case.bias != "none", "add a bias"), (case.sinks, "add a sink logit"),
                                 (case.window != UNBOUNDED, "apply a sliding window")):
                if needed:
                    raise Unsupported(f"SDPA's flash backend takes no attn_mask, so it cannot {what}")
        s = case.seqlen
        runner = Runner(fn=None, context=lambda: sdpa_kernel(backend))
        extra = {"enable_gqa": True} if case.nheads_k != case.nheads else {}
        if case.dropout_p:
            extra["dropout_p"] = case.dropout_p
        if case.sinks:
            runner.fn = sdpa_sinks_fn(case, x, extra)
            return runner
        if case.window != UNBOUNDED:
            # The window as a materialised mask, built before timing (SDPA takes no window).
            wmask = window_additive_mask(s, s, case.causal, case.window, x.q.device, DTYPE).view(1, 1, s, s)
            get_mask = lambda: wmask
        elif case.bias == "alibi":
            mask = alibi_mask(x.slopes, s, s, case.causal, DTYPE)
            runner.ref_bias = mask
            get_mask = lambda: mask
        elif case.bias == "learned":
            # The learned bias is the mask; its gradient flows through the add.
            cmask = causal_additive_mask(s, s, x.q.device, DTYPE) if case.causal else None
            runner.ref_bias = x.bias
            get_mask = (lambda: x.bias) if cmask is None else (lambda: x.bias + cmask)
        else:
            get_mask = lambda: None

        def fn():
            mask = get_mask()
            out = F.scaled_dot_product_attention(
                x.q.transpose(1, 2), x.k.transpose(1, 2), x.v.transpose(1, 2),
                attn_mask=mask, is_causal=case.causal and mask is None, **extra,
            )
            return out.transpose(1, 2)

        runner.fn = fn
        return runner

    return build


def sdpa_sinks_fn(case: Case, x: Inputs, extra: dict) -> Callable[[], torch.Tensor]:
    """SDPA with sinks, the way it can be written: one more key with k = 0 and v = 0 (score 0,
    no value) whose mask entry is ``sinks[h]``, so that it takes ``exp(sinks[h])`` in each row's
    normaliser; the (1, h, s, s + 1) mask is rebuilt from the sinks (which require grad) every
    call, inside the timed call, and its gradient gives dsinks."""
    b, s, h, hk, d = case.batch, case.seqlen, case.nheads, case.nheads_k, case.headdim
    mask_bytes = h * s * (s + 1) * torch.finfo(DTYPE).bits // 8
    if mask_bytes > SDPA_SINK_MASK_BYTES:
        raise Unsupported(f"SDPA with sinks needs a (1, {h}, {s}, {s + 1}) mask ({mask_bytes / 2**30:.0f} GiB, and as much "
                          f"for its gradient); not tried above {SDPA_SINK_MASK_BYTES / 2**30:.0f} GiB")
    import torch.nn.functional as F

    wmask = window_additive_mask(s, s, case.causal, case.window, x.q.device, DTYPE).view(1, 1, s, s)
    zero_kv = torch.zeros(b, 1, hk, d, device=x.q.device, dtype=DTYPE)

    def fn():
        k = torch.cat([x.k, zero_kv], dim=1).transpose(1, 2)
        v = torch.cat([x.v, zero_kv], dim=1).transpose(1, 2)
        sink_col = x.sinks.to(DTYPE).view(1, h, 1, 1).expand(1, h, s, 1)
        mask = torch.cat([wmask.expand(1, h, s, s), sink_col], dim=-1)
        out = F.scaled_dot_product_attention(x.q.transpose(1, 2), k, v, attn_mask=mask, **extra)
        return out.transpose(1, 2)

    return fn


_FLEX = None
_FLEX_SINKS = None


def compiled_flex():
    """flex_attention under torch.compile, once per process, with room for one compile per case."""
    global _FLEX
    if _FLEX is None:
        import torch._dynamo.config as dynamo_config
        from torch.nn.attention.flex_attention import flex_attention

        # Each (shape, score_mod) pair compiles once; the default limit (8) would silently
        # fall back to the slow eager flex after a few cases.
        for name, value in (("recompile_limit", 1024), ("cache_size_limit", 1024),
                            ("accumulated_recompile_limit", 8192), ("accumulated_cache_size_limit", 8192)):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, value)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def flex_with_sinks(q, k, v, sinks, score_mod=None, block_mask=None, **extra):
    """Flex has no sink logit: take its lse and rescale its output by
    ``exp(lse) / (exp(lse) + exp(sinks[h])) = sigmoid(lse - sinks[h])``; the gradient reaches the
    sinks (and q, k through the lse) by autograd. Compiled as one function (``compiled_flex_sinks``)
    so that the rescale fuses."""
    from torch.nn.attention.flex_attention import flex_attention

    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # older torch
        out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, return_lse=True, **extra)
    else:
        out, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, return_aux=AuxRequest(lse=True), **extra)
        lse = aux.lse
    keep = torch.sigmoid(lse.float() - sinks.view(1, -1, 1))  # (b, h, sq)
    return (out.float() * keep.unsqueeze(-1)).to(out.dtype)


def compiled_flex_sinks():
    global _FLEX_SINKS
    if _FLEX_SINKS is None:
        compiled_flex()  # the recompile limits
        _FLEX_SINKS = torch.compile(flex_with_sinks, dynamic=False)
    return _FLEX_SINKS


def build_flex(case: Case, x: Inputs, kernel_options: dict | None = None) -> Runner:
    """FlexAttention compiled, with ``kernel_options`` (``flex_flash``: FLEX_FLASH_OPTIONS)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if case.dropout_p:
        raise Unsupported("FlexAttention has no dropout: score_mod and mask_mod act before the softmax, and it has no "
                          "random state")
    s = case.seqlen
    offset = 0  # seqlen_k - seqlen_q: causal, window and ALiBi are aligned bottom-right
    block_mask = None
    if case.window != UNBOUNDED:
        left, right = case.window
        right = 0 if case.causal else right

        def window_mask(b, h, q_idx, kv_idx):
            diag = q_idx + offset
            if left < 0:
                return kv_idx <= diag + right
            if right < 0:
                return kv_idx >= diag - left
            return (kv_idx <= diag + right) & (kv_idx >= diag - left)

        block_mask = create_block_mask(window_mask, None, None, s, s, device=x.q.device)
    elif case.causal:
        def causal_mask(b, h, q_idx, kv_idx):
            return q_idx + offset >= kv_idx

        block_mask = create_block_mask(causal_mask, None, None, s, s, device=x.q.device)
    score_mod = None
    ref_bias = None
    if case.bias == "alibi":
        slopes = x.slopes

        def score_mod(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (q_idx + offset - kv_idx).abs()
    elif case.bias == "learned":
        bias = ref_bias = x.bias  # captured; requires grad, so Flex computes its gradient

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[0, h, q_idx, kv_idx]
    elif case.softcap:
        cap = case.softcap  # Flex's score is already scaled: Gemma 2's cap(scale * q.k)

        def score_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)
    extra = {"enable_gqa": True} if case.nheads_k != case.nheads else {}
    if kernel_options:
        extra["kernel_options"] = dict(kernel_options)
    if case.sinks:
        flex_sinks = compiled_flex_sinks()

        def fn():
            out = flex_sinks(x.q.transpose(1, 2), x.k.transpose(1, 2), x.v.transpose(1, 2), x.sinks,
                             score_mod=score_mod, block_mask=block_mask, **extra)
            return out.transpose(1, 2)

        return Runner(fn, ref_bias=ref_bias, ref_slopes=x.slopes)
    flex = compiled_flex()

    def fn():
        out = flex(x.q.transpose(1, 2), x.k.transpose(1, 2), x.v.transpose(1, 2),
                   score_mod=score_mod, block_mask=block_mask, **extra)
        return out.transpose(1, 2)

    return Runner(fn, ref_bias=ref_bias, ref_slopes=x.slopes)


def add_peers_dir(path: str | None) -> str | None:
    """``site.addsitedir`` the folder scripts/install-peer-wheels installed FA4 into (its cutlass
    DSL registers itself through .pth files, which PYTHONPATH alone would not run). Returns the
    folder added, or None (with a note when the folder is missing)."""
    if not path:
        return None
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        print(f"note: peers folder {folder} does not exist (scripts/install-peer-wheels makes it); "
              "fa4 and flex_flash rows will say flash-attn-4 is not installed")
        return None
    if str(folder) not in sys.path:
        site.addsitedir(str(folder))
    return str(folder)


def peer_versions() -> dict:
    """Versions of the FA4 stack, for the results' metadata (empty when it is not installed)."""
    from importlib import metadata as md

    out = {}
    for key, dist in (("flash_attn_4", FA4_DIST), ("cutlass_dsl", "nvidia-cutlass-dsl")):
        try:
            out[key] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


@functools.cache
def fa4_import() -> tuple[Callable | None, str | None]:
    """FA4's ``flash_attn_func`` (flash_attn.cute), or why it cannot be had. Imported once, on the
    first GPU case that asks: importing loads the cutlass DSL's compiler library."""
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:  # no flash_attn package at all
        found = False
    if not found:
        return None, (f"{FA4_DIST} is not installed (flash_attn.cute not found; scripts/peer-wheels and "
                      f"--peers-dir / {PEERS_DIR_ENV}, docs/benchmarking.md)")
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as exc:  # a wheel built for another torch/CUDA fails here, not at find_spec
        return None, f"{FA4_DIST} does not import: {describe(exc)}"
    return flash_attn_func, None


def fa4_function(device) -> Callable:
    """FA4's flash_attn_func for a case on ``device``, or Unsupported with the reason."""
    if torch.device(device).type != "cuda":
        raise Unsupported("FA4's CuTe-DSL kernels run on NVIDIA GPUs only; this is a CPU run")
    func, reason = fa4_import()
    if func is None:
        raise Unsupported(reason)
    return func


def build_fa4(case: Case, x: Inputs) -> Runner:
    """FlashAttention-4's ``flash_attn_func`` on the (b, s, h, d) tensors: causal, GQA (fewer kv
    heads), ``window_size``, ``softcap`` and ``learnable_sink`` (a (h,) logit, with its gradient)
    are its own arguments. It has no ALiBi slopes, bias tensor or dropout."""
    if case.bias == "alibi":
        raise Unsupported("FA4's flash_attn_func has no ALiBi argument; a bias goes in only as a score_mod written as "
                          "a CuTe-DSL function, which is what Flex's FLASH backend generates (see flex_flash)")
    if case.bias == "learned":
        raise Unsupported("FA4 takes no bias tensor and returns no bias gradient")
    if case.dropout_p:
        raise Unsupported("FA4 has no dropout")
    func = fa4_function(x.q.device)
    kw = {"causal": case.causal}
    if case.window != UNBOUNDED:
        kw["window_size"] = tuple(None if w < 0 else w for w in case.window)  # FA4: None = unbounded
    if case.softcap:
        kw["softcap"] = case.softcap
    if case.sinks:
        kw["learnable_sink"] = x.sinks

    def fn():
        out = func(x.q, x.k, x.v, **kw)
        return out[0] if isinstance(out, tuple) else out  # (out, lse)

    return Runner(fn)


def build_flex_flash(case: Case, x: Inputs) -> Runner:
    """FlexAttention with ``kernel_options={"BACKEND": "FLASH"}``: the same score_mod / mask_mod as
    ``flex``, lowered by Inductor onto FA4's CuTe-DSL kernels, so it needs the same package. What
    that backend refuses (e.g. a captured bias that requires grad) fails at compile time and is
    recorded with torch's reason."""
    try:
        fa4_function(x.q.device)
    except Unsupported as exc:
        raise Unsupported(f"Flex's FLASH backend runs FA4's kernels: {exc}") from None
    return build_flex(case, x, kernel_options=FLEX_FLASH_OPTIONS)


BUILDERS: dict[str, Callable[[Case, Inputs], Runner]] = {
    "tritonflash": build_tritonflash,
    "tritonflash_tl": build_tritonflash_tl,
    "sdpa_flash": sdpa_builder("FLASH_ATTENTION"),
    "sdpa_cudnn": sdpa_builder("CUDNN_ATTENTION"),
    "sdpa_efficient": sdpa_builder("EFFICIENT_ATTENTION"),
    "sdpa_math": sdpa_builder("MATH"),
    "flex": build_flex,
    "flex_flash": build_flex_flash,
    "fa4": build_fa4,
}
BASELINE_BUILDERS = {m: baseline_builder(m) for by_method in BASELINES.values() for m in by_method}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.shape != ref.shape:
        return math.inf
    x, ref = x.detach().float(), ref.detach().float()
    return (x - ref).norm().item() / max(ref.norm().item(), 1e-30)


def check_slice(case: Case, all_batches: bool):
    """(batch, q-head, kv-head, query-row) slices the oracle checks: batch 0 (or every batch when a
    bias or sinks gradient sums over them), the first 1-2 query heads with the kv heads they read,
    and every query row up to 16k; beyond, the last rows, as many as keep one head's fp32 scores
    within REF_SCORE_BYTES (the last rows against all the keys keep the bottom-right alignment of
    causal, window and ALiBi exact)."""
    row_bytes = (case.batch if all_batches else 1) * case.seqlen * 4
    rows = max(1, min(case.seqlen, REF_SCORE_BYTES // row_bytes))
    hs = max(1, min(2, case.nheads, REF_SCORE_BYTES // (rows * row_bytes)))
    hks = (hs - 1) // (case.nheads // case.nheads_k) + 1
    bsl = slice(None) if all_batches else slice(0, 1)
    return bsl, slice(0, hs), slice(0, hks), slice(case.seqlen - rows, case.seqlen)


def rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(state: torch.Tensor, device: torch.device):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def reveal_keep_mask(case: Case, runner: Runner, x: Inputs, rng, bsl, hsl, rsl):
    """The dropout keep-mask (bool, (b, h, rows, sk) on the checked slice) that the method drew in
    the call that started from RNG state ``rng``, and an error string or None.

    The mask of tritonflash (and of SDPA) is a function of the generator state at the call and of
    the position, not of q, k, v: the call is repeated from ``rng`` with q = 0 (uniform weights
    1 / n_i over the visible keys of row i) and v one-hot over d keys at a time, so that
    out[i, c] = keep[i, j0 + c] / ((1 - p) n_i), exactly 0 where dropped. The error is set when the
    kept share of the visible weights is not within 6 sigma of 1 - p (no dropout, or the wrong p)."""
    q, v = x.q, x.v
    s, d = v.shape[1], v.shape[3]
    chunks = []
    try:
        x.q = torch.zeros_like(q).requires_grad_(q.requires_grad)
        for j0 in range(0, s, d):
            w = min(d, s - j0)
            one_hot = torch.zeros_like(v)
            one_hot[:, j0:j0 + w, :, :w] = torch.eye(w, device=v.device, dtype=v.dtype)[:, None, :]
            x.v = one_hot.requires_grad_(v.requires_grad)
            set_rng_state(rng, q.device)
            with runner.context():
                out = runner.fn()
            chunks.append((out[bsl, rsl, hsl, :w] > 0).transpose(1, 2))
            del out
    finally:
        x.q, x.v = q, v
    keep = torch.cat(chunks, dim=-1)
    vis = visible_mask(case.seqlen, case.seqlen, case.causal, case.window, keep.device)[rsl]
    n = int(vis.sum()) * keep.shape[0] * keep.shape[1]
    kept = keep[:, :, vis].float().mean().item()
    p = case.dropout_p
    tol = 6 * math.sqrt(p * (1 - p) / max(n, 1)) + 1e-3
    if abs(kept - (1 - p)) > tol:
        return keep, f"dropout kept {kept:.4f} of the visible weights, expected {1 - p:g} +- {tol:.1e}"
    return keep, None


def check(case: Case, runner: Runner, x: Inputs, pass_: str) -> str | None:
    """Run the method once on the full case and compare a slice of its output (and dq, dbias,
    dsinks for fwd+bwd) with attention_ref in fp32 on the same slice of the same inputs; with
    dropout, the oracle applies the keep-mask the method drew (``reveal_keep_mask``).
    Returns None when it passes, else the error string for the row."""
    from tritonflash import attention_ref

    sem = runner.case or case  # what the method computes (a baseline drops the suite's feature)
    bwd = pass_ != "fwd"
    learned = bwd and x.bias is not None
    sinks_grad = bwd and x.sinks is not None and sem.sinks
    rng = rng_state(x.q.device) if sem.dropout_p else None
    with runner.context():
        out = runner.fn()
        grads = torch.autograd.grad(out, x.wrt, x.dout) if bwd else None
    bsl, hsl, ksl, rsl = check_slice(case, all_batches=learned or sinks_grad)
    all_rows = rsl.start == 0
    keep = None
    if sem.dropout_p:
        keep, error = reveal_keep_mask(sem, runner, x, rng, bsl, hsl, rsl)
        if error:
            return f"failed correctness check: {error}"

    def leaf(t, *idx):
        return t[idx].detach().float().requires_grad_(True)

    def cut_bias(t):  # bias broadcastable to (b, h, sq, sk): slice the dims it has
        return t[bsl if t.shape[0] > 1 else slice(None), hsl if t.shape[1] > 1 else slice(None),
                 rsl if t.shape[2] > 1 else slice(None)]

    q_s, k_s, v_s = leaf(x.q, bsl, rsl, hsl), leaf(x.k, bsl, slice(None), ksl), leaf(x.v, bsl, slice(None), ksl)
    bias_s = None if runner.ref_bias is None else cut_bias(runner.ref_bias).detach().float().requires_grad_(learned)
    slopes_s = None if runner.ref_slopes is None else runner.ref_slopes[hsl]
    sinks_s = x.sinks[hsl].detach().float().requires_grad_(sinks_grad) if sem.sinks else None
    out_ref = attention_ref(q_s, k_s, v_s, bias_s, sem.causal, alibi_slopes=slopes_s, upcast=True,
                            window_size=tuple(sem.window), softcap=sem.softcap, sinks=sinks_s, dropout_p=sem.dropout_p,
                            dropout_mask=keep)
    errs = {"out": rel_err(out[bsl, rsl, hsl], out_ref)}
    del out
    if bwd:
        wrt_ref = [q_s] + ([bias_s] if learned else []) + ([sinks_s] if sinks_grad else [])
        g_ref = torch.autograd.grad(out_ref, wrt_ref, x.dout[bsl, rsl, hsl])
        errs["dq"] = rel_err(grads[0][bsl, rsl, hsl], g_ref[0])
        if learned:
            errs["dbias"] = rel_err(cut_bias(grads[3]), g_ref[1])
        if sinks_grad and all_rows:  # dsinks sums over every row: only a full-row slice has it
            errs["dsinks"] = rel_err(grads[-1][hsl], g_ref[-1])
    bad = [f"{name} rel err {e:.2e}" for name, e in errs.items() if not e <= REL_TOL]
    if not bad:
        return None
    where = f"batch {'all' if bsl.start is None else 0}, heads 0-{hsl.stop - 1}"
    if not all_rows:
        where += f", query rows {rsl.start}-{rsl.stop - 1}"
    return f"failed correctness check: {', '.join(bad)} > {REL_TOL:g} vs fp32 attention_ref ({where})"


def fwdbwd(runner: Runner, x: Inputs) -> Callable[[], tuple]:
    """One forward and backward; the gradients are returned (and dropped), never accumulated."""
    return lambda: torch.autograd.grad(runner.fn(), x.wrt, x.dout)


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def smoke_seconds(fn) -> float:
    """Median seconds of SMOKE_REPS calls by perf_counter: a smoke run's timing (do_bench and CUDA
    events need a GPU; the plumbing is what is checked, and the gate's call was the warm-up)."""
    times = []
    for _ in range(SMOKE_REPS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_ms(fn, context, on_cuda: bool, budget: tuple[int, int]) -> float:
    with context():
        if not on_cuda:
            return smoke_seconds(fn) * 1e3
        import triton.testing

        warmup, rep = budget
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def peak_fwdbwd_bytes(runner: Runner, x: Inputs, setup_bytes: int) -> int:
    """Peak allocated bytes of one fwd+bwd beyond what existed before it (inputs), plus what the
    method allocated at setup (a materialised mask, a block mask)."""
    free_memory()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with runner.context():
        grads = fwdbwd(runner, x)()
    torch.cuda.synchronize()
    del grads
    return torch.cuda.max_memory_allocated() - base + setup_bytes


def describe(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        kind = "out of memory"
    else:
        kind = type(exc).__name__
    lines = str(exc).strip().splitlines()
    msg = f"{kind}: {lines[0] if lines else ''}".strip()
    return msg if len(msg) <= 300 else msg[:297] + "..."


def row_head(case: Case, pass_: str, method: str) -> dict:
    row = {"suite": case.suite, "headdim": case.headdim, "causal": case.causal, "seqlen": case.seqlen,
           "pass": pass_, "method": method}
    if case.suite in VARIANTS:  # the shape and the features this method ran (a baseline lacks one)
        sem = method_case(case, method)
        row.update(batch=case.batch, nheads=case.nheads, nheads_k=case.nheads_k)
        if sem.window != UNBOUNDED:
            row.update(window=list(sem.window), work_fraction=float(f"{sem.work_fraction:.6g}"))
        if sem.softcap:
            row["softcap"] = sem.softcap
        if sem.sinks:
            row["sinks"] = True
        if sem.dropout_p:
            row["dropout_p"] = sem.dropout_p
    return row


def error_row(case: Case, pass_: str, method: str, error: str) -> dict:
    row = row_head(case, pass_, method)
    row.update({"bytes": None} if pass_ == MEM_PASS else {"ms": None, "tflops": None})
    row["error"] = error
    return row


def run_method(case: Case, method: str, x: Inputs, on_cuda: bool, budget) -> list[dict]:
    """All rows of one method on one case. Never raises: every failure is an error row."""
    rows = []
    runner = None
    try:
        alloc0 = torch.cuda.memory_allocated() if on_cuda else 0
        runner = (BUILDERS.get(method) or BASELINE_BUILDERS[method])(case, x)
        setup_bytes = (torch.cuda.memory_allocated() - alloc0) if on_cuda else 0
    except Exception as exc:  # a peer that cannot run a case is a row, not a crash
        msg = str(exc) if isinstance(exc, Unsupported) else describe(exc)
        free_memory()
        return [error_row(case, p, method, msg) for p in case.passes]
    for pass_ in case.passes:
        # SDPA explains "No available kernel" only in warnings: keep them for the error row.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows.append(measure(case, method, runner, x, pass_, on_cuda, budget, setup_bytes))
        if rows[-1].get("error") and caught and not rows[-1]["error"].startswith("failed correctness"):
            reasons = "; ".join(dict.fromkeys(str(w.message).strip().splitlines()[0]
                                              for w in caught if issubclass(w.category, UserWarning) and str(w.message).strip()))
            if reasons:
                rows[-1]["error"] = (rows[-1]["error"] + f" [warnings: {reasons}]")[:600]
        free_memory()
    runner = None
    free_memory()
    return rows


def measure(case, method, runner, x, pass_, on_cuda, budget, setup_bytes) -> dict:
    """One row: the gate, then the time (or the peak memory) if the gate passed."""
    try:
        error = check(case, runner, x, pass_)
        if error is not None:
            return error_row(case, pass_, method, error)
        if pass_ == MEM_PASS:
            if not on_cuda:
                return error_row(case, pass_, method, "not measured: peak memory needs CUDA (smoke run on CPU)")
            return {**row_head(case, pass_, method), "bytes": peak_fwdbwd_bytes(runner, x, setup_bytes), "setup_bytes": setup_bytes}
        fn = runner.fn if pass_ == "fwd" else fwdbwd(runner, x)
        ms = time_ms(fn, runner.context, on_cuda, budget)
        tflops = (runner.case or case).flops(pass_) / (ms * 1e-3) / 1e12
        return {**row_head(case, pass_, method), "ms": float(f"{ms:.4g}"), "tflops": float(f"{tflops:.4g}")}
    except Exception as exc:  # OOM, compile failure, unsupported kernel: one row
        return error_row(case, pass_, method, describe(exc))


def gpu_short_name(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' -> 'h200'."""
    for token in name.replace("NVIDIA", "").split():
        if re.search(r"\d", token):
            return re.sub(r"[^a-z0-9]", "", token.lower()) or "gpu"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src"],
                               cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    # Kernel sources that differ from the commit make the commit name wrong: say so.
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def metadata(on_cuda: bool, commit: str | None = None) -> dict:
    import triton

    gpu = torch.cuda.get_device_name() if on_cuda else "cpu (smoke run, Triton interpreter)"
    meta = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "commit": commit or git_commit()}
    # The peers' own versions when installed (fa4, flex_flash): a file of another FA4 is replaced.
    return {**meta, **peer_versions()}


ROW_KEY = ("suite", "headdim", "causal", "seqlen", "pass", "method")


def load_previous(path: Path, meta: dict) -> list[dict]:
    """Rows of an earlier run with the same GPU, versions and commit (so that suites can be run
    one command at a time); anything else is replaced."""
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if all(old.get(k) == v for k, v in meta.items()):
        return list(old.get("rows", []))
    print(f"note: {path} holds results of another GPU/version/commit ({old.get('commit')}); replacing them")
    return []


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    key = lambda r: tuple(r.get(k) for k in ROW_KEY)
    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + new


def derived_metrics(rows: list[dict]) -> list[dict]:
    """The variant suites' ratios of tritonflash to itself, per (case, pass):

    - ``window``: ``window_vs_full`` = time with the window / (``work_fraction`` x time of the same
      shape without it, ``tritonflash_full``): 1.0 when the time is proportional to the visible
      pairs; target <= WINDOW_TARGET.
    - ``dropout``: ``dropout_cost`` = time with dropout / time without (``tritonflash_nodropout``)
      - 1; target <= DROPOUT_TARGET.

    ``value`` is null (with an ``error``) when either time is missing."""
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["suite"] in ("window", "dropout") and r["pass"] != MEM_PASS:
            cases.setdefault(tuple(r[k] for k in ROW_KEY[:5]), {})[r["method"]] = r
    out = []
    for key, by in cases.items():
        suite = key[0]
        ours = by.get("tritonflash", {})
        if suite == "window":
            base = by.get("tritonflash_full", {})
            frac = ours.get("work_fraction")
            entry = {"metric": "window_vs_full", "work_fraction": frac, "target_max": WINDOW_TARGET}
            value = ours["ms"] / (base["ms"] * frac) if ours.get("ms") and base.get("ms") and frac else None
        else:
            base = by.get("tritonflash_nodropout", {})
            entry = {"metric": "dropout_cost", "target_max": DROPOUT_TARGET}
            value = ours["ms"] / base["ms"] - 1 if ours.get("ms") and base.get("ms") else None
        row = dict(zip(ROW_KEY[:5], key))
        row.update(entry)
        row["ms"] = ours.get("ms")
        row["baseline_ms"] = base.get("ms")
        row["value"] = None if value is None else float(f"{value:.4g}")
        row["met"] = None if value is None else value <= entry["target_max"]
        if value is None:
            row["error"] = "no time for tritonflash or its baseline (see their rows)"
        out.append(row)
    return out


def write_json(path: Path, meta: dict, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    # One row per line: readable, and diffs of a re-run show which numbers moved.
    head = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in meta.items())
    body = ",\n  ".join(json.dumps(r) for r in rows)
    derived = derived_metrics(rows)  # recomputed from every row, so merged runs stay consistent
    tail = "".join(f",\n  {json.dumps(r)}" for r in derived).lstrip(",")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(f"{{{head},\n \"rows\": [\n  {body}\n ],\n \"derived\": [{tail}\n ]}}\n")
    tmp.replace(path)


def seqlen_label(s: int) -> str:
    return f"{s // 1024}k" if s % 1024 == 0 else str(s)


def write_plots(out_dir: Path, short: str, meta: dict, rows: list[dict]) -> list[Path]:
    """One PNG per suite: TFLOP/s vs seqlen, a line per method, a panel per (headdim, causal,
    pass); memory rows get <gpu>_memory.png (GiB vs seqlen)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plots written (pip install matplotlib)")
        return []
    written = []
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault("memory" if r["pass"] == MEM_PASS else r["suite"], []).append(r)
    for name, group in groups.items():
        is_mem = name == "memory"
        value = "bytes" if is_mem else "tflops"
        if all(r.get(value) is None for r in group):
            print(f"note: no {name} numbers to plot")
            continue
        # One colour per method across panels, tritonflash first.
        colors = {m: f"C{i}" for i, m in enumerate(sorted({r["method"] for r in group}, key=lambda m: (m != "tritonflash", m)))}
        panels = sorted({(r["headdim"], r["causal"], r["pass"]) for r in group}, key=str)
        ncols = min(4, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
        for ax, (d, causal, pass_) in zip(axes.flat, panels):
            sel = [r for r in group if (r["headdim"], r["causal"], r["pass"]) == (d, causal, pass_)]
            methods = [m for m in colors if any(r["method"] == m for r in sel)]
            seqlens = sorted({r["seqlen"] for r in sel})
            for m in methods:
                pts = sorted((r["seqlen"], r[value]) for r in sel if r["method"] == m and r.get(value) is not None)
                if pts:
                    xs, ys = zip(*pts)
                    ys = [y / 2**30 for y in ys] if is_mem else ys
                    ax.plot(xs, ys, marker="o", label=m, color=colors[m], linewidth=2.5 if m == "tritonflash" else 1.5)
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqlens, [seqlen_label(s) for s in seqlens])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.set_title(f"d{d} {'causal' if causal else 'non-causal'} {pass_}", fontsize=10)
            ax.set_xlabel("seqlen")
            ax.set_ylabel("peak GiB" if is_mem else "TFLOP/s")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fa4 = f", FA4 {meta['flash_attn_4']}" if meta.get("flash_attn_4") else ""
        fig.suptitle(f"{name} - {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}{fa4}, commit {meta['commit']}",
                     fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{short}_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def ratio_table(rows: list[dict], methods: list[str]) -> str:
    """tritonflash TFLOP/s and tritonflash / peer for each case (> 1: tritonflash is faster);
    memory rows: peak GiB of each method."""
    peers = [m for m in methods if m != "tritonflash"]
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cases.setdefault((r["suite"], r["headdim"], r["causal"], r["seqlen"], r["pass"]), {})[r["method"]] = r
    width = max([10] + [len(k[0]) + 1 for k in cases])
    head = f"{'suite':<{width}}{'d':>4} {'causal':<7}{'seqlen':>7} {'pass':<11}"
    lines = ["tritonflash TFLOP/s and tritonflash / peer TFLOP/s (>1: tritonflash faster; err: no number)",
             head + f"{'tritonflash':>12}" + "".join(f"{p:>15}" for p in peers)]
    mem_lines = []
    for (suite, d, causal, s, pass_), by in cases.items():
        prefix = f"{suite:<{width}}{d:>4} {causal!s:<7}{seqlen_label(s):>7} {pass_:<11}"
        if pass_ == MEM_PASS:
            cells = [by.get(m, {}).get("bytes") for m in methods]
            mem_lines.append(prefix + "".join(f"{'err' if c is None else f'{c / 2**30:.2f}':>15}" for c in cells))
            continue
        ours = by.get("tritonflash", {}).get("tflops")
        cells = [f"{'err' if ours is None else f'{ours:.4g}':>12}"]
        for p in peers:
            theirs = by.get(p, {}).get("tflops")
            cells.append(f"{'err' if ours is None or not theirs else f'{ours / theirs:.3g}x':>15}")
        lines.append(prefix + "".join(cells))
    if mem_lines:
        lines += ["", "peak fwd+bwd memory, GiB", f"{'':<{len(head)}}" + "".join(f"{m:>15}" for m in methods)]
        lines += mem_lines
    derived = derived_metrics(rows)
    titles = {
        "window_vs_full": f"window: tritonflash time / (work_fraction x its time without the window) "
                          f"(1.0: proportional to the visible pairs; target <= {WINDOW_TARGET:g})",
        "dropout_cost": f"dropout: tritonflash time with dropout / without - 1 (target <= {DROPOUT_TARGET:.0%})",
    }
    for metric, title in titles.items():
        sel = [r for r in derived if r["metric"] == metric]
        if not sel:
            continue
        lines += ["", title, head + f"{'fraction':>10}{'ms':>10}{'base ms':>10}{'value':>10}  met"]
        for r in sel:
            frac = f"{r['work_fraction']:.4f}" if r.get("work_fraction") else "-"
            value = "err" if r["value"] is None else (f"{r['value']:.3f}" if metric == "window_vs_full" else f"{r['value']:+.1%}")
            met = {True: "yes", False: "NO", None: "-"}[r["met"]]
            lines.append(f"{r['suite']:<{width}}{r['headdim']:>4} {r['causal']!s:<7}{seqlen_label(r['seqlen']):>7} "
                         f"{r['pass']:<11}{frac:>10}{r['ms'] or 'err'!s:>10}{r['baseline_ms'] or 'err'!s:>10}{value:>10}  {met}")
    return "\n".join(lines)


def parse_list(values, convert) -> list:
    out = []
    for v in values or []:
        out += [convert(p) for p in str(v).split(",") if p.strip()]
    return out


def parse_seqlen(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", action="append",
                   help=f"{', '.join(SUITES)} or all (decode: bench_decode.py); repeatable or comma list (default all)")
    p.add_argument("--headdim", action="append", help="head dims, overriding each suite's (comma list)")
    p.add_argument("--seqlens", action="append",
                   help="e.g. 1k,4k,16k, overriding every suite's own (default 1k..16k; the variant suites have their own)")
    p.add_argument("--quick", action="store_true",
                   help="seqlens 1k and 4k (the variant suites: their quick list), shorter do_bench")
    p.add_argument("--methods", action="append",
                   help=f"comma list of {', '.join(BUILDERS)} (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; build/bench_smoke with --smoke)")
    p.add_argument("--commit", default=None, help="commit to record, where the tree has no .git (default: git rev-parse)")
    p.add_argument("--peers-dir", default=os.environ.get(PEERS_DIR_ENV),
                   help=f"folder with flash-attn-4 installed by scripts/install-peer-wheels, added with site.addsitedir "
                        f"for the fa4 and flex_flash methods (default ${PEERS_DIR_ENV})")
    p.add_argument("--smoke", action="store_true",
                   help="CPU plumbing check at tiny sizes (Triton interpreter, perf_counter timing, no memory numbers)")
    args = p.parse_args(argv)
    suites = parse_list(args.suite, str.strip) or ["all"]
    # The decode suite is benchmarks/bench_decode.py (make bench runs it after this script).
    args.decode_only = suites == ["decode"] * len(suites)
    suites = [s for s in suites if s != "decode"] or ["all"]
    args.suites = SUITES if "all" in suites else suites
    args.methods = parse_list(args.methods, str.strip) or (SMOKE_METHODS if args.smoke else DEFAULT_METHODS)
    args.headdims = parse_list(args.headdim, int)
    args.seqlens = parse_list(args.seqlens, parse_seqlen)  # empty: each suite's own
    for name, got, allowed in (("suite", args.suites, SUITES), ("method", args.methods, list(BUILDERS))):
        unknown = [g for g in got if g not in allowed]
        if unknown:
            p.error(f"unknown {name} {unknown}; choose from {allowed}")
    return args


def start_run(smoke: bool, commit: str | None, out: str | None) -> tuple[dict, str, Path] | None:
    """What this script and bench_decode.py do first: the interpreter for a smoke run, then the
    run's metadata, the GPU's short name (the results' file prefix) and the results folder. None
    (after saying why) when a GPU run finds no GPU."""
    if smoke:
        # CPU tensors run the Triton kernels only in the interpreter, chosen before Triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("error: no CUDA GPU; run with --smoke to check the plumbing on CPU", file=sys.stderr)
        return None
    meta = metadata(not smoke, commit)
    short = "cpu_smoke" if smoke else gpu_short_name(meta["gpu"])
    out_dir = Path(out) if out else (ROOT / "build" / "bench_smoke" if smoke else ROOT / "benchmarks" / "results")
    return meta, short, out_dir


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.decode_only:
        print("bench_attention: the decode suite is benchmarks/bench_decode.py (make bench runs it next); nothing to do here")
        return 0
    on_cuda = not args.smoke
    add_peers_dir(args.peers_dir)  # before anything imports flash_attn
    started = start_run(args.smoke, args.commit, args.out)
    if started is None:
        return 2
    meta, short, out_dir = started
    device = "cuda" if on_cuda else "cpu"
    path = out_dir / f"{short}.json"
    budget = BENCH_MS["quick" if args.quick else "full"]
    cases = make_cases(args.suites, args.headdims, args.seqlens, args.smoke, args.quick)
    print(f"{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']}")
    print(f"{len(cases)} cases x {len(args.methods)} methods -> {path}", flush=True)

    previous = load_previous(path, meta)
    new_rows: list[dict] = []
    t0 = time.perf_counter()
    for case in cases:
        x = make_inputs(case, device)
        for method in case_methods(case, args.methods):
            rows = run_method(case, method, x, on_cuda, budget)
            new_rows += rows
            for r in rows:
                if r.get("error"):
                    result = f"ERROR {r['error']}"
                elif r["pass"] == MEM_PASS:
                    result = f"{r['bytes'] / 2**30:.2f} GiB"
                else:
                    result = f"{r['ms']:.4g} ms {r['tflops']:.4g} TFLOP/s"
                print(f"[{time.perf_counter() - t0:7.1f}s] {case.label} {r['pass']:<10} {method:<15} {result}", flush=True)
        del x
        if any(m.startswith("flex") for m in args.methods):
            import torch._dynamo as dynamo

            # Compiled graphs hold the case's captured tensors; the next case recompiles anyway.
            dynamo.reset()
        free_memory()
        # Written after every case, so that an interrupted run keeps what it measured.
        write_json(path, meta, merge_rows(previous, new_rows))

    all_rows = merge_rows(previous, new_rows)
    for png in write_plots(out_dir, short, meta, all_rows):
        print(f"wrote {png}")
    print(f"wrote {path}\n")
    print(ratio_table(new_rows, args.methods))
    ours_failed = [r for r in new_rows if r["method"].startswith("tritonflash")
                   and str(r.get("error", "")).startswith("failed correctness")]
    if ours_failed:
        print(f"\n{len(ours_failed)} tritonflash row(s) failed the correctness check", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
