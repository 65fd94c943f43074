"""Run Hugging Face transformers models through tritonflash.

Two entry points (full rules in docs/integrations.md):

``register(name="tritonfa")``
    Registers an attention function and its mask builder with transformers'
    ``AttentionInterface`` / ``AttentionMaskInterface`` and returns the name, for every model
    that dispatches through the interface (Llama, Mistral, Qwen, Gemma, T5, gpt-oss, ...)::

        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register())

    The mask builder never materialises a dense mask for causal / bidirectional / sliding-window
    masks with padding: it hands the attention function a :class:`TritonflashMask` (key padding
    mask, causal flag, window, cache offsets), which becomes ``key_padding_mask=`` and
    ``causal=`` of ``flash_attn_func``. Any other mask (a custom ``mask_function``, a 4-D mask
    given by the caller) is materialised once per forward as a boolean mask and passed as an
    additive bias.

``patch(model)``
    For the models that transformers runs with eager attention only and ALiBi (MPT, BLOOM,
    Falcon with ``alibi=True``): replaces their attention modules' ``forward`` with one that
    calls tritonflash with in-kernel ALiBi (``alibi_slopes=``), using the model's own slopes and
    scaling.

Importing this module does not import transformers; the functions do, and raise an
``ImportError`` naming ``pip install "tritonflash[hf]"`` when it is absent.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import types
import warnings

import torch

from ..layers.backends import DECODE_MAX_SEQLEN_Q, triton_compute_dtype

__all__ = ["DEFAULT_NAME", "TritonflashMask", "attention_forward", "build_mask", "patch", "register"]

DEFAULT_NAME = "tritonfa"
_INSTALL_HINT = 'pip install "tritonflash[hf]"'
_log = logging.getLogger(__name__)


def _require_transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised in a subprocess test
        raise ImportError(
            f"tritonflash.integrations.transformers needs Hugging Face transformers, which is not installed: {_INSTALL_HINT}"
        ) from e
    return transformers


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------

def _check_name(name):
    """transformers routes some names itself: any name containing "flash" goes to its flash-attn
    loader (``is_flash_attention_requested`` is a substring test), "sdpa" and "flex_attention" to
    their own dispatch checks, "paged|..." is a prefix it strips, and "owner/repo" is a Hub kernel."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    reasons = []
    low = name.lower()
    if not name or not name.isidentifier():
        reasons.append("a Python identifier (letters, digits, underscores)")
    for word in ("flash", "sdpa", "flex", "paged", "eager"):
        if word in low:
            reasons.append(f"without {word!r} (transformers treats names containing it specially)")
    if reasons:
        raise ValueError(f"name: expected {'; '.join(reasons)}, got {name!r}")


def register(name: str = DEFAULT_NAME) -> str:
    """Register tritonflash's attention function and mask builder with transformers under
    ``name`` and return ``name``; pass it as ``attn_implementation=`` (``from_pretrained``,
    ``Model(config)`` with ``config._attn_implementation``, ``model.set_attn_implementation``).

    ``name`` must be a Python identifier that transformers does not route elsewhere: nothing
    containing "flash" (transformers would try to load the flash-attn package), "sdpa", "flex",
    "paged" or "eager". Registering the same name again is a no-op."""
    _check_name(name)
    _require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for interface, fn in ((AttentionInterface, attention_forward), (AttentionMaskInterface, build_mask)):
        current = interface._global_mapping.get(name)
        if current is not None and current is not fn:
            raise ValueError(f"name: {name!r} is already registered with transformers' {interface.__name__} "
                             f"(to {getattr(current, '__qualname__', current)!r}); choose another name")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, build_mask)
    return name


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(kw_only=True, eq=False, repr=False)
class TritonflashMask:
    """The mask of one forward as tritonflash needs it, built by :func:`build_mask`.

    ``causal`` (bool) in absolute positions (key ``kv_offset + j`` visible from query
    ``q_offset + i`` iff ``kv_offset + j <= q_offset + i``), ``window`` ``(left, right)`` or None,
    ``key_padding_mask`` ``(batch, kv_length)`` bool (True = keep) or None, ``packed_ids``
    ``(batch, seqlen)`` sequence ids of packed sequences (then attention runs through
    ``flash_attn_varlen_func``) or None. ``dense`` is set instead of all of these for masks
    that have no such structure: a boolean ``(batch, 1, q_length, kv_length)`` tensor, True =
    attend.

    It is not a tensor: models pass it to the attention function untouched. ``to()`` returns it
    unchanged (MPT calls ``mask.to(torch.bool)``) and ``ndim`` is None so that code testing for a
    2-D or 4-D tensor mask leaves it alone.
    """

    ndim = None  # a class attribute, not a field

    q_length: int
    kv_length: int
    q_offset: int | torch.Tensor = 0
    kv_offset: int = 0
    causal: bool = False
    window: tuple | None = None
    key_padding_mask: torch.Tensor | None = None
    packed_ids: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    def to(self, *args, **kwargs):
        return self

    def __repr__(self):
        if self.dense is not None:
            return f"TritonflashMask(dense={tuple(self.dense.shape)})"
        kpm = None if self.key_padding_mask is None else tuple(self.key_padding_mask.shape)
        return (f"TritonflashMask(causal={self.causal}, window={self.window}, key_padding_mask={kpm}, "
                f"q_length={self.q_length}, kv_length={self.kv_length}, q_offset={self.q_offset}, "
                f"kv_offset={self.kv_offset}, packed={self.packed_ids is not None})")


