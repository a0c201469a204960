"""Autotuning on the CPU: search space and static pruning, the Optuna tuner with an
injected fake runner/timer (minimum found, failures recorded, seeding, resume), rounds of
prewarmed configs with a fake prewarm, the trial executor and its worker process (crash,
hang), and the `tune` subcommand's CPU guard."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time

import optuna
import pytest

from nsa_gen.config import Config, parse_assignments
from nsa_gen.db import CPU_DEVICE, DeviceKey, Entry, TuneKey, TuningDB
from nsa_gen.kernels import KERNELS, kernel_def
from nsa_gen.spec import load_spec
from nsa_gen.tuning import commands, space, tuner as tuner_mod
from nsa_gen.tuning.space import pruned_space, register_estimate, search_space
from nsa_gen.tuning.trial import (COMPILE_ERROR, CRASH, FELL_BACK, OK, SETUP_FAILED, TIMEOUT, WRONG, TrialExecutor,
                                  TrialRequest, TrialResult, WorkerRunner, bench_counts,
                                  bench_timer, classify)
from nsa_gen.tuning.tuner import Tuner, study_name

H200 = DeviceKey("sm90", 132, 140, "NVIDIA H200")
A10 = DeviceKey("sm86", 72, 22, "NVIDIA A10")
STEM = "selection_fwd"
FULL_KD = kernel_def(STEM)
# The fake cost below is over tiles, warps and stages: these tests tune selection_fwd's
# group-centric kernel alone (BLOCK_Q = 0, pointer loads), a space of 36 configs, from a
# default pinned to 4 warps (the tests place neighbours' winners around it).
KD = dataclasses.replace(FULL_KD, space=lambda s: dict(FULL_KD.space(s), BLOCK_Q=[0], TMA=[0], SHARE=[1], FORCED=[0]),
                         default=lambda s, T: FULL_KD.default(s, T).replace(BLOCK_Q=0, TMA=0, SHARE=1, FORCED=0,
                                                                            num_warps=4))


@pytest.fixture(autouse=True)
def _group_centric_selection(monkeypatch):
    monkeypatch.setitem(KERNELS, STEM, KD)


@pytest.fixture(scope="module")
def spec():
    return load_spec("deepseek-nsa")


def cfg(block_n=64, warps=4, stages=2):
    return Config.make(BLOCK_N=block_n, BLOCK_Q=0, TMA=0, SHARE=1, FORCED=0, num_warps=warps, num_stages=stages)


# ----------------------------------------------------------------------------- space

def test_search_space_is_the_kernels(spec):
    sp = search_space(STEM, spec)
    assert dict(sp.params) == {k: tuple(v) for k, v in KD.space(spec).items()}
    assert sp.names == sorted(sp.names)
    configs = sp.configs()
    assert len(configs) == len(set(configs)) == sp.size == 3 * 3 * 4  # BS=64: BLOCK_N 16..64
    assert all(KD.valid(spec, c) for c in configs)
    assert KD.default(spec, 4096) in configs


def test_static_pruning(spec, monkeypatch):
    keep, dropped = pruned_space(STEM, spec, A10)
    assert keep and dropped and len(keep) + len(dropped) == 36
    assert all(KD.smem_bytes(spec, c) <= A10.smem_limit for c in keep)
    assert all("shared memory" in why and KD.smem_bytes(spec, c) > A10.smem_limit
               for c, why in dropped.items())
    assert pruned_space(STEM, spec, H200)[1] == {}
    assert pruned_space(STEM, spec, CPU_DEVICE)[1] == {}
    # Registers: the estimate falls with more warps; a heavy model prunes the few-warp configs.
    assert register_estimate(STEM, spec, cfg(64, 2)) > register_estimate(STEM, spec, cfg(64, 8))
    assert register_estimate("no_such_kernel", spec, cfg()) is None
    monkeypatch.setitem(space.REGISTER_MODELS, STEM, lambda s, c: 128 * 250.0)
    keep, dropped = pruned_space(STEM, spec, H200)
    assert {c.num_warps for c in keep} == {8}
    assert all("registers" in why for why in dropped.values())
    assert pruned_space(STEM, spec, CPU_DEVICE)[1] == {}  # the interpreter has no register file


# ----------------------------------------------------------------------------- tuner with fakes

def cost(c: Config) -> float:
    """A known cost with its unique minimum at BLOCK_N=32, 8 warps, 3 stages."""
    return 1.0 + abs(c["BLOCK_N"] - 32) / 16 + abs(c.num_warps - 8) / 4 + abs(c.num_stages - 3) * 0.3


class FakeRunner:
    """Measures `cost` through an injected fake timer; configs in `fail` fail as given, and
    so does the n-th call (from 1) for n in `fail_call`. Appends ("run", config) to `events`."""

    def __init__(self, fail=None, interrupt_at=None, fail_call=None, events=None):
        self.calls: list[Config] = []
        self.fail = fail or {}
        self.fail_call = fail_call or {}
        self.interrupt_at = interrupt_at
        self.events = events if events is not None else []

    def __call__(self, req: TrialRequest) -> TrialResult:
        self.calls.append(req.config)
        self.events.append(("run", req.config))
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        what = self.fail_call.get(len(self.calls)) or self.fail.get(req.config)
        if what == "raise":
            raise RuntimeError("runner blew up")
        if what:
            return TrialResult(what, message=f"fake {what}")
        ex = TrialExecutor(timer=lambda fn: fn(), make_case=make_cost_case)
        return ex(req)


class CostCase:
    tolerance = 1e-3

    def run(self, config):
        return cost(config)

    def rel_error(self, outputs):
        return 0.0


def make_cost_case(stem, spec, T, *, B, dtype, device, seed):
    return CostCase()


def make_tuner(spec, tmp_path, runner, device=H200, storage="memory", **kw):
    kw.setdefault("progress", False)
    return Tuner(spec, db=TuningDB(tmp_path / "db"), device=device, runner=runner,
                 storage=storage, torch_device="cpu", **kw)


def test_tuner_finds_minimum_of_fake_cost(spec, tmp_path):
    runner = FakeRunner()
    r = make_tuner(spec, tmp_path, runner).tune(STEM, 4096, n_trials=20)
    best = min(search_space(STEM, spec).configs(), key=cost)
    assert best == cfg(32, 8, 3)
    assert r.entry.config == best and r.entry.ms == pytest.approx(1.0)
    assert r.measured == r.entry.trials == 20 == len(runner.calls) == len(set(runner.calls))
    assert r.entry.margin == pytest.approx(0.3)  # runner-up: stages 2 or 4
    assert r.entry.date == Entry.today()
    # The winner is in the DB under the device/kernel/spec/shape key.
    key = TuneKey.make(H200, STEM, spec, 4096)
    assert TuningDB(tmp_path / "db").get(key) == r.entry


def test_tuner_exhausts_a_small_space_and_never_compiles_pruned(spec, tmp_path):
    runner = FakeRunner()
    keep, dropped = pruned_space(STEM, spec, A10)
    r = make_tuner(spec, tmp_path, runner, device=A10).tune(STEM, 1024, n_trials=100)
    assert set(runner.calls) == set(keep) and len(runner.calls) == len(keep)
    assert not set(runner.calls) & set(dropped)
    assert r.entry.config == min(keep, key=cost)


def test_failed_trials_are_recorded_and_the_study_goes_on(spec, tmp_path):
    url = optuna.storages.InMemoryStorage()
    fail = {cfg(32, 8, 3): "raise", cfg(32, 8, 2): CRASH, cfg(32, 4, 3): COMPILE_ERROR,
            cfg(16, 8, 3): TIMEOUT, cfg(64, 8, 3): "out_of_resources"}
    runner = FakeRunner(fail=fail)
    r = make_tuner(spec, tmp_path, runner, storage=url).tune(STEM, 4096, n_trials=36)
    assert set(runner.calls) == set(search_space(STEM, spec).configs())
    assert r.failed == len(fail) and r.measured == 36
    assert r.entry.config == cfg(32, 8, 4) and r.entry.ms == pytest.approx(1.3)
    assert {c for c, _, _ in r.failures} == set(fail)
    study = optuna.load_study(study_name=r.study_name, storage=url)
    failed = {Config.from_dict(t.params): t.user_attrs["status"]
              for t in study.trials if t.state == optuna.trial.TrialState.FAIL
              and t.user_attrs["status"] != "repeat"}
    assert failed == {c: ("error" if v == "raise" else v) for c, v in fail.items()}
    assert all(t.user_attrs.get("message") for t in study.trials
               if t.state.name == "FAIL" and t.user_attrs["status"] != "repeat")


def test_setup_failure_stops_the_shape_and_is_retried(spec, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    broken = FakeRunner(fail={c: SETUP_FAILED for c in search_space(STEM, spec).configs()})
    r = make_tuner(spec, tmp_path, broken, storage=url).tune(STEM, 4096, n_trials=10)
    assert len(broken.calls) == 1 and r.entry is None and r.failures[0][1] == SETUP_FAILED
    fixed = FakeRunner()
    r = make_tuner(spec, tmp_path, fixed, storage=url).tune(STEM, 4096, n_trials=10)
    assert fixed.calls[0] == broken.calls[0] and r.measured == 10 and r.failed == 0


def test_no_working_config_writes_nothing(spec, tmp_path, caplog):
    runner = FakeRunner(fail={c: WRONG for c in search_space(STEM, spec).configs()})
    with caplog.at_level(logging.WARNING, logger="nsa_gen"):
        r = make_tuner(spec, tmp_path, runner).tune(STEM, 4096, n_trials=5)
    assert r.entry is None and r.failed == 5
    assert TuningDB(tmp_path / "db").load() == {}
    assert "no config" in caplog.text


def test_seeded_with_default_and_neighbour_winners(spec, tmp_path):
    db = TuningDB(tmp_path / "db")
    near, far = cfg(16, 2, 1), cfg(16, 8, 4)
    for T, c in ((2048, near), (1 << 20, far), (8192, cfg(64, 4, 2))):
        db.put(TuneKey.make(H200, STEM, spec, T), Entry(c, 1.0, None, 1, "2026-01-01"))
    runner = FakeRunner()
    make_tuner(spec, tmp_path, runner, neighbours=2).tune(STEM, 4096, n_trials=6)
    default = KD.default(spec, 4096)
    assert default == cfg(64, 4, 2)  # also the 8192 winner: tried once
    assert runner.calls[:3] == [default, near, far]  # the 8192 winner is the default


def test_existing_entry_of_the_shape_is_seeded(spec, tmp_path):
    # A retune must measure the entry it may replace: otherwise a short study that misses
    # it overwrites a faster config with a slower one.
    db = TuningDB(tmp_path / "db")
    shipped = min(search_space(STEM, spec).configs(), key=cost)
    assert shipped != KD.default(spec, 4096)
    db.put(TuneKey.make(H200, STEM, spec, 4096), Entry(shipped, 1.0, None, 1, "2026-01-01"))
    runner = FakeRunner()
    r = make_tuner(spec, tmp_path, runner).tune(STEM, 4096, n_trials=3)
    assert runner.calls[:2] == [KD.default(spec, 4096), shipped]
    assert r.entry.config == shipped


@pytest.mark.parametrize("slower,kept", [(1.005, True), (1.02, False)])
def test_entry_is_replaced_only_beyond_the_noise_margin(spec, tmp_path, slower, kept):
    """A study keeps the shape's entry unless a config beats it by more than REPLACE_MARGIN
    (1%) in the same study; the runner-up margin is then the best one's, relative."""
    from nsa_gen.tuning import tuner as tuner_mod
    best = min(search_space(STEM, spec).configs(), key=cost)
    held = cfg(32, 8, 2)  # cost 1.3
    db = TuningDB(tmp_path / "db")
    key = TuneKey.make(H200, STEM, spec, 4096)
    db.put(key, Entry(held, 1.0, None, 1, "2026-01-01"))

    orig = globals()["cost"]

    def scaled(c):  # the entry `slower` times the best's cost, the rest as cost() has them
        return slower if c == held else orig(c)
    runner = FakeRunner()
    globals()["cost"] = scaled
    try:
        r = make_tuner(spec, tmp_path, runner).tune(STEM, 4096, n_trials=12)
    finally:
        globals()["cost"] = orig
    assert best in runner.calls and held in runner.calls and r.failed == 0
    assert tuner_mod.REPLACE_MARGIN == 0.01
    if kept:
        assert r.entry.config == held and r.entry.ms == pytest.approx(slower)
        assert r.entry.margin == pytest.approx(1.0 / slower - 1)  # the best, 0.5% below
    else:
        assert r.entry.config == best and r.entry.ms == pytest.approx(1.0)
    assert db.get(key) == r.entry


