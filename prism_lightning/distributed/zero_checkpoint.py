"""DeepSpeed checkpoint directories: completeness, the Lightning state inside, and the consolidated trainable weights.

Under a DeepSpeed strategy ``last.ckpt`` is a directory (Lightning's layout: ``checkpoint/`` holds one model-state
file, or one per rank under ZeRO-3, and one optimizer-state file per rank; ``latest`` names the tag). The weights
live in the ranks' fp32 optimizer shards; DeepSpeed's ``zero_to_fp32`` joins them into one state dict, here with
``weights_only=True`` loads (DeepSpeed's own helper would unpickle anything).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from prism_lightning.distributed.strategies import DEEPSPEED_INSTALL, deepspeed_available
from prism_lightning.utils.errors import PrismError

TAG = "checkpoint"  # the tag Lightning's DeepSpeedStrategy saves under
# DeepSpeed's own bookkeeping in a model-state file; everything else is Lightning's checkpoint (loops, callbacks, …).
DEEPSPEED_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                  "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                  "csr_tensor_module_names", "skipped_steps", "global_steps", "global_samples", "dp_world_size",
                  "mp_world_size", "checkpoint_parallel_dimensions", "ds_config", "ds_version"}


def is_deepspeed_checkpoint(path: Path) -> bool:
    """A checkpoint path that DeepSpeed wrote (a directory, where other strategies write one file)."""
    return Path(path).is_dir()


@contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Make DeepSpeed's ``torch.load(..., weights_only=False)`` calls load tensors and plain data only."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # lazy: optional (deepspeed extra)
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    real = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        torch.load = real


def _load(path: Path) -> dict:
    """One checkpoint file, tensors and plain data only; a damaged file is one line naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # never relay torch's advice to retry with weights_only=False
        raise PrismError(f"{path}: corrupt or incomplete checkpoint file ({type(exc).__name__}); resume from an "
                         f"earlier checkpoint or retrain") from None


def read_client_state(path: Path) -> dict:
    """Lightning's part of a DeepSpeed checkpoint directory (epoch, loops, callbacks, base model, …), after
    checking that every rank's files are there; one line naming the missing ones otherwise."""
    path = Path(path)
    shards = path / TAG
    if not shards.is_dir():
        raise PrismError(f"{path}: incomplete DeepSpeed checkpoint: {TAG}/ (the directory of shards) is missing")
    stage3 = shards / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    model_file = stage3 if stage3.is_file() else shards / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise PrismError(f"{path}: incomplete DeepSpeed checkpoint: {TAG}/mp_rank_00_model_states.pt (ZeRO-1/2) or "
                         f"{TAG}/zero_pp_rank_0_mp_rank_00_model_states.pt (ZeRO-3) is missing")
    state = _load(model_file)
    world = int(state.get("dp_world_size", 1))
    missing = []
    for rank in range(world):
        if model_file is stage3 and not (shards / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").is_file():
            missing.append(f"{TAG}/zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        optim = [f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for prefix in ("", "bf16_")]
        if not any((shards / name).is_file() for name in optim):
            missing.append(f"{TAG}/{optim[0]}")
    if missing:
        raise PrismError(f"{path}: incomplete DeepSpeed checkpoint written by {world} ranks: missing "
                         f"{', '.join(missing)}; resume from an earlier checkpoint or retrain")
    client = {k: v for k, v in state.items() if k not in DEEPSPEED_KEYS}
    client["prism_world_size"] = world
    client["prism_zero_stage"] = int((state.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
    return client


def checkpoint_for_run(path: Path, state: dict, trainer: Any, command: str) -> Path:
    """The checkpoint this run can load: a DeepSpeed directory needs the same strategy, stage and ranks to resume a
    fit; validate/test/predict read only its weights, so another strategy gets them joined into one file."""
    from lightning.pytorch.strategies import DeepSpeedStrategy  # lazy: only for DeepSpeed checkpoints

    strategy = trainer.strategy
    deepspeed_run = isinstance(strategy, DeepSpeedStrategy)
    if not is_deepspeed_checkpoint(path):
        if deepspeed_run:
            raise PrismError(f"{path} is a single-file checkpoint, written without DeepSpeed; a DeepSpeed strategy "
                             f"reads only DeepSpeed checkpoint directories: use the strategy that wrote it")
        return path
    world, stage = state["prism_world_size"], state["prism_zero_stage"]
    if not deepspeed_run:
        if command == "fit":
            raise PrismError(f"{path} is a DeepSpeed checkpoint (ZeRO stage {stage}, {world} ranks): resume it with "
                             f"--trainer.strategy deepspeed_stage_{stage} on {world} devices, or `prism export` it")
        return consolidated_file(path)
    running = int((strategy.config or {}).get("zero_optimization", {}).get("stage", 0))
    if command != "fit" and running == 3:
        # DeepSpeed restores ZeRO-3 weights only together with their optimizer shards (a fit); read them joined.
        if trainer.world_size > 1:
            raise PrismError(f"prism {command} under ZeRO-3 reads the checkpoint's joined weights in one process; "
                             f"add --trainer.devices 1 --trainer.num_nodes 1 (or --trainer.strategy auto)")
        strategy.load_full_weights = True
        return consolidated_file(path)
    if command == "fit" and (world, stage) != (trainer.world_size, running):
        raise PrismError(f"{path} was written by ZeRO stage {stage} on {world} ranks; this run is ZeRO stage "
                         f"{running} on {trainer.world_size}: resume with the same strategy and devices × num_nodes")
    return path


def consolidated_file(path: Path) -> Path:
    """A DeepSpeed checkpoint directory joined into one temporary Lightning checkpoint file (removed at exit)."""
    out = Path(tempfile.mkdtemp(prefix="prism-ckpt-")) / Path(path).name
    atexit.register(shutil.rmtree, out.parent, True)
    torch.save(load_zero_checkpoint(path), out)
    return out


def load_zero_checkpoint(path: Path) -> dict:
    """A Lightning-style checkpoint dict from a DeepSpeed directory: its client state plus ``state_dict`` holding
    the trainable weights (fp32, joined from every rank's shard) and the small buffers (gate calibration)."""
    client = read_client_state(path)
    if not deepspeed_available():
        raise PrismError(f"{path} is a DeepSpeed checkpoint; reading it needs DeepSpeed: {DEEPSPEED_INSTALL}")
    from deepspeed.utils.zero_to_fp32 import (
        get_fp32_state_dict_from_zero_checkpoint,  # lazy: optional (deepspeed extra)
    )

    try:
        with _weights_only_loads():
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=TAG, exclude_frozen_parameters=True)
    except PrismError:
        raise
    except Exception as exc:
        raise PrismError(f"{path}: corrupt DeepSpeed checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}); resume from an earlier "
                         f"checkpoint or retrain") from None
    client["state_dict"] = dict(state_dict)
    return client
