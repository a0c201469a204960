"""Probe: nsa()'s forward (inference) with the launch options of the selected branch's
untuned kernels changed: the forced pass's warps (`ops.selection.FORCED_LAUNCH`) and the
query-batched combine kernel's warps and stages (`COMBINE_LAUNCH`), on the GPU, in one
process, on the benchmark's random inputs.

Each run `SPEC:forced_warps=W,combine_warps=W,combine_stages=S` (any subset) times nsa() with
the shipped options ("base_ms"), with the run's ("variant_ms"), then the base again, and
takes each kernel's GPU time inside the op both ways (`*_kernels`, profiler); "max_abs_diff"
compares the outputs (warps change reduction orders, so they need not be bit-identical).

Any other NAME=V of a run changes the gated selected kernel's config (selection_fwd_gated,
what nsa() asks for without autograd) in the variant, e.g. `fla-compat:FORCED=128,forced_warps=8`:
a forced tile of twice the rows may want twice the warps.

Usage: python benchmarks/launch_probe.py [--seqlen 65536] [--out DIR] small-group:combine_warps=8 ...
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.config import parse_assignments  # noqa: E402
from probe_main import error_line, kernel_ms, probe_main, random_nsa_args  # noqa: E402

STEM = "selection_fwd_gated"
KNOBS = {"forced_warps": ("FORCED_LAUNCH", "num_warps"),
         "combine_warps": ("COMBINE_LAUNCH", "num_warps"),
         "combine_stages": ("COMBINE_LAUNCH", "num_stages")}


def options(changes: dict, params: tuple = ()) -> dict:
    """{constant name: its dict with `changes` applied} for selection.py's launch constants.
    A name that is no knob must be one of `params` (config params, left to the caller)."""
    from nsa_gen.ops import selection
    out = {name: dict(getattr(selection, name)) for name, _ in KNOBS.values()}
    for knob, value in changes.items():
        if knob in params:
            continue
        if knob not in KNOBS:
            raise SystemExit(f"unknown knob {knob!r} (known: {', '.join(KNOBS)})")
        name, key = KNOBS[knob]
        out[name][key] = int(value)
    return out


def probe(run: str, T: int) -> dict:
    from nsa_gen import api
    from nsa_gen.ops import selection
    from nsa_gen.spec import load_spec
    from nsa_gen.kernels import kernel_def
    from nsa_variant_probe import _Override
    name, _, knobs = run.partition(":")
    spec = load_spec(name)
    changes = parse_assignments(filter(None, knobs.split(",")))
    params = tuple(kernel_def(STEM).space(spec))
    base, variant = options({}), options(changes, params)
    config = {k: v for k, v in changes.items() if k in params}
    row = {"spec": name, "T": T, "base": base, "variant": variant, "config": config}
    args = random_nsa_args(spec, T)
    dispatcher = None

    def use(opts: dict) -> None:
        for const, value in opts.items():
            setattr(selection, const, value)

    def fwd():
        return api.nsa(*args, spec=spec, dispatcher=dispatcher)

    def slc_kernels() -> dict:
        return {k: round(t, 4) for k, t in kernel_ms(fwd, 5).items() if k.startswith("nsa_selection")}
    want = fwd()
    row["base_ms"] = _bench(fwd)
    row["base_kernels"] = slc_kernels()
    try:
        use(variant)
        dispatcher = _Override(STEM, config) if config else None
        got = fwd()
        row["variant_ms"] = _bench(fwd)
        row["variant_kernels"] = slc_kernels()
        row["max_abs_diff"] = float((got.double() - want.double()).abs().max())
    except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
        row["variant_error"] = error_line(e)
    finally:
        use(base)
        dispatcher = None
    row["base_again_ms"] = _bench(fwd)
    return row


if __name__ == "__main__":
    sys.exit(probe_main("launch_probe", "SPEC:KNOB=V[,KNOB=V...]", probe))
