"""The attention backends of the MPT layers: one signature, three implementations.

``fn(query, key, value, n_heads, kv_n_heads, past_key_value=None, softmax_scale=None,
attn_bias=None, key_padding_mask=None, is_causal=False, dropout_p=0.0, training=False,
needs_weights=False, alibi_slopes=None, window_size=(-1, -1), softcap=0.0)
-> (context, attn_weights, past_key_value)``

- query ``(batch, seqlen_q, n_heads * head_dim)``; key, value ``(batch, seqlen_new, kv_n_heads * head_dim)``.
- past_key_value: ``None``/``()`` or ``(k, v)``, each ``(batch, seqlen_past, kv_n_heads, head_dim)``
  (the flash-attn layout, the same on every backend, so a cache can move between them). The new
  keys and values are appended after it; the returned ``past_key_value`` is the whole
  ``(k, v)``, so ``seqlen_k = seqlen_past + seqlen_new``.
- attn_bias: sliced to its last ``seqlen_q`` rows and ``seqlen_k`` columns (``slice_attn_bias``).
  Floating point: added to the scores (fp64 runs as fp32 on 'triton'). Bool: PyTorch SDPA's
  convention, True = attend, False = masked (converted to 0 / -inf). Any other dtype: TypeError.
- key_padding_mask ``(batch, seqlen_k)`` bool, True = keep. is_causal: bottom-right aligned.
- alibi_slopes ``(n_heads,)`` or ``(batch, n_heads)`` fp32, finite, not requiring grad (the kernels'
  rules, checked alike for every backend): adds ``-slope * |i + seqlen_k - seqlen_q - j|``.
- window_size ``(left, right)`` and softcap: ``flash_attn_func``'s rules (bottom-right window,
  -1 unbounded; ``softcap * tanh(score / softcap)`` before the bias), checked alike for every
  backend; 'flash' (SDPA) cannot cap logits and raises NotImplementedError for a softcap.
- context ``(batch, seqlen_q, n_heads * head_dim)`` in query's dtype; attn_weights
  ``(batch, n_heads, seqlen_q, seqlen_k)`` when ``needs_weights`` (torch backend only), else None.
- A query row with no visible key gives 0 on every backend (and zero gradients), never NaN.

The semantics (what a score gets, which scores are masked, rows without a visible key) come from
``tritonflash.reference``, the oracle the kernels are tested against: 'torch' computes with it,
'flash' builds its additive mask with it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..api import flash_attn_func
from ..checks import check_alibi_slopes, check_bool, check_softcap, check_softmax_scale, check_tensor, check_window, type_name
from ..kvcache import flash_attn_with_kvcache
from ..reference import attention_scores, attention_values, attention_weights, score_terms
from .attn_bias import slice_attn_bias

__all__ = [
    "scaled_multihead_dot_product_attention",
    "flash_attn_fn",
    "triton_flash_attn_fn",
    "ATTN_FNS",
    "triton_compute_dtype",
]


@dataclass
class _Call:
    """One attention call, validated, in the (batch, seqlen, heads, head_dim) layout."""

    q: torch.Tensor  # (b, sq, h, d)
    k: torch.Tensor  # (b, sk, h_k, d), cache included
    v: torch.Tensor  # (b, sk, h_k, d)
    past_key_value: tuple[torch.Tensor, torch.Tensor]
    bias: torch.Tensor | None  # rank 4, broadcastable to (b, h, sq, sk)
    key_padding_mask: torch.Tensor | None  # (b, sk) bool
    causal: bool
    softmax_scale: float
    alibi_slopes: torch.Tensor | None
    window_size: tuple = (-1, -1)
    softcap: float = 0.0

    @property
    def shape(self):
        """(batch, n_heads, seqlen_q, seqlen_k)"""
        return self.q.shape[0], self.q.shape[2], self.q.shape[1], self.k.shape[1]


_FLOAT_BIAS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_attn_bias(attn_bias, query) -> None:
    check_tensor("attn_bias", attn_bias)
    if attn_bias.dtype != torch.bool and attn_bias.dtype not in _FLOAT_BIAS_DTYPES:
        raise TypeError(
            f"attn_bias must be a floating-point additive bias (float16, bfloat16, float32 or float64) or a bool mask "
            f"(True = attend, PyTorch SDPA's convention), got {attn_bias.dtype}"
        )
    if attn_bias.device != query.device:
        raise ValueError(f"attn_bias must be on query's device {query.device}, got {attn_bias.device}")


def _bool_bias_to_additive(bias: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """SDPA's bool mask (True = attend) as the additive bias 0 / -inf, in query's dtype when it is
    16-bit (both values are exact in any float dtype), else fp32."""
    dtype = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.float32
    return torch.zeros((), dtype=dtype, device=bias.device).masked_fill(~bias, float("-inf"))


def _prepare(query, key, value, n_heads, kv_n_heads, past_key_value, softmax_scale, attn_bias,
             key_padding_mask, is_causal, dropout_p, alibi_slopes, slopes_checked_later=False, window_size=(-1, -1),
             softcap=0.0) -> _Call:
    """Validation shared by every backend, so that they accept and refuse the same inputs.
    ``slopes_checked_later``: the caller passes alibi_slopes to ``flash_attn_func``, which reads
    them on the host for the same finiteness check (one device-to-host copy, not two)."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, x)
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape (batch, seqlen, heads * head_dim), got {tuple(x.shape)}")
    for name, x in (("n_heads", n_heads), ("kv_n_heads", kv_n_heads)):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type_name(x)}")
    check_bool("is_causal", is_causal)
    check_softmax_scale(softmax_scale)
    window_size = check_window(window_size, is_causal)
    softcap = check_softcap(softcap)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type_name(dropout_p)}")
    if n_heads < 1 or kv_n_heads < 1 or n_heads % kv_n_heads != 0:
        raise ValueError(f"n_heads ({n_heads}) must be a positive multiple of kv_n_heads ({kv_n_heads})")
    if query.shape[-1] % n_heads != 0:
        raise ValueError(f"query's last dim {query.shape[-1]} is not divisible by n_heads {n_heads}")
    head_dim = query.shape[-1] // n_heads
    batch, seqlen_q = query.shape[:2]
    for name, x in (("key", key), ("value", value)):
        if x.shape[0] != batch or x.shape[-1] != kv_n_heads * head_dim:
            raise ValueError(
                f"{name} must have shape (batch={batch}, seqlen, kv_n_heads * head_dim={kv_n_heads * head_dim}), "
                f"got {tuple(x.shape)}"
            )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    q = query.unflatten(-1, (n_heads, head_dim))
    k = key.unflatten(-1, (kv_n_heads, head_dim))
    v = value.unflatten(-1, (kv_n_heads, head_dim))
    if past_key_value is not None and not (isinstance(past_key_value, (tuple, list)) and len(past_key_value) in (0, 2)):
        raise TypeError(
            f"past_key_value must be None, () or a (key, value) pair of tensors, got {type_name(past_key_value)}"
            + (f" of length {len(past_key_value)}" if isinstance(past_key_value, (tuple, list)) else "")
        )
    if past_key_value is not None and len(past_key_value) > 0:
        k_past, v_past = past_key_value
        want = (batch, kv_n_heads, head_dim)
        for name, x in (("past key", k_past), ("past value", v_past)):
            check_tensor(f"past_key_value's {name}", x)
            if x.dim() != 4 or (x.shape[0], x.shape[2], x.shape[3]) != want:
                raise ValueError(
                    f"past_key_value's {name} must have shape (batch, seqlen_past, kv_n_heads, head_dim) = "
                    f"({batch}, seqlen_past, {kv_n_heads}, {head_dim}) (the flash-attn layout on every backend), "
                    f"got {tuple(x.shape)}"
                )
        k = torch.cat([k_past, k], dim=1)
        v = torch.cat([v_past, v], dim=1)
    seqlen_k = k.shape[1]
    if attn_bias is not None:
        _check_attn_bias(attn_bias, query)
    bias = slice_attn_bias(attn_bias, batch, n_heads, seqlen_q, seqlen_k)
    if bias is not None and bias.dtype == torch.bool:
        bias = _bool_bias_to_additive(bias, query)
    if key_padding_mask is not None:
        check_tensor("key_padding_mask (attention_mask)", key_padding_mask)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask (attention_mask) must be bool (True = keep), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, seqlen_k):
            raise ValueError(
                f"key_padding_mask (attention_mask) must have shape (batch, seqlen_past + seqlen_new) = "
                f"({batch}, {seqlen_k}), got {tuple(key_padding_mask.shape)}"
            )
    if alibi_slopes is not None:
        # The kernels' rules (float32, shape, no grad, finite) on every backend.
        check_alibi_slopes(alibi_slopes, batch, n_heads, query.device, check_finite=not slopes_checked_later)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    return _Call(q, k, v, (k, v), bias, key_padding_mask, bool(is_causal), float(scale), alibi_slopes, window_size, softcap)


