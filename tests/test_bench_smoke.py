"""The benchmark harness's plumbing, on CPU: its --smoke mode runs the same correctness gate,
JSON and plot code as a GPU run, at tiny sizes (tritonflash through the Triton interpreter)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_attention.py"
VARIANT_SUITES = {"window", "softcap", "sinks_window", "dropout"}
ROW_SUITES = {"nobias", "alibi", "bias_grad", "gqa"} | VARIANT_SUITES
SMOKE_METHODS = ["tritonflash", "sdpa_math", "sdpa_flash"]
BASELINES = ["tritonflash_full", "tritonflash_nodropout"]  # timed beside tritonflash in window / dropout


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def run_smoke(script: Path, *args: str) -> subprocess.CompletedProcess:
    """``script --smoke`` in a fresh interpreter (Triton's interpreter, src/ on the path); it must
    exit 0."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), "--smoke", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture
def keep_env(monkeypatch):
    """main(--smoke) sets TRITON_INTERPRET if unset; pin it so that it cannot leak into later tests."""
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))


def broken(build):
    """A method whose output (and so every gradient) is 10% too large."""

    def build_broken(case, x):
        runner = build(case, x)
        fn = runner.fn
        runner.fn = lambda: fn() * 1.1
        return runner

    return build_broken


def check_schema(data, methods):
    for key in ("gpu", "torch", "triton", "commit", "rows"):
        assert key in data, f"results file lacks {key!r}"
    assert data["rows"], "no rows"
    for row in data["rows"]:
        for key in ("suite", "headdim", "causal", "seqlen", "pass", "method"):
            assert key in row, f"row lacks {key!r}: {row}"
        assert row["suite"] in ROW_SUITES, row
        assert row["method"] in methods, row
        assert row["pass"] in ("fwd", "fwdbwd", "fwdbwd_mem"), row
        value = "bytes" if row["pass"] == "fwdbwd_mem" else "tflops"
        assert value in row, f"row lacks {value!r}: {row}"
        if row.get("error") is not None:
            assert isinstance(row["error"], str) and row["error"], row
            assert row[value] is None, f"a failed row must carry no number: {row}"
        else:
            assert row[value] > 0, row
            assert value == "bytes" or row["ms"] > 0, row


@pytest.mark.skipif(torch.cuda.is_available(), reason=(
    "CPU-tier check of the CLI in the interpreter; the GPU machines run the real benchmark, and their "
    "numpy (>= 2.4) breaks Triton 3.6's interpreter (int() of 1-element arrays)"))
def test_smoke_cli_writes_results(tmp_path):
    """The CLI end to end: every suite (the variant suites with their baselines and derived
    ratios), a JSON in the documented format, a plot per suite."""
    proc = run_smoke(SCRIPT, "--out", str(tmp_path), "--methods", ",".join(SMOKE_METHODS))
    data = json.loads((tmp_path / "cpu_smoke.json").read_text())
    check_schema(data, SMOKE_METHODS + BASELINES)
    rows = data["rows"]
    assert {r["suite"] for r in rows} == ROW_SUITES
    assert {r["method"] for r in rows} == set(SMOKE_METHODS + BASELINES)
    assert {r["suite"] for r in rows if r["method"] == "tritonflash_full"} == {"window"}
    assert {r["suite"] for r in rows if r["method"] == "tritonflash_nodropout"} == {"dropout"}
    # SDPA has no softcap: a recorded reason, not an attempt.
    sdpa_cap = [r for r in rows if r["suite"] == "softcap" and r["method"].startswith("sdpa")]
    assert sdpa_cap and all("softcap" in r["error"] for r in sdpa_cap)
    timed = [r for r in rows if r["pass"] != "fwdbwd_mem" and r["method"] != "sdpa_flash" and r not in sdpa_cap]
    assert timed and all(r.get("error") is None for r in timed), [r for r in timed if r.get("error")]
    derived = {(r["suite"], r["pass"]): r for r in data["derived"]}
    assert set(derived) == {(s, p) for s in ("window", "dropout") for p in ("fwd", "fwdbwd")}
    assert all(r["value"] is not None and isinstance(r["met"], bool) for r in derived.values()), derived
    assert 0 < derived["window", "fwd"]["work_fraction"] < 1
    assert "work_fraction x its time without the window" in proc.stdout and "dropout: tritonflash time" in proc.stdout
    # SDPA's flash backend takes no mask: the bias suites record that instead of a number.
    flash_bias = [r for r in rows if r["method"] == "sdpa_flash" and r["suite"] in ("alibi", "bias_grad")]
    assert flash_bias and all("attn_mask" in r["error"] for r in flash_bias)
    mem = [r for r in rows if r["pass"] == "fwdbwd_mem"]
    assert {r["method"] for r in mem} == set(SMOKE_METHODS) and all(r["suite"] == "alibi" for r in mem)
    assert "tritonflash / peer" in proc.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        for suite in ROW_SUITES:
            assert (tmp_path / f"cpu_smoke_{suite}.png").stat().st_size > 0


