"""A/B timing of source trees (each in a subprocess, default config, no autotune)."""
import json, os, subprocess, sys

CASES = [("nobias", 128, False, 1024, 16, 16), ("nobias", 128, False, 4096, 4, 16), ("nobias", 128, True, 4096, 4, 16),
         ("nobias", 64, False, 4096, 4, 32), ("bias", 64, False, 1024, 16, 32), ("bias", 64, True, 4096, 4, 32)]

def child():
    import torch, triton
    from tritonflash import flash_attn_func
    res = []
    for kind, d, causal, s, b, h in CASES:
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        bias = torch.randn(1, h, s, s, device="cuda", dtype=torch.bfloat16, requires_grad=True) if kind == "bias" else None
        do = torch.randn_like(q)
        fl = 4 * b * h * s * s * d / (2 if causal else 1)
        f = lambda: flash_attn_func(q, k, v, bias, causal)
        def fb():
            o = f(); o.backward(do)
        ms_f = triton.testing.do_bench(f, warmup=25, rep=100)
        ms_fb = triton.testing.do_bench(fb, warmup=25, rep=100, grad_to_none=[q, k, v] + ([bias] if bias is not None else []))
        res.append(dict(case=f"{kind} d{d} {'causal' if causal else 'full'} s{s}", fwd=round(fl / ms_f * 1e-9, 1), fwdbwd=round(3.5 * fl / ms_fb * 1e-9, 1)))
    print("RESULT " + json.dumps(res), flush=True)

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(); sys.exit(0)
    here = os.path.dirname(os.path.abspath(__file__))
    trees = sys.argv[1:] or ["bb405f1", "3313e44", "cur", "v5"]
    table = {}
    for t in trees:
        env = dict(os.environ, PYTHONPATH=os.path.join(here, t), TRITONFLASH_AUTOTUNE=os.environ.get("AT", "0"))
        p = subprocess.run([sys.executable, __file__, "child"], env=env, capture_output=True, text=True)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            print(t, "FAILED", p.stderr[-1500:]); continue
        table[t] = json.loads(line[0][7:])
        print(t, "done", flush=True)
    cases = [r["case"] for r in next(iter(table.values()))]
    print("case".ljust(28), " ".join(f"{t:>16}" for t in table))
    for i, c in enumerate(cases):
        print(c.ljust(28), " ".join(f"{table[t][i]['fwd']:>7}/{table[t][i]['fwdbwd']:<8}" for t in table))
