"""One tuning trial: build the kernel for a config, check it against the fp32 reference,
time it. `WorkerRunner` runs trials in a spawned worker process, because a kernel that
faults can poison the CUDA context of the process it ran in; a fault, hang or crash then
costs one restarted worker and one failed trial, never the study.

`python -m nsa_gen.tuning.trial STEM SPEC T [B] key=value...` runs one trial in-process
and prints its result, for debugging a single config by hand.
"""
from __future__ import annotations

import collections
import json
import multiprocessing as mp
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable

from ..config import Config, parse_assignments
from ..spec import NSASpec

# A timer takes a zero-argument callable and returns its time in ms.
Timer = Callable[[Callable[[], Any]], float]
# make_case(stem, spec, T, *, B, dtype, device, seed) -> object with run(config),
# rel_error(outputs) and tolerance (the interface of nsa_gen.harness.make_case).
CaseFactory = Callable[..., Any]

OK, WRONG = "ok", "wrong"
# The launch ran another config than the trial's (ops.common.fall_back: a cuDNN refusal, an
# optional library missing, a misaligned TMA input): its time is not the trial config's.
FELL_BACK = "fell_back"
COMPILE_ERROR, OUT_OF_RESOURCES, OUT_OF_MEMORY = "compile_error", "out_of_resources", "out_of_memory"
ERROR, TIMEOUT, CRASH, SETUP_FAILED = "error", "timeout", "crash", "setup_failed"
# After these the worker's CUDA context may be unusable, so the worker is replaced.
RESTART_AFTER = frozenset({ERROR, TIMEOUT, CRASH, SETUP_FAILED})


@dataclass(frozen=True)
class TrialRequest:
    """Run kernel `stem` with `config` for `spec` at shape (T, B) on torch device `device`,
    inputs of `dtype` (a name in spec.DTYPES) drawn from `seed`."""

    stem: str
    spec: NSASpec
    T: int
    B: int
    config: Config
    device: str = "cuda"
    seed: int = 0
    dtype: str | None = None  # None: the spec's dtype

    @property
    def case_key(self) -> tuple:
        return (self.stem, self.spec, self.T, self.B, self.device, self.seed, self.dtype)

    def build_case(self, T: int | None = None, make_case: CaseFactory | None = None) -> Any:
        """The case (inputs, launcher, reference) of this request's kernel and inputs, at
        T tokens (default: the request's); `make_case` defaults to the harness's."""
        import torch
        if make_case is None:
            from ..harness import make_case
        return make_case(self.stem, self.spec, self.T if T is None else T, B=self.B,
                         dtype=getattr(torch, self.dtype or self.spec.dtype), device=self.device,
                         seed=self.seed)


@dataclass(frozen=True)
class TrialResult:
    """status is OK (ms holds the median time) or why the config failed."""

    status: str
    ms: float | None = None
    rel_error: float | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK


def wall_timer(fn: Callable[[], Any], reps: int = 3) -> float:
    """Median wall-clock ms of `fn` over `reps` runs after one warm-up (CPU interpreter)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# A trial's timing budget. do_bench's defaults (warm up 25 ms, time 100 ms) cost a 1 ms
# kernel ~130 runs; a study of a 100 ms kernel at 128k tokens should not spend seconds per
# trial either. And do_bench times max(1, rep / estimate) runs after its own five-run
# estimate, so past rep / 5 ms its "median" is one run. Here the median is always over at
# least BENCH_MIN_REPS runs, and otherwise over about BENCH_REP_MS of them: for kernels long
# enough to get only the minimum (> 8 ms), the median of 5 L2-flushed runs is stable to ~1%,
# and such a trial costs ~7 runs instead of do_bench's 8 for one timed run.
BENCH_WARMUP_MS, BENCH_REP_MS, BENCH_MIN_REPS = 10.0, 40.0, 5


def bench_counts(estimate_ms: float, warmup_ms: float = BENCH_WARMUP_MS,
                 rep_ms: float = BENCH_REP_MS, min_reps: int = BENCH_MIN_REPS) -> tuple[int, int]:
    """(warm-up runs, timed runs) for a kernel of about `estimate_ms`: fill the budgets,
    with at least `min_reps` timed runs."""
    est = max(estimate_ms, 1e-3)
    return int(warmup_ms / est), max(min_reps, int(rep_ms / est))


def bench_timer(fn: Callable[[], Any]) -> float:
    """Median ms of `fn` over CUDA-event-timed runs with the L2 cache flushed before each
    (do_bench's method, with the run counts of `bench_counts`)."""
    import torch
    from triton import runtime
    drv = runtime.driver.active
    cache = drv.get_empty_cache_for_benchmark()
    clear = getattr(drv, "clear_cache", None) or (lambda c: c.zero_())  # older triton

    def timed() -> tuple[Any, Any]:
        clear(cache)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return start, end

    fn()  # first launch: loads the kernel, allocates; not timed
    torch.cuda.synchronize()
    start, end = timed()
    torch.cuda.synchronize()
    n_warmup, n_reps = bench_counts(start.elapsed_time(end))
    for _ in range(n_warmup):
        fn()
    events = [timed() for _ in range(n_reps)]
    torch.cuda.synchronize()
    return float(statistics.median(s.elapsed_time(e) for s, e in events))


def graph_timer(fn: Callable[[], Any]) -> float:
    """bench_timer over replays of `fn` captured in a CUDA graph: the GPU time of its
    launches without the launcher's CPU time, which for a kernel of tens of microseconds is
    larger than the kernel and the same for every config. A launcher that cannot be
    captured (it waits on the GPU, e.g. for a size) is timed as it is, by bench_timer."""
    import torch
    fn()  # compiles and allocates outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # noqa: BLE001 - any capture failure falls back to eager timing
        torch.cuda.synchronize()
        return bench_timer(fn)
    return bench_timer(graph.replay)


def classify(exc: BaseException) -> str:
    """Failure status of an exception raised while building or running a kernel."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "OutOfResources" in names:
        return OUT_OF_RESOURCES
    if names & {"CompilationError", "PTXASError", "UnsupportedLanguageConstruct"}:
        return COMPILE_ERROR
    if "OutOfMemoryError" in names:
        return OUT_OF_MEMORY
    return ERROR


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


CHECK_T = 2048


def default_timer(req: TrialRequest) -> Timer:
    """wall_timer on the interpreter; on a GPU graph_timer for a launch-bound kernel
    (KernelDef.launch_bound), else bench_timer."""
    if not req.device.startswith("cuda"):
        return wall_timer
    from ..kernels import KERNELS
    kd = KERNELS.get(req.stem)
    return graph_timer if kd is not None and kd.launch_bound else bench_timer


class TrialExecutor:
    """Runs trials in the calling process. Keeps the case (inputs and reference outputs) of
    the last shape, since building one costs more than a trial."""

    def __init__(self, timer: Timer | None = None, make_case: CaseFactory | None = None):
        self.timer = timer
        self.make_case = make_case
        self._case_key: tuple | None = None
        self._case: Any = None
        self._check: Any = None

    def prepare(self, req: TrialRequest) -> TrialResult | None:
        """Build the case of `req`'s shape if it is not the current one; a failed result if
        that fails, else None."""
        if self._case_key == req.case_key:
            return None
        self._case_key, self._case = None, None
        try:
            case = req.build_case(make_case=self.make_case)
            # The reference is quadratic in T: configs are checked at CHECK_T tokens (a config
            # is shape-independent code) and timed at the real shape.
            check = case if req.T <= CHECK_T else req.build_case(CHECK_T, self.make_case)
            # The fp32 reference is the slow part; build it here, under the setup time limit.
            reference = getattr(check, "reference", None)
            if callable(reference):
                reference()
            self._case, self._check = case, check
        except Exception as e:  # noqa: BLE001 - any failure here fails the shape, not the study
            return TrialResult(SETUP_FAILED, message=_short(e))
        self._case_key = req.case_key
        return None

    def __call__(self, req: TrialRequest) -> TrialResult:
        failed = self.prepare(req)
        if failed is not None:
            return failed
        case, check, cfg = self._case, self._check, req.config
        timer = self.timer or default_timer(req)
        fell_before = _fallbacks(req.stem)
        try:
            outs = check.run(cfg)
            _sync(req.device)
            err = float(check.rel_error(outs))
            if not err <= check.tolerance:  # also catches nan
                return TrialResult(WRONG, rel_error=err,
                                   message=f"relative error {err:.3g} > tolerance {check.tolerance:.3g}")
            ms = float(timer(lambda: case.run(cfg)))
            _sync(req.device)
        except Exception as e:  # noqa: BLE001 - classified and reported, never raised
            return TrialResult(classify(e), message=_short(e))
        fell = _fallbacks(req.stem) - fell_before
        if fell:
            return TrialResult(FELL_BACK, ms=ms, rel_error=err,
                               message="fell back: " + "; ".join(sorted(fell)))
        return TrialResult(OK, ms=ms, rel_error=err)


def _fallbacks(stem: str) -> collections.Counter:
    """The launches of kernel `stem` that fell back so far, by reason."""
    from ..ops.common import FALLBACK_COUNTS
    return collections.Counter({why: n for (s, why), n in FALLBACK_COUNTS.items() if s == stem})


def _sync(device: str) -> None:
    # Kernel faults surface asynchronously; make them surface inside this trial.
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def _worker_main(conn, timer: Timer | None, make_case: CaseFactory | None) -> None:
    ex = TrialExecutor(timer, make_case)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        kind, req = msg
        try:
            res = ex.prepare(req) if kind == "prepare" else ex(req)
        except BaseException as e:  # noqa: BLE001 - report, then let the parent replace us
            res = TrialResult(ERROR, message=_short(e) + "\n" + traceback.format_exc(limit=3))
        conn.send(res)
        if res is not None and res.status in RESTART_AFTER:
            return


class WorkerRunner:
    """Runs each trial in a persistent spawned worker process, with a time limit.

    timeout_s bounds one trial (compile, check, timing); setup_timeout_s bounds building
    a shape's inputs and reference. A trial that times out, crashes the worker or raises
    an unexpected error fails, and the next trial gets a fresh worker.
    """

    def __init__(self, timer: Timer | None = None, make_case: CaseFactory | None = None, *,
                 timeout_s: float = 300.0, setup_timeout_s: float = 1800.0):
        self.timer, self.make_case = timer, make_case
        self.timeout_s, self.setup_timeout_s = timeout_s, setup_timeout_s
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None
        self._case_key: tuple | None = None
        self.restarts = 0

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_worker_main, args=(child, self.timer, self.make_case),
                                       daemon=True, name="nsa-gen-trial")
        self._proc.start()
        child.close()
        self._conn = parent
        self._case_key = None

    def close(self) -> None:
        """Stop the worker (politely, then by force)."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        self._case_key = None
        if proc is None:
            return
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
        conn.close()

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
        self.close()
        self.restarts += 1

    def _ask(self, kind: str, req: TrialRequest, timeout: float) -> TrialResult | None:
        if self._proc is None or not self._proc.is_alive():
            if self._proc is not None:
                self.close()
                self.restarts += 1
            self._start()
        try:
            self._conn.send((kind, req))
            if not self._conn.poll(timeout):
                self._kill()
                return TrialResult(TIMEOUT, message=f"no answer within {timeout:g} s")
            res = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(timeout=5)  # reap it, so that its exit code is known
            code = self._proc.exitcode
            self._kill()
            return TrialResult(CRASH, message=f"worker process died (exit code {code})")
        if res is not None and res.status in RESTART_AFTER:
            self._kill()
        return res

    def __call__(self, req: TrialRequest) -> TrialResult:
        if self._case_key != req.case_key or self._proc is None:
            res = self._ask("prepare", req, self.setup_timeout_s)
            if res is not None:
                return res
            self._case_key = req.case_key
        return self._ask("trial", req, self.timeout_s)

    def __enter__(self) -> "WorkerRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    from ..spec import load_spec
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3:
        print("usage: python -m nsa_gen.tuning.trial STEM SPEC T [B] [name=value ...]", file=sys.stderr)
        return 2
    stem, spec, T = args[0], load_spec(args[1]), int(args[2])
    rest = args[3:]
    B = int(rest.pop(0)) if rest and "=" not in rest[0] else 1
    params = parse_assignments(rest)
    if params:
        config = Config.from_dict(params)
    else:
        from ..kernels import kernel_def
        config = kernel_def(stem).default(spec, T)
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = TrialExecutor()(TrialRequest(stem, spec, T, B, config, device))
    print(json.dumps({"config": config.as_dict(), **asdict(res)}))
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
