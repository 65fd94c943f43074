"""tritonflash.integrations.transformers against the models' own eager attention.

Tiny random models built from configs (no downloads): MPT, BLOOM, Falcon with ALiBi (patch()),
Llama and T5 (register()). For each: logits and every parameter gradient of the 16-bit model run
through tritonflash against the fp32 eager model with the same weights, under docs/testing.md's
rule with the eager 16-bit model as baseline (error <= 2x the baseline's, plus two bf16 rounding
steps; 3x for gradients); a batch with one left- and one right-padded row; prefill + decode with a
DynamicCache and a StaticCache (checked to be filled: transformers 5.17 takes it as
past_key_values=, 5.24 as cache=); generate() giving eager's tokens and logits where eager 16-bit
agrees with fp32. Falcon's reference is its SDPA path: transformers' eager Falcon adds ALiBi twice (see
test_falcon_eager_adds_alibi_twice). On the CPU tier the kernels run in the Triton interpreter,
so the models are tiny; on a GPU they are larger.
"""

from __future__ import annotations

import copy
import functools
import inspect
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tritonflash.api  # noqa: E402
from conftest import DEVICE, ON_GPU  # noqa: E402
from tritonflash.integrations import transformers as tfhf  # noqa: E402

LP = torch.bfloat16
# (hidden, heads, layers, seqlen, vocab): interpreter-sized on CPU, small but realistic on GPU.
HID, HEADS, LAYERS, SEQ, VOCAB = (512, 8, 2, 96, 1000) if ON_GPU else (64, 2, 2, 12, 101)
NEW = 4 if ON_GPU else 2  # tokens decoded / generated


