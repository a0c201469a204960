"""Probe: NSA's sliding window through torch's FlexAttention, on an H200.

FlexAttention compiles a block-sparse flash attention from a mask: with the band
t - w < s <= t as its mask_mod, `create_block_mask` marks the key blocks outside the band
empty and the kernel never visits them, so it does the window's real work, as cuDNN's own
band would (`cudnn_fe_window_probe.py`), with no dependency beyond torch. It takes GQA by
head counts (enable_gqa) and DK != DV. This probe times, at T tokens, B = 1, bf16:
- window_fwd (the DB's config) against the compiled flex_attention, with o and lse compared;
- with --backward, window_bwd against flex's backward (autograd of the compiled op), with
  dq, dk and dv compared.

Prediction: flex's Hopper forward runs near 400-500 TFLOP/s on dense causal work at head
dim 128; on the window's 1.37 TFLOP (deepseek-nsa, 64k) that is 2.8-3.5 ms against
window_fwd's 4.09, and 1.1-1.4 ms for small-group against 1.82. DK = 192 may pad to 256,
which would cost deepseek-nsa a quarter more QK work.

Usage: python benchmarks/flex_window_probe.py [--seqlen 65536] [--out DIR] [--backward] deepseek-nsa small-group
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from probe_main import max_diff, probe_main, random_qkv  # noqa: E402


def probe(name: str, T: int, backward: bool = False) -> dict:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from nsa_gen.api import _configs
    from nsa_gen.ops.window import window_bwd, window_fwd
    from nsa_gen.spec import load_spec

    spec = load_spec(name)
    row = {"spec": name, "T": T, "w": spec.w, "torch": torch.__version__}
    q, k, v = random_qkv(spec, T)
    cfg = _configs(spec, T, 1, None)("window_fwd")
    row["config"] = str(cfg)
    o_ref, lse_ref = window_fwd(q, k, v, spec, cfg)
    row["ours_ms"] = _bench(lambda: window_fwd(q, k, v, spec, cfg))
    w = spec.w

    def band(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < w)
    try:
        mask = create_block_mask(band, None, None, T, T, device="cuda")
        row["mask_sparsity"] = float(mask.sparsity())
        flex = torch.compile(flex_attention, dynamic=False)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

        def fwd():
            return flex(qt, kt, vt, block_mask=mask, scale=spec.softmax_scale, enable_gqa=True,
                        return_lse=True)
        o, lse = fwd()
        torch.cuda.synchronize()
        row["err_o"] = max_diff(o.transpose(1, 2), o_ref)
        row["err_lse"] = max_diff(lse.transpose(1, 2), lse_ref)
        row["flex_ms"] = _bench(fwd)
        if backward:
            do = torch.randn_like(o_ref)
            bcfg = _configs(spec, T, 1, None)("window_bwd")
            want = window_bwd(q, k, v, o_ref, lse_ref, do, spec, bcfg)
            row["ours_bwd_ms"] = _bench(lambda: window_bwd(q, k, v, o_ref, lse_ref, do, spec, bcfg))
            leaves = [x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v)]
            o_f = flex(*leaves, block_mask=mask, scale=spec.softmax_scale, enable_gqa=True)
            do_t = do.transpose(1, 2)

            def bwd():
                return torch.autograd.grad(o_f, leaves, do_t, retain_graph=True)
            got = bwd()
            for n, a, b in zip(("dq", "dk", "dv"), got, want):
                row[f"err_{n}"] = max_diff(a.transpose(1, 2), b)
                row[f"scale_{n}"] = float(b.float().abs().max())
            row["flex_bwd_ms"] = _bench(bwd)
    except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
        row["flex_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    torch.cuda.synchronize()
    return row


if __name__ == "__main__":
    sys.exit(probe_main("flex_window_probe", "SPEC", probe,
                        {"backward": "also window_bwd against flex's backward"}))
