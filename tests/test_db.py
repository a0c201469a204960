"""Tuning DB store: keys, round trips, atomic and concurrent writes, unusable files,
merge/prune/export, and the `db` CLI subcommands. CPU only."""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from nsa_gen import codegen
from nsa_gen.config import Config
from nsa_gen.db import (CPU_DEVICE, SCHEMA, SCHEMA_VERSION, DeviceKey, Entry, TuneKey, TuningDB,
                        current_device_key, kernel_source_hash, shipped_db_dir, spec_fields,
                        spec_from_fields, triton_version)
from nsa_gen.kernels import kernel_def
from nsa_gen.spec import load_spec
from nsa_gen.tuning import commands

H200 = DeviceKey("sm90", 132, 140, "NVIDIA H200")
A10 = DeviceKey("sm86", 72, 22, "NVIDIA A10")
STEM = "selection_fwd"


@pytest.fixture(scope="module")
def spec():
    return load_spec("deepseek-nsa")


def entry(ms=1.0, block_n=64, warps=4, stages=2, date="2026-01-01", trials=10, margin=0.1):
    return Entry(Config.make(BLOCK_N=block_n, num_warps=warps, num_stages=stages), ms, margin,
                 trials, date)


def key(spec, T=4096, B=1, device=H200, **kw):
    return TuneKey.make(device, STEM, spec, T, B, **kw)


# ----------------------------------------------------------------------------- keys

def test_device_key_equality_ignores_name_and_smem():
    assert DeviceKey("sm90", 132, 140, "H200 SXM") == DeviceKey("sm90", 132, 140, "other", 1)
    assert hash(DeviceKey("sm90", 132, 140, "a")) == hash(DeviceKey("sm90", 132, 140, "b"))
    assert DeviceKey("sm90", 132, 140) != DeviceKey("sm90", 114, 140)
    assert H200.id == "sm90-132sm-140gib"
    assert CPU_DEVICE.id == "cpu-interpreter" and CPU_DEVICE.smem_limit is None
    assert H200.smem_limit == 227 * 1024 and A10.smem_limit == 99 * 1024
    assert DeviceKey("sm61", 20, 8).smem_limit == 48 * 1024
    assert DeviceKey("sm90", 132, 140, smem=200_000).smem_limit == 200_000
    assert DeviceKey.from_json(H200.to_json()) == H200


def test_current_device_key_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert current_device_key() == CPU_DEVICE


def test_tune_key_fields(spec):
    k = key(spec)
    assert k.source_hash == kernel_source_hash(STEM) and len(k.source_hash) == 16
    assert k.triton == triton_version()
    assert dict(k.spec)["heads.q"] == 64 and "name" not in dict(k.spec)
    assert dict(k.spec)["branches"] == ("cmp", "slc", "swa")
    # The spec's name is an alias: a renamed spec shares tuning results.
    assert key(spec.replace(name="renamed")) == k
    assert key(spec.replace(dtype="float16")) != k
    assert key(spec, T=8192) != k and key(spec, B=2) != k
    assert spec_fields(spec) == k.spec


@pytest.mark.parametrize("name", ["deepseek-nsa", "fla-compat", "small-group", "mqa"])
def test_spec_from_fields_inverts_spec_fields(name):
    spec = load_spec(name)
    assert spec_from_fields(spec_fields(spec), name) == spec
    k = key(spec)
    assert spec_from_fields(k.spec, k.spec_name) == spec
    assert spec_from_fields(k.spec).name == "tuned"


def test_source_hash_follows_template_text():
    """The hash covers a template's text and what it includes (selection_fwd includes its
    forced pass); a template that includes nothing hashes as its text alone."""
    import hashlib
    root = codegen.template_dir()
    text = (root / f"{STEM}.py.j2").read_bytes()
    forced = (root / "selection_forced.j2").read_bytes()
    assert kernel_source_hash(STEM) == hashlib.sha256(text + b"\0" + forced).hexdigest()[:16]
    gate = (root / "gate_fwd.py.j2").read_bytes()
    assert kernel_source_hash("gate_fwd") == hashlib.sha256(gate).hexdigest()[:16]


def test_shipped_db_dir_is_the_checkout_one():
    d = shipped_db_dir()
    assert d is not None and d == Path(__file__).resolve().parent.parent / "tuning_db"


