"""Every `prism` command of the README's command table, run as written through the real CLI on the embedded model.

The commands are read from README.md itself, so a command added there is covered here. ``C`` is
configs/quickstart.yaml (its callbacks included) plus a small overlay (2 personas x 5 queries, short
generations, a tiny benchmark) so that the whole table runs in minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_benchmarks import write_tiny_benchmarks

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PRISM = [sys.executable, "-m", "prism_lightning.cli"]


def readme_section(start: str) -> str:
    """The README from ``start`` (a heading or bold lead) up to the next ``## `` heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(start):]
    return section[:section.index("\n## ", 4)]


def readme_commands() -> list[str]:
    """The `prism ...` commands of the README's command table, optional [parts] included, in table order."""
    section = readme_section("## Commands")
    commands = re.findall(r"^\| `(prism [^`]+)` \|", section, flags=re.M)
    return [re.sub(r"\[([^\]]+)\]", r"\1", c) for c in commands]


def write_fixtures(tmp: Path) -> dict[str, str]:
    """Overlay config, a predict file, and tiny benchmark files the test writes itself."""
    mt_bench, harmbench = write_tiny_benchmarks(tmp)
    predict = tmp / "prompts.jsonl"
    predict.write_text(json.dumps({"prompt": "Write a haiku about rain."}) + "\n"
                       + json.dumps({"id": "q2", "prompt": "What is 17 * 23?"}) + "\n")
    overlay = {
        "trainer": {"default_root_dir": str(tmp / "run"), "enable_progress_bar": False},
        "data": {
            "personas": {"names": ["math", "writing"], "granularity": "half"},
            "queries": {"per_persona": 5, "decoding": {"temperature": 0.9, "max_new_tokens": 32, "seed": 1,
                                                       "batch_size": 16}},
            "answers": {"decoding": {"temperature": 0.7, "max_new_tokens": 24, "seed": 2, "batch_size": 16}},
            "judge": {"control_pairs": 4, "batch_size": 8, "max_answer_tokens": 48},
            "max_length": 192,
            "benchmark": {"mmlu_n": 8, "mt_bench": str(mt_bench), "harmbench": str(harmbench), "preference_n": 2,
                          "decoding": {"max_new_tokens": 8, "temperature": 0.0, "seed": 0, "batch_size": 8},
                          "safety_max_new_tokens": 8},
        },
    }
    small = tmp / "small.yaml"
    small.write_text(yaml.safe_dump(overlay))
    # The quickstart's MMLU check (its last callback) on 8 items instead of 60: ~40 s less per command that runs it.
    return {"C": f"{ROOT / 'configs' / 'quickstart.yaml'} --config {small} --trainer.callbacks.init_args.n 8",
            "P.jsonl": str(predict), "D": str(tmp / "exported"), "<cmd>": "fit"}


# `prism study` on the overlay with one matched-persona condition besides no persona and the two controls (the
# default grid has six): the command as written, at a third of its cost; tests/test_study_cli.py covers the grid.
STUDY_SMALL = ["--study.granularities", "[min]", "--study.placements", "[system]"]


def expand(command: str, values: dict[str, str]) -> list[str]:
    """The README command with its placeholders (C, P.jsonl, D, <cmd>) replaced, as an argv after `prism` (plus
    STUDY_SMALL for the study)."""
    words = []
    for word in command.split()[1:]:
        words += values[word].split() if word in values else [word]
    return words + (STUDY_SMALL if words[0] == "study" else [])


