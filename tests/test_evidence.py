"""benchmarks/tune_evidence.py on the CPU: its tables from synthetic studies and DB entries
with a fake timer, from real studies run by the Tuner with a fake runner, and its CLI."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from nsa_gen.config import Config
from nsa_gen.db import DeviceKey, Entry, TuneKey, TuningDB
from nsa_gen.kernels import kernel_def
from nsa_gen.spec import load_spec
from nsa_gen.tuning.space import pruned_space
from nsa_gen.tuning.trial import WRONG
from nsa_gen.tuning.tuner import Tuner, parse_study_name, study_name

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "tune_evidence.py"
H200 = DeviceKey("sm90", 132, 140, "NVIDIA H200")
A10 = DeviceKey("sm86", 72, 22, "NVIDIA A10")
STEM = "selection_fwd"


def _load(path: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


ev = _load()


@pytest.fixture(scope="module")
def spec():
    return load_spec("deepseek-nsa")


def cfg(block_n=64, warps=4, stages=2):
    return Config.make(BLOCK_N=block_n, num_warps=warps, num_stages=stages)


def outcome(spec, T, results, failures=None, name=None, known=True):
    key = TuneKey.make(H200, STEM, spec, T)
    name = name or study_name(key, spec)
    return ev.StudyOutcome(name, parse_study_name(name), spec if known else None, results,
                           failures or {})


# ----------------------------------------------------------------------------- study names

def test_study_names_round_trip(spec):
    key = TuneKey.make(H200, STEM, spec, 65536, 2)
    sid = parse_study_name(study_name(key, spec))
    assert (sid.device_id, sid.kernel, sid.spec_hash, sid.source_hash, sid.triton, sid.T, sid.B) == (
        H200.id, STEM, spec.spec_hash, key.source_hash, key.triton, 65536, 2)
    for other in ("my-study", "nsa-gen/a/b/c/d/triton-3/T1", "nsa-gen/a/b/c/d/x/T1-B1",
                  "nsa-gen/a/b/c/d/triton-3/Tx-B1", "nsa-gen/a/b/c/d/triton-3/1-1"):
        assert parse_study_name(other) is None


# ----------------------------------------------------------------------------- table a

def test_tuned_vs_default(spec):
    default = kernel_def(STEM).default(spec, 4096)
    best = cfg(32, 8, 3)
    assert default != best
    rows = ev.tuned_vs_default([
        outcome(spec, 4096, {default: 2.0, best: 1.6, cfg(16, 2, 1): 3.0}, {cfg(16, 8, 4): ("wrong", "")}),
        outcome(spec, 8192, {best: 1.0}, {kernel_def(STEM).default(spec, 8192): (WRONG, "bad")}),
        outcome(spec, 16384, {best: 1.0}, known=False),
        outcome(spec, 32768, {}, {best: (WRONG, "")}),
    ])
    a, b, c, d = rows
    assert (a["default_ms"], a["best_ms"], a["best_config"], a["default_status"]) == (2.0, 1.6, best, "ok")
    assert a["speedup"] == pytest.approx(1.25) and (a["measured"], a["failed"]) == (4, 1)
    assert (b["default_ms"], b["default_status"], b["speedup"]) == (None, WRONG, None)
    assert (c["default_status"], c["spec"]) == ("unknown spec", f"spec {spec.spec_hash[:8]}")
    assert (d["default_status"], d["best_ms"], d["speedup"]) == ("not measured", None, None)
    md = ev.render_markdown({"a": rows}, {"date": "2026-01-01", "gpu": "H200"})
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + 4 and "1.25x" in md and "gpu: H200" in md
    assert "4 studies; default measured in 1; geometric-mean speedup 1.25x" in md


# ----------------------------------------------------------------------------- table b

def test_sampled_vs_exhaustive(spec):
    best, near, far = cfg(32, 8, 3), cfg(32, 8, 2), cfg(64, 2, 1)
    sampled = [outcome(spec, 4096, {near: 1.04, far: 2.0}), outcome(spec, 8192, {far: 2.0}),
               outcome(spec, 16384, {near: 1.0}), outcome(spec, 32768, {}, {near: (WRONG, "")})]
    full = [outcome(spec, 4096, {best: 1.0, near: 1.02, far: 2.0}, {cfg(16, 2, 1): ("x", "")}),
            outcome(spec, 8192, {best: 1.0, far: 2.1}), outcome(spec, 32768, {best: 1.0})]
    rows = ev.sampled_vs_exhaustive(sampled, full)
    assert [r["T"] for r in rows] == [4096, 8192]  # 16384 has no exhaustive run, 32768 no result
    a, b = rows
    assert a["ratio"] == pytest.approx(1.04) and a["within"] is True
    assert a["ratio_same_run"] == pytest.approx(1.02)
    assert (a["sampled_measured"], a["exhaustive_measured"]) == (2, 4)
    assert (a["sampled_best_config"], a["exhaustive_best_config"]) == (near, best)
    assert b["ratio"] == pytest.approx(2.0) and b["within"] is False
    assert b["ratio_same_run"] == pytest.approx(2.1)
    assert "1 of 2 studies within 5%" in ev.summarize("b", rows)


def test_tables_from_real_studies(spec, tmp_path):
    """Studies run by the Tuner (fake runner) read back: the default is found among the
    trials, and a run with more trials than the space measures the whole pruned space."""
    from test_tuning import FakeRunner, cost

    def run(url, trials, T):
        t = Tuner(spec, db=TuningDB(tmp_path / "db"), device=H200, runner=FakeRunner(),
                  storage=url, torch_device="cpu", progress=False)
        return t.tune(STEM, T, n_trials=trials)

    few, every = f"sqlite:///{tmp_path / 'few.db'}", f"sqlite:///{tmp_path / 'all.db'}"
    for T in (1024, 4096):
        run(few, 5, T)
        run(every, 10_000, T)
    optuna.create_study(study_name="someone-else", storage=few)  # ignored
    rows = ev.tuned_vs_default(ev.read_studies(few))
    assert [(r["T"], r["spec"], r["measured"]) for r in rows] == [(1024, spec.name, 5),
                                                                  (4096, spec.name, 5)]
    for r in rows:
        default = kernel_def(STEM).default(spec, r["T"])
        assert r["default_config"] == default and r["default_ms"] == pytest.approx(cost(default))
    keep, _ = pruned_space(STEM, spec, H200)
    rows = ev.sampled_vs_exhaustive(ev.read_studies(few), ev.read_studies(every))
    assert len(rows) == 2
    for r in rows:
        assert r["exhaustive_measured"] == len(keep) and r["sampled_measured"] == 5
        # cost ties across the structural params (BLOCK_Q, TMA): compare the cost reached
        assert cost(r["exhaustive_best_config"]) == min(map(cost, keep)) and r["ratio"] >= 1.0
    # A study of an unknown spec (nothing stored, no built-in hash) still gets its row.
    other = spec.replace(name="mine", window=256)
    Tuner(other, db=TuningDB(tmp_path / "db"), device=H200, runner=FakeRunner(), storage=few,
          torch_device="cpu", progress=False).tune(STEM, 1024, n_trials=2)
    got = {r["spec"]: r for r in ev.tuned_vs_default(ev.read_studies(few))}
    assert got["mine"]["default_status"] == "ok"  # from the spec stored in the study


# ----------------------------------------------------------------------------- table c

class FakeClock:
    """time_fn: a config's cost, times `slow` for configs in `slow`; records the calls."""

    def __init__(self, slow=None, broken=()):
        self.calls = []
        self.slow = slow or {}
        self.broken = set(broken)

    def __call__(self, key, config):
        self.calls.append((key.T, config))
        if key.T in self.broken:
            raise RuntimeError("no memory")
        return 1.0 * self.slow.get((key.T, config), 1.0)


