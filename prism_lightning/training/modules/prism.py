"""PrismModule: IntentGate + DistillationStudent on one backbone; one student forward serves both."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from prism_lightning.distributed.collectives import all_gather_objects, gathered
from prism_lightning.inference.export import export_artifact
from prism_lightning.inference.gated_model import GatedModel
from prism_lightning.model.backbone import BackboneConfig
from prism_lightning.model.features import capture_layer0, gather_positions
from prism_lightning.model.gate_mlp import open_logit
from prism_lightning.model.generation import DecodingConfig
from prism_lightning.model.lora import LoraSettings
from prism_lightning.training.modules.gate import IntentGate, deployed_gate_metrics, gate_metrics
from prism_lightning.training.modules.student import DistillationStudent, as_dataclass
from prism_lightning.training.optim import adamw, with_schedule
from prism_lightning.training.summary import kl_change
from prism_lightning.utils.checks import check_gate
from prism_lightning.utils.progress import announce


class PrismModule(DistillationStudent):
    """Gate and LoRA trained together: the layer-0 hook on the student forward yields the gate's features.

    Layer 0 carries no LoRA, so these features equal the adapter-free ones used at inference.

    Args:
        backbone: base model (linked from ``data.backbone``).
        lora: LoRA settings.
        temperature: distillation temperature.
        top_k: teacher support size for the KL; 0 = full vocabulary.
        retain_weight: weight of the retain term (0 = paper).
        lr: learning rate of the LoRA weights.
        gate_lr: learning rate of the gate.
        gate_dims: hidden widths of the gate MLP.
        gate_weight: weight of the gate's BCE in the summed loss.
        gate_targets: ``hard`` (each query's 0/1 label, the paper) or ``soft`` (its win probability over
            ``data.labels.samples`` judged pairs; K-way: the adapters' win probabilities).
        gate_standardize: the gate scales its layer-0 features by their running training statistics (without it
            the raw features' few huge dimensions make the MLP collapse to one output at gate_lr 1e-2).
        threshold: routing threshold (calibration may change it).
        weight_decay: AdamW weight decay.
        warmup_ratio: share of steps with linear warmup.
        placement: persona placement the corpus used (linked from ``data.placement``), recorded in the export.
        predict_decoding: decoding for ``prism predict``.
        divergence_limit: stop training when the gradient norm or a trainable weight's magnitude exceeds this.
        gradient_checkpointing: recompute decoder activations in backward (memory of one layer, ~1 more forward).
        head_chunk: response tokens whose vocabulary-wide logits exist at once in the loss.
        prefix_reuse: the online teacher reuses each persona block's keys/values instead of recomputing them.
        adapters: the LoRA adapters, linked from ``data.adapters`` (one ``default`` when empty); the gate chooses
            none or one of them (K + 1 outcomes).
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), lora: LoraSettings = LoraSettings(),
                 temperature: float = 2.0, top_k: int = 64, retain_weight: float = 0.0, lr: float = 2e-4,
                 gate_lr: float = 1e-3, gate_dims: Sequence[int] = (128, 64), gate_weight: float = 1.0,
                 threshold: float = 0.5, weight_decay: float = 0.01, warmup_ratio: float = 0.1,
                 placement: str = "system", predict_decoding: DecodingConfig = DecodingConfig(),
                 divergence_limit: float = 1e4, gradient_checkpointing: bool = False, head_chunk: int = 1024,
                 prefix_reuse: bool = True, adapters: Sequence[str] = (),
                 gate_targets: Literal["hard", "soft"] = "hard", gate_standardize: bool = True) -> None:
        super().__init__(backbone, lora, temperature, top_k, retain_weight, lr, weight_decay, warmup_ratio,
                         divergence_limit, gradient_checkpointing, head_chunk, prefix_reuse, adapters)
        self.save_hyperparameters()
        check_gate(self.hparams)
        self.placement = placement
        self.predict_decoding = as_dataclass(DecodingConfig, predict_decoding)
        self.gate: Optional[IntentGate] = None
        # At 0.5 (``val/gate_acc``) and at the deployed threshold (``val/gate_acc_deployed``), which calibration
        # sets after each validation pass.
        # Fed at the pass's end with the whole split gathered from every rank, so no per-rank sync of their own.
        self.val_gate = gate_metrics("val/gate_", sync=False)
        self.val_gate_deployed = deployed_gate_metrics("val/gate_", sync=False)
        # Raw gate logits of this rank's share of the current validation pass; ``held_out_gate()`` gathers them.
        self.val_gate_outputs: list[dict] = []
        self._held_out: Optional[dict] = None

    def configure_model(self) -> None:
        """Attach LoRA and build the gate for this backbone's hidden size."""
        super().configure_model()
        if self.gate is None:
            self.gate = IntentGate(self.backbone.model.config.hidden_size, self.hparams.gate_dims,
                                   threshold=self.hparams.threshold, outputs=len(self.adapter_names),
                                   targets=self.hparams.gate_targets, standardize=self.hparams.gate_standardize)

    def on_fit_start(self) -> None:
        """Announce the training stage with what it trains on."""
        data = self.trainer.datamodule
        n_train, n_val = (len(data.train_items), len(data.val_items)) if data is not None else (0, 0)
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters() if p.requires_grad)  # ZeRO-3
        if self.trainer.is_global_zero:  # one line per run, not per rank
            announce("training", f"gate + LoRA on {n_train} items ({n_val} held out), {self.trainer.max_epochs} "
                                 f"epochs, {trainable:,} trainable parameters")

    def on_train_epoch_end(self) -> None:
        """One plain line per epoch (Slurm logs and CI have no progress bar)."""
        shown = ("train/kl", "train/gate_loss", "val/kl", "val/gate_auroc", "val/gate_balanced_acc")
        metrics = self.trainer.callback_metrics
        values = ", ".join(f"{k} {kl_change(self.kl_at_init, float(metrics[k]))}" if k == "val/kl"
                           else f"{k} {float(metrics[k]):.4f}" for k in shown if k in metrics)
        if self.trainer.is_global_zero:
            announce("epoch", f"{self.current_epoch} of {self.trainer.max_epochs} done: {values}")

    def shared_step(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """Student forward with the layer-0 hook: distillation losses, gate features."""
        with capture_layer0(self.model) as box:
            hidden = self.student_hidden(batch)
        features = gather_positions(box["hidden"], batch["feature_pos"]).detach()
        out = self.distill_loss(batch, hidden)
        out["gate_loss"] = self.gate.batch_loss(features, batch)
        out["loss"] = out["loss"] + self.hparams.gate_weight * out["gate_loss"]
        return out, features

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Joint step: KL (+ retain term) + gate BCE."""
        out, _ = self.shared_step(batch)
        self.check_finite(out["loss"], batch, batch_idx)
        self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=True, batch_size=len(batch["ids"]))
        return out["loss"]

    def on_validation_epoch_start(self) -> None:
        """Start collecting this pass's gate outputs."""
        self.val_gate_outputs = []
        self._held_out = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Held-out losses and gate metrics."""
        out, features = self.shared_step(batch)
        self.check_validation(out, batch_idx)
        adapter_logits = self.gate.mlp.adapter_logits(features).detach()
        self.val_gate_outputs.append({"ids": batch["ids"], "logits": open_logit(adapter_logits).cpu(),
                                      "labels": batch["label"].detach().cpu(),
                                      "choice": adapter_logits.argmax(-1).cpu() + 1,
                                      "routes": batch.get("route", batch["label"]).detach().long().cpu()})
        # Averaged over ranks; a rank's share may repeat an item or two so that all ranks run equally many batches.
        self.log_validation(out, batch, sync_dist=True)

    def held_out_gate(self) -> dict:
        """This pass's raw gate logits and labels over the whole validation split, gathered from every rank.

        A collective the first time in a pass (every rank must call it; callbacks and ``on_validation_epoch_end``
        do), cached afterwards. Each item appears once, in split order, whatever the number of ranks.
        """
        if self._held_out is None:
            self._held_out = merge_rank_outputs(all_gather_objects(self.val_gate_outputs))
        return self._held_out

    def on_validation_epoch_end(self) -> None:
        """Log and reset held-out gate metrics: at 0.5, and at the threshold the export will deploy.

        Lightning runs callbacks' epoch-end hooks first, so GateCalibration has already stored this pass's threshold
        and temperature; the deployed decisions are taken here from the pass's raw logits with those. That
        threshold was chosen on this same split, so ``*_deployed`` is optimistic by the choice. Both are computed
        from the whole split gathered from every rank (the metrics at 0.5 do not depend on the temperature).
        """
        held = self.held_out_gate()
        if not len(held["labels"]):
            return
        logits, labels = held["logits"].to(self.device), held["labels"].to(self.device).long()
        for metrics, values in ((self.val_gate, torch.sigmoid(logits)), (self.val_gate_deployed,
                                                                         self.gate.routed(logits))):
            metrics.update(values, labels)
            self.log_dict(metrics.compute(), sync_dist=True)  # already equal on every rank; the mean keeps them so
            metrics.reset()
        distill = held["routes"] > 0
        if len(self.adapter_names) > 1 and bool(distill.any()):
            # K-way: on held-out distill items, does the gate pick the adapter of the item's context?
            hits = (held["choice"][distill] == held["routes"][distill]).float().mean()
            self.log("val/gate_adapter_acc", hits.to(self.device), sync_dist=True)

    def configure_optimizers(self) -> dict:
        """AdamW with separate learning rates for LoRA and gate."""
        groups = [{"params": self.trainable_parameters(), "lr": self.hparams.lr},
                  {"params": list(self.gate.parameters()), "lr": self.hparams.gate_lr}]
        optimizer = adamw(groups, self.hparams.lr, self.hparams.weight_decay, self._trainer)
        return with_schedule(optimizer, self.trainer.estimated_stepping_batches, self.hparams.warmup_ratio)

    def gated(self):
        """This module's current weights as a GatedModel (routing in mixed batches, no persona)."""

        return GatedModel(self.backbone, self.model, self.gate.mlp, float(self.gate.threshold),
                          float(self.gate.temperature), adapters=self.adapter_names)

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        """Routed generation for a batch of ``{"id", "prompt"}`` rows."""
        gated = self.gated()
        ids = [gated.prompt_ids(row["prompt"]) for row in batch]
        # Refused before any generation, naming the row: transformers would only warn and generate past the context.
        gated.backbone.check_fits(ids, self.predict_decoding.max_new_tokens,
                                  [f"data.predict_file: prompt {row['id']!r}" for row in batch])
        outputs = gated.generate_ids(ids, self.predict_decoding)
        return [{"id": row["id"], "prompt": row["prompt"], **out} for row, out in zip(batch, outputs)]

    def test_step(self, unit: dict, batch_idx: int) -> None:
        """One benchmark unit (a suite for a row) on the current weights."""
        self.model.eval()
        unit["run"].run_unit(self.gated(), unit)

    def on_test_epoch_end(self) -> None:
        """The Table-1-style table, metrics.json, plots and report.md under ``<default_root_dir>/benchmark``."""
        run = self.trainer.datamodule.benchmark
        metrics = run.finish(self.backbone.reference, Path(self.trainer.default_root_dir) / "benchmark")
        for name, row in metrics["rows"].items():
            self.log(f"test/overall/{name}", row["overall"], batch_size=1)

    def export(self, directory: Path, write: bool = True) -> Path:
        """Write the deployable artifact (adapter, gate, routing JSON) to ``directory``.

        Under ZeRO-3 the trainable weights are sharded: every rank must call this (the gather is a collective) and
        exactly one passes ``write=True``.
        """

        trainable = [p for p in self.parameters() if p.requires_grad]
        with gathered(trainable):
            return export_artifact(self, Path(directory)) if write else Path(directory)


def merge_rank_outputs(per_rank: list[list[dict]]) -> dict:
    """One ``{"ids", "logits", "labels", "choice", "routes"}`` over the split from each rank's batches, each item
    once, in split order (``choice``/``routes``: the gate's adapter and the item's, 1-based, when recorded).

    A distributed sampler without shuffling gives rank r the items r, r + W, r + 2W, … and pads the last round
    with repeats; interleaving the ranks' rows restores the order, and the repeats are dropped by id.
    """
    keys = ("logits", "labels", "choice", "routes")
    rows = [[(i, *values) for o in outputs
             for i, *values in zip(o["ids"], *(o.get(k, o["labels"]) for k in keys))] for outputs in per_rank]
    merged: dict[str, tuple] = {}
    for k in range(max((len(r) for r in rows), default=0)):
        for rank_rows in rows:
            if k < len(rank_rows) and rank_rows[k][0] not in merged:
                merged[rank_rows[k][0]] = rank_rows[k]
    ids = list(merged)
    if not ids:
        return {"ids": [], **{k: torch.zeros(0) for k in keys}}
    return {"ids": ids, **{k: torch.stack([merged[i][n + 1] for i in ids]) for n, k in enumerate(keys)}}
