"""Regressions found reviewing issue 12's score features (window, softcap, sinks, dropout,
attn_mask): each test failed before its fix."""

from __future__ import annotations

import torch

from conftest import DEVICE
from helpers import check_against_reference, make_qkv
from tritonflash import flash_attn_func

F16 = torch.float16


def test_softcap_nan_in_invisible_key_never_reaches_gradients():
    """Key 0 is outside every row's window but inside a visited key block, and holds NaN. The
    cap's derivative (1 - tanh^2) of its NaN q.k was multiplied into dS after the mask had
    zeroed dS: 0 * NaN made dq of the rows of that block and dk of key 0 NaN."""
    q, k, v = make_qkv(1, 20, 40, 2, 16, F16, DEVICE)
    with torch.no_grad():
        k[0, 0] = float("nan")
        v[0, 0] = float("nan")
    feats = dict(window_size=(4, 0), softcap=2.0)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True, **feats)
    check_against_reference(out, q, k, v, torch.randn_like(out), causal=True, lse=lse, **feats)
