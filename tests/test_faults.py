"""Faults against `prism fit` and the CLI: SIGKILL/SIGTERM/SIGINT then resume, torn checkpoint writes, bad inputs.

Each bad input ends in one line naming the file, line or key, with exit code 2, and nothing finished is lost.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_cli_fit import fit_config, save_tiny_model, train_losses, write_corpus

from prism_lightning.cli import main

PRISM = [sys.executable, "-m", "prism_lightning.cli"]
PAUSE = {"class_path": "conftest.PauseAfterFirstEpoch", "init_args": {"seconds": 8}}  # SIGTERM acts after it


@pytest.fixture(scope="module")
def tiny_model(smol_tokenizer, tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", smol_tokenizer, seed=0)


def default_sigint() -> None:
    """In the child: Ctrl-C raises KeyboardInterrupt even when the test runner was started in the background (a
    shell starts background jobs with SIGINT ignored, and a child would inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_fit(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "TERM": "dumb"}
    return subprocess.Popen([*PRISM, "fit", "--config", str(config), *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_sigint)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file():
            return
        if proc.poll() is not None:
            pytest.fail(f"fit ended (rc={proc.returncode}) before {path} appeared: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"{path} never appeared")


def last_epoch(tmp: Path) -> int:
    rows = list(csv.DictReader((tmp / "logs" / "metrics.csv").open()))
    return max(int(r["epoch"]) for r in rows if r.get("epoch"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_fit_killed_after_its_first_epoch_resumes_there(tiny_model, tmp_path, sig):
    """Issue #9: a kill after epoch 0 used to lose everything (no last.ckpt until training ended)."""
    corpus = write_corpus(tmp_path / "corpus", [1, 0, 0] * 4)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    main(["fit", "--config", str(fit_config(straight, tiny_model, corpus, epochs=3))])
    proc = start_fit(fit_config(killed, tiny_model, corpus, epochs=3, extra_callbacks=[PAUSE]))
    last = killed / "run" / "checkpoints" / "last.ckpt"
    wait_for(last, proc)
    time.sleep(0.5)  # inside the pause: epoch 0 is checkpointed, epoch 1 has not started
    proc.send_signal(sig)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    checkpoints = {p.name for p in last.parent.iterdir()}
    assert checkpoints == {"last.ckpt"}, checkpoints  # nothing torn or half-written beside it
    saved = torch.load(last, weights_only=False, map_location="cpu")
    assert saved["epoch"] == 0
    first_leg = train_losses(killed)
    main(["fit", "--config", str(fit_config(killed, tiny_model, corpus, epochs=3)), "--ckpt_path", "last"])
    second_leg = train_losses(killed)
    # It continues at the checkpoint's step (SIGTERM lets one more batch run; that step is not checkpointed and is
    # redone), never from step 0.
    assert min(second_leg) == saved["global_step"] >= 5
    resumed, expected = {**first_leg, **second_leg}, train_losses(straight)
    assert set(resumed) == set(expected)
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-5), step
    assert last_epoch(killed) == 2


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tiny_model, tmp_path, monkeypatch):
    """Writes go to a temporary file that is moved into place: a write that dies midway changes nothing."""
    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 4)
    main(["fit", "--config", str(fit_config(tmp_path, tiny_model, corpus, epochs=1))])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    real_save = torch.save

    def dies_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError("simulated crash after writing part of the checkpoint")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises((SystemExit, OSError)):
        main(["fit", "--config", str(fit_config(tmp_path, tiny_model, corpus, epochs=2)), "--ckpt_path", "last"])
    monkeypatch.undo()
    assert last.read_bytes() == before
    assert {p.name for p in last.parent.iterdir()} == {"last.ckpt"}


# --------------------------------------------------------------------------- resume and read commands need a checkpoint
@pytest.mark.parametrize("command", ["fit", "validate", "predict", "test", "export"])
def test_asking_for_a_missing_checkpoint_is_one_line(tiny_model, tmp_path, capsys, command):
    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 4)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    extra = ["--data.predict_file", str(prompts)] if command == "predict" else []
    with pytest.raises(SystemExit) as done:
        main([command, "--config", str(fit_config(tmp_path, tiny_model, corpus)), "--ckpt_path", "last", *extra])
    assert done.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: no last checkpoint under ") and str(tmp_path / "run" / "checkpoints") in last
    assert not (tmp_path / "run" / "predictions.jsonl").exists()


# --------------------------------------------------------------------------- bad files
def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines[-5:]
    return lines[-1]


def fit_fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    return error_line(capsys)


def test_non_utf8_corpus_names_file_and_line(tiny_model, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 4)
    path = corpus / "corpus.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"works", b"w\xffrks")
    path.write_bytes(b"\n".join(lines))
    last = fit_fails(["fit", "--config", str(fit_config(tmp_path, tiny_model, corpus))], capsys)
    assert f"{path}:3: not UTF-8" in last


def test_corpus_line_numbers_are_physical_lines(tiny_model, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 4)
    path = corpus / "corpus.jsonl"
    lines = path.read_text().splitlines()
    broken = json.loads(lines[6])
    del broken["query"]
    lines[6] = json.dumps(broken)
    path.write_text("\n\n" + "\n".join(lines) + "\n")  # two blank lines first: record 7 sits on line 9
    last = fit_fails(["fit", "--config", str(fit_config(tmp_path, tiny_model, corpus))], capsys)
    assert f"{path}:9: malformed corpus line (missing query)" in last


def test_an_empty_corpus_file_says_so(tiny_model, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 4)
    (corpus / "corpus.jsonl").write_text("")
    last = fit_fails(["fit", "--config", str(fit_config(tmp_path, tiny_model, corpus))], capsys)
    assert "corpus is empty" in last and "margin" not in last


def test_non_utf8_persona_file_names_key_and_line(tiny_model, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 4)
    persona = tmp_path / "persona.txt"
    persona.write_bytes(b"You are careful.\nYou \xfe check twice.\n")
    last = fit_fails(["fit", "--config", str(fit_config(tmp_path, tiny_model, corpus)),
                      "--data.personas.files", json.dumps({"mine": str(persona)})], capsys)
    assert f"{persona}:2:" in last and "data.personas.files.mine" in last and "not UTF-8" in last


@pytest.fixture
def trained(tiny_model, tmp_path) -> tuple[Path, Path]:
    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 4)
    config = fit_config(tmp_path, tiny_model, corpus, epochs=1)
    main(["fit", "--config", str(config)])
    return config, tmp_path / "run"


