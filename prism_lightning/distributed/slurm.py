"""Slurm: the allocation preflight, resuming a requeued job, and auto-requeue that saves at a step boundary.

Lightning's ``SLURMEnvironment`` (detected under ``srun``) supplies ranks, addresses and ``auto_requeue``; its
own handler saves ``hpc_ckpt_N.ckpt`` and runs ``scontrol requeue`` *inside* the SIGUSR1 handler. That save
ends in a barrier, so under DDP it deadlocks whenever the ranks are not at the same point when the signal lands
(measured here: SIGUSR1 to rank 0 of a 2-process fit wrote the file and hung in the barrier, scontrol never ran;
Lightning issue #21406). :class:`SlurmRequeue` keeps Lightning's file names and restore path but only records
the signal; at the next training-step boundary every rank agrees (one all-reduce), saves together, rank 0
requeues, and every rank exits.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Mapping, MutableMapping, Optional

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback

from prism_lightning.utils.errors import PrismError
from prism_lightning.utils.progress import announce


class SlurmRequeued(SystemExit):
    """Ends every rank after the requeue checkpoint is saved (exit status 128 + the signal, like SIGTERM's 143)."""


def _int(env: Mapping[str, str], *keys: str) -> Optional[int]:
    """The first of ``keys`` set to a whole number, else None (Slurm leaves unset what the job did not ask for)."""
    for key in keys:
        value = env.get(key, "").strip()
        if value.isdigit():
            return int(value)
    return None


def allocation_problem(devices: int, num_nodes: int, env: Mapping[str, str] = os.environ) -> Optional[tuple[str, bool]]:
    """One line when ``devices × num_nodes`` disagrees with the Slurm allocation, and whether it is fatal.

    Fatal when the trainer wants several processes: Lightning then refuses at launch with a traceback
    (``--ntasks-per-node``/``--nodes`` mismatch) or the ranks wait for processes that never start. A single-process
    trainer in a larger allocation only warns: it is right in the batch step of a job (e.g. ``prism export`` run
    without ``srun``), wrong when ``srun`` starts one independent copy per task.
    """
    tasks = _int(env, "SLURM_NTASKS")
    if tasks is None:
        return None
    per_node = _int(env, "SLURM_NTASKS_PER_NODE")
    nodes = _int(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    wanted = devices * num_nodes
    if wanted == tasks and per_node in (None, devices) and nodes in (None, num_nodes):
        return None
    nodes = nodes or 1
    per_node = per_node or max(1, tasks // nodes)
    slurm = f"{tasks} task{'s' if tasks != 1 else ''} ({nodes} node{'s' if nodes != 1 else ''} × {per_node} per node)"
    trainer = f"trainer.devices × trainer.num_nodes = {devices} × {num_nodes} = {wanted}"
    if wanted == 1:
        return (f"the trainer runs 1 process ({trainer}) in a Slurm allocation of {slurm}: under srun every task "
                f"trains its own copy; set trainer.devices {per_node} and trainer.num_nodes {nodes}, or #SBATCH "
                f"--ntasks-per-node=1", False)
    return (f"Slurm allocation and trainer disagree: Slurm starts {slurm}, but {trainer}; set trainer.devices "
            f"{per_node} and trainer.num_nodes {nodes}, or change #SBATCH --ntasks-per-node / --nodes to match", True)


def newest_checkpoint(trainer: L.Trainer) -> Optional[Path]:
    """The run's newest resumable checkpoint: ``<root>/hpc_ckpt_N.ckpt`` or a checkpoint callback's ``last*.ckpt``.

    By modification time, of the newest file inside for a directory (a DeepSpeed checkpoint rewrites its files in
    place, which leaves the directory's own time unchanged).
    """
    root = Path(trainer.default_root_dir)
    directories = {root / "checkpoints"} | {Path(c.dirpath) for c in trainer.checkpoint_callbacks
                                             if getattr(c, "dirpath", None)}
    candidates = set(root.glob("hpc_ckpt_*.ckpt"))
    for directory in directories:
        candidates |= set(directory.glob("last*.ckpt"))

    def written(path: Path) -> float:
        times = [p.stat().st_mtime for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
        return max(times, default=path.stat().st_mtime)

    return max(candidates, key=written, default=None)


def _job_id(env: Mapping[str, str] = os.environ) -> str:
    """The id ``scontrol requeue`` takes: ``ARRAYJOB_TASK`` for an array task, else ``SLURM_JOB_ID``."""
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return env.get("SLURM_JOB_ID", "")


def scontrol_requeue(job_id: str) -> int:
    """Run ``scontrol requeue JOB``; its exit status (127 when scontrol is missing, e.g. inside a container)."""
    if not re.fullmatch(r"[0-9_]+", job_id):
        return 2
    try:
        return subprocess.run(["scontrol", "requeue", job_id], timeout=120).returncode
    except FileNotFoundError:
        return 127
    except subprocess.TimeoutExpired:
        return 124


def requeue_and_report(event: str, failure_prefix: str, then: str, resubmit_then: str) -> None:
    """Run ``scontrol requeue`` for this job and say in one line what happened (or what to do when it failed)."""
    job = _job_id()
    code = scontrol_requeue(job)
    if code == 0:
        announce("requeue", f"{event}; requeued Slurm job {job}, {then}")
    else:
        print(f"error: {failure_prefix}`scontrol requeue {job}` failed (exit {code}); resubmit the same sbatch "
              f"command, {resubmit_then}", file=sys.stderr, flush=True)


class SlurmRequeue(Callback):
    """Lightning's SLURM auto-requeue, with the checkpoint saved at a training-step boundary on every rank.

    The requeue signal (SIGUSR1, sent ``--signal=SIGUSR1@90`` seconds before the time limit) only sets a flag
    while training runs; after each optimizer step and at each epoch's end all ranks all-reduce the flag, and if
    any rank got the signal they save Lightning's ``<root>/hpc_ckpt_N.ckpt`` together, rank 0 runs ``scontrol
    requeue``, and every rank exits. Outside the training loop (loading, bootstrap, sanity check, export) there is
    no training state to save: rank 0 requeues at once and Slurm stops the job; the requeued run picks up the
    bootstrap's stage files or the newest checkpoint.
    """

    def __init__(self, requeue_signal: signal.Signals = signal.SIGUSR1) -> None:
        self.requeue_signal = signal.Signals(requeue_signal)
        self.received = False
        self.phase = "before"  # before | training | after | requeued
        self._checked_step = -1
        self._pid = os.getpid()
        self._previous: Any = None

    def install(self) -> None:
        """Own the requeue signal in this process (Lightning then leaves it alone: it skips a handled signal)."""
        self._pid = os.getpid()
        self._previous = signal.signal(self.requeue_signal, self._on_signal)

    def uninstall(self) -> None:
        """Give the signal back to whatever handled it before :meth:`install`."""
        if self._previous is not None:
            signal.signal(self.requeue_signal, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        """Record the signal; outside training, rank 0 requeues immediately (nothing needs saving)."""
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: Slurm signals it too, its parent acts
        if self.phase == "training":
            self.received = True
        elif self.phase in ("before", "after") and os.environ.get("SLURM_PROCID", "0") == "0":
            self.phase = "requeued"
            requeue_and_report(f"{self.requeue_signal.name} outside the training loop", "",
                               "which continues from the run's files",
                               "it continues from the run's files")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """From here a signal waits for the next step boundary."""
        if self.phase != "requeued":
            self.phase = "training"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """After every optimizer step: save and requeue if any rank got the signal."""
        if trainer.global_step != self._checked_step:  # not mid-accumulation: gradients are never saved
            self._checked_step = trainer.global_step
            self._requeue_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After validation, which can outlast the signal's lead time on a large model."""
        self._requeue_if_signalled(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Training is over; a later signal requeues at once (the rerun resumes at the end and exports)."""
        if self.phase == "training":
            self.phase = "after"

    def _requeue_if_signalled(self, trainer: L.Trainer) -> None:
        """A collective: every rank calls it at the same step, so all of them agree and save together."""
        if self.phase != "training" or not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        self.phase = "requeued"
        # Rank 0 names the file: ranks listing the directory while rank 0 writes would pick different numbers.
        path = trainer.strategy.broadcast(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir), 0)
        for logger in trainer.loggers:
            logger.save()  # metrics logged so far reach disk before the process ends
        # Every rank (ZeRO writes shards), then a barrier: the file is complete before the requeue can stop the job.
        trainer.save_checkpoint(path, weights_only=False)
        if trainer.is_global_zero:
            where = f"saved {path} at global step {trainer.global_step}"
            requeue_and_report(f"{self.requeue_signal.name} before the time limit: {where}", f"{where}, but ",
                               "which resumes from it", "it resumes from that checkpoint")
        raise SlurmRequeued(128 + self.requeue_signal)


def preflight(trainer: L.Trainer, subcommand: Optional[str], config: Optional[MutableMapping[str, Any]]) -> None:
    """Under Slurm (Lightning's ``SLURMEnvironment``): check the allocation, then for ``fit`` resume and requeue.

    ``fit`` without ``--ckpt_path`` continues from the run's newest checkpoint, so a requeued job resumes whether
    it was requeued after SIGUSR1 (``hpc_ckpt_N.ckpt`` is newest), preempted or hit by a node failure (only
    ``last.ckpt`` exists); Lightning alone would take an older ``hpc_ckpt_N.ckpt`` over a newer ``last.ckpt``, or
    start from scratch. The path goes into ``config`` (the subcommand's parsed config), so the CLI resolves and
    checks it as it does ``--ckpt_path FILE``. Called by the ``prism`` CLI once the Trainer is built, before any
    process group exists.
    """
    environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
    if not isinstance(environment, SLURMEnvironment):
        return
    rank_zero = os.environ.get("SLURM_PROCID", "0") == "0"
    problem = allocation_problem(trainer.num_devices, trainer.num_nodes)
    if problem is not None:
        message, fatal = problem
        if fatal:
            raise PrismError(message)
        if rank_zero:
            print(f"warning: {message}", file=sys.stderr, flush=True)
    if subcommand not in ("fit", "bootstrap"):
        return
    if subcommand == "fit" and config is not None and not config.get("ckpt_path"):
        newest = newest_checkpoint(trainer)
        if newest is not None:
            config["ckpt_path"] = str(newest)
            if rank_zero:
                announce("resume", f"{newest} (the run's newest checkpoint; Slurm job {_job_id() or '?'})")
    if environment.auto_requeue and environment.requeue_signal is not None:
        requeue = SlurmRequeue(environment.requeue_signal)
        requeue.install()
        if subcommand == "fit":
            trainer.callbacks.append(requeue)
