"""Evidence for the tuner, as markdown tables (PREFIX.md) and JSON (PREFIX.json) for
benchmarks/RESULTS.md:

a. tuned against the heuristic default (--storage): for every study, the measured time of
   the kernel's heuristic default (the tuner seeds every study with it, so it is one of the
   study's trials), the best time and config, and the speedup;
b. Optuna's best after a few trials against an exhaustive sweep (--exhaustive-storage): the
   studies of --sampled-storage (run with e.g. --trials 40) against the same studies run with
   a --trials beyond the size of the pruned space (the tuner stops once every config was
   measured): both bests, their ratio, the configs measured in each, whether within 5%;
c. leave-one-shape-out (--db DIR --loo, needs the GPU): every DB entry that has another tuned
   shape of the same kernel, spec and device, timed at its own shape with its own winner and
   with the winner of the nearest other shape (log2 distance, as dispatch picks it), back to
   back in this process: their ratio, and whether the neighbour costs at most 10%;
d. the same from the studies of --storage, with no GPU: each study's best against its own
   measurement of the nearest other study's winner (the tuner seeds studies with them).

    python benchmarks/tune_evidence.py --storage sqlite:////tmp/tune.db \\
        [--sampled-storage URL] [--exhaustive-storage URL] [--db DIR --loo] --out PREFIX

Tables a, b and d only read Optuna storage and run anywhere; c times kernels on CUDA.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsa_gen.config import Config  # noqa: E402
from nsa_gen.db import Entry, TuneKey, TuningDB, shape_distance  # noqa: E402
from nsa_gen.kernels import kernel_def  # noqa: E402
from nsa_gen.spec import NSASpec  # noqa: E402
from nsa_gen.tuning.tuner import StudyId, parse_study_name, study_measurements  # noqa: E402

# Issue 4's bars: Optuna's best within 5% of the exhaustive best; a shape dispatched to its
# nearest tuned neighbour within 10% of its own tuned best.
SAMPLED_TOLERANCE = 0.05
LOO_LIMIT = 1.10

# time_fn(key, config) -> ms of `config` for the kernel and shape of DB key `key`.
TimeFn = Callable[[TuneKey, Config], float]


# ----------------------------------------------------------------------------- studies

@dataclass(frozen=True)
class StudyOutcome:
    """One tuning study's measurements (`tuner.study_measurements`). spec is None when the
    study neither stores its spec nor has the hash of a built-in one."""

    name: str
    id: StudyId
    spec: NSASpec | None
    results: Mapping[Config, float] = field(default_factory=dict)
    failures: Mapping[Config, tuple[str, str]] = field(default_factory=dict)

    @property
    def measured(self) -> int:
        """Configs measured, failed ones included (what the tuner's --trials counts)."""
        return len(self.results) + len(self.failures)

    @property
    def best(self) -> tuple[Config, float] | None:
        if not self.results:
            return None
        cfg = min(self.results, key=self.results.__getitem__)
        return cfg, self.results[cfg]

    @property
    def spec_label(self) -> str:
        return self.spec.name if self.spec is not None else f"spec {self.id.spec_hash[:8]}"

    def sort_key(self) -> tuple:
        return (self.id.kernel, self.spec_label, self.id.device_id, self.id.B, self.id.T)


def _builtin_specs_by_hash() -> dict[str, NSASpec]:
    from nsa_gen.spec import builtin_specs, load_spec
    specs = [load_spec(n) for n in builtin_specs()]
    return {s.spec_hash: s for s in specs}


def read_studies(storage: Any) -> list[StudyOutcome]:
    """Every nsa-gen study in Optuna `storage` (a URL or storage object), sorted by kernel,
    spec, device and shape. Other studies are ignored."""
    import optuna
    from optuna.trial import TrialState

    from nsa_gen.spec import SpecError, parse_spec

    known = _builtin_specs_by_hash()
    out = []
    for name in optuna.get_all_study_names(storage):
        sid = parse_study_name(name)
        if sid is None:
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        spec = known.get(sid.spec_hash)
        stored = study.user_attrs.get("spec")
        if stored is not None:
            try:
                spec = parse_spec(stored)
            except SpecError:
                pass
        results, failures, _ = study_measurements(
            study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)))
        out.append(StudyOutcome(name, sid, spec, results, failures))
    return sorted(out, key=StudyOutcome.sort_key)


