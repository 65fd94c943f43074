"""``flash_attn_with_kvcache``: attention of a few new query rows over a KV cache (inference).

flash-attn 2's names and meaning, keyword-only after ``v``. The exact rules are in
docs/semantics.md ("KV-cache decoding") and in ``reference.kvcache_attention_ref``, which also
runs CPU tensors (unless ``TRITON_INTERPRET=1``, where the decode kernel runs in the
interpreter). CUDA tensors run ``kernels.decode`` (split-KV, paged caches).
"""

from __future__ import annotations

import numbers

import torch

from . import ops
from ._env import interpreter_requested
from .checks import (
    _QKV_DTYPES,
    MAX_HEADDIM,
    check_alibi_slopes,
    check_bias,
    check_bool,
    check_sinks,
    check_softcap,
    check_softmax_scale,
    check_tensor,
    check_window,
    host_sync_allowed,
    needs_dispatch,
    normalise,
    type_name,
)
from .kernels.common import Features

__all__ = ["flash_attn_with_kvcache"]

PAGE_MULTIPLE = 16


def _check_index_tensor(name, x, shape, device):
    check_tensor(name, x)
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {x.dtype}; use {name}.to(torch.int32)")
    if x.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {x.device}")
    if x.dim() != len(shape) or any(want is not None and have != want for have, want in zip(x.shape, shape)):
        shown = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape ({shown}{',' if len(shape) == 1 else ''}), got {tuple(x.shape)}")


def _check_int(name, x, minimum=0):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type_name(x)}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")


