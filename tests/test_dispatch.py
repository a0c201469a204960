"""Runtime dispatch: lookup order, nearest shape in log2 space, fit checks against the
device, warn-once fallbacks, and the host cost of a warm lookup. CPU only."""
from __future__ import annotations

import logging
import statistics
import time

import pytest

from nsa_gen.config import Config
from nsa_gen.db import (CPU_DEVICE, DeviceKey, Dispatcher, Entry, TuneKey, TuningDB, config_problem,
                        default_dispatcher, fitting_default, reset_default_dispatcher)
from nsa_gen.kernels import kernel_def
from nsa_gen.spec import load_spec

H200 = DeviceKey("sm90", 132, 140, "NVIDIA H200")
H100 = DeviceKey("sm90", 114, 80, "NVIDIA H100 PCIe")
A10 = DeviceKey("sm86", 72, 22, "NVIDIA A10")
STEM = "selection_fwd"
KD = kernel_def(STEM)


@pytest.fixture(scope="module")
def spec():
    return load_spec("deepseek-nsa")


@pytest.fixture(autouse=True)
def no_env_overlay(monkeypatch):
    monkeypatch.delenv("NSA_GEN_DB", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def cfg(block_n=32, warps=8, stages=2):
    return Config.make(BLOCK_N=block_n, BLOCK_Q=0, TMA=0, SHARE=1, FORCED=0, num_warps=warps, num_stages=stages)


def put(root, spec, T, config, device=H200, B=1, **kw):
    TuningDB(root).put(TuneKey.make(device, STEM, spec, T, B, **kw),
                       Entry(config, 1.0, 0.1, 10, "2026-01-01"))


def dispatcher(*overlays, shipped=None, device=H200, read_env=False):
    return Dispatcher(overlays, shipped=shipped or False, device=device, read_env=read_env)


def test_exact_hit(tmp_path, spec, caplog):
    put(tmp_path, spec, 4096, cfg(16, 2, 1))
    put(tmp_path, spec, 4096, cfg(16, 8, 4), B=4)
    d = dispatcher(shipped=tmp_path)
    with caplog.at_level(logging.WARNING, logger="nsa_gen"):
        assert d.get(STEM, spec, 4096) == cfg(16, 2, 1)
        assert d.get(STEM, spec, 4096, B=4) == cfg(16, 8, 4)
    assert caplog.records == []


def test_nearest_shape_in_log2(tmp_path, spec):
    put(tmp_path, spec, 1024, cfg(16))
    put(tmp_path, spec, 16384, cfg(64))
    d = dispatcher(shipped=tmp_path)
    assert d.get(STEM, spec, 3000) == cfg(16)    # log2: 1.55 from 1024, 2.45 from 16384
    assert d.get(STEM, spec, 8192) == cfg(64)    # 3 from 1024, 1 from 16384
    assert d.get(STEM, spec, 1) == cfg(16)
    assert d.get(STEM, spec, 1 << 20) == cfg(64)
    assert d.get(STEM, spec, 4096) == cfg(64)    # a tie goes to the larger shape
    put(tmp_path, spec, 2048, cfg(32), B=16)
    d.clear()
    assert d.get(STEM, spec, 1024, B=16) == cfg(32)  # B counts, half as much as T
    assert d.get(STEM, spec, 1024, B=2) == cfg(16)
    # Another spec shares nothing with these entries.
    assert dispatcher(shipped=tmp_path).get(STEM, spec.replace(dtype="float16"), 1024) == KD.default(spec, 1024)


def test_overlay_beats_shipped(tmp_path, spec, monkeypatch):
    shipped, user, model = tmp_path / "shipped", tmp_path / "user", tmp_path / "model"
    put(shipped, spec, 4096, cfg(16))
    put(user, spec, 4096, cfg(32))
    put(model, spec, 4096, cfg(64, 4))
    assert dispatcher(shipped=shipped).get(STEM, spec, 4096) == cfg(16)
    assert dispatcher(user, shipped=shipped).get(STEM, spec, 4096) == cfg(32)
    monkeypatch.setenv("NSA_GEN_DB", str(user))
    d = dispatcher(shipped=shipped, read_env=True)
    assert d.sources == [user, shipped]
    assert d.get(STEM, spec, 4096) == cfg(32)
    # A path given in code comes before the environment's.
    d.add_overlay(model)
    assert d.get(STEM, spec, 4096) == cfg(64, 4)
    assert d.sources == [model, user, shipped]


def test_exact_shape_beats_nearer_source(tmp_path, spec):
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    put(shipped, spec, 4096, cfg(16))
    put(user, spec, 2048, cfg(32))
    d = dispatcher(user, shipped=shipped)
    assert d.get(STEM, spec, 4096) == cfg(16)
    assert d.get(STEM, spec, 2048) == cfg(32)
    assert d.get(STEM, spec, 2500) == cfg(32)  # nearer in log2 to 2048


def test_fallback_warns_once_per_key(tmp_path, spec, caplog):
    d = dispatcher(shipped=tmp_path)
    with caplog.at_level(logging.WARNING, logger="nsa_gen"):
        for T in (128, 1024, 4096, 4096, 99):
            assert d.get(STEM, spec, T) == KD.default(spec, T)
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "no tuned config" in msg and STEM in msg and "deepseek-nsa" in msg and H200.id in msg
    other = load_spec("mqa")
    with caplog.at_level(logging.WARNING, logger="nsa_gen"):
        d.get(STEM, other, 128)
    assert len(caplog.records) == 2


def test_origin_names_the_entry_or_the_default(tmp_path, spec):
    """origin() says where get()'s config comes from: the DB entry, another key's entry (the
    gated key's fallback), or the heuristic default."""
    put(tmp_path, spec, 4096, cfg(16, 2, 1))
    d = dispatcher(shipped=tmp_path)
    assert d.origin(STEM, spec, 4096) == f"DB {tmp_path.name}: {STEM} deepseek-nsa T=4096 B=1 on {H200.id}"
    assert d.origin(STEM, spec, 8192).endswith("T=4096 B=1 on " + H200.id)  # nearest shape
    assert d.origin("selection_fwd_gated", spec, 4096).startswith(f"{STEM}'s: DB ")
    assert d.get("selection_fwd_gated", spec, 4096) == cfg(16, 2, 1)
    assert d.origin("topn", spec, 4096) == "heuristic default"


def test_stale_entries_are_ignored_and_said(tmp_path, spec, caplog):
    """Entries tuned on another version of the template are never used; falling back past
    them warns once, naming how many, and origin() counts them."""
    put(tmp_path, spec, 4096, cfg(16, 2, 1), source_hash="0" * 16)
    put(tmp_path, spec, 8192, cfg(16, 2, 1), source_hash="0" * 16)
    d = dispatcher(shipped=tmp_path)
    with caplog.at_level(logging.WARNING, logger="nsa_gen"):
        for T in (4096, 8192, 4096):
            assert d.get(STEM, spec, T) == KD.default(spec, T)
    stale = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(stale) == 1 and "ignoring 2 entries of selection_fwd" in stale[0], caplog.text
    assert d.origin(STEM, spec, 4096) == "heuristic default (2 stale entries ignored)"
    # Current entries beside stale ones: used, and nothing said.
    put(tmp_path, spec, 4096, cfg(64, 4, 2))
    d = dispatcher(shipped=tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nsa_gen"):
        assert d.get(STEM, spec, 4096) == cfg(64, 4, 2)
    assert caplog.records == []


def test_config_that_does_not_fit_falls_back(tmp_path, spec, caplog):
    # BLOCK_N=64 with 4 stages needs 2*(16*256 + 4*64*384) B = 200 KiB: fits sm90, not sm86.
    big = cfg(64, 4, 4)
    assert config_problem(KD, spec, big, H200) is None
    assert "shared memory" in config_problem(KD, spec, big, A10)
    put(tmp_path, spec, 4096, big, device=A10)
    put(tmp_path, spec, 1024, cfg(16, 4, 2), device=A10)
    d = dispatcher(shipped=tmp_path, device=A10)
    with caplog.at_level(logging.WARNING, logger="nsa_gen"):
        got = d.get(STEM, spec, 4096)
        d.get(STEM, spec, 4096, B=2)
    assert got == cfg(16, 4, 2)  # the next candidate that fits
    assert len(caplog.records) == 1 and "ignoring tuned config" in caplog.text
    assert "shared memory" in caplog.text


def test_config_outside_the_space_falls_back(tmp_path, spec, caplog):
    put(tmp_path, spec, 4096, Config.make(BLOCK_N=48, BLOCK_Q=0, TMA=0, SHARE=1, FORCED=0, num_warps=4, num_stages=2))
    put(tmp_path, spec, 8192, Config.make(BLOCK_N=64, BLOCK_Q=0, TMA=0, SHARE=1, FORCED=0, TILE=3, num_warps=4, num_stages=2))
    d = dispatcher(shipped=tmp_path)
    with caplog.at_level(logging.WARNING, logger="nsa_gen"):
        assert d.get(STEM, spec, 4096) == KD.default(spec, 4096)
    assert "config space" in caplog.text and "no tuned config" in caplog.text


def test_default_is_made_to_fit(spec):
    # With 256-dim heads the heuristic default (BLOCK_N=64, 2 stages) needs 136 KiB: too
    # much for sm86's 99 KiB. The fallback changes as little as it can.
    spec = spec.replace(head_dim={"k": 256, "v": 256})
    default = KD.default(spec, 4096)
    assert config_problem(KD, spec, default, A10) is not None
    fixed = fitting_default(KD, spec, 4096, A10)
    assert config_problem(KD, spec, fixed, A10) is None
    assert fixed == Config.make(BLOCK_N=64, BLOCK_Q=0, TMA=0, SHARE=1, FORCED=0, num_warps=default.num_warps,
                                num_stages=1)
    assert dispatcher(device=A10).get(STEM, spec, 4096) == fixed
    assert fitting_default(KD, spec, 4096, H200) == default
    assert fitting_default(KD, spec, 4096, CPU_DEVICE) == default


def test_tma_needs_hopper(spec):
    """A config that loads through TMA is refused on an older GPU, with the reason."""
    tma = KD.default(spec, 4096).replace(TMA=1)
    assert "needs sm90" in config_problem(KD, spec, tma, A10)
    assert config_problem(KD, spec, tma, H200) is None
    assert config_problem(KD, spec, tma, CPU_DEVICE) is None


def test_key_matching_rules(tmp_path, spec):
    # Another triton version: still used. Another template source: never.
    put(tmp_path, spec, 4096, cfg(16), triton="0.0.1")
    put(tmp_path, spec, 4096, cfg(32), B=2, source_hash="0" * 16)
    d = dispatcher(shipped=tmp_path)
    assert d.get(STEM, spec, 4096) == cfg(16)
    assert d.get(STEM, spec, 4096, B=2) == cfg(16)
    # Same architecture, another board: a fallback, after the exact device.
    other = tmp_path / "other"
    put(other, spec, 4096, cfg(64, 2), device=H100)
    assert dispatcher(shipped=other).get(STEM, spec, 4096) == cfg(64, 2)
    put(other, spec, 1024, cfg(16, 2))
    assert dispatcher(shipped=other).get(STEM, spec, 4096) == cfg(16, 2)
    # Another architecture: never.
    assert dispatcher(shipped=other, device=A10).get(STEM, spec, 4096) == fitting_default(KD, spec, 4096, A10)


def test_corrupt_overlay_does_not_break_dispatch(tmp_path, spec, caplog):
    put(tmp_path / "shipped", spec, 4096, cfg(16))
    bad = tmp_path / "user" / H200.id / f"{STEM}.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{{{")
    with caplog.at_level(logging.WARNING, logger="nsa_gen"):
        assert dispatcher(tmp_path / "user", shipped=tmp_path / "shipped").get(STEM, spec, 4096) == cfg(16)
    assert str(bad) in caplog.text


def test_clear_rereads_the_db(tmp_path, spec):
    d = dispatcher(shipped=tmp_path)
    assert d.get(STEM, spec, 4096) == KD.default(spec, 4096)
    put(tmp_path, spec, 4096, cfg(16))
    assert d.get(STEM, spec, 4096) == KD.default(spec, 4096)  # memoized
    d.clear()
    assert d.get(STEM, spec, 4096) == cfg(16)


def test_default_dispatcher_reads_env(tmp_path, spec, monkeypatch):
    put(tmp_path, spec, 4096, cfg(16, 2, 3), device=CPU_DEVICE)
    monkeypatch.setenv("NSA_GEN_DB", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reset_default_dispatcher()
    try:
        d = default_dispatcher()
        assert d is default_dispatcher()
        assert d.sources[0] == tmp_path
        assert d.get(STEM, spec, 4096) == cfg(16, 2, 3)
    finally:
        reset_default_dispatcher()


def test_warm_get_costs_under_5us(tmp_path, spec):
    put(tmp_path, spec, 4096, cfg(16))
    d = dispatcher(shipped=tmp_path)
    get = d.get
    assert get(STEM, spec, 4096) == cfg(16)
    n, per_batch = 50, 400
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            get(STEM, spec, 4096)
        samples.append((time.perf_counter() - t0) / per_batch)
    assert statistics.median(samples) < 5e-6, f"warm get() took {statistics.median(samples) * 1e6:.2f} us"


def test_split_length_moves_with_the_shape(tmp_path, spec):
    """A neighbour's split of the compressed dk/dv pass is a token count: dispatch scales it
    to the shape, so the config keeps its number of splits (2 at 16k with 8192 -> 2048 at
    4k); no split stays none. The tuner seeds the same moved config."""
    stem = "compression_bwd"
    kd = kernel_def(stem)
    base = kd.default(spec, 16384).replace(DKV_SPLIT_T=8192)
    TuningDB(tmp_path).put(TuneKey.make(H200, stem, spec, 16384), Entry(base, 1.0, 0.1, 5, "2026-01-01"))
    d = dispatcher(shipped=tmp_path)
    assert d.get(stem, spec, 16384) == base
    assert d.get(stem, spec, 4096) == base.replace(DKV_SPLIT_T=2048)
    assert d.get(stem, spec, 65536)["DKV_SPLIT_T"] == 16384  # the largest in the space
    assert d.get(stem, spec, 3000)["DKV_SPLIT_T"] == 2048  # 1500: the smallest split there is
    assert kd.at_shape(spec, base.replace(DKV_SPLIT_T=0), 16384, 4096)["DKV_SPLIT_T"] == 0
    assert kd.at_shape(spec, base, 16384, 6144)["DKV_SPLIT_T"] == 4096  # 3072: nearer in log2
    assert kd.at_shape(spec, base, 16384, 5790)["DKV_SPLIT_T"] == 2048  # 2895 < 2048 * 2**0.5
    assert KD.at_shape(spec, cfg(), 4096, 65536) == cfg()  # nothing per token in selection_fwd
    from nsa_gen.tuning.space import pruned_space
    from nsa_gen.tuning.tuner import Tuner
    t = Tuner(spec, db=TuningDB(tmp_path), device=H200, runner=lambda r: None, storage="memory",
              torch_device="cpu", progress=False)
    seeds = t.seeds(stem, 4096, 1, pruned_space(stem, spec, H200)[0])
    assert base.replace(DKV_SPLIT_T=2048) in seeds and base not in seeds[:2]


def test_gated_key_falls_back_to_the_ungated_entries(tmp_path, spec, caplog):
    """selection_fwd_gated (the selected kernel storing the gated sum) has its own DB key;
    where it has no entry, selection_fwd's is used, before the heuristic default and with
    no warning; its own entry wins where there is one, also over an ungated exact shape."""
    gated = "selection_fwd_gated"
    assert kernel_def(gated).fallback == STEM and kernel_def(gated).template == KD.template
    put(tmp_path, spec, 65536, cfg(32, 2, 2))
    with caplog.at_level(logging.WARNING, logger="nsa_gen"):
        assert dispatcher(shipped=tmp_path).get(gated, spec, 65536) == cfg(32, 2, 2)
    assert caplog.records == []
    TuningDB(tmp_path).put(TuneKey.make(H200, gated, spec, 16384, 1),
                           Entry(cfg(64, 2, 2), 1.0, 0.1, 10, "2026-01-01"))
    d = dispatcher(shipped=tmp_path)
    assert d.get(gated, spec, 65536) == cfg(64, 2, 2)  # its own, at the nearest shape
    assert d.get(STEM, spec, 65536) == cfg(32, 2, 2)   # the ungated key is untouched
    # Neither key has an entry: the heuristic default, as for selection_fwd.
    empty = dispatcher(shipped=tmp_path / "none")
    assert empty.get(gated, spec, 4096) == empty.get(STEM, spec, 4096) == fitting_default(
        KD, spec, 4096, H200)
