"""Tile per GPU arch, kernel and case: what the default (non-autotuned) launches use.

Written by ``benchmarks/tune_tiles.py`` from autotuning runs of the benchmark's shapes on one
GPU of each arch; do not edit by hand. Keys: ``configs.tile_key`` = (BLOCK_D, causal, bias
kind, ALiBi, length class, DBIAS_COLS/SUM_KEYS or None); values (BLOCK_M, BLOCK_N, num_warps,
num_stages). A case missing here takes the first candidate of ``configs`` that fits.
"""

TILES: dict = {'sm90': {'_attn_fwd': {(128, False, 'none', False, 0, None): (64, 64, 4, 3),
                        (128, False, 'none', False, 1, None): (128, 64, 8, 3),
                        (128, True, 'none', False, 0, None): (64, 64, 4, 3),
                        (128, True, 'none', False, 1, None): (64, 64, 4, 3),
                        (64, False, 'none', False, 0, None): (64, 64, 4, 3),
                        (64, False, 'none', False, 1, None): (128, 64, 8, 3),
                        (64, True, 'none', False, 0, None): (64, 64, 4, 3),
                        (64, True, 'none', False, 1, None): (128, 64, 4, 3)},
          '_attn_bwd_dkdv': {(128, False, 'none', False, 0, False): (64, 128, 8, 3),
                             (128, False, 'none', False, 1, False): (64, 128, 8, 3),
                             (128, True, 'none', False, 0, False): (32, 64, 4, 3),
                             (128, True, 'none', False, 1, False): (64, 128, 8, 3),
                             (64, False, 'none', False, 0, False): (64, 64, 4, 3),
                             (64, False, 'none', False, 1, False): (32, 128, 4, 3),
                             (64, True, 'none', False, 0, False): (32, 64, 4, 3),
                             (64, True, 'none', False, 1, False): (32, 64, 4, 3)},
          '_attn_bwd_dq': {(128, False, 'none', False, 0, None): (128, 64, 8, 3),
                           (128, False, 'none', False, 1, None): (128, 64, 8, 3),
                           (128, True, 'none', False, 0, None): (64, 32, 4, 2),
                           (128, True, 'none', False, 1, None): (128, 64, 8, 3),
                           (64, False, 'none', False, 0, None): (128, 64, 8, 3),
                           (64, False, 'none', False, 1, None): (128, 64, 8, 3),
                           (64, True, 'none', False, 0, None): (64, 64, 4, 3),
                           (64, True, 'none', False, 1, None): (64, 64, 4, 3)}}}