def test_structural_variants_of_the_default_are_seeded(spec, tmp_path, monkeypatch):
    # Each other value of a structural param, on the default's tiles, comes right after the
    # neighbours' winners: a 4-trial study at 128k had never tried the unsplit dk/dv pass.
    monkeypatch.setattr(tuner_mod, "shipped_db_dir", lambda: None)  # no neighbours
    t = make_tuner(spec, tmp_path, FakeRunner())
    stem = "compression_bwd"
    kd = kernel_def(stem)
    keep, _ = pruned_space(stem, spec, H200)
    default = kd.default(spec, 131072)
    seeds = t.seeds(stem, 131072, 1, keep)
    assert seeds[0] == default and kd.structural == ("DKV_SPLIT_T", "CUDNN")
    split_seeds = [c for c in seeds[1:] if c["CUDNN"] == 0]
    splits = [c["DKV_SPLIT_T"] for c in split_seeds]
    assert sorted(splits + [default["DKV_SPLIT_T"]]) == sorted(kd.space(spec)["DKV_SPLIT_T"])
    assert all(c.replace(DKV_SPLIT_T=default["DKV_SPLIT_T"]) == default for c in split_seeds)
    # The cuDNN variant once, in canonical form (its tile params unread).
    assert [c for c in seeds[1:] if c["CUDNN"]] == [kd.canonical(spec, default.replace(CUDNN=1))]
    topn = t.seeds("topn", 4096, 1, pruned_space("topn", spec, H200)[0])
    assert [(c["MERGE"], c["INSERT"], c["TMA"], c["KEY"], c["IMP"]) for c in topn] == [  # INSERT 4 at 4-token tiles
        ("hcube", 4, 0, 32, "dot"), ("sort", 4, 0, 32, "dot"), ("bitonic", 4, 0, 32, "dot"),
        ("rank", 4, 0, 32, "dot"),
        ("hcube", 0, 0, 32, "dot"), ("hcube", 2, 0, 32, "dot"), ("hcube", 8, 0, 32, "dot"),
        ("hcube", 4, 1, 32, "dot"), ("hcube", 4, 0, 64, "dot"), ("hcube", 4, 0, 32, "sum"),
        ("hcube", 4, 0, 32, "tsum"), ("hcube", 4, 0, 32, "mma")]
    assert t.seeds(STEM, 4096, 1, pruned_space(STEM, spec, H200)[0]) == [KD.default(spec, 4096)]
    KERNELS[STEM] = FULL_KD  # (the fixture restores the pinned one)
    keep = pruned_space(STEM, spec, H200)[0]
    slc = t.seeds(STEM, 4096, 1, keep)
    default = FULL_KD.default(spec, 4096)
    want = [q for q in FULL_KD.space(spec)["BLOCK_Q"] if default.replace(BLOCK_Q=q) in keep]
    assert [c["BLOCK_Q"] for c in slc[:len(want)]] == want and len(want) > 2
    variants = [default.replace(TMA=1 - default["TMA"]),  # each structural param
                default.replace(SHARE=2), default.replace(SHARE=4),
                default.replace(FORCED=64), default.replace(FORCED=128)]
    # (SHARE 4 on the default's 2 warps is past the register model: pruned, not seeded)
    assert slc[len(want):] == [c for c in variants if c in keep] and len(slc) > len(want) + 1


