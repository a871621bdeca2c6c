"""The layout as rules: import-linter contracts, an inference path free of the training stack, old import paths
forwarded with a warning, small files."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from prism_lightning.deprecated_paths import MOVED, PrismDeprecationWarning

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_import_contracts_hold():
    out = subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml")], capture_output=True,
                         text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "5 kept, 0 broken" in out.stdout


def test_gated_model_imports_without_lightning_or_deepspeed():
    code = ("import sys; from prism_lightning import GatedModel; GatedModel.from_pretrained; "
            "import prism_lightning.inference.export, prism_lightning.serving.app, prism_lightning.serving.server; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'deepspeed', "
            "'lightning_fabric'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("old,name", [("modules", "PrismModule"), ("callbacks.gate_calibration", "GateCalibration"),
                                      ("callbacks.run_checkpoint", "RunCheckpoint"),
                                      ("strategies", "PrismDeepSpeedStrategy"), ("routing", "GatedModel")])
def test_old_import_paths_forward_to_the_same_objects_with_a_warning(old, name):
    import importlib

    new = importlib.import_module(f"prism_lightning.{MOVED[old]}")
    sys.modules.pop(f"prism_lightning.{old}", None)
    with pytest.warns(PrismDeprecationWarning, match=f"prism_lightning.{old} moved to prism_lightning.{MOVED[old]}"):
        module = importlib.import_module(f"prism_lightning.{old}")
    assert getattr(module, name) is getattr(new, name)


def test_every_old_path_resolves():
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrismDeprecationWarning)
        for old, new in MOVED.items():
            module = importlib.import_module(f"prism_lightning.{old}")
            target = importlib.import_module(f"prism_lightning.{new}")
            # a package's submodules are attributes too: under the old path they are the forwarding modules
            public = [n for n in dir(target) if not n.startswith("_") and not isinstance(getattr(target, n),
                                                                                         type(sys))]
            assert all(getattr(module, n) is getattr(target, n) for n in public), old


def test_checkpoint_pickled_under_old_class_paths_loads(tmp_path):
    from prism_lightning.cli import load_checkpoint
    from prism_lightning.model.lora import LoraSettings

    settings = LoraSettings(rank=4)
    path = tmp_path / "old.ckpt"
    LoraSettings.__module__ = "prism_lightning.modules.student"  # as the flat layout pickled it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrismDeprecationWarning)
            torch.save({"hyper_parameters": {"lora": settings}}, path)
    finally:
        LoraSettings.__module__ = "prism_lightning.model.lora"
    assert b"prism_lightning.modules.student" in path.read_bytes()
    assert load_checkpoint(path)["hyper_parameters"]["lora"] == settings


def test_shipped_configs_and_docs_use_the_new_paths():
    old_paths = {f"prism_lightning.{old}" for old in MOVED}
    files = [*(ROOT / "configs").rglob("*.yaml"), ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    for file in files:
        # the README's sentence on the deprecation names the old paths on purpose
        text = "\n".join(line for line in file.read_text(encoding="utf-8").splitlines()
                         if "before this layout" not in line and "still work in YAML until 0.3" not in line)
        for old in old_paths:
            for hit in (i for i in range(len(text)) if text.startswith(old, i)):
                following = text[hit + len(old):hit + len(old) + 1]
                assert not (following == "" or following in ".` \n:,)'\""), f"{file}: names {old}"


def test_modules_stay_small():
    sizes = {p.relative_to(ROOT): len(p.read_text(encoding="utf-8").splitlines())
             for p in (ROOT / "prism_lightning").rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 400} == {}
    flat = sorted(p.name for p in (ROOT / "prism_lightning").glob("*.py"))
    assert flat == ["__init__.py", "cli.py", "deprecated_paths.py"], flat


def test_old_class_paths_in_yaml_still_parse_through_the_cli(tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text("model:\n  class_path: prism_lightning.modules.PrismModule\n"
                      "trainer:\n  callbacks:\n"
                      "    - class_path: prism_lightning.callbacks.gate_calibration.GateCalibration\n")
    out = subprocess.run([sys.executable, "-m", "prism_lightning.cli", "fit", "--config",
                          str(ROOT / "configs" / "quickstart.yaml"), "--config", str(config), "--print_config"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "prism_lightning.modules moved to prism_lightning.training.modules" in out.stderr
    assert "prism_lightning.callbacks moved to prism_lightning.training.callbacks" in out.stderr


def test_readme_adding_a_persona_parses_through_the_cli(tmp_path):
    import re

    import yaml

    from prism_lightning.contexts.personas import PersonaConfig, PersonaRegistry

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Adding a persona"):]
    block = re.search(r"```yaml\n# my_domains.yaml\n(.*?)```", section, flags=re.S).group(1)
    command = re.search(r"```bash\n(prism fit [^\n]+)\n```", section).group(1)
    (tmp_path / "my_domains.yaml").write_text(block)
    argv = [str(ROOT / a) if a.startswith("configs/") else a for a in shlex.split(command)[1:]]
    out = subprocess.run([sys.executable, "-m", "prism_lightning.cli", *argv, "--print_config"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    personas = yaml.safe_load(out.stdout)["data"]["personas"]
    assert personas["domains"] == "my_domains.yaml" and personas["names"] == ["law", "math"]
    registry = PersonaRegistry.from_config(PersonaConfig(names=personas["names"],
                                                         domains=str(tmp_path / personas["domains"])))
    assert registry["law"].text.startswith("You are a careful lawyer, and for you precision matters")


@pytest.mark.slow
def test_a_first_load_of_the_embedded_model_does_not_import_deepspeed(tmp_path):
    """DeepSpeed loads only with a DeepSpeed strategy: the GGUF conversion writes safetensors itself because
    transformers' save_pretrained imports DeepSpeed whenever it is installed."""
    code = ("import sys; from prism_lightning.model.backbone import BackboneConfig, load_backbone; "
            "b = load_backbone(BackboneConfig()); print(b.fingerprint, 'deepspeed' in sys.modules)")
    for attempt in ("converts", "reads the cache"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PRISM_CACHE_DIR": str(tmp_path)})
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.split()[-2:] == ["dfd92e7e2ca53a67", "False"], (attempt, out.stdout)