def tuned_vs_default(outcomes: Iterable[StudyOutcome]) -> list[dict[str, Any]]:
    """Table a: one row per study. default_status says why default_ms is missing: the
    default failed (its status), was not measured (pruned on this device, or the study was
    cut short), or the spec is unknown."""
    rows = []
    for o in outcomes:
        default, default_ms = None, None
        if o.spec is None:
            status = "unknown spec"
        else:
            default = kernel_def(o.id.kernel).default(o.spec, o.id.T)
            if default in o.results:
                status, default_ms = "ok", o.results[default]
            elif default in o.failures:
                status = o.failures[default][0]
            else:
                status = "not measured"
        best = o.best
        rows.append({
            "kernel": o.id.kernel, "spec": o.spec_label, "T": o.id.T, "B": o.id.B,
            "device": o.id.device_id, "default_config": default, "default_ms": default_ms,
            "default_status": status, "best_config": best[0] if best else None,
            "best_ms": best[1] if best else None,
            "speedup": default_ms / best[1] if best and default_ms and best[1] > 0 else None,
            "measured": o.measured, "failed": len(o.failures), "study": o.name,
        })
    return rows


def sampled_vs_exhaustive(sampled: Iterable[StudyOutcome], exhaustive: Iterable[StudyOutcome],
                          tolerance: float = SAMPLED_TOLERANCE) -> list[dict[str, Any]]:
    """Table b: one row per study present (by name) in both runs with a result in each.
    ratio = sampled best / exhaustive best, each as timed in its own run; ratio_same_run =
    the exhaustive run's time of the sampled run's winner / the exhaustive best, which
    compares the two choices under the same conditions (None if that config failed there)."""
    full = {o.name: o for o in exhaustive}
    rows = []
    for s in sampled:
        e = full.get(s.name)
        if e is None or s.best is None or e.best is None:
            continue
        (s_cfg, s_ms), (e_cfg, e_ms) = s.best, e.best
        ratio = s_ms / e_ms if e_ms > 0 else math.inf
        same = e.results.get(s_cfg)
        rows.append({
            "kernel": s.id.kernel, "spec": s.spec_label, "T": s.id.T, "B": s.id.B,
            "device": s.id.device_id, "sampled_best_ms": s_ms, "sampled_best_config": s_cfg,
            "exhaustive_best_ms": e_ms, "exhaustive_best_config": e_cfg, "ratio": ratio,
            "ratio_same_run": same / e_ms if same is not None and e_ms > 0 else None,
            "sampled_measured": s.measured, "exhaustive_measured": e.measured,
            "within": ratio <= 1 + tolerance, "study": s.name,
        })
    return rows


# ----------------------------------------------------------------------------- leave one shape out

def nearest_other(key: Any, others: Iterable[Any]) -> Any | None:
    """The item of `others` (anything with T and B: DB keys, study ids) nearest to `key`'s
    shape in log2 space, its own shape excluded; at equal distance the larger shape, as the
    dispatcher ranks them."""
    me = (key.T, key.B)
    cands = [o for o in others if (o.T, o.B) != me]
    if not cands:
        return None
    return min(cands, key=lambda o: (shape_distance(me, (o.T, o.B)), -o.T, -o.B))


def moved(kernel: str, spec: NSASpec | None, config: Config, T_from: int, T_to: int) -> Config:
    """A neighbour's config as dispatch hands it to another shape (KernelDef.at_shape: a split
    length scales with T). Unknown spec: unchanged."""
    return config if spec is None else kernel_def(kernel).at_shape(spec, config, T_from, T_to)