def _config(family):
    t = transformers
    if family == "mpt":
        return t.MptConfig(d_model=HID, n_heads=HEADS, n_layers=LAYERS, vocab_size=VOCAB, max_seq_len=SEQ + 2 * NEW + 8)
    if family == "bloom":
        return t.BloomConfig(hidden_size=HID, n_head=HEADS, n_layer=LAYERS, vocab_size=VOCAB)
    if family == "falcon":
        return t.FalconConfig(hidden_size=HID, num_attention_heads=HEADS, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                              alibi=True, new_decoder_architecture=False, multi_query=False, parallel_attn=False,
                              bias=True, attention_dropout=0.0, hidden_dropout=0.0)
    if family == "llama":
        return t.LlamaConfig(hidden_size=HID, intermediate_size=2 * HID, num_attention_heads=HEADS,
                             num_key_value_heads=HEADS // 2, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                             max_position_embeddings=4 * SEQ)
    if family == "t5":
        return t.T5Config(vocab_size=VOCAB, d_model=HID, d_kv=HID // HEADS, d_ff=2 * HID, num_layers=LAYERS,
                          num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=8,
                          relative_attention_max_distance=16, dropout_rate=0.0, decoder_start_token_id=0,
                          pad_token_id=0)
    raise AssertionError(family)


_CLASSES = {"mpt": "MptForCausalLM", "bloom": "BloomForCausalLM", "falcon": "FalconForCausalLM",
            "llama": "LlamaForCausalLM", "t5": "T5ForConditionalGeneration"}
_MASTER = {}


def _build(family, impl, dtype):
    """The family's model with one fixed set of weights, attention `impl` ('eager', 'sdpa' or
    'tritonflash'), in `dtype`, on DEVICE, in eval mode."""
    if family not in _MASTER:
        torch.manual_seed(1234)
        _MASTER[family] = getattr(transformers, _CLASSES[family])(_config(family)).state_dict()
    cfg = copy.deepcopy(_config(family))
    patched = family in ("mpt", "bloom", "falcon")
    cfg._attn_implementation = "eager" if impl == "tritonflash" and patched else (
        tfhf.register() if impl == "tritonflash" else impl)
    model = getattr(transformers, _CLASSES[family])(cfg)
    model.load_state_dict(_MASTER[family])
    model = model.to(device=DEVICE, dtype=dtype).eval()
    if impl == "tritonflash" and patched:
        tfhf.patch(model)
    return model


def _ref_impl(family):
    return "sdpa" if family == "falcon" else "eager"


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, : SEQ // 3] = 0          # left padding
    mask[1, SEQ - SEQ // 4:] = 0     # right padding
    return ids.to(DEVICE), mask.to(DEVICE)


def _check(name, x, x_ref, x_base, factor):
    """err(x) <= factor * err(x_base) + 2 bf16 rounding steps, errors against the fp32 x_ref."""
    x, x_ref, x_base = x.float(), x_ref.float(), x_base.float()
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    err = (x - x_ref).abs().max().item()
    err_base = (x_base - x_ref).abs().max().item()
    lp = x_ref.to(LP)
    floor = 2 * ((lp + 0.3 - 0.3).float() - lp.float()).abs().max().item()
    assert err <= factor * err_base + floor, (
        f"{name}: error {err:.3e} > {factor} x eager-16-bit error {err_base:.3e} + floor {floor:.3e}")


def _forward_backward(model, family, ids, mask):
    labels = ids.masked_fill(mask == 0, -100)
    if family != "t5":
        # A causal LM predicts token t from position t-1. The first real token of a left-padded
        # row is predicted from a pad position, whose query sees no key: tritonflash gives 0
        # there, eager an average over every value (docs/integrations.md); neither means anything.
        labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    model.zero_grad(set_to_none=True)
    if family == "t5":
        out = model(input_ids=ids, attention_mask=mask, labels=labels[:, : SEQ // 2 + 1].contiguous())
    else:
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().float(), grads


FAMILIES = ["mpt", "bloom", "falcon", "llama", "t5"]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_gradients(family):
    """Logits at real tokens and every parameter gradient, one left- and one right-padded row."""
    ids, mask = _inputs()
    ref_logits, ref_grads = _forward_backward(_build(family, _ref_impl(family), torch.float32), family, ids, mask)
    base_logits, base_grads = _forward_backward(_build(family, _ref_impl(family), LP), family, ids, mask)
    tf_logits, tf_grads = _forward_backward(_build(family, "tritonflash", LP), family, ids, mask)
    keep = torch.ones_like(ref_logits[..., 0], dtype=torch.bool) if family == "t5" else mask.bool()
    _check("logits", tf_logits[keep], ref_logits[keep], base_logits[keep], 2)
    assert tf_grads.keys() == ref_grads.keys()
    for n in ref_grads:
        _check(f"grad {n}", tf_grads[n], ref_grads[n], base_grads[n], 3)


def _cache_kwarg(model):
    """The name under which the model's forward takes a cache: `cache` (transformers 5.24) or
    `past_key_values` (5.17). Passed under the wrong name, a cache is silently ignored (swallowed
    by **kwargs) and each call starts a fresh one."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _forced_decode(model, family, cache_kind, ids, mask, forced):
    """Prefill + decode of the tokens `forced` (so every model sees the same inputs)."""
    cache = (transformers.DynamicCache(config=model.config) if cache_kind == "dynamic"
             else transformers.StaticCache(config=model.config, max_cache_len=SEQ + NEW + 3))
    kw = {_cache_kwarg(model): cache, "use_cache": True}
    out = model(input_ids=ids, attention_mask=mask, **kw)
    logits = [out.logits[mask.bool()].float()]
    for t in range(NEW):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(input_ids=forced[:, t: t + 1], attention_mask=mask, **kw)
        logits.append(out.logits[:, -1].float())
    # every layer wrote every token into this cache (not into one the model made up)
    assert [cache.get_seq_length(i) for i in range(LAYERS)] == [SEQ + NEW] * LAYERS
    return logits


@pytest.mark.parametrize("family", ["mpt", "bloom", "falcon", "llama"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_prefill_and_decode(family, cache_kind):
    """Prefill a left-padded batch into a DynamicCache / StaticCache, then decode one token at a
    time; every step's logits against fp32 eager (a StaticCache's unwritten slots never seen)."""
    ids, mask = _inputs(1)
    mask = torch.ones_like(mask)
    mask[0, : SEQ // 3] = 0
    g = torch.Generator().manual_seed(7)
    forced = torch.randint(1, VOCAB, (2, NEW), generator=g).to(DEVICE)
    # transformers' eager models of these families do not all run a StaticCache (BLOOM and
    # Falcon size their ALiBi by the 2-D mask): the reference always decodes with a DynamicCache.
    with torch.no_grad():
        ref = _forced_decode(_build(family, _ref_impl(family), torch.float32), family, "dynamic", ids, mask, forced)
        base = _forced_decode(_build(family, _ref_impl(family), LP), family, "dynamic", ids, mask, forced)
        got = _forced_decode(_build(family, "tritonflash", LP), family, cache_kind, ids, mask, forced)
    for step, (x, r, b) in enumerate(zip(got, ref, base)):
        _check(f"{cache_kind} step {step} logits", x, r, b, 2)


@pytest.mark.parametrize("family,cache_kind", [("llama", "dynamic"), ("llama", "static"), ("bloom", "static")])
def test_decode_steps_run_flash_attn_with_kvcache(monkeypatch, family, cache_kind):
    """Every decode step of every layer runs flash_attn_with_kvcache
    over the cache's own tensors (a StaticCache's whole buffer, not cut)."""
    import tritonflash.kvcache

    prefill = _spy(monkeypatch, "flash_attn_func")
    decode = []
    real = tritonflash.kvcache.flash_attn_with_kvcache

    def spy(q, k_cache, v_cache, *args, **kwargs):
        decode.append((q.shape[1], k_cache, kwargs))
        return real(q, k_cache, v_cache, *args, **kwargs)

    monkeypatch.setattr(tritonflash.kvcache, "flash_attn_with_kvcache", spy)
    ids, mask = _left_padded()
    forced = torch.randint(1, VOCAB, (2, NEW), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        _forced_decode(_build(family, "tritonflash", LP), family, cache_kind, ids, mask, forced)
    # (on the CPU tier SEQ <= 16: a StaticCache's prefill has few enough rows to run it too)
    assert len(prefill) + len(decode) == LAYERS * (NEW + 1) and [n for n, _, _ in decode].count(1) == LAYERS * NEW
    for _, k_cache, kwargs in decode:
        assert kwargs["causal"] and kwargs["bias"] is not None  # the left padding, as a -inf bias
        if cache_kind == "static":
            assert k_cache.shape[1] == SEQ + NEW + 3  # the whole buffer, its valid length in cache_seqlens


@pytest.mark.parametrize("offset", ["int", "tensor"])
def test_decode_offsets_and_window_match_flash_attn_func(offset):
    """A StaticCache step (mask offsets: an int or a tensor write position, keys past it
    unwritten NaN, a sliding window, key padding) through the kvcache path equals
    flash_attn_func over the written keys, within the rule's rounding."""
    b, h, hk, d, cap, pos = 2, 4, 2, 16, 20, 9
    query = torch.randn(b, h, 1, d, dtype=LP, device=DEVICE)
    key = torch.randn(b, hk, cap, d, dtype=LP, device=DEVICE)
    value = torch.randn_like(key)
    key[:, :, pos + 1:] = float("nan")
    value[:, :, pos + 1:] = float("nan")
    kpm = torch.ones(b, cap, dtype=torch.bool, device=DEVICE)
    kpm[0, :3] = False
    qo = pos if offset == "int" else torch.tensor(pos, device=DEVICE)
    mask = tfhf.TritonflashMask(q_length=1, kv_length=cap, q_offset=qo, causal=True, window=(4, 0), key_padding_mask=kpm)
    with torch.no_grad():
        got, _ = tfhf._attention(None, query, key, value, mask, scaling=0.3)
        want = tritonflash.api.flash_attn_func(query.transpose(1, 2), key[:, :, :pos + 1].transpose(1, 2),
                                               value[:, :, :pos + 1].transpose(1, 2), None, True, 0.3,
                                               key_padding_mask=kpm[:, :pos + 1], window_size=(4, 0))
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)


def _left_padded():
    ids, mask = _inputs(2)
    mask = torch.ones_like(mask)
    mask[0, : SEQ // 3] = 0
    return ids, mask


@pytest.mark.parametrize("family,cache_kind", [("mpt", None), ("bloom", None), ("falcon", None), ("llama", "static"),
                                               ("t5", None)])
def test_generate_same_tokens(family, cache_kind):
    """Greedy generate(): tritonflash's tokens equal eager's in every row where eager 16-bit and
    eager fp32 agree, and so do each step's logits there (under the rule: tokens alone can agree
    even when the decode steps lost their cache)."""
    ids, mask = _left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
              return_dict_in_generate=True, output_logits=True, use_cache=True)  # MptConfig defaults to False
    if cache_kind:
        kw["cache_implementation"] = cache_kind
    with torch.no_grad():
        ref = _build(family, _ref_impl(family), torch.float32).generate(ids, **kw)
        base = _build(family, _ref_impl(family), LP).generate(ids, **kw)
        model = _build(family, "tritonflash", LP)
        cache = None
        if family != "t5" and not cache_kind:
            # generate() fills the cache it is given: checked below, so that an attention that
            # drops the cache (it then stays empty) fails here whatever the tokens
            cache = transformers.DynamicCache(config=model.config)
            kw[_cache_kwarg(model)] = cache
        got = model.generate(ids, **kw)
    agree = (ref.sequences == base.sequences).all(1)
    assert agree.any(), "eager 16-bit disagrees with fp32 in every row: the test shows nothing"
    assert torch.equal(got.sequences[agree], ref.sequences[agree])
    assert len(got.logits) == len(ref.logits) == NEW
    for step, (x, r, b) in enumerate(zip(got.logits, ref.logits, base.logits)):
        _check(f"generate step {step} logits", x[agree], r[agree], b[agree], 2)
    if cache is not None:
        assert [cache.get_seq_length(i) for i in range(LAYERS)] == [SEQ + NEW - 1] * LAYERS


def test_fp32_model_computes_in_bf16():
    """An fp32 model: attention runs in bf16 and is cast back; outputs and gradients stay fp32,
    within the rule against the eager 16-bit model."""
    ids, mask = _inputs(3)
    ref_logits, ref_grads = _forward_backward(_build("llama", "eager", torch.float32), "llama", ids, mask)
    base_logits, base_grads = _forward_backward(_build("llama", "eager", LP), "llama", ids, mask)
    model = _build("llama", "tritonflash", torch.float32)
    tf_logits, tf_grads = _forward_backward(model, "llama", ids, mask)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    keep = mask.bool()
    _check("logits", tf_logits[keep], ref_logits[keep], base_logits[keep], 2)
    for n in ref_grads:
        _check(f"grad {n}", tf_grads[n], ref_grads[n], base_grads[n], 3)


def _spy(monkeypatch, name):
    calls = []
    real = getattr(tritonflash.api, name)

    @functools.wraps(real)  # the glue reads the real signature to see which features exist
    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(tritonflash.api, name, spy)
    return calls


def test_padding_causal_becomes_key_padding_mask_views_and_gqa(monkeypatch):
    """A padded causal batch reaches flash_attn_func as key_padding_mask + causal=True (no bias
    tensor), q/k/v are views of transformers' (b, h, s, d) tensors, and GQA k/v keep their heads."""
    calls = _spy(monkeypatch, "flash_attn_func")
    seen = []
    real = tfhf._attention

    def record(module, query, key, value, mask, **kw):
        seen.append((query, key, value, mask))
        return real(module, query, key, value, mask, **kw)

    monkeypatch.setattr(tfhf, "_attention", record)
    ids, mask = _inputs(4)
    with torch.no_grad():
        _build("llama", "tritonflash", LP)(input_ids=ids, attention_mask=mask)
    assert len(calls) == LAYERS
    (q, k, v, bias, causal, _), kw = calls[0][0], calls[0][1]
    query, key, value, hf_mask = seen[0]
    assert isinstance(hf_mask, tfhf.TritonflashMask) and hf_mask.dense is None
    assert bias is None and causal is True
    assert torch.equal(kw["key_padding_mask"], mask.bool())
    assert q.data_ptr() == query.data_ptr() and k.data_ptr() == key.data_ptr() and v.data_ptr() == value.data_ptr()
    assert k.shape[2] == HEADS // 2 and q.shape[2] == HEADS


def test_t5_position_bias_is_a_bias_with_gradient(monkeypatch):
    """T5's learned relative-position bias goes to tritonflash as bias= (its own shape, with
    gradient), the padding as key_padding_mask."""
    calls = _spy(monkeypatch, "flash_attn_func")
    ids, mask = _inputs(5)
    model = _build("t5", "tritonflash", LP)
    out = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    out.float().square().mean().backward()
    bias = calls[0][0][3]
    assert bias is not None and bias.requires_grad and bias.shape == (1, HEADS, SEQ, SEQ)
    assert calls[0][1]["key_padding_mask"] is not None and calls[0][0][4] is False
    assert model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad.abs().sum() > 0


def test_packed_sequences_run_varlen(monkeypatch):
    """Packed sequences (position_ids restarting, cu_seq_lens_q/k and max_length_q/k as given by
    DataCollatorWithFlattening) run through flash_attn_varlen_func and equal each sequence alone."""
    calls = _spy(monkeypatch, "flash_attn_varlen_func")
    lens = [SEQ // 2, SEQ - SEQ // 2 - 2, 2]
    g = torch.Generator().manual_seed(9)
    seqs = [torch.randint(1, VOCAB, (1, n), generator=g).to(DEVICE) for n in lens]
    packed = torch.cat(seqs, 1)
    pos = torch.cat([torch.arange(n) for n in lens])[None].to(DEVICE)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    model = _build("llama", "tritonflash", LP)
    ref = _build("llama", "eager", torch.float32)
    base = _build("llama", "eager", LP)
    with torch.no_grad():
        out = model(input_ids=packed, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                    max_length_q=max(lens), max_length_k=max(lens), use_cache=False).logits
        out2 = model(input_ids=packed, position_ids=pos, use_cache=False).logits  # packing detected from position_ids
        r = torch.cat([ref(input_ids=s).logits for s in seqs], 1)
        b = torch.cat([base(input_ids=s).logits for s in seqs], 1)
    assert len(calls) == 2 * LAYERS
    _check("packed logits (cu_seq_lens)", out[0], r[0], b[0], 2)
    _check("packed logits (position_ids)", out2[0], r[0], b[0], 2)


def test_custom_4d_mask_is_a_bias():
    """A 4-D float mask given by the caller (here prefix-LM) is honoured as an additive bias."""
    ids, _ = _inputs(6)
    s = SEQ
    allowed = torch.ones(s, s).tril().bool()
    allowed[:, : s // 2] = True
    mask4 = torch.zeros(2, 1, s, s).masked_fill(~allowed, torch.finfo(torch.float32).min).to(DEVICE)
    with torch.no_grad():
        ref = _build("llama", "eager", torch.float32)(input_ids=ids, attention_mask=mask4).logits
        base = _build("llama", "eager", LP)(input_ids=ids, attention_mask=mask4.to(LP)).logits
        got = _build("llama", "tritonflash", LP)(input_ids=ids, attention_mask=mask4.to(LP)).logits
    _check("prefix-LM logits", got, ref, base, 2)


def test_falcon_eager_adds_alibi_twice():
    """Why Falcon is checked against its SDPA path: transformers' eager Falcon adds ALiBi both in
    the attention (scaled) and in the mask it builds, i.e. twice; patch() follows the SDPA path
    and the original Falcon-RW formula (once). Guard: if transformers fixes it, this fails and the
    reference of the Falcon tests can become eager again."""
    ids, _ = _inputs(7)
    with torch.no_grad():
        eager = _build("falcon", "eager", torch.float32)(input_ids=ids).logits
        sdpa = _build("falcon", "sdpa", torch.float32)(input_ids=ids).logits
    assert (eager - sdpa).abs().max() > 1e-3


# ---- what it refuses ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tritonflash", "my_flash", "sdpa2", "flex_attention_x", "paged|x", "org/repo", "", "eager"])
def test_register_refuses_names_transformers_routes_elsewhere(name):
    with pytest.raises(ValueError, match="name"):
        tfhf.register(name)


def test_register_returns_a_name_transformers_accepts():
    name = tfhf.register("tritonfa_test")
    assert name == "tritonfa_test"
    cfg = _config("llama")
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=name)
    assert model.config._attn_implementation == name
    with pytest.raises(TypeError, match="name"):
        tfhf.register(3)


def test_output_attentions_and_head_mask_raise():
    ids, mask = _inputs(8)
    model = _build("llama", "tritonflash", LP)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)
    layer = model.model.layers[0].self_attn
    q = torch.randn(1, HEADS, 3, HID // HEADS, dtype=LP, device=DEVICE)
    with pytest.raises(NotImplementedError, match="head_mask"):
        tfhf.attention_forward(layer, q, q, q, None, head_mask=torch.ones(HEADS))
    patched = _build("bloom", "tritonflash", LP)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        patched(input_ids=ids, attention_mask=mask, output_attentions=True)


def test_patch_refuses_unknown_models_and_falcon_without_alibi():
    with pytest.raises(TypeError, match="model: patch\\(\\) knows MPT, BLOOM"):
        tfhf.patch(transformers.LlamaForCausalLM(_config("llama")))
    cfg = _config("falcon")
    cfg.alibi = False
    with pytest.raises(ValueError, match="alibi=False"):
        tfhf.patch(transformers.FalconForCausalLM(cfg))
    with pytest.raises(TypeError, match="model"):
        tfhf.patch("mpt")


def test_patch_reports_and_is_idempotent():
    model = _build("mpt", "tritonflash", LP)
    assert model.tritonflash_patched == [f"transformer.blocks.{i}.attn" for i in range(LAYERS)]
    assert tfhf.patch(model) is model and len(model.tritonflash_patched) == LAYERS


def test_patch_refuses_padding_inside_a_sequence_for_position_counting_alibi():
    """BLOOM counts ALiBi positions over kept tokens: a hole in the mask would need another
    distance than tritonflash's; refused instead of silently different."""
    ids, mask = _inputs(10)
    mask = torch.ones_like(mask)
    mask[0, SEQ // 2] = 0
    with pytest.raises(NotImplementedError, match="padding between kept tokens"):
        _build("bloom", "tritonflash", LP)(input_ids=ids, attention_mask=mask)


def test_patched_model_refuses_a_prepared_4d_mask():
    ids, _ = _inputs(11)
    mask4 = torch.zeros(2, 1, SEQ, SEQ, dtype=LP, device=DEVICE)
    with pytest.raises(NotImplementedError, match="attention_mask"):
        _build("falcon", "tritonflash", LP)(input_ids=ids, attention_mask=mask4)


def test_import_without_transformers_is_free_and_use_names_the_extra():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import tritonflash.integrations.transformers as t\n"
        "try:\n    t.register()\nexcept ImportError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install "tritonflash[hf]"' in out.stdout


def _readme_hf_snippet() -> str:
    """The README's Hugging Face code block, as a user copies it."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("### Hugging Face transformers"):]
    return section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]


def test_readme_snippet_runs(tmp_path):
    """The README's snippet, run as written: a saved tiny Llama through from_pretrained with the
    registered name, and a patched MPT; both give eager's logits under the rule."""
    llama = getattr(transformers, _CLASSES["llama"])(_config("llama"))
    llama.save_pretrained(tmp_path)
    ns = dict(AutoModelForCausalLM=transformers.AutoModelForCausalLM, MptForCausalLM=transformers.MptForCausalLM,
              path=str(tmp_path), config=_config("mpt"))
    code = _readme_hf_snippet()
    ns_llama = dict(ns)
    exec(code.split("\nmodel = tf_hf.patch")[0], ns_llama)  # the from_pretrained line
    exec(code, ns)  # the whole block: its last model is the patched MPT
    loaded, mpt = ns_llama["model"], ns["model"]
    assert loaded.config._attn_implementation == tfhf.register()
    assert mpt.tritonflash_patched == [f"transformer.blocks.{i}.attn" for i in range(LAYERS)]
    ids, mask = _inputs(12)
    keep = mask.bool()
    for model, family in ((loaded, "llama"), (mpt, "mpt")):
        state = model.state_dict()
        ref, base = (getattr(transformers, _CLASSES[family])(_config(family)) for _ in range(2))
        ref.load_state_dict(state)
        base.load_state_dict(state)
        with torch.no_grad():
            want = ref.to(DEVICE).eval()(input_ids=ids, attention_mask=mask).logits
            low = base.to(device=DEVICE, dtype=LP).eval()(input_ids=ids, attention_mask=mask).logits
            got = model.to(device=DEVICE, dtype=LP).eval()(input_ids=ids, attention_mask=mask).logits
        _check(f"{family} logits", got[keep], want[keep], low[keep], 2)
