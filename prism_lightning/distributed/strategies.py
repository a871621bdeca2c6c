"""Distributed strategies by name: Lightning's own, with every DeepSpeed name mapped to one class that also runs on CPU.

Lightning 2.6's ``DeepSpeedStrategy`` refuses any accelerator but CUDA, although DeepSpeed 0.19 trains ZeRO-1/2/3 on
its CPU accelerator over gloo. ``PrismDeepSpeedStrategy`` runs Lightning's code paths on GPUs; on CPU processes it
relaxes exactly the three CUDA assumptions (accelerator check, device-index validation, ``device_rank``). On both it
keeps checkpoints to the trainable weights and writes them so that a kill never tears ``last.ckpt``. It replaces
Lightning's entries in the strategy registry (same names, same init arguments) when this module is imported, which
``prism_lightning.cli`` does before any Trainer is built, so ``--trainer.strategy deepspeed_stage_2`` and
``configs/strategy/*.yaml`` mean the same thing on a laptop, in CI and on a cluster.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators.cuda import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry

from prism_lightning.utils.errors import PrismError

DEEPSPEED_INSTALL = "PRISM_EXTRAS=deepspeed scripts/install.sh  (or: pip install 'deepspeed>=0.19,<0.20')"


def deepspeed_available() -> bool:
    """Whether ``import deepspeed`` can work (checked without importing it: the import takes seconds)."""
    return importlib.util.find_spec("deepspeed") is not None


class PrismDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy, also on CPU processes (gloo); checkpoints never hold the frozen base.

    On CUDA the setup is Lightning's. On CPU: no CUDA-only accelerator check, no device-index validation (CPU
    devices have no index), and DeepSpeed gets the local rank as ``device_rank`` instead of ``None``.
    ``exclude_frozen_parameters`` defaults to true (tied names of frozen weights included): a checkpoint keeps the
    trainable weights (LoRA, gate) and the optimizer state, never a copy of the frozen base model.
    """

    def __init__(self, *args: Any, exclude_frozen_parameters: bool = True, **kwargs: Any) -> None:
        if not deepspeed_available():
            raise PrismError(f"trainer.strategy: DeepSpeed is not installed; install it with {DEEPSPEED_INSTALL}")
        super().__init__(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)

    @property
    def on_cuda(self) -> bool:
        """True when Lightning's own (CUDA-only) code paths apply unchanged."""
        return isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        """Lightning's on CUDA; on CPU the DDP environment setup without the CUDA-only check."""
        if self.on_cuda:
            return super().setup_environment()
        check_cpu_deepspeed()
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        """Lightning's on CUDA; on CPU the same steps without validating device indices (CPU devices have none)."""
        if self.on_cuda:
            return super().setup_distributed()
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        """``deepspeed.initialize`` for training, with a CPU ``device_rank``."""
        with self._cpu_device_rank():
            return super()._setup_model_and_optimizer(*args, **kwargs)

    def _initialize_deepspeed_inference(self, model: Any) -> None:
        """``deepspeed.initialize`` for validate/test/predict, with a CPU ``device_rank``."""
        with self._cpu_device_rank():
            super()._initialize_deepspeed_inference(model)

    @contextmanager
    def _cpu_device_rank(self) -> Iterator[None]:
        """On CPU, hand ``deepspeed.initialize`` the local rank where Lightning passes ``root_device.index`` (None).

        DeepSpeed compares ``device_rank >= 0``; Lightning builds the argument inline, so the call is intercepted
        for its duration rather than copying Lightning's two methods.
        """
        if self.on_cuda:
            yield
            return
        import deepspeed  # lazy: optional (deepspeed extra)

        original = deepspeed.initialize

        def initialize(*args: Any, **kwargs: Any) -> Any:
            if isinstance(kwargs.get("args"), argparse.Namespace) and kwargs["args"].device_rank is None:
                kwargs["args"] = argparse.Namespace(device_rank=self.local_rank)
            return original(*args, **kwargs)

        deepspeed.initialize = initialize
        try:
            yield
        finally:
            deepspeed.initialize = original

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Optional[Any] = None) -> None:
        """Lightning's sharded save, written beside the target and swapped in, so a kill never tears ``last.ckpt``.

        Every rank writes its shard into ``<name>.partial``; after a barrier rank 0 moves the finished directory into
        place (the previous one survives until then).
        """
        target = Path(self.broadcast(str(filepath)))
        partial = target.with_name(target.name + ".partial")
        if self.is_global_zero and partial.exists():
            shutil.rmtree(partial)  # left by a run killed while writing
        self.barrier("prism_ckpt_clean")
        with self._without_frozen_aliases():
            super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("prism_ckpt_written")
        if self.is_global_zero:
            old = target.with_name(target.name + ".old")
            if target.exists():
                target.rename(old)
            partial.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("prism_ckpt_moved")

    @contextmanager
    def _without_frozen_aliases(self) -> Iterator[None]:
        """Make ``exclude_frozen_parameters`` also drop tied names of frozen weights.

        DeepSpeed removes frozen parameters by ``named_parameters()``, which lists a tied weight once: the tied
        output embedding (``lm_head.weight`` = ``embed_tokens.weight``, as in SmolLM2) stayed in every checkpoint.
        """
        engine = self.deepspeed_engine
        if not self.exclude_frozen_parameters or engine is None:
            yield
            return
        original = engine.module_state_dict

        def module_state_dict(*args: Any, **kwargs: Any) -> Any:
            state = original(*args, **kwargs)
            for name, param in engine.module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    state.pop(name, None)
            return state

        engine.module_state_dict = module_state_dict
        try:
            yield
        finally:
            del engine.module_state_dict  # the class's method again


