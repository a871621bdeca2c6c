"""Bootstrap sharding: the batch plan, shard files, merging, world sizes, launcher variables, failures on one rank."""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prism_lightning.bootstrap.corpus import CorpusBuilder
from prism_lightning.distributed.launch import Launch, launched, process_group
from prism_lightning.distributed.sharding import (
    Shard,
    ShardedSink,
    merge_shards,
    plan_batches,
    shard_files,
    shard_path,
    todo_batches,
)
from prism_lightning.utils.errors import PrismError

ITEMS = [{"id": f"q{n}", "prompt_ids": [0] * (1 + (n * 7) % 5)} for n in range(11)]


def write_lines(path: Path, records: list[dict], torn: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn)


def test_every_world_size_splits_one_plan_into_disjoint_whole_batches(tmp_path):
    plan = plan_batches(ITEMS, 3)
    assert [len(b) for b in plan] == [3, 3, 3, 2]
    lengths = [len(i["prompt_ids"]) for b in plan for i in b]
    assert lengths == sorted(lengths)  # little padding: similar lengths share a batch
    for world in (1, 2, 3, 5):
        runs = [todo_batches(ITEMS, 3, ShardedSink(tmp_path / "s.jsonl", Shard(0, 1)))] if world == 1 else \
            [[b for j, b in enumerate(plan) if Shard(rank, world).owns(j)] for rank in range(world)]
        flat = [b for batches in runs for b in batches]
        assert sorted(map(str, flat)) == sorted(map(str, plan))  # each batch once, unchanged, whatever the world


def test_a_lone_process_resumes_the_shards_of_a_killed_two_rank_run(tmp_path):
    stage = tmp_path / "stages" / "answers-abc.jsonl"
    write_lines(stage, [{"id": "q0", "text": "a"}])
    write_lines(shard_path(stage, Shard(0, 2)), [{"id": "q1", "text": "b"}], torn='{"id": "q2", "te')
    write_lines(shard_path(stage, Shard(1, 2)), [{"id": "q3", "text": "c"}])
    sink = ShardedSink(stage, Shard(0, 1))
    assert sink.path == stage  # alone: it appends to the stage file itself
    assert {r["id"] for r in sink.records()} == {"q0", "q1", "q3"}  # the torn q2 is simply not done
    assert not shard_path(stage, Shard(0, 2)).read_text().endswith("te")
    todo = todo_batches(ITEMS, 2, sink)
    assert {i["id"] for b in todo for i in b} >= {"q2"}
    assert not any(all(i["id"] in sink for i in b) for b in todo)  # finished batches are not rerun
    sink.append([{"id": i["id"], "text": "new"} for b in todo for i in b])
    sink.sync([i["id"] for b in plan_batches(ITEMS, 2) for i in b])
    assert not shard_files(stage)
    lines = stage.read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert sorted(ids) == sorted(i["id"] for i in ITEMS) and len(ids) == len(set(ids))
    assert lines[0] == json.dumps({"id": "q0", "text": "a"})  # the stage file's lines stay first, unchanged
    assert {r["id"] for r in ShardedSink(stage, Shard(0, 1)).records()} == set(ids)


def test_merge_appends_new_records_in_plan_order_and_deletes_the_shards(tmp_path):
    stage = tmp_path / "judge-abc.jsonl"
    order = ["a", "b", "c", "d"]
    write_lines(shard_path(stage, Shard(0, 2)), [{"id": "c"}, {"id": "a"}])
    write_lines(shard_path(stage, Shard(1, 2)), [{"id": "d"}, {"id": "b"}, {"id": "a"}])  # a: a duplicate
    assert merge_shards(stage, order)
    assert [json.loads(line)["id"] for line in stage.read_text().splitlines()] == order
    assert not shard_files(stage)
    before = stage.stat().st_mtime_ns
    assert not merge_shards(stage, order) and stage.stat().st_mtime_ns == before  # no shards: untouched


