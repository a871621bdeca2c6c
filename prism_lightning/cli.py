"""The ``prism`` command: LightningCLI with ``bootstrap`` and ``export`` added to fit/validate/test/predict."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI
from rich.console import Console
from rich.table import Table

from prism_lightning.bootstrap.corpus import check_both_classes
from prism_lightning.data import BootstrapDataModule
from prism_lightning.errors import PrismError
from prism_lightning.modules.prism import PrismModule
from prism_lightning.summary import print_corpus_summary


class PrismTrainer(L.Trainer):
    """Lightning's Trainer plus the PRISM subcommands that are not training loops."""

    def bootstrap(self, model: Optional[L.LightningModule] = None,
                  datamodule: Optional[BootstrapDataModule] = None) -> None:
        """Run PRISM stages 1–3 (queries, dual answers, self-verification) and print the corpus summary."""
        corpus = datamodule.build_corpus(self.default_root_dir)
        print_corpus_summary(corpus)
        check_both_classes(corpus, datamodule.judge_config)

    def export(self, model: Optional[L.LightningModule] = None, datamodule: Optional[BootstrapDataModule] = None,
               ckpt_path: str = "last", export_dir: Optional[str] = None) -> None:
        """Write the deployable artifact from a checkpoint (``last``, ``best`` or a path).

        Args:
            ckpt_path: checkpoint to export: ``last``, ``best`` or a file.
            export_dir: where to write; default ``<default_root_dir>/export``.
        """
        path = resolve_checkpoint(self.default_root_dir, ckpt_path)
        model.configure_model()
        checkpoint = load_checkpoint(path)
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=False)
        out = model.export(Path(export_dir or Path(self.default_root_dir) / "export"))
        Console().print(f"exported {path} -> {out}")


def load_checkpoint(path: Path) -> dict:
    """``torch.load`` with ``weights_only=True``; our config dataclasses are the only extra types allowed."""
    import torch

    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.generation import DecodingConfig
    from prism_lightning.modules.student import LoraSettings

    with torch.serialization.safe_globals([BackboneConfig, LoraSettings, DecodingConfig]):
        return torch.load(path, map_location="cpu", weights_only=True)


def resolve_checkpoint(root: str, ckpt_path: str) -> Path:
    """Map ``last``/``best`` to files under ``<root>/checkpoints``; fail naming the path when absent."""
    directory = Path(root) / "checkpoints"
    if ckpt_path in ("last", "best"):
        candidates = sorted(directory.glob("last*.ckpt" if ckpt_path == "last" else "epoch=*.ckpt"),
                            key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise PrismError(f"no {ckpt_path} checkpoint under {directory}; run `prism fit` first")
        return candidates[-1]
    if not Path(ckpt_path).is_file():
        raise PrismError(f"ckpt_path: checkpoint not found: {ckpt_path}")
    return Path(ckpt_path)


class PrismCLI(LightningCLI):
    """`prism fit | validate | test | predict | bootstrap | export`, all from one YAML."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands plus bootstrap and export."""
        commands = dict(LightningCLI.subcommands())
        commands["bootstrap"] = {"model", "datamodule"}
        commands["export"] = {"model", "datamodule"}
        return commands

    def add_arguments_to_parser(self, parser) -> None:
        """One backbone and placement for data and model: defined under ``data``, linked to ``model``."""
        parser.link_arguments("data.backbone", "model.init_args.backbone", apply_on="parse")
        parser.link_arguments("data.placement", "model.init_args.placement", apply_on="parse")

    def before_predict(self) -> None:
        """Write predictions to JSONL unless the user configured a writer."""
        from lightning.pytorch.callbacks import BasePredictionWriter

        from prism_lightning.callbacks.prediction_writer import PredictionWriter

        if not any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())

    def after_fit(self) -> None:
        """Export the trained adapter and gate, and show the held-out metrics."""
        if not self.trainer.is_global_zero:
            return
        out = self.model.export(Path(self.trainer.default_root_dir) / "export")
        shown = ("val/", "disc/", "calibration/", "routing/")
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(shown)}
        table = Table(title="held-out validation (last epoch)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in sorted(metrics):
            table.add_row(key, f"{metrics[key]:.4f}")
        console = Console()
        console.print(table)
        console.print(f"export: {out}  (load with prism_lightning.GatedModel.from_pretrained)")


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``prism`` console script."""
    try:
        PrismCLI(PrismModule, BootstrapDataModule, trainer_class=PrismTrainer, subclass_mode_model=True,
                 save_config_kwargs={"overwrite": True}, args=args, auto_configure_optimizers=False)
    except (PrismError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
