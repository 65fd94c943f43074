"""Benchmark tritonflash against PyTorch SDPA (flash, cuDNN, efficient) and FlexAttention.

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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

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

PEERS = ["sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex"]
DEFAULT_METHODS = ["tritonflash", *PEERS]
SMOKE_METHODS = ["tritonflash", "sdpa_math"]
SUITES = ["nobias", "alibi", "bias_grad", "gqa", "memory"]
MEM_PASS = "fwdbwd_mem"

# Correctness gate: ||x - ref|| / ||ref|| against the fp32 oracle. bf16 rounding alone gives a few
# 1e-3; a wrong mask, bias or gradient gives far more.
REL_TOL = 2e-2
# The oracle materialises fp32 scores for the checked slice; this bounds one copy of them
# (the oracle holds a handful), so the gate fits beside a 16k case on an 80 GB GPU.
REF_SCORE_BYTES = 1 << 30

# do_bench budgets (ms): warm-up and measurement.
BENCH_MS = {"full": (25, 100), "quick": (10, 40)}
SMOKE_REPS = 1


@dataclasses.dataclass(frozen=True)
class Case:
    suite: str  # the row's suite: nobias | alibi | bias_grad | gqa
    headdim: int
    causal: bool
    seqlen: int
    batch: int
    nheads: int
    nheads_k: int
    bias: str  # none | alibi (slopes) | learned ((1, h, s, s) bias that requires grad)
    passes: tuple  # ("fwd", "fwdbwd") or (MEM_PASS,)

    @property
    def label(self) -> str:
        kv = f"/{self.nheads_k}" if self.nheads_k != self.nheads else ""
        return (f"{self.suite} d{self.headdim} {'causal' if self.causal else 'full'} s{self.seqlen} "
                f"b{self.batch} h{self.nheads}{kv}")

    def flops(self, pass_: str) -> float:
        """flash-attn convention: 4*b*h*sq*sk*d forward, halved when causal; fwd+bwd = 3.5x."""
        fwd = 4.0 * self.batch * self.nheads * self.seqlen * self.seqlen * self.headdim
        if self.causal:
            fwd /= 2
        return 3.5 * fwd if pass_ == "fwdbwd" else fwd


def make_cases(suites, headdims, seqlens, smoke: bool) -> list[Case]:
    """The protocol's cases for ``suites``; ``headdims`` (if given) overrides every suite's."""
    cases = []
    for suite in suites:
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
            lens = [s for s in seqlens if row_suite != "bias_grad" or s <= BIAS_GRAD_MAX_SEQLEN]
            if not lens:
                print(f"note: suite {suite} has no seqlen in {seqlens} (it runs at <= {BIAS_GRAD_MAX_SEQLEN})")
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


@dataclasses.dataclass
class Inputs:
    q: torch.Tensor  # (b, s, h, d), requires grad
    k: torch.Tensor  # (b, s, h_k, d), requires grad
    v: torch.Tensor  # (b, s, h_k, d), requires grad
    dout: torch.Tensor  # (b, s, h, d)
    slopes: torch.Tensor | None  # (h,) fp32, ALiBi
    bias: torch.Tensor | None  # (1, h, s, s) bf16, learned, requires grad

    @property
    def wrt(self) -> list[torch.Tensor]:
        """What fwd+bwd differentiates: q, k, v, and the learned bias when there is one."""
        return [self.q, self.k, self.v] + ([self.bias] if self.bias is not None else [])


def make_inputs(case: Case, device) -> Inputs:
    import tritonflash

    gen = torch.Generator(device=device).manual_seed(0)
    b, s, h, hk, d = case.batch, case.seqlen, case.nheads, case.nheads_k, case.headdim

    def randn(*shape, grad=True):
        return torch.randn(*shape, generator=gen, device=device, dtype=DTYPE).requires_grad_(grad)

    q, k, v = randn(b, s, h, d), randn(b, s, hk, d), randn(b, s, hk, d)
    dout = randn(b, s, h, d, grad=False)
    slopes = tritonflash.gen_slopes(h, device=device) if case.bias == "alibi" else None
    bias = randn(1, h, s, s) if case.bias == "learned" else None
    return Inputs(q, k, v, dout, slopes, bias)


class Unsupported(Exception):
    """The method cannot express this case (recorded as an error row without trying)."""


@dataclasses.dataclass
class Runner:
    fn: Callable[[], torch.Tensor]  # forward on the case's inputs -> out (b, s, h, d)
    ref_bias: torch.Tensor | None = None  # the bias the method was given, for the oracle
    ref_slopes: torch.Tensor | None = None  # the ALiBi slopes the method was given
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def build_tritonflash(case: Case, x: Inputs) -> Runner:
    import tritonflash

    bias = x.bias if case.bias == "learned" else None

    def fn():
        return tritonflash.flash_attn_func(x.q, x.k, x.v, bias, case.causal, alibi_slopes=x.slopes)

    return Runner(fn, ref_bias=bias, ref_slopes=x.slopes)


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


def sdpa_builder(backend_name: str) -> Callable[[Case, Inputs], Runner]:
    def build(case: Case, x: Inputs) -> Runner:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        if case.bias != "none" and backend_name == "FLASH_ATTENTION":
            raise Unsupported("SDPA's flash backend takes no attn_mask, so it cannot add a bias")
        s = case.seqlen
        runner = Runner(fn=None, context=lambda: sdpa_kernel(backend))
        if case.bias == "alibi":
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
        extra = {"enable_gqa": True} if case.nheads_k != case.nheads else {}

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


_FLEX = None


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


def build_flex(case: Case, x: Inputs) -> Runner:
    from torch.nn.attention.flex_attention import create_block_mask

    flex = compiled_flex()
    s = case.seqlen
    offset = 0  # seqlen_k - seqlen_q: causal and ALiBi are aligned bottom-right
    block_mask = None
    if case.causal:
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
    extra = {"enable_gqa": True} if case.nheads_k != case.nheads else {}

    def fn():
        out = flex(x.q.transpose(1, 2), x.k.transpose(1, 2), x.v.transpose(1, 2),
                   score_mod=score_mod, block_mask=block_mask, **extra)
        return out.transpose(1, 2)

    return Runner(fn, ref_bias=ref_bias, ref_slopes=x.slopes)


BUILDERS: dict[str, Callable[[Case, Inputs], Runner]] = {
    "tritonflash": build_tritonflash,
    "sdpa_flash": sdpa_builder("FLASH_ATTENTION"),
    "sdpa_cudnn": sdpa_builder("CUDNN_ATTENTION"),
    "sdpa_efficient": sdpa_builder("EFFICIENT_ATTENTION"),
    "sdpa_math": sdpa_builder("MATH"),
    "flex": build_flex,
}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.shape != ref.shape:
        return math.inf
    x, ref = x.detach().float(), ref.detach().float()
    return (x - ref).norm().item() / max(ref.norm().item(), 1e-30)


def check_slice(case: Case, all_batches: bool):
    """(batch, q-head, kv-head) slices the oracle checks: batch 0 (or every batch when the bias
    gradient sums over them) and the first 1-2 query heads with the kv heads they read."""
    per_head = (case.batch if all_batches else 1) * case.seqlen * case.seqlen * 4
    hs = max(1, min(2, case.nheads, REF_SCORE_BYTES // per_head))
    hks = (hs - 1) // (case.nheads // case.nheads_k) + 1
    return slice(None) if all_batches else slice(0, 1), slice(0, hs), slice(0, hks)


def check(case: Case, runner: Runner, x: Inputs, pass_: str) -> str | None:
    """Run the method once on the full case and compare a slice of its output (and dq, dbias for
    fwd+bwd) with attention_ref in fp32 on the same slice of the same inputs.
    Returns None when it passes, else the error string for the row."""
    from tritonflash import attention_ref

    bwd = pass_ != "fwd"
    learned = bwd and x.bias is not None
    with runner.context():
        out = runner.fn()
        grads = torch.autograd.grad(out, x.wrt, x.dout) if bwd else None
    bsl, hsl, ksl = check_slice(case, all_batches=learned)

    def leaf(t, *idx):
        return t[idx].detach().float().requires_grad_(True)

    def cut_bias(t):  # bias broadcastable to (b, h, sq, sk): slice the dims it has
        return t[bsl if t.shape[0] > 1 else slice(None), hsl if t.shape[1] > 1 else slice(None)]

    q_s, k_s, v_s = leaf(x.q, bsl, slice(None), hsl), leaf(x.k, bsl, slice(None), ksl), leaf(x.v, bsl, slice(None), ksl)
    bias_s = None if runner.ref_bias is None else cut_bias(runner.ref_bias).detach().float().requires_grad_(learned)
    slopes_s = None if runner.ref_slopes is None else runner.ref_slopes[hsl]
    out_ref = attention_ref(q_s, k_s, v_s, bias_s, case.causal, alibi_slopes=slopes_s, upcast=True)
    errs = {"out": rel_err(out[bsl, :, hsl], out_ref)}
    del out
    if bwd:
        wrt_ref = [q_s] + ([bias_s] if learned else [])
        g_ref = torch.autograd.grad(out_ref, wrt_ref, x.dout[bsl, :, hsl])
        errs["dq"] = rel_err(grads[0][bsl, :, hsl], g_ref[0])
        if learned:
            errs["dbias"] = rel_err(cut_bias(grads[-1]), g_ref[1])
    bad = [f"{name} rel err {e:.2e}" for name, e in errs.items() if not e <= REL_TOL]
    if not bad:
        return None
    where = f"batch {'all' if learned else 0}, heads 0-{hsl.stop - 1}"
    return f"failed correctness check: {', '.join(bad)} > {REL_TOL:g} vs fp32 attention_ref ({where})"


def fwdbwd(runner: Runner, x: Inputs) -> Callable[[], tuple]:
    """One forward and backward; the gradients are returned (and dropped), never accumulated."""
    return lambda: torch.autograd.grad(runner.fn(), x.wrt, x.dout)


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_ms(fn, context, on_cuda: bool, budget: tuple[int, int]) -> float:
    with context():
        if not on_cuda:  # smoke run: do_bench needs CUDA; the plumbing is what is checked
            times = []  # (the gate's call was the warm-up)
            for _ in range(SMOKE_REPS):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
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
    return {"suite": case.suite, "headdim": case.headdim, "causal": case.causal, "seqlen": case.seqlen,
            "pass": pass_, "method": method}


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
        runner = BUILDERS[method](case, x)
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
        tflops = case.flops(pass_) / (ms * 1e-3) / 1e12
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
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "commit": commit or git_commit()}


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


def write_json(path: Path, meta: dict, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    # One row per line: readable, and diffs of a re-run show which numbers moved.
    head = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in meta.items())
    body = ",\n  ".join(json.dumps(r) for r in rows)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(f"{{{head},\n \"rows\": [\n  {body}\n ]}}\n")
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
        fig.suptitle(f"{name} - {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}",
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
    head = f"{'suite':<10}{'d':>4} {'causal':<7}{'seqlen':>7} {'pass':<11}"
    lines = ["tritonflash TFLOP/s and tritonflash / peer TFLOP/s (>1: tritonflash faster; err: no number)",
             head + f"{'tritonflash':>12}" + "".join(f"{p:>15}" for p in peers)]
    mem_lines = []
    for (suite, d, causal, s, pass_), by in cases.items():
        prefix = f"{suite:<10}{d:>4} {causal!s:<7}{seqlen_label(s):>7} {pass_:<11}"
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
        lines += ["", "peak fwd+bwd memory, GiB", f"{'':<41}" + "".join(f"{m:>15}" for m in methods)]
        lines += mem_lines
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
    p.add_argument("--suite", action="append", help=f"{', '.join(SUITES)} or all; repeatable or comma list (default all)")
    p.add_argument("--headdim", action="append", help="head dims, overriding each suite's (comma list)")
    p.add_argument("--seqlens", action="append", help="e.g. 1k,4k,16k (default 1k..16k)")
    p.add_argument("--quick", action="store_true", help="seqlens 1k and 4k, shorter do_bench")
    p.add_argument("--methods", action="append",
                   help=f"comma list of {', '.join(BUILDERS)} (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; build/bench_smoke with --smoke)")
    p.add_argument("--commit", default=None, help="commit to record, where the tree has no .git (default: git rev-parse)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU plumbing check at tiny sizes (Triton interpreter, perf_counter timing, no memory numbers)")
    args = p.parse_args(argv)
    suites = parse_list(args.suite, str.strip) or ["all"]
    args.suites = SUITES if "all" in suites else suites
    args.methods = parse_list(args.methods, str.strip) or (SMOKE_METHODS if args.smoke else DEFAULT_METHODS)
    args.headdims = parse_list(args.headdim, int)
    args.seqlens = parse_list(args.seqlens, parse_seqlen) or (QUICK_SEQLENS if args.quick else SEQLENS)
    for name, got, allowed in (("suite", args.suites, SUITES), ("method", args.methods, list(BUILDERS))):
        unknown = [g for g in got if g not in allowed]
        if unknown:
            p.error(f"unknown {name} {unknown}; choose from {allowed}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    on_cuda = not args.smoke
    if args.smoke:
        # CPU tensors run the Triton kernels only in the interpreter, chosen before Triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("error: no CUDA GPU; run with --smoke to check the plumbing on CPU", file=sys.stderr)
        return 2
    device = "cuda" if on_cuda else "cpu"
    meta = metadata(on_cuda, args.commit)
    short = gpu_short_name(meta["gpu"]) if on_cuda else "cpu_smoke"
    out_dir = Path(args.out) if args.out else (ROOT / "build" / "bench_smoke" if args.smoke else ROOT / "benchmarks" / "results")
    path = out_dir / f"{short}.json"
    budget = BENCH_MS["quick" if args.quick else "full"]
    cases = make_cases(args.suites, args.headdims, args.seqlens, args.smoke)
    print(f"{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']}")
    print(f"{len(cases)} cases x {len(args.methods)} methods -> {path}", flush=True)

    previous = load_previous(path, meta)
    new_rows: list[dict] = []
    t0 = time.perf_counter()
    for case in cases:
        x = make_inputs(case, device)
        for method in args.methods:
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
        if "flex" in args.methods:
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
    ours_failed = [r for r in new_rows if r["method"] == "tritonflash" and str(r.get("error", "")).startswith("failed correctness")]
    if ours_failed:
        print(f"\n{len(ours_failed)} tritonflash row(s) failed the correctness check", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
