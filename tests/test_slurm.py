"""Slurm: a simulated 2-task job on localhost (train, SIGUSR1 → save + requeue, relaunch → resume), the allocation
preflight, the requeue handler outside training, and the sbatch templates against the config they launch."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from test_cli_fit import fit_config, save_tiny_model, write_corpus

from prism_lightning.cli import main
from prism_lightning.distributed import slurm
from prism_lightning.training.datamodule import BalancedSampler

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "configs" / "slurm").glob("*.sbatch"))
PRISM = [sys.executable, "-m", "prism_lightning.cli"]
JOB_ID = "4242"


class PauseInEpochOne(L.pytorch.callbacks.Callback):
    """Test helper: at epoch 1's second batch end (epoch 0's last.ckpt is on disk) write ``<marker>.<rank>`` with the
    global step and wait: rank 0 until its requeue handler has seen the test's signal (then it writes ``<marker>.go``),
    the other ranks for ``<marker>.go``. A fixed point mid-run, without guessing how long a signal takes."""

    def __init__(self, marker: str, timeout: float = 120.0) -> None:
        self.marker, self.timeout = marker, timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch != 1 or batch_idx != 1:
            return
        Path(f"{self.marker}.{trainer.global_rank}").write_text(str(trainer.global_step))
        go = Path(f"{self.marker}.go")
        requeue = next(c for c in trainer.callbacks if isinstance(c, slurm.SlurmRequeue))
        deadline = time.time() + self.timeout
        while time.time() < deadline and not go.exists():
            if trainer.global_rank == 0 and requeue.received:
                go.touch()
            time.sleep(0.05)


@pytest.fixture(scope="module")
def tiny_model(smol_tokenizer, tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", smol_tokenizer, seed=0)


@pytest.fixture
def slurm_env(monkeypatch):
    """Factory ``set(**variables)``: a clean Slurm task environment in this process (nothing inherited)."""
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)

    def set_env(**variables: str) -> None:
        for key, value in variables.items():
            monkeypatch.setenv(key, str(value))

    return set_env


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch) -> Path:
    """An ``scontrol`` first on PATH that appends its arguments to a log (the file it returns)."""
    log = tmp_path / "scontrol.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(log))}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def free_port() -> int:
    """A TCP port nothing listens on now (the rendezvous of one launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def task_env(rank: int, port: int, restart: int) -> dict[str, str]:
    """What srun gives task ``rank`` of a 1-node, 2-task job (plus the rendezvous Lightning reads)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID=JOB_ID, SLURM_JOB_NAME="prism", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
               SLURM_NNODES="1", SLURM_JOB_NUM_NODES="1", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
               SLURM_NODEID="0", SLURM_NODELIST="127.0.0.1", SLURM_RESTART_COUNT=str(restart),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", TERM="dumb",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")]))
    return env


def launch(config: Path, logs: Path, restart: int) -> list[subprocess.Popen]:
    """The two tasks of the job, as `srun prism fit --config C --trainer.devices 2 --trainer.strategy ddp` would."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        out = (logs / f"rank{rank}-restart{restart}.log").open("w")
        procs.append(subprocess.Popen([*PRISM, "fit", "--config", str(config), "--trainer.accelerator", "cpu",
                                       "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                                      stdout=out, stderr=subprocess.STDOUT, env=task_env(rank, port, restart)))
    return procs


def wait_all(procs: list[subprocess.Popen], logs: Path, restart: int, timeout: float = 300) -> list[int]:
    """Every task's exit status; a task still running at the deadline fails the test with both logs."""
    deadline = time.time() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"a task hung: {tail(logs, restart)}")
    return [p.returncode for p in procs]


def tail(logs: Path, restart: int) -> str:
    """The end of both tasks' logs of one launch."""
    return "\n".join(f"--- rank {r}\n" + (logs / f"rank{r}-restart{restart}.log").read_text()[-2500:] for r in (0, 1))


def train_steps(metrics: Path) -> dict[int, int]:
    """Global step -> epoch of every logged training step."""
    return {int(r["step"]): int(r["epoch"]) for r in csv.DictReader(metrics.open()) if r.get("train/loss")}


def test_simulated_two_task_job_requeues_on_sigusr1_and_resumes(tiny_model, tmp_path, fake_scontrol):
    """Leg 1 trains 2 DDP ranks under SLURM_* variables and checkpoints; SIGUSR1 to rank 0 alone mid-epoch makes
    every rank save hpc_ckpt_1.ckpt at the same step and rank 0 run `scontrol requeue 4242`; the relaunched tasks
    (SLURM_RESTART_COUNT=1, no --ckpt_path) resume there, not at step 0 nor at epoch 0's last.ckpt, and finish."""
    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 12)
    marker = tmp_path / "paused"
    pause = {"class_path": "test_slurm.PauseInEpochOne", "init_args": {"marker": str(marker)}}
    record = [{"class_path": "test_faults.RecordBatches", "init_args": {"path": str(tmp_path / f"batches{leg}")}}
              for leg in (0, 1)]
    job = tmp_path / "job"
    logs = tmp_path / "logs"
    logs.mkdir()
    first = launch(fit_config(job, tiny_model, corpus, epochs=3, extra_callbacks=[pause, record[0]]), logs, restart=0)
    deadline = time.time() + 300
    while not Path(f"{marker}.0").exists() or not Path(f"{marker}.1").exists():
        if time.time() > deadline or any(p.poll() is not None for p in first):
            for p in first:
                p.kill()
            pytest.fail(f"leg 1 never reached epoch 1: {tail(logs, 0)}")
        time.sleep(0.05)
    paused_at = int(Path(f"{marker}.0").read_text())
    first[0].send_signal(signal.SIGUSR1)  # Slurm signals every task; one rank alone is the case that must not hang
    codes = wait_all(first, logs, 0)
    assert codes == [128 + signal.SIGUSR1] * 2, tail(logs, 0)
    assert fake_scontrol.read_text().splitlines() == [f"requeue {JOB_ID}"]
    run = job / "run"
    hpc = torch.load(run / "hpc_ckpt_1.ckpt", weights_only=False, map_location="cpu")
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert hpc["global_step"] == paused_at and hpc["epoch"] == 1
    assert last["epoch"] == 0 and last["global_step"] < paused_at  # leg 1 checkpointed its first epoch too
    first_leg = train_steps(job / "logs" / "metrics.csv")
    per_epoch = sum(1 for epoch in first_leg.values() if epoch == 0)
    # The step that ended at the signal is saved but not logged: Lightning logs after the batch-end callbacks.
    assert max(first_leg) < paused_at and per_epoch >= 3
    assert "requeued Slurm job 4242" in " ".join((logs / "rank0-restart0.log").read_text().split())

    # The requeued job runs the same command; Slurm counts the restart.
    second = launch(fit_config(job, tiny_model, corpus, epochs=3, extra_callbacks=[record[1]]), logs, restart=1)
    assert wait_all(second, logs, 1) == [0, 0], tail(logs, 1)
    # Each rank trains epoch 1 on its share of the epoch's seeded draw exactly once: the requeued leg goes on at the
    # batch after the checkpoint, not at the epoch's first batch.
    split = json.loads((corpus / "split.json").read_text())["train"]
    labels = {item["id"]: item["label"] for item in map(json.loads, (corpus / "corpus.jsonl").open())}
    for rank in (0, 1):
        sampler = BalancedSampler([labels[i] for i in split], 0, 2, rank)
        sampler.set_epoch(1)
        share = [split[i] for i in sampler]
        expected = [share[k:k + 2] for k in range(0, len(share), 2)]
        legs = [[json.loads(line) for line in Path(f"{tmp_path / f'batches{leg}'}.{rank}").open()] for leg in (0, 1)]
        trained = [ids for epoch, batch, ids in legs[0] if epoch == 1 and batch <= 1]
        trained += [ids for epoch, _, ids in legs[1] if epoch == 1]
        assert trained == expected, rank
    resumed = train_steps(job / "logs" / "metrics.csv")
    assert min(resumed) == paused_at, "did not continue at the requeue checkpoint's step"
    assert max(resumed) == 3 * per_epoch - 1 and resumed[max(resumed)] == 2
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert final["global_step"] == 3 * per_epoch and final["epoch"] == 2
    assert (run / "export" / "prism.json").is_file()
    assert f"Restoring states from the checkpoint path at {run / 'hpc_ckpt_1.ckpt'}" in \
        (logs / "rank0-restart1.log").read_text()
    assert fake_scontrol.read_text().splitlines() == [f"requeue {JOB_ID}"]  # no second requeue


# --------------------------------------------------------------------------- preflight: devices × nodes vs allocation
@pytest.mark.parametrize("devices,nodes,env", [
    (2, 1, dict(SLURM_NTASKS=2, SLURM_NTASKS_PER_NODE=2, SLURM_NNODES=1)),
    (4, 2, dict(SLURM_NTASKS=8, SLURM_NTASKS_PER_NODE=4, SLURM_JOB_NUM_NODES=2)),
    (1, 1, dict(SLURM_NTASKS=1)),
])
def test_an_allocation_that_matches_says_nothing(devices, nodes, env):
    assert slurm.allocation_problem(devices, nodes, {k: str(v) for k, v in env.items()}) is None


@pytest.mark.parametrize("devices,nodes,env,suggest", [
    (2, 1, dict(SLURM_NTASKS=4, SLURM_NTASKS_PER_NODE=4, SLURM_NNODES=1), "trainer.devices 4 and trainer.num_nodes 1"),
    (4, 1, dict(SLURM_NTASKS=8, SLURM_NTASKS_PER_NODE=4, SLURM_NNODES=2), "trainer.devices 4 and trainer.num_nodes 2"),
    (4, 1, dict(SLURM_NTASKS=1, SLURM_NNODES=1), "trainer.devices 1 and trainer.num_nodes 1"),
])
def test_a_multi_process_trainer_that_disagrees_is_refused_naming_both(devices, nodes, env, suggest):
    message, fatal = slurm.allocation_problem(devices, nodes, {k: str(v) for k, v in env.items()})
    assert fatal and "\n" not in message and suggest in message
    assert f"Slurm starts {env['SLURM_NTASKS']} task" in message
    assert f"trainer.devices × trainer.num_nodes = {devices} × {nodes} = {devices * nodes}" in message
    assert "#SBATCH --ntasks-per-node / --nodes" in message


def test_a_single_process_trainer_in_a_larger_allocation_warns():
    message, fatal = slurm.allocation_problem(1, 1, {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "4"})
    assert not fatal and "trainer.devices 4" in message and "every task trains its own copy" in message


def test_the_cli_refuses_a_disagreeing_allocation_in_one_line(tiny_model, tmp_path, slurm_env, capsys):
    """Before any process group exists: Lightning alone would raise at launch with a traceback."""
    slurm_env(SLURM_JOB_ID=JOB_ID, SLURM_JOB_NAME="prism", SLURM_NTASKS=4, SLURM_NTASKS_PER_NODE=4, SLURM_NNODES=1,
              SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NODEID=0, SLURM_NODELIST="127.0.0.1")
    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 4)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(fit_config(tmp_path, tiny_model, corpus)), "--trainer.devices", "2",
              "--trainer.strategy", "ddp"])
    assert done.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: Slurm allocation and trainer disagree: Slurm starts 4 tasks")
    assert "= 2 × 1 = 2" in last and "set trainer.devices 4 and trainer.num_nodes 1" in last


