"""Sharded bootstrap in real processes (gloo on CPU, a tiny random Llama): torchrun, simulated srun, prism fit.

"The same corpus as one process" means: the same stage files byte for byte (same ids, texts, judge log-probs,
line order), the same ``queries.jsonl`` and ``corpus.jsonl``, and the same manifest apart from ``seconds`` and
``world_size``. Sampled decoding is used on purpose: batches, not items, are what the ranks share.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_cli_fit import save_tiny_model

PRISM = ["-m", "prism_lightning.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID")


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any launcher's variables (CI may itself run under Slurm), one thread each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCHER_VARS}
    # One thread per process, as torchrun sets it: two processes on a 2-core machine, not four threads.
    return {**env, "TERM": "dumb", "OMP_NUM_THREADS": "1", **extra}


def write_config(tmp: Path, model: Path, root: str, **trainer) -> Path:
    """2 personas x 4 queries, sampled decoding, batches of 2 (several batches per rank and stage)."""
    config = {
        "trainer": {"default_root_dir": str(tmp / root), "logger": False, **trainer},
        "model": {"class_path": "prism_lightning.training.modules.PrismModule"},
        "data": {
            "backbone": {"name_or_path": str(model)},
            "personas": {"names": ["math", "writing"], "granularity": "min"},
            "queries": {"per_persona": 4, "oversample": 1.5, "max_rounds": 2,
                        "decoding": {"temperature": 0.9, "max_new_tokens": 24, "seed": 1, "batch_size": 2}},
            "answers": {"decoding": {"temperature": 0.7, "max_new_tokens": 16, "seed": 2, "batch_size": 2}},
            # A random model puts little mass on A/B/TIE: count every verdict, so both classes exist.
            "judge": {"control_pairs": 4, "batch_size": 2, "max_answer_tokens": 16, "min_choice_mass": 0.0},
        },
    }
    path = tmp / f"{root}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def bootstrap(config: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, *PRISM, "bootstrap", "--config", str(config)], capture_output=True, text=True,
                          timeout=600, env=clean_env())


def why(result: subprocess.CompletedProcess) -> str:
    """A failed run's own error (the first traceback or error line), not only the launcher's summary."""
    err = result.stderr
    start = min((i for i in (err.find("Traceback"), err.find("error: ")) if i >= 0), default=max(0, len(err) - 3000))
    return err[start:start + 3000]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def srun_bootstrap(config: Path) -> list[subprocess.CompletedProcess]:
    """Two tasks of a simulated one-node Slurm job step (the variables srun sets per task)."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = clean_env(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_NNODES="1", SLURM_NODEID="0",
                        SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODELIST="127.0.0.1",
                        SLURM_JOB_ID="4242", SLURM_JOB_NAME="prism-test", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, *PRISM, "bootstrap", "--config", str(config)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def corpus_files(corpus: Path) -> dict[str, bytes]:
    """Every file of a corpus that must not depend on the number of ranks, by relative path."""
    files = {p.relative_to(corpus).as_posix(): p.read_bytes() for p in sorted((corpus / "stages").iterdir())}
    for name in ("queries.jsonl", "corpus.jsonl"):
        files[name] = (corpus / name).read_bytes()
    return files


def manifest(corpus: Path) -> dict:
    return json.loads((corpus / "manifest.json").read_text())


def assert_same_corpus(corpus: Path, reference: Path) -> None:
    """The definition of "the same corpus as one process" (module docstring)."""
    assert corpus_files(corpus) == corpus_files(reference)
    mine, theirs = manifest(corpus), manifest(reference)
    for m in (mine, theirs):
        m.pop("seconds"), m.pop("world_size")
    assert mine == theirs