def test_leave_one_out(spec):
    a, b, c = cfg(64, 4, 2), cfg(32, 8, 3), cfg(16, 2, 1)
    put = lambda T, config, s=spec, dev=H200: (TuneKey.make(dev, STEM, s, T),  # noqa: E731
                                                Entry(config, 1.0, None, 10, "2026-01-01"))
    entries = dict([put(1024, a), put(4096, b), put(16384, b), put(131072, c),
                    put(8192, a, spec.replace(name="other", window=256)),  # alone in its spec
                    put(2048, c, dev=A10)])  # alone on its device
    clock = FakeClock(slow={(1024, b): 1.05, (4096, a): 1.5, (131072, b): 1.2})
    rows = ev.leave_one_out(entries, clock, rounds=2)
    got = {r["T"]: r for r in rows}
    assert sorted(got) == [1024, 4096, 16384, 131072]
    # 4096 is 2 steps from 1024 and 2 from 16384: the larger shape wins the tie, as in dispatch.
    assert (got[4096]["neighbour_T"], got[4096]["same_config"], got[4096]["ratio"]) == (16384, True, 1.0)
    assert got[1024]["neighbour_T"] == 4096 and got[1024]["ratio"] == pytest.approx(1.05)
    assert got[1024]["within"] is True
    assert got[16384]["neighbour_T"] == 4096 and got[16384]["same_config"]
    assert got[131072]["neighbour_T"] == 16384 and got[131072]["ratio"] == pytest.approx(1.2)
    assert got[131072]["within"] is False and got[131072]["own_config"] == c
    # Back to back, alternating which goes first; the same config is timed once a round.
    assert [x for x in clock.calls if x[0] == 1024] == [(1024, a), (1024, b), (1024, b), (1024, a)]
    assert [x for x in clock.calls if x[0] == 16384] == [(16384, b)] * 2
    text = ev.summarize("c", rows)
    assert "3 of 4 entries within 10%" in text and "worst ratio 1.200" in text
    # A shape that cannot be timed gets a row with the error, and the rest go on.
    rows = ev.leave_one_out(entries, FakeClock(broken={1024}), rounds=1)
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["T"] == 1024 and "no memory" in bad[0]["error"]
    assert "1 failed to time" in ev.summarize("c", rows)
    # JSON: configs as dicts, infinities as null.
    data = json.loads(ev.to_json({"c": rows}, {"date": "d"}))
    assert data["leave_one_out"][0]["own_config"] == a.as_dict()
    assert json.loads(ev.to_json({"b": [{"ratio": math.inf}]}, {}))["sampled_vs_exhaustive"] == [
        {"ratio": None}]


