"""Probe: can torch's cuDNN attention run NSA's compressed attention faster than the
generated kernel (compression_fwd), on an H200?

Why it can: query t sees compressed block i iff i * d + l - 1 <= t. Write t = l - 1 + p * d + r
(0 <= r < d): the rule is i <= p, for every r. So for each residue r the queries
q[l - 1 + r :: d] and the NC compressed blocks form plain causal attention with Tq = Tk, and the
d residues are a batch: q' = q[l - 1 : l - 1 + NCF * d].view(NCF, d, HQ, DK) seen as
[d, HQ, NCF, DK] (a strided view, no copy; NCF = the blocks every residue reaches), k_cmp and
v_cmp broadcast over that batch (stride 0) or repeated. cuDNN runs DK != DV and GQA, and on
Hopper at ~600 TFLOP/s (NSA.md's full-attention numbers), against the generated kernel's
355-425 (RESULTS run 35).

Each spec at --seqlen, B = 1, bf16; do_bench medians, same inputs:
- ours_ms: compression_fwd with the dispatched config;
- cudnn_<kv>_ms: _scaled_dot_product_cudnn_attention on the view, kv "bcast" (stride-0 batch)
  or "rep" (k_cmp, v_cmp repeated d times, the repeat not timed), with the log-sum-exp;
- place_ms: copying its output and lse into [T, HQ, *] token order (what the op would add);
- flash_ms: the flash backend on the same view (DK == DV only), GQA by enable_gqa;
- err_o / err_lse: max abs difference from compression_fwd's over the tokens covered.

Usage: python benchmarks/cudnn_cmp_probe.py [--seqlen 65536] [--out DIR] fla-compat deepseek-nsa ...
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from probe_main import probe_main  # noqa: E402


def probe(name: str, T: int) -> dict:
    import torch
    import torch.nn.functional as F

    from nsa_gen.api import _configs
    from nsa_gen.ops.compression import compress_mean, compression_fwd
    from nsa_gen.spec import load_spec

    spec = load_spec(name)
    torch.manual_seed(T)
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, T, spec.HQ, spec.DK, device=dev, dtype=dt)
    k = torch.randn(1, T, spec.H, spec.DK, device=dev, dtype=dt)
    v = torch.randn(1, T, spec.H, spec.DV, device=dev, dtype=dt)
    cfg = _configs(spec, T, 1, None)
    k_cmp, _ = compress_mean(k, spec, cfg("compress_mean"))
    v_cmp, _ = compress_mean(v, spec, cfg("compress_mean"))
    l, d = spec.l, spec.d
    ncf = (T - l + 1) // d
    row = {"spec": name, "T": T, "NC": k_cmp.shape[1], "NCF": ncf,
           "schema": str(torch.ops.aten._scaled_dot_product_cudnn_attention.default._schema)[:300]}
    c = cfg("compression_fwd")
    o_ref, lse_ref = compression_fwd(q, k_cmp, v_cmp, spec, c)
    row["ours_ms"] = _bench(lambda: compression_fwd(q, k_cmp, v_cmp, spec, c))

    # [d, HQ, NCF, DK] view: batch r, head, position p, dim.
    qv = q[0, l - 1: l - 1 + ncf * d].view(ncf, d, spec.HQ, spec.DK).permute(1, 2, 0, 3)
    kc, vc = (x[0, :ncf].permute(1, 0, 2).unsqueeze(0) for x in (k_cmp, v_cmp))  # [1, H, NCF, D]
    kvs = {"bcast": (kc.expand(d, -1, -1, -1), vc.expand(d, -1, -1, -1)),
           "rep": (kc.expand(d, -1, -1, -1).contiguous(), vc.expand(d, -1, -1, -1).contiguous())}
    ref_o = o_ref[0, l - 1: l - 1 + ncf * d].view(ncf, d, spec.HQ, spec.DV)
    ref_lse = lse_ref[0, l - 1: l - 1 + ncf * d].view(ncf, d, spec.HQ)
    for kind, (kk, vv) in kvs.items():
        def run():
            return torch.ops.aten._scaled_dot_product_cudnn_attention(
                qv, kk, vv, None, True, 0.0, True, False, scale=spec.softmax_scale)
        try:
            out = run()
            o, lse = out[0], out[1]
            row[f"cudnn_{kind}_o_shape_stride"] = f"{tuple(o.shape)} {o.stride()}"
            row[f"cudnn_{kind}_lse_shape_stride"] = f"{tuple(lse.shape)} {lse.stride()}"
            o_tok = o.permute(2, 0, 1, 3)  # [NCF, d, HQ, DV]
            lse_tok = lse.reshape(d, spec.HQ, ncf).permute(2, 0, 1)
            row[f"cudnn_{kind}_err_o"] = (o_tok.float() - ref_o.float()).abs().max().item()
            row[f"cudnn_{kind}_err_lse"] = (lse_tok - ref_lse).abs().max().item()
            row[f"cudnn_{kind}_ms"] = _bench(run)
            full_o = torch.empty(1, T, spec.HQ, spec.DV, device=dev, dtype=dt)
            full_lse = torch.empty(1, T, spec.HQ, device=dev, dtype=torch.float32)

            def place():
                full_o[0, l - 1: l - 1 + ncf * d].view(ncf, d, spec.HQ, spec.DV).copy_(o_tok)
                full_lse[0, l - 1: l - 1 + ncf * d].view(ncf, d, spec.HQ).copy_(lse_tok)
            row[f"cudnn_{kind}_place_ms"] = _bench(place)
        except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
            row[f"cudnn_{kind}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if spec.DK == spec.DV:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kk, vv = kvs["bcast"]

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qv, kk, vv, is_causal=True, scale=spec.softmax_scale,
                                                      enable_gqa=True)
        try:
            o = flash()
            row["flash_err_o"] = (o.permute(2, 0, 1, 3).float() - ref_o.float()).abs().max().item()
            row["flash_ms"] = _bench(flash)
        except Exception as e:  # noqa: BLE001
            row["flash_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    torch.cuda.synchronize()
    return row


if __name__ == "__main__":
    sys.exit(probe_main("cudnn_cmp_probe", "SPEC", probe))
