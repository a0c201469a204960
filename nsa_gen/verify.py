"""`nsa-gen verify`: every generated kernel of a spec against the fp32 reference."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .config import Config
from .harness import OP, OP_DECODE, OP_VARLEN, make_case
from .kernels import KERNELS
from .spec import NSASpec


@dataclass(frozen=True)
class VerifyResult:
    kernel: str
    shape: str
    dtype: str
    rel_error: float
    tolerance: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.rel_error <= self.tolerance


def applicable_kernels(spec: NSASpec) -> list[str]:
    return [stem for stem, kd in KERNELS.items() if kd.applies(spec)]


def verify_targets(spec: NSASpec) -> list[str]:
    """Every kernel the spec uses, then the composed op (forward and backward), on one
    sequence and on packed sequences (cu_seqlens), and decode against a cache."""
    return applicable_kernels(spec) + [OP, OP_VARLEN, OP_DECODE]


def verify_spec(spec: NSASpec, *, T: int, B: int = 1, dtypes: list[torch.dtype],
                device: str, kernels: list[str] | None = None, seed: int = 0,
                db_seqlens: tuple[int, ...] = (), dispatcher=None,
                variants: bool = True) -> list[VerifyResult]:
    """Run each kernel on fresh random inputs and compare with naive.py: its default config
    and, in rows of their own, the default with each other structural variant (each a
    different algorithm the tuner may pick). Kernels the spec does not use are skipped,
    also when named in `kernels`. variants=False runs the default alone.

    db_seqlens: also run, in a row each, the config the tuning DB dispatches for each of
    these token counts (B rows), checked at T: a long-sequence entry is too slow to check
    against the reference at its own length. dispatcher: where those configs come from
    (default: `nsa_gen.db.default_dispatcher()`)."""
    results = []
    wanted = verify_targets(spec)
    shape = f"B={B} T={T} HQ={spec.HQ} H={spec.H} DK={spec.DK} DV={spec.DV}"
    for stem in [s for s in (kernels or wanted) if s in wanted]:
        if stem == OP_VARLEN and B != 1:
            continue  # packed sequences are one row
        runs: list[tuple[str, Config | None]] = [(stem, None)]
        if stem in KERNELS:
            kd = KERNELS[stem]
            default = kd.default(spec, T)
            seen = {kd.effective(kd.canonical(spec, default), T)}
            for cfg in kd.variants(spec, default) if variants else ():
                # e.g. splits longer than T (one pass), a param the variant does not read
                key = kd.effective(kd.canonical(spec, cfg), T)
                if key not in seen:
                    seen.add(key)
                    runs.append((f"{stem} " + " ".join(f"{n}={cfg[n]}" for n in kd.structural
                                                       if cfg[n] != default[n]), cfg))
            if db_seqlens:
                if dispatcher is None:
                    from .db import default_dispatcher
                    dispatcher = default_dispatcher()
                for n in db_seqlens:
                    cfg = dispatcher.get(stem, spec, n, B)
                    runs.append((f"{stem} db[T={n}] {cfg}", cfg))
        for dtype in dtypes:
            name = str(dtype).replace("torch.", "")
            case = None
            for label, cfg in runs:
                try:
                    case = case or make_case(stem, spec, T, B=B, dtype=dtype, device=device, seed=seed)
                    err = case.rel_error(case.run(cfg))
                    results.append(VerifyResult(label, shape, name, err, case.tolerance))
                except Exception as e:  # a failing kernel is a row of the table, not a crash
                    results.append(VerifyResult(label, shape, name, float("nan"), 0.0,
                                                f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"))
    return results


def verify_specs(runs: list[tuple[NSASpec, dict]], jobs: int = 1
                 ) -> Iterator[tuple[NSASpec, list[VerifyResult]]]:
    """`verify_spec(spec, **kwargs)` for each (spec, kwargs) of `runs`, yielded in order.
    jobs > 1 runs that many specs at once, each in a fresh process (spawned, so that each
    imports triton under this process's TRITON_INTERPRET): the interpreter uses one core.
    A worker that dies is a failing row of its spec, not a crash of the others."""
    if jobs <= 1 or len(runs) <= 1:
        for spec, kwargs in runs:
            yield spec, verify_spec(spec, **kwargs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(min(jobs, len(runs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(verify_spec, spec, **kwargs) for spec, kwargs in runs]
        for (spec, _), fut in zip(runs, futures):
            try:
                yield spec, fut.result()
            except Exception as e:
                yield spec, [VerifyResult("(all)", "", "", float("nan"), 0.0,
                                          f"worker failed: {type(e).__name__}: {e}")]


def format_table(spec_name: str, results: list[VerifyResult]) -> str:
    rows = [("spec", "kernel", "shape", "dtype", "rel error", "bound", "result")]
    for r in results:
        rows.append((spec_name, r.kernel, r.shape, r.dtype, f"{r.rel_error:.2e}", f"{r.tolerance:.0e}",
                     "pass" if r.ok else f"FAIL {r.error}".strip()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
