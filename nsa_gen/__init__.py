"""nsa-gen: generated, autotuned Triton kernels for Native Sparse Attention."""
from __future__ import annotations

import logging

from . import env as _env
from .spec import NSASpec, SpecError, builtin_specs, load_spec, parse_spec

__version__ = "0.1.0"

logging.getLogger("nsa_gen").setLevel(_env.log_level())

__all__ = ["NSASpec", "SpecError", "builtin_specs", "load_spec", "parse_spec", "__version__"]
