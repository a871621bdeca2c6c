"""The exported artifact: PEFT adapter directory + gate in safetensors + a small routing JSON."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from safetensors.torch import load_file, save_file

from prism_lightning.model.adapters import DEFAULT_ADAPTER
from prism_lightning.utils.errors import PrismError

ADAPTER_DIR = "adapter"
GATE_FILE = "gate.safetensors"
CONFIG_FILE = "prism.json"
REQUIRED = (CONFIG_FILE, GATE_FILE)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def export_artifact(module: Any, directory: Path) -> Path:
    """Save a trained PrismModule so that ``GatedModel.from_pretrained(directory)`` needs no Lightning.

    Written into a staging directory that replaces ``directory`` only when complete, so a failed export never
    leaves an older artifact's files mixed with newer ones.
    """
    final, directory = Path(directory), Path(directory).parent / f".{Path(directory).name}.tmp{os.getpid()}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    # PEFT writes its ``default`` adapter at the top of the directory and any other under a folder of its name.
    module.model.save_pretrained(directory / ADAPTER_DIR, selected_adapters=list(module.adapter_names))
    gate = module.gate
    save_file({k: v.detach().cpu().contiguous() for k, v in gate.mlp.state_dict().items()}, directory / GATE_FILE)
    backbone = module.backbone
    config = {
        "format_version": 1,
        "base_model": backbone.reference,
        "backbone": {"name_or_path": backbone.config.name_or_path, "dtype": backbone.config.dtype,
                     "revision": backbone.config.revision,
                     "trust_remote_code": backbone.config.trust_remote_code,
                     # the gate was trained on prompts rendered this way: inference must render them the same
                     "chat_template": backbone.config.chat_template,
                     "chat_template_kwargs": dict(backbone.config.chat_template_kwargs)},
        "feature_layer": 0,
        "feature_position": "last prompt token after the generation prompt",
        "persona_placement_trained": module.placement,
        "gate": {"hidden_size": gate.hparams.hidden_size, "dims": list(gate.hparams.dims),
                 "standardize": gate.mlp.norm is not None,
                 "threshold": float(gate.threshold), "temperature": float(gate.temperature),
                 "adapters": list(module.adapter_names)},
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    old = final.parent / f".{final.name}.old{os.getpid()}"
    if final.exists():
        final.rename(old)
    directory.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def check_export(directory: Path) -> dict:
    """Read an export's routing JSON after checking every required file is there (names the missing one)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PrismError(f"export directory not found: {directory}")
    for name in REQUIRED:
        if not (directory / name).is_file():
            raise PrismError(f"export {directory} is missing {name}")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise PrismError(f"{directory / CONFIG_FILE}:{exc.lineno}: malformed export config ({exc.msg})") from None
    for adapter in export_adapters(config):
        for name in ADAPTER_FILES:
            path = adapter_dir(directory, adapter) / name
            if not path.is_file():
                raise PrismError(f"export {directory} is missing {path.relative_to(directory)}")
    return config


def export_adapters(config: dict) -> list[str]:
    """The adapters an export carries, in gate order (exports before K-way PRISM carry one, ``default``)."""
    return list(config.get("gate", {}).get("adapters") or [DEFAULT_ADAPTER])


def adapter_dir(directory: Path, adapter: str) -> Path:
    """Where PEFT saved ``adapter`` in an export: ``adapter/`` for ``default``, else ``adapter/<name>/``."""
    return Path(directory) / ADAPTER_DIR / ("" if adapter == DEFAULT_ADAPTER else adapter)


def read_safetensors(path: Path) -> dict:
    """Tensors of a safetensors file; a truncated or corrupt file is one line naming it."""
    try:
        return load_file(Path(path))
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError or ValueError
        raise PrismError(f"{path}: corrupt or incomplete safetensors file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}); export again") from None


def check_adapter_weights(directory: Path, adapters: Sequence[str] = (DEFAULT_ADAPTER,)) -> None:
    """Read each adapter's weights once so that a corrupt file fails with its name, not inside PEFT."""
    for adapter in adapters:
        read_safetensors(adapter_dir(directory, adapter) / "adapter_model.safetensors")