def _closure_vars(fn):
    cells = fn.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, cells)}


def _describe(fn, mu, parts=None):
    """Reduce a transformers mask function to {'base': 'causal'|'bidirectional', 'window': (l, r),
    'packed': ids}; None when it has a part we do not recognise (then the mask is materialised)."""
    parts = {} if parts is None else parts
    qual = getattr(fn, "__qualname__", "")
    if fn is mu.causal_mask_function or fn is mu.bidirectional_mask_function:
        base = "causal" if fn is mu.causal_mask_function else "bidirectional"
        if parts.setdefault("base", base) != base:
            return None
        return parts
    if qual == "and_masks.<locals>.and_mask":
        for sub in _closure_vars(fn).get("mask_functions", ()):
            if _describe(sub, mu, parts) is None:
                return None
        return parts
    if qual in ("sliding_window_overlay.<locals>.inner_mask", "sliding_window_bidirectional_overlay.<locals>.inner_mask"):
        if "window" in parts:
            return None
        w = int(_closure_vars(fn)["sliding_window"])
        # causal overlay: kv > q - w, so w - 1 keys to the left; bidirectional: |q - kv| <= w
        causal = qual.startswith("sliding_window_overlay")
        parts["window"] = (w - 1, 0) if causal else (w, w)
        parts["window_kind"] = "causal" if causal else "bidirectional"
        return parts
    if qual == "packed_sequence_mask_function.<locals>.inner_mask":
        parts["packed"] = _closure_vars(fn)["packed_sequence_mask"]
        return parts
    if qual == "remap_positions_for_packed_sequence.<locals>.inner_mask":
        # Positions restart at 0 in each packed sequence and grow by one inside it (that is how
        # transformers detects packing), so within a sequence they order keys like the indices.
        parts["remapped"] = True
        return _describe(_closure_vars(fn)["mask_function"], mu, parts)
    return None


def _dense_mask(mu, **kw):
    return mu.sdpa_mask(allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kw)


