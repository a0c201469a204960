"""Probe: L2 eviction hints in the selected-attention forward, on the GPU.

The selected branch reads each token's chosen K/V blocks, mostly from L2 (a kv head's K/V is
33-42 MB at 64k); it was 12-14% slower on an H100 than on an H200 (session 23), whose L2 is
the same and whose HBM is faster, so some of those reads miss. Meanwhile the kernel streams
q in, o and lse out (and, gated, o_cmp, o_swa and the gates in): gigabytes that pass through
L2 once and evict K/V lines on their way. This rewrites the rendered selection_fwd module so
that every streamed load and every store carries `eviction_policy="evict_first"` (PTX
`L2::cache_hint` with an evict-first policy) and pointer loads of K/V (`p_k`, `p_v`: TMA = 0)
`evict_last`, and times the two modules on the same inputs. The hints change no result
(checked bit for bit).

Each run `SPEC[:P=V,...]` times, at --seqlen and B = 1: the selected kernel alone (the
dispatched config, params replaced as given), plain and hinted; and nsa()'s forward without
autograd (the gated selected kernel), plain and hinted.

Usage: python benchmarks/evict_probe.py [--seqlen 65536] [--out DIR] fla-compat fla-compat:TMA=0 ...
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen import kernels  # noqa: E402
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.config import parse_assignments  # noqa: E402
from probe_main import (dispatched_case, max_diff, probe_main, random_nsa_args,  # noqa: E402
                        rewritten_source, time_variant)

CALL = re.compile(r"tl\.(load|store)\(")
STREAMED = ("p_q", "g_slc", "g_cmp", "g_swa", "p_x", "o_swa", "p_o")
KV = ("p_k", "p_v")


def hinted(src: str) -> str:
    """src with an eviction_policy on each tl.load / tl.store call (see the module doc)."""
    out, pos = [], 0
    for m in CALL.finditer(src):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            i += 1
        ptr = re.match(r"\s*(\w+)", src[m.end():]).group(1)
        policy = ("evict_first" if m.group(1) == "store" or ptr in STREAMED
                  else "evict_last" if ptr in KV else None)
        if policy and "eviction_policy" not in src[m.start():i]:
            out.append(src[pos:i - 1] + f', eviction_policy="{policy}")')
            pos = i
    return "".join(out) + src[pos:]


def probe(run: str, T: int) -> dict:
    import torch

    from nsa_gen import api
    from nsa_gen.db.dispatch import default_dispatcher
    name, overrides = (run.split(":", 1) + [""])[:2]
    spec, cfg, case = dispatched_case(name, "selection_fwd", T)
    cfg = cfg.replace(**parse_assignments(filter(None, overrides.split(","))))
    row = {"spec": name, "T": T, "config": str(cfg)}
    row["hints"] = len(re.findall("eviction_policy", hinted(kernels.kernel_source("selection_fwd", spec, cfg))))
    want = [o.clone() for o in case.run(cfg)]
    row["kernel_ms"] = _bench(lambda: case.run(cfg))
    with rewritten_source("selection_fwd", hinted):
        time_variant(row, "kernel_hinted", lambda: case.run(cfg), want)

    # nsa() as served: no autograd, so the selected kernel stores the gated sum.
    args = random_nsa_args(spec, T)
    disp = default_dispatcher()
    real_get = disp.get
    disp.get = lambda stem, *a, **kw: cfg if stem == "selection_fwd" else real_get(stem, *a, **kw)
    try:
        with torch.no_grad():
            o = api.nsa(*args, spec=spec, dispatcher=disp)
            row["nsa_ms"] = _bench(lambda: api.nsa(*args, spec=spec, dispatcher=disp))
            with rewritten_source("selection_fwd", hinted):
                o2 = api.nsa(*args, spec=spec, dispatcher=disp)
                row["nsa_hinted_ms"] = _bench(lambda: api.nsa(*args, spec=spec, dispatcher=disp))
        row["nsa_max_abs_diff"] = max_diff(o, o2)
    finally:
        disp.get = real_get
    return row


if __name__ == "__main__":
    sys.exit(probe_main("evict_probe", "SPEC[:P=V,...]", probe))
