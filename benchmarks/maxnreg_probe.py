"""Probe: a kernel's launch with ptxas' register cap (Triton's `maxnreg` option), on the GPU.

ptxas gives the token-tile kernels of fla-compat (compression_fwd, the selected kernel's
forced pass) 184-214 registers a thread, and with their shared memory that leaves 2 programs
an SM (Nsight: no eligible warp in 56% of the cycles). Capped at 128 they compile without a
spill (benchmarks/resources.py), and smaller key tiles then fit 3-4 programs an SM.

Each run `SPEC:STEM[:P=V,...][:MAXNREG]` times the dispatcher's config at --seqlen
("base_ms") and that config with the params replaced, launched with maxnreg = MAXNREG (none if
left out) ("variant_ms"), on the same inputs, and compares their outputs
(probe_main.time_variant).

Usage: python benchmarks/maxnreg_probe.py [--seqlen 65536] [--out DIR] fla-compat:compression_fwd:BLOCK_C=32:128 ...
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.config import parse_assignments  # noqa: E402
from probe_main import dispatched_case, probe_main, time_variant  # noqa: E402


def with_maxnreg(maxnreg: int | None):
    """Make every forward launcher pass maxnreg (None: as the launchers do)."""
    from nsa_gen.ops import common, compression, selection, window

    def options(config) -> dict:
        opts = common.launch_options(config)
        return dict(opts, maxnreg=maxnreg) if maxnreg else opts
    for mod in (compression, selection, window):
        mod.launch_options = options


def probe(run: str, T: int) -> dict:
    name, stem, overrides, cap = (run.split(":") + ["", ""])[:4]
    _, base, case = dispatched_case(name, stem, T)
    variant = base.replace(**parse_assignments(filter(None, overrides.split(","))))
    row = {"spec": name, "stem": stem, "T": T, "base": str(base), "variant": str(variant),
           "maxnreg": int(cap) if cap else None}
    with_maxnreg(None)
    want = [o.clone() for o in case.run(base)]
    row["base_ms"] = _bench(lambda: case.run(base))
    with_maxnreg(int(cap) if cap else None)
    time_variant(row, "variant", lambda: case.run(variant), want)
    with_maxnreg(None)
    return row


if __name__ == "__main__":
    sys.exit(probe_main("maxnreg_probe", "SPEC:STEM[:P=V,...][:MAXNREG]", probe))
