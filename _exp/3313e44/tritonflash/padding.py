"""Convert between padded batches and the packed variable-length layout (pure torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["unpad_input", "pad_input"]


def unpad_input(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """hidden (batch, seqlen, ...), attention_mask (batch, seqlen) bool/int, nonzero = keep.

    Returns (hidden_unpad (total, ...), indices (total,) into the flattened batch*seqlen,
    cu_seqlens int32 (batch + 1,), max_seqlen int)."""
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"attention_mask must have shape (batch, seqlen) = {tuple(hidden.shape[:2])}, got {tuple(attention_mask.shape)}"
        )
    keep = attention_mask.bool()
    seqlens = keep.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    return hidden.flatten(0, 1)[indices], indices, cu_seqlens, max_seqlen


def pad_input(hidden: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of ``unpad_input``: scatter (total, ...) rows back to (batch, seqlen, ...), zeros elsewhere."""
    out = hidden.new_zeros((batch * seqlen, *hidden.shape[1:]))
    out[indices] = hidden
    return out.view(batch, seqlen, *hidden.shape[1:])