def test_preflight_on_a_matching_allocation_prints_nothing_and_resumes_from_the_newest(tmp_path, slurm_env,
                                                                                       capsys):
    slurm_env(SLURM_JOB_ID=JOB_ID, SLURM_JOB_NAME="prism", SLURM_NTASKS=2, SLURM_NTASKS_PER_NODE=2, SLURM_NNODES=1,
              SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NODEID=0, SLURM_NODELIST="127.0.0.1")
    previous = signal.getsignal(signal.SIGUSR1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", default_root_dir=str(tmp_path), logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    try:
        config = {"ckpt_path": None}
        slurm.preflight(trainer, "fit", config)  # the first submission: nothing to resume
        assert config["ckpt_path"] is None and capsys.readouterr().err == ""
        assert any(isinstance(c, slurm.SlurmRequeue) for c in trainer.callbacks)
        assert signal.getsignal(signal.SIGUSR1) != previous
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"")
        (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
        os.utime(tmp_path / "hpc_ckpt_1.ckpt", (1_000, 1_000))  # an older requeue, then a preemption: last is newer
        slurm.preflight(trainer, "fit", config)
        assert config["ckpt_path"] == str(tmp_path / "checkpoints" / "last.ckpt")
        given = {"ckpt_path": "some.ckpt"}
        slurm.preflight(trainer, "fit", given)  # an explicit --ckpt_path wins
        assert given["ckpt_path"] == "some.ckpt"
        config = {"ckpt_path": None}
        slurm.preflight(trainer, "validate", config)  # only fit resumes by itself
        assert config["ckpt_path"] is None
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_newest_checkpoint_reads_inside_a_deepspeed_directory(tmp_path):
    (tmp_path / "checkpoints" / "last.ckpt" / "checkpoint").mkdir(parents=True)
    shard = tmp_path / "checkpoints" / "last.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt"
    shard.write_bytes(b"")
    hpc = tmp_path / "hpc_ckpt_2.ckpt"
    hpc.write_bytes(b"")
    os.utime(hpc, (2_000, 2_000))
    os.utime(shard, (3_000, 3_000))
    os.utime(shard.parent.parent, (1_000, 1_000))  # the directory's own time stays old when files are rewritten
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), checkpoint_callbacks=[])
    assert slurm.newest_checkpoint(trainer) == tmp_path / "checkpoints" / "last.ckpt"
    os.utime(hpc, (4_000, 4_000))
    assert slurm.newest_checkpoint(trainer) == hpc
    assert slurm.newest_checkpoint(SimpleNamespace(default_root_dir=str(tmp_path / "none"),
                                                   checkpoint_callbacks=[])) is None


