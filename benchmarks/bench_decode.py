"""KV-cache decoding benchmark (issue 14): the ``decode`` suite of ``make bench``.

Time per decoding step (one query token per sequence) and achieved bandwidth (bytes of the
valid K/V read / time) of ``flash_attn_with_kvcache`` against its peers, beside a large
device-to-device copy measured in the same run. Each method is timed twice: ``us`` is the step's
GPU time with GRAPH_STEPS steps captured in one CUDA graph and replayed (how serving stacks run
decode steps; ``timing: "cuda_graph"``, or ``"eager"`` with a ``graph_error`` when the method
cannot be captured), ``us_eager`` one eager call between CUDA events (the host's per-call
overhead included: launches, validation, allocator). GB/s and the targets use ``us`` (the
issue's target: >= 80% of the copy when the cache read is >= 256 MB). Every method is checked against ``kvcache_attention_ref`` on the case before
it is timed; one that fails, cannot run the case or raises gets a row with ``"GBps": null`` and
an ``"error"``, never a time.

    PYTHONPATH=src python benchmarks/bench_decode.py                    # the issue's shapes (GPU)
    PYTHONPATH=src python benchmarks/bench_decode.py --quick            # batch 1/8, 8k/32k
    PYTHONPATH=src python benchmarks/bench_decode.py --smoke --out /tmp/b   # CPU plumbing check

Results go where ``bench_attention.py`` puts its own, with the same commit convention:
``<out>/<gpu>_decode.json`` (GPU name, torch/triton versions, commit; rows replaced, not
merged) and ``<out>/<gpu>_decode.png`` (achieved GB/s vs cache length, a panel per
(nheads_k, page, batch), the copy bandwidth and the 80% target as lines). ``make bench`` runs
this after ``bench_attention.py`` with the same ``BENCH_ARGS``: ``--out``, ``--commit``,
``--quick`` and ``--smoke`` are shared, other bench_attention options are ignored here, and a
``--suite`` list without ``decode`` or ``all`` skips this suite.

Methods (``--decode-methods``):

- ``tf_decode``: flash_attn_with_kvcache (contiguous and paged caches);
- ``tf_decode_alibi``, ``tf_decode_bias``: the same with ALiBi / a (b, h, 1, L) bias (their cost);
- ``tf_prefill``: flash_attn_func with seqlen_q = 1 over the valid keys (the prefill kernel);
- ``layer_concat``: the layers' 'triton' backend given past_key_value (b, L-1) and one new
  token: torch.cat of the cache and the new token, then flash_attn_with_kvcache (what a layer
  with a growing concatenated cache pays each step);
- ``sdpa_gqa``: scaled_dot_product_attention with enable_gqa on the valid keys;
- ``flex``: FlexAttention compiled (torch.compile, dynamic=False), a block mask over each
  sequence's valid length on the whole cache buffer, GQA native (contiguous caches; GPU only).

Paged caches run the tritonflash decode methods only (the peers take contiguous keys).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench_attention's helpers; importing it also puts src/ on sys.path when tritonflash is not installed.
from bench_attention import compiled_flex, parse_list, seqlen_label, smoke_seconds, start_run  # noqa: E402

NHEADS, HEADDIM = 32, 128
FULL = dict(batches=[1, 8, 64], lengths=[1024, 8192, 32768, 131072], nheads_k=[8, 1], pages=[None, 256])
QUICK = dict(batches=[1, 8], lengths=[8192, 32768], nheads_k=[8], pages=[None, 256])
SMOKE = dict(batches=[2], lengths=[40], nheads_k=[2], pages=[None, 16])
SMOKE_HEADS, SMOKE_DIM = 4, 32
MAX_CACHE_BYTES = 40 * 2**30  # skip cases whose K/V cache would not fit beside the peers
TARGET_COPY_FRACTION = 0.8
METHODS = ["tf_decode", "tf_decode_alibi", "tf_decode_bias", "tf_prefill", "layer_concat", "sdpa_gqa", "flex"]
TOLERANCE = 2e-2  # bf16 output, max abs error against the fp32 reference
GRAPH_STEPS = 8  # decode steps per captured CUDA graph


def copy_bandwidth(device, nbytes=2**30) -> float:
    """Bytes moved per second (read + write) by a large device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), on_cuda=True)
    return 2 * nbytes / t


