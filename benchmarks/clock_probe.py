"""Does a kernel's time depend on how long the GPU has been busy? The tuner times a config
with `bench_timer` (a median of ~5 L2-flushed runs after ~10 ms of warm-up); the benchmark
with do_bench (25 ms warm-up, 100 ms of runs), after the baselines' long full-attention
runs. For deepseek-nsa's top-n at 64k the two disagreed (RESULTS run 50: 7.69 ms in the
study, 9.26 in the benchmark, same config).

Each run `SPEC:STEM` times the dispatched config of kernel STEM on the same inputs:
  cold_tuner   bench_timer after 2 s idle;
  cold_bench   do_bench (rep 100 ms) after 2 s idle;
  hot_bench    do_bench right after HEAT_S (3) seconds of back-to-back launches of the kernel;
  hot_tuner    bench_timer right after the same heat;
  long_bench   do_bench with rep 2000 ms (a sustained load's steady state);
and, for each phase, the SM clock (MHz) and power (W) that `nvidia-smi -lms 50` sampled
while it ran (mean and min; null where nvidia-smi is missing).

Usage: python benchmarks/clock_probe.py [--seqlen 65536] [--out DIR] SPEC:STEM ...
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from probe_main import dispatched_case, probe_main  # noqa: E402

HEAT_S = 3.0  # seconds of load before the hot phases: the H100 reaches its power cap in less


class Sampler:
    """nvidia-smi's SM clock and power every 50 ms, in the background, with host times."""

    def __init__(self):
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                 "-lms", "50"], stdout=subprocess.PIPE, text=True, bufsize=1)
        except OSError:
            self.proc = None
        self.samples: list[tuple[float, float, float]] = []
        if self.proc:
            import threading
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                mhz, watts = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), mhz, watts))

    def window(self, t0: float, t1: float) -> dict:
        got = [(m, w) for t, m, w in self.samples if t0 <= t <= t1]
        if not got:
            return {"sm_mhz_mean": None, "sm_mhz_min": None, "watts_mean": None}
        return {"sm_mhz_mean": round(sum(m for m, _ in got) / len(got)), "sm_mhz_min": min(m for m, _ in got),
                "watts_mean": round(sum(w for _, w in got) / len(got))}

    def close(self):
        if self.proc:
            self.proc.terminate()


SAMPLER: Sampler | None = None


def probe(run: str, T: int) -> dict:
    global SAMPLER
    import torch
    from triton.testing import do_bench

    from nsa_gen.tuning.trial import bench_timer
    SAMPLER = SAMPLER or Sampler()
    name, stem = run.split(":")
    spec, cfg, case = dispatched_case(name, stem, T)
    fn = lambda: case.run(cfg)  # noqa: E731
    fn()
    torch.cuda.synchronize()

    def heat():
        end = time.time() + HEAT_S
        while time.time() < end:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()

    phases = [("cold_tuner", lambda: time.sleep(2), lambda: bench_timer(fn)),
              ("cold_bench", lambda: time.sleep(2), lambda: do_bench(fn, rep=100, return_mode="median")),
              ("hot_bench", heat, lambda: do_bench(fn, rep=100, return_mode="median")),
              ("hot_tuner", heat, lambda: bench_timer(fn)),
              ("long_bench", lambda: None, lambda: do_bench(fn, rep=2000, return_mode="median"))]
    row = {"run": run, "T": T, "config": str(cfg), "heat_s": HEAT_S, "gpu": torch.cuda.get_device_name()}
    for label, before, timed in phases:
        before()
        t0 = time.time()
        ms = float(timed())
        t1 = time.time()
        row[label] = {"ms": round(ms, 4), **SAMPLER.window(t0, t1)}
    return row


if __name__ == "__main__":
    try:
        sys.exit(probe_main("clock_probe", "SPEC:STEM (a built-in spec, a kernel stem)", probe))
    finally:
        if SAMPLER:
            SAMPLER.close()