# --------------------------------------------------------------------------- the requeue signal outside training
def test_outside_training_rank_zero_requeues_at_once(fake_scontrol, slurm_env, capsys):
    """Loading, bootstrap, sanity check, export: no training state to save; the rerun continues from the files."""
    slurm_env(SLURM_JOB_ID=JOB_ID, SLURM_PROCID=0)
    requeue = slurm.SlurmRequeue()
    requeue._on_signal(signal.SIGUSR1, None)
    assert fake_scontrol.read_text().splitlines() == [f"requeue {JOB_ID}"] and requeue.phase == "requeued"
    requeue._on_signal(signal.SIGUSR1, None)  # a second signal does not requeue twice
    assert len(fake_scontrol.read_text().splitlines()) == 1
    assert "requeued Slurm job 4242" in " ".join(capsys.readouterr().err.split())


def test_during_training_the_signal_only_sets_the_flag(fake_scontrol, slurm_env):
    slurm_env(SLURM_JOB_ID=JOB_ID, SLURM_PROCID=0)
    requeue = slurm.SlurmRequeue()
    requeue.phase = "training"
    requeue._on_signal(signal.SIGUSR1, None)
    assert requeue.received and not fake_scontrol.exists()


def test_other_ranks_and_array_tasks(fake_scontrol, slurm_env):
    slurm_env(SLURM_JOB_ID="99", SLURM_ARRAY_JOB_ID="90", SLURM_ARRAY_TASK_ID="3", SLURM_PROCID=1)
    slurm.SlurmRequeue()._on_signal(signal.SIGUSR1, None)
    assert not fake_scontrol.exists()  # rank 0 requeues for the whole job
    slurm_env(SLURM_PROCID=0)
    slurm.SlurmRequeue()._on_signal(signal.SIGUSR1, None)
    assert fake_scontrol.read_text().splitlines() == ["requeue 90_3"]