def event_median(fn, reps) -> float:
    """Median seconds of ``fn`` between two CUDA events, over ``reps`` synchronized calls."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def time_fn(fn, on_cuda=True, reps=50) -> float:
    """Median seconds of one call (CUDA events after a warm-up call; smoke: perf_counter)."""
    if not on_cuda:
        return smoke_seconds(fn)
    fn()
    torch.cuda.synchronize()
    return event_median(fn, reps)


def time_graph(fn, steps=GRAPH_STEPS, reps=20) -> float:
    """Median seconds of one step when ``steps`` calls are captured in one CUDA graph and
    replayed (the GPU's time, without the host's per-call overhead: how servers run decode
    steps). Raises if ``fn`` cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t = event_median(graph.replay, reps) / steps
    del graph
    return t


def make_case(batch, length, nheads, nheads_k, d, page, device, dtype=torch.bfloat16):
    """q (batch, 1, h, d), a cache holding ``length`` valid keys per sequence (contiguous, or
    paged with shuffled blocks) with room for one more token, its block table."""
    q = torch.randn(batch, 1, nheads, d, device=device, dtype=dtype)
    if page is None:
        kc = torch.randn(batch, length + 1, nheads_k, d, device=device, dtype=dtype)
        return q, kc, torch.randn_like(kc), None
    blocks = -(-(length + 1) // page)
    kc = torch.randn(batch * blocks, page, nheads_k, d, device=device, dtype=dtype)
    table = torch.randperm(batch * blocks, device=device).view(batch, blocks).to(torch.int32)
    return q, kc, torch.randn_like(kc), table


def builders(q, kc, vc, table, length, nheads_k):
    """name -> (build: () -> fn, or a str: why the method cannot run the case)."""
    from tritonflash import flash_attn_func, flash_attn_with_kvcache, gen_slopes
    from tritonflash.layers.backends import triton_flash_attn_fn

    b, _, h, d = q.shape
    slopes = gen_slopes(h, device=q.device)
    capacity = kc.shape[1] if table is None else table.shape[1] * kc.shape[1]
    bias = torch.randn(b, h, 1, capacity, device=q.device)
    common = dict(cache_seqlens=length, block_table=table, causal=True)
    out = {
        "tf_decode": lambda: lambda: flash_attn_with_kvcache(q, kc, vc, **common),
        "tf_decode_alibi": lambda: lambda: flash_attn_with_kvcache(q, kc, vc, alibi_slopes=slopes, **common),
        "tf_decode_bias": lambda: lambda: flash_attn_with_kvcache(q, kc, vc, bias=bias, **common),
    }
    if table is not None:
        return out, dict(alibi_slopes=slopes, bias=bias)
    k, v = kc[:, :length], vc[:, :length]
    out["tf_prefill"] = lambda: lambda: flash_attn_func(q, k, v, causal=True)

    def layer():
        kp, vp = k[:, :-1].contiguous(), v[:, :-1].contiguous()  # the layer's cache: L - 1 past tokens
        qx, kx, vx = q.flatten(2), k[:, -1:].flatten(2), v[:, -1:].flatten(2)
        return lambda: triton_flash_attn_fn(qx, kx, vx, h, nheads_k, past_key_value=(kp, vp), is_causal=True)[0].view(b, 1, h, d)

    out["layer_concat"] = layer
    out["sdpa_gqa"] = lambda: lambda: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True).transpose(1, 2)

    def flex():
        if not q.is_cuda:
            return "flex: GPU only here (on CPU torch.compile builds C++ kernels: too slow for a smoke run)"
        from torch.nn.attention.flex_attention import create_block_mask

        lengths = torch.full((b,), length, dtype=torch.int32, device=q.device)

        def valid(bi, hi, qi, kv):
            return kv < lengths[bi]

        mask = create_block_mask(valid, B=b, H=None, Q_LEN=1, KV_LEN=capacity, device=q.device)
        fn = compiled_flex()  # one per process, with bench_attention's recompile limits
        qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
        return lambda: fn(qt, kt, vt, block_mask=mask, enable_gqa=True).transpose(1, 2)

    out["flex"] = flex
    return out, dict(alibi_slopes=slopes, bias=bias)


def reference(q, kc, vc, table, length, extra, method):
    from tritonflash.reference import kvcache_attention_ref

    kw = dict(cache_seqlens=length, block_table=table, causal=True)
    if method == "tf_decode_alibi":
        kw["alibi_slopes"] = extra["alibi_slopes"]
    elif method == "tf_decode_bias":
        kw["bias"] = extra["bias"]
    return kvcache_attention_ref(q, kc, vc, **kw)