# ----------------------------------------------------------------------------- round trip

def test_round_trip_and_format(tmp_path, spec):
    db = TuningDB(tmp_path)
    k1, k2 = key(spec), key(spec, T=1024)
    db.put(k1, entry(1.5))
    db.put(k2, entry(0.5, block_n=32, margin=None))
    db.put(key(spec, device=A10), entry(2.0))
    got = db.load()
    assert got == {k1: entry(1.5), k2: entry(0.5, block_n=32, margin=None),
                   key(spec, device=A10): entry(2.0)}
    assert db.get(k1) == entry(1.5)
    assert [p.relative_to(tmp_path).as_posix() for p in db.files()] == [
        f"sm86-72sm-22gib/{STEM}.json", f"sm90-132sm-140gib/{STEM}.json"]
    data = json.loads(db.path_for(H200, STEM).read_text())
    assert data["schema"] == SCHEMA and data["version"] == SCHEMA_VERSION
    assert data["kernel"] == STEM and data["device"]["name"] == "NVIDIA H200"
    first = data["entries"][0]
    assert first["shape"] == {"T": 1024, "B": 1}  # sorted by shape
    assert first["spec_name"] == "deepseek-nsa" and first["spec"]["head_dim.k"] == 192
    assert first["config"] == {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    assert set(first) >= {"triton", "source_hash", "ms", "margin", "trials", "date"}
    # Filters by kernel and device.
    assert set(db.load(STEM, A10)) == {key(spec, device=A10)}
    assert db.load("no_such_kernel") == {}


def test_put_replaces_same_key(tmp_path, spec):
    db = TuningDB(tmp_path)
    db.put(key(spec), entry(2.0))
    db.put(key(spec), entry(1.0, block_n=16))
    assert db.load() == {key(spec): entry(1.0, block_n=16)}
    assert len(json.loads(db.path_for(H200, STEM).read_text())["entries"]) == 1


def test_missing_root_is_empty(tmp_path):
    assert TuningDB(tmp_path / "nope").load() == {}


# ----------------------------------------------------------------------------- atomicity

def test_failed_write_leaves_old_file(tmp_path, spec, monkeypatch):
    db = TuningDB(tmp_path)
    db.put(key(spec), entry(1.0))
    path = db.path_for(H200, STEM)
    before = path.read_text()

    def boom(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        db.put(key(spec, T=1024), entry(3.0))
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def _writer(root: str, wid: int, n: int) -> None:
    spec = load_spec("deepseek-nsa")
    db = TuningDB(root)
    for i in range(n):
        db.put(TuneKey.make(H200, STEM, spec, 1 + wid * 1000 + i), entry(float(i + 1)))


def _reader(root: str, n: int, q) -> None:
    path = TuningDB(root).path_for(H200, STEM)
    bad = 0
    for _ in range(n):
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        try:
            json.loads(text)
        except json.JSONDecodeError:
            bad += 1
    q.put(bad)


def test_concurrent_writers_keep_every_entry(tmp_path, spec):
    ctx = mp.get_context("fork")
    workers, per = 4, 12
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, per)) for w in range(workers)]
    procs.append(ctx.Process(target=_reader, args=(str(tmp_path), 300, q)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert q.get(timeout=5) == 0  # readers never saw a partial file
    path = TuningDB(tmp_path).path_for(H200, STEM)
    data = json.loads(path.read_text())
    assert len(data["entries"]) == workers * per
    got = TuningDB(tmp_path).load()
    assert {k.T for k in got} == {1 + w * 1000 + i for w in range(workers) for i in range(per)}


# ----------------------------------------------------------------------------- unusable files

def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, why", [
    ("{not json", "not valid JSON"),
    ("\x00\x01garbage", "not valid JSON"),
    (json.dumps({"hello": "world"}), "not an nsa-gen tuning DB file"),
    (json.dumps([1, 2, 3]), "not an nsa-gen tuning DB file"),
    (json.dumps({"schema": SCHEMA, "version": 99, "entries": []}), "schema version 99"),
    (json.dumps({"schema": SCHEMA, "version": 1, "kernel": STEM, "entries": []}), "malformed header"),
])
def test_unusable_file_warns_and_is_skipped(tmp_path, spec, caplog, text, why):
    db = TuningDB(tmp_path)
    db.put(key(spec, device=A10), entry(1.0))
    bad = _write(db.path_for(H200, STEM), text)
    with caplog.at_level(logging.WARNING, logger="nsa_gen"):
        got = db.load()
    assert got == {key(spec, device=A10): entry(1.0)}
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and str(bad) in msgs[0] and why in msgs[0]


