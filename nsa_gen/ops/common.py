"""Checks and helpers shared by every launcher."""
from __future__ import annotations

import torch

from ..spec import NSASpec

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_tensor(name: str, x: torch.Tensor, shape: tuple, *, dtypes=FLOAT_DTYPES,
                 like: torch.Tensor | None = None) -> None:
    """`shape` entries are ints or None (any). `like` fixes device and dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != len(shape) or any(s is not None and s != xs for s, xs in zip(shape, x.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} has shape {list(x.shape)}, expected {want}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {x.dtype}, expected one of {', '.join(map(str, dtypes))}")
    if like is not None:
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device}, expected {like.device} (same as q)")
        if x.dtype in FLOAT_DTYPES and like.dtype in FLOAT_DTYPES and x.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {x.dtype}, expected {like.dtype} (same as q)")


def check_qkv(spec: NSASpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              kv_len: bool = True) -> tuple[int, int]:
    """q [B, T, HQ, DK], k [B, T, H, DK], v [B, T, H, DV] -> (B, T). With kv_len=False,
    k and v may have their own length (compressed keys)."""
    check_tensor("q", q, (None, None, spec.HQ, spec.DK))
    B, T = q.shape[:2]
    tk = T if kv_len else None
    check_tensor("k", k, (B, tk, spec.H, spec.DK), like=q)
    check_tensor("v", v, (B, k.shape[1], spec.H, spec.DV), like=q)
    return B, T


def seq_start(cu_seqlens: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor | None:
    """For packed batches: int32 [T], the row of the first token of each token's sequence."""
    if cu_seqlens is None:
        return None
    check(B == 1, f"cu_seqlens needs B == 1 (packed sequences), got B = {B}")
    check_tensor("cu_seqlens", cu_seqlens, (None,), dtypes=(torch.int32, torch.int64))
    check(cu_seqlens.device == torch.device(device) or cu_seqlens.device.type == torch.device(device).type,
          f"cu_seqlens is on {cu_seqlens.device}, expected {device}")
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    check(cu.numel() >= 2 and int(cu[0]) == 0 and int(cu[-1]) == T,
          f"cu_seqlens must start at 0 and end at T = {T}")
    lens = cu[1:] - cu[:-1]
    check(bool((lens >= 0).all()), "cu_seqlens must be non-decreasing")
    return torch.repeat_interleave(cu[:-1], lens).to(torch.int32)


def launch_options(config) -> dict:
    return {"num_warps": config.num_warps, "num_stages": config.num_stages}
