"""A/B (GPU): nsa()'s inference forward with the window branch beside the query-batched
selection on a side stream (api.WINDOW_BESIDE) against one stream, in one process, in
alternating runs; outputs compared bitwise (the same kernels on the same inputs).

Usage: python benchmarks/beside_ab.py [--seqlen 65536] [--out DIR] small-group mqa
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen import api  # noqa: E402
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.spec import load_spec  # noqa: E402
from probe_main import probe_main  # noqa: E402


def ab(name: str, T: int, rounds: int = 3) -> dict:
    spec = load_spec(name)
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)
    q, k, v = rnd(1, T, spec.HQ, spec.DK), rnd(1, T, spec.H, spec.DK), rnd(1, T, spec.H, spec.DV)
    gates = [torch.sigmoid(rnd(1, T, spec.HQ)) if spec.has(b) else None for b in ("cmp", "slc", "swa")]
    row = {"spec": name, "T": T, "beside_ms": [], "serial_ms": []}
    outs = {}
    for _ in range(rounds):
        for flag, key in ((True, "beside_ms"), (False, "serial_ms")):
            api.WINDOW_BESIDE = flag
            outs[flag] = api.nsa(q, k, v, *gates, spec=spec)
            row[key].append(_bench(lambda: api.nsa(q, k, v, *gates, spec=spec)))
    api.WINDOW_BESIDE = True
    row["same"] = bool(torch.equal(outs[True], outs[False]))
    return row


if __name__ == "__main__":
    sys.exit(probe_main("beside_ab", "SPEC", ab))
