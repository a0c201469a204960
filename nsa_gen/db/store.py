"""The tuning DB: measured best configs, one human-readable JSON file per device and kernel.

Layout: `<root>/<device id>/<kernel stem>.json` (see tuning_db/README.md for the format).
Readers never lock: every write replaces the file atomically, so a reader sees an old or a
new file, never half of one. Writers take an exclusive `fcntl` lock on a sibling lock file
for the whole read-modify-write, so concurrent tuners never drop each other's entries.
A file that is not valid JSON, or not ours, or of a newer schema, is skipped with a warning
that names it; loading never raises because of file contents.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from .. import codegen, env
from ..config import Config
from ..kernels import kernel_def
from ..spec import NSASpec, parse_spec

log = logging.getLogger("nsa_gen")

SCHEMA = "nsa-gen-tuning-db"
SCHEMA_VERSION = 1

# Opt-in shared memory per block (bytes) by compute capability, for when the driver's own
# number is unknown (a key read back from a file, or an older torch). sm80/sm87 allow 163 KiB,
# the consumer and Ada parts (sm86, sm89, sm120) 99 KiB, Hopper and Blackwell DC 227 KiB.
SMEM_LIMITS = {
    "sm70": 96 * 1024, "sm72": 96 * 1024, "sm75": 64 * 1024,
    "sm80": 163 * 1024, "sm87": 163 * 1024, "sm86": 99 * 1024, "sm89": 99 * 1024,
    "sm90": 227 * 1024, "sm100": 227 * 1024, "sm103": 227 * 1024, "sm120": 99 * 1024,
}
# Every CUDA GPU since sm20 guarantees 48 KiB per block without opt-in.
SMEM_FALLBACK = 48 * 1024
MAX_REGS_PER_THREAD = 255
MAX_THREADS_PER_BLOCK = 1024
CPU_ARCH = "cpu"


# ----------------------------------------------------------------------------- keys

@dataclass(frozen=True)
class DeviceKey:
    """What a tuned config depends on about a device: compute capability, SM count, memory.

    `name` (product name) and `smem` (opt-in shared memory per block, 0 = use the table)
    are informational and not part of equality: two boards that agree on the rest share
    tuning results whatever they are called.
    """

    arch: str  # "sm90"; "cpu" for the Triton interpreter
    sm_count: int
    mem_gib: int
    name: str = field(default="", compare=False)
    smem: int = field(default=0, compare=False)

    @property
    def id(self) -> str:
        """Directory name of this device in a DB: e.g. `sm90-132sm-140gib`, `cpu-interpreter`."""
        if self.arch == CPU_ARCH:
            return "cpu-interpreter"
        return f"{self.arch}-{self.sm_count}sm-{self.mem_gib}gib"

    @property
    def is_cpu(self) -> bool:
        return self.arch == CPU_ARCH

    @property
    def capability(self) -> int:
        """Compute capability x10 (sm90 -> 90); the CPU interpreter counts as any GPU."""
        if self.is_cpu:
            return 10 ** 6
        digits = "".join(c for c in self.arch if c.isdigit())
        return int(digits) if digits else 0

    @property
    def smem_limit(self) -> int | None:
        """Shared memory a block may use, in bytes; None on the CPU interpreter (no limit)."""
        if self.is_cpu:
            return None
        return self.smem or SMEM_LIMITS.get(self.arch, SMEM_FALLBACK)

    def to_json(self) -> dict[str, Any]:
        return {"arch": self.arch, "sm_count": self.sm_count, "mem_gib": self.mem_gib,
                "name": self.name, "smem": self.smem}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "DeviceKey":
        arch, sm, mem = d["arch"], d["sm_count"], d["mem_gib"]
        if not isinstance(arch, str) or not arch or not all(c.isalnum() for c in arch):
            raise ValueError(f"device.arch {arch!r:.40} is not an architecture name")
        for name, v in (("sm_count", sm), ("mem_gib", mem)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"device.{name} must be an integer >= 0")
        smem = d.get("smem", 0)
        if isinstance(smem, bool) or not isinstance(smem, int) or smem < 0:
            raise ValueError("device.smem must be an integer >= 0")
        return cls(arch, sm, mem, str(d.get("name", "")), smem)


CPU_DEVICE = DeviceKey(CPU_ARCH, 0, 0, "Triton interpreter (CPU)")


def current_device_key(index: int | None = None) -> DeviceKey:
    """The key of CUDA device `index` (default: the current one), or `CPU_DEVICE` when CUDA is
    unavailable or TRITON_INTERPRET=1 runs kernels on the CPU."""
    if env.interpret():
        return CPU_DEVICE
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return CPU_DEVICE
    if not torch.cuda.is_available():
        return CPU_DEVICE
    idx = torch.cuda.current_device() if index is None else index
    return _cuda_key(idx)


@functools.lru_cache(maxsize=None)
def _cuda_key(index: int) -> DeviceKey:
    import torch
    p = torch.cuda.get_device_properties(index)
    smem = int(getattr(p, "shared_memory_per_block_optin", 0) or 0)
    return DeviceKey(f"sm{p.major}{p.minor}", int(p.multi_processor_count),
                     int(round(p.total_memory / 2**30)), str(p.name), smem)


@functools.lru_cache(maxsize=None)
def kernel_source_hash(stem: str) -> str:
    """Hash of kernel `stem`'s template text and of the templates it imports: a tuned config
    is only trusted for the source it was measured on. A template that imports none hashes
    as its text alone (so its entries stay valid when another template starts sharing code)."""
    h = hashlib.sha256()
    for i, text in enumerate(codegen.template_sources(kernel_def(stem).template)):
        h.update(text if i == 0 else b"\0" + text)
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def triton_version() -> str:
    try:
        from importlib.metadata import version
        return version("triton")
    except Exception:  # noqa: BLE001 - a missing dist-info must not break dispatch
        return "unknown"


def spec_fields(spec: NSASpec) -> tuple[tuple[str, Any], ...]:
    """Everything of a spec but its name, flattened to sorted (dotted name, value) pairs:
    the categorical part of a tuning key (shapes T, B are the numeric part)."""
    out: list[tuple[str, Any]] = []

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, Mapping):
            for k, x in v.items():
                walk(f"{prefix}{k}.", x)
        else:
            out.append((prefix[:-1], tuple(v) if isinstance(v, list) else v))

    d = spec.to_dict()
    d.pop("name")
    walk("", d)
    return tuple(sorted(out))


def spec_from_fields(fields: Iterable[tuple[str, Any]], name: str = "") -> NSASpec:
    """The spec whose `spec_fields` are `fields` (e.g. a TuneKey's `spec`), named `name`
    (default "tuned"): the inverse of `spec_fields`, for timing a DB entry's shape without
    knowing which spec file it came from. Raises SpecError on fields that are no spec."""
    d: dict[str, Any] = {}
    for dotted, v in fields:
        *outer, last = dotted.split(".")
        node = d
        for part in outer:
            node = node.setdefault(part, {})
        node[last] = list(v) if isinstance(v, tuple) else v
    d["name"] = name or "tuned"
    return parse_spec(d)


@dataclass(frozen=True)
class TuneKey:
    """What one DB entry was measured for. `spec_name` is an alias, not part of equality."""

    device: DeviceKey
    kernel: str
    triton: str
    source_hash: str
    spec: tuple[tuple[str, Any], ...]
    T: int
    B: int = 1
    spec_name: str = field(default="", compare=False)

    @classmethod
    def make(cls, device: DeviceKey, kernel: str, spec: NSASpec, T: int, B: int = 1, *,
             triton: str | None = None, source_hash: str | None = None) -> "TuneKey":
        """The key of `kernel` for `spec` at shape (T, B) on `device`, with the installed
        triton version and the current template hash unless given."""
        return cls(device, kernel, triton or triton_version(),
                   source_hash or kernel_source_hash(kernel), spec_fields(spec), int(T), int(B),
                   spec.name)

    @property
    def group(self) -> tuple:
        """The key without device, shape and triton version: entries that may stand in for
        each other across shapes."""
        return (self.kernel, self.source_hash, self.spec)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.T, self.B)

    def describe(self) -> str:
        return (f"{self.kernel} {self.spec_name or '<spec>'} T={self.T} B={self.B} "
                f"on {self.device.id}")


@dataclass(frozen=True)
class Entry:
    """A tuned result: the winning config, its median time in ms, how much slower the
    runner-up was as a fraction of it (None if nothing else ran; negative where a retune kept
    the entry it measured within the tuner's REPLACE_MARGIN of a faster config), trials run,
    ISO date."""

    config: Config
    ms: float
    margin: float | None
    trials: int
    date: str

    @staticmethod
    def today() -> str:
        return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")


def shape_distance(a: tuple[int, int], b: tuple[int, int]) -> float:
    """Distance of two (T, B) shapes in log2 space; T counts more than B."""
    return (abs(math.log2(max(1, a[0])) - math.log2(max(1, b[0])))
            + 0.5 * abs(math.log2(max(1, a[1])) - math.log2(max(1, b[1]))))


# ----------------------------------------------------------------------------- (de)serialising

def _entry_to_json(key: TuneKey, e: Entry) -> dict[str, Any]:
    return {
        "spec_name": key.spec_name,
        "spec": {k: list(v) if isinstance(v, tuple) else v for k, v in key.spec},
        "shape": {"T": key.T, "B": key.B},
        "triton": key.triton,
        "source_hash": key.source_hash,
        "config": e.config.as_dict(),
        "ms": e.ms,
        "margin": e.margin,
        "trials": e.trials,
        "date": e.date,
    }


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _entry_from_json(device: DeviceKey, kernel: str, d: Any) -> tuple[TuneKey, Entry]:
    if not isinstance(d, Mapping):
        raise ValueError("entry is not an object")
    spec = d["spec"]
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError("spec must be a non-empty object")
    fields: list[tuple[str, Any]] = []
    for k, v in spec.items():
        if isinstance(v, list) and all(_scalar(x) for x in v):
            v = tuple(v)
        elif not _scalar(v):
            raise ValueError(f"spec.{k} is not a scalar or list")
        fields.append((str(k), v))
    shape = d["shape"]
    T, B = shape["T"], shape.get("B", 1)
    for name, v in (("T", T), ("B", B)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"shape.{name} must be an integer >= 1")
    cfg = d["config"]
    if not isinstance(cfg, Mapping) or not all(_scalar(v) for v in cfg.values()):
        raise ValueError("config must be an object of scalars")
    ms = d["ms"]
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not ms >= 0:
        raise ValueError("ms must be a number >= 0")
    margin = d.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise ValueError("margin must be a number or null")
    trials = d.get("trials", 0)
    if isinstance(trials, bool) or not isinstance(trials, int):
        raise ValueError("trials must be an integer")
    triton, source_hash = d["triton"], d["source_hash"]
    if not isinstance(triton, str) or not isinstance(source_hash, str):
        raise ValueError("triton and source_hash must be strings")
    key = TuneKey(device, kernel, triton, source_hash, tuple(sorted(fields)), T, B,
                  str(d.get("spec_name", "")))
    entry = Entry(Config.from_dict(cfg), float(ms), None if margin is None else float(margin),
                  trials, str(d.get("date", "")))
    return key, entry


def _entry_sort_key(item: tuple[TuneKey, Entry]) -> tuple:
    k = item[0]
    return (k.spec_name, json.dumps(k.spec, default=str), k.source_hash, k.triton, k.B, k.T)


class DBFileError(ValueError):
    """A DB file we must not read or overwrite (corrupt, foreign, newer schema)."""


def parse_db_file(text: str) -> tuple[DeviceKey, str, dict[TuneKey, Entry], list[str]]:
    """Parse one DB file's text -> (device, kernel, entries, problems with single entries).
    Raises DBFileError when the file as a whole is unusable."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DBFileError(f"not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise DBFileError(f"not an nsa-gen tuning DB file (no \"schema\": \"{SCHEMA}\")")
    version = data.get("version")
    if version != SCHEMA_VERSION:
        raise DBFileError(f"schema version {version!r:.20}, this nsa-gen reads version "
                          f"{SCHEMA_VERSION} only")
    try:
        device = DeviceKey.from_json(data["device"])
        kernel = data["kernel"]
        if not isinstance(kernel, str) or not kernel:
            raise ValueError("kernel must be a non-empty string")
        raw = data["entries"]
        if not isinstance(raw, list):
            raise ValueError("entries must be a list")
    except (KeyError, TypeError, ValueError) as e:
        raise DBFileError(f"malformed header: {_why(e)}") from None
    entries: dict[TuneKey, Entry] = {}
    problems: list[str] = []
    for i, d in enumerate(raw):
        try:
            k, e = _entry_from_json(device, kernel, d)
        except (KeyError, TypeError, ValueError) as err:
            problems.append(f"entry {i}: {_why(err)}")
            continue
        entries[k] = e
    return device, kernel, entries, problems


def _why(e: Exception) -> str:
    return f"missing field {e}" if isinstance(e, KeyError) else str(e)


def dump_db_file(device: DeviceKey, kernel: str, entries: Mapping[TuneKey, Entry]) -> str:
    """The text of one DB file; entries are sorted so that diffs stay small."""
    data = {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "kernel": kernel,
        "device": device.to_json(),
        "entries": [_entry_to_json(k, e) for k, e in sorted(entries.items(), key=_entry_sort_key)],
    }
    return json.dumps(data, indent=2) + "\n"


# ----------------------------------------------------------------------------- the DB

def shipped_db_dir() -> Path | None:
    """The DB shipped with nsa-gen: inside the package of an installed wheel, at the top level
    of a checkout. None if neither exists."""
    here = Path(__file__).resolve().parent.parent
    for cand in (here / "tuning_db", here.parent / "tuning_db"):
        if cand.is_dir():
            return cand
    return None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock for a read-modify-write of `path` (lock file beside it; the
    lock file is left in place, since deleting it would race with the next locker)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


class TuningDB:
    """A tuning DB directory. Reading is lock-free; every change is a locked, atomic
    read-modify-write of one (device, kernel) file."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"TuningDB({str(self.root)!r})"

    def path_for(self, device: DeviceKey, kernel: str) -> Path:
        return self.root / device.id / f"{kernel}.json"

    def files(self, kernel: str | None = None) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob(f"*/{kernel or '*'}.json"))

    # -- reading

    def read_file(self, path: Path) -> tuple[DeviceKey, str, dict[TuneKey, Entry]] | None:
        """One file's entries, or None (with a warning naming it) if it is unusable."""
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            log.warning("skipping tuning DB file %s: cannot read (%s)", path,
                        e.__class__.__name__)
            return None
        try:
            device, kernel, entries, problems = parse_db_file(text)
        except DBFileError as e:
            log.warning("skipping tuning DB file %s: %s", path, e)
            return None
        for p in problems:
            log.warning("tuning DB file %s: skipping %s", path, p)
        return device, kernel, entries

    def load(self, kernel: str | None = None, device: DeviceKey | None = None) -> dict[TuneKey, Entry]:
        """All entries, optionally of one kernel and/or device. Unusable files are skipped."""
        out: dict[TuneKey, Entry] = {}
        for path in self.files(kernel):
            got = self.read_file(path)
            if got is None:
                continue
            dev, kern, entries = got
            if (kernel and kern != kernel) or (device is not None and dev != device):
                continue
            out.update(entries)
        return out

    def get(self, key: TuneKey) -> Entry | None:
        return self.load(key.kernel, key.device).get(key)

    # -- writing

    def _rewrite(self, device: DeviceKey, kernel: str,
                 change: Callable[[dict[TuneKey, Entry]], bool]) -> None:
        """Locked read-modify-write of one file: `change` edits the entries in place and says
        whether anything changed."""
        path = self.path_for(device, kernel)
        with file_lock(path):
            entries: dict[TuneKey, Entry] = {}
            if path.exists():
                try:
                    text = path.read_text()
                    _, _, entries, problems = parse_db_file(text)
                    for p in problems:
                        log.warning("tuning DB file %s: dropping %s", path, p)
                except (OSError, UnicodeDecodeError, DBFileError) as e:
                    # Keep what we cannot read: it may be a newer nsa-gen's file or hand edits.
                    aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
                    os.replace(path, aside)
                    log.warning("tuning DB file %s is unusable (%s); moved it to %s",
                                path, e, aside.name)
                    entries = {}
            if change(entries):
                codegen.atomic_write(path, dump_db_file(device, kernel, entries))

    def put(self, key: TuneKey, entry: Entry) -> None:
        """Insert or replace one entry."""
        self.put_many([(key, entry)])

    def put_many(self, items: Iterable[tuple[TuneKey, Entry]],
                 prefer: Callable[[Entry, Entry], bool] | None = None) -> int:
        """Insert entries; on a key already present, keep the new one unless `prefer(old, new)`
        is False. Returns how many entries were written."""
        by_file: dict[tuple[DeviceKey, str], list[tuple[TuneKey, Entry]]] = {}
        for k, e in items:
            by_file.setdefault((k.device, k.kernel), []).append((k, e))
        written = 0
        for (device, kernel), group in by_file.items():
            def change(entries: dict[TuneKey, Entry], group=group) -> bool:
                nonlocal written
                n = 0
                for k, e in group:
                    old = entries.get(k)
                    if old is not None and (old == e or (prefer and not prefer(old, e))):
                        continue
                    entries.pop(k, None)  # so the new key's aliases (spec_name) win too
                    entries[k] = e
                    n += 1
                written += n
                return n > 0
            self._rewrite(device, kernel, change)
        return written

    def merge(self, other: "TuningDB", prefer: str = "newer") -> int:
        """Copy `other`'s entries in. On a key in both: prefer="newer" keeps the later date,
        "faster" the smaller ms, "theirs" always takes other's. Returns entries written."""
        rules = {
            "newer": lambda old, new: new.date >= old.date,
            "faster": lambda old, new: new.ms < old.ms,
            "theirs": lambda old, new: True,
        }
        if prefer not in rules:
            raise ValueError(f"prefer must be one of {', '.join(rules)}, got {prefer!r}")
        return self.put_many(other.load().items(), prefer=rules[prefer])

    def remove(self, pred: Callable[[TuneKey, Entry], bool], *, dry_run: bool = False) -> list[TuneKey]:
        """Delete every entry for which `pred(key, entry)` holds; returns their keys."""
        removed: list[TuneKey] = []
        for path in self.files():
            got = self.read_file(path)
            if got is None:
                continue
            device, kernel, _ = got

            def change(entries: dict[TuneKey, Entry]) -> bool:
                gone = [k for k, e in entries.items() if pred(k, e)]
                removed.extend(gone)
                if dry_run:
                    return False
                for k in gone:
                    del entries[k]
                return bool(gone)
            self._rewrite(device, kernel, change)
        return removed

    def prune(self, *, stale: bool = True, other_triton: bool = False,
              kernel: str | None = None, device_id: str | None = None,
              older_than_days: float | None = None, dry_run: bool = False) -> list[TuneKey]:
        """Delete entries that can no longer be used or are no longer wanted:
        stale (kernel unknown or template changed since), other_triton (measured with another
        triton version), of `kernel`/`device_id` (all of them), or older than a number of days.
        Criteria combine with OR, except kernel/device_id which restrict the others when
        combined with them. Returns the keys removed (or that would be, with dry_run)."""
        cutoff = None
        if older_than_days is not None:
            cutoff = (_dt.datetime.now(_dt.timezone.utc)
                      - _dt.timedelta(days=older_than_days)).strftime("%Y-%m-%d")
        selective = stale or other_triton or cutoff is not None

        def pred(k: TuneKey, e: Entry) -> bool:
            if kernel and k.kernel != kernel:
                return False
            if device_id and k.device.id != device_id:
                return False
            if not selective:
                return True
            if stale and not is_current(k):
                return True
            if other_triton and k.triton != triton_version():
                return True
            return cutoff is not None and e.date < cutoff
        return self.remove(pred, dry_run=dry_run)

    def export(self, out: str | os.PathLike, *, kernel: str | None = None,
               device_id: str | None = None, fresh_only: bool = False) -> int:
        """Copy entries (optionally of one kernel/device, only non-stale ones) into the DB at
        `out`, e.g. to ship them or to hand them to a model as its overlay. Returns the count."""
        items = [(k, e) for k, e in self.load(kernel).items()
                 if (not device_id or k.device.id == device_id) and (not fresh_only or is_current(k))]
        return TuningDB(out).put_many(items)


def is_current(k: TuneKey) -> bool:
    """Whether `k`'s kernel still exists with the template source it was tuned on."""
    try:
        return kernel_source_hash(k.kernel) == k.source_hash
    except (KeyError, OSError):
        return False
