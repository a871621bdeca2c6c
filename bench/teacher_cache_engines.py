"""The teacher top-k cache (``data.teacher: cached``) built by Hugging Face and by vLLM on the same distill items.

Reads a bootstrapped corpus (default: the quickstart's, ``runs/quickstart/corpus``), encodes its distill items as
``prism fit`` does, then builds the top-k cache with each engine into its own temporary directory, alternating the
engines for ``--reps`` rounds (the first round of each is a warm-up, not counted). vLLM's engine start is timed
apart. Reports seconds and teacher tokens/s per engine, their ratio, and how far the two caches are apart (largest
|Δ logit| rank by rank, share of equal vocabulary ids). Run it in the environment scripts/install-vllm.sh builds:

    .venv-vllm/bin/python bench/teacher_cache_engines.py --corpus runs/quickstart/corpus
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import setup, table, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("runs/quickstart/corpus"))
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4, help="data.batch_size (HF's batch)")
    parser.add_argument("--max-length", type=int, default=320, help="data.max_length (the quickstart's)")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    setup()
    from prism_lightning.contexts.personas import PersonaConfig
    from prism_lightning.model.backbone import BackboneConfig, load_backbone
    from prism_lightning.model.vllm_engine import VllmEngine
    from prism_lightning.training.datamodule import BootstrapDataModule
    from prism_lightning.training.teacher_cache import build_teacher_cache

    data = BootstrapDataModule(personas=PersonaConfig(names=["all"], granularity="full"), corpus_dir=str(args.corpus),
                               bootstrap=False, max_length=args.max_length, batch_size=args.batch_size)
    data.setup("validate")
    collate = data.collator()
    encoded = [collate.encode_item(i) for i in data.train_items + data.val_items if i["label"] == 1]
    tokens = sum(e["n_resp"] for e in encoded)
    backbone = load_backbone(BackboneConfig())
    engine = VllmEngine(backbone, BackboneConfig(), values="logits", max_logprobs=args.top_k)
    start = time.perf_counter()
    engine.llm  # noqa: B018 - start the engine now, timed apart
    engine_start_s = time.perf_counter() - start
    runs = {"hf": None, "vllm": engine}
    seconds: dict[str, list[float]] = {"hf": [], "vllm": []}
    caches = {}
    for rep in range(args.reps + 1):
        for name in (["hf", "vllm"] if rep % 2 == 0 else ["vllm", "hf"]):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                cache = build_teacher_cache(backbone, encoded, args.top_k, Path(tmp), args.batch_size, runs[name])
                elapsed = time.perf_counter() - start
            caches[name] = cache
            if rep:
                seconds[name].append(elapsed)
            print(f"  round {rep} {name}: {elapsed:.1f} s{' (warm-up)' if not rep else ''}", flush=True)
    engine.close()
    worst, same, count = 0.0, 0, 0
    for key in caches["hf"].records:
        hv, hi = caches["hf"].targets(key)
        vv, vi = caches["vllm"].targets(key)
        worst = max(worst, float((hv - vv).abs().max()))
        same += int((hi == vi).sum())
        count += hi.numel()
    median = {name: statistics.median(s) for name, s in seconds.items()}
    rows = [[name, round(median[name], 2), round(tokens / median[name], 1)] for name in ("hf", "vllm")]
    print(f"{len(encoded)} distill items, {tokens} teacher tokens, top-{args.top_k}; vLLM engine start "
          f"{engine_start_s:.1f} s (not counted)")
    print(table(rows, ["engine", "seconds (median)", "teacher tokens/s"]))
    print(f"vLLM / HF speed: {median['hf'] / median['vllm']:.2f}x; largest |logit difference| {worst:.2e}; equal ids "
          f"{same}/{count} ({same / count:.2%})")
    write_results("teacher_cache_engines", {
        "args": {k: str(v) for k, v in vars(args).items()}, "items": len(encoded), "teacher_tokens": tokens,
        "seconds": seconds, "median_s": median, "vllm_engine_start_s": round(engine_start_s, 2),
        "speedup_vllm_over_hf": round(median["hf"] / median["vllm"], 3), "max_abs_logit_diff": worst,
        "equal_ids": same, "ids": count, "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
