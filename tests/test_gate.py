"""gate_fwd (the gated sum of the branch outputs) against naive_gate, GateFunction's
gradients against autograd, and nsa() with some gates off.

Outputs are NaN-poisoned before each run (an explicit `out` and the `poison` fixture), so an
element the kernel never writes fails.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import DEVICE, DTYPES, TOL, rel_err, shrink
from nsa_gen import naive
from nsa_gen.config import Config
from nsa_gen.kernels import KERNELS, kernel_def
from nsa_gen.ops import gate
from nsa_gen.ops.gate import GateFunction, gate_fwd
from nsa_gen.spec import builtin_specs, load_spec


def subsets(branches):
    """Every non-empty subset of `branches`: 1, 2 and 3 branches."""
    return [c for n in range(1, len(branches) + 1) for c in itertools.combinations(branches, n)]


def rand_branches(spec, names, B: int, T: int, dtype, seed: int):
    """Outputs (normals) and gates (in (0, 1), as a sigmoid gives) of `names`."""
    g = torch.Generator().manual_seed(seed)
    outs = {b: torch.randn(B, T, spec.HQ, spec.DV, generator=g).to(DEVICE, dtype) for b in names}
    gates = {b: torch.rand(B, T, spec.HQ, generator=g).to(DEVICE, dtype) for b in names}
    return outs, gates


def poisoned(spec, B: int, T: int, dtype):
    return torch.full((B, T, spec.HQ, spec.DV), float("nan"), device=DEVICE, dtype=dtype)


def check(o, outs, gates, dtype):
    assert o.dtype == dtype
    assert not o.isnan().any(), "unwritten (NaN-poisoned) elements"
    ref = naive.naive_gate({b: x.float() for b, x in outs.items()},
                           {b: x.float() for b, x in gates.items()})
    assert rel_err(o, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", builtin_specs())
def test_gate_fwd_builtin_specs(name, dtype, poison):
    """Every subset of each built-in spec's branches, one rendered module for all of them."""
    spec = load_spec(name)
    B, T = 2, 19
    for i, names in enumerate(subsets(spec.branches)):
        outs, gates = rand_branches(spec, names, B, T, dtype, seed=i)
        out = poisoned(spec, B, T, dtype)
        o = gate_fwd(outs, gates, spec, out=out)
        assert o is out
        check(o, outs, gates, dtype)
        check(gate_fwd(outs, gates, spec), outs, gates, dtype)  # its own (poisoned) buffer


def test_every_builtin_spec_has_two_or_three_branches():
    """The subsets above cover 1, 2 and 3 branches."""
    assert {len(load_spec(n).branches) for n in builtin_specs()} == {2, 3}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gate_fwd_every_config_tail_rows(dtype, poison):
    """Every config of the space on B * T * HQ rows that no tile size divides (tail rows
    masked), and a head dim that is no power of two (DV = 48: pieces of 32 and 16)."""
    spec = shrink("small-group", heads={"q": 6, "kv": 2}, head_dim={"k": 32, "v": 48})
    B, T = 2, 37  # 444 rows
    kd = kernel_def("gate_fwd")
    space = kd.space(spec)
    outs, gates = rand_branches(spec, spec.branches, B, T, dtype, seed=3)
    for rows, warps in itertools.product(space["BLOCK_R"], space["num_warps"]):
        cfg = Config.make(BLOCK_R=rows, num_warps=warps, num_stages=1)
        assert kd.valid(spec, cfg)
        assert (B * T * spec.HQ) % rows
        check(gate_fwd(outs, gates, spec, cfg, out=poisoned(spec, B, T, dtype)), outs, gates, dtype)


