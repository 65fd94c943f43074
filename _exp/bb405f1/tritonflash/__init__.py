"""tritonflash: FlashAttention in Triton with additive biases (and their gradients),
in-kernel ALiBi, key padding masks and grouped-query attention."""

from .api import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from .autograd import FlashAttnFunc, FlashAttnKVPackedFunc, FlashAttnQKVPackedFunc, FlashAttnVarlenFunc
from .bias import build_alibi_bias, gen_slopes
from .padding import pad_input, unpad_input
from .reference import attention_ref

__version__ = "0.1.0"

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "unpad_input",
    "pad_input",
    "FlashAttnFunc",
    "FlashAttnVarlenFunc",
    "FlashAttnQKVPackedFunc",
    "FlashAttnKVPackedFunc",
    "attention_ref",
    "gen_slopes",
    "build_alibi_bias",
]