def _builtin(name: str) -> NSASpec | None:
    from nsa_gen.spec import builtin_specs, load_spec
    return load_spec(name) if name in builtin_specs() else None


def leave_one_out(entries: Mapping[TuneKey, Entry], time_fn: TimeFn, rounds: int = 2,
                  limit: float = LOO_LIMIT) -> list[dict[str, Any]]:
    """Table c: for each entry with another tuned shape of its kernel source, spec, device
    and triton, time its own config and its nearest neighbour's at its shape. The two are
    timed back to back, `rounds` times, alternating which goes first (so that drift in
    clocks or temperature hits both alike); each keeps its fastest round. A neighbour with
    the same config is timed once and has ratio 1. A timing that raises gives a row with
    the error and no ratio."""
    groups: dict[tuple, list[TuneKey]] = {}
    for k in entries:
        groups.setdefault((k.device, k.group, k.triton), []).append(k)
    rows = []
    order = sorted(entries, key=lambda k: (k.kernel, k.spec_name, k.device.id, k.B, k.T))
    for k in order:
        nb = nearest_other(k, groups[(k.device, k.group, k.triton)])
        if nb is None:
            continue
        own, other = entries[k].config, entries[nb].config
        row: dict[str, Any] = {
            "kernel": k.kernel, "spec": k.spec_name, "T": k.T, "B": k.B, "device": k.device.id,
            "neighbour_T": nb.T, "neighbour_B": nb.B, "own_config": own,
            "neighbour_config": other, "db_ms": entries[k].ms, "same_config": own == other,
            "own_ms": None, "neighbour_ms": None, "ratio": None, "within": None, "error": None,
        }
        try:
            if own == other:
                row["own_ms"] = row["neighbour_ms"] = min(time_fn(k, own) for _ in range(rounds))
            else:
                times: dict[Config, list[float]] = {own: [], other: []}
                for r in range(rounds):
                    for cfg in ((own, other) if r % 2 == 0 else (other, own)):
                        times[cfg].append(time_fn(k, cfg))
                row["own_ms"], row["neighbour_ms"] = min(times[own]), min(times[other])
        except Exception as e:  # noqa: BLE001 - one bad entry must not cost the table
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            continue
        row["ratio"] = row["neighbour_ms"] / row["own_ms"] if row["own_ms"] > 0 else math.inf
        row["within"] = row["ratio"] <= limit
        rows.append(row)
    return rows


def leave_one_out_from_studies(outcomes: Iterable[StudyOutcome],
                               entries: Mapping[TuneKey, Entry] | None = None,
                               limit: float = LOO_LIMIT) -> list[dict[str, Any]]:
    """Table d, with no GPU: for each study with a result, the config dispatch would pick had
    the study's shape not been tuned, looked up among the study's own measurements. With
    `entries` (a DB) that is the entry of the nearest other tuned shape of the same kernel
    source, spec, device and triton; without, the winner of the nearest other such study.
    The tuner seeds a study with the winners of the nearest shapes tuned before it, so both
    times come from the same study (same process, inputs and timer). A neighbour's config
    the study did not measure gives a row with no ratio."""
    outcomes = [o for o in outcomes if o.best is not None]
    if entries is None:
        def candidates(o):
            return [(x.id, x.best[0]) for x in outcomes if _same_group(o.id, x.id)]
    else:
        from nsa_gen.db import spec_fields

        def candidates(o):
            if o.spec is None:
                return []
            fields = spec_fields(o.spec)
            return [(k, e.config) for k, e in entries.items()
                    if (k.device.id, k.kernel, k.source_hash, k.triton, k.spec)
                    == (o.id.device_id, o.id.kernel, o.id.source_hash, o.id.triton, fields)]
    rows = []
    for o in sorted(outcomes, key=StudyOutcome.sort_key):
        cands = dict(candidates(o))
        nb = nearest_other(o.id, list(cands))
        if nb is None:
            continue
        (own, own_ms), other = o.best, moved(o.id.kernel, o.spec, cands[nb], nb.T, o.id.T)
        nb_ms = o.results.get(other)
        ratio = nb_ms / own_ms if nb_ms is not None and own_ms > 0 else None
        rows.append({
            "kernel": o.id.kernel, "spec": o.spec_label, "T": o.id.T, "B": o.id.B,
            "device": o.id.device_id, "neighbour_T": nb.T, "neighbour_B": nb.B,
            "own_config": own, "neighbour_config": other, "same_config": own == other,
            "own_ms": own_ms, "neighbour_ms": nb_ms, "ratio": ratio,
            "within": ratio <= limit if ratio is not None else None,
            "error": None if nb_ms is not None else "not measured in this study",
            "study": o.name,
        })
    return rows


