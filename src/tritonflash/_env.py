"""Checks of the environment that tritonflash cannot repair itself; each error names the fix.

Pure Python: importing this module imports neither Triton nor numpy.
"""

from __future__ import annotations

import os
import re

__all__ = ["interpreter_requested", "check_interpreter_numpy"]

# Triton 3.6's interpreter turns one-element arrays into Python ints with int(), which numpy 2.4
# refuses ("only 0-dimensional arrays can be converted to Python scalars"): every kernel launch
# then fails deep inside the interpreter. Re-check when the triton bound in pyproject.toml moves.
_INTERPRETER_NUMPY_BELOW = (2, 4)
_FIX = "pip install 'numpy<2.4'"


def interpreter_requested() -> bool:
    """Whether the Triton kernels are to run in Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _major_minor(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_interpreter_numpy() -> None:
    """Raise ImportError, naming the fix, if the interpreter is requested and its numpy is
    missing or too new; do nothing otherwise (no interpreter, or a numpy it can use).

    Cheap enough to call at import and again wherever interpreter mode is decided per call."""
    if not interpreter_requested():
        return
    try:
        import numpy
    except ImportError:
        raise ImportError(
            f"Triton's interpreter (TRITON_INTERPRET=1) needs numpy, which is not installed; {_FIX}"
        ) from None
    if _major_minor(numpy.__version__) >= _INTERPRETER_NUMPY_BELOW:
        raise ImportError(f"Triton 3.6's interpreter needs numpy<2.4 (found {numpy.__version__}); {_FIX}")