def test_unreadable_bytes_warn(tmp_path, caplog):
    bad = tmp_path / "sm90-1sm-1gib" / f"{STEM}.json"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xfe\xfa")
    with caplog.at_level(logging.WARNING, logger="nsa_gen"):
        assert TuningDB(tmp_path).load() == {}
    assert str(bad) in caplog.text


def test_bad_entry_is_skipped_alone(tmp_path, spec, caplog):
    db = TuningDB(tmp_path)
    db.put(key(spec), entry(1.0))
    path = db.path_for(H200, STEM)
    data = json.loads(path.read_text())
    good = data["entries"][0]
    data["entries"] += [{"spec": {}}, dict(good, ms="fast"), dict(good, shape={"T": -1}), 7]
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="nsa_gen"):
        assert db.load() == {key(spec): entry(1.0)}
    assert sum(str(path) in r.getMessage() for r in caplog.records) == 4


def test_write_over_unusable_file_keeps_it_aside(tmp_path, spec, caplog):
    db = TuningDB(tmp_path)
    path = _write(db.path_for(H200, STEM), json.dumps({"schema": SCHEMA, "version": 7}))
    with caplog.at_level(logging.WARNING, logger="nsa_gen"):
        db.put(key(spec), entry(1.0))
    assert db.load() == {key(spec): entry(1.0)}
    aside = [p for p in path.parent.iterdir() if ".unreadable-" in p.name]
    assert len(aside) == 1 and json.loads(aside[0].read_text())["version"] == 7
    assert str(path) in caplog.text


# ----------------------------------------------------------------------------- merge, prune, export

def test_merge_policies(tmp_path, spec):
    a, b = TuningDB(tmp_path / "a"), TuningDB(tmp_path / "b")
    k, only_b = key(spec), key(spec, T=1024)
    a.put(k, entry(1.0, date="2026-02-01"))
    b.put(k, entry(2.0, block_n=32, date="2026-01-01"))
    b.put(only_b, entry(3.0))
    assert a.merge(b, prefer="newer") == 1  # only the new key
    assert a.get(k).ms == 1.0 and a.get(only_b).ms == 3.0
    assert a.merge(b, prefer="faster") == 0
    assert a.merge(b, prefer="theirs") == 1 and a.get(k).ms == 2.0
    with pytest.raises(ValueError):
        a.merge(b, prefer="sideways")


def test_prune(tmp_path, spec):
    db = TuningDB(tmp_path)
    fresh = key(spec)
    stale = key(spec, T=1024, source_hash="0" * 16)
    old_triton = key(spec, T=2048, triton="2.0.0")
    other_dev = key(spec, device=A10)
    db.put_many([(fresh, entry(1.0, date=Entry.today())), (stale, entry(1.0)),
                 (old_triton, entry(1.0, date="2000-01-01")), (other_dev, entry(1.0, date=Entry.today()))])
    # Unknown kernels are stale too.
    db.put(TuneKey(H200, "gone_kernel", "3.6.0", "f" * 16, fresh.spec, 1), entry(1.0))
    assert set(db.prune(dry_run=True)) == {stale, TuneKey(H200, "gone_kernel", "3.6.0", "f" * 16, fresh.spec, 1)}
    assert len(db.load()) == 5
    assert len(db.prune()) == 2 and set(db.load()) == {fresh, old_triton, other_dev}
    assert db.prune(stale=False, other_triton=True) == [old_triton]
    db.put(old_triton, entry(1.0, date="2000-01-01"))
    assert db.prune(stale=False, older_than_days=30) == [old_triton]
    assert db.prune(stale=False, device_id=A10.id) == [other_dev]
    assert set(db.load()) == {fresh}