def test_gate_fwd_empty_and_strided_gates(poison):
    spec = shrink("mqa", heads={"q": 4, "kv": 4}, head_dim={"k": 32, "v": 32})
    outs, gates = rand_branches(spec, ("cmp",), 1, 0, torch.float32, seed=0)
    assert gate_fwd(outs, gates, spec).shape == (1, 0, 4, 32)
    # Gates as views of one fused projection (as NativeSparseAttention makes them).
    outs, _ = rand_branches(spec, spec.branches, 2, 9, torch.float32, seed=1)
    fused = torch.rand(2, 9, 3, spec.HQ)
    gates = dict(zip(spec.branches, fused.unbind(2)))
    assert not gates["slc"].is_contiguous()
    check(gate_fwd(outs, gates, spec), outs, gates, torch.float32)


def test_harness_case_poisons_each_new_config(monkeypatch):
    """The verify / tuner case: fresh inputs, a NaN-poisoned buffer for each new config, so a
    config that writes nothing fails even after another filled the buffer correctly."""
    from nsa_gen.harness import make_case
    spec = shrink("deepseek-nsa", heads={"q": 4, "kv": 1}, head_dim={"k": 32, "v": 32})
    case = make_case("gate_fwd", spec, 21, B=2, dtype=torch.float32, seed=1)
    assert set(case.inputs) == {f"{p}_{b}" for p in ("o", "g") for b in spec.branches}
    assert all((x != 0).all() for x in case.inputs.values())
    default = kernel_def("gate_fwd").default(spec, 21)
    assert case.rel_error(case.run()) < 1e-6  # the default config
    monkeypatch.setattr(gate, "gate_fwd", lambda outs, gates, spec, config, out: out)  # no-op
    # A repeat of the same config (the tuner's timed runs) is not re-filled: the buffer
    # still holds the first run's result...
    assert case.rel_error(case.run(default)) < 1e-6
    # ...a new config is: writing nothing fails.
    assert case.rel_error(case.run(default.replace(BLOCK_R=16))) == float("inf")


def leaves_of(outs, gates, names, dtype=torch.float32):
    return [t.detach().to(dtype).requires_grad_(True) for b in names for t in (outs[b], gates[b])]


@pytest.mark.parametrize("names", subsets(("cmp", "slc", "swa")), ids="+".join)
def test_gate_gradients_match_autograd_of_reference(names, poison):
    spec = shrink("small-group", heads={"q": 4, "kv": 2}, head_dim={"k": 32, "v": 48})
    B, T = 2, 13
    outs, gates = rand_branches(spec, names, B, T, torch.float32, seed=len(names))
    do = torch.randn(B, T, spec.HQ, spec.DV, generator=torch.Generator().manual_seed(5))
    cfg = kernel_def("gate_fwd").default(spec, T)
    mine = leaves_of(outs, gates, names)
    o = GateFunction.apply(spec, cfg, names, *mine)
    got = torch.autograd.grad(o, mine, do)
    ref_leaves = leaves_of(outs, gates, names)
    o_ref = naive.naive_gate(dict(zip(names, ref_leaves[0::2])), dict(zip(names, ref_leaves[1::2])))
    want = torch.autograd.grad(o_ref, ref_leaves, do)
    assert rel_err(o.detach(), o_ref.detach()) < 1e-6
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert rel_err(a, b) < 1e-6, f"{'og'[i % 2]}_{names[i // 2]}"


def test_gate_gradients_16bit_match_the_old_pytorch_sum(poison):
    """fp16: gradients within fp16 tolerance of what nsa() produced before (autograd of
    g[..., None] * o_br summed with addcmul_), in the inputs' dtype."""
    spec = shrink("small-group", heads={"q": 4, "kv": 2}, head_dim={"k": 32, "v": 32})
    names = ("cmp", "slc", "swa")
    outs, gates = rand_branches(spec, names, 1, 17, torch.float16, seed=2)
    do = torch.randn(1, 17, spec.HQ, spec.DV, generator=torch.Generator().manual_seed(6)).half()
    mine = leaves_of(outs, gates, names, torch.float16)
    got = torch.autograd.grad(GateFunction.apply(spec, None, names, *mine), mine, do)
    old = leaves_of(outs, gates, names, torch.float16)
    o = old[1].unsqueeze(-1) * old[0]
    for i in (2, 4):
        o = o.addcmul_(old[i + 1].unsqueeze(-1), old[i])
    want = torch.autograd.grad(o, old, do)
    for a, b in zip(got, want):
        assert a.dtype == torch.float16
        assert rel_err(a, b) < TOL[torch.float16]
    # dL/do_br = g_br * do is formed exactly as autograd forms it: bit for bit.
    assert all(torch.equal(got[i], want[i]) for i in (0, 2, 4))


