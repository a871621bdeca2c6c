"""`prism bootstrap` on the real embedded model in real subprocesses: SIGKILL at every stage, Ctrl-C and SIGTERM,
resume, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

PRISM = [sys.executable, "-m", "prism_lightning.cli"]


def write_config(tmp: Path, **judge) -> Path:
    """A tiny bootstrap config: 2 personas x 3 queries, short generations, small batches (many kill points)."""
    config = {
        "trainer": {"default_root_dir": str(tmp / "run"), "logger": False},
        "model": {"class_path": "prism_lightning.training.modules.PrismModule"},
        "data": {
            "personas": {"names": ["math", "writing"], "granularity": "half"},
            "queries": {"per_persona": 3, "oversample": 1.5, "max_rounds": 2,
                        "decoding": {"temperature": 0.9, "max_new_tokens": 40, "seed": 1, "batch_size": 2}},
            "answers": {"decoding": {"temperature": 0.7, "max_new_tokens": 24, "seed": 2, "batch_size": 2}},
            "judge": {"control_pairs": 4, "batch_size": 2, "max_answer_tokens": 32, **judge},
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PRISM, "bootstrap", "--config", str(config), *extra], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TERM": "dumb"})


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def stage_file(corpus: Path, stage: str) -> Path | None:
    found = sorted((corpus / "stages").glob(f"{stage}-*.jsonl")) if (corpus / "stages").exists() else []
    return found[0] if found else None


def default_sigint() -> None:
    """Child setup: Ctrl-C handled as Python does by default, even when the test runner was started in the
    background (a shell starts background jobs with SIGINT ignored, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def signal_during(config: Path, corpus: Path, stage: str, sig: int) -> tuple[list[str], str]:
    """Start a bootstrap and send ``sig`` once ``stage`` has written a batch more than it had; return the lines it
    left and the process's stderr."""
    before = len(lines(stage_file(corpus, stage))) if stage_file(corpus, stage) else 0
    proc = subprocess.Popen([*PRISM, "bootstrap", "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            path = stage_file(corpus, stage)
            if path is not None and len(lines(path)) > before:
                proc.send_signal(sig)
                err = proc.communicate(timeout=120)[1]
                assert proc.returncode != 0, (sig, stage, err[-2000:])
                return lines(path), err
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
    pytest.fail(f"bootstrap ended (rc={proc.returncode}) before stage {stage} wrote anything")


# One bootstrap, stopped five times: SIGKILL in each stage, Ctrl-C in stage 2 and SIGTERM in stage 3 (a batch
# later each time), resumed after each; then it finishes.
STOPS = (("queries", signal.SIGKILL), ("answers", signal.SIGINT), ("answers", signal.SIGKILL),
         ("judge", signal.SIGTERM), ("judge", signal.SIGKILL))


@pytest.fixture(scope="module")
def resumed_corpus(tmp_path_factory) -> dict:
    """Stop the bootstrap in every stage with every signal in turn (``STOPS``), resuming each time; then finish."""
    tmp = tmp_path_factory.mktemp("bootstrap")
    config = write_config(tmp)
    corpus = tmp / "run" / "corpus"
    stops = []
    for stage, sig in STOPS:
        left, err = signal_during(config, corpus, stage, sig)
        # Every finished stage's file, as the stopped process left it (a torn last line only after SIGKILL).
        files = {done: lines(stage_file(corpus, done)) for done in ("queries", "answers", "judge")
                 if stage_file(corpus, done)}
        stops.append({"stage": stage, "signal": sig, "left": left, "stderr": err, "files": files})
    result = run(config)
    return {"tmp": tmp, "config": config, "corpus": corpus, "stops": stops, "result": result}


def test_resume_after_every_signal_loses_and_duplicates_nothing(resumed_corpus):
    result, corpus = resumed_corpus["result"], resumed_corpus["corpus"]
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((corpus / "manifest.json").read_text())
    for stop in resumed_corpus["stops"]:
        after = lines(stage_file(corpus, stop["stage"]))
        ids = [json.loads(line)["id"] for line in after]
        assert len(ids) == len(set(ids)), f"duplicated items in stage {stop['stage']}"
        complete_before = [line for line in stop["left"] if line.endswith("}")]
        assert after[:len(complete_before)] == complete_before, f"stage {stop['stage']} lost or rewrote items"
        if stop["signal"] != signal.SIGKILL:  # a handled signal tears no line and says what it kept
            for stage, written in stop["files"].items():
                assert len({json.loads(line)["id"] for line in written}) == len(written), (stop["signal"], stage)
        if stop["signal"] == signal.SIGINT:
            assert stop["stderr"].strip().splitlines()[-1].startswith("error: interrupted; finished work is kept")
    queries = [json.loads(line) for line in lines(corpus / "queries.jsonl")]
    answers = [json.loads(line) for line in lines(stage_file(corpus, "answers"))]
    judged = {json.loads(line)["id"] for line in lines(stage_file(corpus, "judge"))}
    assert {a["id"] for a in answers} == {f"{q['id']}/{p}" for q in queries for p in ("__base__", q["persona"])}
    assert {f"{q['id']}/{q['persona']}" for q in queries} <= judged
    assert manifest["counts"]["queries"] == len(queries) == manifest["counts"]["distill"] + \
        manifest["counts"]["retain"]
    assert manifest["judge"]["control_n"] == 4


def test_manifest_and_summary(resumed_corpus):
    result, corpus = resumed_corpus["result"], resumed_corpus["corpus"]
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["model"]["name_or_path"] == "embedded" and manifest["model"]["fingerprint"]
    assert set(manifest["per_persona"]) == {"math", "writing"}
    for key in ("protocol", "position_bias_rate", "tie_rate", "unparseable", "control_accuracy", "control_n"):
        assert key in manifest["judge"]
    assert "control accuracy" in result.stdout and "distill rate" in result.stdout


def test_compare_scores_every_protocol_once_and_keeps_the_corpus_protocol(resumed_corpus):
    corpus = resumed_corpus["corpus"]
    own = stage_file(corpus, "judge")
    stamp = own.stat().st_mtime_ns
    corpus_before = (corpus / "corpus.jsonl").read_text()
    result = run(write_config(resumed_corpus["tmp"]), "--data.judge.compare", "true")  # as the README has it
    assert result.returncode == 0, result.stderr[-2000:]
    assert own.stat().st_mtime_ns == stamp  # the protocol's own scores are reused, not redone
    assert (corpus / "corpus.jsonl").read_text() == corpus_before  # labels still the configured protocol's
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"queries", "answers", "judge", "judge_pointwise", "judge_likelihood"}
    compare = manifest["judge_compare"]
    assert list(compare["protocols"]) == ["strict", "debiased", "pointwise", "likelihood", "pmi"]
    for row in compare["protocols"].values():
        assert row["control_n"] == 4 and row["quality_n"] == 4 and 0.0 <= row["distill_rate"] <= 1.0
    assert compare["agreement"]["pmi"]["pmi"] == 1.0
    assert "judge protocols on the same" in result.stdout and "agreement of the labels" in result.stdout
    assert manifest["judge"]["quality_n"] == 4 and "quality" in result.stdout
    # A likelihood protocol now relabels from the stored likelihood scores: nothing is scored again.
    stamps = {p.name: p.stat().st_mtime_ns for p in (corpus / "stages").iterdir()}
    result = run(write_config(resumed_corpus["tmp"], protocol="pmi"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in (corpus / "stages").iterdir()} == stamps
    assert json.loads((corpus / "manifest.json").read_text())["judge"]["protocol"] == "pmi"
    run(write_config(resumed_corpus["tmp"]))  # back to the module's corpus for the tests after this one


def test_relabel_reuses_every_stage_and_one_class_error_names_the_knob(resumed_corpus):
    corpus = resumed_corpus["corpus"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (corpus / "stages").iterdir()}
    config = write_config(resumed_corpus["tmp"], margin=1.0e9)
    result = run(config)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "distill (label 1) set is empty" in last and "data.judge.margin" in last
    assert {p.name: p.stat().st_mtime_ns for p in (corpus / "stages").iterdir()} == stamps  # nothing regenerated
    assert json.loads((corpus / "manifest.json").read_text())["counts"]["distill"] == 0


def test_changed_answer_config_regenerates_answers_only(resumed_corpus):
    corpus = resumed_corpus["corpus"]
    before = {p.name for p in (corpus / "stages").iterdir()}
    config = write_config(resumed_corpus["tmp"])
    text = config.read_text().replace("max_new_tokens: 24", "max_new_tokens: 12")
    config.write_text(text)
    result = run(config)
    after = {p.name for p in (corpus / "stages").iterdir()}
    assert result.returncode == 0, result.stderr[-2000:]
    new = after - before
    assert {n.split("-")[0] for n in new} == {"answers", "judge"}, new
    assert stage_file(corpus, "queries").name in before


def bootstrap_fails(config: Path, capsys, *extra: str) -> str:
    """`prism bootstrap` in this process (the CLI's entry point, no interpreter start-up): exit 2, one error line."""
    from prism_lightning.cli import main

    with pytest.raises(SystemExit) as done:
        main(["bootstrap", "--config", str(config), *extra])
    assert done.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines[-5:]
    return lines[-1]


def test_unknown_config_key_is_one_clear_line(tmp_path, capsys):
    config = write_config(tmp_path)
    config.write_text(config.read_text() + "bogus_key: 1\n")
    assert "bogus_key" in bootstrap_fails(config, capsys)


def test_unknown_model_path_is_one_clear_line(tmp_path, capsys):
    last = bootstrap_fails(write_config(tmp_path), capsys, "--data.backbone.name_or_path",
                           str(tmp_path / "no-such-model"))
    assert "not found" in last and "no-such-model" in last


def test_missing_persona_file_is_one_clear_line(tmp_path, capsys):
    last = bootstrap_fails(write_config(tmp_path), capsys, "--data.personas.files",
                           json.dumps({"rag": str(tmp_path / "nope.txt")}))
    assert "data.personas.files: file not found: " + str(tmp_path / "nope.txt") in last


def test_malformed_corpus_line_names_file_and_line(resumed_corpus, tmp_path):
    from prism_lightning.bootstrap.corpus import load_corpus
    from prism_lightning.utils.errors import PrismError

    copy = tmp_path / "corpus"
    copy.mkdir()
    (copy / "manifest.json").write_text((resumed_corpus["corpus"] / "manifest.json").read_text())
    good = lines(resumed_corpus["corpus"] / "corpus.jsonl")
    (copy / "corpus.jsonl").write_text("\n".join([good[0], "{not json", *good[1:]]) + "\n")
    with pytest.raises(PrismError, match=r"corpus\.jsonl:2: malformed"):
        load_corpus(copy)
