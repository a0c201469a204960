"""Probe: the whole `nsa()` forward (inference: the selected kernel stores the gated sum)
with one kernel's config from the dispatcher against the same config with some params
changed, on the GPU, in one process, on the benchmark's random inputs.

The tuner times each kernel alone, and `selection_fwd` ungated; inside nsa() the group-centric
selected kernel also reads o_cmp and the gates in its epilogue (GATED), which changes its
registers and its memory traffic, so another tile may win there.

Each run `SPEC:STEM:P=V[,P=V...]` times nsa() with the dispatcher's configs ("base_ms") and
with STEM's config so changed ("variant_ms"), then the base again ("base_again_ms"), do_bench
medians; "max_abs_diff" compares the outputs (another tile sums in another order, so they
need not be bit-identical).

Usage: python benchmarks/nsa_variant_probe.py [--seqlen 65536] [--out DIR] fla-compat:selection_fwd:BLOCK_N=64 ...
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.config import parse_assignments  # noqa: E402
from probe_main import error_line, probe_main, random_nsa_args  # noqa: E402


class _Override:
    """A dispatcher: the default one's configs, STEM's with `changes` applied, and those of
    the keys that fall back to STEM (selection_fwd_gated, which nsa() asks for without
    autograd, for STEM selection_fwd)."""

    def __init__(self, stem: str, changes: dict):
        from nsa_gen.db.dispatch import default_dispatcher
        self.inner, self.stem, self.changes = default_dispatcher(), stem, changes

    def get(self, stem, spec, T, B=1, device=None):
        from nsa_gen.kernels import kernel_def
        cfg = self.inner.get(stem, spec, T, B, device)
        mine = self.stem in (stem, kernel_def(stem).fallback)
        return cfg.replace(**self.changes) if mine else cfg


def probe(run: str, T: int) -> dict:
    from nsa_gen import api
    from nsa_gen.db.dispatch import default_dispatcher
    from nsa_gen.spec import load_spec
    name, stem, overrides = (run.split(":", 2) + [""])[:3]
    spec = load_spec(name)
    changes = parse_assignments(filter(None, overrides.split(",")))
    variant = _Override(stem, changes)
    row = {"spec": name, "stem": stem, "T": T,
           "base": str(default_dispatcher().get(stem, spec, T, 1)),
           "variant": str(variant.get(stem, spec, T, 1))}
    args = random_nsa_args(spec, T)

    def fwd(dispatcher=None):
        return api.nsa(*args, spec=spec, dispatcher=dispatcher)
    want = fwd()
    row["base_ms"] = _bench(fwd)
    try:
        got = fwd(variant)
        row["variant_ms"] = _bench(lambda: fwd(variant))
        row["max_abs_diff"] = float((got.double() - want.double()).abs().max())
    except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
        row["variant_error"] = error_line(e)
    row["base_again_ms"] = _bench(fwd)
    return row


if __name__ == "__main__":
    sys.exit(probe_main("nsa_variant_probe", "SPEC:STEM:P=V[,P=V...]", probe))