def test_predict_file_problems_are_one_line_and_never_leave_old_output(trained, tmp_path, capsys):
    config, run = trained
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hello"}\n{"id": "b", "prompt": "what is 2 + 2?"}\n')
    main(["predict", "--config", str(config), "--ckpt_path", "last", "--data.predict_file", str(good)])
    output = run / "predictions.jsonl"
    assert [json.loads(x)["id"] for x in output.read_text().splitlines()] == ["0", "b"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    last = fit_fails(["predict", "--config", str(config), "--ckpt_path", "last", "--data.predict_file", str(empty)],
                     capsys)
    assert "holds no prompts" in last
    blank_then_bad = tmp_path / "bad.jsonl"
    blank_then_bad.write_text('{"prompt": "a"}\n\n{"text": "no prompt"}\n')
    last = fit_fails(["predict", "--config", str(config), "--ckpt_path", "last", "--data.predict_file",
                      str(blank_then_bad)], capsys)
    assert f"{blank_then_bad}:3:" in last
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"prompt": "caf\xe9"}\n')
    last = fit_fails(["predict", "--config", str(config), "--ckpt_path", "last", "--data.predict_file", str(binary)],
                     capsys)
    assert f"{binary}:1: not UTF-8" in last
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "x", "prompt": "name a colour"}\n')
    main(["predict", "--config", str(config), "--ckpt_path", "last", "--data.predict_file", str(other)])
    assert [json.loads(x)["id"] for x in output.read_text().splitlines()] == ["x"]  # this run's rows only


def test_a_prompt_over_the_context_is_refused_naming_it_and_the_limit(trained, tmp_path, capsys):
    config, run = trained
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"id": "ok", "prompt": "hi"}) + "\n"
                    + json.dumps({"id": "huge", "prompt": "word " * 2100}) + "\n")
    last = fit_fails(["predict", "--config", str(config), "--ckpt_path", "last", "--data.predict_file", str(long)],
                     capsys)
    assert "data.predict_file: prompt 'huge':" in last and "exceed the model's context of 2048 tokens" in last


