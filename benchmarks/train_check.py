"""Training check: a small language model trained with nsa-gen's NativeSparseAttention and,
from the same initial weights and on the same batches, with the fp32 reference attention
(naive.naive_nsa through api.reference_nsa). Their loss curves should agree within noise.

The task needs long-range retrieval: each sequence is random tokens whose second half
repeats the first, so the second half is predictable only by attending T/2 tokens back,
which the window cannot do and the compressed and selected branches must.

    python benchmarks/train_check.py --out out/train            # GPU, bf16 autocast
    python benchmarks/train_check.py --device cpu --steps 2 --T 64 --batch 2   # smoke test
    python benchmarks/train_check.py --device cpu --runs reference,reference-bf16io  # control

--runs picks the runs (first against second): "nsa-gen", "reference" (fp32 attention), and
"reference-bf16io", the fp32 reference with its inputs and output rounded to bf16, the least
rounding a bf16 kernel does: a control for how far rounding alone moves the curve.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nsa_gen import load_spec
from nsa_gen.api import NativeSparseAttention, reference_nsa

SPEC = dict(name="train-check", heads={"q": 8, "kv": 2}, head_dim={"k": 32, "v": 32},
            compression={"block": 16, "stride": 8}, selection={"block": 32, "top_n": 4},
            window=64, dtype="bfloat16")


def rope(q: torch.Tensor, k: torch.Tensor, cu_seqlens=None, base: float = 10000.0):
    """Rotary position embedding on the last dim (positions 0..T-1; no packing here)."""
    T, D = q.shape[1], q.shape[-1]
    inv = base ** (-torch.arange(0, D, 2, device=q.device, dtype=torch.float32) / D)
    ang = torch.arange(T, device=q.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]

    def rot(x):
        x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).to(x.dtype)
    return rot(q), rot(k)


class Block(nn.Module):
    def __init__(self, spec, d: int):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = NativeSparseAttention(spec, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, attention):
        x = x + self.attn(self.n1(x), rope=rope, attention=attention)
        return x + self.mlp(self.n2(x))


class TinyLM(nn.Module):
    def __init__(self, spec, vocab: int = 256, d: int = 256, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(spec, d) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, attention=None):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x, attention)
        return self.head(self.norm(x))


def reference_bf16io(q, k, v, *gates, **kwargs):
    """reference_nsa on inputs rounded to bf16, its output rounded to bf16 (then back to the
    caller's dtype): the rounding a bf16 kernel cannot avoid, without a kernel."""
    def rnd(x):
        return None if x is None else x.to(torch.bfloat16).to(x.dtype)
    o = reference_nsa(rnd(q), rnd(k), rnd(v), *map(rnd, gates), **kwargs)
    return rnd(o)


RUNS = {"nsa-gen": None, "reference": reference_nsa, "reference-bf16io": reference_bf16io}


def best_lag(a: list[float], b: list[float], last: int, max_lag: int = 10) -> dict | None:
    """The shift s (a[t] against b[t - s], |s| <= max_lag) that best aligns two curves over a
    window of `last` steps ending max_lag steps before the end (least mean |difference|), and
    the mean difference a - b there with and without it: a curve that is the other one
    delayed has a small difference once shifted. None for curves too short."""
    n = min(len(a), len(b))
    max_lag = max(0, min(max_lag, (n - 1) // 3))
    last = min(last, n - 2 * max_lag)
    if last <= 0:
        return None
    window = range(n - max_lag - last, n - max_lag)

    def stats(s):
        d = [a[t] - b[t - s] for t in window]
        return sum(d) / len(d), sum(abs(x) for x in d) / len(d), sum(x > 0 for x in d)
    lag = min(range(-max_lag, max_lag + 1), key=lambda s: (stats(s)[1], abs(s)))
    m0, _, p0 = stats(0)
    m1, a1, p1 = stats(lag)
    return {"window": [window.start, window.stop], "lag": lag, "mean_diff_lag0": m0,
            "a_higher_lag0": p0, "mean_diff_at_lag": m1, "mean_abs_diff_at_lag": a1,
            "a_higher_at_lag": p1}


def batches(steps: int, B: int, T: int, vocab: int, seed: int, device):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        half = torch.randint(2, vocab, (B, T // 2), generator=g)
        yield torch.cat([half, half], 1).to(device)


def train(attention, args, device) -> list[float]:
    torch.manual_seed(args.seed)
    spec = load_spec("small-group").replace(**SPEC)
    model = TinyLM(spec).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    losses = []
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
        torch.autocast("cpu", enabled=False)
    for step, x in enumerate(batches(args.steps, args.batch, args.T, 256, args.seed, device)):
        with amp:
            logits = model(x[:, :-1], attention)
            loss = F.cross_entropy(logits.float().reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"  step {step:4d} loss {losses[-1]:.4f}", flush=True)
    return losses


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="out/train")
    p.add_argument("--runs", default="nsa-gen,reference",
                   help="two of " + ", ".join(RUNS) + ", comma-separated")
    args = p.parse_args()
    runs = args.runs.split(",")
    if len(runs) != 2 or not set(runs) <= set(RUNS):
        p.error(f"--runs takes two of {', '.join(RUNS)}")
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves, secs = {}, {}
    for name in runs:
        attn = RUNS[name]
        print(f"{name}:", flush=True)
        t0 = time.time()
        curves[name] = train(attn, args, device)
        secs[name] = time.time() - t0
    a, b = curves[runs[0]], curves[runs[1]]
    tail = max(1, len(a) // 10)
    diff = [abs(x - y) for x, y in zip(a, b)]
    summary = {
        "steps": args.steps, "T": args.T, "batch": args.batch, "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "torch": torch.__version__, "first_loss": [a[0], b[0]],
        f"mean_last_{tail}": [sum(a[-tail:]) / tail, sum(b[-tail:]) / tail],
        "max_abs_diff": max(diff), "mean_abs_diff": sum(diff) / len(diff), "seconds": secs,
        "uniform_loss": math.log(254), "runs": runs,
        "lag_last_70": best_lag(a, b, 70),
    }
    print(json.dumps(summary, indent=1))
    stem = "train_check" if runs == ["nsa-gen", "reference"] else "_vs_".join(runs)
    (out / f"{stem}.json").write_text(json.dumps({"summary": summary, "curves": curves}))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, c in curves.items():
            ax.plot(c, label=name, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy")
        ax.set_title(f"TinyLM, copy task, T={args.T}, B={args.batch}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=110)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
