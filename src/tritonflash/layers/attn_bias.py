"""Attention-bias builders with MPT's semantics: ALiBi, prefix-LM and sequence-id (packed
documents) masks, and the slicing rule the layers apply to a bias.

A model builds one bias of shape ``attn_bias_shape(...)`` for its longest sequence once, then
passes it to every layer; each layer takes the last ``seqlen_q`` rows and the last ``seqlen_k``
columns of it (``slice_attn_bias``), so the same bias serves prefill and KV-cache decoding.

Masked entries hold ``MASK_VALUE = -inf`` everywhere (never ``finfo.min``): a query row whose
keys are all masked then has *no visible key*, and every backend returns 0 for it, as the
kernels do. With ``finfo.min`` such a row would instead average the masked values uniformly,
and ``finfo.min`` added twice overflows to ``-inf`` anyway.
"""

from __future__ import annotations

import torch

from ..bias import bias_broadcast_shape, build_alibi_bias, gen_slopes

__all__ = [
    "MASK_VALUE",
    "ATTN_IMPLS",
    "gen_slopes",
    "build_alibi_bias",
    "attn_bias_shape",
    "build_attn_bias",
    "apply_prefix_lm_mask",
    "apply_sequence_id_mask",
    "slice_attn_bias",
]

MASK_VALUE = float("-inf")
ATTN_IMPLS = ("torch", "flash", "triton")


def check_attn_impl(attn_impl: str) -> None:
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")


def _check_float_bias(attn_bias: torch.Tensor) -> None:
    # The builders add to and -inf-fill the bias: a bool mask would turn -inf into True and
    # ALiBi into 1.0 + slope terms.
    if not attn_bias.is_floating_point():
        raise TypeError(
            f"attn_bias must be a floating-point bias for the MPT builders, got {attn_bias.dtype}; "
            "start from torch.zeros(attn_bias_shape(...))"
        )


def attn_bias_shape(
    attn_impl: str,
    n_heads: int,
    seq_len: int,
    alibi: bool,
    prefix_lm: bool,
    causal: bool,
    use_sequence_id: bool,
) -> tuple[int, int, int, int] | None:
    """Shape of the bias a model should allocate (zeros) for ``build_attn_bias``, or ``None``
    when no bias is needed.

    ALiBi alone under a causal mask needs only a per-key vector ``(1, n_heads, 1, seq_len)``;
    ALiBi with a non-causal, prefix-LM or sequence-id mask needs ``(1, n_heads, seq_len, seq_len)``;
    prefix-LM or sequence-id without ALiBi needs ``(1, 1, seq_len, seq_len)``.

    Unlike MPT, where ``'flash'`` (the flash-attn package) takes no bias and this returns
    ``None``, every backend here takes an additive bias ('flash' is PyTorch SDPA), so the
    shape does not depend on ``attn_impl`` (which is still validated).
    """
    check_attn_impl(attn_impl)
    if alibi:
        if prefix_lm or not causal or use_sequence_id:
            return (1, n_heads, seq_len, seq_len)
        return (1, n_heads, 1, seq_len)
    if prefix_lm or use_sequence_id:
        return (1, 1, seq_len, seq_len)
    return None


def build_attn_bias(
    attn_impl: str,
    attn_bias: torch.Tensor | None,
    n_heads: int,
    seq_len: int,
    causal: bool = False,
    alibi: bool = False,
    alibi_bias_max: int = 8,
) -> torch.Tensor | None:
    """Add MPT's materialised ALiBi to ``attn_bias`` (allocated with ``attn_bias_shape``).

    ``causal=True`` adds the per-key vector form ``-slope * (seq_len - 1 - j)`` (equal to the
    distance form up to a per-row constant under a causal mask); ``causal=False`` adds the full
    ``-slope * |i - j|``. Returns ``attn_bias`` unchanged when ``alibi`` is False.

    On the 'triton' backend prefer passing ``alibi_slopes=gen_slopes(n_heads)`` to the layer's
    forward: the same result computed in-kernel in fp32, with no O(seq_len^2) tensor.
    """
    check_attn_impl(attn_impl)
    if not alibi:
        return attn_bias
    if attn_bias is None:
        raise ValueError(
            "build_attn_bias(alibi=True) needs an attn_bias tensor to add to; allocate one with "
            "torch.zeros(attn_bias_shape(...))"
        )
    _check_float_bias(attn_bias)
    alibi_bias = build_alibi_bias(
        n_heads, seq_len, full=not causal, alibi_bias_max=alibi_bias_max, device=attn_bias.device, dtype=attn_bias.dtype
    )
    return attn_bias.add(alibi_bias)