def test_gate_only_needed_gradients(poison, monkeypatch):
    spec = shrink("small-group", heads={"q": 4, "kv": 2}, head_dim={"k": 32, "v": 32})
    names = ("cmp", "swa")
    outs, gates = rand_branches(spec, names, 1, 8, torch.float32, seed=4)
    calls = []
    real = gate._row_dots
    monkeypatch.setattr(gate, "_row_dots", lambda do, x: calls.append(1) or real(do, x))
    leaves = [outs["cmp"].requires_grad_(True), gates["cmp"], outs["swa"],
              gates["swa"].requires_grad_(True)]
    o = GateFunction.apply(spec, None, names, *leaves)
    d_o_cmp, d_g_swa = torch.autograd.grad(o.sum(), [leaves[0], leaves[3]])
    assert len(calls) == 1  # the gate of swa only
    assert torch.equal(d_o_cmp, gates["cmp"].unsqueeze(-1).expand_as(d_o_cmp))
    assert torch.allclose(d_g_swa, outs["swa"].sum(-1))


def test_row_dots_chunks(monkeypatch):
    monkeypatch.setattr(gate, "_DOT_CHUNK_ELEMS", 40)  # 2 rows of 16 a chunk; 3 rows left over
    do, x = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    assert torch.allclose(gate._row_dots(do, x), (do * x).sum(-1), atol=1e-6)


