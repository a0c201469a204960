"""NSA variant specs: YAML -> validated frozen dataclass.

A spec fixes everything about one NSA variant that the kernels are specialised on.
Validation is strict and total: every field is type-checked and range-checked here,
so that nothing but validated numbers and enum values can reach a template. Errors are
`SpecError`s that name the field path and the rule, one line each.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

PHIS = ("mean", "mlp")
DTYPES = ("float32", "float16", "bfloat16")
BRANCHES = ("cmp", "slc", "swa")
MAX_HEAD_DIM = 256
MAX_GROUP = 64
MAX_HEADS = 1024
MAX_BLOCK = 4096
MAX_TOP_N = 256
MAX_WINDOW = 1 << 20
MAX_BLOCK_RATIO = 16
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

BUILTIN_DIR = Path(__file__).resolve().parent / "specs"


class SpecError(ValueError):
    """A spec broke a rule. `path` is the dotted field path, `rule` says what is wrong."""

    def __init__(self, path: str, rule: str, source: str | None = None):
        self.path, self.rule, self.source = path, rule, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}spec field '{path}': {rule}")


@dataclass(frozen=True)
class CompressionSpec:
    block: int  # l
    stride: int  # d
    phi: str = "mean"


@dataclass(frozen=True)
class SelectionSpec:
    block: int  # l' (BS)
    top_n: int  # n (S)
    initial_blocks: int = 1
    local_blocks: int = 2


@dataclass(frozen=True)
class NSASpec:
    name: str
    heads_q: int
    heads_kv: int
    head_dim_k: int
    head_dim_v: int
    compression: CompressionSpec
    selection: SelectionSpec
    window: int
    dtype: str = "bfloat16"
    scale: float | None = None
    branches: tuple[str, ...] = field(default=BRANCHES)

    # Short names, the project's fixed vocabulary.
    @property
    def HQ(self) -> int:
        return self.heads_q

    @property
    def H(self) -> int:
        return self.heads_kv

    @property
    def G(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def DK(self) -> int:
        return self.head_dim_k

    @property
    def DV(self) -> int:
        return self.head_dim_v

    @property
    def l(self) -> int:  # noqa: E743 - the paper's name
        return self.compression.block

    @property
    def d(self) -> int:
        return self.compression.stride

    @property
    def phi(self) -> str:
        return self.compression.phi

    @property
    def BS(self) -> int:
        return self.selection.block

    @property
    def S(self) -> int:
        return self.selection.top_n

    @property
    def w(self) -> int:
        return self.window

    @property
    def initial_blocks(self) -> int:
        return self.selection.initial_blocks

    @property
    def local_blocks(self) -> int:
        return self.selection.local_blocks

    @property
    def softmax_scale(self) -> float:
        return float(self.scale) if self.scale is not None else self.head_dim_k ** -0.5

    def has(self, branch: str) -> bool:
        return branch in self.branches

    def to_dict(self) -> dict[str, Any]:
        """The spec in its YAML form (round-trips through `parse_spec`)."""
        return {
            "name": self.name,
            "heads": {"q": self.heads_q, "kv": self.heads_kv},
            "head_dim": {"k": self.head_dim_k, "v": self.head_dim_v},
            "compression": asdict(self.compression),
            "selection": asdict(self.selection),
            "window": self.window,
            "dtype": self.dtype,
            "scale": self.scale,
            "branches": list(self.branches),
        }

    @property
    def spec_hash(self) -> str:
        """Content hash of everything kernels depend on (the name is not part of it)."""
        d = self.to_dict()
        d.pop("name")
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **changes: Any) -> "NSASpec":
        """A new validated spec with some top-level YAML keys changed (e.g. heads={...})."""
        d = self.to_dict()
        d.update(changes)
        return parse_spec(d)


# ----------------------------------------------------------------------------- parsing

_SCHEMA_TOP = {"name", "heads", "head_dim", "compression", "selection", "window", "dtype",
               "scale", "branches"}
_REQUIRED_TOP = ("name", "heads", "head_dim", "compression", "selection")


def _int(m: Mapping, key: str, path: str, *, lo: int, hi: int, default: int | None = None) -> int:
    if key not in m:
        if default is None:
            raise SpecError(f"{path}{key}", "is required")
        return default
    v = m[key]
    # bool is an int subclass in Python: `true` is not a size.
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(f"{path}{key}", f"must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise SpecError(f"{path}{key}", f"must be in [{lo}, {hi}], got {v}")
    return v


def _mapping(m: Mapping, key: str, allowed: set[str], path: str = "") -> Mapping:
    v = m.get(key)
    if v is None:
        raise SpecError(f"{path}{key}", "is required")
    if not isinstance(v, Mapping):
        raise SpecError(f"{path}{key}", f"must be a mapping, got {type(v).__name__}")
    for k in v:
        if not isinstance(k, str) or k not in allowed:
            raise SpecError(f"{path}{key}.{k}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return v


def _enum(m: Mapping, key: str, path: str, choices: tuple[str, ...], default: str | None) -> str:
    if key not in m:
        if default is None:
            raise SpecError(f"{path}{key}", "is required")
        return default
    v = m[key]
    if not isinstance(v, str) or v not in choices:
        raise SpecError(f"{path}{key}", f"must be one of {', '.join(choices)}, got {v!r:.40}")
    return v


def parse_spec(data: Any, source: str | None = None) -> NSASpec:
    """Validate a YAML-loaded mapping into an `NSASpec`; raise `SpecError` on any violation."""
    try:
        return _parse(data)
    except SpecError as e:
        if source and not e.source:
            raise SpecError(e.path, e.rule, source) from None
        raise


def _parse(data: Any) -> NSASpec:
    if not isinstance(data, Mapping):
        raise SpecError("<root>", f"must be a mapping, got {type(data).__name__}")
    for k in data:
        if not isinstance(k, str) or k not in _SCHEMA_TOP:
            raise SpecError(str(k), f"unknown key (allowed: {', '.join(sorted(_SCHEMA_TOP))})")
    for k in _REQUIRED_TOP:
        if k not in data:
            raise SpecError(k, "is required")

    name = data["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SpecError("name", "must match [a-z0-9][a-z0-9_-]{0,63}")

    heads = _mapping(data, "heads", {"q", "kv"})
    hq = _int(heads, "q", "heads.", lo=1, hi=MAX_HEADS)
    h = _int(heads, "kv", "heads.", lo=1, hi=MAX_HEADS)
    if hq % h:
        raise SpecError("heads.q", f"must be divisible by heads.kv ({hq} % {h} != 0)")
    if not 1 <= hq // h <= MAX_GROUP:
        raise SpecError("heads.q", f"group size heads.q / heads.kv must be in [1, {MAX_GROUP}], got {hq // h}")

    hd = _mapping(data, "head_dim", {"k", "v"})
    dk = _int(hd, "k", "head_dim.", lo=16, hi=MAX_HEAD_DIM)
    dv = _int(hd, "v", "head_dim.", lo=16, hi=MAX_HEAD_DIM)
    for key, v in (("k", dk), ("v", dv)):
        if v % 16:
            raise SpecError(f"head_dim.{key}", f"must be a multiple of 16 (tensor-core tiles), got {v}")

    cm = _mapping(data, "compression", {"block", "stride", "phi"})
    l = _int(cm, "block", "compression.", lo=1, hi=MAX_BLOCK)
    d = _int(cm, "stride", "compression.", lo=1, hi=MAX_BLOCK)
    phi = _enum(cm, "phi", "compression.", PHIS, "mean")
    if l % d:
        raise SpecError("compression.stride", f"must divide compression.block ({l} % {d} != 0)")
    for key, v in (("block", l), ("stride", d)):
        if v & (v - 1):
            raise SpecError(f"compression.{key}", f"must be a power of two, got {v}")

    sm = _mapping(data, "selection", {"block", "top_n", "initial_blocks", "local_blocks"})
    bs = _int(sm, "block", "selection.", lo=16, hi=MAX_BLOCK)
    if bs & (bs - 1):
        raise SpecError("selection.block", f"must be a power of two >= 16, got {bs}")
    if bs % d:
        raise SpecError("selection.block", f"must be divisible by compression.stride ({bs} % {d} != 0)")
    if l > bs:
        raise SpecError("compression.block", f"must be <= selection.block ({l} > {bs})")
    if bs // d > MAX_BLOCK_RATIO:
        # top-n scores BS/d compressed blocks per selection block inside one tile
        raise SpecError("selection.block", f"selection.block / compression.stride must be <= "
                        f"{MAX_BLOCK_RATIO}, got {bs // d}")
    n = _int(sm, "top_n", "selection.", lo=1, hi=MAX_TOP_N)
    init = _int(sm, "initial_blocks", "selection.", lo=0, hi=MAX_TOP_N, default=1)
    local = _int(sm, "local_blocks", "selection.", lo=0, hi=MAX_TOP_N, default=2)
    if n < init + local:
        raise SpecError("selection.top_n", f"must be >= initial_blocks + local_blocks ({n} < {init + local})")

    w = _int(data, "window", "", lo=0, hi=MAX_WINDOW, default=0)
    dtype = _enum(data, "dtype", "", DTYPES, "bfloat16")

    scale = data.get("scale")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise SpecError("scale", f"must be a number or null, got {type(scale).__name__}")
        scale = float(scale)
        if not (0.0 < scale < 1e4):  # also rejects nan and inf
            raise SpecError("scale", f"must be a finite number > 0, got {scale}")

    if "branches" in data:
        br = data["branches"]
        if not isinstance(br, list) or not br:
            raise SpecError("branches", "must be a non-empty list of cmp, slc, swa")
        for i, b in enumerate(br):
            if not isinstance(b, str) or b not in BRANCHES:
                raise SpecError(f"branches[{i}]", f"must be one of {', '.join(BRANCHES)}, got {b!r:.40}")
        if len(set(br)) != len(br):
            raise SpecError("branches", "must not repeat a branch")
        branches = tuple(b for b in BRANCHES if b in br)
    else:
        branches = tuple(b for b in BRANCHES if b != "swa" or w > 0)
    if "swa" in branches and w == 0:
        raise SpecError("window", "must be > 0 when the swa branch is on (0 turns the branch off)")

    return NSASpec(
        name=name, heads_q=hq, heads_kv=h, head_dim_k=dk, head_dim_v=dv,
        compression=CompressionSpec(block=l, stride=d, phi=phi),
        selection=SelectionSpec(block=bs, top_n=n, initial_blocks=init, local_blocks=local),
        window=w, dtype=dtype, scale=scale, branches=branches,
    )


def builtin_specs() -> list[str]:
    """Names of the specs shipped with the package."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_spec(path_or_name: str | Path) -> NSASpec:
    """Load a spec from a YAML file, or a built-in spec by name (see `builtin_specs()`)."""
    p = Path(path_or_name)
    if not p.exists():
        builtin = BUILTIN_DIR / f"{path_or_name}.yaml"
        if isinstance(path_or_name, str) and _NAME_RE.match(path_or_name) and builtin.exists():
            p = builtin
        else:
            raise SpecError("<file>", f"no such spec file or built-in spec "
                            f"(built-ins: {', '.join(builtin_specs())})", str(path_or_name))
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError("<file>", f"cannot read: {e.__class__.__name__}", str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError("<file>", f"not valid YAML{where}", str(p)) from None
    return parse_spec(data, source=str(p))