def test_structural_variants_of_the_entry_are_seeded(spec, tmp_path, monkeypatch):
    """The study of a shape with a DB entry also tries that entry's tiles with each other
    algorithm, after the default's variants."""
    monkeypatch.setattr(tuner_mod, "shipped_db_dir", lambda: None)
    t = make_tuner(spec, tmp_path, FakeRunner())
    kd = kernel_def("topn")
    keep = pruned_space("topn", spec, H200)[0]
    default = kd.default(spec, 65536)
    entry = default.replace(BLOCK_T=2 * default["BLOCK_T"], MERGE="rank")
    assert entry in keep
    t.db.put(TuneKey.make(H200, "topn", spec, 65536), Entry(entry, 1.0, 0.1, 8, "2026-11-29"))
    seeds = t.seeds("topn", 65536, 1, keep)
    n_default = 1 + len(kd.variants(spec, default))
    assert seeds[:2] == [default, entry]
    assert set(seeds[2:n_default + 1]) == set(kd.variants(spec, default))
    assert seeds[n_default + 1:] == [c for c in kd.variants(spec, entry) if c in keep]
    assert entry.replace(MERGE="bitonic") in seeds


def test_candidates_are_seeded_after_the_entry(spec, tmp_path, monkeypatch, capsys):
    """`--try P=V,...`: each candidate is the shape's entry with those params changed, seeded
    right after the entry (so even a short study measures it), canonical; a candidate
    naming a param the kernel does not have is skipped. The CLI parses the option."""
    monkeypatch.setattr(tuner_mod, "shipped_db_dir", lambda: None)
    kd = kernel_def("topn")
    keep = pruned_space("topn", spec, H200)[0]
    default = kd.default(spec, 65536)
    entry = default.replace(BLOCK_T=2 * default["BLOCK_T"], MERGE="rank")
    t = make_tuner(spec, tmp_path, FakeRunner(),
                   candidates=[{"IMP": "tsum", "BLOCK_T": default["BLOCK_T"]},
                               {"NO_SUCH": 1}, {"MERGE": "sort", "BLOCK_C": 128}])
    t.db.put(TuneKey.make(H200, "topn", spec, 65536), Entry(entry, 1.0, 0.1, 8, "2026-11-29"))
    seeds = t.seeds("topn", 65536, 1, keep)
    tried = entry.replace(IMP="tsum", BLOCK_T=default["BLOCK_T"])
    assert tried in keep and seeds[:3] == [default, entry, tried]
    assert all("NO_SUCH" not in dict(c.params) for c in seeds)
    # Without an entry, the candidates change the default.
    t2 = make_tuner(spec, tmp_path / "other", FakeRunner(), candidates=[{"MERGE": "sort"}])
    assert t2.seeds("topn", 65536, 1, keep)[:2] == [default, default.replace(MERGE="sort")]
    from nsa_gen.cli import main
    assert main(["tune", "fla-compat", "--try", "BLOCK_T"]) == 2
    assert "--try: 'BLOCK_T' is not NAME=VALUE" in capsys.readouterr().err