def test_resuming_with_another_lora_rank_names_both_ranks(trained, capsys):
    config, _ = trained
    for command in ("fit", "validate"):
        last = fit_fails([command, "--config", str(config), "--ckpt_path", "last", "--model.init_args.lora.rank",
                          "8", "--trainer.max_epochs", "2"], capsys)
        assert "the checkpoint was trained with LoRA rank 4; this config has rank 8" in last
        assert "model.init_args.lora.rank 4" in last


def test_a_corrupt_checkpoint_is_one_line_without_unsafe_advice(trained, capsys):
    config, run = trained
    (run / "checkpoints" / "last.ckpt").write_bytes(os.urandom(4096))
    for command in ("validate", "export"):
        last = fit_fails([command, "--config", str(config), "--ckpt_path", "last"], capsys)
        assert "corrupt or incomplete checkpoint" in last and "last.ckpt" in last
        assert "weights_only=False" not in last


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_a_corrupt_gate_file_names_the_file(trained, damage):
    from prism_lightning import GatedModel
    from prism_lightning.utils.errors import PrismError

    _, run = trained
    gate = run / "export" / "gate.safetensors"
    data = gate.read_bytes()
    gate.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    with pytest.raises(PrismError, match=r"gate\.safetensors: corrupt or incomplete safetensors file"):
        GatedModel.from_pretrained(run / "export")


def test_a_diverged_checkpoint_fails_validate(trained, capsys):
    """A checkpoint whose adapter holds NaN: validate exits non-zero naming the held-out value."""
    config, run = trained
    path = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False, map_location="cpu")
    for key, value in checkpoint["state_dict"].items():
        if "lora_B" in key:
            value.fill_(float("nan"))
    torch.save(checkpoint, path)
    last = fit_fails(["validate", "--config", str(config), "--ckpt_path", "last"], capsys)
    assert "val/" in last and "nan" in last


# --------------------------------------------------------------------------- config values
@pytest.mark.parametrize("key, value, expected", [
    ("--data.batch_size", "0", "data.batch_size: must be at least 1, got 0"),
    ("--data.batch_size", "-3", "data.batch_size: must be at least 1, got -3"),
    ("--data.val_fraction", "1.5", "data.val_fraction: must lie in (0, 1), got 1.5"),
    ("--data.judge.batch_size", "0", "data.judge.batch_size: must be at least 1"),
    ("--data.queries.decoding.batch_size", "0", "data.queries.decoding.batch_size: must be at least 1"),
    ("--model.init_args.lr", "-1", "model.init_args.lr: must lie in (0, inf), got -1.0"),
    ("--model.init_args.lora.rank", "0", "model.init_args.lora.rank: must be at least 1, got 0"),
    # T = 0 would divide the logits by zero and surface mid-training as a "non-finite loss".
    ("--model.init_args.temperature", "0", "model.init_args.temperature: must lie in (0, inf), got 0.0"),
    ("--model.init_args.gate_lr", "0", "model.init_args.gate_lr: must lie in (0, inf), got 0.0"),
])
def test_bad_numbers_name_their_key(tiny_model, tmp_path, capsys, key, value, expected):
    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 4)
    last = fit_fails(["fit", "--config", str(fit_config(tmp_path, tiny_model, corpus)), key, value], capsys)
    assert expected in last


def test_an_unusable_root_dir_names_the_key(tiny_model, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 4)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    last = fit_fails(["fit", "--config", str(fit_config(tmp_path, tiny_model, corpus)),
                      "--trainer.default_root_dir", str(blocker / "run")], capsys)
    assert "trainer.default_root_dir" in last and str(blocker / "run") in last


