"""IntentGate: the paper's MLP on layer-0 features (h -> 128 -> 64 -> 1, GELU, BCE), in fp32."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import lightning as L
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, MulticlassAccuracy

from prism_lightning.model.gate_mlp import GateMLP, route_loss, soft_route_loss
from prism_lightning.utils.errors import PrismError


class BalancedAccuracy(MulticlassAccuracy):
    """Mean of per-class recall for a binary gate, fed with probabilities."""

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(num_classes=2, average="macro", **kwargs)
        self.threshold = threshold

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        """Threshold the probabilities and count per-class hits."""
        super().update((probs >= self.threshold).long(), target.long())


def gate_metrics(prefix: str, threshold: float = 0.5, sync: bool = True) -> MetricCollection:
    """Accuracy, balanced accuracy and AUROC of gate probabilities (at 0.5 unless told: the uncalibrated view).

    ``sync=False`` when every rank is fed the whole, already gathered split (syncing would count it once per rank).
    """
    return MetricCollection({"acc": BinaryAccuracy(threshold=threshold, sync_on_compute=sync),
                             "balanced_acc": BalancedAccuracy(threshold, sync_on_compute=sync),
                             "auroc": BinaryAUROC(sync_on_compute=sync)}, prefix=prefix)


def deployed_gate_metrics(prefix: str, sync: bool = True) -> MetricCollection:
    """Accuracy and balanced accuracy of routing decisions at the deployed threshold, logged as ``<name>_deployed``.

    Fed with 0/1 decisions rather than probabilities: calibration moves the threshold buffer after these metric
    objects exist, so the threshold is applied when the decisions are taken.
    """
    return MetricCollection({"acc": BinaryAccuracy(sync_on_compute=sync),
                             "balanced_acc": BalancedAccuracy(sync_on_compute=sync)}, prefix=prefix,
                            postfix="_deployed")


class IntentGate(L.LightningModule):
    """The routing gate; trains on its own from cached features (``{"features", "label"}`` batches) or inside PrismModule.

    Args:
        hidden_size: width of the backbone's hidden state.
        dims: hidden widths of the MLP (paper: 128, 64).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        threshold: route to the adapter when the probability is at or above this.
        temperature: logit temperature (1 = uncalibrated; set by calibration).
        outputs: adapters the gate chooses among (K; 1 = binary PRISM).
        targets: ``hard`` trains toward each query's 0/1 label (its route); ``soft`` toward its win probability
            (batches then carry ``soft_route``, [B, K + 1]). Calibration and AUROC read the hard label either way.
        standardize: scale the features by their running training statistics first (``FeatureStandardizer``).
    """

    def __init__(self, hidden_size: int = 576, dims: Sequence[int] = (128, 64), lr: float = 1e-3,
                 weight_decay: float = 0.01, threshold: float = 0.5, temperature: float = 1.0,
                 outputs: int = 1, targets: Literal["hard", "soft"] = "hard", standardize: bool = True) -> None:
        super().__init__()
        if targets not in ("hard", "soft"):
            raise PrismError(f"gate targets must be 'hard' or 'soft', got {targets!r}")
        self.save_hyperparameters()
        self.targets = targets
        self.mlp = GateMLP(hidden_size, dims, outputs, standardize)
        # Buffers, so calibration results travel in checkpoints and exports.
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.val_metrics = gate_metrics("val/gate_")
        self.val_deployed = deployed_gate_metrics("val/gate_")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Calibrated routing logits."""
        return self.mlp(features) / self.temperature

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        """P(route to adapter)."""
        return torch.sigmoid(self(features))

    def routed(self, raw_logits: torch.Tensor) -> torch.Tensor:
        """Deployed routing decisions (0/1) for raw MLP logits: calibrated probability at or above the threshold."""
        return (torch.sigmoid(raw_logits / self.temperature) >= self.threshold).long()

    def loss(self, features: torch.Tensor, labels: torch.Tensor, routes: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy over (none, adapters) on raw (uncalibrated) logits — BCE when K = 1; ``routes`` (0 = none,
        k = adapter k) default to the labels. Class balance comes from resampling in the DataModule."""
        return route_loss(self.mlp.adapter_logits(features), labels if routes is None else routes)

    def batch_loss(self, features: torch.Tensor, batch: dict) -> torch.Tensor:
        """The loss on a batch, toward its hard routes or, with ``targets: soft``, its win probabilities."""
        if self.targets == "soft":
            if "soft_route" not in batch:
                raise PrismError("gate targets 'soft': batches need 'soft_route' (the per-query win probabilities); "
                                 "a corpus without them cannot train a soft gate")
            return soft_route_loss(self.mlp.adapter_logits(features), batch["soft_route"])
        return self.loss(features, batch["label"], self.batch_routes(batch))

    def batch_routes(self, batch: dict) -> torch.Tensor | None:
        """The outcome each row trains toward: ``route`` (0 = none, k = adapter k), which a K-way gate needs; a
        binary gate may take its 0/1 ``label`` instead."""
        if "route" in batch:
            return batch["route"]
        if self.mlp.outputs > 1:
            raise PrismError(f"IntentGate with outputs={self.mlp.outputs}: batches need a 'route' per row "
                             f"(0 = no adapter, k = adapter k); a 0/1 'label' cannot say which adapter")
        return None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One gate step on cached features."""
        loss = self.batch_loss(batch["features"], batch)
        self.log("train/gate_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Held-out loss and metrics."""
        self.log("val/gate_loss", self.batch_loss(batch["features"], batch))
        self.val_metrics.update(self.probability(batch["features"]), batch["label"].long())
        self.val_deployed.update(self.routed(self.mlp(batch["features"])), batch["label"].long())

    def on_validation_epoch_end(self) -> None:
        """Log and reset the held-out metrics (at 0.5 and at the deployed threshold)."""
        for metrics in (self.val_metrics, self.val_deployed):
            self.log_dict(metrics.compute())
            metrics.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW on the MLP."""
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
