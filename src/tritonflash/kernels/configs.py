"""Tile, warp and pipeline choices per kernel.

By default every launch takes its tile from a fixed table (``tiles.py``, written by
``benchmarks/tune_tiles.py`` from autotuning runs on each GPU arch) or, for a case the table
lacks, the first candidate that fits: no timing, so two processes (or two ranks) run the same
tiles and get the same bits. ``TRITONFLASH_AUTOTUNE=1`` autotunes instead (opt-in: the pick
depends on timing noise, and tiles sum in different orders). Autotune keys are coarse and
explicit (the variant, a length class, dtypes); sequence lengths never enter them. Under the
interpreter (CPU tier) one small config is pinned: it gives the same answers and keeps the
tier fast.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch
import triton

from .tiles import TILES

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def env_mode(name: str, modes: tuple, default: str) -> str:
    """The value of switch ``name`` (read per call): one of ``modes``, case and surrounding
    spaces ignored, ``default`` when unset or empty; anything else is a ValueError naming it."""
    raw = os.environ.get(name, "")
    mode = raw.strip().lower() or default
    if mode not in modes:
        choices = ", ".join(modes[:-1]) + " or " + modes[-1]
        raise ValueError(f"{name} must be {choices} (or unset), got {raw!r}")
    return mode
AUTOTUNE = os.environ.get("TRITONFLASH_AUTOTUNE", "0") == "1" and not INTERPRET

# The autotuner also appends the dtype of every tensor argument to the key. ``tune_bucket``
# is a coarse length class (see seq_bucket): a tile tuned at 1k is not always best at 16k.
FWD_KEY = ["VAR", "tune_bucket"]
BWD_KEY = FWD_KEY + ["DBIAS_COLS"]
DBIAS_KEY = FWD_KEY + ["SUM_KEYS"]


def gluon_module(name: str, on: bool):
    """The Gluon module ``kernels/<name>.py`` when ``on`` (the caller's switch, and never under
    the interpreter: the caller checks its INTERPRET), else None; None too where Gluon cannot be
    imported. Imported on first use, so that ``import tritonflash`` does not need a Triton with
    triton.experimental.gluon."""
    if not on:
        return None
    try:
        return importlib.import_module(f".{name}", __package__)
    except ImportError:
        return None


def seq_bucket(seqlen_q, seqlen_k):
    """Autotune length class: 0 up to 1k, 1 up to 4k, 2 beyond (never a compile key)."""
    n = max(seqlen_q, seqlen_k)
    return 0 if n <= 1024 else (1 if n <= 4096 else 2)


def _tile(cfg) -> tuple:
    return (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)


def _cfg(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# Interpreter: small tiles so that the odd CPU-tier shapes cross several blocks.
INTERPRET_CONFIG = _cfg(32, 32, 4, 1)

# Candidates, the default first. Listed for Hopper (sm90, 228 KB shared memory per SM).
FWD_CONFIGS = [
    _cfg(128, 64, 8, 3),
    _cfg(128, 128, 8, 2),
    _cfg(128, 64, 8, 4),
    _cfg(128, 128, 8, 3),
    _cfg(128, 64, 4, 3),
    _cfg(64, 64, 4, 3),
    _cfg(64, 32, 4, 2),
]
BWD_DKDV_CONFIGS = [
    # Fastest at head dim 128 on the H200 once full query blocks skip their bounds checks
    # (docs/perf-notes.md, change 8); 32 query rows a step, one warpgroup on 64 keys. Being
    # first, it is also the pinned tile for every head dim with TRITONFLASH_AUTOTUNE=0.
    _cfg(32, 64, 4, 3),
    _cfg(64, 128, 8, 3),
    _cfg(64, 128, 8, 2),
    _cfg(32, 128, 4, 3),
    _cfg(64, 64, 4, 3),
    _cfg(128, 128, 8, 2),
    _cfg(32, 64, 4, 2),
]
BWD_DQ_CONFIGS = [
    _cfg(128, 64, 8, 2),
    _cfg(128, 64, 8, 3),
    _cfg(128, 128, 8, 2),
    _cfg(64, 64, 4, 3),
    _cfg(64, 128, 8, 2),
    # Head dim 256: a 64-row tile is the largest that fits, and wgmma needs 64 rows (a
    # 32-row tile falls back to mma.sync; tests/test_compile_sm90.py checks).
    _cfg(64, 32, 4, 2),
    _cfg(32, 64, 4, 2),
]
# The bias-gradient pass streams Q, dO, K and V (one summed (batch, head) slice a step).
BWD_DBIAS_CONFIGS = [
    _cfg(128, 128, 8, 2),
    _cfg(128, 64, 8, 3),
    _cfg(64, 128, 8, 2),
    _cfg(64, 64, 4, 3),
    _cfg(128, 64, 4, 2),
    _cfg(64, 32, 4, 2),
]


def _smem_bytes(cfg, block_d, streamed_m, streamed_n, resident_m, resident_n, staged_mn=0, bias_bytes=0):
    """Rough shared memory, 2 bytes an element: tiles streamed through the software pipeline
    (times its stages), tiles loaded once and kept, and [M, N] score tiles staged as dot
    operands (seen in the dQ pass on H200: (128, 128, 8 warps, 2 stages) at head dim 128 needs
    262144 bytes, two [128, 128] tiles more than the operand tiles)."""
    m, n = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    streamed = (streamed_m * m + streamed_n * n) * max(cfg.num_stages, 1)
    resident = resident_m * m + resident_n * n
    # A bias tile with a row dimension is streamed too (the pipeliner stages it like K and V).
    return 2 * (block_d * (streamed + resident) + staged_mn * m * n) + bias_bytes * m * n * max(cfg.num_stages, 1)


# What each kernel keeps in shared memory (see _smem_bytes).
SMEM_TILES = {
    # The forward keeps Q and streams K and V.
    "fwd": dict(streamed_m=0, streamed_n=2, resident_m=1, resident_n=0),
    # dK/dV keeps K and V and streams Q and dO.
    "dkdv": dict(streamed_m=2, streamed_n=0, resident_m=0, resident_n=2),
    # dQ keeps Q and dO and streams K and V.
    "dq": dict(streamed_m=0, streamed_n=2, resident_m=2, resident_n=0, staged_mn=2),
    # dbias streams all four; its bias tile is loaded once per key block, outside the
    # pipelined loop over summed slices.
    "dbias": dict(streamed_m=2, streamed_n=2, resident_m=0, resident_n=0),
}
SMEM_BUDGET = 200_000


def smem_estimate(which, cfg, args) -> int:
    """Estimated shared memory of kernel ``which`` with tile ``cfg`` for launch ``args``."""
    var = args["VAR"]
    tiles = dict(SMEM_TILES[which])
    if which != "dbias" and var.BIAS_ROW:
        tiles["bias_bytes"] = args["score"].bias.element_size()
    if var.HAS_AMASK:
        # A boolean mask tile (one byte a score) may be staged like the bias tile.
        tiles["bias_bytes"] = tiles.get("bias_bytes", 0) + 1
    return _smem_bytes(cfg, var.BLOCK_D, **tiles)


def _prune(which, configs, args):
    # Reason: above ~220 KB a config fails with OutOfResources on sm90 (232448 bytes per block),
    # and tiles larger than 64x64 at head dim 256 spill registers.
    kept = [c for c in configs if smem_estimate(which, c, args) <= SMEM_BUDGET]
    if args["VAR"].BLOCK_D >= 256:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return kept or [_cfg(32, 32, 4, 1)]


def prune_fwd(configs, nargs, **kwargs):
    return _prune("fwd", configs, {**nargs, **kwargs})


def prune_bwd_dkdv(configs, nargs, **kwargs):
    return _prune("dkdv", configs, {**nargs, **kwargs})


def prune_bwd_dq(configs, nargs, **kwargs):
    return _prune("dq", configs, {**nargs, **kwargs})


def prune_bwd_dbias(configs, nargs, **kwargs):
    return _prune("dbias", configs, {**nargs, **kwargs})


# EVEN_M is not an autotune key: the pick cached for a (variant, length bucket) key was timed
# with whatever divisibility the first seqlen of that bucket had, and is reused (correctly,
# only perhaps not optimally) for the other seqlens of the bucket.
def even_m(args):
    """Every query block is full (seqlen_q a multiple of BLOCK_M). Packed varlen rows never
    count as full: their sequences start anywhere in a block."""
    return not args["VAR"].IS_VARLEN and args["seqlen_q"] % args["BLOCK_M"] == 0


def unclamped_bias(args):
    """The dK/dV pass reads its bias tile without clamping the key index: a bias with a row
    dimension, every key block full (seqlen_k a multiple of BLOCK_N, never packed varlen keys)
    and no causal masking, where that measured faster (``backward._attn_bwd_dkdv_inner``).
    False for every other launch, so that they compile one variant."""
    var = args["VAR"]
    return var.BIAS_ROW and not var.CAUSAL and not var.IS_VARLEN and args["seqlen_k"] % args["BLOCK_N"] == 0


@functools.cache
def device_properties(index: int | None):
    """``torch.cuda.get_device_properties(index)``, asked once per device: the launchers read
    the architecture, SM count, shared memory and L2 size on every call."""
    return torch.cuda.get_device_properties(index)


def device_arch(index: int) -> str:
    props = device_properties(index)
    return f"sm{props.major}{props.minor}"


def tile_key(args) -> tuple:
    """The ``TILES`` key of a launch: head-dim tile, causal, bias kind, ALiBi, length class,
    and the kernel's own switch (DBIAS_COLS for dK/dV, SUM_KEYS for dbias), else None."""
    var = args["VAR"]
    bias = "row" if var.BIAS_ROW else ("vec" if var.HAS_BIAS else "none")
    extra = args.get("DBIAS_COLS", args.get("SUM_KEYS"))
    return (var.BLOCK_D, var.CAUSAL, bias, var.HAS_ALIBI, args["tune_bucket"], extra)