def test_gated_key_is_seeded_with_the_ungated_entry(tmp_path, monkeypatch):
    """selection_fwd_gated with no entry of its own runs selection_fwd's (dispatch's
    fallback): its study measures that entry right after the default, `--try` changes it,
    and the study keeps it unless a config beats it by the noise margin."""
    monkeypatch.setattr(tuner_mod, "shipped_db_dir", lambda: None)
    monkeypatch.setitem(KERNELS, STEM, FULL_KD)  # the ungated key's whole space
    gated, spec = "selection_fwd_gated", load_spec("fla-compat")
    kd = kernel_def(gated)
    keep = pruned_space(gated, spec, H200)[0]
    default = kd.default(spec, 65536)
    ungated = default.replace(BLOCK_N=32, FORCED=64, num_warps=4)
    assert ungated in keep and ungated != default
    t = make_tuner(spec, tmp_path, FakeRunner(), candidates=[{"BLOCK_N": 64}])
    t.db.put(TuneKey.make(H200, STEM, spec, 65536), Entry(ungated, 1.0, 0.1, 8, "2026-11-29"))
    seeds = t.seeds(gated, 65536, 1, keep)
    assert seeds[:3] == [default, ungated, ungated.replace(BLOCK_N=64)]
    key = TuneKey.make(H200, gated, spec, 65536)
    assert t._dispatched(key) == ungated
    assert t._incumbent(key, {ungated: 1.0, default: 0.995}) == ungated
    # Its own entry, once written, is what it holds.
    t.db.put(key, Entry(default, 1.0, 0.1, 8, "2026-11-29"))
    assert t._dispatched(key) == default