def build_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
               use_vmap=False, device="cpu", **kwargs):
    """The mask builder registered with ``AttentionMaskInterface``: returns a :class:`TritonflashMask`.

    ``attention_mask`` is transformers' 2-D padding mask of the tokens seen so far
    ``(batch, >= kv_offset + kv_length)``; columns past its end (a ``StaticCache``'s unwritten
    slots) count as padding."""
    from transformers import masking_utils as mu

    if isinstance(attention_mask, TritonflashMask):  # built ahead by generate() for a static cache
        return attention_mask
    if mask_function is None:
        mask_function = mu.causal_mask_function
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2):
        raise ValueError(f"attention_mask: expected a 2-D (batch, seqlen) padding mask, got "
                         f"{type(attention_mask).__name__} of shape {tuple(getattr(attention_mask, 'shape', ()))}")
    parts = _describe(mask_function, mu)
    if isinstance(q_offset, torch.Tensor):
        # A StaticCache's q_offset is its layer's live length tensor, which the layers' cache
        # updates bump in place before attention reads the mask: keep this forward's value
        # (a device copy, no host read).
        q_offset = q_offset.clone()
    sizes = dict(q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset)
    ok = parts is not None and "base" in parts
    if ok and parts.get("remapped") and parts.get("packed") is None:
        ok = False
    if ok and "window" in parts and parts["window_kind"] != ("causal" if parts["base"] == "causal" else "bidirectional"):
        ok = False
    if not ok:
        dense = _dense_mask(mu, batch_size=batch_size, mask_function=mask_function, attention_mask=attention_mask,
                            use_vmap=use_vmap, device=device, **sizes)
        return TritonflashMask(dense=dense, **sizes)
    kpm = None
    if attention_mask is not None:
        kpm = attention_mask.to(device=device, dtype=torch.bool)
        end = kv_offset + kv_length
        if kpm.shape[1] < end:
            kpm = torch.nn.functional.pad(kpm, (0, end - kpm.shape[1]), value=False)
        kpm = kpm[:, kv_offset:end]
    return TritonflashMask(causal=parts["base"] == "causal", window=parts.get("window"), key_padding_mask=kpm,
                           packed_ids=parts.get("packed"), **sizes)


# ----------------------------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------------------------

def _attentions_requested(kwargs):
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
        collected = _active_collector.get()
    except Exception:  # noqa: BLE001 - an internal of transformers; absent means nothing is collected
        return False
    return isinstance(collected, dict) and ("attentions" in collected or "cross_attentions" in collected)


