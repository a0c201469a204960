"""Probe: can torch's cuDNN attention run NSA's sliding window faster than the generated
kernel (window_fwd), on an H200?

Token t sees keys (t - w, t]. Cut the tokens from w on into chunks of C: chunk c's queries
(C rows) see keys in the span [w + c C - w, w + c C + C) of C + w keys, query i the keys
i + 1 .. i + w of its span. The spans overlap, so k seen as [n, H, C + w, DK] with a batch
stride of C rows is a strided view (no copy); a [C, C + w] additive band mask (0 / -inf,
broadcast) is the window. cuDNN computes the masked scores too: (C + w) / w of the window's
work. Each run C times the chunked call (tokens w.. only) against window_fwd (all tokens) and
compares the outputs on the tokens both compute.

With --backward it also times cuDNN's attention backward of the same chunked call (from its
own o and lse) plus the fold that sums each key's gradient over the (C + w) / C spans that
hold it, against window_bwd (DB config, all tokens), and compares dq on the chunked rows. The
first w tokens (one causal call in a real op) are in neither cuDNN timing.

Usage: python benchmarks/cudnn_swa_probe.py [--seqlen 65536] [--out DIR] [--backward] deepseek-nsa:128 ...
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from probe_main import probe_main, random_qkv  # noqa: E402


def probe(run: str, T: int, backward: bool = False) -> dict:
    import torch

    from nsa_gen.api import _configs
    from nsa_gen.ops.window import window_fwd
    from nsa_gen.spec import load_spec

    name, C = run.split(":")
    C = int(C)
    spec = load_spec(name)
    w = spec.w
    dev, dt = "cuda", torch.bfloat16
    q, k, v = random_qkv(spec, T)
    cfg = _configs(spec, T, 1, None)("window_fwd")
    row = {"spec": name, "T": T, "C": C, "config": str(cfg)}
    o_ref = window_fwd(q, k, v, spec, cfg)[0]
    row["ours_ms"] = _bench(lambda: window_fwd(q, k, v, spec, cfg))
    n = (T - w) // C
    qv = q[0, w: w + n * C].view(n, C, spec.HQ, spec.DK).permute(0, 2, 1, 3)

    def span(x):
        D = x.shape[-1]
        return x[0].as_strided((n, spec.H, C + w, D), (C * spec.H * D, D, spec.H * D, 1))
    kv, vv = span(k), span(v)
    i = torch.arange(C, device=dev)[:, None]
    j = torch.arange(C + w, device=dev)[None, :]
    band = torch.zeros(C, C + w, device=dev, dtype=dt).masked_fill(~((j > i) & (j <= i + w)), float("-inf"))
    bias = band.expand(n, spec.HQ, C, C + w)

    def run_cudnn():
        return torch.ops.aten._scaled_dot_product_cudnn_attention(
            qv, kv, vv, bias, False, 0.0, False, False, scale=spec.softmax_scale)[0]
    try:
        o = run_cudnn()
        got = o.permute(0, 2, 1, 3).reshape(n * C, spec.HQ, spec.DV)
        row["err_o"] = (got.float() - o_ref[0, w: w + n * C].float()).abs().max().item()
        row["o_stride"] = str(o.stride())
        row["cudnn_ms"] = _bench(run_cudnn)
        if backward:
            time_backward(row, spec, cfg, q, k, v, o_ref, qv, kv, vv, bias, n, C)
    except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
        row["cudnn_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    torch.cuda.synchronize()
    return row


def time_backward(row, spec, cfg, q, k, v, o_win, qv, kv, vv, bias, n, C) -> None:
    import torch

    from nsa_gen.api import _configs
    from nsa_gen.ops.window import window_bwd, window_fwd
    T, w = q.shape[1], spec.w
    do = torch.randn_like(o_win)
    _, lse_win = window_fwd(q, k, v, spec, cfg)
    bcfg = _configs(spec, T, 1, None)("window_bwd")
    row["bwd_config"] = str(bcfg)
    dq_ref = window_bwd(q, k, v, o_win, lse_win, do, spec, bcfg)[0]
    row["ours_bwd_ms"] = _bench(lambda: window_bwd(q, k, v, o_win, lse_win, do, spec, bcfg))
    fwd = torch.ops.aten._scaled_dot_product_cudnn_attention(
        qv, kv, vv, bias, True, 0.0, False, False, scale=spec.softmax_scale)
    o, lse = fwd[0], fwd[1]
    dov = do[0, w: w + n * C].view(n, C, spec.HQ, spec.DV).permute(0, 2, 1, 3)
    seed = torch.zeros((), dtype=torch.int64, device=q.device)

    def run():
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dov, qv, kv, vv, o, lse, seed, seed, bias, None, None, C, C + w, 0.0, False,
            scale=spec.softmax_scale)
        # Fold: key row c * C + i of chunk c's span; C divides w, so span piece j of chunk c
        # is rows (c + j) * C .. + C.
        out = [torch.zeros(n + w // C, C, spec.H, x.shape[-1], device=q.device, dtype=torch.float32)
               for x in (dk, dv)]
        for acc, x in zip(out, (dk, dv)):
            for j in range(w // C + 1):
                acc[j: j + n] += x[:, :, j * C:(j + 1) * C].permute(0, 2, 1, 3).float()
        return dq, out
    dq, _ = run()
    got = dq.permute(0, 2, 1, 3).reshape(n * C, spec.HQ, spec.DK)
    row["err_dq"] = (got.float() - dq_ref[0, w: w + n * C].float()).abs().max().item()
    row["cudnn_bwd_ms"] = _bench(run)


if __name__ == "__main__":
    sys.exit(probe_main("cudnn_swa_probe", "SPEC:C", probe,
                        {"backward": "also time cuDNN's attention backward of the same chunked call"}))