def _same_group(a: StudyId, b: StudyId) -> bool:
    return (a.device_id, a.kernel, a.spec_hash, a.source_hash, a.triton) == \
        (b.device_id, b.kernel, b.spec_hash, b.source_hash, b.triton)


class CaseTimer:
    """The GPU time_fn of `leave_one_out`: builds the inputs of a key's kernel and shape
    once (`harness.make_case`, spec rebuilt from the key), then times configs with the
    tuner's timer (`trial.bench_timer`: median of CUDA-event times, L2 flushed)."""

    def __init__(self, dtype: str | None = None, device: str = "cuda",
                 timer: Callable[[Callable[[], Any]], float] | None = None):
        self.dtype, self.device, self.timer = dtype, device, timer
        self._key: TuneKey | None = None
        self._case: Any = None

    def __call__(self, key: TuneKey, config: Config) -> float:
        import torch

        from nsa_gen.db import spec_from_fields
        from nsa_gen.harness import make_case
        from nsa_gen.tuning.trial import bench_timer
        if key != self._key:
            self._key, self._case = None, None  # free the last shape's inputs first
            spec = spec_from_fields(key.spec, key.spec_name)
            self._case = make_case(key.kernel, spec, key.T, B=key.B,
                                   dtype=getattr(torch, self.dtype or spec.dtype),
                                   device=self.device)
            self._key = key
        case = self._case
        return float((self.timer or bench_timer)(lambda: case.run(config)))


# ----------------------------------------------------------------------------- output

def _fmt(v: Any, kind: str = "") -> str:
    if v is None:
        return "n/a"
    if kind == "ms":
        return f"{v:.4g}"
    if kind == "x":
        return f"{v:.2f}x"
    if kind == "ratio":
        return f"{v:.3f}"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    return str(v)


def _table(columns: list[tuple[str, str, str]], rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of `rows`; columns are (header, row key, format kind)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(key), kind) for _, key, kind in columns) + " |")
    return lines


def _geomean(xs: list[float]) -> float | None:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarize(table: str, rows: list[dict[str, Any]]) -> str:
    """One line under a table: what it shows in aggregate."""
    if table == "a":
        sp = [r["speedup"] for r in rows if r["speedup"] is not None]
        g = _geomean(sp)
        return (f"{len(rows)} studies; default measured in {len(sp)}; geometric-mean speedup "
                f"{_fmt(g, 'x')}; tuned > 5% faster in {sum(s > 1.05 for s in sp)}; "
                f"largest {_fmt(max(sp) if sp else None, 'x')}.")
    if table == "b":
        within = sum(bool(r["within"]) for r in rows)
        worst = max((r["ratio"] for r in rows), default=None)
        return (f"{within} of {len(rows)} studies within {SAMPLED_TOLERANCE:.0%} of the "
                f"exhaustive best; worst ratio {_fmt(worst, 'ratio')}.")
    timed = [r for r in rows if r["ratio"] is not None]
    within = sum(bool(r["within"]) for r in timed)
    worst = max((r["ratio"] for r in timed), default=None)
    errors = len(rows) - len(timed)
    what = "failed to time" if table == "c" else "without the neighbour's config measured"
    return (f"{within} of {len(timed)} entries within {LOO_LIMIT - 1:.0%} of their own tuned "
            f"config; worst ratio {_fmt(worst, 'ratio')}; same config as the neighbour in "
            f"{sum(r['same_config'] for r in timed)}" + (f"; {errors} {what}." if errors
                                                         else "."))


