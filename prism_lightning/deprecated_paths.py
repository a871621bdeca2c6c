"""Old import paths of the flat layout (before 0.2), kept working for one release with a warning.

User YAML names classes by path (``prism_lightning.modules.PrismModule``, ``prism_lightning.callbacks.*``); those
paths now live under the layered subpackages. An import of an old path gets a module that forwards every attribute
to the new one (the same objects, so ``isinstance`` and pickled checkpoints keep working) and one warning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import Any, Optional, Sequence

# old path -> new path, both relative to ``prism_lightning``
MOVED = {
    "errors": "utils.errors",
    "jsonl": "utils.jsonl",
    "notices": "utils.notices",
    "progress": "utils.progress",
    "checks": "utils.checks",
    "strategies": "distributed.strategies",
    "launch": "distributed.launch",
    "slurm": "distributed.slurm",
    "zero_checkpoint": "distributed.zero_checkpoint",
    "rng_state": "distributed.rng_state",
    "bootstrap.sharding": "distributed.sharding",
    "backbone": "model.backbone",
    "chat": "model.chat",
    "features": "model.features",
    "lm_head": "model.lm_head",
    "gate_mlp": "model.gate_mlp",
    "adapters": "model.adapters",
    "row_routing": "model.row_routing",
    "prefix_states": "model.prefix_states",
    "choices": "model.choices",
    "generation": "model.generation",
    "templates": "model.templates",
    "personas": "contexts.personas",
    "export": "inference.export",
    "routing": "inference.gated_model",
    "data": "training.datamodule",
    "modules": "training.modules",
    "modules.gate": "training.modules.gate",
    "modules.prism": "training.modules.prism",
    "modules.student": "training.modules.student",
    "callbacks": "training.callbacks",
    "losses": "training.losses",
    "divergence": "training.divergence",
    "teacher_cache": "training.teacher_cache",
    "teacher_text": "training.teacher_text",
    "calibration": "training.calibration",
    "gate_verdict": "training.gate_verdict",
    "summary": "training.summary",
    "sampling": "training.sampling",
    "throughput": "training.throughput",
    "callbacks.context_fidelity": "training.callbacks.context_fidelity",
    "callbacks.discriminative_check": "training.callbacks.discriminative_check",
    "callbacks.example": "training.callbacks.example",
    "callbacks.gate_calibration": "training.callbacks.gate_calibration",
    "callbacks.prediction_writer": "training.callbacks.prediction_writer",
    "callbacks.routing_report": "training.callbacks.routing_report",
    "callbacks.run_checkpoint": "training.callbacks.run_checkpoint",
    "persona_specs": "contexts.domains",
}


class PrismDeprecationWarning(FutureWarning):
    """An old ``prism_lightning`` import path was used (shown by default: YAML users are the audience)."""


class _Forward(types.ModuleType):
    """A module that forwards attribute access to the module that replaced it."""

    def __init__(self, name: str, target: str) -> None:
        super().__init__(name)
        self.__dict__["_target"] = target

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__dict__["_target"]), attr)

    def __dir__(self) -> list[str]:
        return dir(importlib.import_module(self.__dict__["_target"]))


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths in ``MOVED`` and loads each as a forwarding module."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[types.ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        """A spec for an old path; None for every other module."""
        old = fullname.removeprefix("prism_lightning.")
        if old == fullname or old not in MOVED:
            return None
        new = MOVED[old]
        is_package = importlib.util.find_spec(f"prism_lightning.{new}").submodule_search_locations is not None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=is_package)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        """The forwarding module; it is a package (empty ``__path__``) where the new module is one."""
        new = MOVED[spec.name.removeprefix("prism_lightning.")]
        module = _Forward(spec.name, f"prism_lightning.{new}")
        if spec.submodule_search_locations is not None:
            module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        """Warn once per old path (the import itself is the forwarding module)."""
        new = MOVED[module.__name__.removeprefix("prism_lightning.")]
        warnings.warn(f"{module.__name__} moved to prism_lightning.{new}; the old path works until 0.3 "
                      f"(update the class_path in your YAML)", PrismDeprecationWarning, stacklevel=2)


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (before the path finder, so old names never hit the disk)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
