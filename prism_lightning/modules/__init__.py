"""LightningModules of PRISM stages 4 (gate) and 5 (self-distillation)."""

from prism_lightning.modules.gate import IntentGate
from prism_lightning.modules.prism import PrismModule
from prism_lightning.modules.student import DistillationStudent, LoraSettings

__all__ = ["IntentGate", "DistillationStudent", "LoraSettings", "PrismModule"]
