"""Input validation and normalisation, shared by the public functions and the autograd
classes (users of the original module call ``FlashAttnFunc.apply`` directly, so both entry
points must validate). Raises before any kernel launch; messages name the argument, what was
expected and what was received."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .bias import bias_broadcast_shape

_QKV_DTYPES = (torch.float16, torch.bfloat16)
_BIAS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEADDIM = 256


@dataclass
class Inputs:
    """Validated inputs, normalised for the kernels and the reference."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None  # rank-4 view of the user's bias
    bias_shape: tuple | None  # the user's bias shape (the shape of its gradient)
    causal: bool
    softmax_scale: float
    alibi_slopes: torch.Tensor | None  # (1 or batch, nheads) fp32
    key_padding_mask: torch.Tensor | None  # (batch, seqlen_k) bool


def _type_name(x):
    # Qualified outside builtins: numpy.bool would otherwise read as "bool".
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_type_name(x)}")


def _last_dim_unit(x):
    # Kernels read the head dim as contiguous vectors; a strided last dim is copied once.
    return x if x.stride(-1) == 1 else x.contiguous()


def check_qkv(q, k, v):
    """Validate q (b, sq, h, d) and k, v (b, sk, h_k, d)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
        if x.dtype not in _QKV_DTYPES:
            raise TypeError(f"{name} must be float16 or bfloat16, got {x.dtype}; cast with {name}.to(torch.bfloat16)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    batch, seqlen_q, nheads, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k and v must have q's batch size {batch}, got {k.shape[0]}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k and v must have q's head dim {head_dim}, got {k.shape[3]}")
    if not 1 <= head_dim <= MAX_HEADDIM:
        raise ValueError(f"head dim (last dim of q, k and v) must be between 1 and {MAX_HEADDIM}, got {head_dim}")
    if seqlen_q < 1 or k.shape[1] < 1:
        raise ValueError(f"seqlen_q and seqlen_k must be >= 1, got {seqlen_q} and {k.shape[1]}")
    nheads_k = k.shape[2]
    if nheads_k < 1 or nheads % nheads_k != 0:
        raise ValueError(
            f"q's nheads ({nheads}) must be a multiple of k/v's nheads ({nheads_k}) "
            "(grouped-query attention); got k/v with shape " + str(tuple(k.shape))
        )


def check_options(q, k, bias, causal, softmax_scale, alibi_slopes, key_padding_mask) -> Inputs:
    """Validate the optional arguments against q (b, sq, h, d) and k (b, sk, h_k, d)."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k = k.shape[1]
    bias4, bias_shape = None, None
    if bias is not None:
        _tensor("bias", bias)
        if bias.dtype not in _BIAS_DTYPES:
            raise TypeError(f"bias must be float32, float16 or bfloat16, got {bias.dtype}")
        if bias.device != q.device:
            raise ValueError(f"bias must be on q's device {q.device}, got {bias.device}")
        shape4 = bias_broadcast_shape(bias.shape, batch, nheads, seqlen_q, seqlen_k)
        if shape4 is None:
            raise ValueError(
                f"bias of shape {tuple(bias.shape)} does not broadcast to (batch, nheads, seqlen_q, seqlen_k) = "
                f"({batch}, {nheads}, {seqlen_q}, {seqlen_k}); use e.g. (1, {nheads}, 1, {seqlen_k}) or "
                f"({batch}, 1, 1, {seqlen_k})"
            )
        bias_shape = tuple(bias.shape)
        bias4 = bias[(None,) * (4 - bias.dim())]
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {_type_name(causal)}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        # bool is an int: a misplaced causal flag would silently become scale 0 or 1.
        raise TypeError(f"softmax_scale must be a float or None, got {_type_name(softmax_scale)}")
    elif not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")
    slopes = None
    if alibi_slopes is not None:
        _tensor("alibi_slopes", alibi_slopes)
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes must be on q's device {q.device}, got {alibi_slopes.device}")
        if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
            raise ValueError(
                f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), got {tuple(alibi_slopes.shape)}"
            )
        if alibi_slopes.requires_grad:
            raise ValueError(
                "alibi_slopes must not require grad: the kernels treat slopes as constants and return no gradient "
                "for them; pass alibi_slopes.detach(), or a bias tensor if the ALiBi term must be learned"
            )
        slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes.unsqueeze(0)
    kpm = None
    if key_padding_mask is not None:
        _tensor("key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = keep), got {key_padding_mask.dtype}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {key_padding_mask.device}")
        if tuple(key_padding_mask.shape) != (batch, seqlen_k):
            raise ValueError(
                f"key_padding_mask must have shape (batch, seqlen_k) = ({batch}, {seqlen_k}), "
                f"got {tuple(key_padding_mask.shape)}"
            )
        # The kernels read one mask row with unit stride (it is small: copy if needed).
        kpm = key_padding_mask if key_padding_mask.stride(-1) == 1 else key_padding_mask.contiguous()
    return Inputs(
        q=_last_dim_unit(q),
        k=None,
        v=None,
        bias=bias4,
        bias_shape=bias_shape,
        causal=causal,
        softmax_scale=float(softmax_scale),
        alibi_slopes=slopes,
        key_padding_mask=kpm,
    )


