"""MPT-style attention layers on three backends: 'torch' (eager), 'flash' (PyTorch SDPA) and
'triton' (tritonflash), with ALiBi, prefix-LM and sequence-id bias builders."""

from .attention import ATTN_CLASS_REGISTRY, GroupedQueryAttention, MultiheadAttention, MultiQueryAttention
from .attn_bias import (
    ATTN_IMPLS,
    MASK_VALUE,
    apply_prefix_lm_mask,
    apply_sequence_id_mask,
    attn_bias_shape,
    build_alibi_bias,
    build_attn_bias,
    gen_slopes,
    slice_attn_bias,
)
from .backends import ATTN_FNS, flash_attn_fn, scaled_multihead_dot_product_attention, triton_compute_dtype, triton_flash_attn_fn

__all__ = [
    "GroupedQueryAttention",
    "MultiheadAttention",
    "MultiQueryAttention",
    "ATTN_CLASS_REGISTRY",
    "ATTN_FNS",
    "ATTN_IMPLS",
    "MASK_VALUE",
    "scaled_multihead_dot_product_attention",
    "flash_attn_fn",
    "triton_flash_attn_fn",
    "triton_compute_dtype",
    "gen_slopes",
    "build_alibi_bias",
    "attn_bias_shape",
    "build_attn_bias",
    "apply_prefix_lm_mask",
    "apply_sequence_id_mask",
    "slice_attn_bias",
]
