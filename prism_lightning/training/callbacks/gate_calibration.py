"""GateCalibration: ECE and reliability diagram on the val split, temperature scaling, threshold selection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from lightning.pytorch.callbacks import Callback

from prism_lightning.training.calibration import (
    expected_calibration_error,
    fit_temperature,
    reliability_diagram,
    select_threshold,
)
from prism_lightning.training.gate_verdict import gate_verdict
from prism_lightning.utils.progress import announce


class GateCalibration(Callback):
    """After each validation pass of a fit, calibrate the gate on the held-out split and store T and threshold in it.

    Under ``prism validate`` it reports the stored calibration (files ``validate.json``, ``reliability_validate.png``)
    and leaves the gate and fit's files untouched.

    The gate's ``temperature`` and ``threshold`` are buffers, so the result travels in the checkpoint and the
    export. Training is unaffected: the gate's loss uses the raw logits.

    Args:
        method: ``balanced_accuracy`` (threshold with the best balanced accuracy) or ``routing_rate``.
        target_rate: share of items to route to the adapter (``routing_rate`` only).
        n_bins: bins for ECE and the reliability diagram.
        scale_temperature: fit a temperature; false keeps T = 1 and only picks the threshold.
        plot: write ``<default_root_dir>/calibration/reliability_epoch<N>.png``.
    """

    def __init__(self, method: Literal["balanced_accuracy", "routing_rate"] = "balanced_accuracy",
                 target_rate: Optional[float] = None, n_bins: int = 10, scale_temperature: bool = True,
                 plot: bool = True) -> None:
        if method == "routing_rate" and (target_rate is None or not 0 < target_rate < 1):
            raise ValueError("GateCalibration: method routing_rate needs 0 < target_rate < 1")
        self.method, self.target_rate, self.n_bins = method, target_rate, n_bins
        self.scale_temperature, self.plot = scale_temperature, plot
        self.last: dict = {}

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Calibrate on this pass's held-out gate logits (fit), or report the stored calibration (validate)."""
        if trainer.sanity_checking:
            return
        held = pl_module.held_out_gate()  # the whole split, from every rank (each rank calibrates identically)
        logits, labels = held["logits"], held["labels"]
        if not len(labels) or labels.min() == labels.max():
            return  # one class only: nothing to calibrate against
        gate = pl_module.gate
        fitting = trainer.state.fn == "fit"
        before = expected_calibration_error(torch.sigmoid(logits), labels, self.n_bins)
        if fitting:
            temperature = fit_temperature(logits, labels) if self.scale_temperature else 1.0
        else:  # a command that only reads a run reports the deployed calibration and changes nothing
            temperature = float(gate.temperature)
        probs = torch.sigmoid(logits / temperature)
        after = expected_calibration_error(probs, labels, self.n_bins)
        threshold = select_threshold(probs, labels, self.method, self.target_rate) if fitting \
            else float(gate.threshold)
        if fitting:
            gate.temperature.fill_(temperature)
            gate.threshold.fill_(threshold)
        verdict = gate_verdict(logits, labels, temperature)
        if trainer.is_global_zero:
            announce("calibration", f"epoch {trainer.current_epoch}: T={temperature:.2f}, threshold "
                                    f"{threshold:.4f}, ECE {before:.3f} -> {after:.3f}, AUROC {verdict.auroc:.2f} "
                                    f"(95% CI {verdict.low:.2f}-{verdict.high:.2f})"
                                    + ("" if verdict.informative else ": gate no better than chance"))
        self.last = {"epoch": trainer.current_epoch, "ece_before": before, "ece_after": after,
                     "temperature": temperature, "threshold": threshold, "n": len(labels),
                     "routing_rate": float((probs >= threshold).float().mean()), "auroc": verdict.auroc,
                     "auroc_ci95": [verdict.low, verdict.high], "informative": verdict.informative}
        pl_module.log_dict({f"calibration/{k}": float(v) for k, v in self.last.items()
                            if k not in ("epoch", "auroc_ci95", "informative")})
        if trainer.is_global_zero:
            self._write(Path(trainer.default_root_dir) / "calibration", fitting, trainer.current_epoch, probs,
                        labels, verdict)

    def _write(self, directory: Path, fitting: bool, epoch: int, probs: torch.Tensor, labels: torch.Tensor,
               verdict: Any) -> None:
        """fit writes calibration.json and reliability_epoch<N>.png; validate its own validate.* files."""
        directory.mkdir(parents=True, exist_ok=True)
        stem, plot = ("calibration", f"reliability_epoch{epoch}") if fitting else ("validate", "reliability_validate")
        (directory / f"{stem}.json").write_text(json.dumps({**self.last, "verdict": verdict.text}, indent=1))
        if not self.plot:
            return
        title = (f"ECE {self.last['ece_before']:.3f} -> {self.last['ece_after']:.3f}, T={self.last['temperature']:.2f}, "
                 f"threshold {self.last['threshold']:.4f}\nAUROC {verdict.auroc:.2f} "
                 f"(95% CI {verdict.low:.2f}-{verdict.high:.2f}, n={verdict.n})")
        if not verdict.informative:
            title += ": gate no better than chance, calibration meaningless"
        reliability_diagram(probs, labels, directory / f"{plot}.png", self.n_bins, title)