def test_a_failed_requeue_says_to_resubmit(tmp_path, slurm_env, monkeypatch, capsys):
    slurm_env(SLURM_JOB_ID=JOB_ID, SLURM_PROCID=0)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol at all, as inside some containers
    slurm.SlurmRequeue()._on_signal(signal.SIGUSR1, None)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: `scontrol requeue {JOB_ID}` failed (exit 127); resubmit the same sbatch")


# --------------------------------------------------------------------------- the sbatch templates
def sbatch_options(template: Path) -> dict[str, str]:
    """The ``#SBATCH --key=value`` lines (before the first command, where sbatch reads them)."""
    options = {}
    for line in template.read_text().splitlines():
        if line.startswith("#SBATCH"):
            key, _, value = line.split(None, 1)[1].partition("=")
            options[key] = value
        elif line.strip() and not line.startswith("#"):
            break
    return options


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_sbatch_template_matches_the_config_it_launches(template, tmp_path, capsys, monkeypatch):
    """Run the script with a recording `srun`; compose the config it launches; compare with its #SBATCH lines."""
    monkeypatch.chdir(ROOT)  # the script's paths are relative to the repository root, where sbatch is run
    options = sbatch_options(template)
    assert {"--signal": "SIGUSR1@90", "--requeue": "", "--open-mode": "append"}.items() <= options.items()
    assert [k for k, v in options.items() if v in ("ACCOUNT", "PARTITION")] == ["--account", "--partition"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorded = tmp_path / "srun.args"
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {shlex.quote(str(recorded))}\n')
    (bin_dir / "srun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID=JOB_ID,
               SLURM_CPUS_PER_TASK=options["--cpus-per-task"])
    done = subprocess.run(["bash", str(template)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    argv = recorded.read_text().splitlines()
    assert argv[:2] == ["prism", "fit"] and "--ckpt_path" not in argv  # a first submission has no checkpoint yet
    with pytest.raises(SystemExit):
        main([*argv[1:], "--print_config"])
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert int(trainer["devices"]) == int(options["--ntasks-per-node"])  # the CLI keeps "4" as a string
    assert int(trainer["num_nodes"]) == int(options["--nodes"])
    assert re.fullmatch(r"gpu:(\d+)", options["--gres"]).group(1) == options["--ntasks-per-node"]  # one GPU a task
    assert trainer["accelerator"] == "gpu" and trainer["strategy"] == "ddp"


def test_the_readme_submits_the_templates_and_quotes_the_real_error():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Running on a cluster"):]
    section = section[:section.index("\n## ", 4)]
    submitted = re.findall(r"^sbatch --account=ACCOUNT --partition=PARTITION (configs/slurm/\S+)$", section, re.M)
    assert sorted(ROOT / p for p in submitted) == TEMPLATES
    allocation = {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2"}
    message, _ = slurm.allocation_problem(4, 1, allocation)
    assert f"error: {message}" in " ".join(section.split())