@pytest.fixture(scope="module")
def table_run(tmp_path_factory) -> dict:
    """Run the table top to bottom once; keep each command's result and the manifest bytes after each."""
    tmp = tmp_path_factory.mktemp("readme")
    values = write_fixtures(tmp)
    manifest = tmp / "run" / "corpus" / "manifest.json"
    results = []
    # The table in order, then bootstrap once more: rerun on a finished run, it must change nothing.
    for command in [*readme_commands(), "prism bootstrap --config C"]:
        out = subprocess.run([*PRISM, *expand(command, values)], capture_output=True, text=True, timeout=900,
                             cwd=tmp, env={**os.environ, "TERM": "dumb", "COLUMNS": "200"})
        results.append({"command": command, "out": out,
                        "manifest": manifest.read_bytes() if manifest.is_file() else None})
    return {"tmp": tmp, "results": results, "values": values}


def test_the_readme_lists_every_command():
    names = {c.split()[1] for c in readme_commands()}
    assert {"bootstrap", "fit", "validate", "export", "predict", "test"} <= names
    assert any("--print_config" in c for c in readme_commands())


def test_every_readme_command_exits_zero(table_run):
    for result in table_run["results"]:
        out = result["out"]
        assert out.returncode == 0, f"{result['command']}\n{out.stderr[-3000:]}"


def test_fit_tells_the_truth_about_judge_and_gate(table_run):
    fit = next(r["out"] for r in table_run["results"] if r["command"] == "prism fit --config C")
    text = fit.stdout + fit.stderr
    for stage in ("bootstrap", "training", "calibration", "export"):
        assert f"== prism: {stage}" in text, stage
    assert "Judge control accuracy: relevance" in text and "quality" in text
    flat = " ".join(text.split())
    assert re.search(r"Distillation: held-out KL\(teacher ‖ student\) after 2 epochs [\d.]+ \([+-][\d.]+% from "
                     r"[\d.]+ at initialisation\)", flat), flat[-3000:]
    assert re.search(r"Gate: held-out AUROC [\d.]+ \(95% CI", text)
    # One judged pair per query (the quickstart's default): the verdict says the labels' reliability is unmeasured.
    assert "Labels' reliability: not measured (one sample per query (data.labels.samples = 1)" in flat
    assert "Tip:" not in text and "tensorboardX" not in text


def test_prism_test_shows_each_judges_control_accuracy(table_run):
    test = next(r["out"] for r in table_run["results"] if r["command"].startswith("prism test"))
    flat = " ".join((test.stdout + test.stderr).split())
    for judge in ("Refusal", "Grade", "Preference"):
        assert re.search(rf"{judge} judge control accuracy \d+% \(95% CI \d+%–\d+%, n = \d+\)\. "
                         r"(AT CHANCE|Above chance)", flat), judge
    report = (table_run["tmp"] / "run" / "benchmark" / "report.md").read_text()
    assert "| judge control accuracy |" in report


def test_commands_that_read_a_run_leave_its_files_alone(table_run):
    results = table_run["results"]
    fit_index = next(i for i, r in enumerate(results) if r["command"] == "prism fit --config C")
    after_fit = results[fit_index]["manifest"]
    assert after_fit is not None
    readers = [r for r in results[fit_index + 1:] if r["command"].split()[1] in ("validate", "predict", "test",
                                                                                  "export", "bootstrap")]
    assert readers and all(r["manifest"] == after_fit for r in readers)
    seconds = json.loads(after_fit)["seconds"]
    assert seconds["queries"] > 1 and seconds["answers"] > 1, seconds  # real stage timings, not a rerun's ~0 s
    run = table_run["tmp"] / "run"
    assert (run / "calibration" / "validate.json").is_file()
    fit_calibration = json.loads((run / "calibration" / "calibration.json").read_text())
    assert fit_calibration["epoch"] == 1  # the fit's last epoch, not rewritten by validate


def test_everything_lands_under_the_run_root(table_run):
    tmp, run = table_run["tmp"], table_run["tmp"] / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "study" / "study.json").is_file() and (run / "study" / "report.md").is_file()
    assert not (tmp / "runs").exists() and not (tmp / "lightning_logs").exists()
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0", "q2"] and all(r["route"] in ("adapter", "base") for r in rows)
    exported = Path(table_run["values"]["D"])
    assert (exported / "gate.safetensors").is_file() and (exported / "adapter" / "adapter_config.json").is_file()
    assert (run / "benchmark" / "metrics.json").is_file()


