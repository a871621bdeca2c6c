"""Cached teacher (``data.teacher: cached``): each distill item's teacher top-k, computed once, reused by every step.

The teacher is the frozen base given the persona; its targets for an item depend only on the base weights (their
fingerprint and dtype), k, and the item's teacher token ids (persona text, chat template, placement, query,
response, truncation). The stage file ``stages/teacher-<hash>.jsonl`` is named by the first three; each record is
keyed by the item id and a digest of its token ids, so an item whose text changed is recomputed and nothing stale
is ever read. Records are appended batch by batch (a kill loses at most the batch in flight) and the work is
shared across ranks like stages 1–3. The raw top-k logits are stored (fp32), so the temperature can change
without invalidating anything.
"""

from __future__ import annotations

import base64
import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from prism_lightning.distributed.sharding import ShardedSink, run_stage, stage_progress, todo_batches
from prism_lightning.model.backbone import Backbone
from prism_lightning.model.generation import append_grouped, right_pad
from prism_lightning.model.lm_head import decoder_hidden, head_logits
from prism_lightning.model.vllm_engine import VllmEngine
from prism_lightning.utils.errors import PrismError

TeacherMode = Literal["online", "cached"]


def item_key(item_id: str, teacher_ids: Sequence[int], n_resp: int) -> str:
    """The record key of one item's targets: its id and a digest of exactly what the teacher reads."""
    digest = hashlib.sha256(np.asarray(teacher_ids, dtype=np.int64).tobytes() + str(n_resp).encode()).hexdigest()
    return f"{item_id}#{digest[:16]}"


def stage_file(corpus_dir: Path, backbone: Backbone, top_k: int, engine: str = "hf") -> Path:
    """``<corpus>/stages/teacher-<hash>.jsonl`` for these base weights, their dtype, k and engine."""
    spec = {"fingerprint": backbone.fingerprint, "dtype": backbone.config.dtype, "top_k": top_k, "version": 1,
            **({"engine": engine} if engine != "hf" else {})}  # the HF cache keeps the name it always had
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return Path(corpus_dir) / "stages" / f"teacher-{digest}.jsonl"


def _pack(array: torch.Tensor) -> str:
    return base64.b64encode(array.contiguous().numpy().tobytes()).decode()


def _unpack(text: str, dtype: np.dtype, shape: tuple[int, int]) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=dtype).reshape(shape).copy())


class TeacherCache:
    """Teacher top-k (raw logits [n, k] fp32, vocabulary indices [n, k] int64) per encoded distill item."""

    def __init__(self, path: Path, records: dict[str, dict]) -> None:
        self.path = path
        self.records = records

    def targets(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached top-k of one item (a missing key is a bug of the caller: the build covers every item)."""
        record = self.records.get(key)
        if record is None:
            raise PrismError(f"{self.path}: no teacher targets for {key}; rerun `prism fit` to complete the cache")
        shape = (record["n"], record["k"])
        return _unpack(record["values"], np.float32, shape), _unpack(record["index"], np.int32, shape).long()


@torch.no_grad()
def build_teacher_cache(backbone: Backbone, encoded: Sequence[dict], top_k: int, corpus_dir: Path,
                        batch_size: int, engine: Optional[VllmEngine] = None) -> TeacherCache:
    """Compute (or finish) the teacher top-k of every encoded distill item; every rank calls it (a collective).

    ``encoded`` holds ``Collator.encode_item`` outputs of distill items (``teacher``, ``t_start``, ``n_resp``).
    ``engine``: a vLLM engine returning raw logits on the same weights (one process), several batches per call.
    """
    if top_k <= 0:
        raise PrismError("data.teacher: cached keeps the teacher's top-k; model.top_k 0 (full vocabulary) needs "
                         "data.teacher online")
    path = stage_file(corpus_dir, backbone, top_k, "vllm" if engine is not None else "hf")
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = ShardedSink(path)
    items = [{"id": item_key(e["id"], e["teacher"], e["n_resp"]), "prompt_ids": e["teacher"], "enc": e}
             for e in encoded]
    model = backbone.adapter if backbone.adapter is not None else backbone.model
    pad = backbone.tokenizer.pad_token_id

    def work() -> None:
        # Deterministic, so only the missing items run (a generation stage reruns whole batches for their seeds).
        batches = todo_batches([item for item in items if item["id"] not in sink], batch_size, sink)
        with stage_progress(sum(len(b) for b in batches), "teacher cache", sink) as advance:
            if engine is not None:
                append_grouped(batches, engine.batches_per_call, lambda items: engine_records(engine, items, top_k),
                               sink, advance)
            else:
                append_grouped(batches, 1, lambda batch: teacher_records(model, pad, backbone.device, batch, top_k),
                               sink, advance)

    run_stage(work, items, batch_size, sink)
    return TeacherCache(path, {item["id"]: sink.get(item["id"]) for item in items})


def teacher_records(model, pad_id: int, device: torch.device, batch: Sequence[dict], top_k: int) -> list[dict]:
    """One batch's records: the adapter-free model's top-k logits at each response-predicting position."""
    ids, mask = right_pad([b["prompt_ids"] for b in batch], pad_id, device)
    was_training = model.training
    model.eval()  # the online teacher runs in eval mode too: no dropout anywhere
    try:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            return _records(model, device, batch, top_k, decoder_hidden(model, ids, mask))
    finally:
        model.train(was_training)


def engine_records(engine: VllmEngine, items: Sequence[dict], top_k: int) -> list[dict]:
    """The records of ``items`` from the vLLM engine: the same raw top-k logits at the same positions."""
    found = engine.prompt_topk([i["prompt_ids"] for i in items], [i["enc"]["t_start"] for i in items],
                               [i["enc"]["n_resp"] for i in items], top_k)
    return [_record(item, values, index) for item, (values, index) in zip(items, found)]


def _record(item: dict, values: torch.Tensor, index: torch.Tensor) -> dict:
    return {"id": item["id"], "n": item["enc"]["n_resp"], "k": values.shape[-1],
            "values": _pack(values.float().cpu()), "index": _pack(index.int().cpu())}


def _records(model, device: torch.device, batch: Sequence[dict], top_k: int, hidden: torch.Tensor) -> list[dict]:
    """Each row's top-k logits at its response-predicting positions, packed as records."""
    records = []
    for row, item in enumerate(batch):
        enc = item["enc"]
        positions = torch.arange(enc["n_resp"], device=device) + enc["t_start"] - 1
        values, index = head_logits(model, hidden[row, positions]).topk(top_k, dim=-1)
        records.append(_record(item, values, index))
    return records
