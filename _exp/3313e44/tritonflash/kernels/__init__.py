"""Triton kernels and their launchers. Nothing here validates user input."""

from .backward import attn_bwd
from .common import Varlen
from .forward import attn_fwd

__all__ = ["attn_fwd", "attn_bwd", "Varlen"]
