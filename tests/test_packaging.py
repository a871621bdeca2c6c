"""The wheel: built from a copy of the source, installed into a fresh virtual environment, used from outside."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("prism_lightning", "prism_lightning.bootstrap", "prism_lightning.training.modules",
               "prism_lightning.evaluation", "prism_lightning.training.callbacks")


def source_packages() -> list[str]:
    """Every directory with an ``__init__.py`` under prism_lightning/, as a dotted name."""
    return sorted(".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "prism_lightning").rglob("__init__.py"))


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    """A venv holding only the built wheel; the test venv's site-packages supplies the dependencies (a path
    in a .pth file, so that directory's own .pth hooks, e.g. the editable install's finder, are not run)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                             "__pycache__", "lightning_logs", ".pytest_cache"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(work / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = next((work / "dist").glob("prism_lightning-*.whl"))
    env = work / "env"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return env


def test_wheel_imports_every_subpackage_and_runs_the_cli(wheel_env, tmp_path):
    python = wheel_env / "bin" / "python"
    code = ("import importlib, json, pathlib, pkgutil, prism_lightning\n"
            "names = [m.name for m in pkgutil.walk_packages(prism_lightning.__path__, 'prism_lightning.')]\n"
            "for n in names: importlib.import_module(n)\n"
            "root = pathlib.Path(prism_lightning.__file__).parent\n"
            "data = sorted(p.name for p in (root / 'model' / 'templates').glob('*.jinja'))\n"
            "domains = sorted(p.name for p in (root / 'contexts' / 'data').glob('*.yaml'))\n"
            "benchmarks = sorted(p.name for p in (root / 'evaluation' / 'data').rglob('*') if p.is_file())\n"
            "tasks = sorted(p.name for p in (root / 'harness' / 'tasks').glob('*.*'))\n"
            "print(json.dumps({'file': prism_lightning.__file__, 'modules': names, 'templates': data,\n"
            "                  'domains': domains, 'benchmarks': benchmarks, 'tasks': tasks}))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert str(wheel_env) in result["file"], "imported the source tree, not the installed wheel"
    expected = {f"{p}.{m.stem}" for p in source_packages()
                for m in (ROOT / Path(*p.split("."))).glob("*.py") if m.stem != "__init__"}
    assert set(SUBPACKAGES) <= set(source_packages()) <= set(result["modules"]) | {"prism_lightning"}
    assert expected <= set(result["modules"]), expected - set(result["modules"])
    assert result["templates"] == sorted(p.name for p in (ROOT / "prism_lightning" / "model" / "templates").glob("*.jinja"))
    assert result["templates"], "package data (chat templates) missing from the wheel"
    assert result["domains"] == ["domains.yaml"], "package data (persona domains) missing from the wheel"
    assert result["tasks"] == sorted(p.name for p in (ROOT / "prism_lightning" / "harness" / "tasks").glob("*.*")), \
        "lm-eval task files missing from the wheel"
    shipped = sorted(p.name for p in (ROOT / "prism_lightning" / "evaluation" / "data").rglob("*") if p.is_file())
    # 3 benchmarks + refusal strings, their README, 4 licence texts
    assert result["benchmarks"] == shipped and len(shipped) == 9, "benchmark files or licences missing from the wheel"
    help_out = subprocess.run([str(wheel_env / "bin" / "prism"), "--help"], capture_output=True, text=True,
                              cwd=tmp_path, timeout=600)
    assert help_out.returncode == 0, help_out.stderr[-3000:]
    for command in ("fit", "validate", "test", "predict", "bootstrap", "export", "prism serve", "prism lm-eval"):
        assert command in " ".join(help_out.stdout.split())
