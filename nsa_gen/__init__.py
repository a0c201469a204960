"""nsa-gen: generated, autotuned Triton kernels for Native Sparse Attention."""
from __future__ import annotations

import logging

from . import env as _env
from .spec import NSASpec, SpecError, builtin_specs, load_spec, parse_spec

__version__ = "0.1.0"

logging.getLogger("nsa_gen").setLevel(_env.log_level())

__all__ = ["NSASpec", "SpecError", "builtin_specs", "load_spec", "parse_spec", "nsa",
           "nsa_decode", "NSACache", "DecodeGraph", "NativeSparseAttention", "__version__"]


def __getattr__(name: str):
    # torch and triton load only when the op is used, so the CLI's spec commands stay fast.
    if name in ("nsa", "nsa_decode", "NSACache", "DecodeGraph", "NativeSparseAttention"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'nsa_gen' has no attribute {name!r}")
