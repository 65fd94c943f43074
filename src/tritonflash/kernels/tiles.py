"""Tile per GPU arch, kernel and case: what the default (non-autotuned) launches use.

Written by ``benchmarks/tune_tiles.py`` from autotuning runs of the benchmark's shapes on one
GPU of each arch; do not edit by hand. Keys: ``configs.tile_key`` = (BLOCK_D, causal, bias
kind, ALiBi, length class, DBIAS_COLS/SUM_KEYS or None); values (BLOCK_M, BLOCK_N, num_warps,
num_stages). A case missing here takes the first candidate of ``configs`` that fits.
"""

TILES: dict = {}
