"""Kernel launch configurations: frozen, hashable, JSON round-trippable."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping


@dataclass(frozen=True)
class Config:
    """One point of a kernel's config space.

    `params` holds the template's tunables (tile sizes, structural variant) as sorted
    (name, value) pairs, so that two equal configs hash and compare equal; `num_warps`
    and `num_stages` are Triton launch options.
    """

    params: tuple[tuple[str, Any], ...] = ()
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def make(cls, num_warps: int = 4, num_stages: int = 2, **params: Any) -> "Config":
        return cls(tuple(sorted(params.items())), int(num_warps), int(num_stages))

    def __getitem__(self, name: str) -> Any:
        for k, v in self.params:
            if k == name:
                return v
        raise KeyError(name)

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def replace(self, **changes: Any) -> "Config":
        """This config with some values changed (params, num_warps or num_stages)."""
        return Config.from_dict({**self.as_dict(), **changes})

    def as_dict(self) -> dict[str, Any]:
        return {**dict(self.params), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        d = dict(d)
        return cls.make(num_warps=d.pop("num_warps", 4), num_stages=d.pop("num_stages", 2), **d)

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.as_dict().items())


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """Command-line params as a dict: ["BLOCK_T=8", "MERGE=rank"] -> {"BLOCK_T": 8,
    "MERGE": "rank"} (integers as int, any other value as its word)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"'{item}' is not NAME=VALUE")
        try:
            out[name] = int(value)
        except ValueError:
            out[name] = value
    return out
