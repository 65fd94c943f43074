"""Train a small character-level ALiBi decoder with each attention backend of tritonflash.layers.

    python examples/train_alibi.py --backend all --device cpu      # small and fast
    python examples/train_alibi.py --backend all --device cuda     # larger, bf16 autocast
    python examples/train_alibi.py --backend triton --json out.json

The model: token embedding (no position embedding: ALiBi gives the positions), pre-LN blocks of
GroupedQueryAttention + MLP, a tied output head. Every backend starts from the same weights and
sees the same batches, so their loss curves should agree to within rounding.

The text is generated deterministically (a tiny grammar), so nothing is downloaded.

Backends on CPU: 'torch' and 'flash' (PyTorch SDPA) run natively. 'triton' runs tritonflash's
reference path (plain torch, same semantics) unless TRITON_INTERPRET=1 is set before start, in
which case the real Triton kernels run in the Triton interpreter: correct, but very slow (use
e.g. ``--steps 10``). On CUDA 'triton' runs the Triton kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    from tritonflash.layers import ATTN_IMPLS, GroupedQueryAttention, gen_slopes
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from tritonflash.layers import ATTN_IMPLS, GroupedQueryAttention, gen_slopes

PRESETS = {
    "cpu": dict(d_model=64, n_layers=2, n_heads=4, kv_n_heads=2, seq_len=64, batch_size=16, steps=200, lr=3e-3),
    "cuda": dict(d_model=256, n_layers=4, n_heads=8, kv_n_heads=2, seq_len=256, batch_size=32, steps=300, lr=1e-3),
}


def make_corpus(n_sentences: int = 4000, seed: int = 0) -> str:
    """Deterministic text from a small grammar: learnable structure, no download."""
    rng = random.Random(seed)
    adjectives = ["small", "quiet", "bright", "old", "red", "clever", "lazy", "brave", "green", "tall"]
    nouns = ["fox", "dog", "cat", "bird", "river", "tree", "king", "child", "stone", "ship"]
    verbs = ["sees", "follows", "finds", "likes", "watches", "carries", "hears", "calls"]
    places = ["near the hill", "by the sea", "in the forest", "under the bridge", "at the market"]
    lines = []
    for _ in range(n_sentences):
        subject = f"the {rng.choice(adjectives)} {rng.choice(nouns)}"
        obj = f"the {rng.choice(adjectives)} {rng.choice(nouns)}"
        sentence = f"{subject} {rng.choice(verbs)} {obj}"
        if rng.random() < 0.5:
            sentence += f" {rng.choice(places)}"
        lines.append(sentence + ("." if rng.random() < 0.8 else "!"))
    return " ".join(lines)


class Block(nn.Module):
    def __init__(self, d_model, n_heads, kv_n_heads, attn_impl, device):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, device=device)
        self.attn = GroupedQueryAttention(d_model, n_heads, kv_n_heads, attn_impl=attn_impl, device=device)
        self.ln_2 = nn.LayerNorm(d_model, device=device)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model, device=device), nn.GELU(), nn.Linear(4 * d_model, d_model, device=device)
        )

    def forward(self, x, alibi_slopes):
        x = x + self.attn(self.ln_1(x), alibi_slopes=alibi_slopes, is_causal=True)[0]
        return x + self.mlp(self.ln_2(x))


class ALiBiDecoder(nn.Module):
    def __init__(self, vocab_size, d_model, n_layers, n_heads, kv_n_heads, attn_impl, device):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model, device=device)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied head: N(0, 1) would start at a loss of ~50
        self.blocks = nn.ModuleList(Block(d_model, n_heads, kv_n_heads, attn_impl, device) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model, device=device)
        # ALiBi slopes (fp32): computed in-kernel on 'triton', added as a bias on 'torch'/'flash'.
        self.register_buffer("alibi_slopes", gen_slopes(n_heads, device=device), persistent=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.alibi_slopes)
        return self.ln_f(x) @ self.embed.weight.T  # tied head


def progress(step, steps, loss, tok_s, width=30):
    done = int(width * step / steps)
    bar = "#" * done + "." * (width - done)
    print(f"\r  [{bar}] {step:4d}/{steps} loss {loss:6.3f} {tok_s:10.0f} tok/s", end="", flush=True)


def train(backend, args, data, vocab_size, device):
    torch.manual_seed(args.seed)
    model = ALiBiDecoder(vocab_size, args.d_model, args.n_layers, args.n_heads, args.kv_n_heads, backend, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    n_val = len(data) // 10
    train_data, val_data = data[:-n_val], data[-n_val:]
    batches = torch.Generator().manual_seed(args.seed)  # the same batches for every backend
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    def batch(source, gen):
        starts = torch.randint(0, len(source) - args.seq_len - 1, (args.batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(args.seq_len + 1)
        chunk = source[idx].to(device)
        return chunk[:, :-1], chunk[:, 1:]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    warmup = min(5, args.steps - 1)  # compile and autotune time is not throughput
    losses, t_start = [], None
    print(f"{backend}:")
    for step in range(1, args.steps + 1):
        if step == warmup + 1:
            sync()
            t_start = time.perf_counter()
        x, y = batch(train_data, batches)
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        with amp:
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps:
            sync()
            elapsed = time.perf_counter() - t_start if t_start is not None else 0.0
            measured = step - warmup
            tok_s = measured * args.batch_size * args.seq_len / elapsed if elapsed > 0 else 0.0
            progress(step, args.steps, loss.item(), tok_s)
    print()
    model.eval()
    val_gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad(), amp:
        val = [F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).item()
               for x, y in (batch(val_data, val_gen) for _ in range(8))]
    tail = losses[-min(20, len(losses)):]
    return {
        "backend": backend,
        "final_train_loss": sum(tail) / len(tail),
        "val_loss": sum(val) / len(val),
        "tokens_per_s": tok_s,
        "steps": args.steps,
        "finite": all(math.isfinite(v) for v in losses + val),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=[*ATTN_IMPLS, "all"], default="all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name in ("d_model", "n_layers", "n_heads", "kv_n_heads", "seq_len", "batch_size", "steps"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA, off for CPU)")
    parser.add_argument("--json", type=Path, default=None, help="write the results table as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    for key, value in PRESETS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.amp is None:
        args.amp = device.type == "cuda"

    text = make_corpus(seed=args.seed)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    backends = list(ATTN_IMPLS) if args.backend == "all" else [args.backend]
    print(f"{len(text)} characters, vocab {len(chars)}; d_model {args.d_model}, {args.n_layers} layers, "
          f"{args.n_heads} heads ({args.kv_n_heads} kv), seq {args.seq_len}, batch {args.batch_size}, "
          f"{args.steps} steps on {device}{' (bf16 autocast)' if args.amp else ''}")
    results = [train(b, args, data, len(chars), device) for b in backends]

    print(f"\n{'backend':<8} {'train loss':>10} {'val loss':>9} {'tokens/s':>11}")
    for r in results:
        print(f"{r['backend']:<8} {r['final_train_loss']:>10.4f} {r['val_loss']:>9.4f} {r['tokens_per_s']:>11.0f}")
    if args.json is not None:
        meta = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
        try:
            import triton

            meta["triton"] = triton.__version__
        except ImportError:
            pass
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"config": config, "meta": meta, "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r["finite"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