def stamps(corpus: Path) -> dict[str, int]:
    return {p.relative_to(corpus).as_posix(): p.stat().st_mtime_ns for p in corpus.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def runs(smol_tokenizer, tmp_path_factory) -> dict:
    """A one-process corpus (the reference) and a fresh torchrun corpus of the same config."""
    tmp = tmp_path_factory.mktemp("sharded")
    model = save_tiny_model(tmp / "model", smol_tokenizer, seed=0)
    started = time.perf_counter()
    single = bootstrap(write_config(tmp, model, "single"), [sys.executable])
    sharded_config = write_config(tmp, model, "sharded")
    sharded = bootstrap(sharded_config, TORCHRUN)
    return {"tmp": tmp, "model": model, "single": single, "sharded": sharded, "config": sharded_config,
            "reference": tmp / "single" / "corpus", "corpus": tmp / "sharded" / "corpus",
            "seconds": time.perf_counter() - started}


def test_torchrun_bootstrap_writes_one_merged_corpus_equal_to_one_process(runs):
    assert runs["single"].returncode == 0, why(runs["single"])
    assert runs["sharded"].returncode == 0, why(runs["sharded"])
    corpus = runs["corpus"]
    assert manifest(corpus)["world_size"] == {"queries": 2, "answers": 2, "judge": 2}
    assert manifest(runs["reference"])["world_size"] == {"queries": 1, "answers": 1, "judge": 1}
    assert not list((corpus / "stages").glob("*.rank*")), "shard files left after the merge"
    assert_same_corpus(corpus, runs["reference"])
    assert runs["sharded"].stdout.count("PRISM corpus") == 1  # rank 0 alone prints the summary


def test_rerun_under_torchrun_srun_or_alone_reuses_every_stage(runs):
    corpus = runs["corpus"]
    before, text = stamps(corpus), (corpus / "manifest.json").read_bytes()
    again = bootstrap(runs["config"], TORCHRUN)
    assert again.returncode == 0, why(again)
    tasks = srun_bootstrap(runs["config"])
    for task in tasks:
        assert task.returncode == 0, why(task)
    alone = bootstrap(runs["config"], [sys.executable])
    assert alone.returncode == 0, why(alone)
    logs = again.stderr + alone.stderr + "".join(task.stderr for task in tasks)
    assert "[prism] stage" not in logs  # no batch of any stage was run again
    assert stamps(corpus) == before  # nothing rewritten, the manifest included
    assert (corpus / "manifest.json").read_bytes() == text
    assert manifest(corpus)["world_size"] == {"queries": 2, "answers": 2, "judge": 2}


def stage_files(corpus: Path, stage: str) -> list[Path]:
    """The merged stage file(s) of ``stage`` (``<stage>-<hash>.jsonl``), never its shards."""
    stages = corpus / "stages"
    return [p for p in stages.glob(f"{stage}-*.jsonl") if ".rank" not in p.name] if stages.exists() else []


def shard_lines(corpus: Path, stage: str) -> dict[str, list[str]]:
    stages = corpus / "stages"
    found = sorted(stages.glob(f"{stage}-*.rank*of2.jsonl")) if stages.exists() else []
    return {p.name: p.read_text().splitlines() for p in found}


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_job(job: subprocess.Popen, workers: list[int]) -> None:
    """SIGKILL the launcher and its ranks at once (torchrun puts each rank in a session of its own)."""
    for pid in [job.pid, *workers]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait()
    for pid in workers:  # orphans now: wait until they are gone, so nothing writes during the rerun
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]:
            time.sleep(0.01)


def test_sigkill_mid_stage_then_rerun_resumes_each_shard(runs):
    """Kill the whole job (launcher and ranks) once both ranks wrote part of stage 2, then run it again."""
    assert runs["single"].returncode == 0, why(runs["single"])
    corpus = runs["tmp"] / "killed" / "corpus"
    config = write_config(runs["tmp"], runs["model"], "killed")
    job = subprocess.Popen([*TORCHRUN, *PRISM, "bootstrap", "--config", str(config)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=clean_env())
    survivors: dict[str, list[str]] = {}
    workers: list[int] = []
    deadline = time.time() + 400
    try:
        while time.time() < deadline and job.poll() is None:
            workers = workers if len(workers) == 2 else children(job.pid)
            survivors = shard_lines(corpus, "answers")
            if len(survivors) == 2 and all(survivors.values()):
                kill_job(job, workers)
                break
            time.sleep(0.02)
    finally:
        if job.poll() is None:
            kill_job(job, workers or children(job.pid))
    assert len(survivors) == 2 and all(survivors.values()), f"the job ended (rc={job.returncode}) before both " \
                                                             f"ranks wrote stage 2"
    survivors = shard_lines(corpus, "answers")  # what the kill left, torn tails included
    assert not stage_files(corpus, "answers"), "stage 2 had already been merged"
    resumed = bootstrap(config, TORCHRUN)
    assert resumed.returncode == 0, why(resumed)
    merged = stage_files(corpus, "answers")[0].read_text().splitlines()
    ids = [json.loads(line)["id"] for line in merged]
    assert len(ids) == len(set(ids)), "duplicated items after the resume"
    for name, before in survivors.items():
        finished = [line for line in before if line.endswith("}")]
        assert set(finished) <= set(merged), f"{name}: finished items lost or rewritten"
    assert_same_corpus(corpus, runs["reference"])  # and the rest is what one uninterrupted process writes
    assert manifest(corpus)["world_size"] == {"queries": 2, "answers": 2, "judge": 2}


def test_prism_fit_under_ddp_bootstraps_on_every_rank(runs, tmp_path):
    """`prism fit` with 2 CPU processes: the bootstrap inside it is sharded too, and gives the same corpus."""
    assert runs["single"].returncode == 0, why(runs["single"])
    config = write_config(tmp_path, runs["model"], "fit", accelerator="cpu", devices=2, strategy="ddp",
                          max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False)
    data = yaml.safe_load(config.read_text())
    data["model"]["init_args"] = {"lora": {"rank": 4, "alpha": 8, "dropout": 0.0}, "top_k": 16}
    data["data"].update({"batch_size": 2, "max_length": 128, "val_fraction": 0.25})
    config.write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, *PRISM, "fit", "--config", str(config)], capture_output=True,
                            text=True, timeout=600, env=clean_env())
    assert result.returncode == 0, why(result)
    corpus = tmp_path / "fit" / "corpus"
    assert manifest(corpus)["world_size"] == {"queries": 2, "answers": 2, "judge": 2}
    assert_same_corpus(corpus, runs["reference"])
    assert result.stderr.count("== prism: bootstrap") == 1


def test_a_config_error_under_torchrun_is_said_once(runs):
    """Every rank parses the same config and meets the same error: rank 0 alone prints it (was once per rank)."""
    result = subprocess.run([*TORCHRUN, *PRISM, "bootstrap", "--config", str(runs["config"]),
                             "--data.val_fraction", "1.5"], capture_output=True, text=True, timeout=300,
                            env=clean_env())
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "data.val_fraction" in errors[0], result.stderr[-3000:]