def run_case(batch, length, nheads, nheads_k, d, page, device, methods, on_cuda, copy_bw):
    torch.manual_seed(0)
    q, kc, vc, table = make_case(batch, length, nheads, nheads_k, d, page, device)
    kv_bytes = 2 * batch * length * nheads_k * d * q.element_size()
    fns, extra = builders(q, kc, vc, table, length, nheads_k)
    refs = {}  # one reference per score kind (plain, alibi, bias), shared by the methods

    def reference_for(method):
        kind = method if method in ("tf_decode_alibi", "tf_decode_bias") else "plain"
        if kind not in refs:
            refs[kind] = reference(q, kc, vc, table, length, extra, kind)
        return refs[kind]

    rows = []
    for method in methods:
        row = dict(suite="decode", batch=batch, length=length, nheads=nheads, nheads_k=nheads_k, d=d, page=page,
                   kv_bytes=kv_bytes, method=method, us=None, GBps=None)
        build = fns.get(method, "paged caches: tritonflash decode methods only")
        try:
            fn = build() if callable(build) else build
            if isinstance(fn, str):
                row["error"] = fn
            else:
                with torch.no_grad():
                    want = reference_for(method)
                    err = (fn().float() - want.float()).abs().max().item()
                    row["max_err"] = err
                    if not err <= TOLERANCE:
                        row["error"] = f"failed correctness: max error {err:.3g} > {TOLERANCE}"
                    else:
                        t_eager = time_fn(fn, on_cuda)
                        row["us_eager"] = t_eager * 1e6
                        row["GBps_eager"] = kv_bytes / t_eager / 1e9
                        t, row["timing"] = t_eager, "eager"
                        if on_cuda:
                            try:
                                t, row["timing"] = time_graph(fn), "cuda_graph"
                            except Exception as e:  # noqa: BLE001 - not capturable: the eager time stands
                                row["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                                torch.cuda.synchronize()
                        row["us"] = t * 1e6
                        row["GBps"] = kv_bytes / t / 1e9
                        if copy_bw:
                            row["copy_fraction"] = kv_bytes / t / copy_bw
        except Exception as e:  # noqa: BLE001 - a method that raises is a row, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if on_cuda:
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def derived(rows: list[dict]) -> list[dict]:
    """The issue's targets per case, from ``us`` (CUDA-graph step time): tf_decode's fraction of
    the copy where the read is >= 256 MB (target >= 0.8), its speed-up over sdpa_gqa (target >= 3
    at batch 1, 32k) and the ALiBi / bias cost over tf_decode (target <= 0.10)."""
    out = []
    cases = {}
    for r in rows:
        if r.get("us"):
            cases.setdefault((r["batch"], r["length"], r["nheads_k"], r["page"]), {})[r["method"]] = r
    for (b, length, hk, page), m in sorted(cases.items(), key=lambda kv: tuple(-1 if x is None else x for x in kv[0])):
        tf = m.get("tf_decode")
        if tf is None:
            continue
        d = dict(batch=b, length=length, nheads_k=hk, page=page, kv_MB=round(tf["kv_bytes"] / 1e6, 1),
                 copy_fraction=round(tf.get("copy_fraction", 0.0), 3))
        d["copy_target_applies"] = tf["kv_bytes"] >= 256e6
        if "sdpa_gqa" in m:
            d["x_sdpa"] = round(m["sdpa_gqa"]["us"] / tf["us"], 2)
        if "flex" in m:
            d["x_flex"] = round(m["flex"]["us"] / tf["us"], 2)
        for k in ("alibi", "bias"):
            if f"tf_decode_{k}" in m:
                d[f"{k}_cost"] = round(m[f"tf_decode_{k}"]["us"] / tf["us"] - 1, 3)
        out.append(d)
    return out


def write_plot(path: Path, meta: dict, rows: list[dict], copy_bw) -> bool:
    """Achieved GB/s vs cache length, a line per method, a panel per (nheads_k, page, batch)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plot written (pip install matplotlib)")
        return False
    timed = [r for r in rows if r.get("GBps")]
    if not timed:
        print("note: no decode numbers to plot")
        return False
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    panels = sorted({(r["nheads_k"], r["page"] or 0, r["batch"]) for r in timed})
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (hk, page, batch) in zip(axes.flat, panels):
        sel = [r for r in timed if (r["nheads_k"], r["page"] or 0, r["batch"]) == (hk, page, batch)]
        for m in METHODS:
            pts = sorted((r["length"], r["GBps"]) for r in sel if r["method"] == m)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=m, color=colors[m], linewidth=2.5 if m == "tf_decode" else 1.5)
        if copy_bw:
            ax.axhline(copy_bw / 1e9, color="k", linestyle="--", linewidth=1, label="device copy")
            ax.axhline(TARGET_COPY_FRACTION * copy_bw / 1e9, color="k", linestyle=":", linewidth=1, label="80% target")
        ax.set_xscale("log", base=2)
        lengths = sorted({r["length"] for r in sel})
        ax.set_xticks(lengths, [seqlen_label(n) for n in lengths])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_title(f"h_k {hk}, {'paged ' + str(page) if page else 'contiguous'}, batch {batch}", fontsize=10)
        ax.set_xlabel("cache length (valid keys)")
        ax.set_ylabel("achieved GB/s (K/V read)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"decode - {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_json(path: Path, meta: dict, copy_bw, rows: list[dict], **final):
    """The results file: metadata, the copy bandwidth, the rows, then what the finished run adds
    (``left_out``, ``derived``)."""
    with open(path, "w") as f:
        json.dump(dict(meta, copy_bandwidth=copy_bw, rows=rows, **final), f, indent=1)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU plumbing check (Triton interpreter)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; build/bench_smoke with --smoke)")
    ap.add_argument("--commit", default=None, help="commit to record, where the tree has no .git (default: git rev-parse)")
    ap.add_argument("--decode-methods", default=None, help=f"comma list of {', '.join(METHODS)} (default all)")
    ap.add_argument("--suite", action="append", help="bench_attention's suites: without 'decode' or 'all', nothing runs")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="start no new case after this many seconds (the results say which cases were left out)")
    args, ignored = ap.parse_known_args(argv)
    if ignored:
        print(f"note: bench_decode ignores bench_attention's options {ignored}")
    args.methods = parse_list([args.decode_methods], str.strip) if args.decode_methods else list(METHODS)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method {unknown}; choose from {METHODS}")
    suites = set(parse_list(args.suite, str.strip))
    args.skip = bool(suites) and not suites & {"decode", "all"}
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.skip:
        print("bench_decode: 'decode' is not among --suite; nothing to do")
        return 0
    on_cuda = not args.smoke
    started = start_run(args.smoke, args.commit, args.out)
    if started is None:
        return 2
    meta, short, out_dir = started
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{short}_decode.json"
    grid = SMOKE if args.smoke else (QUICK if args.quick else FULL)
    nheads, d = (SMOKE_HEADS, SMOKE_DIM) if args.smoke else (NHEADS, HEADDIM)
    device = torch.device("cuda" if on_cuda else "cpu")
    print(f"{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']} -> {path}")
    copy_bw = copy_bandwidth(device) if on_cuda else None
    if copy_bw:
        print(f"device copy bandwidth: {copy_bw / 1e9:.0f} GB/s (target: {TARGET_COPY_FRACTION:.0%} of it)")
    rows = []
    t0 = time.perf_counter()
    left_out = []
    for nheads_k in grid["nheads_k"]:
        for page in grid["pages"]:
            for batch in grid["batches"]:
                for length in grid["lengths"]:
                    if 2 * batch * (length + 1) * nheads_k * d * 2 > MAX_CACHE_BYTES:
                        continue
                    if args.max_seconds is not None and time.perf_counter() - t0 > args.max_seconds:
                        left_out.append(dict(batch=batch, length=length, nheads_k=nheads_k, page=page))
                        continue
                    for r in run_case(batch, length, nheads, nheads_k, d, page, device, args.methods, on_cuda, copy_bw):
                        rows.append(r)
                        result = (f"ERROR {r['error']}" if r.get("error") else
                                  f"{r['us']:9.1f} us {r['GBps']:8.1f} GB/s" + (f" ({r['copy_fraction']:.0%} of copy)"
                                                                               if r.get("copy_fraction") else "")
                                  + f" [{r['timing']}; eager {r['us_eager']:.1f} us]")
                        print(f"[{time.perf_counter() - t0:7.1f}s] b{batch} L{length} hk{nheads_k} page {page} "
                              f"{r['method']:<16} {result}", flush=True)
                    write_json(path, meta, copy_bw, rows)  # after every case: an interrupted run keeps what it measured
    if left_out:
        print(f"--max-seconds {args.max_seconds:g}: {len(left_out)} case(s) left out")
    summary = derived(rows)
    write_json(path, meta, copy_bw, rows, left_out=left_out, derived=summary)
    print("targets (CUDA-graph step time): copy >= 0.8 where kv >= 256 MB; x_sdpa >= 3 at b1 32k; alibi/bias cost <= 0.10")
    for d in summary:
        print("  " + " ".join(f"{k}={v}" for k, v in d.items()))
    png = out_dir / f"{short}_decode.png"
    if write_plot(png, meta, rows, copy_bw):
        print(f"wrote {png}")
    print(f"wrote {path}")
    if args.json:
        write_json(Path(args.json), meta, copy_bw, rows, left_out=left_out, derived=summary)
    ours_failed = [r for r in rows if r["method"].startswith("tf_") and str(r.get("error", "")).startswith("failed correctness")]
    if ours_failed:
        print(f"{len(ours_failed)} tritonflash decode row(s) failed the correctness check", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
