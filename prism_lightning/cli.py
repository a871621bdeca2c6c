"""The ``prism`` command: LightningCLI with ``bootstrap`` and ``export`` added to fit/validate/test/predict."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import NoReturn, Optional

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.table import Table

from prism_lightning.bootstrap.corpus import check_both_classes
from prism_lightning.distributed import slurm
from prism_lightning.distributed.launch import process_group
from prism_lightning.distributed.sharding import Shard
from prism_lightning.distributed.strategies import (  # importing registers them
    check_command,
    check_strategy,
    stop_other_ranks,
)
from prism_lightning.distributed.zero_checkpoint import (
    checkpoint_for_run,
    is_deepspeed_checkpoint,
    load_zero_checkpoint,
    read_client_state,
)
from prism_lightning.model.adapters import adapter_names
from prism_lightning.model.backbone import BackboneConfig
from prism_lightning.model.generation import DecodingConfig
from prism_lightning.model.lora import LoraSettings
from prism_lightning.harness.command import lm_eval_command
from prism_lightning.serving.command import serve_command
from prism_lightning.study.config import StudyConfig
from prism_lightning.study.runner import StudyRun, print_plan
from prism_lightning.training.callbacks.prediction_writer import PredictionWriter
from prism_lightning.training.datamodule import BootstrapDataModule
from prism_lightning.training.gate_verdict import gate_verdict
from prism_lightning.training.modules.prism import PrismModule
from prism_lightning.training.summary import (
    adapter_choice_line,
    distillation_line,
    print_corpus_lines,
    print_corpus_summary,
)
from prism_lightning.utils.config_errors import check_config_files, one_line
from prism_lightning.utils.errors import PrismError
from prism_lightning.utils.notices import quiet_third_party_notices
from prism_lightning.utils.paths import absolute_paths
from prism_lightning.utils.progress import announce


class PrismTrainer(L.Trainer):
    """Lightning's Trainer plus the PRISM subcommands that are not training loops."""

    def bootstrap(self, model: Optional[L.LightningModule] = None,
                  datamodule: Optional[BootstrapDataModule] = None) -> None:
        """Run PRISM stages 1–3 (queries, dual answers, self-verification) and print the corpus summary.

        Under torchrun or srun every process joins one process group and takes its share of each stage; rank 0
        merges the shards and prints the summary.
        """
        with process_group():
            corpus = datamodule.build_corpus(self.default_root_dir)
            if Shard.current().rank == 0:
                print_corpus_summary(corpus)
            check_both_classes(corpus, datamodule.judge_config)

    def study(self, model: Optional[L.LightningModule] = None, datamodule: Optional[BootstrapDataModule] = None,
              study: StudyConfig = StudyConfig()) -> None:
        """The persona-effect study of the base model under ``<default_root_dir>/study`` (resumable).

        Args:
            study: persona conditions and suites (default suites: ``data.benchmark``).
        """
        run = StudyRun(study, study.suites or datamodule.benchmark_config, datamodule.backbone_config,
                       datamodule.persona_config.names, Path(self.default_root_dir) / "study")
        if study.dry_run:
            print_plan(run.plan())
            return
        run.finish(run.run())

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
    """``torch.load`` with ``weights_only=True``; our config dataclasses are the only extra types allowed.

    A DeepSpeed checkpoint directory comes back in the same form, its sharded weights joined.
    """
    if is_deepspeed_checkpoint(path):
        return load_zero_checkpoint(path)
    try:
        # Checkpoints written before the layered layout name these classes by their old paths.
        renamed = [(BackboneConfig, "prism_lightning.backbone.BackboneConfig"),
                   (LoraSettings, "prism_lightning.modules.student.LoraSettings"),
                   (DecodingConfig, "prism_lightning.generation.DecodingConfig")]
        with torch.serialization.safe_globals([BackboneConfig, LoraSettings, DecodingConfig, *renamed]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # never relay torch's advice to retry with weights_only=False
        raise PrismError(f"{path}: corrupt or incomplete checkpoint ({type(exc).__name__}); resume from an "
                         f"earlier checkpoint or retrain") from None


def resolve_checkpoint(root: str, ckpt_path: str) -> Path:
    """Map ``last``/``best`` to files under ``<root>/checkpoints``; fail naming the path when absent.

    ``best`` is the best checkpoint by a monitored metric, as a ModelCheckpoint recorded it (``best_model_path`` in
    the ``callbacks`` state of the newest checkpoint), never merely the newest epoch file.
    """
    directory = Path(root) / "checkpoints"
    if ckpt_path in ("last", "best"):
        candidates = sorted(directory.glob("last*.ckpt" if ckpt_path == "last" else "*.ckpt"),
                            key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise PrismError(f"no {ckpt_path} checkpoint under {directory}; run `prism fit` first")
        return candidates[-1] if ckpt_path == "last" else _best_checkpoint(candidates[-1])
    if not Path(ckpt_path).exists():  # a file, or a directory under DeepSpeed
        raise PrismError(f"ckpt_path: checkpoint not found: {ckpt_path}")
    return Path(ckpt_path)


def _best_checkpoint(newest: Path) -> Path:
    """The ``best_model_path`` that a metric-monitoring ModelCheckpoint recorded in ``newest``; else one clear line."""
    states = checkpoint_state(newest).get("callbacks", {})
    # ModelCheckpoint state (any subclass): monitor, best_model_path, best_model_score, ...
    best = {s["monitor"]: s.get("best_model_path") for s in states.values()
            if isinstance(s, dict) and "best_model_path" in s and s.get("monitor")}
    if not best:
        raise PrismError(f"ckpt_path best: no ModelCheckpoint in {newest} monitors a metric, so there is no best; "
                         f"set trainer.callbacks ModelCheckpoint monitor (e.g. val/loss) or use last or a file")
    if len(set(best.values())) > 1:
        raise PrismError(f"ckpt_path best: ModelCheckpoints monitoring {', '.join(best)} disagree on the best "
                         f"checkpoint; pass the file")
    monitor, path = next(iter(best.items()))
    # A run directory moved since training keeps its file names: look beside the newest checkpoint too.
    found = next((p for p in (Path(path), newest.parent / Path(path).name) if path and p.exists()), None)
    if found is None:
        raise PrismError(f"ckpt_path best: the best checkpoint by {monitor} ({path or 'none recorded'}) is missing")
    return found


def checkpoint_state(path: Path) -> dict:
    """A checkpoint's Lightning state (epoch, callbacks, …); a DeepSpeed directory's weights are not joined for it."""
    return read_client_state(path) if is_deepspeed_checkpoint(path) else load_checkpoint(path)


class PrismArgumentParser(LightningArgumentParser):
    """Lightning's parser whose errors are one ``error:`` line naming the key (no usage dump; ``--help`` has it)."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        """Exit 2 with one line; raise as jsonargparse does when it is asked not to exit."""
        if not self.exit_on_error:
            return super().error(message, ex)
        report(one_line(message))
        sys.exit(2)


class PrismCLI(LightningCLI):
    """`prism fit | validate | test | predict | bootstrap | export`, all from one YAML."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands plus bootstrap and export."""
        return {**LightningCLI.subcommands(), **{name: {"model", "datamodule"} for name in ("bootstrap", "export",
                                                                                        "study")}}

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs):
        """``study`` takes its settings as one ``study`` group (``--study.dry_run``); jsonargparse would otherwise
        name the method's own group ``study`` too, and refuse the clash."""
        if subcommand != "study":
            return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser = self.init_parser(**kwargs)
        self._add_arguments(parser)
        parser.add_class_arguments(StudyConfig, "study")
        self._subcommand_method_arguments[subcommand] = ["study"]
        return parser

    current: Optional["PrismCLI"] = None  # the running CLI, so main() can clean up after a failed command

    def before_instantiate_classes(self) -> None:
        """Input files become absolute paths (each relative to the config file that named it, or to the working
        directory on the command line) before any class reads them or the config is saved."""
        self.input_files = absolute_paths(self.config)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """The Trainer, with every checkpoint callback that names no ``dirpath`` writing to ``<root>/checkpoints``.

        Lightning's own default would be ``<root>/lightning_logs/version_N/checkpoints``, where
        ``--ckpt_path last`` of the next command cannot find it.
        """
        from lightning.pytorch.callbacks import ModelCheckpoint

        check_strategy({**self._get(self.config_init, "trainer", default={}), **kwargs}.get("strategy", "auto"))
        trainer = super().instantiate_trainer(**kwargs)
        try:
            Path(trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PrismError(f"trainer.default_root_dir: cannot create {trainer.default_root_dir} "
                             f"({exc.strerror})") from None
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.realpath(Path(trainer.default_root_dir) / "checkpoints")
        PrismCLI.current = self
        slurm.preflight(trainer, self.subcommand, self.config_init.get(str(self.subcommand)))
        return trainer

    def resolve_ckpt_path(self) -> None:
        """``--ckpt_path last|best|FILE`` must name a checkpoint that exists: else one line, never a fresh start."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path"):
            path = resolve_checkpoint(self.trainer.default_root_dir, config["ckpt_path"])
            state = checkpoint_state(path)  # a corrupt or incomplete one fails here, in one line
            config["ckpt_path"] = str(checkpoint_for_run(path, state, self.trainer, self.subcommand))

    def before_fit(self) -> None:
        """Resolve the checkpoint to resume from."""
        self.resolve_ckpt_path()

    def before_validate(self) -> None:
        """Resolve the checkpoint to validate."""
        self.resolve_ckpt_path()

    def before_test(self) -> None:
        """Resolve the checkpoint to benchmark."""
        check_command(self.trainer, "test")
        self.resolve_ckpt_path()

    def add_arguments_to_parser(self, parser) -> None:
        """One backbone and placement for data and model (defined under ``data``), one top-k (under ``model``)."""
        # PrismModule is the model unless a config names another, so a config that needs no model settings (a
        # study) runs on its own.
        parser.set_defaults({"model": {"class_path": f"{PrismModule.__module__}.{PrismModule.__qualname__}"}})
        parser.link_arguments("data.backbone", "model.init_args.backbone", apply_on="parse")
        parser.link_arguments("data.placement", "model.init_args.placement", apply_on="parse")
        # K-way PRISM: the contexts' grouping is data; the model trains one adapter per group.
        parser.link_arguments("data.adapters", "model.init_args.adapters", compute_fn=adapter_names,
                              apply_on="parse")
        # The cached teacher keeps the k the loss reads: defined on the model, linked to the data.
        parser.link_arguments("model.init_args.top_k", "data.teacher_top_k", apply_on="parse")

    def before_predict(self) -> None:
        """Resolve the checkpoint; write predictions to JSONL unless the user configured a writer."""
        check_command(self.trainer, "predict")
        self.resolve_ckpt_path()
        from lightning.pytorch.callbacks import BasePredictionWriter


        if not any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())

    def after_fit(self) -> None:
        """Export the trained adapter and gate, and say in plain words what the run shows.

        Every rank takes part (under ZeRO-3 the weights are gathered from all of them); rank 0 writes and reports.
        """
        out_dir = Path(self.trainer.default_root_dir) / "export"
        if self.trainer.is_global_zero:
            announce("export", str(out_dir))
        out = self.model.export(out_dir, write=self.trainer.is_global_zero)
        held = self.model.held_out_gate()  # the last validation pass, over every rank's share
        if not self.trainer.is_global_zero:
            return
        shown = ("val/", "disc/", "calibration/", "routing/")
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(shown)}
        table = Table(title="held-out validation (last epoch)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in sorted(metrics):
            table.add_row(key, f"{metrics[key]:.4f}")
        console = Console()
        console.print(table)
        corpus = self.datamodule.corpus
        if corpus is not None:
            print_corpus_lines(corpus, console)
        kl_final = metrics.get("val/kl")
        console.print(distillation_line(getattr(self.model, "kl_at_init", None), kl_final, self.trainer.current_epoch))
        if len(held["labels"]):
            reliability = (corpus.manifest.get("labels") or {}) if corpus is not None else None
            console.print(gate_verdict(held["logits"], held["labels"], float(self.model.gate.temperature),
                                       reliability).text)
            if len(self.model.adapter_names) > 1:
                console.print(adapter_choice_line(held, self.model.adapter_names))
        console.print(f"export: {out}  (load with prism_lightning.GatedModel.from_pretrained)")


def discard_empty_log_dir(cli: Optional[PrismCLI]) -> None:
    """Remove the ``lightning_logs/version_N`` a failed command created holding nothing but its config copy."""
    logger = getattr(getattr(cli, "trainer", None), "logger", None)
    if logger is None or getattr(logger, "_version", None) is None:
        return  # no version directory was ever made
    directory = Path(logger.log_dir)
    if directory.is_dir() and {p.name for p in directory.iterdir()} <= {"config.yaml", "hparams.yaml"}:
        shutil.rmtree(directory, ignore_errors=True)


DESCRIPTION = ("PRISM: self-distil an expert persona into a gated LoRA adapter. Also on an export: `prism serve` "
               "(OpenAI's HTTP API) and `prism lm-eval` (lm-evaluation-harness tasks); each has --help.")
COMMANDS = {"serve": serve_command, "lm-eval": lm_eval_command}  # not LightningCLI: no Trainer, own arguments


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``prism`` console script."""
    quiet_third_party_notices()
    argv = sys.argv[1:] if args is None else list(args)
    try:
        check_config_files(argv)
        if argv[:1] and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        PrismCLI(PrismModule, BootstrapDataModule, trainer_class=PrismTrainer, subclass_mode_model=True,
                 save_config_kwargs={"overwrite": True}, args=args, auto_configure_optimizers=False,
                 parser_class=PrismArgumentParser, parser_kwargs={"description": DESCRIPTION})
    except KeyboardInterrupt:
        report("interrupted; finished work is kept (stage files, last.ckpt) — rerun the same command to resume")
        sys.exit(130)
    except SIGTERMException:
        # Lightning stops at the next batch boundary and raises SystemExit(None): exit 0, as if the run had
        # finished. A scheduler must see that it did not.
        if SLURMEnvironment.detect():
            report("stopped by SIGTERM; the newest checkpoint is under <root>/checkpoints — resubmit the same sbatch "
                   "command (a requeued job does so itself): it resumes from there")
        else:
            report("stopped by SIGTERM; the newest checkpoint is <root>/checkpoints/last.ckpt — resume with "
                   "--ckpt_path last")
        sys.exit(128 + signal.SIGTERM)
    except Exception as exc:
        # jsonargparse wraps what a class's __init__ raises (a callback's missing file, a bad value) in its own
        # error: the PrismError inside is the message.
        cause = exc if isinstance(exc, (PrismError, FileNotFoundError)) else prism_cause(exc)
        if cause is None:
            raise
        stop_other_ranks(getattr(PrismCLI.current, "trainer", None))  # ranks this one launched would wait forever
        discard_empty_log_dir(PrismCLI.current)
        report(str(cause), same_on_all_ranks=not in_process_group())
        sys.exit(2)


def prism_cause(exc: BaseException) -> Optional[PrismError]:
    """The PrismError an exception was raised from or while handling, if any."""
    seen: set[int] = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, PrismError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def report(message: str, same_on_all_ranks: bool = True) -> None:
    """One ``error:`` line on stderr, from rank 0 only when every rank has the same one to say.

    Under torchrun/srun each rank parses the same config and meets the same signal: N copies of one line would
    bury it. A failure while running can be one rank's alone (its node's disk, its shard), so those name the rank.
    """
    rank = process_rank()
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    elif not same_on_all_ranks:
        print(f"error: [rank {rank}] {message}", file=sys.stderr, flush=True)


def process_rank() -> int:
    """This process's global rank: the process group's, else what the launcher's variables say (0 when alone)."""
    if in_process_group():
        return torch.distributed.get_rank()
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def in_process_group() -> bool:
    """Whether the ranks are joined yet (before that, all of them parsed and checked the same config and files)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


if __name__ == "__main__":
    main()