def check_cpu_deepspeed() -> None:
    """DeepSpeed picks its accelerator at import; CPU processes need its CPU accelerator (DS_ACCELERATOR=cpu)."""
    from deepspeed.accelerator import get_accelerator  # lazy: optional (deepspeed extra)

    name = get_accelerator().device_name()
    if name != "cpu":
        raise PrismError(f"trainer.accelerator cpu with DeepSpeed, but DeepSpeed chose its {name} accelerator on this "
                         f"machine; start the command with DS_ACCELERATOR=cpu, or use trainer.accelerator gpu")


def register_strategies() -> None:
    """Point every name Lightning registered for DeepSpeedStrategy at PrismDeepSpeedStrategy (same init args)."""
    for name, entry in list(StrategyRegistry.items()):
        if entry["strategy"] is DeepSpeedStrategy:
            StrategyRegistry.register(name, PrismDeepSpeedStrategy, description=entry["description"], override=True,
                                      **entry["init_params"])


def valid_strategy_names() -> list[str]:
    """Every name ``--trainer.strategy`` accepts."""
    return ["auto", *sorted(StrategyRegistry.available_strategies())]


def check_strategy(strategy: Any) -> None:
    """One line for a strategy name that does not exist, or a DeepSpeed name without DeepSpeed installed."""
    if not isinstance(strategy, str):
        return  # a Strategy instance (class_path in YAML) is the user's own choice
    name = strategy.lower()
    if name != "auto" and name not in StrategyRegistry:
        raise PrismError(f"trainer.strategy: unknown strategy {strategy!r}; valid names: "
                         f"{', '.join(valid_strategy_names())}")
    if "deepspeed" in name and not deepspeed_available():
        raise PrismError(f"trainer.strategy {strategy}: DeepSpeed is not installed; install it with "
                         f"{DEEPSPEED_INSTALL}")


def stop_other_ranks(trainer: Any) -> None:
    """Kill the processes this one launched (Lightning's subprocess launcher), so a failed rank 0 leaves no waiter."""
    from lightning.pytorch.strategies.launchers import (
        _SubprocessScriptLauncher,  # lazy: private Lightning module, only on failure
    )

    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    if isinstance(launcher, _SubprocessScriptLauncher) and getattr(launcher, "procs", None):
        import signal

        launcher.kill(signal.SIGKILL)


register_strategies()


def check_command(trainer: Any, command: str) -> None:
    """One line for a command that cannot run on this trainer's processes, before any work (never a hang)."""
    if trainer.world_size <= 1:
        return
    single = "--trainer.devices 1 --trainer.num_nodes 1 --trainer.strategy auto (a DeepSpeed checkpoint is read too)"
    if command == "test":
        raise PrismError(f"prism test runs the benchmark in one process, not {trainer.world_size}; run it with "
                         f"{single}")
    strategy = trainer.strategy
    if command == "predict" and isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        raise PrismError("prism predict cannot run under ZeRO-3 on several processes: each rank generates texts of "
                         f"other lengths, and every ZeRO-3 forward needs all ranks; run it with {single}")


def offloads_optimizer(strategy: Any) -> bool:
    """Whether a DeepSpeed strategy keeps the optimizer state in CPU (or NVMe) memory (ZeRO-Offload)."""
    if not isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy.config, dict):
        return False
    offload = strategy.config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)