def test_gate_rejects_a_wrong_peer(tmp_path, monkeypatch, keep_env):
    """A peer with a wrong output gets error rows and no time; a right one gets numbers.
    (SDPA's math backend stands in for both: it is quick on CPU.)"""
    monkeypatch.setitem(bench.BUILDERS, "wrong_peer", broken(bench.BUILDERS["sdpa_math"]))
    rc = bench.main(["--smoke", "--suite", "bias_grad", "--methods", "sdpa_math,wrong_peer", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "cpu_smoke.json").read_text())
    check_schema(data, ["sdpa_math", "wrong_peer"])
    wrong = [r for r in data["rows"] if r["method"] == "wrong_peer"]
    assert len(wrong) == 2  # fwd, fwdbwd
    assert all(r["error"].startswith("failed correctness check") for r in wrong), wrong
    assert "dq rel err" in wrong[1]["error"] and "dbias rel err" in wrong[1]["error"], wrong[1]
    assert all(r.get("error") is None for r in data["rows"] if r["method"] == "sdpa_math")


def test_wrong_tritonflash_fails_the_run(tmp_path, monkeypatch, keep_env):
    """A tritonflash that fails the gate makes the run exit non-zero (CI catches it)."""
    monkeypatch.setitem(bench.BUILDERS, "tritonflash", broken(bench.BUILDERS["sdpa_math"]))
    rc = bench.main(["--smoke", "--suite", "gqa", "--methods", "tritonflash", "--out", str(tmp_path)])
    assert rc == 1


def test_failing_method_is_a_row_not_a_crash(tmp_path, keep_env, monkeypatch):
    def build_raises(case, x):
        def fn():
            raise RuntimeError("no kernel for this case\nsecond line")

        return bench.Runner(fn)

    monkeypatch.setitem(bench.BUILDERS, "raises", build_raises)
    rc = bench.main(["--smoke", "--suite", "gqa", "--methods", "raises", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "cpu_smoke.json").read_text())["rows"]
    assert [r["error"] for r in rows] == ["RuntimeError: no kernel for this case"] * 2


def test_fa4_peers_are_rows_with_a_reason(tmp_path, keep_env, monkeypatch):
    """fa4 and flex_flash (flash-attn-4) never get a time they did not earn: on CPU, and on a GPU
    without the package, each row carries the reason; cases FA4's API cannot express are refused
    before anything is imported."""
    monkeypatch.delenv(bench.PEERS_DIR_ENV, raising=False)
    rc = bench.main(["--smoke", "--suite", "gqa", "--methods", "fa4,flex_flash", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "cpu_smoke.json").read_text())["rows"]
    assert sorted(r["method"] for r in rows) == ["fa4", "fa4", "flex_flash", "flex_flash"]
    assert all(r["tflops"] is None and "NVIDIA GPUs" in r["error"] for r in rows), rows
    for suite, reason in (("alibi", "no ALiBi"), ("bias_grad", "no bias tensor"), ("dropout", "no dropout")):
        case = bench.make_cases([suite], [], None, smoke=True)[0]
        with pytest.raises(bench.Unsupported, match=reason):
            bench.build_fa4(case, bench.make_inputs(case, "cpu"))
    monkeypatch.setattr(bench, "fa4_import", lambda: (None, "flash-attn-4 is not installed (test)"))
    with pytest.raises(bench.Unsupported, match="not installed"):
        bench.fa4_function("cuda")


def test_fa4_arguments_express_the_variants(monkeypatch):
    """build_fa4 maps each variant onto FA4's own arguments (window with None for unbounded,
    softcap, learnable_sink, fewer kv heads): an FA4 stand-in that computes the oracle from exactly
    those arguments passes the gate, fwd and fwd+bwd (dsinks included)."""
    from tritonflash import attention_ref

    seen = []

    def fake_fa4(q, k, v, causal=False, window_size=(None, None), softcap=0.0, learnable_sink=None):
        seen.append(window_size)
        window = tuple(-1 if w is None else w for w in window_size)
        out = attention_ref(q, k, v, None, causal, window_size=window, softcap=softcap, sinks=learnable_sink)
        return out.to(q.dtype), None

    monkeypatch.setattr(bench, "fa4_function", lambda device: fake_fa4)
    for suite in ("nobias", "gqa", "window", "softcap", "sinks_window"):
        for case in bench.make_cases([suite], [], None, smoke=True):
            x = bench.make_inputs(case, "cpu")
            runner = bench.build_fa4(case, x)
            for pass_ in case.passes:
                assert bench.check(case, runner, x, pass_) is None, (case.label, pass_)
    assert (16, 0) in seen and (None, None) in seen


