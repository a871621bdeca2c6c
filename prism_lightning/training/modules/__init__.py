"""LightningModules of PRISM stages 4 (gate) and 5 (self-distillation)."""

from prism_lightning.model.lora import LoraSettings
from prism_lightning.training.modules.gate import IntentGate
from prism_lightning.training.modules.prism import PrismModule
from prism_lightning.training.modules.student import DistillationStudent

__all__ = ["IntentGate", "DistillationStudent", "LoraSettings", "PrismModule"]