def test_export(tmp_path, spec):
    db = TuningDB(tmp_path / "src")
    db.put_many([(key(spec), entry(1.0)), (key(spec, device=A10), entry(2.0)),
                 (key(spec, T=64, source_hash="0" * 16), entry(3.0))])
    assert db.export(tmp_path / "out", device_id=H200.id, fresh_only=True) == 1
    assert set(TuningDB(tmp_path / "out").load()) == {key(spec)}
    assert db.export(tmp_path / "all") == 3


# ----------------------------------------------------------------------------- CLI

def _cli(argv):
    p = argparse.ArgumentParser(prog="nsa-gen")
    commands.register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_db_cli(tmp_path, spec, capsys, monkeypatch):
    monkeypatch.delenv("NSA_GEN_DB", raising=False)
    src, dst = tmp_path / "src", tmp_path / "dst"
    TuningDB(src).put_many([(key(spec), entry(1.25)), (key(spec, T=64, source_hash="0" * 16), entry(3.0))])
    assert _cli(["db", "show", "--db", str(src)]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and "deepseek-nsa" in out and "1.25 ms" in out and "[stale]" in out
    assert _cli(["db", "merge", str(src), "--into", str(dst)]) == 0
    assert len(TuningDB(dst).load()) == 2
    assert _cli(["db", "prune", "--db", str(dst), "--dry-run"]) == 0
    assert "would remove 1" in capsys.readouterr().out and len(TuningDB(dst).load()) == 2
    assert _cli(["db", "prune", "--db", str(dst)]) == 0
    assert set(TuningDB(dst).load()) == {key(spec)}
    assert _cli(["db", "export", str(tmp_path / "exp"), "--db", str(src)]) == 0
    assert set(TuningDB(tmp_path / "exp").load()) == {key(spec)}
    assert _cli(["db", "prune", "--db", str(src), "--all", "--kernel", STEM]) == 0
    assert TuningDB(src).load() == {}
    # NSA_GEN_DB is the default DB of the db subcommands.
    monkeypatch.setenv("NSA_GEN_DB", str(dst))
    capsys.readouterr()
    assert _cli(["db", "show"]) == 0
    assert f"{dst}: 1 entries" in capsys.readouterr().out


def test_rekey_keeps_only_entries_whose_code_is_unchanged(tmp_path, spec):
    """benchmarks/rekey.py moves an entry to the current source hash (adding new params) only
    when the old template renders the config to exactly the current code."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    old = tmp_path / "old" / "selection_fwd.py.j2"
    old.parent.mkdir()
    text = (root / "templates" / "selection_fwd.py.j2").read_text()
    old.write_text(text)
    db = TuningDB(tmp_path / "db")
    stale = TuneKey.make(H200, STEM, spec, 4096, source_hash="0" * 16)
    db.put(stale, Entry(Config.make(BLOCK_N=64, num_warps=4, num_stages=2), 1.0, 0.1, 5, "2026-01-01"))
    cmd = [sys.executable, str(root / "benchmarks" / "rekey.py"), STEM, str(old), "BLOCK_Q=0", "TMA=0", "SHARE=1", "FORCED=0",
           "--db", str(tmp_path / "db")]
    # A template whose group-centric code differs: nothing moves.
    old.write_text(text.replace("One flat loop over", "A flat loop over"))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "code differs" in r.stdout, r.stdout + r.stderr
    assert [k.source_hash for k in TuningDB(tmp_path / "db").load()] == ["0" * 16]
    old.write_text(text)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "1 entries re-keyed" in r.stdout, r.stdout + r.stderr
    (k, e), = TuningDB(tmp_path / "db").load().items()
    assert k.source_hash == kernel_source_hash(STEM) and e.config["BLOCK_Q"] == 0


def test_rekey_added_only_takes_new_top_level_code_only(tmp_path):
    """rekey.py --added-only re-keys an entry whose old code is all in the new render, in
    order, with only whole top-level definitions added (a new kernel beside the tuned ones);
    without the flag, or where a line went into an old function, the entry stays."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    text = (root / "templates" / "selection_fwd.py.j2").read_text()

    def without_scan(t):  # the template with its scan kernel cut out
        start = t.index("@triton.jit\ndef nsa_selection_fwd_scan_kernel")
        return t[:start] + t[t.index("@triton.jit", start + 1):]
    old = tmp_path / "old" / "selection_fwd.py.j2"
    old.parent.mkdir()
    for name in ("selection_forced.j2",):  # what the template includes
        (old.parent / name).write_text((root / "templates" / name).read_text())
    sg = load_spec("small-group")
    cfg = Config.make(BLOCK_N=64, BLOCK_Q=16, FORCED=64, SHARE=1, TMA=1, num_warps=4, num_stages=2)
    db = TuningDB(tmp_path / "db")
    db.put(TuneKey.make(H200, STEM, sg, 65536, source_hash="0" * 16), Entry(cfg, 1.0, 0.1, 5, "2026-01-01"))
    cmd = [sys.executable, str(root / "benchmarks" / "rekey.py"), STEM, str(old), "--db", str(db.root)]

    def run(*flags):
        r = subprocess.run(cmd + list(flags), capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout, [k.source_hash for k in db.load()]

    # The old template without the scan kernel: the current one adds a top-level definition.
    old.write_text(without_scan(text))
    out, hashes = run()
    assert "code differs" in out and hashes == ["0" * 16]
    # A line the new code adds inside an old kernel is not taken, flag or not.
    inside = text.replace("    i_seg = tl.program_id(0)\n", "", 1)
    assert inside != text
    old.write_text(without_scan(inside))
    out, hashes = run("--added-only")
    assert "code differs" in out and hashes == ["0" * 16]
    old.write_text(without_scan(text))
    out, hashes = run("--added-only")
    assert "1 entries re-keyed" in out and hashes == [kernel_source_hash(STEM)]


def test_rekey_from_adopts_checked_entries(tmp_path, spec):
    """rekey.py --from SRC copies SRC's entries measured on the old template (its hash) whose
    code is unchanged, and those measured on the current one; nothing else."""
    import hashlib
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    old = tmp_path / "old" / "selection_fwd.py.j2"
    old.parent.mkdir()
    old.write_text((root / "templates" / "selection_fwd.py.j2").read_text())
    old_hash = hashlib.sha256(old.read_bytes()).hexdigest()[:16]
    src, dst = TuningDB(tmp_path / "src"), TuningDB(tmp_path / "dst")
    cfg = kernel_def(STEM).default(spec, 4096)
    dst.put(TuneKey.make(H200, STEM, spec, 4096), Entry(cfg, 2.0, 0.1, 5, "2026-01-01"))
    tuned = {"BLOCK_N": 32, "BLOCK_Q": 0, "num_warps": 4, "num_stages": 2}  # before TMA and SHARE
    src.put(TuneKey.make(H200, STEM, spec, 4096, source_hash=old_hash),
            Entry(Config.from_dict(tuned), 1.0, 0.1, 5, "2026-01-02"))
    src.put(TuneKey.make(H200, STEM, spec, 8192, source_hash="f" * 16),  # another template
            Entry(cfg, 1.0, 0.1, 5, "2026-01-02"))
    src.put(TuneKey.make(H200, STEM, spec, 16384), Entry(cfg, 3.0, 0.1, 5, "2026-01-02"))
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "rekey.py"), STEM, str(old),
                        "TMA=0", "SHARE=1", "FORCED=0", "--db", str(dst.root), "--from", str(src.root)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "2 entries of selection_fwd copied" in r.stdout, r.stdout + r.stderr
    got = {k.T: (k.source_hash, e) for k, e in dst.load().items()}
    assert sorted(got) == [4096, 16384]
    assert all(h == kernel_source_hash(STEM) for h, _ in got.values())
    assert got[4096][1].config == Config.from_dict(dict(tuned, TMA=0, SHARE=1, FORCED=0)) and got[4096][1].ms == 1.0


def test_shipped_db_has_no_stale_entry():
    """Every shipped entry was measured on its kernel's current template: a template change
    leaves the dispatcher on heuristic defaults for that kernel (as session 38's did for
    selection_fwd, unnoticed for two benchmark runs) until its entries are re-keyed
    (`benchmarks/rekey.py`), retuned or pruned."""
    from nsa_gen.db.store import is_current
    stale = [k.describe() for k in TuningDB(shipped_db_dir()).load() if not is_current(k)]
    assert not stale, f"{len(stale)} stale shipped entries, e.g. {stale[:3]}"