def _prepare(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, softmax_scale, causal, window_size,
             softcap, alibi_slopes, bias, sinks, num_splits, return_lse, validate=True):
    """Validate every argument (typed errors naming it) and return the normalised pieces."""
    check_bool("validate", validate)
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must have rank 4, got shape {tuple(x.shape)}")
        if x.dtype not in _QKV_DTYPES:
            raise TypeError(f"{name} must be float16 or bfloat16, got {x.dtype}")
    device = q.device
    batch, seqlen_q, nheads, head_dim = q.shape
    if seqlen_q < 1 or batch < 1:
        raise ValueError(f"q must have batch >= 1 and seqlen_q >= 1, got shape {tuple(q.shape)}")
    if not 1 <= head_dim <= MAX_HEADDIM:
        raise ValueError(f"head dim (last dim of q) must be between 1 and {MAX_HEADDIM}, got {head_dim}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != device:
            raise ValueError(f"{name} must be on q's device {device}, got {x.device}")
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride on its last (head) dim: it is written in place; got strides {x.stride()}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    nheads_k = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache and v_cache must have q's head dim {head_dim}, got {k_cache.shape[3]}")
    if nheads_k < 1 or nheads % nheads_k != 0:
        raise ValueError(f"q's nheads ({nheads}) must be a multiple of the cache's nheads_k ({nheads_k}), got k_cache {tuple(k_cache.shape)}")

    if block_table is not None:
        _check_index_tensor("block_table", block_table, (batch, None), device)
        if block_table.shape[1] < 1:
            raise ValueError(f"block_table must have at least one column, got shape {tuple(block_table.shape)}")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table: a paged cache maps sequences to blocks "
                             "through block_table's rows")
        page = k_cache.shape[1]
        if page < PAGE_MULTIPLE or page % PAGE_MULTIPLE:
            raise ValueError(f"a paged k_cache (num_blocks, block_size, nheads_k, d) needs block_size a multiple of {PAGE_MULTIPLE}, "
                             f"got block_size {page}")
        capacity = block_table.shape[1] * page
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is not None:
            _check_index_tensor("cache_batch_idx", cache_batch_idx, (batch,), device)
        elif k_cache.shape[0] != batch:
            raise ValueError(f"k_cache's batch ({k_cache.shape[0]}) must equal q's ({batch}) unless cache_batch_idx maps "
                             "sequences to cache rows")

    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new tokens to append) or both be None")
    s_new = 0
    if k is not None:
        for name, x in (("k", k), ("v", v)):
            check_tensor(name, x)
            if x.dtype != q.dtype:
                raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
            if x.device != device:
                raise ValueError(f"{name} must be on q's device {device}, got {x.device}")
            if x.dim() != 4 or (x.shape[0], x.shape[2], x.shape[3]) != (batch, nheads_k, head_dim):
                raise ValueError(f"{name} must have shape (batch, seqlen_new, nheads_k, headdim) = ({batch}, seqlen_new, {nheads_k}, "
                                 f"{head_dim}), got {tuple(x.shape)}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        s_new = k.shape[1]

    if cache_seqlens is None:
        if s_new:
            raise ValueError("cache_seqlens=None means the cache is full (every slot valid): there is no room to append k and v; "
                             "pass cache_seqlens")
        seqlens, host_lengths = torch.full((batch,), capacity, dtype=torch.int32, device=device), [capacity] * batch
    elif isinstance(cache_seqlens, torch.Tensor):
        _check_index_tensor("cache_seqlens", cache_seqlens, (batch,), device)
        seqlens, host_lengths = cache_seqlens, None
        if validate and host_sync_allowed(cache_seqlens):
            host_lengths = cache_seqlens.tolist()
    else:
        _check_int("cache_seqlens", cache_seqlens)
        seqlens, host_lengths = torch.full((batch,), int(cache_seqlens), dtype=torch.int32, device=device), [int(cache_seqlens)] * batch
    if host_lengths is not None:
        for b, n in enumerate(host_lengths):
            if n < 0 or n + s_new > capacity:
                raise ValueError(f"cache_seqlens[{b}] + seqlen_new = {n} + {s_new} must be between 0 and the cache's capacity "
                                 f"{capacity}" + (" (max_blocks * block_size)" if block_table is not None else " (seqlen_cache)"))

    # Index contents: read on the host only in eager mode (not under torch.compile tracing nor
    # during CUDA graph capture, where they are trusted).
    if validate and cache_batch_idx is not None and host_sync_allowed(cache_batch_idx):
        rows = cache_batch_idx.tolist()
        bad = [r for r in rows if not 0 <= r < k_cache.shape[0]]
        if bad:
            raise ValueError(f"cache_batch_idx entries must be in [0, {k_cache.shape[0]}) (k_cache's batch), got {bad[0]}")
        if s_new and len(set(rows)) != len(rows):
            raise ValueError("cache_batch_idx must not repeat a cache row when k and v are appended (two sequences would write "
                             f"the same slots), got {rows}")
    if validate and block_table is not None and host_lengths is not None and host_sync_allowed(block_table):
        page, num_blocks = k_cache.shape[1], k_cache.shape[0]
        table = block_table.tolist()
        for b, n in enumerate(host_lengths):
            used = -(-(n + s_new) // page)
            for i, blk in enumerate(table[b][:used]):
                if not 0 <= blk < num_blocks:
                    raise ValueError(f"block_table[{b}, {i}] = {blk} is out of range [0, {num_blocks}) (k_cache's num_blocks); "
                                     f"sequence {b} uses its first {used} entries")

    check_bool("causal", causal)
    check_softmax_scale(softmax_scale)
    window = check_window(window_size, causal)
    softcap = check_softcap(softcap)
    if alibi_slopes is not None:
        check_alibi_slopes(alibi_slopes, batch, nheads, device)
    if sinks is not None:
        check_sinks(sinks, nheads, device)
    if bias is not None:
        check_bias(bias, (batch, nheads, seqlen_q, capacity), device, key_dim="seqlen_cache")
    _check_int("num_splits", num_splits)
    check_bool("return_lse", return_lse)
    if torch.is_grad_enabled():
        for name, x in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("bias", bias), ("sinks", sinks)):
            if x is not None and x.requires_grad:
                raise NotImplementedError(f"flash_attn_with_kvcache is inference only (no backward); {name} requires grad: run it "
                                          "under torch.no_grad() or torch.inference_mode(), or pass detached tensors")
    scale = 1.0 / head_dim**0.5 if softmax_scale is None else float(softmax_scale)
    return dict(seqlens=seqlens, s_new=s_new, scale=scale, window=window, softcap=softcap, host_lengths=host_lengths)


def _append(k_cache, v_cache, k, v, seqlens, cache_batch_idx, block_table):
    """Write the new tokens in place: token t of sequence b at logical position seqlens[b] + t
    (row cache_batch_idx[b] of a contiguous cache, or slot pos % block_size of block
    block_table[b, pos // block_size]). Device-side index ops, no host read."""
    batch, s_new = k.shape[:2]
    pos = seqlens.long()[:, None] + torch.arange(s_new, device=k.device)[None, :]  # (b, s_new)
    if block_table is None:
        rows = torch.arange(batch, device=k.device) if cache_batch_idx is None else cache_batch_idx.long()
        index = (rows[:, None].expand(batch, s_new), pos)
    else:
        page = k_cache.shape[1]
        index = (block_table.long().gather(1, pos // page), pos % page)
    k_cache.index_put_(index, k)
    v_cache.index_put_(index, v)


def flash_attn_with_kvcache(
    q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None, cache_batch_idx=None, block_table=None, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, bias=None, sinks=None, num_splits=0, return_lse=False,
    validate=True,
):
    """Attention of q over a KV cache, with an optional in-place append of new keys/values.

    q (batch, seqlen_q, nheads, d) fp16/bf16 (seqlen_q > 1 allowed: speculative decoding,
    chunked prefill). k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, d), or paged
    (num_blocks, block_size, nheads_k, d) with ``block_table`` (batch, max_blocks) int32
    (block_size a multiple of 16). ``cache_seqlens``: int or (batch,) int32, valid tokens per
    sequence before this call (None: the whole cache). ``k``/``v`` (batch, seqlen_new, nheads_k, d):
    written into the caches in place at positions cache_seqlens .. cache_seqlens + seqlen_new
    and attended to (``cache_seqlens`` itself is not updated: the caller adds seqlen_new).
    ``cache_batch_idx`` (batch,) int32: the cache row of each sequence (contiguous caches only).

    Sequence b attends to its L = cache_seqlens[b] + seqlen_new keys; keys at or past L are never
    read into the result (their memory may hold anything, NaN included). causal, window_size and
    ALiBi are aligned to L: query i sees key j iff j <= i + L - seqlen_q (the window rule with L
    for seqlen_k). ``bias`` broadcastable to (batch, nheads, seqlen_q, seqlen_cache) (paged:
    seqlen_cache = max_blocks * block_size), columns = logical key positions. softcap, sinks,
    alibi_slopes as in ``flash_attn_func``. ``num_splits``: key-range splits (0 = chosen from
    batch * nheads_k, the cache length and the SM count); the result is deterministic for a
    given num_splits. Returns out (batch, seqlen_q, nheads, d) in q's dtype, and lse
    (batch, nheads, seqlen_q) fp32 with ``return_lse``.

    Inference only: no autograd (inputs requiring grad raise NotImplementedError while grad
    mode is on). Index contents (cache_seqlens bounds, cache_batch_idx, the used block_table
    entries) are checked on the host in eager mode only (one device-to-host copy each), not
    under torch.compile tracing nor during CUDA graph capture nor with ``validate=False``
    (a caller that built the indices itself), where out-of-range values are undefined
    behaviour.

    torch.compile: the attention is the custom op ``tritonflash::fwd_kvcache`` (opaque, no host
    read), the append plain in-place torch ops before it; ``torch.compile(fullgraph=True)`` of a
    decode step compiles with no graph break. With ``num_splits=0`` the split count depends on
    the longest L when it is known on the host (an int ``cache_seqlens``, or a tensor read for
    validation in eager mode), else on the capacity, so eager and compiled calls may split
    differently (results within tolerance, not bitwise): pass ``num_splits`` for bitwise
    agreement."""
    tensors = (q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, alibi_slopes, bias, sinks)
    if not torch.compiler.is_compiling() and any(
            isinstance(x, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x) for x in tensors):
        # Before validation: its host reads cannot run on a vmapped tensor ("data-dependent
        # control flow"), and the kernels must never see one. (Under torch.compile, the op's
        # own vmap rule refuses.)
        raise NotImplementedError(
            "torch.func transforms (vmap, grad, ...) over flash_attn_with_kvcache are not supported: it is inference only and "
            "batches over its own batch dimension; fold a vmapped dimension into batch (x.flatten(0, 1) and back) or loop")
    p = _prepare(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, softmax_scale, causal, window_size,
                 softcap, alibi_slopes, bias, sinks, num_splits, return_lse, validate)
    with torch.no_grad():
        # The append is plain torch (index_put_ on the caches), outside the op: torch.compile
        # traces it as an in-place update of its inputs; the op only reads the caches.
        if k is not None and p["s_new"] > 0:
            _append(k_cache, v_cache, k, v, p["seqlens"], cache_batch_idx, block_table)
        seqlens_k = p["seqlens"] + p["s_new"] if p["s_new"] else p["seqlens"]
        max_keys = -1 if p["host_lengths"] is None else max(p["host_lengths"]) + p["s_new"]
        # Eager calls skip the custom op's dispatch (tens of microseconds a step, the same
        # function underneath); traced calls go through the opaque op and its fake registration.
        fwd = ops.fwd_kvcache if needs_dispatch(tensors) else _forward
        out, lse = fwd(q, k_cache, v_cache, seqlens_k, cache_batch_idx, block_table, bias, alibi_slopes, sinks, causal,
                       p["scale"], p["window"][0], p["window"][1], p["softcap"], num_splits, max_keys)
    return (out, lse) if return_lse else out


def _forward(q, k_cache, v_cache, seqlens_k, cache_batch_idx, block_table, bias, alibi_slopes, sinks, causal, scale,
             window_left, window_right, softcap, num_splits, max_keys):
    """The unchecked half, run by the op ``tritonflash::fwd_kvcache`` on validated inputs whose
    caches already hold the appended tokens; ``seqlens_k`` (b,) int32 = L, ``max_keys`` a host
    bound on L or -1. Returns out (b, sq, h, d) in q's dtype and lse (b, h, sq) fp32, new tensors."""
    window = (window_left, window_right)
    if not (q.is_cuda or interpreter_requested()):
        from .reference import kvcache_attention_ref

        out, lse = kvcache_attention_ref(q, k_cache, v_cache, cache_seqlens=seqlens_k, cache_batch_idx=cache_batch_idx,
                                         block_table=block_table, softmax_scale=scale, causal=causal, window_size=window,
                                         softcap=softcap, alibi_slopes=alibi_slopes, bias=bias, sinks=sinks, return_lse=True)
        return out.contiguous(), lse.float().contiguous()
    from .kernels.decode import attn_decode

    # The kernels' view of q, bias and slopes (the caches have a unit last stride already).
    inp = normalise(q, k_cache, v_cache, bias, causal, scale, alibi_slopes)
    # The kernel reads seqlens_k[b] and cache_batch_idx[b] at offset b: a strided or expanded
    # index tensor (a column of a (batch, n) tensor, lengths.expand(batch)) needs a packed copy.
    seqlens_k = seqlens_k.contiguous()
    cache_batch_idx = None if cache_batch_idx is None else cache_batch_idx.contiguous()
    features = Features(window=window, softcap=softcap, sinks=None if sinks is None else sinks.contiguous())
    return attn_decode(inp.q, k_cache, v_cache, seqlens_k, cache_batch_idx, block_table, inp.bias, inp.alibi_slopes, causal, scale,
                       features, num_splits=num_splits, max_keys=None if max_keys < 0 else max_keys)