_REFUSED = {
    "head_mask": "a head mask",
    "layer_head_mask": "a head mask",
    "output_attentions": "attention weights (output_attentions=True)",
}


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered with ``AttentionInterface``.

    query ``(batch, heads, q_len, head_dim)``, key/value ``(batch, kv_heads, kv_len, head_dim)``
    (transformers' layout; used as transposed views, GQA without expanding k/v). Returns
    ``(out (batch, q_len, heads, head_dim), None)``. Keyword arguments honoured:
    ``position_bias`` (T5: an additive bias with its gradient), ``softcap``, ``sliding_window``,
    ``s_aux`` (sinks), ``is_causal``, ``cu_seq_lens_q/k`` and ``max_length_q/k`` (packed
    sequences). ``output_attentions`` and head masks raise ``NotImplementedError``."""
    for key_name, what in _REFUSED.items():
        if kwargs.get(key_name) is not None and kwargs.get(key_name) is not False:
            raise NotImplementedError(f"{key_name}: tritonflash cannot honour {what}; use attn_implementation='eager'")
    if _attentions_requested(kwargs):
        raise NotImplementedError("output_attentions: tritonflash does not compute attention weights; "
                                  "use attn_implementation='eager' to get them")
    return _attention(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
        position_bias=kwargs.get("position_bias"), softcap=kwargs.get("softcap"),
        sliding_window=kwargs.get("sliding_window"), sinks=kwargs.get("s_aux"), is_causal=kwargs.get("is_causal"),
        cu_seq_lens_q=kwargs.get("cu_seq_lens_q"), cu_seq_lens_k=kwargs.get("cu_seq_lens_k"),
        max_length_q=kwargs.get("max_length_q"), max_length_k=kwargs.get("max_length_k"),
    )


def _check_qkv(query, key, value):
    for arg, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{arg}: expected a 4-D tensor (batch, heads, seqlen, head_dim), got "
                             f"{type(t).__name__} of shape {tuple(getattr(t, 'shape', ()))}")


def _to_bias(mask_bool, dtype):
    """0 where ``mask_bool`` is True, -inf where False. No host scalar is copied to the device
    (``torch.tensor(-inf, device=...)`` would block the host on every decode step)."""
    return torch.zeros(mask_bool.shape, dtype=dtype, device=mask_bool.device).masked_fill_(~mask_bool, float("-inf"))


def _attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, position_bias=None,
               alibi_slopes=None, softcap=None, sinks=None, sliding_window=None, is_causal=None,
               cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, tensor_masks=True):
    from .. import api

    _check_qkv(query, key, value)
    dtype = triton_compute_dtype(query)
    q = query.transpose(1, 2).to(dtype)  # (b, s, h, d) views when the dtype already matches
    k = key.transpose(1, 2).to(dtype)
    v = value.transpose(1, 2).to(dtype)
    opts = {}
    mask = attention_mask
    packed = isinstance(mask, TritonflashMask) and mask.packed_ids is not None
    varlen = cu_seq_lens_q is not None or packed
    fn = api.flash_attn_varlen_func if varlen else api.flash_attn_func

    if softcap is not None and float(softcap) != 0.0:
        opts["softcap"] = float(softcap)
    if sinks is not None:
        opts["sinks"] = sinks.float()
    dropout = float(dropout or 0.0)
    if dropout > 0.0 and not varlen:  # varlen takes it positionally
        opts["dropout_p"] = dropout
    if alibi_slopes is not None:
        opts["alibi_slopes"] = alibi_slopes

    bias = position_bias
    if bias is not None and bias.dtype == torch.float64:
        bias = bias.float()

    if mask is None:
        causal = bool(is_causal) if is_causal is not None else bool(getattr(module, "is_causal", True))
        window = None
        if sliding_window is not None:
            w = int(sliding_window)
            window = (w - 1, 0) if causal else (w, w)
    elif isinstance(mask, TritonflashMask):
        causal, window = mask.causal, mask.window
    elif isinstance(mask, torch.Tensor):
        if not tensor_masks:
            raise NotImplementedError(
                f"attention_mask: patch()ed models take a 2-D padding mask; a prepared {mask.ndim}-D mask tensor "
                f"({tuple(mask.shape)}, {mask.dtype}) is not supported (ALiBi is computed in-kernel for causal masks)")
        if mask.ndim != 4:
            raise ValueError(f"attention_mask: expected a 4-D mask (batch, 1 or heads, q_len, kv_len) or the mask "
                             f"built by register()'s mask builder, got shape {tuple(mask.shape)}")
        causal, window = False, None
    else:
        raise TypeError(f"attention_mask: expected None, a TritonflashMask (from register()'s mask builder) or a "
                        f"4-D tensor, got {type(mask).__name__}")

    if varlen:
        return _varlen(fn, query, q, k, v, mask, causal, window, bias, dropout, scaling, opts,
                       cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k)

    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    if _decoding(query, key, value, mask, bias, dropout, sq, sk):
        out = _decode(q, k, v, mask, causal, window, bias, scaling, opts)
        if out is not None:
            return out.to(query.dtype), None
    kpm = None
    dense = None
    if isinstance(mask, torch.Tensor):
        dense = mask
    elif isinstance(mask, TritonflashMask):
        if mask.dense is not None:
            dense = mask.dense
        else:
            if mask.kv_length != sk or mask.q_length != sq:
                raise ValueError(f"attention_mask: built for q_len={mask.q_length}, kv_len={mask.kv_length} but the "
                                 f"model passed query length {sq} and key length {sk}")
            kpm = mask.key_padding_mask
            if causal:
                # tritonflash's causal (and window) are aligned bottom-right: query i sees key j iff
                # j <= i + sk - sq. transformers' are absolute: q_offset + i >= kv_offset + j. They
                # agree when sk - sq == q_offset - kv_offset; a StaticCache hands over its whole
                # buffer (sk larger), so the keys are cut to the written length (views), or, when
                # decoding one token at a tensor offset, the visible range goes into the padding mask.
                qo = mask.q_offset
                if isinstance(qo, torch.Tensor) and sq == 1:
                    pos = (qo.to(q.device) - mask.kv_offset).reshape(())
                    j = torch.arange(sk, device=q.device)
                    row = j <= pos
                    if window is not None:
                        row = row & (j >= pos - window[0])
                    kpm = row.expand(b, sk) if kpm is None else kpm & row
                    causal, window = False, None
                else:
                    length = int(qo) - int(mask.kv_offset) + sq
                    if length > sk or length < sq:
                        raise ValueError(f"attention_mask: offsets q_offset={int(qo)}, kv_offset={mask.kv_offset} do not "
                                         f"fit a query of length {sq} and {sk} keys")
                    if length < sk:
                        k, v = k[:, :length], v[:, :length]
                        kpm = None if kpm is None else kpm[:, :length]
                        if bias is not None and bias.shape[-1] == sk:
                            bias = bias[..., :length]
                        sk = length
            elif window is not None and int(mask.q_offset) - int(mask.kv_offset) != sk - sq:
                dense = _materialise(mask, b, q.device)
    if dense is None and window is not None:
        # A TritonflashMask's window, or sliding_window with no mask (a direct call, a paged cache).
        opts["window_size"] = window
    if dense is not None:
        if alibi_slopes is not None:
            raise NotImplementedError("attention_mask: an arbitrary mask together with ALiBi is not supported")
        kpm, causal = None, False
        opts.pop("window_size", None)
        if dense.dtype == torch.bool:
            if bias is None:
                opts["attn_mask"] = dense
            else:
                mbias = _to_bias(dense, torch.float32 if bias is None else bias.dtype)
                bias = mbias if bias is None else bias + mbias
        else:
            bias = dense if bias is None else bias + dense
    out = fn(q, k, v, bias, causal, scaling, key_padding_mask=kpm, **opts)
    return out.to(query.dtype), None


def _decoding(query, key, value, mask, bias, dropout, sq, sk):
    """Whether this call is a decoding step that ``flash_attn_with_kvcache`` can run: a few query
    rows over more keys than queries (a KV cache's), no dropout, no gradient, K and V of one
    shape, and a mask it can express (none, or a TritonflashMask without a dense part)."""
    if sq > DECODE_MAX_SEQLEN_Q or sk <= sq or dropout > 0.0 or key.shape != value.shape:
        return False
    if mask is not None and not (isinstance(mask, TritonflashMask) and mask.dense is None):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, key, value, bias)):
        return False
    return True


def _decode(q, k, v, mask, causal, window, bias, scaling, opts):
    """A decoding step through ``flash_attn_with_kvcache`` over the cache's own tensors (k, v
    (b, sk, h_k, d) views of the updated cache, nothing appended, nothing copied when the dtype
    matches): the valid length L of every row is ``cache_seqlens`` (a StaticCache: its write
    position + q's length, a tensor when the position is one; a DynamicCache: every key) and
    causal/window/ALiBi are aligned to L as transformers aligns them to the absolute positions.
    Key padding (a 2-D attention_mask, a StaticCache's unwritten slots past it) becomes a
    (b, 1, 1, sk) -inf bias. Returns None when the offsets do not fit (the general path then
    raises or materialises)."""
    from .. import kvcache

    sinks = opts.get("sinks")
    if sinks is not None and sinks.requires_grad and torch.is_grad_enabled():
        return None
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    lengths, kpm = sk, None
    if isinstance(mask, TritonflashMask):
        if mask.kv_length != sk or mask.q_length != sq:
            return None
        kpm = mask.key_padding_mask
        qo = mask.q_offset
        if causal:
            if isinstance(qo, torch.Tensor):
                # clamped to the buffer: out-of-range lengths are never read past it
                lengths = (qo.to(q.device).reshape(1) - mask.kv_offset + sq).clamp(sq, sk).to(torch.int32).repeat(b)
            else:
                lengths = int(qo) - int(mask.kv_offset) + sq
                if not sq <= lengths <= sk:
                    return None
        elif window is not None and int(qo) - int(mask.kv_offset) != sk - sq:
            return None
    if kpm is not None:
        pad = _to_bias(kpm.to(q.device), torch.float32)[:, None, None, :]
        bias = pad if bias is None else bias.float() + pad
    kw = {name: opts[name] for name in ("softcap", "sinks", "alibi_slopes") if name in opts}
    if window is not None:
        kw["window_size"] = window
    return kvcache.flash_attn_with_kvcache(q, k, v, cache_seqlens=lengths, bias=bias, softmax_scale=scaling, causal=causal,
                                           validate=False, **kw)


def _materialise(mask, batch, device):
    """A dense boolean mask for a TritonflashMask whose window tritonflash cannot express: a
    bidirectional window whose offsets are not aligned bottom-right."""
    from transformers import masking_utils as mu

    fn = mu.causal_mask_function if mask.causal else mu.bidirectional_mask_function
    if mask.window is not None:
        left = mask.window[0]
        overlay = (mu.sliding_window_overlay(left + 1) if mask.causal
                   else mu.sliding_window_bidirectional_overlay(left))
        fn = mu.and_masks(overlay, fn)
    pm = None
    if mask.key_padding_mask is not None:  # back to absolute columns
        pm = torch.nn.functional.pad(mask.key_padding_mask, (mask.kv_offset, 0), value=False)
    warnings.warn("tritonflash: a bidirectional sliding window whose offsets are not aligned bottom-right is "
                  "materialised as a dense bias (O(q_len * kv_len) memory)", stacklevel=3)
    return _dense_mask(mu, batch_size=batch, q_length=mask.q_length, kv_length=mask.kv_length,
                       q_offset=mask.q_offset, kv_offset=mask.kv_offset, mask_function=fn, attention_mask=pm,
                       device=device)


def _varlen(fn, query, q, k, v, mask, causal, window, bias, dropout, scaling, opts,
            cu_q, cu_k, max_q, max_k):
    if bias is not None:
        raise NotImplementedError("position_bias: a bias tensor is not supported with packed sequences "
                                  "(cu_seq_lens_q / packed position_ids); tritonflash's varlen functions take none")
    if isinstance(mask, torch.Tensor) or (isinstance(mask, TritonflashMask) and
                                          (mask.dense is not None or mask.key_padding_mask is not None)):
        raise ValueError("attention_mask: packed sequences (cu_seq_lens_q or packed position_ids) cannot be combined "
                         "with a padding or custom attention mask; pass attention_mask=None")
    b, sq, h, d = q.shape
    sk = k.shape[1]
    if cu_q is None:
        ids = mask.packed_ids.to(q.device)
        if ids.shape != (b, sq):
            raise ValueError(f"position_ids: packed sequence ids of shape {tuple(ids.shape)} do not match the query "
                             f"(batch {b}, length {sq})")
        ids = ids + torch.arange(b, device=ids.device)[:, None] * (sq + 1)  # sequences never span rows
        _, counts = torch.unique_consecutive(ids.flatten(), return_counts=True)
        cu_q = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        max_q = int(counts.max())
    if cu_k is None:
        cu_k, max_k = cu_q, max_q
    cu_q = cu_q.to(device=q.device, dtype=torch.int32)
    cu_k = cu_k.to(device=q.device, dtype=torch.int32)
    max_q, max_k = int(max_q), int(max_k)
    if window is not None:
        opts["window_size"] = window
    out = fn(q.reshape(b * sq, h, d), k.reshape(b * sk, k.shape[2], d), v.reshape(b * sk, v.shape[2], v.shape[3]),
             cu_q, cu_k, max_q, max_k, dropout, scaling, causal, **opts)
    return out.reshape(b, sq, h, -1).to(query.dtype), None


# ----------------------------------------------------------------------------------------------
# patch(): MPT, BLOOM, Falcon with ALiBi
# ----------------------------------------------------------------------------------------------

def _slopes_for(module, device):
    cache = module._tritonflash_slopes
    s = cache.get(device)
    if s is None:
        s = cache[device] = cache["cpu"].to(device)
    return s


def _mpt_forward(self, hidden_states, position_bias=None, cache=None, attention_mask=None, past_key_values=None,
                 **kwargs):
    # MptBlock passes the cache as cache= (transformers 5.24) or past_key_values= (5.17, before the rename)
    if cache is None:
        cache = past_key_values
    b, s = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (t.reshape(b, s, self.n_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=2))
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    out, _ = _attention(self, q, k, v, attention_mask, scaling=self.softmax_scale,
                        dropout=self.attn_dropout_p if self.training else 0.0,
                        alibi_slopes=_slopes_for(self, q.device), tensor_masks=False)
    return self.out_proj(out.reshape(b, s, -1)), None


def _bloom_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                   output_attentions=False, **kwargs):
    from transformers.models.bloom.modeling_bloom import dropout_add

    if output_attentions:
        raise NotImplementedError("output_attentions: tritonflash does not compute attention weights; "
                                  "use the unpatched (eager) model to get them")
    b, s, _ = hidden_states.shape
    q, k, v = self._reshape(self.query_key_value(hidden_states))  # (b, h, s, d) views
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)
    out, _ = _attention(self, q, k, v, attention_mask, scaling=self.inv_norm_factor,
                        dropout=self.attention_dropout.p if self.training else 0.0,
                        alibi_slopes=_slopes_for(self, q.device), tensor_masks=False)
    context = out.reshape(b, s, self.hidden_size)
    if self.pretraining_tp > 1 and self.slow_but_exact:
        step = self.hidden_size / self.pretraining_tp
        output = torch.zeros_like(context)
        for i in range(self.pretraining_tp):
            lo, hi = int(i * step), int((i + 1) * step)
            output = output + torch.nn.functional.linear(context[:, :, lo:hi], self.dense.weight[:, lo:hi])
    else:
        output = self.dense(context)
    return dropout_add(output, residual, self.hidden_dropout, self.training), None


def _falcon_forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None, use_cache=False,
                    output_attentions=False, position_embeddings=None, **kwargs):
    if output_attentions:
        raise NotImplementedError("output_attentions: tritonflash does not compute attention weights; "
                                  "use the unpatched model to get them")
    q, k, v = self._split_heads(self.query_key_value(hidden_states))  # (b, s, heads, d)
    b, s = q.shape[:2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)
    out, _ = _attention(self, q, k, v, attention_mask, scaling=self.inv_norm_factor,
                        dropout=self.attention_dropout.p if self.training else 0.0,
                        alibi_slopes=_slopes_for(self, q.device), tensor_masks=False)
    return self.dense(out.reshape(b, s, self.num_heads * self.head_dim)), None


def _linear_alibi(alibi, what):
    """Check that a model's ALiBi row is linear in the key index and return its per-head slope."""
    row = alibi.reshape(alibi.shape[0], -1).double()
    slope = row[:, 1] - row[:, 0]
    steps = torch.arange(row.shape[1], dtype=torch.float64) - (row.shape[1] - 1)
    expect = row[:, -1:] + slope[:, None] * steps
    if not torch.allclose(row, expect, rtol=0, atol=1e-6 * float(slope.abs().max().clamp_min(1))):
        raise ValueError(f"model: {what} does not build a linear ALiBi bias; patch() cannot run it in-kernel")
    return slope.float()


def _model_kinds():
    from transformers.models.bloom import modeling_bloom as bloom
    from transformers.models.falcon import modeling_falcon as falcon
    from transformers.models.mpt import modeling_mpt as mpt

    return (
        ("mpt", mpt.MptModel, mpt.MptAttention, _mpt_forward),
        ("bloom", bloom.BloomModel, bloom.BloomAttention, _bloom_forward),
        ("falcon", falcon.FalconModel, falcon.FalconAttention, _falcon_forward),
    )


def _slopes_of(kind, base, attn):
    """The model's own ALiBi slopes, scaled as the model scales them, so that tritonflash's
    ``softmax_scale * q.k - slope * distance`` equals the model's logits up to a per-row constant."""
    n = base.num_heads
    if kind == "mpt":
        # MptModel adds build_mpt_alibi_tensor(n_heads, max_seq_len) = slope * (j - (S-1)) to
        # the scaled scores (alibi_bias_max left at the default, as MptModel.forward calls it).
        return _linear_alibi(base.build_mpt_alibi_tensor(n, 3, device="cpu"), "MptModel.build_mpt_alibi_tensor")
    if kind == "bloom":
        # BloomAttention: beta * alibi + inv_norm_factor * q.k, alibi = slope * position(j).
        ones = torch.ones(1, 3, dtype=torch.long)
        slopes = _linear_alibi(base.build_alibi_tensor(ones, n, torch.float32), "BloomModel.build_alibi_tensor")
        return slopes * float(attn.beta)
    # Falcon (SDPA path, the original Falcon-RW formula): (q.k + alibi) / sqrt(head_dim), alibi =
    # bf16(slope) * position(j); the slopes are rounded to bf16 by the model itself.
    from transformers.models.falcon import modeling_falcon as falcon

    ones = torch.ones(1, 3, dtype=torch.long)
    slopes = _linear_alibi(falcon.build_alibi_tensor(ones, n, torch.float32), "falcon build_alibi_tensor")
    return slopes * float(attn.inv_norm_factor)


def _contiguous_padding(attention_mask):
    """BLOOM and Falcon count ALiBi positions over non-padded tokens; tritonflash uses index
    distance. They agree when each row's kept tokens form one run (left or right padding)."""
    m = attention_mask.to(torch.bool)
    starts = (m[:, 1:] & ~m[:, :-1]).sum(1) + m[:, 0].long()
    if not bool((starts <= 1).all()):
        raise NotImplementedError(
            "attention_mask: a row has padding between kept tokens; this model counts ALiBi positions over kept "
            "tokens only, which tritonflash's in-kernel ALiBi (index distance) cannot express. Pad on the left or "
            "the right only, or use the unpatched model")


def _wrap_base_forward(base, kind):
    original = base.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if kwargs.get("output_attentions") or base.config.output_attentions:
            raise NotImplementedError("output_attentions: a patch()ed model computes no attention weights; "
                                      "use the unpatched model to get them")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim != 2:
            raise NotImplementedError(
                f"attention_mask: a patch()ed model takes a 2-D (batch, seqlen) padding mask, got a prepared "
                f"{mask.ndim}-D mask {tuple(mask.shape)} (its ALiBi is computed in-kernel for causal masks)")
        if kind != "mpt" and isinstance(mask, torch.Tensor):
            _contiguous_padding(mask)
        return original(*args, **kwargs)

    base.forward = forward


def patch(model, name: str = DEFAULT_NAME):
    """Run the attention of an MPT, BLOOM or Falcon-with-ALiBi model (which transformers runs
    with eager attention only) through tritonflash with in-kernel ALiBi; returns ``model``.

    Each attention module's ``forward`` is replaced (the instance's, not the class's), using the
    model's own slopes and scaling; the model's masks come from :func:`build_mask` (``name`` is
    registered and set as the model's ``config._attn_implementation``), so padding and the valid
    length of a ``DynamicCache`` or ``StaticCache`` are respected without a dense mask. The
    qualified names of the patched modules are in ``model.tritonflash_patched``. Any other model
    raises ``TypeError``; a Falcon without ``alibi=True`` raises ``ValueError`` (use
    :func:`register`). Patching twice is a no-op."""
    _require_transformers()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a transformers model (torch.nn.Module), got {type(model).__name__}")
    kinds = _model_kinds()
    bases = [(qn, m, kind, attn_cls, fwd) for qn, m in model.named_modules()
             for kind, base_cls, attn_cls, fwd in kinds if isinstance(m, base_cls)]
    if not bases:
        raise TypeError(f"model: patch() knows MPT, BLOOM and Falcon-with-ALiBi models (MptModel, BloomModel, "
                        f"FalconModel inside), got {type(model).__name__}; for models that dispatch through "
                        f"transformers' AttentionInterface use attn_implementation=register()")
    patched = list(getattr(model, "tritonflash_patched", []))
    for base_name, base, kind, attn_cls, fwd in bases:
        if kind == "falcon" and not base.config.alibi:
            raise ValueError("model: this Falcon has alibi=False (rotary embeddings); transformers runs it through "
                             "its attention implementations: load it with attn_implementation='sdpa' or 'eager' "
                             "(patch() is for ALiBi models)")
        if getattr(base, "_tritonflash_patched", False):
            continue
        if base.config.output_attentions:
            raise NotImplementedError("model: config.output_attentions=True needs attention weights, which a "
                                      "patch()ed model does not compute")
        register(name)
        base.config._attn_implementation = name
        for qn, m in base.named_modules():
            if isinstance(m, attn_cls):
                m._tritonflash_slopes = {"cpu": _slopes_of(kind, base, m)}
                m.forward = types.MethodType(fwd, m)
                patched.append(f"{base_name}.{qn}" if base_name else qn)
        _wrap_base_forward(base, kind)
        base._tritonflash_patched = True
    model.tritonflash_patched = patched
    _log.info("tritonflash.patch: %d attention modules of %s now use in-kernel ALiBi: %s",
              len(patched), type(model).__name__, ", ".join(patched))
    return model
