"""Helpers for the multi-process tests: a callback that records the in-memory gate, and a `prism` subprocess runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L

TESTS = Path(__file__).resolve().parent
PROBE_PROMPTS = ["What is 17 times 23?", "Write a haiku about rain.", "hello there", "Explain recursion briefly."]


class GateProbe(L.Callback):
    """At fit end, the trained module's gate probabilities for PROBE_PROMPTS, written to ``path`` by rank 0.

    Every rank computes them: under ZeRO-3 the forward that reads layer 0 is a collective.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.model.eval()
        gated = pl_module.gated()
        probs = gated.route([gated.prompt_ids(p) for p in PROBE_PROMPTS]).tolist()
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps({"probabilities": probs, "world_size": trainer.world_size}))


def prism_env(cpu: bool = True) -> dict:
    """Environment for a `prism` subprocess: tests importable (callbacks by class_path), plain logs, and on CPU
    DeepSpeed's CPU accelerator even on a machine with CUDA."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "TERM": "dumb", "OMP_NUM_THREADS": "1"}
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def run_prism(*args: str, timeout: float = 600, cpu: bool = True) -> subprocess.CompletedProcess:
    """`python -m prism_lightning.cli ARGS` in a new process; fails the test with the output's tail when it fails."""
    out = subprocess.run([sys.executable, "-m", "prism_lightning.cli", *args], capture_output=True, text=True,
                         env=prism_env(cpu), timeout=timeout, start_new_session=True)
    if out.returncode != 0:
        raise AssertionError(f"prism {' '.join(args[:1])} exited {out.returncode}:\n{out.stderr[-4000:]}")
    return out


def route_export(export: Path) -> list[float]:
    """Gate probabilities of PROBE_PROMPTS from an export, loaded by GatedModel in a fresh process."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[2]); from dist_helpers import PROBE_PROMPTS; "
            "from prism_lightning import GatedModel; m = GatedModel.from_pretrained(sys.argv[1], device='cpu'); "
            "print(json.dumps(m.route([m.prompt_ids(p) for p in PROBE_PROMPTS]).tolist()))")
    out = subprocess.run([sys.executable, "-c", code, str(export), str(TESTS)], capture_output=True, text=True,
                         env=prism_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def trainable_only(state: dict) -> bool:
    """Whether a state dict holds nothing of the frozen base (only LoRA weights and the gate)."""
    return all("lora_" in k or k.startswith("gate.") for k in state)

