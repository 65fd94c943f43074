"""Write the tile table (src/tritonflash/kernels/tiles.py) for this GPU's arch.

Autotunes every kernel (TRITONFLASH_AUTOTUNE=1) on the benchmark protocol's shapes
(benchmarks/bench_attention.py: every suite, one seqlen per length class) and records the tile
each launch picked under its ``configs.tile_key``. The library's default path then reads the
table instead of timing, so every process picks the same tiles (docs/semantics.md,
determinism). Entries of other archs, and of cases this run does not tune, are kept.

    PYTHONPATH=src python benchmarks/tune_tiles.py                # writes the table
    PYTHONPATH=src python benchmarks/tune_tiles.py --out /tmp/t.py --seqlens 1k,4k
"""

from __future__ import annotations

import argparse
import os
import pprint
import sys
import time
from pathlib import Path

os.environ["TRITONFLASH_AUTOTUNE"] = "1"

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_attention as bench  # noqa: E402
from tritonflash.kernels import backward, configs, forward, tiles  # noqa: E402

LAUNCHERS = [forward._launch_fwd, backward._launch_dkdv, backward._launch_dq, backward._launch_dbias]
HEADER = f'"""{tiles.__doc__}"""\n\n'  # the table module keeps its own docstring


def write_table(path: Path, arch: str):
    # Merged into this arch's entries: a run over some suites keeps what earlier runs tuned.
    merged = {launcher.name: dict(tiles.TILES.get(arch, {}).get(launcher.name, {})) for launcher in LAUNCHERS}
    for launcher in LAUNCHERS:
        merged[launcher.name].update(launcher.picks)
    picks = {name: dict(sorted(entries.items(), key=str)) for name, entries in merged.items() if entries}
    table = {**tiles.TILES, arch: picks}
    path.write_text(HEADER + "TILES: dict = " + pprint.pformat(table, width=110, sort_dicts=False) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", default="1k,4k,16k", help="one per length class (configs.seq_bucket)")
    p.add_argument("--suites", default="nobias,alibi,bias_grad,gqa")
    p.add_argument("--out", default=str(ROOT / "src" / "tritonflash" / "kernels" / "tiles.py"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    arch = configs.device_arch(torch.cuda.current_device())
    seqlens = [bench.parse_seqlen(s) for s in args.seqlens.split(",")]
    cases = bench.make_cases(args.suites.split(","), [], seqlens, smoke=False)
    t0 = time.perf_counter()
    for case in cases:
        x = bench.make_inputs(case, "cuda")
        runner = bench.build_tritonflash(case, x)
        bench.fwdbwd(runner, x)()
        torch.cuda.synchronize()
        print(f"[{time.perf_counter() - t0:6.1f}s] {case.label}", flush=True)
        del x, runner
        bench.free_memory()
        # Written after every case, so that an interrupted run keeps what it tuned.
        write_table(Path(args.out), arch)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
