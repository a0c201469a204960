"""Compile many configs at once: Triton's compiler is single-threaded, and on a GPU host a
tuning run spends most of its wall time compiling. `prewarm` launches each config once in
`jobs` spawned processes, so that the timed trials which follow load every kernel from
Triton's on-disk cache. It changes no result: a config that fails here fails again, and is
classified, in its own trial.

Prewarm launches run at min(T, CHECK_T) tokens, not at T: Triton specialises a kernel on
its integer arguments' divisibility by 16, which for the built-in specs is the same at
every power-of-two T >= 2048, and a small case keeps `jobs` copies of the inputs cheap.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
from dataclasses import replace
from typing import Iterable

from .trial import CHECK_T, TrialRequest

_CASES: dict[tuple, object] = {}


def _warm_one(req: TrialRequest) -> str | None:
    """Build (once per process) the case of req's shape and launch req's config; the
    failure message or None."""
    try:
        import torch
        case = _CASES.get(req.case_key)
        if case is None:
            _CASES.clear()
            case = _CASES[req.case_key] = req.build_case()
        case.run(req.config)
        if req.device.startswith("cuda"):
            torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - reported; the real trial classifies it
        return f"{type(e).__name__}: {e}"[:500]


def _ignore_sigint() -> None:
    # Ctrl-C (or `timeout -s INT`) reaches the whole process group: the tuner handles it
    # and terminates the pool, so workers need not die of it, each with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_jobs() -> int:
    """Half the CPU cores, at most 8: compiling is CPU-bound, and each process holds a CUDA
    context and one case's inputs."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class Prewarmer:
    """A pool of `jobs` spawned processes that compile configs ahead of their trials.
    Use as a context manager, or call close()."""

    def __init__(self, jobs: int | None = None, timeout_s: float = 600.0):
        self.jobs = jobs or default_jobs()
        self.timeout_s = timeout_s
        self._pool = None

    def __call__(self, reqs: Iterable[TrialRequest]) -> dict:
        """Compile the configs of `reqs` in parallel; {config: failure message or None}.
        A batch that runs past timeout_s (a hung kernel) loses the pool, which the next
        call replaces; the trials themselves still run under their own limits."""
        reqs = [replace(r, T=min(r.T, CHECK_T)) for r in reqs]
        if not reqs:
            return {}
        if self._pool is None:
            self._pool = mp.get_context("spawn").Pool(self.jobs, initializer=_ignore_sigint)
        try:
            msgs = self._pool.map_async(_warm_one, reqs, chunksize=1).get(self.timeout_s)
        except mp.TimeoutError:
            self.close()
            return {r.config: "prewarm timed out" for r in reqs}
        return {r.config: m for r, m in zip(reqs, msgs)}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "Prewarmer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