def test_leave_one_out_from_studies(spec):
    a, b, c = cfg(64, 4, 2), cfg(32, 8, 3), cfg(16, 2, 1)
    studies = [outcome(spec, 1024, {a: 1.0, b: 1.3}), outcome(spec, 4096, {b: 2.0, a: 2.1}),
               outcome(spec, 16384, {c: 4.0}),  # never measured its neighbour's winner
               outcome(spec.replace(name="other", window=256), 2048, {a: 1.0})]  # alone
    rows = {r["T"]: r for r in ev.leave_one_out_from_studies(studies)}
    assert sorted(rows) == [1024, 4096, 16384]
    assert rows[1024]["neighbour_T"] == 4096 and rows[1024]["neighbour_config"] == b
    assert rows[1024]["ratio"] == pytest.approx(1.3) and rows[1024]["within"] is False
    assert rows[4096]["neighbour_T"] == 16384 and rows[4096]["ratio"] is None  # tie: larger
    assert rows[4096]["error"] == "not measured in this study"
    assert rows[16384]["neighbour_T"] == 4096 and rows[16384]["ratio"] is None
    # With a DB, the neighbour is the DB's entry (what dispatch would really pick).
    put = lambda T, config: (TuneKey.make(H200, STEM, spec, T),  # noqa: E731
                             Entry(config, 1.0, None, 10, "2026-01-01"))
    rows = ev.leave_one_out_from_studies(studies, dict([put(4096, a), put(1024, a)]))
    got = {r["T"]: r for r in rows}
    assert got[1024]["neighbour_config"] == a and got[1024]["ratio"] == pytest.approx(1.0)
    assert got[4096]["neighbour_T"] == 1024 and got[4096]["ratio"] == pytest.approx(2.1 / 2.0)
    assert got[16384]["neighbour_T"] == 4096 and got[16384]["neighbour_config"] == a
    text = ev.summarize("d", rows)
    assert "2 of 2 entries within 10%" in text and "1 without the neighbour's config measured" in text


