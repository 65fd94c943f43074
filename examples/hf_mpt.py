"""Train and generate with a Hugging Face MPT (or BLOOM) model, eager attention vs tritonflash.

    python examples/hf_mpt.py                          # auto: CUDA if present, else CPU
    python examples/hf_mpt.py --device cpu --steps 3   # tiny model, kernels in the Triton interpreter
    python examples/hf_mpt.py --device cuda --arch bloom --out hf_bloom.json

The model is built from a config (random weights, nothing downloaded) and run twice from the
same weights on the same batches: once as transformers runs it (eager attention, the only one
it has for MPT and BLOOM), once after ``tritonflash.integrations.transformers.patch(model)``
(in-kernel ALiBi, key padding, no (seq x seq) mask). Both run in bf16. For each it prints the
training loss of every step, training tokens/s, generation tokens/s and peak GPU memory (on CPU
the peak is not measured: null). ``--out FILE.json`` writes the same numbers.

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1 is set before tritonflash is
imported): correct but slow, hence the tiny preset; the timings there say nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

PRESETS = {
    "cpu": dict(hidden=64, heads=4, layers=2, seq=32, batch=2, steps=3, new_tokens=8),
    "cuda": dict(hidden=1024, heads=16, layers=8, seq=1024, batch=8, steps=20, new_tokens=64),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--arch", choices=["mpt", "bloom"], default="mpt")
    p.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    p.add_argument("--seq", type=int, help="training sequence length (default: the preset's)")
    p.add_argument("--batch", type=int, help="batch size (default: the preset's)")
    p.add_argument("--new-tokens", type=int, help="tokens generated (default: the preset's)")
    p.add_argument("--out", type=Path, help="write the numbers to this JSON file")
    return p.parse_args()


def main():
    args = parse_args()
    import torch  # noqa: F401 - to decide the device before Triton is imported

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    run(args, device)


def build(arch, cfg, device, impl, state=None):
    import torch
    import transformers

    vocab = 512
    if arch == "mpt":
        config = transformers.MptConfig(d_model=cfg["hidden"], n_heads=cfg["heads"], n_layers=cfg["layers"],
                                        vocab_size=vocab, max_seq_len=cfg["seq"] + cfg["new_tokens"] + 8)
        cls = transformers.MptForCausalLM
    else:
        config = transformers.BloomConfig(hidden_size=cfg["hidden"], n_head=cfg["heads"], n_layer=cfg["layers"],
                                          vocab_size=vocab)
        cls = transformers.BloomForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config)
    if state is not None:
        model.load_state_dict(state)
    model = model.to(device=device, dtype=torch.bfloat16)
    if impl == "tritonflash":
        from tritonflash.integrations.transformers import patch

        patch(model)
    return model


def batches(cfg, device, vocab=512):
    """Deterministic batches: a left-padded row first (as generate() pads), the others full."""
    import torch

    g = torch.Generator().manual_seed(1)
    for _ in range(cfg["steps"]):
        ids = torch.randint(0, vocab, (cfg["batch"], cfg["seq"]), generator=g)
        mask = torch.ones_like(ids)
        mask[0, : cfg["seq"] // 4] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
        yield ids.to(device), mask.to(device), labels.to(device)


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def measure(arch, cfg, device, impl, state):
    import torch

    model = build(arch, cfg, device, impl, state)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    losses, tokens, elapsed = [], 0, 0.0
    for step, (ids, mask, labels) in enumerate(batches(cfg, device)):
        sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step > 0 or cfg["steps"] == 1:  # the first step warms up (compilation, allocation)
            elapsed += time.perf_counter() - t0
            tokens += int(mask.sum())
        losses.append(round(loss.item(), 5))
    train_peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None

    model.eval()
    prompt, mask, _ = next(batches(dict(cfg, steps=1), device))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=cfg["new_tokens"],
                             min_new_tokens=cfg["new_tokens"], do_sample=False, pad_token_id=0)
        sync(device)
        gen_time = time.perf_counter() - t0
    gen_peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    new = out[:, prompt.shape[1]:]
    return {
        "losses": losses,
        "train_tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
        "train_peak_mib": None if train_peak is None else round(train_peak, 1),
        "generate_tokens_per_s": round(new.numel() / gen_time, 1),
        "generate_peak_mib": None if gen_peak is None else round(gen_peak, 1),
        "generated": new[:, : min(8, new.shape[1])].tolist(),
    }


def run(args, device):
    import torch
    import transformers

    cfg = dict(PRESETS[device])
    for key in ("steps", "seq", "batch", "new_tokens"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    state = build(args.arch, cfg, "cpu", "eager").state_dict()
    results = {impl: measure(args.arch, cfg, device, impl, state) for impl in ("eager", "tritonflash")}
    print(f"{args.arch} {cfg} on {device} ({torch.cuda.get_device_name() if device == 'cuda' else platform.machine()})")
    for impl, r in results.items():
        print(f"  {impl:12s} loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}  train {r['train_tokens_per_s']} tok/s"
              f"  generate {r['generate_tokens_per_s']} tok/s  peak train/generate {r['train_peak_mib']}/"
              f"{r['generate_peak_mib']} MiB")
    same = results["eager"]["generated"] == results["tritonflash"]["generated"]
    print(f"  first generated tokens equal: {same}")
    if args.out:
        import triton

        doc = {"arch": args.arch, "device": device, "config": cfg, "dtype": "bfloat16",
               "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
               "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
               "interpreter": os.environ.get("TRITON_INTERPRET") == "1", "results": results,
               "generated_tokens_equal": same}
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"  wrote {args.out}")


if __name__ == "__main__":
    import importlib.util

    if importlib.util.find_spec("tritonflash") is None:  # run from a checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()  # imports tritonflash only after TRITON_INTERPRET is decided