# --------------------------------------------------------------------------- the serving section
def readme_serving() -> tuple[str, str, str]:
    """The README's `prism serve` command, its curl call and its openai-client snippet, as written."""
    section = readme_section("## Serving over HTTP")
    blocks = re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)
    serve = next(b for lang, b in blocks if lang == "bash" and b.startswith("prism serve")).strip()
    curl = next(b for lang, b in blocks if lang == "bash" and b.startswith("curl")).strip()
    snippet = next(b for lang, b in blocks if lang == "python")
    return serve, curl, snippet


def test_the_readme_serve_commands_answer_with_the_gated_models_own_output(table_run):
    """`prism serve` on the trained export: the README's curl and openai calls get the text, route and gate
    probability that `GatedModel.generate` gives in this process (greedy, same prompt and budget)."""
    import socket
    import time
    import urllib.request

    from prism_lightning.inference.gated_model import GatedModel
    from prism_lightning.model.generation import DecodingConfig

    serve, curl, snippet = readme_serving()
    run = table_run["tmp"] / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    args = [str(run / "export") if w == "runs/quickstart/export" else w for w in serve.split()[1:]]
    server = subprocess.Popen([*PRISM, *args, "--port", port, "--log_level", "warning"], cwd=table_run["tmp"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                time.sleep(0.5)
        by_curl = subprocess.run(["bash", "-c", curl.replace("8000", port)], capture_output=True, text=True,
                                 timeout=300)
        by_client = subprocess.run([sys.executable, "-c", snippet.replace("8000", port)], capture_output=True,
                                   text=True, timeout=300)
    finally:
        server.terminate()
        out, err = server.communicate(timeout=120)
    assert server.returncode == 0 and "stopped by SIGTERM" in out, err[-3000:]
    assert by_client.returncode == 0, by_client.stderr[-3000:]
    reply = json.loads(by_curl.stdout)
    model = GatedModel.from_pretrained(run / "export")
    # One prompt per call, as the server got them (one request at a time: no batch-mates, no padding).
    haiku, product = (model.generate([p], DecodingConfig(max_new_tokens=48))[0]
                      for p in ("Write a haiku about rain.", "What is 17 * 23?"))
    assert reply["choices"][0]["message"]["content"].strip() == haiku["text"]
    assert reply["prism"] == {"route": haiku["route"], "probability": haiku["probability"]}
    assert reply["usage"]["prompt_tokens"] == len(model.prompt_ids("Write a haiku about rain."))
    assert repr({"route": product["route"], "probability": product["probability"]}) in by_client.stdout
    assert product["text"].split("\n")[0] in by_client.stdout


# --------------------------------------------------------------------------- the lm-eval section
def readme_lm_eval() -> str:
    """The README's `prism lm-eval` command, as written."""
    section = readme_section("## Evaluating with lm-evaluation-harness")
    return next(b for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S) if b.startswith("prism lm-eval"))


def test_the_readme_lm_eval_command_scores_what_prism_test_scores(table_run):
    """`prism lm-eval` on the trained export, as the README writes it: exit 0, the routing table, the routing file
    beside lm-eval's results; its accuracy on prism_mmlu_chat equals the project's own MMLU scorer on the same
    questions and routes."""
    import shlex

    from prism_lightning.evaluation import mmlu
    from prism_lightning.inference.gated_model import GatedModel

    pytest.importorskip("lm_eval")
    command = readme_lm_eval().strip()
    run = table_run["tmp"] / "run"
    args = [w.replace("runs/quickstart/export", str(run / "export")) for w in shlex.split(command)[1:]]
    out = subprocess.run([*PRISM, *args], capture_output=True, text=True, timeout=900, cwd=table_run["tmp"],
                         env={**os.environ, "HF_DATASETS_OFFLINE": "1", "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Routing per task" in out.stdout
    [results] = list((table_run["tmp"] / "runs" / "lm-eval").rglob("results_*.json"))  # this command's only
    routing = json.loads(results.with_name("routing_" + results.name[len("results_"):]).read_text())
    n = json.loads(re.search(r"--metadata '(\{.*?\})'", command).group(1))["n"]
    task = routing["tasks"]["prism_mmlu_chat"]
    assert task["prompts"] == n and task["requests"] == 4 * n
    accuracy = json.loads(results.read_text())["results"]["prism_mmlu_chat"]["acc,none"]
    model = GatedModel.from_pretrained(run / "export")
    rows = mmlu.stratified_sample(mmlu.load_mmlu()[0], n, 0)
    ids = [model.prompt_ids(mmlu.prompt_text(r)) for r in rows]
    letters = mmlu.letter_reader(model.formatter).read(
        lambda p, cols, tail: model.token_logprobs(p, cols, "gate", tail=tail)[0], ids).logprobs
    assert accuracy == pytest.approx(float(mmlu.score(letters, rows, [0, 1, 2, 3]).float().mean()))
    opened = int((model.route(ids) >= model.threshold).sum())
    assert task["routes"].get("adapter", {"prompts": 0})["prompts"] == opened


def test_the_readme_cross_check_agrees_to_the_question(table_run):
    """The README's cross-check block on the trained export (n = 40 instead of 1,000): `prism test`'s Base and
    PRISM rows equal lm-eval's prism_mmlu_chat on routes base and gate, question for question, routing included."""
    import shlex

    section = readme_section("**Cross-check against `prism test`**")
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    run, n = table_run["tmp"] / "run", 40
    for i, line in enumerate(block.strip().splitlines()):
        words = shlex.split(line.replace("runs/demo/export", str(run / "export"))
                            .replace("runs/lm-eval", f"runs/lm-eval-{i}"))[1:]
        if words[0] == "test":  # the trained run's config (the table's C) stands for the demo's
            words = [part for w in words for part in (table_run["values"]["C"].split() if w == "configs/demo.yaml"
                                                      else [str(ROOT / w) if w.startswith("configs/") else w])]
            words += ["--data.benchmark.mmlu_n", str(n)]
        else:
            words += ["--metadata", json.dumps({"n": n})]
        out = subprocess.run([*PRISM, *words], capture_output=True, text=True, timeout=900, cwd=table_run["tmp"],
                             env={**os.environ, "HF_DATASETS_OFFLINE": "1", "COLUMNS": "200"})
        assert out.returncode == 0, (line, out.stderr[-3000:])
    metrics = json.loads((run / "benchmark" / "metrics.json").read_text())

    def correct(row: str) -> int:
        scores = metrics["rows"][row]["scores"]
        return sum(round(scores[k] * metrics["counts"][k] / 100) for k in metrics["counts"])

    def lm_eval(i: int, task: str) -> tuple[float, dict]:
        [results] = list((table_run["tmp"] / f"runs/lm-eval-{i}").rglob("results_*.json"))
        routing = json.loads(results.with_name("routing_" + results.name[len("results_"):]).read_text())
        return json.loads(results.read_text())["results"][task]["acc,none"], routing["tasks"][task]

    base, _ = lm_eval(1, "prism_mmlu_chat")
    gate, task = lm_eval(3, "prism_mmlu_chat")
    own, _ = lm_eval(2, "prism_mmlu")
    assert sum(metrics["counts"].values()) == n
    assert base == pytest.approx(correct("Base") / n) and gate == pytest.approx(correct("PRISM") / n)
    assert task["routes"].get("adapter", {"prompts": 0})["prompts"] == \
        metrics["rows"]["PRISM"]["routed"]["MMLU"]["adapter"]
    assert 0 <= own <= 1
