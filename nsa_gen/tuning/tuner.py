"""Optuna autotuning: one study per (device, kernel, spec, shape), winners into the DB.

Each study searches the kernel's pruned space with TPE over categorical parameters. The
heuristic default and the winners of the nearest tuned shapes are tried first. Every
config is measured at most once: a sampler proposal that was measured already is answered
from the study, and a run of such repeats hands the sampler an untried config nearest to the
best so far, so a small space is exhausted instead of re-sampled. Failures (compile errors,
out of resources, wrong results, timeouts, crashes) are recorded as FAIL trials with their
status and message and the study goes on; only a failure to build the shape's inputs and
reference (not the config's fault) ends a study early, to be retried on the next run.
Studies live in Optuna storage (SQLite under the cache directory by default), so a rerun
of the same study resumes where it stopped.

Trials run in rounds of up to `jobs` fresh configs: the round's configs are compiled in
parallel first (`prewarm`, one process per config), then measured one at a time, since
timings taken side by side on one GPU would disturb each other.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from .. import env
from ..config import Config
from ..db import DeviceKey, Entry, TuneKey, TuningDB, fitting_default, shape_distance
from ..db.store import kernel_source_hash, shipped_db_dir
from ..kernels import kernel_def
from ..spec import NSASpec
from .space import pruned_space, search_space
from .trial import ERROR, OK, SETUP_FAILED, Timer, TrialRequest, TrialResult, WorkerRunner

log = logging.getLogger("nsa_gen")

Runner = Callable[[TrialRequest], TrialResult]
# Compiles the configs of a round ahead of their trials; its return value is ignored.
Prewarm = Callable[[list[TrialRequest]], object]

# Sampler proposals in a row that were all measured before, after which we pick for it.
MAX_REPEATS = 2
# The last part of a study's trials goes to local search: the untried neighbours of the
# best configs so far (one parameter one step away), best first. Replayed on the measured
# H200 landscape of fla-compat's compression_fwd (216 configs; benchmarks/tune_replay.py,
# benchmarks/RESULTS.md), 40-trial studies in rounds of 8 came within 5% of the exhaustive
# best in 47 of 50 sampler seeds at T = 8k with it and 43 of 50 without (50 of 50 at 32k).
LOCAL_FRACTION = 0.3
MEMORY = "memory"
# A study replaces the shape's entry (the config dispatch takes now, measured in the same
# study) only with a config faster by more than this. Run-to-run noise between device calls
# is 2-3% at 64k (H200), and a 64k selection_fwd winner 0.4% ahead of the entry in its study
# was 2.8% slower in the composed forward, three alternating runs each (RESULTS run 28).
REPLACE_MARGIN = 0.01
# Status of a trial cut short through no fault of its config; a resumed study retries it.
INTERRUPTED = "interrupted"


def default_storage() -> str:
    """SQLite file under the cache directory (NSA_GEN_CACHE_DIR)."""
    path = env.cache_dir() / "tuning" / "optuna.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def study_name(key: TuneKey, spec: NSASpec) -> str:
    return (f"nsa-gen/{key.device.id}/{key.kernel}/{spec.spec_hash}/{key.source_hash}/"
            f"triton-{key.triton}/T{key.T}-B{key.B}")


@dataclass(frozen=True)
class StudyId:
    """What a study name says (see `study_name`): the study of `kernel` for the spec of
    `spec_hash` at shape (T, B) on the device of `device_id`."""

    device_id: str
    kernel: str
    spec_hash: str
    source_hash: str
    triton: str
    T: int
    B: int


def parse_study_name(name: str) -> StudyId | None:
    """The parts of a name made by `study_name`; None for any other study."""
    parts = name.split("/")
    if len(parts) != 7 or parts[0] != "nsa-gen" or not parts[5].startswith("triton-"):
        return None
    T, _, B = parts[6].partition("-")
    try:
        if not (T[:1] == "T" and B[:1] == "B"):
            return None
        return StudyId(parts[1], parts[2], parts[3], parts[4], parts[5][len("triton-"):],
                       int(T[1:]), int(B[1:]))
    except ValueError:
        return None


def study_measurements(trials: Iterable[optuna.trial.FrozenTrial]) -> tuple[
        dict[Config, float], dict[Config, tuple[str, str]], list[Config]]:
    """From a study's trials: the measured time of each config that ran correctly, the
    (status, message) of each config that failed, and the configs whose trial was cut short
    through no fault of theirs (to retry). Repeats and pruned proposals count for nothing;
    RUNNING trials are left to the caller."""
    results: dict[Config, float] = {}
    failures: dict[Config, tuple[str, str]] = {}
    retry: list[Config] = []
    for t in trials:
        status = t.user_attrs.get("status")
        if t.state == TrialState.COMPLETE and status == OK:
            cfg = Config.from_dict(t.params)
            results[cfg] = min(results.get(cfg, math.inf), float(t.value))
        elif t.state == TrialState.FAIL and status in (INTERRUPTED, SETUP_FAILED):
            retry.append(Config.from_dict(t.params))
        elif t.state == TrialState.FAIL and status not in (None, "repeat"):
            failures[Config.from_dict(t.params)] = (status, t.user_attrs.get("message", ""))
    return results, failures, retry


@dataclass(frozen=True)
class TuneResult:
    """entry is None when no config ran correctly (nothing is written then)."""

    key: TuneKey
    entry: Entry | None
    measured: int
    failed: int
    study_name: str
    failures: tuple[tuple[Config, str, str], ...] = ()  # (config, status, message)


@contextlib.contextmanager
def _quiet_optuna():
    # Optuna logs a line per trial; the progress bar says the same, once.
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(old)


class Tuner:
    """Tunes kernels of one spec on one device and writes winners to `db`.

    runner: runs one trial (default: a `WorkerRunner` with `timer`, `timeout_s`);
    tests pass a fake. timer: ms of a callable (default: `trial.bench_timer`, a median of
    CUDA-event times, on CUDA; wall-clock median on the CPU). storage: an Optuna storage URL or storage object,
    "memory", or None for `default_storage()`. torch_device: where trial tensors live
    ("cuda" or "cpu"). seed_dbs: more DBs (read-only) whose neighbouring winners seed a
    study; `db` and the shipped DB always do. stale_after_s: a RUNNING trial older than
    this was left by a killed run and is marked failed on resume, its config retried
    (default: twice the trial limit plus the setup limit). jobs: fresh configs per round,
    compiled in parallel before they are measured one by one (default:
    `prewarm.default_jobs()` on CUDA, 1 on the CPU; 1 compiles each config in its own
    trial). prewarm: compiles a round's requests (default: a `prewarm.Prewarmer` of `jobs`
    processes); tests pass a fake. candidates: param changes (e.g. {"IMP": "tsum",
    "BLOCK_T": 8}, what a probe found) applied to the config dispatch takes for the shape
    now (its entry in the first DB of seed_dbs that has one, else the default), each seeded
    after the shape's entries; one outside the kernel's space, or pruned, is skipped.
    """

    def __init__(self, spec: NSASpec, *, db: TuningDB | str, device: DeviceKey,
                 runner: Runner | None = None, timer: Timer | None = None,
                 storage: str | optuna.storages.BaseStorage | None = None,
                 torch_device: str = "cuda", seed: int = 0,
                 progress: bool = True, neighbours: int = 3, timeout_s: float = 300.0,
                 seed_dbs: Iterable[TuningDB] = (), stale_after_s: float | None = None,
                 jobs: int | None = None, prewarm: Prewarm | None = None,
                 candidates: Iterable[dict] = ()):
        self.spec = spec
        self.candidates = [dict(c) for c in candidates]
        self.db = db if isinstance(db, TuningDB) else TuningDB(db)
        self.device = device
        self._own_runner = runner is None
        self.runner: Runner = runner or WorkerRunner(timer, timeout_s=timeout_s)
        self.storage = storage
        self.torch_device = torch_device
        # Triton's interpreter computes bf16 dots unreliably, so CPU trials check in fp32
        # (CPU timings mean nothing anyway; the interpreter path exists for tests).
        self.dtype = "float32" if torch_device == "cpu" else None
        self.seed = seed
        self.progress = progress
        self.neighbours = neighbours
        shipped = shipped_db_dir()
        self.seed_dbs = [self.db, *seed_dbs] + ([TuningDB(shipped)] if shipped else [])
        self.stale_after_s = stale_after_s if stale_after_s is not None else 2 * timeout_s + 1800
        if jobs is None:
            # The interpreter compiles nothing worth sharing, and CPU tuning exists for tests.
            from .prewarm import default_jobs
            jobs = default_jobs() if torch_device.startswith("cuda") else 1
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, not {jobs}")
        self.jobs = jobs
        self._prewarm = prewarm
        self._own_prewarm = prewarm is None
        self._prewarm_timeout_s = 2 * timeout_s

    @property
    def prewarm(self) -> Prewarm:
        """The round compiler; the default pool is started on first use, so that a Tuner
        that never runs a round of several configs spawns no processes."""
        if self._prewarm is None:
            from .prewarm import Prewarmer
            # A round compiles in parallel, so it takes about as long as its slowest config:
            # bound it like one trial, with room for the processes' first CUDA start.
            self._prewarm = Prewarmer(self.jobs, timeout_s=self._prewarm_timeout_s)
        return self._prewarm

    def close(self) -> None:
        if self._own_runner and hasattr(self.runner, "close"):
            self.runner.close()
        if self._own_prewarm and self._prewarm is not None:
            self._prewarm.close()
            self._prewarm = None

    def __enter__(self) -> "Tuner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- seeds

    def seeds(self, stem: str, T: int, B: int, keep: list[Config]) -> list[Config]:
        """Configs to try first: the (fitting) heuristic default, the configs the DBs already
        hold for this very shape (so a new study measures the entry it may replace, and
        never swaps it for one it did not beat), winners of the nearest tuned shapes of the
        same kernel source, spec and device, then the default's structural variants.
        Entries of an earlier version of the template (same kernel, spec and device) count
        too, after the current one's at the same distance: after an edit that keeps the
        params, a retune starts from the old winners (re-measured, never copied)."""
        kd = kernel_def(stem)
        valid = set(keep)
        out: list[Config] = []

        def add(cfg: Config) -> bool:
            if cfg in valid and cfg not in out:
                out.append(cfg)
                return True
            return False

        for cfg in (kd.default(self.spec, T), fitting_default(kd, self.spec, T, self.device)):
            add(cfg)
        me = TuneKey.make(self.device, stem, self.spec, T, B)
        # A key with a fallback (selection_fwd_gated) is seeded with the fallback kernel's
        # entries too, after its own at the same distance: dispatch runs them where it has
        # none, so the study measures the config it may replace.
        hashes = {s: kernel_source_hash(s) for s in (stem, kd.fallback) if s}
        found = sorted(((shape_distance(me.shape, k.shape), k.kernel != stem,
                         k.source_hash != hashes[k.kernel],
                         kd.at_shape(self.spec, e.config, k.T, T))
                        for s in hashes for db in self.seed_dbs
                        for k, e in db.load(s, self.device).items()
                        if (k.kernel, k.spec) == (s, me.spec)),
                       key=lambda x: x[:3])
        added = 0
        own = [cfg for dist, *_, cfg in found if dist == 0]
        for dist, *_, cfg in found:  # this very shape's entries (distance 0) first, all of them
            if dist == 0:
                add(cfg)
        if self.candidates:
            held = self._dispatched(me) or kd.default(self.spec, T)
            params = set(kd.space(self.spec))
            for change in self.candidates:
                if set(change) <= params:
                    add(kd.canonical(self.spec, held.replace(**change)))
        for dist, *_, cfg in found:
            if dist != 0 and added < self.neighbours:
                added += add(cfg)
        # The default with each other value of each structural param (the split of the
        # compressed dk/dv pass, top-n's merge): few, and each a different algorithm, so
        # even a short study measures them (at 128k the unsplit dk/dv pass beat the
        # default's split by 10%, in a value a 4-trial study never sampled). Then the same
        # for this shape's entries, whose tiles may suit another algorithm better (a 64k
        # top-n entry with the rank merge at 8 tokens a tile was never measured with bitonic
        # at 8, which a probe had 7% faster).
        for base in [out[0] if out else kd.default(self.spec, T)] + own:
            for cfg in kd.variants(self.spec, base):
                add(cfg)
        return out

    # -- one study

    def _open_study(self, name: str, n_keep: int) -> optuna.Study:
        storage = self.storage or default_storage()
        if storage == MEMORY:
            storage = None
        sampler = optuna.samplers.TPESampler(seed=self.seed,
                                             n_startup_trials=max(3, min(10, n_keep // 4)))
        return optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                   direction="minimize", load_if_exists=True)

    def tune(self, stem: str, T: int, B: int = 1, n_trials: int = 40) -> TuneResult:
        """Run (or resume) the study of kernel `stem` at shape (T, B) until it holds
        `n_trials` measured configs or the pruned space is exhausted, then write the winner
        to the DB. Returns what was found."""
        kd = kernel_def(stem)
        if not kd.applies(self.spec):
            raise ValueError(f"kernel {stem} does not apply to spec {self.spec.name!r}")
        key = TuneKey.make(self.device, stem, self.spec, T, B)
        name = study_name(key, self.spec)
        space = search_space(stem, self.spec)
        keep, dropped = pruned_space(stem, self.spec, self.device)
        dists = {n: CategoricalDistribution(list(c)) for n, c in space.params}
        with _quiet_optuna():
            study = self._open_study(name, len(keep))
            # The name holds only the spec's hash; this makes a study readable on its own
            # (benchmarks/tune_evidence.py finds the spec's heuristic default with it).
            study.set_user_attr("spec", self.spec.to_dict())
            results, failures, retry = self._resume(study)
            waiting = {Config.from_dict(t.system_attrs.get("fixed_params", {}))
                       for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
            for cfg in [*retry, *self.seeds(stem, T, B, keep)]:
                fresh = cfg not in results and cfg not in failures and cfg not in waiting
                if fresh and cfg in keep:
                    study.enqueue_trial(cfg.as_dict(), user_attrs={"seed": True})
                    waiting.add(cfg)
            self._run(study, stem, T, B, n_trials, dists, keep, dropped, results, failures)
        entry = None
        if results:
            ranked = sorted(results.items(), key=lambda kv: kv[1])
            held = self._incumbent(key, results)
            if held is not None and held != ranked[0][0] and \
                    results[held] <= ranked[0][1] * (1 + REPLACE_MARGIN):
                log.info("tune: %s keeps its entry %s (%.4g ms): the best, %s, is %.2f%% faster, "
                         "within the %.0f%% noise margin", key.describe(), held, results[held],
                         ranked[0][0], 100 * (results[held] / ranked[0][1] - 1), 100 * REPLACE_MARGIN)
                ranked.sort(key=lambda kv: kv[0] != held)  # stable: the rest stay ranked
            best_cfg, best = ranked[0]
            margin = (ranked[1][1] - best) / best if len(ranked) > 1 and best > 0 else None
            entry = Entry(best_cfg, best, margin, len(results) + len(failures), Entry.today())
            self.db.put(key, entry)
        else:
            log.warning("tune: no config of %s ran correctly at T=%d B=%d; nothing "
                        "written", stem, T, B)
        return TuneResult(key, entry, len(results) + len(failures), len(failures), name,
                          tuple((c, s, m) for c, (s, m) in failures.items()))

    def _dispatched(self, key: TuneKey) -> Config | None:
        """The config dispatch takes for `key` now: the entry of the first DB of seed_dbs
        with one for it, on the current template (for a key with a fallback and no entry,
        the fallback kernel's); None if none has."""
        for db in self.seed_dbs:
            e = db.get(key)
            if e is not None:
                return e.config
        fallback = kernel_def(key.kernel).fallback
        if fallback:
            return self._dispatched(dataclasses.replace(key, kernel=fallback,
                                                        source_hash=kernel_source_hash(fallback)))
        return None

    def _incumbent(self, key: TuneKey, results: dict[Config, float]) -> Config | None:
        """The config dispatch takes for `key` now, if this study measured it."""
        held = self._dispatched(key)
        return held if held in results else None

    def _resume(self, study: optuna.Study) -> tuple[dict[Config, float],
                                                     dict[Config, tuple[str, str]], list[Config]]:
        """Measured results and failures already in the study, and configs whose trial was
        cut short (Ctrl-C, or left RUNNING by a killed run, which we now mark failed) to
        try again first."""
        stale: list[Config] = []
        now = _dt.datetime.now()
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            if t.state == TrialState.RUNNING:
                start = t.datetime_start
                if start is not None and (now - start).total_seconds() > self.stale_after_s:
                    study.tell(t.number, state=TrialState.FAIL)
                    stale.append(Config.from_dict(t.params))
        results, failures, retry = study_measurements(
            t for t in trials if t.state != TrialState.RUNNING)
        return results, failures, retry + stale

    def _run(self, study: optuna.Study, stem: str, T: int, B: int, n_trials: int,
             dists: dict, keep: list[Config], dropped: dict[Config, str],
             results: dict[Config, float], failures: dict[Config, tuple[str, str]]) -> None:
        from tqdm.auto import tqdm

        todo = set(keep) - set(results) - set(failures)
        measured = len(results) + len(failures)
        bar = tqdm(total=min(n_trials, len(keep)), initial=min(measured, len(keep)),
                   desc=f"{stem} T={T} B={B}", unit="cfg", disable=not self.progress,
                   dynamic_ncols=True, leave=True)
        # Trials asked but not yet told, oldest first: whatever stops the loop early tells
        # them FAIL "interrupted", so that none is left RUNNING and a resumed study retries them.
        pending: list[tuple[optuna.Trial, Config]] = []
        repeats = 0
        try:
            while measured < n_trials and todo:
                want = min(self.jobs, n_trials - measured, len(todo))
                if results and n_trials - measured <= round(n_trials * LOCAL_FRACTION):
                    for cfg in self._local_round(results, dists, todo, want):
                        study.enqueue_trial(cfg.as_dict(), user_attrs={"local": True})
                repeats = self._ask_round(study, dists, want, keep, dropped, todo, results,
                                          pending, repeats)
                reqs = [TrialRequest(stem, self.spec, T, B, cfg, self.torch_device, self.seed,
                                     self.dtype) for _, cfg in pending]
                if self.jobs > 1 and len(reqs) > 1:
                    try:
                        self.prewarm(reqs)
                    except Exception as e:  # noqa: BLE001 - only a speed-up; trials still run
                        log.warning("tune: prewarm failed (%s: %s); compiling in the trials",
                                    type(e).__name__, e)
                for req in reqs:
                    trial, cfg = pending.pop(0)
                    res = self._measure(study, trial, req)
                    todo.discard(cfg)
                    measured += 1
                    if res.ok:
                        results[cfg] = res.ms
                    else:
                        failures[cfg] = (res.status, res.message)
                    bar.update(1)
                    if res.status == SETUP_FAILED:
                        # No config can run without inputs and a reference: stop this shape.
                        log.warning("tune: cannot set up %s at T=%d B=%d: %s", stem, T, B,
                                    res.message.splitlines()[0] if res.message else "")
                        return
                    if results:
                        bar.set_postfix(best=f"{min(results.values()):.4g}ms", failed=len(failures))
        finally:
            self._interrupt(study, pending)
            bar.close()

    def _ask_round(self, study: optuna.Study, dists: dict, want: int, keep: list[Config],
                   dropped: dict[Config, str], todo: set[Config], results: dict[Config, float],
                   pending: list[tuple[optuna.Trial, Config]], repeats: int) -> int:
        """Ask the sampler until `pending` holds `want` fresh configs (want <= len(todo)).
        Proposals that are pruned, measured already or already in this round are told at
        once; after MAX_REPEATS of them in a row the nearest untried config is enqueued.
        Returns the count of repeats in a row so far (it carries over between rounds)."""
        while len(pending) < want:
            trial = study.ask(dists)
            cfg = Config.from_dict(trial.params)
            in_round = {c for _, c in pending}
            if cfg in dropped:
                trial.set_user_attr("status", "pruned")
                trial.set_user_attr("message", dropped[cfg])
                study.tell(trial, state=TrialState.PRUNED)
                repeats += 1
            elif cfg not in todo or cfg in in_round:
                trial.set_user_attr("status", "repeat")
                if cfg in results:
                    study.tell(trial, results[cfg])
                else:
                    study.tell(trial, state=TrialState.FAIL)
                repeats += 1
            else:
                pending.append((trial, cfg))
                in_round.add(cfg)
                repeats = 0
            left = todo - in_round
            if repeats >= MAX_REPEATS and left:
                study.enqueue_trial(self._nearest_untried(left, results, keep).as_dict())
                repeats = 0
        return repeats

    @staticmethod
    def _interrupt(study: optuna.Study, pending: list[tuple[optuna.Trial, Config]]) -> None:
        """Tell the trials of `pending` FAIL with status "interrupted" (see `_resume`)."""
        while pending:
            trial, _ = pending.pop(0)
            try:
                trial.set_user_attr("status", INTERRUPTED)
                study.tell(trial, state=TrialState.FAIL)
            except Exception as e:  # noqa: BLE001 - a trial left RUNNING is retried once stale
                log.warning("tune: could not mark trial %d interrupted: %s", trial.number, e)

    def _measure(self, study: optuna.Study, trial: optuna.Trial, req: TrialRequest) -> TrialResult:
        try:
            res = self.runner(req)
        except Exception as e:  # noqa: BLE001 - a runner bug fails this config, not the study
            log.warning("tune: trial runner raised %s: %s", type(e).__name__, e)
            res = TrialResult(ERROR, message=f"runner raised {type(e).__name__}: {e}")
        except BaseException:
            # Ctrl-C: the config is not to blame, so a resumed study tries it again.
            trial.set_user_attr("status", INTERRUPTED)
            study.tell(trial, state=TrialState.FAIL)
            raise
        trial.set_user_attr("status", res.status)
        if res.ok:
            study.tell(trial, res.ms)
        else:
            trial.set_user_attr("message", res.message[:4000])
            study.tell(trial, state=TrialState.FAIL)
        return res

    @classmethod
    def _local_round(cls, results: dict[Config, float], dists: dict, todo: set[Config],
                     want: int) -> list[Config]:
        """Up to `want` untried neighbours of the best configs so far, best first: once
        the best's neighbourhood is spent, the runner-up's is searched, and so on, so a
        local optimum does not end the search."""
        out: list[Config] = []
        for cfg in sorted(results, key=results.__getitem__):
            out += [n for n in cls._neighbours(cfg, dists, todo) if n not in out]
            if len(out) >= want:
                break
        return out[:want]

    @staticmethod
    def _neighbours(best: Config, dists: dict, todo: set[Config]) -> list[Config]:
        """Untried configs one step from `best`: one parameter moved to an adjacent choice
        (choices are ordered, e.g. tile sizes ascending), parameters taken in turn."""
        base = best.as_dict()
        steps: list[list[Config]] = []
        for name, dist in dists.items():
            choices = list(dist.choices)
            i = choices.index(base[name])
            steps.append([best.replace(**{name: choices[j]})
                          for j in (i - 1, i + 1) if 0 <= j < len(choices)])
        out: list[Config] = []
        for tier in range(2):  # first one side of every parameter, then the other
            out += [n[tier] for n in steps if len(n) > tier and n[tier] in todo]
        return out

    @staticmethod
    def _nearest_untried(todo: set[Config], results: dict[Config, float], keep: list[Config]) -> Config:
        """The untried config closest (fewest differing parameters) to the best so far."""
        order = {c: i for i, c in enumerate(keep)}
        if not results:
            return min(todo, key=order.__getitem__)
        best = min(results, key=results.__getitem__).as_dict()
        return min(todo, key=lambda c: (sum(v != best.get(k) for k, v in c.as_dict().items()),
                                        order[c]))