def test_a_failed_command_leaves_no_empty_log_version(tiny_model, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", [1] * 8)  # one class: setup fails
    config = yaml.safe_load(fit_config(tmp_path, tiny_model, corpus).read_text())
    del config["trainer"]["logger"]  # the default logger, under default_root_dir
    path = tmp_path / "default-logger.yaml"
    path.write_text(yaml.safe_dump(config))
    fit_fails(["fit", "--config", str(path)], capsys)
    logs = tmp_path / "run" / "lightning_logs"
    assert not logs.exists() or not any(logs.iterdir())


# --------------------------------------------------------------------------- the real quickstart, killed and resumed
def metric_rows(root: Path) -> list[dict]:
    """Every metrics.csv row of a run, all logger versions (a resumed run writes a new version)."""
    rows = []
    for path in sorted((root / "lightning_logs").glob("version_*/metrics.csv")):
        rows += list(csv.DictReader(path.open()))
    return rows


def by_step(rows: list[dict], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


@pytest.mark.slow
def test_the_quickstart_killed_after_epoch_1_of_2_resumes_and_matches(tmp_path):
    """Issue #9's done-when on the real embedded model with the quickstart config and its callbacks (small corpus):
    SIGKILL after epoch 1 of 2 is checkpointed, `--ckpt_path last` trains epoch 2 only, and every logged loss and
    held-out metric equals the uninterrupted run's (LoRA dropout included: the random state is checkpointed).
    The uninterrupted run also builds the corpus in-process while the killed one reuses it, so this checks too
    that generation leaves training's random stream untouched."""
    from test_readme_commands import write_fixtures

    config = write_fixtures(tmp_path)["C"].split()
    base = ["--config", *config, "--data.corpus_dir", str(tmp_path / "corpus")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "TERM": "dumb"}

    def fit(root: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*PRISM, "fit", *base, "--trainer.default_root_dir", str(root), *extra],
                              capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)

    straight = fit(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed_root = tmp_path / "killed"
    proc = subprocess.Popen([*PRISM, "fit", *base, "--trainer.default_root_dir", str(killed_root),
                             "--trainer.callbacks+=conftest.PauseAfterFirstEpoch", "--trainer.callbacks.seconds", "120"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    wait_for(killed_root / "checkpoints" / "last.ckpt", proc, timeout=900)
    time.sleep(1.0)
    proc.kill()
    proc.wait(timeout=60)
    first_leg = metric_rows(killed_root)
    assert max(int(r["epoch"]) for r in first_leg if r.get("epoch")) == 0
    resumed = fit(killed_root, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = metric_rows(tmp_path / "straight"), metric_rows(killed_root)
    second_leg_steps = set(by_step(got, "train/loss")) - set(by_step(first_leg, "train/loss"))
    assert second_leg_steps and min(second_leg_steps) > max(by_step(first_leg, "train/loss"))  # continued
    for key in ("train/loss", "val/kl", "val/gate_auroc"):
        want, have = by_step(expected, key), by_step(got, key)
        assert want and set(have) == set(want), key
        for step, value in want.items():
            assert have[step] == pytest.approx(value, abs=1e-5), (key, step)


class RecordBatches(__import__("lightning").pytorch.callbacks.Callback):
    """Test helper: append ``[epoch, batch_idx, ids]`` of every training batch to ``<path>.<rank>``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(f"{self.path}.{trainer.global_rank}", "a") as out:
            out.write(json.dumps([trainer.current_epoch, batch_idx, batch["ids"]]) + "\n")


class CheckpointAndStop(__import__("lightning").pytorch.callbacks.Callback):
    """Test helper: at the end of batch ``batch`` of epoch ``epoch`` save ``path`` (as a requeue or an
    ``every_n_train_steps`` checkpoint would, inside the epoch) and stop training."""

    def __init__(self, path: str, epoch: int, batch: int) -> None:
        self.path, self.epoch, self.batch = path, epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def recorded(path: Path) -> list[list]:
    return [json.loads(line) for line in Path(f"{path}.0").read_text().splitlines()]


def trainable(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, weights_only=False, map_location="cpu")["state_dict"]


@pytest.mark.parametrize("balance", [True, False], ids=["balanced", "shuffled"])
def test_a_checkpoint_inside_an_epoch_resumes_at_the_next_batch_of_the_same_draw(tiny_model, tmp_path, balance):
    """A requeue or step checkpoint lands mid-epoch; the resumed run must not train on the epoch's first batches again
    (before the loader was stateful it did: Lightning counts the batches, the data restarted from the top)."""
    corpus = write_corpus(tmp_path / "corpus", [1, 0, 0] * 5)
    legs = {name: tmp_path / name for name in ("straight", "first", "second")}
    mid = tmp_path / "mid.ckpt"
    record = {name: {"class_path": "test_faults.RecordBatches", "init_args": {"path": str(legs[name] / "batches")}}
              for name in legs}
    stop = {"class_path": "test_faults.CheckpointAndStop", "init_args": {"path": str(mid), "epoch": 1, "batch": 1}}
    overrides = ["--data.balance", str(balance).lower()]
    main(["fit", "--config", str(fit_config(legs["straight"], tiny_model, corpus, epochs=3,
                                             extra_callbacks=[record["straight"]])), *overrides])
    main(["fit", "--config", str(fit_config(legs["first"], tiny_model, corpus, epochs=3,
                                             extra_callbacks=[record["first"], stop])), *overrides])
    assert torch.load(mid, weights_only=False, map_location="cpu")["loops"]["fit_loop"]["state_dict"][
        "combined_loader"] == [{"epoch": 1, "batches": 2}]
    main(["fit", "--config", str(fit_config(legs["second"], tiny_model, corpus, epochs=3,
                                             extra_callbacks=[record["second"]])), *overrides, "--ckpt_path", str(mid)])
    straight = recorded(legs["straight"] / "batches")
    first = [row for row in recorded(legs["first"] / "batches") if row[:2] <= [1, 1]]
    second = recorded(legs["second"] / "batches")
    assert second[0][:2] == [1, 2]
    assert first + second == straight
    expected = trainable(legs["straight"] / "run" / "checkpoints" / "last.ckpt")
    resumed = trainable(legs["second"] / "run" / "checkpoints" / "last.ckpt")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- config files and keys, via the real CLI
def _cli_error(args: list[str], capsys) -> list[str]:
    """The real CLI (in process, as `prism` runs it): exit 2, no usage, no traceback; the ``error:`` lines."""
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert not any(line.startswith(("usage:", "Traceback", "tip:")) for line in err.splitlines()), err
    return [line for line in err.splitlines() if line.startswith("error")]


def test_config_mistakes_are_one_line_with_no_usage_dump(tiny_model, tmp_path, capsys, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 4)
    config = fit_config(tmp_path, tiny_model, corpus)
    (tmp_path / "syntax.yaml").write_text("data:\n  batch_size: [1\n")
    (tmp_path / "unknown.yaml").write_text("data:\n  nosuchkey: 1\n")
    (tmp_path / "badcb.yaml").write_text("trainer:\n  callbacks:\n    - class_path: "
                                         "prism_lightning.training.callbacks.NoSuch\n")
    (tmp_path / "fidelity.yaml").write_text("trainer:\n  callbacks:\n    - class_path: "
                                            "prism_lightning.training.callbacks.context_fidelity.ContextFidelity\n"
                                            "      init_args: {probes: missing.jsonl}\n")
    (tmp_path / "probes.jsonl").write_text("not json\n")
    (tmp_path / "badprobes.yaml").write_text("trainer:\n  callbacks:\n    - class_path: "
                                             "prism_lightning.training.callbacks.context_fidelity.ContextFidelity\n"
                                             "      init_args: {probes: probes.jsonl}\n")
    cases = [
        (["fit", "--config", "nope.yaml"], "error: --config nope.yaml: file not found"),
        (["fit", "--config", str(config), "--config", "syntax.yaml"], "error: syntax.yaml:3:1: invalid YAML"),
        (["fit", "--config", str(config), "--config", "unknown.yaml"], "error: data.nosuchkey: unknown key"),
        (["fit", "--config", str(config), "--config", "badcb.yaml"],
         "error: trainer.callbacks: cannot use class_path prism_lightning.training.callbacks.NoSuch"),
        (["fit", "--config", str(config), "--config", "fidelity.yaml"],
         f"file not found: {tmp_path / 'missing.jsonl'}"),
        (["fit", "--config", str(config), "--config", "badprobes.yaml"], f"{tmp_path / 'probes.jsonl'}:1:"),
    ]
    monkeypatch.chdir(tmp_path)
    for args, expected in cases:
        lines = _cli_error(args, capsys)
        assert len(lines) == 1 and expected in lines[0], (args, lines)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--help"])
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out  # --help still prints the usage
