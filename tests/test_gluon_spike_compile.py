"""The issue-15 Gluon forward spike (benchmarks/experiments/gluon_fwd.py) compiles for sm_90a.

Not the library's path: this guards the spike against Triton/Gluon API drift until it is
measured. Compiled in a subprocess (the test process runs Triton in interpreter mode) through
the spike's own stand-in driver; about 10 s on the 2-core CPU machine with an empty cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ON_GPU

SM90_SHARED_LIMIT = 232448  # bytes per block on H100/H200
SPIKE = Path(__file__).parent.parent / "benchmarks" / "experiments" / "gluon_fwd.py"

pytestmark = pytest.mark.skipif(ON_GPU, reason="the spike's --check run covers it on the GPU")


def test_gluon_spike_compiles_for_sm90_with_async_wgmma():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SPIKE), "--compile-only"], capture_output=True, text=True, env=env,
                          timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, proc.stderr[-3000:]
    errors = [r for r in rows if "error" in r]
    assert not errors, "\n".join(f"{r['variant']}: {r['error']}" for r in errors)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in rows:
        assert r["shared"] <= SM90_SHARED_LIMIT, r
        assert r["ptxas_rc"] == 0, r
        assert r["wgmma_async"] and r["wgmma_wait_groups"] == ["0", "1"], r  # S waited while PV is in flight
        assert not r["c7515"], f"ptxas serialised wgmma: {r}"
        assert r["spill_stores"] == 0, r
        assert r["worker_warps"] == [4, 1], r  # a 4-warp consumer worker and a 1-warp producer
        assert r["tma_copies"] > 0, r