def test_gate_fwd_errors():
    spec = shrink("fla-compat", heads={"q": 4, "kv": 1}, head_dim={"k": 32, "v": 32})
    outs, gates = rand_branches(spec, ("cmp", "slc"), 1, 5, torch.float32, seed=0)
    with pytest.raises(ValueError, match="no gate"):
        gate_fwd(outs, {"cmp": gates["cmp"]}, spec)
    with pytest.raises(ValueError, match="no output"):
        gate_fwd({"cmp": outs["cmp"]}, gates, spec)
    with pytest.raises(ValueError, match="not one of the spec's"):
        gate_fwd({**outs, "swa": outs["cmp"]}, {**gates, "swa": gates["cmp"]}, spec)
    with pytest.raises(ValueError, match="nothing to gate"):
        gate_fwd({}, {}, spec)
    with pytest.raises(ValueError, match=r"outs\['slc'\] has shape"):
        gate_fwd({**outs, "slc": outs["slc"][:, :3]}, gates, spec)
    with pytest.raises(ValueError, match=r"gates\['cmp'\] has shape"):
        gate_fwd(outs, {**gates, "cmp": gates["cmp"][..., None]}, spec)
    with pytest.raises(ValueError, match=r"outs\['cmp'\] has shape"):
        gate_fwd({**outs, "cmp": outs["cmp"][..., :16]}, gates, spec)  # DV of the spec
    with pytest.raises(TypeError, match=r"gates\['slc'\] has dtype"):
        gate_fwd(outs, {**gates, "slc": gates["slc"].half()}, spec)
    with pytest.raises(TypeError, match=r"outs\['slc'\] has dtype"):
        gate_fwd({**outs, "slc": outs["slc"].half()}, gates, spec)
    with pytest.raises(TypeError, match="out has dtype"):
        gate_fwd(outs, gates, spec, out=torch.empty(1, 5, 4, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        gate_fwd(outs, gates, spec, out=torch.empty(1, 5, 32, 4).transpose(2, 3))
    with pytest.raises(ValueError, match="same branches"):
        naive.naive_gate(outs, {"cmp": gates["cmp"]})


def test_registry_and_dispatch_fallback():
    """Registered like every kernel. Dispatch gives the shipped DB's entry where one exists
    (H200, 64k: deepseek-nsa, fla-compat, small-group) and the heuristic default elsewhere:
    mqa, another device."""
    from nsa_gen.db.dispatch import Dispatcher
    from nsa_gen.db.store import DeviceKey
    kd = KERNELS["gate_fwd"]
    assert kd.kernel_name == "nsa_gate_fwd_kernel" and kd.template == "gate_fwd.py.j2"
    h200 = DeviceKey("sm90", 132, 140, "NVIDIA H200", 232448)
    a10 = DeviceKey("sm86", 72, 22, "NVIDIA A10", 101376)
    for name in builtin_specs():
        spec = load_spec(name)
        assert kd.applies(spec)
        assert Dispatcher(device=a10).get("gate_fwd", spec, 65536) == kd.default(spec, 65536)
        tuned = Dispatcher(device=h200).get("gate_fwd", spec, 65536)
        assert kd.valid(spec, tuned)
        if name == "mqa":
            assert tuned == kd.default(spec, 65536)
    assert Dispatcher(device=h200).get("gate_fwd", load_spec("deepseek-nsa"), 65536) \
        == Config.make(BLOCK_R=16, num_warps=8, num_stages=1)  # the H200 study's winner
    # DV = 128, 16-bit: 64 rows (16 KB of each input a program), 4 warps.
    assert kd.default(load_spec("deepseek-nsa"), 65536) == Config.make(BLOCK_R=64, num_warps=4,
                                                                         num_stages=1)


def test_context_follows_the_spec_branches():
    from nsa_gen.kernels import kernel_source
    spec = load_spec("fla-compat")
    src = kernel_source("gate_fwd", spec)
    assert "o_cmp, g_cmp, o_slc, g_slc, o, n_rows" in src and "swa" not in src
    assert "HAS_CMP: tl.constexpr, HAS_SLC: tl.constexpr)" in src
    assert kernel_source("gate_fwd", load_spec("deepseek-nsa")) != src


# ------------------------------------------------------------------------- nsa() with the kernel

NSA_SPEC = shrink("small-group", heads={"q": 4, "kv": 2}, head_dim={"k": 32, "v": 16},
                  compression={"block": 16, "stride": 8},
                  selection={"block": 16, "top_n": 3, "initial_blocks": 1, "local_blocks": 1},
                  window=16)


@pytest.mark.parametrize("on", [("slc",), ("cmp", "swa")], ids="+".join)
def test_nsa_with_some_gates(on, poison):
    """nsa() with only some gates given (one module, launched with those branches' flags):
    output and gradients against autograd through naive_nsa; aux still holds the branches."""
    from nsa_gen.api import nsa
    spec = NSA_SPEC
    g = torch.Generator().manual_seed(11)
    B, T = 1, 40
    q = torch.randn(B, T, spec.HQ, spec.DK, generator=g).requires_grad_(True)
    k = torch.randn(B, T, spec.H, spec.DK, generator=g).requires_grad_(True)
    v = torch.randn(B, T, spec.H, spec.DV, generator=g).requires_grad_(True)
    gates = [torch.rand(B, T, spec.HQ, generator=g).requires_grad_(True) if b in on else None
             for b in ("cmp", "slc", "swa")]
    do = torch.randn(B, T, spec.HQ, spec.DV, generator=g)
    leaves = [q, k, v] + [x for x in gates if x is not None]
    o, aux = nsa(q, k, v, *gates, spec=spec, return_aux=True)
    assert {f"o_{b}" for b in on} <= set(aux)
    got = torch.autograd.grad(o, leaves, do)
    o_ref = naive.naive_nsa(spec, q, k, v, *gates)
    want = torch.autograd.grad(o_ref, leaves, do)
    assert rel_err(o.detach(), o_ref.detach()) < 1e-4
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-4