def _additive_mask(c: _Call) -> torch.Tensor:
    """Bias + ALiBi + padding + causal as one fp32 additive mask broadcastable to
    (batch, n_heads, seqlen_q, seqlen_k), ``-inf`` where masked (``reference.score_terms`` on zeros)."""
    _, _, seqlen_q, seqlen_k = c.shape
    zeros = torch.zeros(1, 1, 1, 1, device=c.q.device)
    return score_terms(zeros, seqlen_q, seqlen_k, c.bias, c.causal, alibi_slopes=c.alibi_slopes,
                       key_padding_mask=c.key_padding_mask, window_size=c.window_size)


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    # (b, h, sq, d) -> (b, sq, h * d)
    return out.transpose(1, 2).flatten(2)


def _expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    # (b, h_k, s, d) -> (b, h, s, d); query head i uses kv head i // (h / h_k)
    return x if x.shape[1] == n_heads else x.repeat_interleave(n_heads // x.shape[1], dim=1)


def scaled_multihead_dot_product_attention(
    query, key, value, n_heads, kv_n_heads, past_key_value=None, softmax_scale=None, attn_bias=None,
    key_padding_mask=None, is_causal=False, dropout_p=0.0, training=False, needs_weights=False, alibi_slopes=None,
    window_size=(-1, -1), softcap=0.0,
):
    """'torch' backend: the reference's scores and weights (``tritonflash.reference``), computed
    in fp32 (or wider) whatever the input dtype; supports ``needs_weights`` (weights after
    dropout) and dropout. See the module doc."""
    c = _prepare(query, key, value, n_heads, kv_n_heads, past_key_value, softmax_scale, attn_bias,
                 key_padding_mask, is_causal, dropout_p, alibi_slopes, window_size=window_size, softcap=softcap)
    math_dtype = torch.promote_types(query.dtype, torch.float32)
    q, k, v = (x.to(math_dtype) for x in (c.q, c.k, c.v))  # (b, s, heads, d)
    scores = attention_scores(q, k, c.bias, c.causal, c.softmax_scale, alibi_slopes=c.alibi_slopes,
                              key_padding_mask=c.key_padding_mask, window_size=c.window_size,
                              softcap=c.softcap)  # (b, h, sq, sk)
    weights = attention_weights(scores)
    if dropout_p > 0.0 and training:
        weights = F.dropout(weights, p=dropout_p, training=True)
    out = attention_values(weights, v, scores).flatten(2).to(query.dtype)
    return out, (weights.to(query.dtype) if needs_weights else None), c.past_key_value


def flash_attn_fn(
    query, key, value, n_heads, kv_n_heads, past_key_value=None, softmax_scale=None, attn_bias=None,
    key_padding_mask=None, is_causal=False, dropout_p=0.0, training=False, needs_weights=False, alibi_slopes=None,
    window_size=(-1, -1), softcap=0.0,
):
    """'flash' backend: ``torch.nn.functional.scaled_dot_product_attention``, PyTorch picks the
    kernel (flash / cuDNN / memory-efficient / math). See the module doc.

    With only a causal mask and ``seqlen_q == seqlen_k`` it uses SDPA's ``is_causal`` and GQA
    natively (``enable_gqa``), so the flash kernel can run. Otherwise bias, ALiBi, padding and the
    bottom-right causal mask (SDPA's ``is_causal`` is top-left aligned) are summed into one
    additive mask in q's dtype (SDPA's rule), and k/v are expanded to n_heads because SDPA's fused
    kernels do not take ``enable_gqa`` together with a mask (it would fall back to the math kernel)."""
    c = _prepare(query, key, value, n_heads, kv_n_heads, past_key_value, softmax_scale, attn_bias,
                 key_padding_mask, is_causal, dropout_p, alibi_slopes, window_size=window_size, softcap=softcap)
    if needs_weights:
        raise NotImplementedError("attn_impl='flash' (PyTorch SDPA) cannot return attention weights (needs_weights=True); "
                                  "use attn_impl='torch'")
    if c.softcap > 0.0:
        raise NotImplementedError(f"attn_impl='flash' (PyTorch SDPA) cannot cap logits (attn_logit_softcapping={c.softcap}); "
                                  "use attn_impl='triton' or 'torch'")
    _, _, seqlen_q, seqlen_k = c.shape
    q, k, v = (x.transpose(1, 2) for x in (c.q, c.k, c.v))  # (b, heads, s, d)
    dropout_p = dropout_p if training else 0.0
    no_additive_terms = c.bias is None and c.alibi_slopes is None and c.key_padding_mask is None and c.window_size == (-1, -1)
    if no_additive_terms and (not c.causal or seqlen_q == seqlen_k or seqlen_q == 1):
        # SDPA's own is_causal (top-left) equals ours here; no mask lets PyTorch pick flash.
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=c.causal and seqlen_q > 1, scale=c.softmax_scale,
            enable_gqa=n_heads != kv_n_heads,
        )
        return _merge_heads(out), None, c.past_key_value
    mask = _additive_mask(c)
    if c.key_padding_mask is not None:
        # Padded keys never contribute, whatever they hold (an uninitialised cache): SDPA would
        # multiply their NaN by a zero weight. (A NaN in a key hidden only by the causal mask
        # or the bias still reaches SDPA; the 'torch' and 'triton' backends keep it out.)
        hidden = ~c.key_padding_mask[:, None, :, None]
        k, v = k.masked_fill(hidden, 0), v.masked_fill(hidden, 0)
    # Rows with no visible key: a harmless mask row for SDPA, output zeroed after (as the
    # reference's attention_weights does), whichever kernel PyTorch picks.
    dead = torch.isneginf(mask).all(dim=-1, keepdim=True)
    mask = mask.masked_fill(dead, 0.0)
    # SDPA takes the mask in q's dtype: shift each row by its (detached) max first, which the
    # softmax ignores, so that a large finite bias (a -1e5 row in fp16) keeps its differences
    # instead of rounding to -inf or to a constant.
    mask = (mask - mask.amax(dim=-1, keepdim=True).detach()).to(q.dtype)
    out = F.scaled_dot_product_attention(
        q, _expand_kv(k, n_heads), _expand_kv(v, n_heads), attn_mask=mask, dropout_p=dropout_p, scale=c.softmax_scale,
    )
    return _merge_heads(out.masked_fill(dead, 0.0)), None, c.past_key_value


