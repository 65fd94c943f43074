"""The issue-15 Gluon forward spike (benchmarks/experiments/gluon_fwd.py) compiles for sm_90a, every case.

Not the library's path: this guards the spike against Triton/Gluon API drift until it is
measured. Compiled in a subprocess (the test process runs Triton in interpreter mode) through
tests/sm90_compile.py's stand-in driver, once for all tests of this module; about 40 s on the 2-core
CPU machine with an empty cache (12 kernels).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ON_GPU
from helpers import SM90_SHARED_LIMIT, run_compile_script

SPIKE = Path(__file__).parent.parent / "benchmarks" / "experiments" / "gluon_fwd.py"

# case/variant rows --compile-only must print: the measured d128 variants, then causal, GQA,
# ALiBi (with and without causal) and head dim 64 (with a deeper ring) on the best variants.
EXPECTED = (
    "d128/s2_pingpong", "d128/s2_free", "d128/s3_pingpong",
    "d128_causal/s3_pingpong", "d128_gqa4/s3_pingpong", "d128_causal_gqa4/s3_pingpong",
    "d128_causal_alibi/s3_pingpong", "d128_alibi/s3_pingpong",
    "d64/s3_pingpong", "d64/s4_pingpong", "d64_causal/s3_pingpong", "d64_causal/s4_pingpong",
)

pytestmark = pytest.mark.skipif(ON_GPU, reason="the spike's --check run covers it on the GPU")


@pytest.fixture(scope="module")
def compiled():
    proc, rows = run_compile_script(SPIKE, "--compile-only", timeout=900)
    assert rows, proc.stderr[-3000:]
    return proc, {f"{r['case']}/{r['variant']}": r for r in rows}


def test_compile_only_covers_every_case(compiled):
    proc, rows = compiled
    errors = [f"{name}: {r['error']}" for name, r in rows.items() if "error" in r]
    assert not errors, "\n".join(errors)
    assert tuple(rows) == EXPECTED
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("name", EXPECTED)
def test_case_compiles_for_sm90_with_async_wgmma(compiled, name):
    r = compiled[1].get(name)
    assert r is not None and "error" not in r, r
    assert r["shared"] <= SM90_SHARED_LIMIT, r
    assert r["ptxas_rc"] == 0, r
    assert r["wgmma_async"] and r["wgmma_wait_groups"] == ["0", "1"], r  # S waited while PV is in flight
    assert not r["c7515"], f"ptxas serialised wgmma: {r}"
    assert r["spill_stores"] == 0 and r["sass_local_mem"] == 0, r
    assert r["worker_warps"] == [4, 1], r  # a 4-warp consumer worker and a 1-warp producer
    assert r["requested_regs"] == [240, 24], r
    assert r["tma_copies"] > 0, r


@pytest.mark.parametrize("name", [n for n in EXPECTED if "_causal" in n])
def test_causal_case_has_a_masked_loop(compiled, name):
    """Causal compiles the key-block step twice (unmasked blocks, then the diagonal blocks): one
    more loop body of wgmmas than the non-causal kernel of the same head dim and variant."""
    rows = compiled[1]
    plain = name.replace("_causal", "").replace("_gqa4", "").replace("_alibi", "")
    assert rows[name]["wgmma_count"] > rows[plain]["wgmma_count"], (rows[name], rows[plain])