COLUMNS = {
    "a": [("kernel", "kernel", ""), ("spec", "spec", ""), ("T", "T", ""), ("B", "B", ""),
          ("default ms", "default_ms", "ms"), ("default", "default_status", ""),
          ("tuned ms", "best_ms", "ms"), ("speedup", "speedup", "x"),
          ("tuned config", "best_config", ""), ("measured", "measured", ""),
          ("failed", "failed", "")],
    "b": [("kernel", "kernel", ""), ("spec", "spec", ""), ("T", "T", ""),
          ("best of sampled ms", "sampled_best_ms", "ms"),
          ("best of all ms", "exhaustive_best_ms", "ms"), ("ratio", "ratio", "ratio"),
          ("ratio, same run", "ratio_same_run", "ratio"),
          ("measured (sampled)", "sampled_measured", ""),
          ("measured (all)", "exhaustive_measured", ""), ("within 5%", "within", ""),
          ("sampled config", "sampled_best_config", ""),
          ("exhaustive config", "exhaustive_best_config", "")],
    "c": [("kernel", "kernel", ""), ("spec", "spec", ""), ("T", "T", ""),
          ("neighbour T", "neighbour_T", ""), ("own ms", "own_ms", "ms"),
          ("neighbour's config ms", "neighbour_ms", "ms"), ("ratio", "ratio", "ratio"),
          ("within 10%", "within", ""), ("own config", "own_config", ""),
          ("neighbour config", "neighbour_config", ""), ("error", "error", "")],
}
COLUMNS["d"] = COLUMNS["c"]
TITLES = {
    "a": ("Tuned against the heuristic default",
          "Each study's measured time of the kernel's heuristic default config (every study "
          "is seeded with it) against its best; speedup = default / tuned."),
    "b": ("Optuna's best against an exhaustive sweep",
          "The same studies run with few trials and with more trials than the pruned space "
          "holds. ratio = sampled best / exhaustive best, each timed in its own run; "
          "'same run' times the sampled winner in the exhaustive run."),
    "c": ("Leave one shape out",
          "Each tuned shape timed with its own winner and with the winner of its nearest "
          "other tuned shape (log2 distance, as dispatch picks it), back to back in one "
          "process; ratio = neighbour's / own."),
    "d": ("Leave one shape out, from the studies",
          "Each study's best against its own measurement of the config of the nearest other "
          "tuned shape (log2 distance, as dispatch picks it; from --db where given, else "
          "from the other studies); the tuner seeds a study with the winners of the nearest "
          "shapes tuned before it. ratio = neighbour's / own."),
}
JSON_KEYS = {"a": "tuned_vs_default", "b": "sampled_vs_exhaustive", "c": "leave_one_out",
             "d": "leave_one_out_from_studies"}


def render_markdown(tables: Mapping[str, list[dict[str, Any]]], meta: Mapping[str, Any]) -> str:
    """The markdown of `tables` ({"a"|"b"|"c"|"d": rows}) under a line of `meta`."""
    lines = [f"## Tuning evidence, {meta.get('date', '')}",
             "", ", ".join(f"{k}: {v}" for k, v in meta.items() if k != "date" and v), ""]
    for t in ("a", "b", "c", "d"):
        if t not in tables:
            continue
        title, about = TITLES[t]
        lines += [f"### {title}", "", about, "", *_table(COLUMNS[t], tables[t]), "",
                  summarize(t, tables[t]), ""]
    return "\n".join(lines)


