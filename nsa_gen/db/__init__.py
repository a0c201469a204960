"""Tuning DB (measured configs on disk) and runtime dispatch (config for a call's shape).

`db` sits between `kernels` and `api`: it imports `spec`, `config`, `kernels`, `codegen`
and `env`, never `ops`, `tuning` or `api`.
"""
from .dispatch import (Dispatcher, config_problem, default_dispatcher, fitting_default,
                       reset_default_dispatcher)
from .store import (CPU_DEVICE, SCHEMA, SCHEMA_VERSION, DeviceKey, Entry, TuneKey, TuningDB,
                    current_device_key, kernel_source_hash, shape_distance, shipped_db_dir,
                    spec_fields, spec_from_fields, triton_version)

__all__ = [
    "CPU_DEVICE", "SCHEMA", "SCHEMA_VERSION", "DeviceKey", "Dispatcher", "Entry", "TuneKey",
    "TuningDB", "config_problem", "current_device_key", "default_dispatcher", "fitting_default",
    "kernel_source_hash", "reset_default_dispatcher", "shape_distance", "shipped_db_dir",
    "spec_fields", "spec_from_fields", "triton_version",
]
