"""Probe: the compressed attention and top-n in one kernel (topn CMP = 1) against the two
kernels nsa() runs otherwise, on the GPU.

Each run `SPEC[:P=V,...]` takes the dispatcher's topn config at --seqlen with the params
replaced (e.g. CMP=1,BLOCK_T=16) and times, do_bench medians on the same bf16 inputs:
"base_ms" compression_fwd then topn with the dispatched configs (compression_topn with the
dispatched topn config, CMP 0), "cmp_ms" and "topn_ms" each of those kernels alone, and
"variant_ms" compression_topn with the variant. The variant's (indices, o_cmp) are compared
with the base's: "rows_equal" is the share of [token, kv head] rows whose indices agree,
"max_abs_diff" the largest difference (indices or o_cmp).

Usage: python benchmarks/cmp_topn_probe.py [--seqlen 65536] [--out DIR] fla-compat:CMP=1 ...
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.config import parse_assignments  # noqa: E402
from probe_main import probe_main  # noqa: E402


def probe(run: str, T: int) -> dict:
    import torch

    from nsa_gen import naive
    from nsa_gen.db.dispatch import default_dispatcher
    from nsa_gen.ops.compression import compression_fwd
    from nsa_gen.ops.selection import compression_topn, topn
    from nsa_gen.spec import load_spec
    name, overrides = (run.split(":", 1) + [""])[:2]
    spec = load_spec(name)
    disp = default_dispatcher()
    base, cmp_cfg = disp.get("topn", spec, T, 1), disp.get("compression_fwd", spec, T, 1)
    cfg = base.replace(**parse_assignments(filter(None, overrides.split(","))))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, T, h, d, generator=gen, device="cuda").to(torch.bfloat16)
               for h, d in ((spec.HQ, spec.DK), (spec.H, spec.DK), (spec.H, spec.DV)))
    k_cmp = naive.naive_compress(k.float(), spec.l, spec.d).to(q.dtype)
    v_cmp = naive.naive_compress(v.float(), spec.l, spec.d).to(q.dtype)
    row = {"spec": name, "T": T, "base": str(base), "cmp": str(cmp_cfg), "variant": str(cfg)}
    o0, lse0, idx0 = compression_topn(q, k_cmp, v_cmp, spec, cmp_cfg, base)
    row["base_ms"] = _bench(lambda: compression_topn(q, k_cmp, v_cmp, spec, cmp_cfg, base))
    row["cmp_ms"] = _bench(lambda: compression_fwd(q, k_cmp, v_cmp, spec, cmp_cfg))
    row["topn_ms"] = _bench(lambda: topn(q, k_cmp, lse0, spec, base))
    try:
        o1, lse1, idx1 = compression_topn(q, k_cmp, v_cmp, spec, cmp_cfg, cfg)
        row["variant_ms"] = _bench(lambda: compression_topn(q, k_cmp, v_cmp, spec, cmp_cfg, cfg))
    except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
        row["variant_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        return row
    row["rows_equal"] = float((idx0 == idx1).all(-1).float().mean())
    row["o_max_abs_diff"] = float((o0.double() - o1.double()).abs().max())
    finite = torch.isfinite(lse0)
    row["lse_same_inf"] = bool(torch.equal(finite, torch.isfinite(lse1)))
    row["lse_max_abs_diff"] = float((lse0[finite] - lse1[finite]).abs().max())
    torch.cuda.synchronize()
    return row


if __name__ == "__main__":
    sys.exit(probe_main("cmp_topn_probe", "SPEC[:P=V,...]", probe))
