"""A real (non-editable) install: the wheel carries the templates, the shipped tuning DB and
the built-in specs, and its `nsa-gen` entry point runs outside the checkout."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# One wheel build per run: under pytest-xdist both tests go to one worker, so two builds never
# share the checkout's build/ folder at once.
pytestmark = pytest.mark.xdist_group("packaging")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w",
                        str(out)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"wheel build failed: {r.stderr[-2000:]}")
    return next(out.glob("nsa_gen-*.whl"))


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for t in (ROOT / "templates").glob("*.j2"):
        assert f"nsa_gen/templates/{t.name}" in names
    for db in (ROOT / "tuning_db").rglob("*.json"):
        assert f"nsa_gen/tuning_db/{db.relative_to(ROOT / 'tuning_db').as_posix()}" in names
    for s in ("deepseek-nsa", "fla-compat", "small-group", "mqa"):
        assert f"nsa_gen/specs/{s}.yaml" in names
    assert not any(n.endswith(".lock") for n in names)
    ep = next(n for n in names if n.endswith("entry_points.txt"))
    assert "nsa-gen = nsa_gen.cli:main" in zipfile.ZipFile(wheel).read(ep).decode()


def test_installed_package_runs_outside_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, timeout=300)
    code = ("import sys, nsa_gen, nsa_gen.codegen as c, nsa_gen.db as d; "
            "from nsa_gen.cli import main; "
            "assert str(c.template_dir()).startswith(sys.argv[1]), c.template_dir(); "
            "assert str(d.shipped_db_dir()).startswith(sys.argv[1]), d.shipped_db_dir(); "
            "sys.exit(main(['generate', 'small-group', '-o', sys.argv[2]]))")
    env = dict(os.environ, PYTHONPATH=str(site))
    r = subprocess.run([sys.executable, "-c", code, str(site), str(tmp_path / "gen")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "gen" / "selection_fwd.py").exists()
