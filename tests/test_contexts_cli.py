"""Context kinds and K-way PRISM through the real CLI on the embedded model: the documented configs
(configs/contexts/*.yaml) with a small overlay (few queries, short generations, one epoch), one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PRISM = [sys.executable, "-m", "prism_lightning.cli"]


def small(tmp: Path, root: str, per_persona: int, **data) -> Path:
    """An overlay that keeps a config's contexts and callbacks but makes the run take a minute or two."""
    overlay = {
        "trainer": {"default_root_dir": str(tmp / root), "max_epochs": 1, "enable_progress_bar": False},
        "data": {"queries": {"per_persona": per_persona, "max_rounds": 1,
                             "decoding": {"temperature": 0.9, "max_new_tokens": 32, "seed": 1, "batch_size": 16}},
                 "answers": {"decoding": {"temperature": 0.7, "max_new_tokens": 24, "seed": 2, "batch_size": 16}},
                 "judge": {"control_pairs": 4, "batch_size": 8, "max_answer_tokens": 48}, **data},
    }
    path = tmp / f"{root}.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def prism(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PRISM, *args], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "TERM": "dumb"})


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("memory")
    result = prism("fit", "--config", "configs/contexts/memory.yaml", "--config", str(small(tmp, "run", 9)))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


def routing_ids(run: Path) -> set[str]:
    """The held-out items the routing report grouped."""
    return set(json.loads((run / "corpus" / "split.json").read_text())["val"])


def test_a_memory_context_runs_end_to_end_and_reports_fidelity(memory_run):
    manifest = json.loads((memory_run / "corpus" / "manifest.json").read_text())
    assert manifest["kinds"] == {"user_memory": "memory"}
    assert manifest["personas"]["user_memory"].startswith("Memory: what you know about the user")
    items = [json.loads(line) for line in (memory_run / "corpus" / "corpus.jsonl").read_text().splitlines()]
    assert {i["intent"] for i in items} == {"inside", "outside"}  # questions it answers, and others
    routing = json.loads((memory_run / "routing" / "epoch0.json").read_text())
    held_out = {i["intent"] for i in items if i["id"] in routing_ids(memory_run)}
    assert held_out and {f"intent/{x}" for x in held_out} <= set(routing["rates"])  # routing per intent
    report = json.loads((memory_run / "context_fidelity" / "user_memory.json").read_text())
    rows = report["rows"]
    assert list(rows) == ["Base, no context", "Base + context", "PRISM, no context", "Adapter always on, no context"]
    assert report["n_probes"] == 12 and report["routing"]["unrelated"]["n"] == 24
    # The memory placed in the prompt must be read: the embedded model copies the facts it is shown.
    assert rows["Base + context"]["rate"] >= rows["Base, no context"]["rate"] + 0.5
    assert all(0 <= r["ci95"][0] <= r["rate"] <= r["ci95"][1] <= 1 for r in rows.values())
    assert (memory_run / "export" / "prism.json").is_file()


def test_k_way_fit_exports_three_adapters_that_route_a_mixed_batch(tmp_path):
    overlay = small(tmp_path, "multi", 4)
    # Context fidelity is the memory test's subject; here its two probe runs (~5 of the test's 7 minutes on 2
    # cores) would check nothing this test asserts, so the overlay keeps the checkpoint and calibration only.
    spec = yaml.safe_load(overlay.read_text())
    spec["trainer"]["callbacks"] = [
        {"class_path": "prism_lightning.training.callbacks.run_checkpoint.RunCheckpoint"},
        {"class_path": "prism_lightning.training.callbacks.gate_calibration.GateCalibration",
         "init_args": {"method": "balanced_accuracy"}}]
    overlay.write_text(yaml.safe_dump(spec))
    result = prism("fit", "--config", "configs/contexts/multi.yaml", "--config", str(overlay))
    assert result.returncode == 0, result.stderr[-3000:]
    export = tmp_path / "multi" / "export"
    config = json.loads((export / "prism.json").read_text())
    assert config["gate"]["adapters"] == ["memory", "tools", "passages"]
    script = f"""
import json, torch
from prism_lightning import GatedModel
from prism_lightning.model.generation import DecodingConfig
g = GatedModel.from_pretrained({str(export)!r})
prompts = [json.loads(l)["question"] for l in open("configs/contexts/memory/probes.jsonl")][:16]
ids = [g.prompt_ids(p) for p in prompts]
probs, choice = g.gate_outputs(ids)
g.threshold = float(probs.median())
mixed = g.generate_ids(ids, DecodingConfig(max_new_tokens=6, batch_size=16))
alone = [g.generate_ids([i], DecodingConfig(max_new_tokens=6, batch_size=1),
                        route="base" if r["route"] == "base" else r["adapter"])[0] for i, r in zip(ids, mixed)]
print(json.dumps({{"routes": [r.get("adapter") for r in mixed], "same": [a["text"] == m["text"]
                                                                       for a, m in zip(alone, mixed)],
                  "expected": [g.adapters[int(c)] if p >= g.threshold else None
                               for p, c in zip(probs.tolist(), choice.tolist())]}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    # The threshold at the median opens the gate on about half the rows: each row goes where its own gate output
    # says (base below the threshold, else the adapter it ranks first), whatever the rest of the batch holds.
    assert found["routes"] == found["expected"]
    assert None in found["routes"] and set(found["routes"]) - {None}
    assert all(found["same"])
    # K-way routing asked of a checkpoint trained with fewer adapters: one line, nothing written.
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({"data": {"adapters": {"all": ["user_memory", "tool_registry"],
                                                          "passages": ["harbour_guide"]}}}))
    refused = prism("validate", "--config", "configs/contexts/multi.yaml", "--config", str(overlay),
                    "--config", str(one), "--ckpt_path", "last")
    assert refused.returncode != 0
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "was trained with 3 adapter(s)" in last and "asks for 2" in last


@pytest.mark.parametrize("case, message", [
    ("empty", "context file is empty"),
    ("same name", "two contexts are named 'user_memory'"),
    ("unknown adapter context", "data.adapters.memory: unknown context 'diary'"),
])
def test_bad_context_inputs_end_in_one_line(tmp_path, case, message):
    # a path written in a config file is read from that file's folder: the overlay lives in tmp_path
    contexts = [{"kind": "memory", "path": str(ROOT / "configs/contexts/memory/memory.txt"), "name": "user_memory"}]
    data: dict = {"personas": {"names": [], "contexts": contexts}}
    if case == "empty":
        (tmp_path / "empty.txt").write_text("\n")
        contexts[0]["path"] = str(tmp_path / "empty.txt")
    elif case == "same name":
        contexts.append({"kind": "tools", "path": str(ROOT / "configs/contexts/tools/tools.json"),
                         "name": "user_memory"})
    else:
        data["adapters"] = {"memory": ["diary"]}
    result = prism("fit", "--config", "configs/contexts/memory.yaml", "--config",
                   str(small(tmp_path, "bad", 2, **data)))
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert not (tmp_path / "bad" / "corpus").exists()
