"""Probe: Triton's automatic warp specialization on a kernel's main loop, on the GPU.

Renders `stem` for a spec with the config the dispatcher picks at --seqlen, rewrites the
generated source's main loops (`for i.. in range(...)`, not inner `_` loops) to
`tl.range(..., warp_specialize=True)`, and times both versions on the same inputs (do_bench
median), checking the rewritten one computes the same outputs. Not a template param: this
measures whether one is worth adding (Triton 3.6 may not apply it on sm90 at all: a
compile error is reported as such).

Usage: python benchmarks/ws_probe.py [--seqlen 65536] [--out DIR] SPEC:STEM ...
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen import kernels  # noqa: E402
from nsa_gen.benchmark import _bench  # noqa: E402
from probe_main import dispatched_case, probe_main, rewritten_source, time_variant  # noqa: E402

MAIN_LOOP = re.compile(r"for (i\w*) in range\((.*)\):")


def warp_specialized(src: str) -> str:
    return MAIN_LOOP.sub(r"for \1 in tl.range(\2, warp_specialize=True):", src)


def probe(run: str, T: int) -> dict:
    name, stem = run.split(":")
    spec, cfg, case = dispatched_case(name, stem, T)
    row = {"spec": name, "stem": stem, "T": T, "config": str(cfg)}
    src = kernels.kernel_source(stem, spec, cfg)
    row["loops"] = len(MAIN_LOOP.findall(src))
    base = [o.clone() for o in case.run(cfg)]
    row["plain_ms"] = _bench(lambda: case.run(cfg))
    with rewritten_source(stem, warp_specialized):
        time_variant(row, "ws", lambda: case.run(cfg), base)
    return row


if __name__ == "__main__":
    sys.exit(probe_main("ws_probe", "SPEC:STEM", probe))
