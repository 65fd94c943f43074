"""scripts/peer-wheels cuts the FA4 wheels into device-call folders and scripts/install-peer-wheels
joins them on the GPU machine: the round trip, on small stand-in files."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(ROOT / "scripts" / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    loader.exec_module(module)
    return module


fetch = load_script("peer-wheels")
install = load_script("install-peer-wheels")


def test_pieces_cross_call_boundaries_and_join_back(tmp_path):
    """Three files of 10, 25 and 30 bytes with 40 bytes a call: two calls of 33 and 32 bytes, the
    file that crosses the boundary cut there; the installer waits for call 2, then joins byte for
    byte."""
    src = tmp_path / "wheels"
    src.mkdir()
    blobs = {}
    for name, size in (("a.whl", 10), ("b.whl", 25), ("c.whl", 30)):
        blobs[name] = bytes((i * 7 + size) % 256 for i in range(size))
        (src / name).write_bytes(blobs[name])
    out = tmp_path / "peer-wheels"
    manifest = fetch.pack([src / n for n in blobs], out, budget=40)
    assert manifest["calls"] == 2
    sizes = [sum(f.stat().st_size for f in (out / f"call{k}").iterdir() if f.suffix != ".json") for k in (1, 2)]
    assert sizes == [33, 32]
    calls = {name: [p["call"] for p in w["pieces"]] for name, w in manifest["wheels"].items()}
    assert calls == {"a.whl": [1], "b.whl": [1, 2], "c.whl": [2]}

    carried = tmp_path / "device"  # what one device call has: only its own folder
    stash = tmp_path / "stash"
    (carried / "call1").mkdir(parents=True)
    for f in (out / "call1").iterdir():
        (carried / "call1" / f.name).write_bytes(f.read_bytes())
    assert install.join(install.gather(carried, stash), stash) == [2]
    (carried / "call1").rename(carried / "call2")
    for f in list((carried / "call2").iterdir()):
        f.unlink()
    for f in (out / "call2").iterdir():
        (carried / "call2" / f.name).write_bytes(f.read_bytes())
    joined = install.join(install.gather(carried, stash), stash)
    assert {w.name: w.read_bytes() for w in joined} == blobs


def test_closure_check_names_what_is_missing(tmp_path):
    """A Requires-Dist that is neither downloaded, on the GPU machine, nor skipped on purpose is
    reported; extras, markers for other Pythons and device packages are not."""
    import zipfile

    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    meta = ("Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\nRequires-Dist: torch\nRequires-Dist: einops\n"
            "Requires-Dist: nvidia-cutlass-dsl-libs-cu12==4.8.1\nRequires-Dist: ruff; extra == \"dev\"\n"
            "Requires-Dist: backports.strenum; python_version < \"3.11\"\nRequires-Dist: not-there>=1\n\n")
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg-1.0.dist-info/METADATA", meta)
    problems = fetch.check_closure([wheel])
    assert len(problems) == 1 and "not-there" in problems[0], problems