class Launcher:
    """Launches one jit kernel, autotuned over ``candidates`` with TRITONFLASH_AUTOTUNE=1, else
    with the tile ``config`` picks (the tile table's entry for the GPU arch if ``prune`` keeps it,
    else the first candidate ``prune`` keeps; the interpreter's pinned config under
    TRITON_INTERPRET).
    ``heuristics`` maps constexpr names to functions of the launch arguments and the chosen
    tile (triton.heuristics): variants that depend on the config, not tuning keys."""

    def __init__(self, kernel, candidates, key, prune, heuristics=None):
        self.name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        if heuristics:
            kernel = triton.heuristics(heuristics)(kernel)
        self.kernel = kernel
        self.candidates = candidates
        self.prune = prune
        self.tuned = None
        if AUTOTUNE:
            self.tuned = triton.autotune(configs=candidates, key=key, prune_configs_by={"early_config_prune": prune})(kernel)
        # Tests set this to run one given candidate (every config must give the same answer).
        self.forced = None
        # Autotuned picks by tile_key, while autotuning.
        self.picks = {}
        # Tiles chosen without autotuning, by (arch, tile_key, bias element size).
        self._chosen = {}

    def config(self, kwargs):
        """The tile of a launch without autotuning: forced, the interpreter's, the table's
        entry for this GPU arch if it survives the prune for these arguments, else the first
        candidate that does. Cached per case: the prune cost ~12 us a launch on the host."""
        if self.forced is not None:
            return self.forced
        if INTERPRET:
            return INTERPRET_CONFIG
        q = kwargs["Q"]
        arch = device_arch(q.device.index or 0) if q.is_cuda else None
        key = (arch, tile_key(kwargs), kwargs["score"].bias.element_size() if kwargs["VAR"].BIAS_ROW else 0)
        cfg = self._chosen.get(key)
        if cfg is None:
            kept = self.prune(self.candidates, {}, **kwargs)
            want = TILES.get(arch, {}).get(self.name, {}).get(key[1])
            cfg = next((c for c in kept if want is not None and _tile(c) == tuple(want)), kept[0])
            self._chosen[key] = cfg
        return cfg

    def __call__(self, grid, **kwargs):
        if self.tuned is not None and self.forced is None:
            result = self.tuned[grid](**kwargs)
            # What benchmarks/tune_tiles.py writes into the table.
            self.picks[tile_key(kwargs)] = _tile(self.tuned.best_config)
            return result
        cfg = self.config(kwargs)
        meta = {**kwargs, **cfg.kwargs}
        return self.kernel[grid(meta)](**kwargs, **cfg.all_kwargs())
