"""Every shipped config parses through the real CLI from a directory outside the repository, and every file it
names exists inside the repository or the package (never a workspace folder a user's clone does not have)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import prism_lightning
from prism_lightning.cli import PrismArgumentParser, PrismCLI, PrismTrainer
from prism_lightning.evaluation.benchmarks import BUILTIN_PREFIX, resolve
from prism_lightning.training.datamodule import BootstrapDataModule
from prism_lightning.training.modules.prism import PrismModule

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(prism_lightning.__file__).resolve().parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


class ParseOnly(PrismCLI):
    """The real CLI up to the point where classes would be built: parse, resolve input paths, stop."""

    def instantiate_classes(self) -> None:
        """Nothing is built."""

    def _run_subcommand(self, subcommand: str) -> None:
        """Nothing runs."""


def command_for(config: Path) -> list[str]:
    """How the config is meant to be used: overlays go on top of the quickstart (as their headers say)."""
    group = config.parent.name
    if group == "strategy":
        return ["fit", "--config", str(QUICKSTART), "--config", str(config)]
    if group == "benchmark":
        return ["test", "--config", str(QUICKSTART), "--config", str(config)]
    if group == "study":
        return ["study", "--config", str(QUICKSTART), "--config", str(config)]
    if group == "labels":
        return ["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(config)]
    return ["fit", "--config", str(config)]


def named_files(args: list[str]) -> list[str]:
    """Parse like `prism` (from the current directory) and list every input file the config names."""
    cli = ParseOnly(PrismModule, BootstrapDataModule, trainer_class=PrismTrainer, subclass_mode_model=True,
                    args=args, parser_class=PrismArgumentParser, parser_kwargs={"exit_on_error": False})
    files = list(cli.input_files)
    stack = [cli.config]
    while stack:  # shipped benchmark names are files too
        value = stack.pop()
        items = vars(value).values() if hasattr(value, "__dict__") else value.values() if isinstance(value, dict) \
            else value if isinstance(value, list) else ()
        for item in items:
            if isinstance(item, str) and item.startswith(BUILTIN_PREFIX):
                files.append(str(resolve(item)))
            else:
                stack.append(item)
    return files


def problems(files: list[str]) -> list[str]:
    """Files that are missing, or lie outside both the repository and the installed package."""
    out = []
    for name in files:
        path = Path(name).resolve()
        if not path.exists():
            out.append(f"{name}: missing")
        elif not (path.is_relative_to(ROOT) or path.is_relative_to(PACKAGE)):
            out.append(f"{name}: outside the repository")
    return out


CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_shipped_config_parses_from_elsewhere_and_names_only_files_it_ships(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = named_files(command_for(config))
    assert problems(files) == []
    text = config.read_text(encoding="utf-8")
    assert "../" not in text and "/work/" not in text and "shared/benchmarks" not in text


def test_the_contexts_config_names_its_files_relative_to_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = named_files(command_for(ROOT / "configs" / "contexts" / "memory.yaml"))
    assert sorted(Path(f).name for f in files) == ["memory.txt", "probes.jsonl"]
    assert all(Path(f).is_relative_to(ROOT / "configs" / "contexts" / "memory") for f in files)


def test_a_config_naming_a_file_outside_the_repository_is_caught(tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere" / "mt.jsonl"
    outside.parent.mkdir()
    outside.write_text("{}\n")
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  benchmark:\n    mt_bench: elsewhere/mt.jsonl\n")
    monkeypatch.chdir(ROOT)  # a path in a config is relative to the config, not to the working directory
    files = named_files(["test", "--config", str(QUICKSTART), "--config", str(config)])
    assert files == [str(outside)]
    assert problems(files) == [f"{outside}: outside the repository"]


def test_a_config_naming_a_missing_file_fails_to_parse_naming_the_key(tmp_path, monkeypatch):
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  benchmark:\n    harmbench: nowhere.csv\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match=r"(?s)data.benchmark.harmbench.*File does not exist: '" +
                       str(tmp_path / "nowhere.csv")):
        named_files(["test", "--config", str(QUICKSTART), "--config", str(config)])


def test_a_path_on_the_command_line_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "mine.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    files = named_files(["test", "--config", str(QUICKSTART), "--data.benchmark.mt_bench", "mine.jsonl"])
    assert files == [str(tmp_path / "mine.jsonl")]
    assert os.path.isabs(files[0])