def test_case_timer_builds_each_shape_once(spec, monkeypatch):
    """CaseTimer on the CPU with a fake case and timer: one case per key, spec rebuilt from
    the key's fields."""
    import nsa_gen.harness as harness
    made = []

    class Case:
        def run(self, config):
            return config

    def make_case(stem, s, T, *, B, dtype, device):
        made.append((stem, s, T, B, str(dtype), device))
        return Case()

    monkeypatch.setattr(harness, "make_case", make_case)
    timer = ev.CaseTimer(dtype="float32", device="cpu", timer=lambda fn: 2.0 if fn() == cfg() else 3.0)
    k1, k2 = TuneKey.make(H200, STEM, spec, 1024), TuneKey.make(H200, STEM, spec, 2048)
    assert [timer(k1, cfg()), timer(k1, cfg(32)), timer(k2, cfg())] == [2.0, 3.0, 2.0]
    assert made == [(STEM, spec, 1024, 1, "torch.float32", "cpu"),
                    (STEM, spec, 2048, 1, "torch.float32", "cpu")]


# ----------------------------------------------------------------------------- CLI

def test_cli_writes_markdown_and_json(spec, tmp_path, monkeypatch):
    from test_tuning import FakeRunner
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    Tuner(spec, db=TuningDB(tmp_path / "db"), device=H200, runner=FakeRunner(), storage=url,
          torch_device="cpu", progress=False).tune(STEM, 4096, n_trials=4)
    out = tmp_path / "out" / "evidence"
    assert ev.main(["--storage", url, "--exhaustive-storage", url, "--out", str(out)]) == 0
    md = (tmp_path / "out" / "evidence.md").read_text()
    assert "### Tuned against the heuristic default" in md and "### Optuna's best" in md
    data = json.loads((tmp_path / "out" / "evidence.json").read_text())
    assert len(data["tuned_vs_default"]) == 1 and data["sampled_vs_exhaustive"][0]["ratio"] == 1.0
    assert data["meta"]["storage"] == url
    # Without a GPU table c cannot be timed; the tables before it are written anyway.
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "out" / "evidence.md").unlink()
    assert ev.main(["--storage", url, "--db", str(tmp_path / "db"), "--loo", "--out", str(out)]) == 2
    assert "### Tuned against" in (tmp_path / "out" / "evidence.md").read_text()
    with pytest.raises(SystemExit):
        ev.main(["--out", str(out)])  # nothing to do
    with pytest.raises(SystemExit):
        ev.main(["--loo", "--out", str(out)])  # --loo needs --db


def test_cli_help_runs_as_a_script():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "--exhaustive-storage" in r.stdout and "--loo" in r.stdout



def test_replay_runs_the_tuner_on_recorded_times():
    """tune_replay answers each trial with its recorded time: the study's best is the best
    recorded time among the configs it visited, and a space smaller than the trial count is
    exhausted, so the exhaustive best is found."""
    tune_replay = _load(ROOT / "benchmarks" / "tune_replay.py")
    spec = load_spec("deepseek-nsa")
    device = tune_replay.KNOWN_DEVICES[0]
    keep, _ = pruned_space("selection_fwd", spec, device)
    times = {c: 1.0 + 0.01 * i for i, c in enumerate(reversed(keep))}
    best = tune_replay.replay(times, "selection_fwd", spec, 65536, len(keep) + 5, 0, device, jobs=4)
    assert best == min(times.values())
    few = tune_replay.replay(times, "selection_fwd", spec, 65536, 6, 0, device, jobs=4)
    assert few in times.values() and few >= best
