"""PrismModule: IntentGate + DistillationStudent on one backbone; one student forward serves both."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from prism_lightning.backbone import BackboneConfig
from prism_lightning.generation import DecodingConfig
from prism_lightning.features import capture_layer0, gather_positions
from prism_lightning.modules.gate import IntentGate, deployed_gate_metrics, gate_metrics
from prism_lightning.modules.student import DistillationStudent, LoraSettings, as_dataclass, with_schedule
from prism_lightning.progress import announce


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
        threshold: routing threshold (calibration may change it).
        weight_decay: AdamW weight decay.
        warmup_ratio: share of steps with linear warmup.
        placement: persona placement the corpus used (linked from ``data.placement``), recorded in the export.
        predict_decoding: decoding for ``prism predict``.
        divergence_limit: stop training when the gradient norm or a trainable weight's magnitude exceeds this.
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), lora: LoraSettings = LoraSettings(),
                 temperature: float = 2.0, top_k: int = 64, retain_weight: float = 0.0, lr: float = 2e-4,
                 gate_lr: float = 1e-3, gate_dims: Sequence[int] = (128, 64), gate_weight: float = 1.0,
                 threshold: float = 0.5, weight_decay: float = 0.01, warmup_ratio: float = 0.1,
                 placement: str = "system", predict_decoding: DecodingConfig = DecodingConfig(),
                 divergence_limit: float = 1e4) -> None:
        super().__init__(backbone, lora, temperature, top_k, retain_weight, lr, weight_decay, warmup_ratio,
                         divergence_limit)
        self.save_hyperparameters()
        self.placement = placement
        self.predict_decoding = as_dataclass(DecodingConfig, predict_decoding)
        self.gate: Optional[IntentGate] = None
        # At 0.5 (``val/gate_acc``) and at the deployed threshold (``val/gate_acc_deployed``), which calibration
        # sets after each validation pass.
        self.val_gate = gate_metrics("val/gate_")
        self.val_gate_deployed = deployed_gate_metrics("val/gate_")
        # Raw gate logits of the current validation pass, for calibration and routing callbacks.
        self.val_gate_outputs: list[dict] = []

    def configure_model(self) -> None:
        """Attach LoRA and build the gate for this backbone's hidden size."""
        super().configure_model()
        if self.gate is None:
            self.gate = IntentGate(self.backbone.model.config.hidden_size, self.hparams.gate_dims,
                                   threshold=self.hparams.threshold)

    def on_fit_start(self) -> None:
        """Announce the training stage with what it trains on."""
        data = self.trainer.datamodule
        n_train, n_val = (len(data.train_items), len(data.val_items)) if data is not None else (0, 0)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        announce("training", f"gate + LoRA on {n_train} items ({n_val} held out), {self.trainer.max_epochs} epochs, "
                             f"{trainable:,} trainable parameters")

    def on_train_epoch_end(self) -> None:
        """One plain line per epoch (Slurm logs and CI have no progress bar)."""
        shown = ("train/kl", "train/gate_loss", "val/kl", "val/gate_auroc", "val/gate_balanced_acc")
        metrics = self.trainer.callback_metrics
        values = ", ".join(f"{k} {float(metrics[k]):.4f}" for k in shown if k in metrics)
        announce("epoch", f"{self.current_epoch} of {self.trainer.max_epochs} done: {values}")

    def shared_step(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """Student forward with the layer-0 hook: distillation losses, gate features."""
        with capture_layer0(self.model) as box:
            logits = self.student_logits(batch)
        features = gather_positions(box["hidden"], batch["feature_pos"]).detach()
        out = self.distill_loss(batch, logits)
        out["gate_loss"] = self.gate.loss(features, batch["label"])
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

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Held-out losses and gate metrics."""
        out, features = self.shared_step(batch)
        self.check_validation(out, batch_idx)
        self.val_gate_outputs.append({"ids": batch["ids"], "logits": self.gate.mlp(features).detach().cpu(),
                                      "labels": batch["label"].detach().cpu()})
        self.log_dict({f"val/{k}": v for k, v in out.items()}, batch_size=len(batch["ids"]))
        self.val_gate.update(self.gate.probability(features), batch["label"].long())

    def on_validation_epoch_end(self) -> None:
        """Log and reset held-out gate metrics: at 0.5, and at the threshold the export will deploy.

        Lightning runs callbacks' epoch-end hooks first, so GateCalibration has already stored this pass's threshold
        and temperature; the deployed decisions are taken here from the pass's raw logits with those. That
        threshold was chosen on this same split, so ``*_deployed`` is optimistic by the choice.
        """
        self.log_dict(self.val_gate.compute())
        self.val_gate.reset()
        if self.val_gate_outputs:
            logits = torch.cat([o["logits"] for o in self.val_gate_outputs]).to(self.device)
            labels = torch.cat([o["labels"] for o in self.val_gate_outputs]).to(self.device).long()
            self.val_gate_deployed.update(self.gate.routed(logits), labels)
            self.log_dict(self.val_gate_deployed.compute())
            self.val_gate_deployed.reset()

    def configure_optimizers(self) -> dict:
        """AdamW with separate learning rates for LoRA and gate."""
        groups = [{"params": self.trainable_parameters(), "lr": self.hparams.lr},
                  {"params": list(self.gate.parameters()), "lr": self.hparams.gate_lr}]
        optimizer = torch.optim.AdamW(groups, weight_decay=self.hparams.weight_decay)
        return with_schedule(optimizer, self.trainer.estimated_stepping_batches, self.hparams.warmup_ratio)

    def gated(self):
        """This module's current weights as a GatedModel (routing in mixed batches, no persona)."""
        from prism_lightning.routing import GatedModel

        return GatedModel(self.backbone, self.model, self.gate.mlp, float(self.gate.threshold),
                          float(self.gate.temperature), adapter_name=self.model.active_adapter)

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        """Routed generation for a batch of ``{"id", "prompt"}`` rows."""
        outputs = self.gated().generate([row["prompt"] for row in batch], self.predict_decoding)
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

    def export(self, directory: Path) -> Path:
        """Write the deployable artifact (adapter, gate, routing JSON) to ``directory``."""
        from prism_lightning.export import export_artifact

        return export_artifact(self, Path(directory))
