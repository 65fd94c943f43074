"""tritonflash.integrations.transformers with the attention variants of issue 12: Gemma 2
(softcap, sliding window), gpt-oss (sinks), training dropout and boolean masks as attn_mask=.
Each test skips while flash_attn_func lacks the argument it needs. Same rule as tests/test_hf.py."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tritonflash.api  # noqa: E402
from conftest import DEVICE, ON_GPU  # noqa: E402
from test_hf import LP, _check, _forward_backward, _spy  # noqa: E402
from tritonflash.integrations import transformers as tfhf  # noqa: E402

PARAMS = inspect.signature(tritonflash.api.flash_attn_func).parameters
HID, HEADS, SEQ, VOCAB = (512, 8, 96, 1000) if ON_GPU else (64, 2, 12, 101)
WINDOW = SEQ // 2


def needs(*names):
    missing = [n for n in names if n not in PARAMS]
    return pytest.mark.skipif(bool(missing), reason=f"flash_attn_func has no {', '.join(missing)} yet (issue 12)")


def _config(family):
    if family == "gemma2":
        return transformers.Gemma2Config(
            hidden_size=HID, intermediate_size=2 * HID, num_attention_heads=HEADS, num_key_value_heads=1,
            head_dim=HID // HEADS, num_hidden_layers=2, vocab_size=VOCAB, sliding_window=WINDOW,
            attn_logit_softcapping=20.0, final_logit_softcapping=None, layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=4 * SEQ, query_pre_attn_scalar=HID // HEADS)
    if family == "gpt_oss":
        return transformers.GptOssConfig(
            hidden_size=HID, intermediate_size=HID, num_attention_heads=HEADS, num_key_value_heads=1,
            head_dim=HID // HEADS, num_hidden_layers=2, vocab_size=VOCAB, num_local_experts=2, num_experts_per_tok=1,
            sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=4 * SEQ)
    return transformers.LlamaConfig(hidden_size=HID, intermediate_size=2 * HID, num_attention_heads=HEADS,
                                    num_key_value_heads=1, num_hidden_layers=2, vocab_size=VOCAB,
                                    max_position_embeddings=4 * SEQ)


_CLASSES = {"gemma2": "Gemma2ForCausalLM", "gpt_oss": "GptOssForCausalLM", "llama": "LlamaForCausalLM"}
_MASTER = {}


def _build(family, impl, dtype):
    if family not in _MASTER:
        torch.manual_seed(4321)
        _MASTER[family] = getattr(transformers, _CLASSES[family])(_config(family)).state_dict()
    cfg = copy.deepcopy(_config(family))
    cfg._attn_implementation = tfhf.register() if impl == "tritonflash" else impl
    model = getattr(transformers, _CLASSES[family])(cfg)
    model.load_state_dict(_MASTER[family])
    return model.to(device=DEVICE, dtype=dtype).eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=g).to(DEVICE)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, : SEQ // 3] = 0
    return ids, mask.to(DEVICE)


def _against_eager(family):
    ids, mask = _inputs()
    ref = _forward_backward(_build(family, "eager", torch.float32), family, ids, mask)
    base = _forward_backward(_build(family, "eager", LP), family, ids, mask)
    got = _forward_backward(_build(family, "tritonflash", LP), family, ids, mask)
    keep = mask.bool()
    _check("logits", got[0][keep], ref[0][keep], base[0][keep], 2)
    assert got[1].keys() == ref[1].keys()
    for n in ref[1]:
        _check(f"grad {n}", got[1][n], ref[1][n], base[1][n], 3)


@needs("softcap", "window_size")
def test_gemma2_softcap_and_sliding_window(monkeypatch):
    calls = _spy(monkeypatch, "flash_attn_func")
    _against_eager("gemma2")
    kws = [c[1] for c in calls]
    assert any(kw.get("window_size") == (WINDOW - 1, 0) for kw in kws)
    assert all(kw.get("softcap") == 20.0 for kw in kws)


@needs("sinks", "window_size")
def test_gpt_oss_sinks_with_gradient(monkeypatch):
    calls = _spy(monkeypatch, "flash_attn_func")
    _against_eager("gpt_oss")
    assert all(c[1].get("sinks") is not None for c in calls)


@needs("dropout_p")
def test_training_dropout_is_passed(monkeypatch):
    calls = _spy(monkeypatch, "flash_attn_func")
    cfg = copy.deepcopy(_config("llama"))
    cfg.attention_dropout = 0.25
    cfg._attn_implementation = tfhf.register()
    model = transformers.LlamaForCausalLM(cfg).to(device=DEVICE, dtype=LP).train()
    ids, mask = _inputs()
    model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
    assert all(c[1].get("dropout_p") == 0.25 for c in calls)
    calls.clear()
    with torch.no_grad():
        model.eval()(input_ids=ids, attention_mask=mask)
    assert all("dropout_p" not in c[1] for c in calls)


@needs("attn_mask")
def test_boolean_custom_mask_goes_as_attn_mask(monkeypatch):
    calls = _spy(monkeypatch, "flash_attn_func")
    ids, _ = _inputs()
    allowed = torch.ones(SEQ, SEQ).tril().bool()
    allowed[:, : SEQ // 2] = True
    allowed = allowed.expand(2, 1, SEQ, SEQ).to(DEVICE)
    additive = torch.zeros(allowed.shape, device=DEVICE).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ref = _build("llama", "eager", torch.float32)(input_ids=ids, attention_mask=additive).logits
        base = _build("llama", "eager", LP)(input_ids=ids, attention_mask=additive.to(LP)).logits
        got = _build("llama", "tritonflash", LP)(input_ids=ids, attention_mask=allowed).logits
    assert all(c[1].get("attn_mask") is not None and c[0][3] is None for c in calls)
    _check("prefix-LM logits", got, ref, base, 2)


def test_sliding_window_without_a_mask_is_applied():
    """attention_mask=None with sliding_window (a direct call, a paged cache): the window reaches
    the kernel on the general path too, not only when decoding."""
    from tritonflash import attention_ref

    torch.manual_seed(0)
    b, h, s, d, w = 2, 2, 24, 16, 5
    q, k, v = (torch.randn(b, h, s, d, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    module = type("Attn", (), {"is_causal": True})()
    with torch.no_grad():
        out, _ = tfhf.attention_forward(module, q, k, v, None, scaling=d**-0.5, sliding_window=w)
        want = attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, d**-0.5,
                             window_size=(w - 1, 0), upcast=True)
        full = attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, d**-0.5, upcast=True)
    assert (out.float() - want.float()).abs().max() < 2e-2
    assert (out.float() - full.float()).abs().max() > 0.1  # the window changes the answer here