def prepare(q, k, v, bias=None, causal=False, softmax_scale=None, alibi_slopes=None, key_padding_mask=None) -> Inputs:
    check_qkv(q, k, v)
    inputs = check_options(q, k, bias, causal, softmax_scale, alibi_slopes, key_padding_mask)
    inputs.k = _last_dim_unit(k)
    inputs.v = _last_dim_unit(v)
    return inputs


def unpack_qkv(qkv):
    _tensor("qkv", qkv)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
    if qkv.dtype not in _QKV_DTYPES:
        raise TypeError(f"qkv must be float16 or bfloat16, got {qkv.dtype}; cast with qkv.to(torch.bfloat16)")
    return qkv.unbind(2)


def unpack_kv(kv):
    _tensor("kv", kv)
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv must have shape (batch, seqlen_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    if kv.dtype not in _QKV_DTYPES:
        raise TypeError(f"kv must be float16 or bfloat16, got {kv.dtype}; cast with kv.to(torch.bfloat16)")
    return kv.unbind(2)


def _check_cu_seqlens(name, cu, total, device):
    _tensor(name, cu)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}; use {name}.to(torch.int32)")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must have shape (batch + 1,) with batch >= 1, got {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {cu.device}")
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    steps = [b - a for a, b in zip(values, values[1:])]
    if min(steps) < 0:
        i = steps.index(min(steps))
        raise ValueError(f"{name} must be non-decreasing, got {values[i]} then {values[i + 1]} at index {i}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of packed rows {total}, got {values[-1]}")
    return max(steps)


def contiguous_cu_seqlens(cu):
    """The kernels read cu_seqlens with unit stride."""
    return cu if cu.stride(0) == 1 else cu.contiguous()


def prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, alibi_slopes):
    """Validate a packed variable-length batch: q (total_q, h, d), k/v (total_k, h_k, d)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _tensor(name, x)
        if x.dim() != 3:
            raise ValueError(f"{name} must have rank 3 (total_tokens, nheads, headdim) for varlen, got shape {tuple(x.shape)}")
    check_qkv(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))
    longest_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    longest_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got {cu_seqlens_q.numel() - 1} "
            f"and {cu_seqlens_k.numel() - 1} sequences"
        )
    for name, given, longest in (("max_seqlen_q", max_seqlen_q, longest_q), ("max_seqlen_k", max_seqlen_k, longest_k)):
        if isinstance(given, bool) or not isinstance(given, int):
            raise TypeError(f"{name} must be an int, got {_type_name(given)}")
        if given < longest:
            raise ValueError(f"{name} ({given}) is smaller than the longest sequence ({longest})")
    batch = cu_seqlens_q.numel() - 1
    dummy_q = q.new_empty((batch, 1, q.shape[1], q.shape[2]))
    inputs = check_options(dummy_q, k.unsqueeze(0).expand(batch, -1, -1, -1), None, causal, softmax_scale, alibi_slopes, None)
    inputs.q, inputs.k, inputs.v = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v)
    return inputs