def test_manifest_keeps_the_world_size_and_seconds_of_reused_stages(tmp_path):
    facts = CorpusBuilder._reused_stage_facts
    builder = SimpleNamespace(directory=tmp_path)
    hashes = {"queries": "q1", "answers": "a1", "judge": "j1"}
    measured = {"queries": 0.1, "answers": 0.2, "judge": 0.3}
    assert facts(builder, hashes, measured, 2) == (measured, {"queries": 2, "answers": 2, "judge": 2})
    # A manifest from before sharding: its stages ran in one process.
    old = {"stages": hashes, "seconds": {"queries": 5.0, "answers": 6.0, "judge": 7.0}}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    assert facts(builder, hashes, measured, 2) == (old["seconds"], {"queries": 1, "answers": 1, "judge": 1})
    (tmp_path / "manifest.json").write_text(json.dumps({**old, "world_size": {"queries": 4, "answers": 4,
                                                                             "judge": 4}}))
    seconds, worlds = facts(builder, {**hashes, "answers": "a2", "judge": "j2"}, measured, 2)
    assert seconds == {"queries": 5.0, "answers": 0.2, "judge": 0.3}
    assert worlds == {"queries": 4, "answers": 2, "judge": 2}


def _alone(monkeypatch) -> None:
    for name in [*(k for k in os.environ if k.startswith("SLURM_")), "WORLD_SIZE", "RANK", "LOCAL_RANK"]:
        monkeypatch.delenv(name, raising=False)
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # set then removed, so the test restores whatever was there
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)


def test_launcher_variables_torchrun_srun_and_none(monkeypatch):
    _alone(monkeypatch)
    assert launched() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched() is None  # torchrun --nproc_per_node 1: nothing to share
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launched() == Launch(rank=3, world=4, local_rank=1)
    _alone(monkeypatch)
    for name, value in {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
                        "SLURM_NODELIST": "node[7-8]", "SLURM_JOB_ID": "123456", "SLURM_JOB_NAME": "prism"}.items():
        monkeypatch.setenv(name, value)
    assert launched() == Launch(rank=2, world=4, local_rank=0)
    assert os.environ["MASTER_ADDR"] == "node7" and os.environ["MASTER_PORT"] == str(15000 + 3456)


def _fail_on_rank_one(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # a regression fails in a minute, not in an hour

    def work() -> None:
        if rank == 1:
            raise RuntimeError("CUDA out of memory")

    try:
        Shard.current().together(work)
        outcome = "finished"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    Path(out, f"{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


def test_a_failure_on_one_rank_stops_every_rank_instead_of_a_hang(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fail_on_rank_one, args=(port, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "1.txt").read_text() == "RuntimeError: CUDA out of memory"
    assert (tmp_path / "0.txt").read_text() == "PrismError: stopped because rank 1 failed: CUDA out of memory"


def test_more_ranks_on_a_node_than_gpus_is_one_clear_line(monkeypatch):
    _alone(monkeypatch)
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(PrismError, match="LOCAL_RANK 1, but this node shows 1 GPU"):
        with process_group():
            pass


def test_a_separate_judge_is_released_once_the_corpus_is_built(tiny_backbones, tmp_path):
    """An R1 config names a second model as judge; training never uses it, so it must not stay resident."""
    from prism_lightning.bootstrap.config import AnswerConfig, JudgeConfig, QueryConfig
    from prism_lightning.contexts.personas import PersonaConfig
    from prism_lightning.model import backbone as bb
    from prism_lightning.model.generation import DecodingConfig

    base, judge = tiny_backbones(seed=0), tiny_backbones(seed=1)
    builder = CorpusBuilder(base.config, PersonaConfig(names=["math", "writing"], granularity="min"),
                            QueryConfig(per_persona=2, max_rounds=1, min_chars=1, min_words=1,
                                        decoding=DecodingConfig(temperature=0.9, max_new_tokens=12, batch_size=4)),
                            AnswerConfig(decoding=DecodingConfig(temperature=0.7, max_new_tokens=8, batch_size=4)),
                            JudgeConfig(model=judge.config, control_pairs=2, batch_size=4, max_answer_tokens=8,
                                        min_choice_mass=0.0),
                            "system", tmp_path / "corpus")
    corpus = builder.build()
    assert corpus.manifest["judge"]["model"]["fingerprint"] == judge.fingerprint
    assert bb.cache_key(judge.config) not in bb._LOADED and bb.cache_key(base.config) in bb._LOADED
