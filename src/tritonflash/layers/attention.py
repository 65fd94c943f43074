"""MPT-style attention modules: one general ``GroupedQueryAttention`` and two presets of it."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_tensor
from .attn_bias import check_attn_impl
from .backends import ATTN_FNS

__all__ = ["GroupedQueryAttention", "MultiheadAttention", "MultiQueryAttention", "ATTN_CLASS_REGISTRY"]


class GroupedQueryAttention(nn.Module):
    """Grouped-query attention as in MPT (llm-foundry): ``n_heads`` query heads share
    ``kv_n_heads`` key/value heads (``n_heads % kv_n_heads == 0``).

    Args:
        d_model: model width; ``head_dim = d_model // n_heads``.
        n_heads, kv_n_heads: query and key/value head counts.
        attn_impl: backend, ``'torch'`` (eager, fp32 math, weights and dropout), ``'flash'``
            (PyTorch SDPA) or ``'triton'`` (tritonflash kernels; fp32 layers run the kernel in
            bf16, see ``triton_compute_dtype``).
        clip_qkv: if set, the q/k/v projections are clamped to ``[-clip_qkv, clip_qkv]``.
        qk_ln: LayerNorm over the whole query (``d_model``) and key (``kv_n_heads * head_dim``)
            projections, as MPT does.
        softmax_scale: default ``1 / sqrt(head_dim)``.
        attn_pdrop: dropout on the attention weights while training (every backend; 'triton' in-kernel).
        sliding_window_size: -1 (off) or w >= 0: each query sees the keys at most w positions
            before it (llm-foundry's name; ``window_size=(w, w)`` of ``flash_attn_func``, which
            with the causal mask is (w, 0)); blocks outside the window are skipped on 'triton'.
        attn_logit_softcapping: None (off) or > 0: scores capped to ``c * tanh(score / c)``
            before bias and ALiBi (Gemma 2; llm-foundry's name); 'torch' and 'triton' only.
        fused_qkv: one ``Wqkv`` Linear ``d_model -> d_model + 2 * kv_n_heads * head_dim``
            (rows q, k, v) if True, else separate ``Wq``, ``Wk``, ``Wv``.
        bias: whether the Linear layers have biases. norm_eps: LayerNorm epsilon.
        device, dtype: for the parameters.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        kv_n_heads: int,
        attn_impl: str = "triton",
        clip_qkv: float | None = None,
        qk_ln: bool = False,
        softmax_scale: float | None = None,
        attn_pdrop: float = 0.0,
        fused_qkv: bool = True,
        bias: bool = True,
        norm_eps: float = 1e-5,
        device=None,
        dtype=None,
        sliding_window_size: int = -1,
        attn_logit_softcapping: float | None = None,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("n_heads", n_heads), ("kv_n_heads", kv_n_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if kv_n_heads > n_heads:
            raise ValueError(f"kv_n_heads ({kv_n_heads}) must not exceed n_heads ({n_heads})")
        if n_heads % kv_n_heads != 0:
            raise ValueError(
                f"kv_n_heads ({kv_n_heads}) must divide n_heads ({n_heads}) so that query heads share key/value heads "
                f"in equal groups; divisors of {n_heads}: {[h for h in range(1, n_heads + 1) if n_heads % h == 0]}"
            )
        check_attn_impl(attn_impl)
        if clip_qkv is not None and not clip_qkv > 0:
            raise ValueError(f"clip_qkv must be None or > 0, got {clip_qkv!r}")
        if softmax_scale is not None and not softmax_scale > 0:
            raise ValueError(f"softmax_scale must be None or > 0, got {softmax_scale!r}")
        if not 0.0 <= attn_pdrop < 1.0:
            raise ValueError(f"attn_pdrop must be in [0, 1), got {attn_pdrop!r}")
        if isinstance(sliding_window_size, bool) or not isinstance(sliding_window_size, int) or sliding_window_size < -1:
            raise ValueError(f"sliding_window_size must be -1 (off) or an int >= 0, got {sliding_window_size!r}")
        if attn_logit_softcapping is not None and not (isinstance(attn_logit_softcapping, (int, float))
                                                       and not isinstance(attn_logit_softcapping, bool)
                                                       and 0 < attn_logit_softcapping < float("inf")):
            raise ValueError(f"attn_logit_softcapping must be None or a finite number > 0, got {attn_logit_softcapping!r}")
        if attn_logit_softcapping is not None and attn_impl == "flash":
            raise NotImplementedError("attn_impl='flash' (PyTorch SDPA) cannot cap logits (attn_logit_softcapping); "
                                      "use attn_impl='triton' or 'torch'")

        self.d_model = d_model
        self.n_heads = n_heads
        self.kv_n_heads = kv_n_heads
        self.head_dim = d_model // n_heads
        self.attn_impl = attn_impl
        self.attn_fn = ATTN_FNS[attn_impl]
        self.clip_qkv = clip_qkv
        self.qk_ln = qk_ln
        self.softmax_scale = softmax_scale
        self.attn_dropout_p = attn_pdrop
        self.fused_qkv = fused_qkv
        self.sliding_window_size = sliding_window_size
        self.attn_logit_softcapping = attn_logit_softcapping

        factory = {"device": device, "dtype": dtype}
        kv_dim = kv_n_heads * self.head_dim
        self._split = (d_model, kv_dim, kv_dim)
        if fused_qkv:
            self.Wqkv = nn.Linear(d_model, d_model + 2 * kv_dim, bias=bias, **factory)
        else:
            self.Wq = nn.Linear(d_model, d_model, bias=bias, **factory)
            self.Wk = nn.Linear(d_model, kv_dim, bias=bias, **factory)
            self.Wv = nn.Linear(d_model, kv_dim, bias=bias, **factory)
        if qk_ln:
            self.q_ln = nn.LayerNorm(d_model, eps=norm_eps, **factory)
            self.k_ln = nn.LayerNorm(kv_dim, eps=norm_eps, **factory)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.out_proj._is_residual = True  # MPT's init scales residual projections by depth

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, kv_n_heads={self.kv_n_heads}, attn_impl={self.attn_impl!r}, "
            f"clip_qkv={self.clip_qkv}, qk_ln={self.qk_ln}, softmax_scale={self.softmax_scale}, attn_pdrop={self.attn_dropout_p}"
            + (f", sliding_window_size={self.sliding_window_size}" if self.sliding_window_size >= 0 else "")
            + (f", attn_logit_softcapping={self.attn_logit_softcapping}" if self.attn_logit_softcapping else "")
        )

    def _window(self, is_causal) -> tuple:
        w = self.sliding_window_size
        if w < 0:
            return (-1, -1)
        return (w, 0) if is_causal is True else (w, w)

    def _qkv(self, x: torch.Tensor):
        if self.fused_qkv:
            qkv = self.Wqkv(x)
            if self.clip_qkv is not None:
                qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
            return qkv.split(self._split, dim=-1)
        q, k, v = self.Wq(x), self.Wk(x), self.Wv(x)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(min=-self.clip_qkv, max=self.clip_qkv) for t in (q, k, v))
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_bias: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        is_causal: bool = True,
        needs_weights: bool = False,
        alibi_slopes: torch.Tensor | None = None,
    ):
        """x: (batch, seqlen, d_model). Returns ``(out, attn_weights, past_key_value)``:
        out (batch, seqlen, d_model); attn_weights (batch, n_heads, seqlen, seqlen_k) or None;
        past_key_value ``(k, v)``, each (batch, seqlen_k, kv_n_heads, head_dim), the given cache
        with this call's keys and values appended (seqlen_k = seqlen_past + seqlen).

        attn_bias: a model-wide bias; its last seqlen rows and seqlen_k columns are used.
        attention_mask: (batch, seqlen_k) bool key padding mask, True = keep.
        is_causal: bottom-right aligned, so decoding with a cache needs no extra mask.
        alibi_slopes: (n_heads,) or (batch, n_heads) fp32 ALiBi slopes (e.g. ``gen_slopes(n_heads)``).
        """
        check_tensor("x", x)
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (batch, seqlen, d_model={self.d_model}), got {tuple(x.shape)}")
        query, key, value = self._qkv(x)
        if self.qk_ln:
            # Under autocast LayerNorm returns fp32; keep the projection's dtype for the kernels.
            dtype = query.dtype
            query = self.q_ln(query).to(dtype)
            key = self.k_ln(key).to(dtype)
        context, attn_weights, past_key_value = self.attn_fn(
            query,
            key,
            value,
            self.n_heads,
            self.kv_n_heads,
            past_key_value=past_key_value,
            softmax_scale=self.softmax_scale,
            attn_bias=attn_bias,
            key_padding_mask=attention_mask,
            is_causal=is_causal,
            dropout_p=self.attn_dropout_p,
            training=self.training,
            needs_weights=needs_weights,
            alibi_slopes=alibi_slopes,
            window_size=self._window(is_causal),
            softcap=float(self.attn_logit_softcapping or 0.0),
        )
        return self.out_proj(context), attn_weights, past_key_value


