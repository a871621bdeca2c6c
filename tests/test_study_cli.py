"""`prism study` through the real CLI on the embedded model: outputs, resume after SIGKILL, one-line errors."""

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
from tiny_benchmarks import write_tiny_benchmarks

from prism_lightning.cli import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PRISM = [sys.executable, "-m", "prism_lightning.cli"]
CELLS = 12  # (none, matched full x 2 placements, one control) x 3 suites


def write_config(tmp: Path) -> Path:
    """A study of 4 conditions on tiny MMLU, MT-Bench and HarmBench files, short generations."""
    mt_bench, harmbench = write_tiny_benchmarks(tmp)
    with mt_bench.open("a") as fh:  # a second question: the grade judge's controls pair answers of two questions
        fh.write(json.dumps({"question_id": 82, "category": "writing", "turns": ["Describe a harbour at dawn."]})
                 + "\n")
    overlay = {
        "trainer": {"default_root_dir": str(tmp / "run")},
        "study": {"granularities": ["full"], "placements": ["system", "user"], "control_personas": ["math"],
                  "suites": {"mmlu_n": 12, "mt_bench": str(mt_bench), "harmbench": str(harmbench), "batch_size": 4,
                             "decoding": {"max_new_tokens": 8, "temperature": 0.0, "seed": 0, "batch_size": 8},
                             "safety_max_new_tokens": 8}},
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def argv(config: Path, *extra: str) -> list[str]:
    return [*PRISM, "study", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(config), *extra]


def run(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv(config, *extra), capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TERM": "dumb"})


def study_fails(config: Path, capsys, *extra: str) -> str:
    """Run `prism study` in this process (the same entry point, without a new interpreter's start-up) and return
    its one error line; it must exit 2."""
    with pytest.raises(SystemExit) as done:
        main(argv(config, *extra)[len(PRISM):])
    assert done.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines[-5:]
    return lines[-1]


def cell_file(tmp: Path) -> Path | None:
    found = sorted((tmp / "run" / "study").glob("cells-*.jsonl")) if (tmp / "run" / "study").exists() else []
    return found[0] if found else None


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def resumed_study(tmp_path_factory) -> dict:
    """Kill a study once it has finished 3 cells, then run it again to the end."""
    tmp = tmp_path_factory.mktemp("study")
    config = write_config(tmp)
    proc = subprocess.Popen(argv(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, before = time.time() + 600, None
    try:
        while time.time() < deadline and proc.poll() is None:
            path = cell_file(tmp)
            if path is not None and len(path.read_text().splitlines()) >= 3:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                before = records(path)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
    if before is None:
        pytest.fail(f"the study ended (rc={proc.returncode}) before it was killed")
    result = run(config)
    return {"tmp": tmp, "before": before, "result": result, "after": records(cell_file(tmp))}


def test_a_killed_study_recomputes_only_unfinished_cells(resumed_study):
    result, before, after = resumed_study["result"], resumed_study["before"], resumed_study["after"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert 3 <= len(before) < CELLS
    assert f"{CELLS} cells (4 conditions x 3 suites); {len(before)} already done" in result.stderr
    computed = [line for line in result.stderr.splitlines() if line.startswith("== prism: study ") and "/" in line
                and "prompts computed" in line]
    assert len(computed) == CELLS - len(before)
    assert len(after) == CELLS and len({r["key"] for r in after}) == CELLS
    assert after[:len(before)] == before  # finished work kept as written, never redone


def test_the_study_writes_json_report_and_figures(resumed_study):
    directory = resumed_study["tmp"] / "run" / "study"
    study = json.loads((directory / "study.json").read_text())
    assert study["conditions"] == ["none", "matched/full/system", "matched/full/user", "math/full/system"]
    assert len(study["cells"]) == CELLS
    assert {"MMLU/STEM", "MT-Bench/writing", "Safety/HarmBench (judge)", "Safety/HarmBench (strings)"} <= set(
        study["subcategories"])
    for cell in study["cells"]:
        for key, n in cell["counts"].items():
            assert n + cell["unreadable"].get(key, 0) >= 1 and len(cell["intervals"][key]) == 2
    effect = study["effects"]["Safety/HarmBench (strings)"]["matched/full/system"]
    required = {"relative", "relative_ci95", "absolute", "absolute_ci95", "n"}
    # an interval that cannot be computed is None, with the reason beside it
    assert required <= set(effect) <= required | {"relative_no_interval", "absolute_no_interval"}
    assert set(study["placement"]["MMLU/STEM"]) == {"system", "user"}
    assert study["control"]["MT-Bench/writing"]["others"] == 1  # math is not writing's persona
    report = (directory / "report.md").read_text()
    assert "Other-persona control" in report and "![heatmap](heatmap.png)" in report
    # Both judges checked on items with known verdicts; the grade judge in both cross-source directions too.
    refusal, grade = study["judge_controls"]["refusal"], study["judge_controls"]["grade"]
    assert refusal["control_n"] >= 2 and len(refusal["control_ci95"]) == 2
    # 2 relevance/quality items; a verdict the 135M judge leaves unreadable is counted apart, never scored
    assert grade["control_n"] >= 1 and grade["control_n"] + grade["unreadable"] >= 2
    assert {"cross_persona", "cross_baseline"} <= set(grade["by_kind"])
    assert "source_bias" in grade["cross_source"]
    assert "Refusal judge control accuracy" in report and "Grade judge control accuracy" in report
    for png in ("heatmap.png", "placement.png", "control.png"):
        assert (directory / png).stat().st_size > 1000


def test_dry_run_prints_cells_and_estimate_and_runs_nothing(resumed_study, tmp_path):
    config = write_config(tmp_path)
    result = run(config, "--study.dry_run", "true")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert f"{CELLS} cells, 4 conditions" in out and "mmlu|matched/full/user" in out and "total" in out
    assert not (tmp_path / "run" / "study").exists() or cell_file(tmp_path) is None


@pytest.mark.parametrize("extra, message", [
    (["--study.granularities", "[long]"], "study.granularities: unknown granularity 'long'"),
    (["--study.control_personas", "[pirate]"], "study.control_personas: unknown persona 'pirate'"),
    (["--study.granularities", "[]", "--study.placements", "[]", "--study.control_personas", "[]"],
     "the conditions produce no cells"),
])
def test_bad_conditions_end_in_one_line(tmp_path, capsys, extra, message):
    last = study_fails(write_config(tmp_path), capsys, *extra)
    assert message in last


@pytest.mark.parametrize("content, message", [
    ("", "no rows"),
    ('{"question_id": 81, "category": "writing", "turns": ["a"]}\n\n{"question_id": 82}\n', ":3"),
])
def test_an_empty_or_malformed_question_file_names_the_file(tmp_path, capsys, content, message):
    bad = tmp_path / "questions.jsonl"
    bad.write_text(content)
    last = study_fails(write_config(tmp_path), capsys, "--study.suites.mt_bench", str(bad))
    assert str(bad) in last and message in last
