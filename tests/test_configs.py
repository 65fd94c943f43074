"""Tile choice without autotuning (configs.Launcher.config): the table entry of this GPU arch
when it fits the launch, else the first candidate that does. CPU tier, no kernel runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tritonflash.kernels import configs, forward
from tritonflash.kernels.common import Variant


def _launch_args(block_d=128, bias_row=False, bias_dtype=torch.float32):
    var = Variant(CAUSAL=True, HAS_BIAS=bias_row, BIAS_ROW=bias_row, BLOCK_D=block_d)
    q = SimpleNamespace(is_cuda=True, device=torch.device("cpu"))
    return dict(Q=q, VAR=var, score=SimpleNamespace(bias=torch.empty(1, dtype=bias_dtype)), tune_bucket=1)


@pytest.fixture
def gpu_launcher(monkeypatch):
    """The forward launcher as on an sm90 GPU without autotuning."""
    monkeypatch.setattr(configs, "INTERPRET", False)
    monkeypatch.setattr(configs, "device_arch", lambda index: "sm90")
    monkeypatch.setattr(forward._launch_fwd, "_chosen", {})  # tiles chosen per case are cached
    return forward._launch_fwd


def _tile(cfg):
    return (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)


def test_table_entry_is_used(gpu_launcher, monkeypatch):
    args = _launch_args()
    want = _tile(configs.prune_fwd(configs.FWD_CONFIGS, {}, **args)[-1])
    monkeypatch.setattr(configs, "TILES", {"sm90": {"_attn_fwd": {configs.tile_key(args): want}}})
    assert _tile(gpu_launcher.config(args)) == want


def test_without_entry_first_fitting_candidate(gpu_launcher, monkeypatch):
    monkeypatch.setattr(configs, "TILES", {"sm80": {"_attn_fwd": {}}})
    assert _tile(gpu_launcher.config(_launch_args())) == _tile(configs.FWD_CONFIGS[0])


def test_entry_that_does_not_fit_is_not_used(gpu_launcher, monkeypatch):
    """A table entry the prune drops for this launch (shared memory at head dim 256 with an
    fp32 bias tile) must not be launched: the first candidate that fits is used instead."""
    args = _launch_args(block_d=256, bias_row=True)
    kept = configs.prune_fwd(configs.FWD_CONFIGS, {}, **args)
    dropped = next(c for c in configs.FWD_CONFIGS if c not in kept)
    monkeypatch.setattr(configs, "TILES", {"sm90": {"_attn_fwd": {configs.tile_key(args): _tile(dropped)}}})
    assert _tile(gpu_launcher.config(args)) == _tile(kept[0])


def test_default_is_not_autotuned(monkeypatch):
    """Autotuning is opt-in (TRITONFLASH_AUTOTUNE=1): by default nothing is timed, so two
    processes pick the same tiles."""
    import importlib
    import os

    env = os.environ.get("TRITONFLASH_AUTOTUNE")
    try:
        monkeypatch.delenv("TRITONFLASH_AUTOTUNE", raising=False)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert importlib.reload(configs).AUTOTUNE is False
        monkeypatch.setenv("TRITONFLASH_AUTOTUNE", "1")
        assert importlib.reload(configs).AUTOTUNE is True
    finally:
        monkeypatch.undo()
        if env is not None:
            os.environ["TRITONFLASH_AUTOTUNE"] = env
        importlib.reload(configs)
