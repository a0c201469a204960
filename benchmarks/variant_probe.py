"""Probe: one kernel's config from the dispatcher against the same config with some params
changed (a structural variant, a tile), on the GPU, on the same inputs.

Each run `SPEC:STEM:P=V[,P=V...]` times the config the dispatcher picks at --seqlen
("base_ms") and that config with the params replaced ("variant_ms"), do_bench medians, and
compares their outputs (probe_main.time_variant): "same" (bit-identical), "max_abs_diff", and
for integer outputs (top-n's block indices) "rows_equal", the share of [token, head] rows that
agree (fp32 sums in another order may break a near-tie the other way).

Usage: python benchmarks/variant_probe.py [--seqlen 65536] [--out DIR] deepseek-nsa:topn:IMP=sum ...
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.config import parse_assignments  # noqa: E402
from probe_main import dispatched_case, probe_main, time_variant  # noqa: E402


def probe(run: str, T: int) -> dict:
    name, stem, overrides = (run.split(":", 2) + [""])[:3]
    _, base, case = dispatched_case(name, stem, T)
    variant = base.replace(**parse_assignments(filter(None, overrides.split(","))))
    row = {"spec": name, "stem": stem, "T": T, "base": str(base), "variant": str(variant)}
    want = [o.clone() for o in case.run(base)]
    row["base_ms"] = _bench(lambda: case.run(base))
    time_variant(row, "variant", lambda: case.run(variant), want)
    return row


if __name__ == "__main__":
    sys.exit(probe_main("variant_probe", "SPEC:STEM:P=V[,P=V...]", probe))
