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
from .kernels.common import NO_FEATURES, Features

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
    features: Features = NO_FEATURES  # window, softcap, sinks, dropout (with its seed), attn_mask (rank 4)

    def reference_kwargs(self) -> dict:
        """The reference's keyword arguments for ``features`` (padded (b, s, h, d) layout)."""
        b, sq, h, _ = self.q.shape
        return reference_kwargs(self.features, (b, h, sq, self.k.shape[1]))


def reference_kwargs(features: Features, shape=None) -> dict:
    """``attention_ref``'s keywords for ``features``; with ``shape`` = (batch, nheads, seqlen_q,
    seqlen_k) the dropout mask is rebuilt from the seed (``reference.dropout_keep_mask``, a host
    read: the CPU reference and the double-backward paths only)."""
    from .reference import dropout_keep_mask

    mask = None
    if features.dropout_p > 0.0 and features.seed is not None and shape is not None:
        mask = dropout_keep_mask(features.seed, shape, features.dropout_p, device=features.seed.device)
    return dict(window_size=features.window, softcap=features.softcap, sinks=features.sinks, dropout_p=features.dropout_p,
                dropout_mask=mask, attn_mask=features.attn_mask)


def type_name(x):
    # Qualified outside builtins: numpy.bool would otherwise read as "bool".
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type_name(x)}")


def _last_dim_unit(x):
    # Kernels read the head dim as contiguous vectors; a strided last dim is copied once.
    return x if x.stride(-1) == 1 else x.contiguous()


def check_qkv(q, k, v, shown=None):
    """Validate q (b, sq, h, d) and k, v (b, sk, h_k, d). ``shown`` maps a tensor to the shape
    that messages print (the varlen check passes views with a leading 1 that the user did not
    write)."""
    shown = shown or (lambda x: tuple(x.shape))
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
        if x.dtype not in _QKV_DTYPES:
            raise TypeError(f"{name} must be float16 or bfloat16, got {x.dtype}; cast with {name}.to(torch.bfloat16)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {shown(k)} and v {shown(v)}")
    batch, _, nheads, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k and v must have q's batch size {batch}, got {k.shape[0]}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k and v must have q's head dim {head_dim}, got {k.shape[3]}")
    if not 1 <= head_dim <= MAX_HEADDIM:
        raise ValueError(f"head dim (last dim of q, k and v) must be between 1 and {MAX_HEADDIM}, got {head_dim}")
    nheads_k = k.shape[2]
    if nheads_k < 1 or nheads % nheads_k != 0:
        raise ValueError(
            f"q's nheads ({nheads}) must be a multiple of k/v's nheads ({nheads_k}) "
            "(grouped-query attention); got k/v with shape " + str(shown(k))
        )


def check_bool(name, x) -> None:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type_name(x)}")


def _finite(x) -> bool:
    """math.isfinite by comparisons, which torch.compile traces on a symbolic float (a
    SymFloat argument under dynamic=True: math.isfinite breaks the graph); NaN fails both."""
    return -math.inf < x < math.inf


def check_softmax_scale(softmax_scale, name="softmax_scale") -> None:
    """None (1 / sqrt(head_dim)) or a finite real number."""
    if softmax_scale is None:
        return
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        # bool is an int: a misplaced causal flag would silently become scale 0 or 1.
        raise TypeError(f"{name} must be a float or None, got {type_name(softmax_scale)}")
    if not _finite(softmax_scale):
        raise ValueError(f"{name} must be a finite number or None, got {softmax_scale!r}")


