"""Strategies by name (prism_lightning.distributed.strategies) and the one-line refusals around them; no processes started."""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry
from test_faults import fit_fails as fails  # the one helper for one-line CLI errors

from prism_lightning.distributed import strategies
from prism_lightning.distributed.strategies import PrismDeepSpeedStrategy, offloads_optimizer
from prism_lightning.distributed.zero_checkpoint import read_client_state

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")




@pytest.mark.parametrize("name, stage, offload", [("deepspeed_stage_2", 2, False), ("deepspeed_stage_3", 3, False),
                                                  ("deepspeed_stage_3_offload", 3, True)])
def test_deepspeed_names_build_our_strategy_with_lightnings_arguments(name, stage, offload):
    entry = StrategyRegistry[name]
    assert entry["strategy"] is PrismDeepSpeedStrategy
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=name, logger=False, enable_checkpointing=False)
    strategy = trainer.strategy
    assert isinstance(strategy, DeepSpeedStrategy) and type(strategy) is PrismDeepSpeedStrategy
    assert strategy.config["zero_optimization"]["stage"] == stage
    assert ("offload_param" in strategy.config["zero_optimization"]) == offload
    assert strategy.exclude_frozen_parameters  # checkpoints never hold the frozen base
    assert offloads_optimizer(strategy) == offload  # then the modules use DeepSpeed's CPU AdamW (ZeRO-Offload)
    assert type(L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False).strategy) is DDPStrategy


def test_on_cpu_deepspeed_gets_the_local_rank_as_device_rank(monkeypatch):
    """Lightning passes root_device.index (None on CPU); DeepSpeed compares it with 0."""
    import deepspeed

    seen = []
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: seen.append(kw["args"]) or (None, None, None, None))
    fake = deepspeed.initialize
    strategy = PrismDeepSpeedStrategy(accelerator=CPUAccelerator(), parallel_devices=[torch.device("cpu")] * 2)
    strategy.config.setdefault("train_micro_batch_size_per_gpu", 1)
    strategy._setup_model_and_optimizer(torch.nn.Linear(2, 2), None)
    assert seen == [argparse.Namespace(device_rank=strategy.local_rank)] and strategy.local_rank == 0
    assert deepspeed.initialize is fake  # what was there before the call is back
    assert not strategy.on_cuda


def test_an_unknown_strategy_name_lists_the_valid_ones(tmp_path, capsys):
    line = fails(["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path),
                  "--trainer.strategy", "zero2"], capsys)
    assert "unknown strategy 'zero2'" in line
    for name in ("auto", "ddp", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_3_offload"):
        assert name in line


def test_deepspeed_missing_names_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(strategies, "deepspeed_available", lambda: False)
    line = fails(["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path),
                  "--trainer.strategy", "deepspeed_stage_2"], capsys)
    assert "DeepSpeed is not installed" in line and "PRISM_EXTRAS=deepspeed scripts/install.sh" in line


@pytest.mark.parametrize("command, strategy", [("test", "ddp"), ("predict", "deepspeed_stage_3")])
def test_commands_that_cannot_run_on_several_processes_say_so_before_any_work(command, strategy, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    line = fails([command, "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator",
                  "cpu", "--trainer.devices", "2", "--trainer.strategy", strategy, "--data.predict_file",
                  str(prompts)], capsys)
    assert f"prism {command}" in line and "--trainer.devices 1" in line


def fake_zero_checkpoint(directory: Path, world: int = 2, stage: int = 2) -> Path:
    """The files Lightning's DeepSpeedStrategy writes (contents only where they are read)."""
    shards = directory / "checkpoint"
    shards.mkdir(parents=True)
    torch.save({"dp_world_size": world, "ds_config": {"zero_optimization": {"stage": stage}}, "epoch": 0,
                "module": {}}, shards / "mp_rank_00_model_states.pt")
    for rank in range(world):
        (shards / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    (directory / "latest").write_text("checkpoint")
    return directory


def test_a_deepspeed_checkpoint_directory_is_checked_for_every_rank(tmp_path):
    from prism_lightning.utils.errors import PrismError

    ckpt = fake_zero_checkpoint(tmp_path / "last.ckpt")
    state = read_client_state(ckpt)
    assert (state["epoch"], state["prism_world_size"], state["prism_zero_stage"]) == (0, 2, 2)
    (ckpt / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(PrismError, match=r"written by 2 ranks: missing checkpoint/zero_pp_rank_1_mp_rank_00_optim"):
        read_client_state(ckpt)
    (ckpt / "checkpoint" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(PrismError, match="mp_rank_00_model_states.pt .ZeRO-1/2. or .*is missing"):
        read_client_state(ckpt)


@pytest.mark.parametrize("command, strategy, expected", [
    ("fit", "auto", "is a DeepSpeed checkpoint (ZeRO stage 3, 2 ranks): resume it with --trainer.strategy "
                    "deepspeed_stage_3 on 2 devices"),
    ("fit", "deepspeed_stage_2", "was written by ZeRO stage 3 on 2 ranks; this run is ZeRO stage 2 on 2"),
    # DeepSpeed restores ZeRO-3 weights only with their optimizer shards, i.e. in a fit.
    ("validate", "deepspeed_stage_3", "prism validate under ZeRO-3 reads the checkpoint's joined weights in one "
                                      "process")])
def test_a_deepspeed_checkpoint_the_run_cannot_load_is_one_line(command, strategy, expected, tmp_path, capsys):
    fake_zero_checkpoint(tmp_path / "checkpoints" / "last.ckpt", world=2, stage=3)
    line = fails([command, "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last",
                  "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", strategy], capsys)
    assert expected in line