def test_resume_after_interruption(spec, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = FakeRunner(interrupt_at=6)
    with pytest.raises(KeyboardInterrupt):
        make_tuner(spec, tmp_path, first, storage=url).tune(STEM, 4096, n_trials=12)
    done, interrupted = first.calls[:5], first.calls[5]
    second = FakeRunner()
    r = make_tuner(spec, tmp_path, second, storage=url).tune(STEM, 4096, n_trials=12)
    assert not set(done) & set(second.calls)  # measured configs are not measured again
    assert second.calls[0] == interrupted  # the config cut short is tried again, first
    assert r.measured == 12 and len(second.calls) == 7
    # A third run finds the study complete and measures nothing.
    third = FakeRunner()
    assert make_tuner(spec, tmp_path, third, storage=url).tune(STEM, 4096, n_trials=12).measured == 12
    assert third.calls == []


def test_trials_left_running_by_a_killed_run_are_retried(spec, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    name = study_name(TuneKey.make(H200, STEM, spec, 4096), spec)
    study = optuna.create_study(study_name=name, storage=url)
    orphan = study.ask({n: optuna.distributions.CategoricalDistribution(list(c))
                        for n, c in search_space(STEM, spec).params})
    runner = FakeRunner()
    make_tuner(spec, tmp_path, runner, storage=url, stale_after_s=0).tune(STEM, 4096, n_trials=3)
    st = optuna.load_study(study_name=name, storage=url)
    assert st.trials[orphan.number].state == optuna.trial.TrialState.FAIL
    assert runner.calls[0] == Config.from_dict(orphan.params) and len(runner.calls) == 3


# ----------------------------------------------------------------------------- rounds and prewarm

class FakePrewarm:
    """Records each round it is asked to compile; appends ("warm", configs) to `events`."""

    def __init__(self, events=None, raise_=None):
        self.rounds: list[list[Config]] = []
        self.events = events if events is not None else []
        self.raise_ = raise_

    def __call__(self, reqs):
        cfgs = [r.config for r in reqs]
        self.rounds.append(cfgs)
        self.events.append(("warm", cfgs))
        if self.raise_ is not None:
            raise self.raise_
        return {c: None for c in cfgs}


def rounds_of(events):
    """The runs of `events` grouped by the prewarm round before them: [(warmed, run)]."""
    out = []
    for kind, x in events:
        if kind == "warm":
            out.append((x, []))
        else:
            assert out, "a config was measured before any round was prewarmed"
            out[-1][1].append(x)
    return out


def test_rounds_are_prewarmed_then_measured_in_order(spec, tmp_path):
    events = []
    runner, warm = FakeRunner(events=events), FakePrewarm(events)
    r = make_tuner(spec, tmp_path, runner, jobs=4, prewarm=warm).tune(STEM, 4096, n_trials=10)
    assert [len(x) for x in warm.rounds] == [4, 4, 2]
    assert r.measured == 10 == len(runner.calls) == len(set(runner.calls))
    # Each round's configs are all compiled before the first of them is measured, and
    # measured in the order asked.
    assert all(warmed == run for warmed, run in rounds_of(events))
    assert runner.calls[0] == KD.default(spec, 4096)  # the seed comes in the first round


def test_rounds_exhaust_a_small_space_once_each(spec, tmp_path):
    keep, _ = pruned_space(STEM, spec, A10)
    runner, warm = FakeRunner(), FakePrewarm()
    r = make_tuner(spec, tmp_path, runner, device=A10, jobs=5, prewarm=warm).tune(
        STEM, 1024, n_trials=100)
    assert sorted(runner.calls, key=str) == sorted(keep, key=str)  # each once, all of them
    sizes = [5] * (len(keep) // 5) + [len(keep) % 5]
    assert [len(x) for x in warm.rounds] == [n for n in sizes if n > 1]  # a round of 1: no prewarm
    assert r.entry.config == min(keep, key=cost)


def test_one_job_never_prewarms(spec, tmp_path):
    warm = FakePrewarm()
    make_tuner(spec, tmp_path, FakeRunner(), jobs=1, prewarm=warm).tune(STEM, 4096, n_trials=5)
    assert warm.rounds == []
    cpu = make_tuner(spec, tmp_path, FakeRunner())
    assert cpu.jobs == 1  # the CPU default
    from nsa_gen.tuning.prewarm import default_jobs
    gpu = Tuner(spec, db=TuningDB(tmp_path / "db"), device=H200, runner=FakeRunner(),
                storage="memory", torch_device="cuda", progress=False)
    assert gpu.jobs == default_jobs()
    with pytest.raises(ValueError):
        make_tuner(spec, tmp_path, FakeRunner(), jobs=0)


def test_failed_prewarm_does_not_stop_the_trials(spec, tmp_path, caplog):
    runner, warm = FakeRunner(), FakePrewarm(raise_=RuntimeError("pool broke"))
    with caplog.at_level(logging.WARNING, logger="nsa_gen"):
        r = make_tuner(spec, tmp_path, runner, jobs=3, prewarm=warm).tune(STEM, 4096, n_trials=6)
    assert r.measured == 6 and len(runner.calls) == 6 and "pool broke" in caplog.text


def _states(url, r):
    study = optuna.load_study(study_name=r, storage=url)
    return study, [(t.state, t.user_attrs.get("status")) for t in study.trials]


def test_setup_failure_mid_round_leaves_the_rest_retryable(spec, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    name = study_name(TuneKey.make(H200, STEM, spec, 4096), spec)
    events = []
    broken, warm = FakeRunner(fail_call={2: SETUP_FAILED}, events=events), FakePrewarm(events)
    r = make_tuner(spec, tmp_path, broken, storage=url, jobs=4, prewarm=warm).tune(
        STEM, 4096, n_trials=10)
    first_round = warm.rounds[0]
    assert len(warm.rounds) == 1 and len(first_round) == 4
    assert broken.calls == first_round[:2]  # the shape stopped at the setup failure
    assert r.entry is not None and r.entry.config == first_round[0]
    study, states = _states(url, name)
    assert not any(s == optuna.trial.TrialState.RUNNING for s, _ in states)
    told = {Config.from_dict(t.params): t.user_attrs.get("status") for t in study.trials
            if t.user_attrs.get("status") not in ("repeat", "pruned")}
    assert told == {first_round[0]: OK, first_round[1]: SETUP_FAILED,
                    first_round[2]: "interrupted", first_round[3]: "interrupted"}
    # A resumed run retries the setup failure and the two unmeasured configs, first, and
    # never measures the good one again.
    fixed = FakeRunner()
    r = make_tuner(spec, tmp_path, fixed, storage=url, jobs=4, prewarm=FakePrewarm()).tune(
        STEM, 4096, n_trials=10)
    assert fixed.calls[:3] == first_round[1:]
    assert first_round[0] not in fixed.calls and len(fixed.calls) == len(set(fixed.calls)) == 9
    assert r.measured == 10 and r.failed == 0


@pytest.mark.parametrize("where", ["trial", "prewarm"])
def test_ctrl_c_mid_round_leaves_nothing_running(spec, tmp_path, where):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    name = study_name(TuneKey.make(H200, STEM, spec, 4096), spec)
    if where == "trial":
        first, warm = FakeRunner(interrupt_at=6), FakePrewarm()  # the 2nd of round 2
    else:
        first, warm = FakeRunner(), FakePrewarm(raise_=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        make_tuner(spec, tmp_path, first, storage=url, jobs=4, prewarm=warm).tune(
            STEM, 4096, n_trials=12)
    study, states = _states(url, name)
    assert not any(s == optuna.trial.TrialState.RUNNING for s, _ in states)
    cut = warm.rounds[-1][1:] if where == "trial" else warm.rounds[-1]
    interrupted = [Config.from_dict(t.params) for t in study.trials
                   if t.user_attrs.get("status") == "interrupted"]
    assert interrupted == cut
    second = FakeRunner()
    r = make_tuner(spec, tmp_path, second, storage=url, jobs=4, prewarm=FakePrewarm()).tune(
        STEM, 4096, n_trials=12)
    done = first.calls[:-1] if where == "trial" else []
    assert second.calls[:len(cut)] == cut and not set(done) & set(second.calls)
    assert r.measured == 12 and len(second.calls) == 12 - len(done)


# ----------------------------------------------------------------------------- trial executor

class BehaviourCase:
    """run() acts on the config: BLOCK_N=16 kills the process, 32 hangs, 2 warps fails to
    compile, 4 stages computes a wrong result."""

    tolerance = 1e-2

    def run(self, config):
        if config["BLOCK_N"] == 16:
            os._exit(3)
        if config["BLOCK_N"] == 32:
            time.sleep(600)
        if config.num_warps == 2:
            raise CompilationError("bad tile")
        return (1.0 if config.num_stages == 4 else 0.0,)

    def rel_error(self, outputs):
        return outputs[0]


class CompilationError(Exception):
    pass


def make_behaviour_case(stem, spec, T, *, B, dtype, device, seed):
    if T == 13:
        raise ValueError("cannot build inputs")
    return BehaviourCase()


def fixed_timer(fn):
    fn()
    return 0.25


def test_executor_in_process(spec):
    ex = TrialExecutor(timer=fixed_timer, make_case=make_behaviour_case)
    req = lambda c, T=64: TrialRequest(STEM, spec, T, 1, c, "cpu")  # noqa: E731
    assert ex(req(cfg(64, 4, 2))) == TrialResult(OK, ms=0.25, rel_error=0.0)
    assert ex(req(cfg(64, 4, 4))).status == WRONG
    res = ex(req(cfg(64, 2, 2)))
    assert res.status == COMPILE_ERROR and "bad tile" in res.message
    assert ex(req(cfg(), T=13)).status == SETUP_FAILED


def test_executor_fails_a_trial_that_fell_back(monkeypatch):
    """A trial whose launch fell back to another config (ops.common.fall_back, here a cuDNN
    refusal of window_fwd's CUDNN variant) timed that config, not its own: it fails as
    FELL_BACK with the reason, where the same config that runs as named passes."""
    from nsa_gen.ops import common, window
    spec = load_spec("deepseek-nsa").replace(
        heads={"q": 4, "kv": 1}, head_dim={"k": 32, "v": 16}, window=8,
        compression={"block": 8, "stride": 4, "phi": "mean"},
        selection={"block": 16, "top_n": 2, "initial_blocks": 1, "local_blocks": 1},
        dtype="float32")  # the interpreter's tl.dot is not meaningful in bf16
    kd = kernel_def("window_fwd")
    config = kd.canonical(spec, kd.default(spec, 40).replace(CUDNN=1))
    ex = TrialExecutor(timer=fixed_timer)
    monkeypatch.setattr(common, "_CUDNN_REFUSED", set())
    assert ex(TrialRequest("window_fwd", spec, 40, 1, config, "cpu")).status == OK

    def refuse(*a):
        raise RuntimeError("cuDNN: no engine for this graph")
    monkeypatch.setattr(window, "_band_fwd", refuse)
    res = ex(TrialRequest("window_fwd", spec, 40, 1, config, "cpu"))
    assert res.status == FELL_BACK and "cuDNN attention failed" in res.message


@pytest.mark.parametrize("kernel_ms, warmup, reps", [(0.01, 1000, 4000), (1.0, 10, 40),
                                                     (8.0, 1, 5), (100.0, 0, 5)])
def test_bench_counts(kernel_ms, warmup, reps):
    # ~10 ms of warm-up and ~40 ms timed, but never fewer than 5 timed runs.
    assert bench_counts(kernel_ms) == (warmup, reps)


def test_bench_timer_takes_the_median_of_flushed_runs(monkeypatch):
    """bench_timer with fake CUDA events and driver: a 100 ms kernel gets one untimed
    launch, one estimate and 5 timed runs (no warm-up), each after an L2 flush."""
    import types

    import torch
    import triton.runtime

    clock = [0.0]
    log = []

    class Event:
        def __init__(self, enable_timing):
            self.t = None

        def record(self):
            self.t = clock[0]

        def elapsed_time(self, other):
            return other.t - self.t

    class Driver:
        def get_empty_cache_for_benchmark(self):
            return "l2"

        def clear_cache(self, cache):
            log.append("flush")

    times = iter([500.0, 100.0, 104.0, 99.0, 101.0, 150.0, 100.5])

    def kernel():
        log.append("run")
        clock[0] += next(times)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(triton.runtime, "driver", types.SimpleNamespace(active=Driver()))
    assert bench_timer(kernel) == 101.0  # median of 104, 99, 101, 150, 100.5
    assert log == ["run"] + ["flush", "run"] * 6


def test_default_timer_by_kernel(spec):
    """The interpreter times wall-clock; on a GPU a launch-bound kernel (compress_mean) is
    timed from a CUDA graph, the others eagerly."""
    from nsa_gen.tuning.trial import default_timer, graph_timer, wall_timer
    cfg = Config.make(num_warps=4, num_stages=1)
    assert default_timer(TrialRequest("compress_mean", spec, 64, 1, cfg, "cpu")) is wall_timer
    assert default_timer(TrialRequest("compress_mean", spec, 64, 1, cfg, "cuda")) is graph_timer
    assert default_timer(TrialRequest("topn", spec, 64, 1, cfg, "cuda:0")) is bench_timer


def test_graph_timer_replays_or_falls_back(monkeypatch):
    """graph_timer hands bench_timer the graph's replay; when the capture raises (a launcher
    that waits on the GPU), the launch itself."""
    import torch

    from nsa_gen.tuning import trial
    timed, runs = [], []
    monkeypatch.setattr(trial, "bench_timer", lambda fn: timed.append(fn) or 1.5)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    class Graph:
        def replay(self):
            pass

    class Capture:
        def __init__(self, graph, fail):
            self.fail = fail

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            if self.fail:
                raise RuntimeError("operation not permitted when stream is capturing")

    def fn():
        runs.append(1)
    for fail in (False, True):
        timed.clear()
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", lambda g, fail=fail: Capture(g, fail))
        assert trial.graph_timer(fn) == 1.5
        assert len(timed) == 1
        assert (timed[0] is fn) == fail
        if not fail:
            assert timed[0].__self__.__class__ is Graph  # the bound replay


def test_classify():
    class OutOfResources(Exception):
        pass

    class OutOfMemoryError(RuntimeError):
        pass
    assert classify(OutOfResources()) == "out_of_resources"
    assert classify(CompilationError()) == COMPILE_ERROR
    assert classify(OutOfMemoryError()) == "out_of_memory"
    assert classify(RuntimeError("CUDA error: illegal memory access")) == "error"


def test_worker_survives_crash_and_hang(spec):
    with WorkerRunner(fixed_timer, make_behaviour_case, timeout_s=3, setup_timeout_s=120) as w:
        req = lambda c: TrialRequest(STEM, spec, 64, 1, c, "cpu")  # noqa: E731
        assert w(req(cfg(64, 4, 2))) == TrialResult(OK, ms=0.25, rel_error=0.0)
        assert w(req(cfg(64, 2, 2))).status == COMPILE_ERROR
        assert w(req(cfg(64, 4, 4))).status == WRONG
        assert w.restarts == 0
        crashed = w(req(cfg(16, 4, 2)))
        assert crashed.status == CRASH and "exit code 3" in crashed.message
        assert w(req(cfg(64, 4, 2))).ok
        assert w(req(cfg(32, 4, 2))).status == TIMEOUT
        assert w(req(cfg(64, 4, 2))).ok
        assert w.restarts == 2


# ----------------------------------------------------------------------------- CLI

def _cli(argv):
    p = argparse.ArgumentParser(prog="nsa-gen")
    commands.register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_tune_refuses_without_cuda(tmp_path, capsys, monkeypatch):
    import torch
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _cli(["tune", "deepseek-nsa", "--db", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA GPU" in err and "TRITON_INTERPRET=1" in err and len(err.splitlines()) == 1


def test_tune_cli_on_the_interpreter(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("NSA_GEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuner_mod, "WorkerRunner", lambda timer, timeout_s: FakeRunner())
    rc = _cli(["tune", "mqa", "--kernels", STEM, "--seqlens", "1k,256", "--trials", "4",
               "--db", str(tmp_path / "db"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "T=256" in out and "T=1024" in out and "NSA_GEN_DB=" in out
    got = TuningDB(tmp_path / "db").load()
    assert {(k.device, k.T) for k in got} == {(CPU_DEVICE, 256), (CPU_DEVICE, 1024)}
    assert (tmp_path / "cache" / "tuning" / "optuna.db").exists()  # default storage
    assert _cli(["tune", "mqa", "--kernels", "nope", "--db", str(tmp_path)]) == 2
    assert _cli(["tune", "no-such-spec", "--db", str(tmp_path)]) == 2
    assert _cli(["tune", "mqa", "--jobs", "0", "--db", str(tmp_path)]) == 2


def test_tune_cli_jobs_reach_the_prewarm(tmp_path, capsys, monkeypatch):
    from nsa_gen.tuning import prewarm
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("NSA_GEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuner_mod, "WorkerRunner", lambda timer, timeout_s: FakeRunner())
    made = []

    class Pool(FakePrewarm):
        def __init__(self, jobs, timeout_s):
            super().__init__()
            self.jobs, self.closed = jobs, False
            made.append(self)

        def close(self):
            self.closed = True

    monkeypatch.setattr(prewarm, "Prewarmer", Pool)
    rc = _cli(["tune", "mqa", "--kernels", STEM, "--seqlens", "256", "--trials", "5",
               "--jobs", "3", "--storage", "memory", "--db", str(tmp_path / "db"), "--no-progress"])
    assert rc == 0 and len(made) == 1 and made[0].jobs == 3 and made[0].closed
    assert [len(x) for x in made[0].rounds] == [3, 2]


# ----------------------------------------------------------------------------- end to end

def once_timer(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from triton's interpreter
def test_end_to_end_on_the_interpreter(tmp_path, monkeypatch):
    """Real template, real harness (fp32 reference check) in Triton's interpreter, then the
    dispatcher serves the winner on this (CPU) device."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from nsa_gen.db import Dispatcher
    spec = load_spec("mqa").replace(heads={"q": 2, "kv": 1}, head_dim={"k": 16, "v": 16},
                                    dtype="float32", window=32,
                                    compression={"block": 16, "stride": 8},
                                    selection={"block": 16, "top_n": 3, "initial_blocks": 1,
                                               "local_blocks": 1})
    ex = TrialExecutor(timer=once_timer)
    with Tuner(spec, db=TuningDB(tmp_path / "db"), device=CPU_DEVICE, runner=ex, storage="memory",
               torch_device="cpu", progress=False) as t:
        r = t.tune("window_fwd", 48, n_trials=2)
    assert r.failures == () and r.measured == 2 and r.entry is not None
    d = Dispatcher([tmp_path / "db"], read_env=False, shipped=False)
    assert d.get("window_fwd", spec, 48) == r.entry.config


# ----------------------------------------------------------------------------- local search

def test_neighbours_move_one_parameter_one_step():
    from optuna.distributions import CategoricalDistribution
    dists = {"BLOCK_N": CategoricalDistribution([16, 32, 64]),
             "num_warps": CategoricalDistribution([2, 4, 8]),
             "num_stages": CategoricalDistribution([1, 2])}
    best = Config.make(BLOCK_N=32, num_warps=2, num_stages=2)
    every = {Config.make(BLOCK_N=b, num_warps=w, num_stages=s)
             for b in (16, 32, 64) for w in (2, 4, 8) for s in (1, 2)}
    got = Tuner._neighbours(best, dists, every)
    assert got == [Config.make(BLOCK_N=16, num_warps=2, num_stages=2),
                   Config.make(BLOCK_N=32, num_warps=4, num_stages=2),
                   Config.make(BLOCK_N=32, num_warps=2, num_stages=1),
                   Config.make(BLOCK_N=64, num_warps=2, num_stages=2)]
    # Measured ones are not offered again; when the best's neighbourhood is spent, the
    # runner-up's is searched.
    todo = every - set(got) - {best}
    second = Config.make(BLOCK_N=64, num_warps=8, num_stages=1)
    results = {best: 1.0, second: 1.5}
    local = Tuner._local_round(results, dists, todo, 3)
    assert local and all(sum(a != b for a, b in zip(c.as_dict().values(), second.as_dict().values())) == 1
                         for c in local)


def test_last_trials_search_the_best_neighbourhood(spec, tmp_path):
    """The last LOCAL_FRACTION of the trials are neighbours of the best configs so far."""
    from nsa_gen.tuning.tuner import LOCAL_FRACTION
    runner = FakeRunner()
    n = 20
    with make_tuner(spec, tmp_path, runner, storage="memory") as t:
        t.tune(STEM, 4096, n_trials=n)
    n_local = round(n * LOCAL_FRACTION)
    assert len(runner.calls) == n
    tail = runner.calls[-n_local:]
    measured_before = runner.calls[:-n_local]
    for cfg in tail[:1]:
        best = min(measured_before, key=cost)
        assert sum(cfg.as_dict()[k] != v for k, v in best.as_dict().items()) == 1


def test_unread_params_are_pruned_as_copies(monkeypatch):
    """A config setting a param its variant does not read (SHARE of the query-batched
    selected forward) runs as its canonical form: the tuner tries only that one."""
    monkeypatch.setitem(KERNELS, STEM, FULL_KD)  # the whole space, not this module's cut
    spec = load_spec("small-group")
    kd = FULL_KD
    keep, dropped = pruned_space("selection_fwd", spec, H200)
    batched = [c for c in keep if c["BLOCK_Q"] > 0]
    assert batched and all(c["SHARE"] == 1 for c in batched)
    assert any(c["SHARE"] == 4 and c["BLOCK_Q"] == 0 for c in keep)
    copy = batched[0].replace(SHARE=2)
    assert kd.canonical(spec, copy) == batched[0] and dropped[copy].startswith("runs as")
    assert kd.canonical(spec, keep[0]) == keep[0]


def test_parse_assignments():
    """Params as the command lines give them (trial main, rekey.py, variant_probe.py)."""
    got = parse_assignments(["BLOCK_T=8", "MERGE=rank", "OFF=-1", "IMP=sum", "num_warps=2"])
    assert got == {"BLOCK_T": 8, "MERGE": "rank", "OFF": -1, "IMP": "sum", "num_warps": 2}
    assert Config.from_dict(got).num_warps == 2
    for bad in ("BLOCK_T", "=8"):
        with pytest.raises(ValueError, match="NAME=VALUE"):
            parse_assignments([bad])


def test_entries_of_an_older_template_are_seeded(spec, tmp_path):
    # After a template edit that keeps the params, the old winners are measured again first
    # (their entries are stale: the dispatcher no longer uses them).
    db = TuningDB(tmp_path / "db")
    old, near = min(search_space(STEM, spec).configs(), key=cost), cfg(16, 2, 1)
    assert KD.default(spec, 4096) not in (old, near)
    db.put(TuneKey.make(H200, STEM, spec, 4096, source_hash="0" * 16), Entry(old, 1.0, None, 1, "2026-01-01"))
    db.put(TuneKey.make(H200, STEM, spec, 2048), Entry(near, 1.0, None, 1, "2026-01-01"))
    runner = FakeRunner()
    r = make_tuner(spec, tmp_path, runner, neighbours=1).tune(STEM, 4096, n_trials=3)
    assert runner.calls[:3] == [KD.default(spec, 4096), old, near]
    assert r.entry.config == old