def test_peers_dir_runs_pth_files(tmp_path, monkeypatch, capsys):
    """The cutlass DSL registers its packages through a .pth file: --peers-dir must process it
    (site.addsitedir), not merely put the folder on sys.path."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "registered").mkdir()
    (tmp_path / "dsl.pth").write_text("registered\n")
    assert bench.add_peers_dir(str(tmp_path)) == str(tmp_path.resolve())
    assert str(tmp_path.resolve()) in sys.path and str((tmp_path / "registered").resolve()) in sys.path
    assert bench.add_peers_dir(str(tmp_path / "missing")) is None
    assert "does not exist" in capsys.readouterr().out
    assert bench.parse_args(["--peers-dir", "x"]).peers_dir == "x"


def test_sdpa_alibi_mask_matches_the_reference_bias():
    """The materialised mask SDPA gets is the ALiBi the kernels compute, plus the causal -inf."""
    from tritonflash import gen_slopes
    from tritonflash.bias import alibi_slopes_to_bias

    slopes = gen_slopes(4)
    mask = bench.alibi_mask(slopes, 48, 48, causal=True, dtype=torch.float32)
    want = alibi_slopes_to_bias(slopes, 48, 48)
    upper = torch.ones(48, 48, dtype=torch.bool).triu(1)
    assert torch.equal(mask[..., ~upper], want[..., ~upper])
    assert torch.isneginf(mask[..., upper]).all()


def test_flex_expressions_match_the_reference(monkeypatch):
    """FlexAttention's window mask_mod, softcap score_mod and sink correction (from its lse)
    express the variant suites: forward checked on CPU with eager Flex (CPU Flex has no backward;
    the GPU run gates fwd+bwd)."""
    flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")
    from tritonflash import attention_ref

    monkeypatch.setattr(bench, "_FLEX", flex_mod.flex_attention)
    monkeypatch.setattr(bench, "_FLEX_SINKS", bench.flex_with_sinks)
    for suite in ("window", "softcap", "sinks_window"):
        (case,) = bench.make_cases([suite], [], None, smoke=True)
        case = dataclasses.replace(case, seqlen=128)  # flex's blocks are 128 wide
        x = bench.make_inputs(case, "cpu")
        for t in (x.q, x.k, x.v):
            t.requires_grad_(False)
        out = bench.build_flex(case, x).fn()
        ref = attention_ref(x.q, x.k, x.v, None, case.causal, window_size=case.window, softcap=case.softcap,
                            sinks=x.sinks.detach() if case.sinks else None)
        assert bench.rel_err(out, ref) < 2e-2, suite
    (case,) = bench.make_cases(["dropout"], [], None, smoke=True)
    with pytest.raises(bench.Unsupported, match="no dropout"):
        bench.build_flex(case, bench.make_inputs(case, "cpu"))


def test_variant_protocol():
    cases = bench.make_cases(list(bench.VARIANTS), [], None, smoke=False)
    by = {}
    for c in cases:
        by.setdefault(c.suite, []).append(c)
    assert [c.seqlen for c in by["window"]] == [4096, 8192, 16384, 32768]
    assert all((c.headdim, c.nheads, c.nheads_k, c.window, c.causal) == (128, 32, 8, (4096, 0), True)
               and c.batch * c.seqlen == 32768 for c in by["window"])
    assert all((c.headdim, c.nheads, c.nheads_k, c.softcap) == (256, 16, 8, 50.0) for c in by["softcap"])
    assert all((c.headdim, c.nheads, c.nheads_k, c.window, c.sinks) == (64, 64, 8, (128, 0), True) for c in by["sinks_window"])
    assert {(c.headdim, c.causal, c.seqlen) for c in by["dropout"]} == {(d, k, s) for d in (64, 128) for k in (False, True)
                                                                          for s in (1024, 4096)}
    quick = bench.make_cases(["window"], [], None, smoke=False, quick=True)
    assert [c.seqlen for c in quick] == [32768]
    # The work fraction counts visible pairs exactly: rows i < 4096 see i + 1 keys, the rest 4097.
    w8k = next(c for c in by["window"] if c.seqlen == 8192)
    assert w8k.work_fraction == (4096 * 4097 / 2 + 4096 * 4097) / (8192 * 8193 / 2)
    assert next(c for c in by["window"] if c.seqlen == 4096).work_fraction == 1.0
    assert w8k.flops("fwd") == 4 * 4 * 32 * 8192 * 8192 * 128 / 2 * w8k.work_fraction
    assert bench.visible_pairs(5, 7, False, (1, 2)) == int(bench.visible_mask(5, 7, False, (1, 2), "cpu").sum())
    assert bench.case_methods(w8k, ["tritonflash", "flex"]) == ["tritonflash", "tritonflash_full", "flex"]
    assert bench.case_methods(w8k, ["flex"]) == ["flex"]
    head = {"suite": "dropout", "headdim": 64, "causal": True, "seqlen": 1024, "pass": "fwd"}
    rows = [{**head, "method": "tritonflash", "ms": 1.1}, {**head, "method": "tritonflash_nodropout", "ms": 1.0}]
    (d,) = bench.derived_metrics(rows)
    assert d["metric"] == "dropout_cost" and abs(d["value"] - 0.1) < 1e-9 and d["met"] is True
    rows[0]["ms"] = None
    assert bench.derived_metrics(rows)[0]["value"] is None


def test_protocol_helpers():
    case = bench.Case("nobias", 128, True, 4096, 4, 16, 16, "none", ("fwd", "fwdbwd"))
    assert case.flops("fwd") == 4 * 4 * 16 * 4096 * 4096 * 128 / 2
    assert case.flops("fwdbwd") == 3.5 * case.flops("fwd")
    cases = bench.make_cases(["nobias", "bias_grad", "gqa", "memory"], [], bench.SEQLENS, smoke=False)
    assert all(c.batch * c.seqlen == 16384 and c.nheads * c.headdim == 2048 for c in cases)
    assert max(c.seqlen for c in cases if c.suite == "bias_grad") == 4096
    assert all(c.nheads_k * 8 == c.nheads for c in cases if c.suite == "gqa")
    assert {c.passes for c in cases if c.suite == "alibi"} == {("fwdbwd_mem",)}
    assert bench.gpu_short_name("NVIDIA H100 80GB HBM3") == "h100"
    assert bench.gpu_short_name("NVIDIA H200") == "h200"
    assert [bench.parse_seqlen(s) for s in ("1k", "16K", "512")] == [1024, 16384, 512]


# ---- decode suite (benchmarks/bench_decode.py, run by make bench after bench_attention.py) -------

DECODE_SCRIPT = ROOT / "benchmarks" / "bench_decode.py"
DECODE_METHODS = {"tf_decode", "tf_decode_alibi", "tf_decode_bias", "tf_prefill", "layer_concat", "sdpa_gqa", "flex"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-tier check of the CLI in the interpreter (see above)")
def test_decode_smoke_cli_writes_results(tmp_path):
    """bench_decode.py --smoke with make bench's arguments: bench_attention's options ignored,
    a JSON with the metadata and a row per (case, method) that passed the gate or says why
    not, a plot."""
    run_smoke(DECODE_SCRIPT, "--out", str(tmp_path), "--methods", "tritonflash,sdpa_math")
    data = json.loads((tmp_path / "cpu_smoke_decode.json").read_text())
    for key in ("gpu", "torch", "triton", "commit", "rows"):
        assert key in data
    rows = data["rows"]
    assert {r["method"] for r in rows} == DECODE_METHODS and {r["page"] for r in rows} == {None, 16}
    for r in rows:
        if r["method"] == "flex" or (r["page"] and not r["method"].startswith("tf_decode")):
            assert r["GBps"] is None and r["error"], r  # a reason, not an attempt
        else:
            assert r.get("error") is None and r["GBps"] > 0 and r["max_err"] < 2e-2, r
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "cpu_smoke_decode.png").stat().st_size > 0


def test_decode_suite_selection():
    """--suite without decode skips bench_decode; --suite decode alone does nothing in
    bench_attention."""
    spec = importlib.util.spec_from_file_location("bench_decode", DECODE_SCRIPT)
    decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode)
    assert decode.parse_args(["--suite", "alibi"]).skip
    assert not decode.parse_args(["--suite", "alibi,decode"]).skip and not decode.parse_args([]).skip
    assert bench.parse_args(["--suite", "decode"]).decode_only
    assert bench.parse_args(["--suite", "alibi,decode"]).suites == ["alibi"]
    assert bench.main(["--suite", "decode"]) == 0
