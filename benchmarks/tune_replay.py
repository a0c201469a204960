"""Replay the tuner's search on measured timings: how often does a study of N trials find a
config within 5% of the exhaustive best? Runs on the CPU in seconds.

An exhaustive study (`nsa-gen tune --trials 100000`, e.g. the one gpu_tune_all.sh runs)
holds the measured time of every config of a kernel's pruned space at one shape. This
script runs the real `Tuner` (sampler, seeds, repeat handling, local search) against a
fake runner that answers each config with its measured time, for many sampler seeds, and
reports the distribution of best-found / exhaustive-best. It measures the search strategy
on a real landscape, not the GPU: timing noise between runs is not replayed.

    python benchmarks/tune_replay.py sqlite:///tall.db [--trials 40] [--seeds 30]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nsa_gen.db import DeviceKey, TuningDB  # noqa: E402
from nsa_gen.tuning.trial import ERROR, OK, TrialResult  # noqa: E402
from nsa_gen.tuning.tuner import Tuner  # noqa: E402

# Devices whose studies can be replayed: a study's configs passed its device's pruning.
KNOWN_DEVICES = (DeviceKey("sm90", 132, 140, "NVIDIA H200"),)


def replay(times: dict, stem: str, spec, T: int, trials: int, seed: int, device,
           jobs: int = 1) -> float:
    """Best measured time a `trials`-trial study finds, replaying `times` (config -> ms)."""
    def runner(req):
        ms = times.get(req.config)
        return TrialResult(OK, ms=ms) if ms is not None else TrialResult(ERROR, message="not measured")

    with tempfile.TemporaryDirectory() as tmp:
        with Tuner(spec, db=TuningDB(Path(tmp) / "db"), device=device, runner=runner,
                   storage="memory", torch_device="cuda", seed=seed, progress=False, jobs=jobs,
                   prewarm=lambda reqs: {}) as tuner:
            tuner.seed_dbs = [tuner.db]  # no shipped winners: the search alone
            res = tuner.tune(stem, T, 1, trials)
    return res.entry.ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("storage", help="Optuna storage URL of an exhaustive tuning run")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--jobs", type=int, default=8,
                    help="configs asked per round, as `nsa-gen tune --jobs` (default 8)")
    args = ap.parse_args(argv)

    import optuna
    from tune_evidence import read_studies

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("nsa_gen").setLevel(logging.ERROR)
    for o in read_studies(args.storage):
        # The study's own device: its configs passed that device's static pruning.
        device = next((d for d in KNOWN_DEVICES if d.id == o.id.device_id), None)
        if o.spec is None or device is None or not o.results:
            print(f"{o.name}: unknown spec or device, or nothing measured; skipped")
            continue
        best = min(o.results.values())
        ratios = [replay(o.results, o.id.kernel, o.spec, o.id.T, args.trials, s, device,
                         args.jobs) / best
                  for s in range(args.seeds)]
        within = sum(r <= 1.05 for r in ratios)
        print(f"{o.id.kernel} {o.spec.name} T={o.id.T}: {len(o.results)} configs measured; "
              f"{args.trials} trials x {args.seeds} seeds: within 5% in {within}/{args.seeds}, "
              f"median ratio {statistics.median(ratios):.3f}, worst {max(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
