"""Probe: the forced blocks' state computed by top-n's kernel (`topn_forced`), on the GPU.

Each run `SPEC[:P=V,...]` takes the dispatcher's topn and selection_fwd configs at --seqlen
(selection_fwd's params replaced as given, e.g. SHARE=1) and times, do_bench medians on bf16
inputs run through the forward's own steps (compressed keys, compression_fwd's lse, top-n):
- "topn_ms" top-n alone, "topn_forced_ms" with the forced state ("topn_forced_ms_W_S" with
  W warps and S stages instead of the config's);
- "slc_ms" the selected forward of the dispatched config, "slc_state_ms" the variant's
  starting from topn_forced's state;
- "nsa_ms" / "nsa_state_ms": nsa()'s inference forward (every branch gated) with the
  dispatched configs and top-n computing no state, and with the variant's selection config
  and the state from top-n.
"idx_equal" and "rel_err" compare the lists and the selected output of both paths.

Usage: python benchmarks/forced_state_probe.py [--seqlen 65536] [--out DIR] fla-compat ...
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.config import parse_assignments  # noqa: E402
from probe_main import probe_main  # noqa: E402


class _Override:
    """A dispatcher that hands out the default one's configs, selection_fwd's as given."""

    def __init__(self, base, slc):
        self.base, self.slc = base, slc

    def get(self, stem, spec, T, B):
        return self.slc if stem == "selection_fwd" else self.base.get(stem, spec, T, B)


def probe(run: str, T: int) -> dict:
    import torch

    from nsa_gen import api
    from nsa_gen.db.dispatch import default_dispatcher
    from nsa_gen.ops.compression import compress_mean, compression_fwd
    from nsa_gen.ops.selection import selection_fwd, topn, topn_forced
    from nsa_gen.spec import load_spec
    name, overrides = (run.split(":", 1) + [""])[:2]
    spec, disp = load_spec(name), default_dispatcher()
    cfg = lambda stem: disp.get(stem, spec, T, 1)  # noqa: E731
    slc = cfg("selection_fwd")
    var = slc.replace(**parse_assignments(filter(None, overrides.split(","))))
    row = {"spec": name, "T": T, "topn": str(cfg("topn")), "slc": str(slc), "variant": str(var)}
    g = torch.Generator(device="cuda").manual_seed(T)
    q, k, v = (torch.randn(1, T, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
               for h, d in ((spec.HQ, spec.DK), (spec.H, spec.DK), (spec.H, spec.DV)))
    k_cmp, _ = compress_mean(k, spec.l, spec.d)
    v_cmp, _ = compress_mean(v, spec.l, spec.d)
    lse_cmp = compression_fwd(q, k_cmp, v_cmp, spec, cfg("compression_fwd"))[1]
    tcfg = cfg("topn")
    idx = topn(q, k_cmp, lse_cmp, spec, tcfg)
    idx_f, state = topn_forced(q, k, v, k_cmp, lse_cmp, spec, tcfg)
    row["idx_equal"] = bool(torch.equal(idx, idx_f))
    kw = dict(canonical=True, forced_listed=True)
    want = selection_fwd(q, k, v, idx, spec, slc, **kw)[0].float()
    got = selection_fwd(q, k, v, idx_f, spec, var, forced_state=state, **kw)[0].float()
    row["rel_err"] = float((got - want).norm() / want.norm())
    row["topn_ms"] = _bench(lambda: topn(q, k_cmp, lse_cmp, spec, tcfg))
    row["topn_forced_ms"] = _bench(lambda: topn_forced(q, k, v, k_cmp, lse_cmp, spec, tcfg))
    for warps, stages in ((4, 3), (8, 2), (8, 3)):
        alt = tcfg.replace(num_warps=warps, num_stages=stages)
        try:
            row[f"topn_forced_ms_{warps}_{stages}"] = _bench(
                lambda: topn_forced(q, k, v, k_cmp, lse_cmp, spec, alt))
        except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
            row[f"topn_forced_error_{warps}_{stages}"] = type(e).__name__
    row["slc_ms"] = _bench(lambda: selection_fwd(q, k, v, idx, spec, slc, **kw))
    # The state is overwritten by each run: the same work, on other numbers.
    row["slc_state_ms"] = _bench(lambda: selection_fwd(q, k, v, idx_f, spec, var, forced_state=state, **kw))
    gates = [torch.sigmoid(torch.randn(1, T, spec.HQ, device="cuda", dtype=torch.bfloat16,
                                       generator=g)) if spec.has(b) else None
             for b in ("cmp", "slc", "swa")]
    rule = api.forced_in_topn
    try:
        api.forced_in_topn = lambda *a: False
        row["nsa_ms"] = _bench(lambda: api.nsa(q, k, v, *gates, spec=spec))
        api.forced_in_topn = rule
        over = _Override(disp, var)
        row["nsa_state_ms"] = _bench(lambda: api.nsa(q, k, v, *gates, spec=spec, dispatcher=over))
    finally:
        api.forced_in_topn = rule
    torch.cuda.synchronize()
    return row


if __name__ == "__main__":
    sys.exit(probe_main("forced_state_probe", "SPEC[:P=V,...]", probe))