def _square_bias(attn_bias: torch.Tensor | None, seq_len: int, like: torch.Tensor) -> torch.Tensor:
    """``attn_bias[..., :seq_len, :seq_len]`` (the model's sequences start at position 0), or a
    zero ``(1, 1, seq_len, seq_len)`` fp32 bias when there is none."""
    if attn_bias is None:
        return torch.zeros(1, 1, seq_len, seq_len, device=like.device)
    _check_float_bias(attn_bias)
    if attn_bias.dim() != 4:
        raise ValueError(f"attn_bias must have rank 4 (batch, heads, seq_len, seq_len), got shape {tuple(attn_bias.shape)}")
    if attn_bias.shape[-2] < seq_len or attn_bias.shape[-1] < seq_len:
        raise ValueError(
            f"attn_bias of shape {tuple(attn_bias.shape)} is shorter than the sequence ({seq_len}); "
            f"build it for the model's max_seq_len"
        )
    return attn_bias[..., :seq_len, :seq_len]


def apply_prefix_lm_mask(attn_bias: torch.Tensor | None, prefix_mask: torch.Tensor) -> torch.Tensor:
    """Mask ``attn_bias`` for a prefix LM: query i sees key j iff ``j <= i`` or j is in the
    prefix (``prefix_mask[b, j]`` True). Bidirectional over the prefix, causal after it, so the
    layer must then be called with ``is_causal=False``.

    prefix_mask: (batch, seq_len) bool. attn_bias: (1|batch, 1|heads, >=seq_len, >=seq_len) or
    None. Returns (batch, 1|heads, seq_len, seq_len), ``-inf`` where masked.
    """
    if prefix_mask.dim() != 2:
        raise ValueError(f"prefix_mask must have shape (batch, seq_len), got {tuple(prefix_mask.shape)}")
    seq_len = prefix_mask.shape[-1]
    bias = _square_bias(attn_bias, seq_len, prefix_mask)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=prefix_mask.device).tril()
    can_attend = causal.view(1, 1, seq_len, seq_len) | prefix_mask.bool().view(-1, 1, 1, seq_len)
    return bias.masked_fill(~can_attend, MASK_VALUE)


def apply_sequence_id_mask(attn_bias: torch.Tensor | None, sequence_id: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """Mask ``attn_bias`` so that packed documents do not attend to each other: query i sees
    key j only if ``sequence_id[b, i] == sequence_id[b, j]``. Combine with ``is_causal=True``
    (or with ``apply_prefix_lm_mask``) for left-to-right models.

    sequence_id: (batch, seq_len) integer, ``seq_len <= max_seq_len``. attn_bias as for
    ``apply_prefix_lm_mask``. Returns (batch, 1|heads, seq_len, seq_len), ``-inf`` where masked.
    """
    if sequence_id.dim() != 2:
        raise ValueError(f"sequence_id must have shape (batch, seq_len), got {tuple(sequence_id.shape)}")
    seq_len = sequence_id.shape[-1]
    if seq_len > max_seq_len:
        raise ValueError(f"sequence_id has seq_len {seq_len}, longer than max_seq_len {max_seq_len}")
    bias = _square_bias(attn_bias, seq_len, sequence_id)
    same_doc = sequence_id.view(-1, seq_len, 1) == sequence_id.view(-1, 1, seq_len)
    return bias.masked_fill(~same_doc.unsqueeze(1), MASK_VALUE)


def slice_attn_bias(
    attn_bias: torch.Tensor | None, batch: int, n_heads: int, seqlen_q: int, seqlen_k: int
) -> torch.Tensor | None:
    """The part of a model-wide bias that applies to this call: its last ``seqlen_q`` rows and
    last ``seqlen_k`` columns (queries and keys are the newest positions), left-padded to rank 4.
    Raises ``ValueError`` when the result does not broadcast to (batch, n_heads, seqlen_q, seqlen_k)."""
    if attn_bias is None:
        return None
    if attn_bias.dim() > 4:
        raise ValueError(f"attn_bias must have rank <= 4, got shape {tuple(attn_bias.shape)}")
    bias = attn_bias[(None,) * (4 - attn_bias.dim())]
    bias = bias[:, :, max(0, bias.shape[2] - seqlen_q):, max(0, bias.shape[3] - seqlen_k):]
    if bias_broadcast_shape(bias.shape, batch, n_heads, seqlen_q, seqlen_k) is None:
        raise ValueError(
            f"attn_bias of shape {tuple(attn_bias.shape)} (sliced to its last {seqlen_q} rows and {seqlen_k} columns: "
            f"{tuple(bias.shape)}) does not broadcast to (batch, n_heads, seqlen_q, seqlen_k) = "
            f"({batch}, {n_heads}, {seqlen_q}, {seqlen_k})"
        )
    return bias
