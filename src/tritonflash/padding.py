"""Convert between padded batches and the packed variable-length layout (pure torch)."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .checks import check_tensor, host_sync_allowed, type_name

__all__ = ["unpad_input", "pad_input"]


def unpad_input(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """hidden (batch, seqlen, ...), attention_mask (batch, seqlen) bool or integer, nonzero = keep.

    Returns (hidden_unpad (total, ...), indices (total,) into the flattened batch*seqlen,
    cu_seqlens int32 (batch + 1,), max_seqlen int)."""
    check_tensor("hidden", hidden)
    check_tensor("attention_mask", attention_mask)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape (batch, seqlen, ...), got {tuple(hidden.shape)}")
    if attention_mask.dtype != torch.bool and (attention_mask.is_floating_point() or attention_mask.is_complex()):
        # A float mask may be additive (0 / -inf), where nonzero would mean "masked".
        raise TypeError(
            f"attention_mask must be bool or an integer dtype (nonzero = keep), got {attention_mask.dtype}; "
            "for an additive mask use attention_mask == 0"
        )
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"attention_mask must have shape (batch, seqlen) = {tuple(hidden.shape[:2])}, got {tuple(attention_mask.shape)}"
        )
    if attention_mask.device != hidden.device:
        raise ValueError(f"attention_mask must be on hidden's device {hidden.device}, got {attention_mask.device}")
    keep = attention_mask.bool()
    seqlens = keep.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    return hidden.flatten(0, 1)[indices], indices, cu_seqlens, max_seqlen


def pad_input(hidden: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of ``unpad_input``: scatter (total, ...) rows back to (batch, seqlen, ...), zeros elsewhere.

    ``indices`` (total,) integer positions in the flattened batch*seqlen. Checking their range
    reads them on the host; that check is skipped during CUDA graph capture and torch.compile
    tracing."""
    check_tensor("hidden", hidden)
    check_tensor("indices", indices)
    for name, value in (("batch", batch), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type_name(value)}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
        raise TypeError(f"indices must have an integer dtype, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"indices must have shape (total,), got {tuple(indices.shape)}")
    if hidden.dim() < 1 or hidden.shape[0] != indices.shape[0]:
        rows = hidden.shape[0] if hidden.dim() else "no"
        raise ValueError(f"hidden must have one row per index ({indices.shape[0]}), got {rows} rows")
    if indices.device != hidden.device:
        raise ValueError(f"indices must be on hidden's device {hidden.device}, got {indices.device}")
    size = batch * seqlen
    if indices.numel() and host_sync_allowed(indices):
        # One device-to-host copy (an out-of-range index would be a device-side assert).
        lo, hi = torch.stack(torch.aminmax(indices)).tolist()
        if lo < 0 or hi >= size:
            raise ValueError(f"indices must lie in [0, batch * seqlen) = [0, {size}), got values in [{lo}, {hi}]")
    out = hidden.new_zeros((size, *hidden.shape[1:]))
    out[indices] = hidden
    return out.view(batch, seqlen, *hidden.shape[1:])
