"""Probe: the two kernels of selection_fwd's FORCED variant timed apart, on the GPU.

Each run `SPEC[:P=V,...]` takes the dispatcher's selection_fwd config at --seqlen with the
params replaced (e.g. FORCED=64) and times, do_bench medians on canonical top-n-like lists:
"base_ms" the dispatched config's whole launch, "whole_ms" the variant's, "main_ms" its
group-centric kernel alone (starting from the state the forced pass left), and
"forced_ms_W_S" the forced pass alone with W warps and S stages.

Usage: python benchmarks/forced_probe.py [--seqlen 65536] [--out DIR] fla-compat:FORCED=64 ...
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.config import parse_assignments  # noqa: E402
from probe_main import dispatched_case, probe_main  # noqa: E402


def probe(run: str, T: int) -> dict:
    import torch

    from nsa_gen.kernels import kernel_module, token_group_pad
    from nsa_gen.ops.common import launch_options, tile_table
    from nsa_gen.ops.selection import _kv_args, selection_fwd, visible_blocks
    name, overrides = (run.split(":", 1) + [""])[:2]
    spec, base, case = dispatched_case(name, "selection_fwd", T)
    cfg = base.replace(**parse_assignments(filter(None, overrides.split(","))))
    q, k, v = (case.inputs[n] for n in "qkv")
    idx = visible_blocks(case.inputs["block_indices"], spec, None)
    row = {"spec": name, "T": T, "base": str(base), "variant": str(cfg)}
    kw = dict(canonical=True, forced_listed=True)
    row["base_ms"] = _bench(lambda: selection_fwd(q, k, v, idx, spec, base, **kw))
    row["whole_ms"] = _bench(lambda: selection_fwd(q, k, v, idx, spec, cfg, **kw))
    if not cfg["FORCED"]:
        return row
    o, lse = selection_fwd(q, k, v, idx, spec, cfg, **kw)
    mod = kernel_module("selection_fwd", spec, cfg)
    kv = _kv_args(k, v, spec, cfg)
    tiles = tile_table(None, 1, T, cfg["FORCED"] // token_group_pad(spec), spec.l, spec.d, q.device)
    row["main_ms"] = _bench(lambda: mod.nsa_selection_fwd_kernel[(T, spec.H)](
        q, *kv, idx, o, lse, q, T, IS_VARLEN=False, **launch_options(cfg)))
    for warps in (2, 4, 8):
        for stages in (1, 2, 3):
            def forced():
                mod.nsa_selection_fwd_forced_kernel[(tiles.shape[0], spec.H)](
                    q, *kv, o, lse, tiles, num_warps=warps, num_stages=stages)
            try:
                row[f"forced_ms_{warps}_{stages}"] = _bench(forced)
            except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
                row[f"forced_error_{warps}_{stages}"] = f"{type(e).__name__}"
    torch.cuda.synchronize()
    return row


if __name__ == "__main__":
    sys.exit(probe_main("forced_probe", "SPEC[:P=V,...]", probe))