def _jsonable(v: Any) -> Any:
    if isinstance(v, Config):
        return v.as_dict()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def to_json(tables: Mapping[str, list[dict[str, Any]]], meta: Mapping[str, Any]) -> str:
    return json.dumps({"meta": dict(meta),
                       **{JSON_KEYS[t]: [{k: _jsonable(v) for k, v in r.items()} for r in rows]
                          for t, rows in tables.items()}}, indent=1)


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    meta: dict[str, Any] = {"date": _dt.date.today().isoformat()}
    try:
        import torch
        import triton
        meta["triton"] = triton.__version__
        meta["torch"] = torch.__version__
        if torch.cuda.is_available():
            meta["gpu"] = torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 - versions are a courtesy
        pass
    for name in ("storage", "sampled_storage", "exhaustive_storage", "db"):
        v = getattr(args, name)
        if v:
            meta[name] = str(v)
    return meta


def _loo_entries(db_dir: Path) -> dict[TuneKey, Entry]:
    """The DB's entries of this GPU whose kernel source is the current one (an entry tuned
    on other code says nothing about the kernels timed here)."""
    from nsa_gen.db import TuningDB, current_device_key
    from nsa_gen.db.store import is_current
    dev = current_device_key()
    return {k: e for k, e in TuningDB(db_dir).load().items() if k.device == dev and is_current(k)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Tables for benchmarks/RESULTS.md: tuned vs default (a), sampled vs "
                    "exhaustive tuning (b), leave-one-shape-out dispatch (c: timed on the GPU; "
                    "d: from the studies).")
    ap.add_argument("--storage", default=None,
                    help="Optuna storage URL of a tuning run (table a)")
    ap.add_argument("--sampled-storage", default=None,
                    help="storage of the few-trial run for table b (default: --storage)")
    ap.add_argument("--exhaustive-storage", default=None,
                    help="storage of the run with --trials past the space size (table b)")
    ap.add_argument("--db", type=Path, default=None,
                    help="tuning DB directory (table c; table d's neighbour configs)")
    ap.add_argument("--loo", action="store_true",
                    help="table c: time each --db entry against its nearest neighbour (GPU)")
    ap.add_argument("--dtype", default=None, help="input dtype for table c (default: the spec's)")
    ap.add_argument("--loo-rounds", type=int, default=2,
                    help="back-to-back timing rounds per entry in table c (default 2)")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    args = ap.parse_args(argv)
    sampled = args.sampled_storage or args.storage
    if args.loo and args.db is None:
        ap.error("--loo needs --db DIR")
    if args.exhaustive_storage and not sampled:
        ap.error("--exhaustive-storage needs --sampled-storage or --storage")
    if not (args.storage or args.exhaustive_storage or args.loo):
        ap.error("nothing to do: give --storage, --exhaustive-storage or --db DIR --loo")

    tables: dict[str, list[dict[str, Any]]] = {}
    meta = _meta(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> str:
        # After each table, so that a run cut short (table c times kernels) keeps the rest.
        md = render_markdown(tables, meta)
        Path(f"{args.out}.md").write_text(md)
        Path(f"{args.out}.json").write_text(to_json(tables, meta))
        return md

    if args.storage:
        studies = read_studies(args.storage)
        tables["a"] = tuned_vs_default(studies)
        tables["d"] = leave_one_out_from_studies(
            studies, TuningDB(args.db).load() if args.db else None)
        write()
    if args.exhaustive_storage:
        tables["b"] = sampled_vs_exhaustive(read_studies(sampled),
                                            read_studies(args.exhaustive_storage))
        write()
    if args.loo:
        import torch
        if not torch.cuda.is_available():
            print("tune_evidence: --loo times kernels and needs a CUDA GPU", file=sys.stderr)
            return 2
        tables["c"] = leave_one_out(_loo_entries(args.db), CaseTimer(args.dtype),
                                    rounds=args.loo_rounds)
    print(write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