def host_sync_allowed(x: torch.Tensor) -> bool:
    """Whether a check may read ``x``'s values on the host. Not while a CUDA graph is being
    captured (a device-to-host copy would break the capture) nor under torch.compile tracing
    (it would break the graph): such checks are skipped there."""
    if torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def needs_dispatch(args) -> bool:
    """Whether a call must go through its custom op (ops.py) rather than the op's Python
    implementation: while torch.compile, export or make_fx trace (a dispatch mode is active),
    while torch.jit.trace records (the op is what it can record), while the autograd profiler
    runs (its traces show the op), inside a torch.func transform, or with a tensor subclass
    other than Parameter, or a meta tensor, among ``args``. The op and its implementation
    compute the same; the op adds the dispatcher's tens of microseconds a call, which eager
    calls skip. A user's TorchFunctionMode is not a reason (torch.set_default_device installs
    one for good): it sees the implementation's torch calls (docs/semantics.md)."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._are_functorch_transforms_active() or torch.jit.is_tracing()
            or torch.autograd.profiler._is_profiler_enabled):
        return True
    return any(isinstance(x, torch.Tensor) and (type(x) not in _PLAIN_TENSORS or x.is_meta) for x in args)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _slopes_unchecked(alibi_slopes) -> bool:
    # Inference tensors (torch.inference_mode) have no version counter: checked every call.
    if alibi_slopes.is_inference():
        return True
    return getattr(alibi_slopes, "_tritonflash_finite_version", None) != alibi_slopes._version


def check_alibi_slopes(alibi_slopes, batch, nheads, device, check_finite=True) -> torch.Tensor:
    """Validate ALiBi slopes: a float32 tensor of shape (nheads,) or (batch, nheads) on ``device``,
    not requiring grad, every entry finite. Returns the (1 or batch, nheads) view the kernels
    index. The finiteness check reads the slopes on the host (one device-to-host copy), once per
    tensor object and version (in-place changes are checked again); it is skipped while a CUDA
    graph is captured and under torch.compile tracing (host_sync_allowed), and with
    ``check_finite=False`` by a caller that hands the slopes to a checking function."""
    check_tensor("alibi_slopes", alibi_slopes)
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes must be on q's device {device}, got {alibi_slopes.device}")
    if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
        raise ValueError(f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.requires_grad:
        raise ValueError(
            "alibi_slopes must not require grad: the kernels treat slopes as constants and return no gradient "
            "for them; pass alibi_slopes.detach(), or a bias tensor if the ALiBi term must be learned"
        )
    if check_finite and host_sync_allowed(alibi_slopes) and _slopes_unchecked(alibi_slopes):
        bad = ~torch.isfinite(alibi_slopes)
        if bad.any():
            index = tuple(bad.nonzero()[0].tolist())
            raise ValueError(f"alibi_slopes must be finite, got {alibi_slopes[index].item()} at index {index}")
        # Checked once per tensor and version: a model passes the same slopes every call, and a
        # device-to-host copy per call stalls the launch queue (ALiBi at 1k: 0.22 -> 0.40 ms a
        # forward on an H200). An in-place change bumps the version and is checked again.
        if not alibi_slopes.is_inference():
            alibi_slopes._tritonflash_finite_version = alibi_slopes._version
    return alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes.unsqueeze(0)


def _check_broadcast(name, x, full, device, key_dim="seqlen_k", hint="") -> None:
    """``x`` on ``device`` and broadcastable to ``full`` = (batch, nheads, seqlen_q, <key_dim>)."""
    if x.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {x.device}")
    if bias_broadcast_shape(x.shape, *full) is None:
        raise ValueError(f"{name} of shape {tuple(x.shape)} does not broadcast to (batch, nheads, seqlen_q, {key_dim}) = "
                         f"({', '.join(map(str, full))}){hint}")


def check_bias(bias, full, device, key_dim="seqlen_k") -> None:
    """An additive bias: fp32/fp16/bf16, broadcastable to ``full`` = (batch, nheads, seqlen_q,
    seqlen_k) (``key_dim`` names the last dim in messages)."""
    check_tensor("bias", bias)
    if bias.dtype not in _BIAS_DTYPES:
        raise TypeError(f"bias must be float32, float16 or bfloat16, got {bias.dtype}")
    batch, nheads, _, seqlen_k = full
    _check_broadcast("bias", bias, full, device, key_dim,
                     f"; use e.g. (1, {nheads}, 1, {seqlen_k}) or ({batch}, 1, 1, {seqlen_k})")


def check_options(sizes, device, bias, causal, softmax_scale, alibi_slopes, key_padding_mask) -> None:
    """Validate the optional arguments against ``sizes`` = (batch, seqlen_q, seqlen_k, nheads,
    head_dim) on ``device``."""
    batch, seqlen_q, seqlen_k, nheads, head_dim = sizes
    if bias is not None:
        check_bias(bias, (batch, nheads, seqlen_q, seqlen_k), device)
    check_bool("causal", causal)
    check_softmax_scale(softmax_scale)
    if alibi_slopes is not None:
        check_alibi_slopes(alibi_slopes, batch, nheads, device)
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = keep), got {key_padding_mask.dtype}")
        if key_padding_mask.device != device:
            raise ValueError(f"key_padding_mask must be on q's device {device}, got {key_padding_mask.device}")
        if tuple(key_padding_mask.shape) != (batch, seqlen_k):
            raise ValueError(
                f"key_padding_mask must have shape (batch, seqlen_k) = ({batch}, {seqlen_k}), "
                f"got {tuple(key_padding_mask.shape)}"
            )


def check_dropout(dropout_p) -> None:
    """dropout_p: a number in [0, 1)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        # bool is an int: a causal flag one position too early would read as dropout 0 or 1.
        raise TypeError(f"dropout_p must be a float, got {type_name(dropout_p)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def draw_dropout_seed(dropout_p, device) -> torch.Tensor | None:
    """The dropout seed of one call, (1,) int64 on ``device``, drawn from that device's default
    generator (``torch.manual_seed`` reproduces it; no host sync; CUDA-graph safe); None
    without dropout. Validates ``dropout_p`` first."""
    check_dropout(dropout_p)
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def check_window(window_size, causal) -> tuple:
    """(left, right) ints >= -1 (-1 = unbounded); with causal, right must be -1 or 0 (causal
    means right = 0). Returns a tuple of ints."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of ints, -1 = unbounded; got {window_size!r}")
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window_size {side} must be an int (-1 = unbounded), got {type_name(w)}")
        if w < -1:
            raise ValueError(f"window_size {side} must be >= -1 (-1 = unbounded), got {w}")
    left, right = int(window_size[0]), int(window_size[1])
    if causal and right > 0:
        raise ValueError(
            f"causal=True means window_size right = 0, got window_size={tuple(window_size)}; pass causal=False with "
            f"window_size=({left}, {right}) for a window that sees {right} keys past the diagonal"
        )
    return left, right


def check_softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a float (0.0 = off), got {type_name(softcap)}")
    if not (_finite(softcap) and softcap >= 0.0):
        raise ValueError(f"softcap must be a finite number >= 0 (0.0 = off), got {softcap!r}")
    return float(softcap)


def check_sinks(sinks, nheads, device) -> None:
    check_tensor("sinks", sinks)
    if sinks.dtype != torch.float32:
        raise TypeError(f"sinks must be float32, got {sinks.dtype}")
    if tuple(sinks.shape) != (nheads,):
        raise ValueError(f"sinks must have shape (nheads,) = ({nheads},), got {tuple(sinks.shape)}")
    if sinks.device != device:
        raise ValueError(f"sinks must be on q's device {device}, got {sinks.device}")


def check_attn_mask(attn_mask, sizes, device) -> None:
    batch, seqlen_q, seqlen_k, nheads, _ = sizes
    check_tensor("attn_mask", attn_mask)
    if attn_mask.dtype != torch.bool:
        raise TypeError(
            f"attn_mask must be bool (True = attend, as in scaled_dot_product_attention), got {attn_mask.dtype}; "
            "pass an additive float mask as bias"
        )
    _check_broadcast("attn_mask", attn_mask, (batch, nheads, seqlen_q, seqlen_k), device)


def check_features(sizes, device, causal, window_size=(-1, -1), softcap=0.0, sinks=None, dropout_p=0.0, dropout_seed=None,
                   attn_mask=None) -> Features:
    """Validate the score features against ``sizes`` = (batch, seqlen_q, seqlen_k, nheads,
    head_dim) and return them normalised (``dropout_seed`` as ``draw_dropout_seed`` gives it;
    drawn here when missing)."""
    window = check_window(window_size, causal)
    softcap = check_softcap(softcap)
    if sinks is not None:
        check_sinks(sinks, sizes[3], device)
    check_dropout(dropout_p)
    if dropout_p > 0.0:
        if dropout_seed is None:
            dropout_seed = draw_dropout_seed(dropout_p, device)
        check_tensor("dropout_seed", dropout_seed)
        if dropout_seed.dtype != torch.int64 or dropout_seed.numel() != 1 or dropout_seed.device != device:
            raise ValueError(f"dropout_seed must be a one-element int64 tensor on {device}, got {dropout_seed.dtype} "
                             f"{tuple(dropout_seed.shape)} on {dropout_seed.device}")
    else:
        dropout_seed = None
    if attn_mask is not None:
        check_attn_mask(attn_mask, sizes, device)
        attn_mask = attn_mask[(None,) * (4 - attn_mask.dim())]
    return Features(window=window, softcap=softcap, sinks=sinks, dropout_p=float(dropout_p), seed=dropout_seed,
                    attn_mask=attn_mask)


def normalise(q, k, v, bias=None, causal=False, softmax_scale=None, alibi_slopes=None, key_padding_mask=None,
              features: Features = NO_FEATURES) -> Inputs:
    """The kernels' view of inputs that were validated already: no checks and no host reads, so
    the backward rebuilds it from the saved inputs. Works for (b, s, h, d) and varlen
    (total, h, d) layouts alike."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes.unsqueeze(0)
    kpm = None
    if key_padding_mask is not None:
        # The kernels read one mask row with unit stride (it is small: copy if needed).
        kpm = key_padding_mask if key_padding_mask.stride(-1) == 1 else key_padding_mask.contiguous()
    return Inputs(
        q=_last_dim_unit(q),
        k=_last_dim_unit(k),
        v=_last_dim_unit(v),
        bias=None if bias is None else bias[(None,) * (4 - bias.dim())],
        bias_shape=None if bias is None else tuple(bias.shape),
        causal=causal,
        softmax_scale=float(softmax_scale),
        alibi_slopes=slopes,
        key_padding_mask=kpm,
        features=features,
    )


def prepare(q, k, v, bias=None, causal=False, softmax_scale=None, alibi_slopes=None, key_padding_mask=None, **features) -> Inputs:
    """Validate (b, s, h, d) inputs and return the kernels' view of them; ``features`` are
    ``check_features``'s keywords."""
    check_qkv(q, k, v)
    batch, seqlen_q, nheads, head_dim = q.shape
    if seqlen_q < 1 or k.shape[1] < 1:
        raise ValueError(f"seqlen_q and seqlen_k must be >= 1, got {seqlen_q} and {k.shape[1]}")
    sizes = (batch, seqlen_q, k.shape[1], nheads, head_dim)
    check_options(sizes, q.device, bias, causal, softmax_scale, alibi_slopes, key_padding_mask)
    feats = check_features(sizes, q.device, causal, **features)
    return normalise(q, k, v, bias, causal, softmax_scale, alibi_slopes, key_padding_mask, feats)


def _unpack(name, x, layout):
    """Split a packed tensor into views along its one integer entry of ``layout``."""
    check_tensor(name, x)
    axis = next(i for i, dim in enumerate(layout) if isinstance(dim, int))
    if x.dim() != len(layout) or x.shape[axis] != layout[axis]:
        raise ValueError(f"{name} must have shape ({', '.join(map(str, layout))}), got {tuple(x.shape)}")
    if x.dtype not in _QKV_DTYPES:
        raise TypeError(f"{name} must be float16 or bfloat16, got {x.dtype}; cast with {name}.to(torch.bfloat16)")
    return x.unbind(axis)


def unpack_qkv(qkv):
    return _unpack("qkv", qkv, ("batch", "seqlen", 3, "nheads", "headdim"))


def unpack_kv(kv):
    return _unpack("kv", kv, ("batch", "seqlen_k", 2, "nheads_k", "headdim"))


def unpack_varlen_qkv(qkv):
    return _unpack("qkv", qkv, ("total_tokens", 3, "nheads", "headdim"))


def unpack_varlen_kv(kv):
    return _unpack("kv", kv, ("total_tokens", 2, "nheads_k", "headdim"))


def _check_cu_seqlens(name, cu, total, device, read_values=True):
    """Validate one cu_seqlens tensor; returns its longest sequence, read on the host (one
    device-to-host copy), or None with ``read_values=False`` (compiled path, CUDA graph capture,
    ``validate=False``): then only its dtype, rank and device are checked."""
    check_tensor(name, cu)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}; use {name}.to(torch.int32)")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must have shape (batch + 1,) with batch >= 1, got {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {cu.device}")
    if not read_values:
        return None
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


def prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal, softmax_scale,
                   alibi_slopes, validate=True, **features):
    """Validate a packed variable-length batch: q (total_q, h, d), k/v (total_k, h_k, d), every
    sequence (all of them, too) may be empty. Returns (Inputs, launch_q, launch_k), the
    sequence lengths that size the launch.

    The contents of ``cu_seqlens_q/k`` (start 0, non-decreasing, last = total rows,
    ``max_seqlen`` >= the longest sequence) are checked on the host -- two device-to-host
    copies -- and the launch is then sized by the longest sequences read there. Under
    torch.compile tracing, during CUDA graph capture (``host_sync_allowed``) and with
    ``validate=False`` they are not read: the launch is sized by ``max_seqlen_q/k`` as given,
    which must then be at least the longest sequence (a smaller value computes a wrong result
    for the longer sequences)."""
    check_bool("validate", validate)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
        if x.dim() != 3:
            raise ValueError(f"{name} must have rank 3 (total_tokens, nheads, headdim) for varlen, got shape {tuple(x.shape)}")
    check_qkv(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), shown=lambda x: tuple(x.shape[1:]))
    read = validate and isinstance(cu_seqlens_q, torch.Tensor) and host_sync_allowed(cu_seqlens_q)
    longest_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, read)
    longest_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, read)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got {cu_seqlens_q.numel() - 1} "
            f"and {cu_seqlens_k.numel() - 1} sequences"
        )
    for name, given, longest in (("max_seqlen_q", max_seqlen_q, longest_q), ("max_seqlen_k", max_seqlen_k, longest_k)):
        if isinstance(given, bool) or not isinstance(given, (numbers.Integral, torch.SymInt)):
            raise TypeError(f"{name} must be an int, got {type_name(given)}")
        if longest is None and given < 0:
            raise ValueError(f"{name} must be >= 0, got {given}")
        if longest is not None and given < longest:
            raise ValueError(f"{name} ({given}) is smaller than the longest sequence ({longest})")
    launch_q = max_seqlen_q if longest_q is None else longest_q
    launch_k = max_seqlen_k if longest_k is None else longest_k
    sizes = (cu_seqlens_q.numel() - 1, launch_q, launch_k, q.shape[1], q.shape[2])
    check_options(sizes, q.device, None, causal, softmax_scale, alibi_slopes, None)
    feats = check_features(sizes, q.device, causal, dropout_p=dropout_p, **features)
    return normalise(q, k, v, None, causal, softmax_scale, alibi_slopes, None, feats), launch_q, launch_k