def triton_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the 'triton' backend runs its kernels in for inputs of ``x``'s dtype: fp16 and
    bf16 as they are; anything wider is cast to the active autocast dtype of its device, or to
    bfloat16 (fp32's range, so activations that fit fp32 never overflow), and the output is cast
    back."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.dtype
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.bfloat16


def triton_flash_attn_fn(
    query, key, value, n_heads, kv_n_heads, past_key_value=None, softmax_scale=None, attn_bias=None,
    key_padding_mask=None, is_causal=False, dropout_p=0.0, training=False, needs_weights=False, alibi_slopes=None,
    window_size=(-1, -1), softcap=0.0,
):
    """'triton' backend: ``tritonflash.flash_attn_func`` (GQA native, ALiBi and key padding
    in-kernel, k/v never expanded), or ``flash_attn_with_kvcache`` for decoding steps (see
    ``_decodes``: a past_key_value, few query rows, no padding mask, no gradient). fp32 inputs
    run in ``triton_compute_dtype`` and the output is cast back. Dropout in training mode is
    the kernels' (its mask drawn from the device's generator). No attention weights. See the
    module doc."""
    c = _prepare(query, key, value, n_heads, kv_n_heads, past_key_value, softmax_scale, attn_bias,
                 key_padding_mask, is_causal, dropout_p, alibi_slopes, slopes_checked_later=True, window_size=window_size,
                 softcap=softcap)
    if needs_weights:
        raise NotImplementedError("attn_impl='triton' cannot return attention weights (needs_weights=True); "
                                  "use attn_impl='torch'")
    dtype = triton_compute_dtype(query)
    q, k, v = (x.to(dtype) for x in (c.q, c.k, c.v))
    dropout_p = dropout_p if training else 0.0
    bias = c.bias
    if bias is not None and bias.dtype == torch.float64:
        # The kernels add fp32 at most; the gradient flows back to the fp64 bias.
        bias = bias.float()
    if _decodes(c, past_key_value, dropout_p):
        # Decoding with a cache: the split-KV kernel over the concatenated keys (all of them
        # valid), one program per GQA group; the same semantics as flash_attn_func below.
        out = flash_attn_with_kvcache(q, k, v, bias=bias, causal=c.causal, softmax_scale=c.softmax_scale,
                                      alibi_slopes=c.alibi_slopes, window_size=c.window_size, softcap=c.softcap)
        return out.flatten(2).to(query.dtype), None, c.past_key_value
    out = flash_attn_func(
        q, k, v, bias, c.causal, c.softmax_scale,
        alibi_slopes=c.alibi_slopes, key_padding_mask=c.key_padding_mask, dropout_p=dropout_p,
        window_size=c.window_size, softcap=c.softcap,
    )
    return out.flatten(2).to(query.dtype), None, c.past_key_value


# Query rows up to which the 'triton' backend (and the transformers integration) decodes
# through flash_attn_with_kvcache.
DECODE_MAX_SEQLEN_Q = 16


def _decodes(c: _Call, past_key_value, dropout_p) -> bool:
    """Whether a 'triton' call is a decoding step that the KV-cache kernel serves: a non-empty
    past_key_value, at most DECODE_MAX_SEQLEN_Q query rows, no key padding mask (the decode
    kernel has none), no dropout, and no gradient needed (the kernel is inference only)."""
    if not past_key_value or c.q.shape[1] > DECODE_MAX_SEQLEN_Q or c.key_padding_mask is not None or dropout_p > 0.0:
        return False
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (c.q, c.k, c.v, c.bias)):
        return False
    return True


ATTN_FNS = {
    "torch": scaled_multihead_dot_product_attention,
    "flash": flash_attn_fn,
    "triton": triton_flash_attn_fn,
}
