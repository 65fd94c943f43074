"""tritonflash: FlashAttention in Triton with additive biases (and their gradients),
in-kernel ALiBi, key padding masks and grouped-query attention."""

from ._env import check_interpreter_numpy

# Under TRITON_INTERPRET=1 the kernels are defined for Triton's interpreter at import, which
# fails deep inside a launch with numpy >= 2.4: say so now, with the fix.
check_interpreter_numpy()

from . import ops  # noqa: E402,F401  (registers the torch.ops.tritonflash custom ops)
from .api import (  # noqa: E402
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from .autograd import FlashAttnFunc, FlashAttnKVPackedFunc, FlashAttnQKVPackedFunc, FlashAttnVarlenFunc  # noqa: E402
from .bias import build_alibi_bias, gen_slopes  # noqa: E402
from .kvcache import flash_attn_with_kvcache  # noqa: E402
from .lowlevel import _flash_attn_backward, _flash_attn_forward  # noqa: E402
from .padding import pad_input, unpad_input  # noqa: E402
from .reference import attention_ref  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
    "unpad_input",
    "pad_input",
    "FlashAttnFunc",
    "FlashAttnVarlenFunc",
    "FlashAttnQKVPackedFunc",
    "FlashAttnKVPackedFunc",
    "attention_ref",
    "gen_slopes",
    "build_alibi_bias",
    "_flash_attn_forward",
    "_flash_attn_backward",
]
