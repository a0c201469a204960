"""The gated sum of the branch outputs (NSA's output combination): launcher and autograd."""
from __future__ import annotations

import torch

from ..config import Config
from ..kernels import gate_branches, kernel_def, kernel_fn
from ..spec import NSASpec
from .common import check, check_tensor, launch_options

# Values per chunk of the backward's fp32 row dot products: its fp32 temporaries stay at
# 64 MiB each, where unchunked each would be a whole branch output in fp32 (2.1 GB at
# T = 64k, HQ = 64, DV = 128).
_DOT_CHUNK_ELEMS = 1 << 24


def check_branches(outs: dict, gates: dict, spec: NSASpec) -> tuple[str, ...]:
    """The branches in `outs`, in canonical order; each needs a gate, and only the spec's."""
    check(isinstance(outs, dict) and isinstance(gates, dict),
          "outs and gates must be dicts keyed by branch name (cmp, slc, swa)")
    check(len(outs) > 0, "no branch output given: nothing to gate")
    known = gate_branches(spec)
    for name in (*outs, *gates):
        check(name in known, f"branch '{name}' is not one of the spec's ({', '.join(known)})")
    for name in outs:
        check(name in gates, f"branch '{name}' has an output but no gate (gates['{name}'] missing)")
    for name in gates:
        check(name in outs, f"branch '{name}' has a gate but no output (outs['{name}'] missing)")
    return tuple(b for b in known if b in outs)


def gate_fwd(outs: dict[str, torch.Tensor], gates: dict[str, torch.Tensor], spec: NSASpec,
             config: Config | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """o = sum over the branches br of outs of gates[br][..., None] * outs[br], accumulated in
    fp32, in one pass over memory.

    outs: branch name (cmp, slc, swa; any non-empty subset of the spec's branches) ->
    o_br [B, T, HQ, DV]; gates: the same names -> g_br [B, T, HQ]. All on one device, of one
    float dtype (nsa() passes q's). config: defaults to the kernel's heuristic. out: optional
    contiguous [B, T, HQ, DV] of that dtype to write into. Returns o [B, T, HQ, DV] in the
    outputs' dtype.
    """
    names = check_branches(outs, gates, spec)
    first = outs[names[0]]
    check_tensor(f"outs['{names[0]}']", first, (None, None, spec.HQ, spec.DV))
    B, T = first.shape[:2]
    for name in names:
        check_tensor(f"outs['{name}']", outs[name], (B, T, spec.HQ, spec.DV), like=first)
        check_tensor(f"gates['{name}']", gates[name], (B, T, spec.HQ), like=first)
    if out is None:
        o = torch.empty(first.shape, device=first.device, dtype=first.dtype)
    else:
        check_tensor("out", out, (B, T, spec.HQ, spec.DV), like=first)
        check(out.is_contiguous(), "out must be contiguous")
        o = out
    n_rows = B * T * spec.HQ
    if n_rows == 0:
        return o
    config = config or kernel_def("gate_fwd").default(spec, T)
    # A gate is 1/DV of its branch's bytes: copying a strided one (e.g. a view of one fused
    # gate projection) costs little next to the pass over the outputs.
    args = []
    for name in gate_branches(spec):
        # An absent branch is never read (its HAS_ flag is 0): o stands in for its pointers.
        args += ([outs[name].contiguous(), gates[name].contiguous()] if name in names else [o, o])
    flags = {f"HAS_{name.upper()}": int(name in names) for name in gate_branches(spec)}
    fn = kernel_fn("gate_fwd", spec, config)
    fn[(-(-n_rows // config["BLOCK_R"]),)](*args, o, n_rows, **flags, **launch_options(config))
    return o


def _row_dots(do: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum(do * x, -1) as fp32 [...], the products formed in fp32, a chunk of rows at a time."""
    D = do.shape[-1]
    out = torch.empty(do.shape[:-1], device=do.device, dtype=torch.float32)
    do2, x2, out1 = do.reshape(-1, D), x.reshape(-1, D), out.view(-1)
    step = max(1, _DOT_CHUNK_ELEMS // max(1, D))
    for i in range(0, out1.numel(), step):
        torch.sum(do2[i:i + step].float() * x2[i:i + step].float(), -1, out=out1[i:i + step])
    return out


class GateFunction(torch.autograd.Function):
    """The gated sum, differentiable in every branch output and gate.

    apply(spec, config, names, *tensors): names, a tuple of branch names, and tensors, the
    pairs (o_br, g_br) in that order. Backward in PyTorch (elementwise, no kernel):
    d o_br = g_br[..., None] * do, in do's dtype, as autograd of g.unsqueeze(-1) * o_br gives;
    d g_br = sum over DV of do * o_br with fp32 products and sum (autograd of the product
    rounds each product to the inputs' dtype first), cast to g's dtype.
    """

    @staticmethod
    def forward(ctx, spec, config, names, *tensors):
        outs = dict(zip(names, tensors[0::2]))
        gates = dict(zip(names, tensors[1::2]))
        o = gate_fwd(outs, gates, spec, config)
        ctx.names = names
        ctx.save_for_backward(*tensors)
        return o

    @staticmethod
    def backward(ctx, do):
        tensors = ctx.saved_tensors
        need = ctx.needs_input_grad[3:]
        grads: list[torch.Tensor | None] = [None] * len(tensors)
        for i in range(len(ctx.names)):
            x, g = tensors[2 * i], tensors[2 * i + 1]
            if need[2 * i]:
                grads[2 * i] = do * g.unsqueeze(-1)
            if need[2 * i + 1]:
                grads[2 * i + 1] = _row_dots(do, x).to(g.dtype)
        return (None, None, None, *grads)