class MultiheadAttention(GroupedQueryAttention):
    """``GroupedQueryAttention`` with ``kv_n_heads = n_heads``; every other argument as there
    (``attn_impl`` may still be passed positionally, as in MPT)."""

    def __init__(self, d_model: int, n_heads: int, *args, **kwargs):
        _no_kv_n_heads(type(self).__name__, kwargs)
        super().__init__(d_model, n_heads, n_heads, *args, **kwargs)


class MultiQueryAttention(GroupedQueryAttention):
    """``GroupedQueryAttention`` with ``kv_n_heads = 1``; every other argument as there."""

    def __init__(self, d_model: int, n_heads: int, *args, **kwargs):
        _no_kv_n_heads(type(self).__name__, kwargs)
        super().__init__(d_model, n_heads, 1, *args, **kwargs)


def _no_kv_n_heads(preset: str, kwargs: dict) -> None:
    if "kv_n_heads" in kwargs:
        raise TypeError(f"{preset} fixes kv_n_heads; use GroupedQueryAttention to choose kv_n_heads={kwargs['kv_n_heads']}")


ATTN_CLASS_REGISTRY = {
    "multihead_attention": MultiheadAttention,
    "multiquery_attention": MultiQueryAttention,
    "grouped_query_attention": GroupedQueryAttention,
}
