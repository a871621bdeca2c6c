"""Does vLLM generate with the embedded model here, and is its greedy text the Hugging Face path's? (issue #27)

Run in the environment scripts/install-vllm.sh builds:  .venv-vllm/bin/python scripts/check_vllm.py
Generates greedily for 16 chat prompts with HF `generate` (one prompt per call: no padding) and with one vLLM
`LLM.generate` call on the same token ids, and prints how many texts are equal, the first difference of the others,
and the tokens/s of each. Exit 1 if vLLM cannot load or generate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import torch

    from _common import QUESTIONS
    from prism_lightning.model.backbone import BackboneConfig, hf_directory, load_backbone
    from prism_lightning.model.chat import ChatFormatter
    from prism_lightning.model.generation import DecodingConfig, generate_batch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    config = BackboneConfig()
    backbone = load_backbone(config)
    directory = hf_directory(config)
    formatter = ChatFormatter(backbone.tokenizer)
    prompts = [formatter.prompt_ids(q) for q in QUESTIONS]
    decoding = DecodingConfig(max_new_tokens=args.max_tokens)
    start = time.perf_counter()
    hf = [generate_batch(backbone, [p], decoding)[0] for p in prompts]
    hf_s = time.perf_counter() - start
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except Exception as exc:  # noqa: BLE001 - the point is to report why
        print(f"vLLM does not import here: {type(exc).__name__}: {exc}")
        return 1
    start = time.perf_counter()
    # A fixed KV-cache size: the CPU backend otherwise reserves 92 % of the machine's memory at start (and refuses
    # to start when less is free).
    llm = LLM(model=str(directory), dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
              kv_cache_memory_bytes=2 << 30)
    engine_s = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    vllm_s = time.perf_counter() - start
    texts = [o.outputs[0].text.strip() for o in outputs]
    vllm_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    equal = [h["text"] == t for h, t in zip(hf, texts)]
    for h, t, same in zip(hf, texts, equal):
        if not same:
            cut = next((i for i, (a, b) in enumerate(zip(h["text"], t)) if a != b), min(len(h["text"]), len(t)))
            print(f"differs at character {cut}: HF {h['text'][cut:cut + 40]!r} | vLLM {t[cut:cut + 40]!r}")
    figures = {"prompts": len(prompts), "equal_texts": sum(equal), "max_tokens": args.max_tokens,
               "hf_one_at_a_time_s": round(hf_s, 2), "hf_tokens": sum(h["new_tokens"] for h in hf),
               "vllm_batch_s": round(vllm_s, 2), "vllm_tokens": vllm_tokens, "vllm_engine_start_s": round(engine_s, 1),
               "model_dir": str(directory)}
    print(json.dumps(figures, indent=1))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
