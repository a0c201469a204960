"""The `tune` and `db` subcommands. `register(subparsers)` adds them to the CLI's argparse
subparsers; every subcommand sets `func(args) -> exit code`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import env
from ..config import parse_assignments
from ..kernels import KERNELS
from ..spec import SpecError, load_spec

DEFAULT_SEQLENS = (1024, 4096, 16384)


def seqlens_arg(text: str) -> list[int]:
    """'1k,64k' or '4096' as sorted token counts (an argparse type)."""
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        mult = 1
        if p.endswith("k"):
            p, mult = p[:-1], 1024
        try:
            v = int(p) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a sequence length: {part!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"sequence length must be >= 1: {part!r}")
        out.append(v)
    return sorted(set(out))


def _names(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def register(subparsers) -> None:
    """Add `tune` and `db {show,merge,export,prune}` to an argparse subparsers object."""
    t = subparsers.add_parser(
        "tune", help="autotune kernels of a spec on this GPU and record winners in a tuning DB",
        description="One Optuna study per (device, kernel, spec, shape); rerunning the same "
                    "command resumes interrupted studies. Needs a CUDA GPU, or TRITON_INTERPRET=1 "
                    "to run (slowly) on the CPU interpreter.")
    t.add_argument("spec", help="spec YAML file or built-in spec name")
    t.add_argument("--kernels", type=_names, default=None,
                   help="comma-separated kernel stems (default: every kernel the spec uses)")
    t.add_argument("--seqlens", type=seqlens_arg, default=list(DEFAULT_SEQLENS),
                   help="comma-separated sequence lengths T, 'k' = 1024 (default: 1k,4k,16k)")
    t.add_argument("--batch", type=int, default=1, help="batch size B (default 1)")
    t.add_argument("--trials", type=int, default=40,
                   help="measured configs per study, counting resumed ones (default 40)")
    t.add_argument("--storage", default=None,
                   help="Optuna storage URL (default: SQLite under the cache directory; "
                        "'memory' keeps nothing)")
    t.add_argument("--db", type=Path, default=None,
                   help="tuning DB directory to write (default: NSA_GEN_DB, else the shipped DB)")
    t.add_argument("--timeout", type=float, default=300.0, help="seconds per trial (default 300)")
    t.add_argument("--seed", type=int, default=0, help="sampler and input seed (default 0)")
    t.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="configs compiled in parallel before each round of trials (default "
                        "on a GPU: half the CPU cores, at most 8; on the interpreter 1; "
                        "1 compiles each config in its own trial)")
    t.add_argument("--try", dest="candidates", action="append", default=[], metavar="P=V,...",
                   help="also measure the config dispatch takes now with these params changed "
                        "(e.g. from a probe), before sampling; repeatable")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_tune)

    d = subparsers.add_parser("db", help="inspect and maintain tuning DBs")
    ds = d.add_subparsers(dest="db_command", metavar="{show,merge,export,prune}")
    ds.required = True

    s = ds.add_parser("show", help="list entries")
    s.add_argument("--db", type=Path, action="append", default=None,
                   help="DB directory (repeatable; default: NSA_GEN_DB and the shipped DB)")
    s.add_argument("--kernel", default=None)
    s.add_argument("--device", default=None, help="device id, e.g. sm90-132sm-140gib")
    s.set_defaults(func=cmd_show)

    m = ds.add_parser("merge", help="copy entries of other DBs into one")
    m.add_argument("sources", nargs="+", type=Path, help="DB directories to merge from")
    m.add_argument("--into", type=Path, default=None,
                   help="DB directory to merge into (default: NSA_GEN_DB, else the shipped DB)")
    m.add_argument("--prefer", choices=("newer", "faster", "theirs"), default="newer",
                   help="on a key in both, keep the newer entry (default), the faster, or theirs")
    m.set_defaults(func=cmd_merge)

    e = ds.add_parser("export", help="copy (some) entries into another DB directory")
    e.add_argument("out", type=Path)
    e.add_argument("--db", type=Path, default=None,
                   help="DB directory to read (default: NSA_GEN_DB, else the shipped DB)")
    e.add_argument("--kernel", default=None)
    e.add_argument("--device", default=None)
    e.add_argument("--include-stale", action="store_true",
                   help="also entries whose kernel template changed since they were tuned")
    e.set_defaults(func=cmd_export)

    p = ds.add_parser("prune", help="delete stale or unwanted entries")
    p.add_argument("--db", type=Path, default=None,
                   help="DB directory (default: NSA_GEN_DB, else the shipped DB)")
    p.add_argument("--stale", action="store_true",
                   help="entries of unknown kernels or changed templates (the default criterion)")
    p.add_argument("--other-triton", action="store_true",
                   help="entries measured with another triton version")
    p.add_argument("--older-than", type=float, default=None, metavar="DAYS")
    p.add_argument("--all", action="store_true",
                   help="every entry (of --kernel/--device, if given)")
    p.add_argument("--kernel", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dry-run", action="store_true", help="list what would go, change nothing")
    p.set_defaults(func=cmd_prune)


def _default_db() -> Path | None:
    from ..db import shipped_db_dir
    return env.db_overlay() or shipped_db_dir()


def _db_or_err(given: Path | None, command: str, what: str) -> Path | None:
    """`given`, else the default DB; None (after an error naming `what` is missing) if
    there is neither."""
    root = given or _default_db()
    if root is None:
        _err(f"nsa-gen db {command}: no {what}")
    return root


# ----------------------------------------------------------------------------- tune

def cmd_tune(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.spec)
    except SpecError as e:
        _err(f"nsa-gen tune: {e}")
        return 2
    stems = args.kernels or [s for s, kd in KERNELS.items() if kd.applies(spec)]
    unknown = [s for s in stems if s not in KERNELS]
    if unknown:
        _err(f"nsa-gen tune: unknown kernel(s) {', '.join(unknown)} (known: {', '.join(KERNELS)})")
        return 2
    skipped = [s for s in stems if not KERNELS[s].applies(spec)]
    if skipped:
        _err(f"nsa-gen tune: spec {spec.name!r} does not use {', '.join(skipped)}")
        return 2
    if args.trials < 1 or args.batch < 1 or (args.jobs is not None and args.jobs < 1):
        _err("nsa-gen tune: --trials, --batch and --jobs must be >= 1")
        return 2
    try:
        candidates = [parse_assignments(c.split(",")) for c in args.candidates]
    except ValueError as e:
        _err(f"nsa-gen tune: --try: {e}")
        return 2
    return tune_spec(spec, stems, args.seqlens, batch=args.batch, trials=args.trials,
                     storage=args.storage, db_dir=args.db, timeout_s=args.timeout,
                     seed=args.seed, progress=not args.no_progress, jobs=args.jobs,
                     candidates=candidates)


def _tuning_device():
    """(device key, torch device) to tune on, or None with the reason printed."""
    from ..db import CPU_DEVICE, current_device_key
    if env.interpret():
        return CPU_DEVICE, "cpu"
    import torch
    if not torch.cuda.is_available():
        _err("nsa-gen tune: no CUDA GPU found; tuning measures kernels on a GPU "
             "(TRITON_INTERPRET=1 runs it on the CPU interpreter, for tests only)")
        return None
    return current_device_key(), "cuda"


def tune_spec(spec, stems: list[str], seqlens: list[int], *, batch: int = 1, trials: int = 40,
              storage: str | None = None, db_dir: Path | None = None, timeout_s: float = 300.0,
              seed: int = 0, progress: bool = True, jobs: int | None = None,
              candidates: list[dict] = ()) -> int:
    """Tune kernels `stems` of `spec` at each T in `seqlens` (batch `batch`) on this machine's
    GPU and write the winners to `db_dir` (default: NSA_GEN_DB, else the shipped DB),
    compiling `jobs` configs at a time (None: the Tuner's default). candidates: param
    changes each study also seeds (see `Tuner`).
    Returns an exit code: 0 all tuned, 1 some shape had no working config, 2 cannot tune
    here, 130 interrupted (rerun to resume)."""
    from ..db import TuningDB, shipped_db_dir
    from .tuner import Tuner
    got = _tuning_device()
    if got is None:
        return 2
    device, torch_device = got
    db_dir = db_dir or _default_db()
    if db_dir is None:
        _err("nsa-gen tune: no tuning DB directory: pass --db DIR or set NSA_GEN_DB")
        return 2
    failed_keys = 0
    print(f"nsa-gen tune: {spec.name} on {device.id} ({device.name}); writing {db_dir}", flush=True)
    try:
        with Tuner(spec, db=TuningDB(db_dir), device=device, storage=storage,
                   torch_device=torch_device, seed=seed, progress=progress,
                   timeout_s=timeout_s, jobs=jobs, candidates=candidates) as tuner:
            for stem in stems:
                for T in sorted(seqlens):
                    r = tuner.tune(stem, T, batch, trials)
                    if r.entry is None:
                        failed_keys += 1
                        print(f"  {stem} T={T} B={batch}: no config ran correctly "
                              f"({r.failed} failed)")
                        if r.failures:
                            c, status, msg = r.failures[0]
                            first = msg.splitlines()[0] if msg else ""
                            print(f"    e.g. {c}: {status}: {first}")
                        continue
                    e = r.entry
                    margin = f"{e.margin:+.1%}" if e.margin is not None else "n/a"
                    print(f"  {stem} T={T} B={batch}: {e.config}  {e.ms:.4g} ms "
                          f"(runner-up {margin}, {r.measured} measured, {r.failed} failed)",
                          flush=True)
    except KeyboardInterrupt:
        _err("nsa-gen tune: interrupted; rerun the same command to resume")
        return 130
    known = [p for p in (env.db_overlay(), shipped_db_dir()) if p is not None]
    if not any(Path(p).resolve() == Path(db_dir).resolve() for p in known):
        print(f"nsa-gen tune: to use these results, set NSA_GEN_DB={db_dir}")
    return 1 if failed_keys else 0


def run_tune_all(specs: list[str], *, trials: int = 40, seqlens=DEFAULT_SEQLENS,
                 db_dir: Path | None = None, progress: bool = True,
                 jobs: int | None = None) -> int:
    """Tune every kernel each of `specs` (names or paths) uses, at `seqlens` (the `build`
    job's tuning step). Returns the worst exit code."""
    rc = 0
    for name in specs:
        spec = load_spec(name)
        stems = [s for s, kd in KERNELS.items() if kd.applies(spec)]
        code = tune_spec(spec, stems, list(seqlens), trials=trials, db_dir=db_dir,
                         progress=progress, jobs=jobs)
        if code in (2, 130):
            return code
        rc = max(rc, code)
    return rc


# ----------------------------------------------------------------------------- db

def cmd_show(args: argparse.Namespace) -> int:
    from ..db import TuningDB
    from ..db.store import is_current
    dirs = args.db or [p for p in (env.db_overlay(), _default_db()) if p is not None]
    dirs = list(dict.fromkeys(dirs))
    if not dirs:
        _err("nsa-gen db show: no DB directory (pass --db DIR)")
        return 2
    for root in dirs:
        db = TuningDB(root)
        entries = [(k, e) for k, e in db.load(args.kernel).items()
                   if not args.device or k.device.id == args.device]
        print(f"{root}: {len(entries)} entries")
        entries.sort(key=lambda ke: (ke[0].device.id, ke[0].kernel, ke[0].spec_name, ke[0].B, ke[0].T))
        for k, e in entries:
            margin = f"{e.margin:+.1%}" if e.margin is not None else "n/a"
            flags = "" if is_current(k) else "  [stale]"
            print(f"  {k.device.id:<24} {k.kernel:<18} {k.spec_name or '?':<16} T={k.T:<7} B={k.B:<3} "
                  f"{str(e.config):<40} {e.ms:9.4g} ms  {margin:>7}  {e.trials:>4} trials  "
                  f"{e.date}  triton {k.triton}{flags}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ..db import TuningDB
    into = _db_or_err(args.into, "merge", "target (pass --into DIR)")
    if into is None:
        return 2
    for src in args.sources:
        if not src.is_dir():
            _err(f"nsa-gen db merge: {src} is not a directory")
            return 2
        n = TuningDB(into).merge(TuningDB(src), prefer=args.prefer)
        print(f"{src}: {n} entries written into {into}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..db import TuningDB
    src = _db_or_err(args.db, "export", "DB to read (pass --db DIR)")
    if src is None:
        return 2
    n = TuningDB(src).export(args.out, kernel=args.kernel, device_id=args.device,
                             fresh_only=not args.include_stale)
    print(f"exported {n} entries from {src} to {args.out}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from ..db import TuningDB
    root = _db_or_err(args.db, "prune", "DB directory (pass --db DIR)")
    if root is None:
        return 2
    if args.all:
        stale, other = False, False
        older = None
    else:
        stale = args.stale or not (args.other_triton or args.older_than is not None)
        other, older = args.other_triton, args.older_than
    gone = TuningDB(root).prune(stale=stale, other_triton=other, older_than_days=older,
                                kernel=args.kernel, device_id=args.device, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for k in gone:
        print(f"  {verb} {k.describe()} (triton {k.triton}, source {k.source_hash})")
    print(f"{verb} {len(gone)} entries from {root}")
    return 0
