"""Memory of the paper-model configs, computed from their shapes plus one measured quantity, for one GPU.

    python bench/memory_estimate.py            # the table for configs/models/*.yaml (a few minutes on 2 CPU cores)

What a training step holds (bf16 weights, ``precision: bf16-mixed``, ``gradient_checkpointing: true``):

* frozen weights: parameter count (from the architecture) × 2 bytes;
* LoRA (rank r on the 7 projections of layers 1..L-1, PEFT keeps them in fp32): parameters × 16 bytes (weight,
  gradient, AdamW's two moments);
* activations: with gradient checkpointing each layer keeps its input (tokens × H × 2 bytes), and the layer being
  recomputed in backward holds its full set once: ``a_layer`` bytes per token, **measured** here by building one
  LoRA-wrapped decoder layer of the real shape (random weights, vocabulary cut to 1,024 because it does not enter
  a layer), running it under bf16 autocast and summing the tensors autograd saves (parameters excluded);
* the loss: vocabulary-wide logits exist only for ``head_chunk`` tokens at a time — teacher chunk, student chunk
  and its gradient: 3 × head_chunk × V × 2 bytes;
* without checkpointing (for comparison) every layer holds ``a_layer`` per token.

DeepSpeed's ``estimate_zero*_model_states_mem_needs`` assumes every parameter is trained (16 bytes each): for
LoRA on a frozen base that overstates model states about 8×, so the model states are counted directly instead.

Bootstrap (generation): weights of the model (and of a separate judge when the config names one: both stay loaded)
+ the KV cache of one answer batch: 2 (K, V) × L × kv_heads × head_dim × 2 bytes × batch × (prompt + new tokens),
the prompt bounded by the query's new tokens + 312 (longest built-in persona and the chat template).

Figures exclude the CUDA context and allocator slack (typically 1–3 GiB): leave that much headroom.
The check row applies the same arithmetic to the embedded model at the shape ``bench/memory.py`` measured.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2 ** 30
PERSONA_AND_TEMPLATE = 312  # tokens around a query in an answer prompt: the longest built-in persona + chat template


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's shape (from the model's published config.json)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hidden // self.heads

    def parameters(self) -> int:
        """Every weight: embeddings (+ untied head), attention, MLP, norms."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        attention = h * (h + 2 * kv) + h * h + (h + 2 * kv if self.qkv_bias else 0)
        per_layer = attention + 3 * h * i + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * per_layer + h

    def lora_parameters(self, rank: int) -> int:
        """LoRA A and B on q, k, v, o, gate, up, down of layers 1..L-1 (never layer 0)."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        per_layer = rank * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
        return (self.layers - 1) * per_layer


LLAMA3_8B = Shape(32, 4096, 14336, 32, 8, 128256)
SHAPES = {  # by the config's backbone name
    "meta-llama/Llama-3.1-8B-Instruct": LLAMA3_8B,
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": LLAMA3_8B,
    "mistralai/Mistral-7B-Instruct-v0.3": Shape(32, 4096, 14336, 32, 8, 32768),
    "Qwen/Qwen2.5-7B-Instruct": Shape(28, 3584, 18944, 28, 4, 152064, qkv_bias=True),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": Shape(28, 3584, 18944, 28, 4, 152064, qkv_bias=True),
    "embedded": Shape(30, 576, 1536, 9, 3, 49152, tied=True),
}


def layer_bytes_per_token(shape: Shape, dtype: torch.dtype, tokens: int = 256) -> float:
    """Measured: bytes autograd saves per token inside one LoRA-wrapped decoder layer of this shape."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=2, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         attention_bias=shape.qkv_bias)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, layers_to_transform=[1],
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    inside = [False]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if inside[0] and storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    layer = model.get_base_model().model.layers[1]
    layer.register_forward_pre_hook(lambda *args: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *args: inside.__setitem__(0, False))
    ids = torch.randint(0, 1024, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        model(input_ids=ids, use_cache=False)
    return sum(saved.values()) / tokens


def training_gib(shape: Shape, a_layer: float, rows: int, tokens: int, head_chunk: int, checkpointing: bool,
                 bytes_per_weight: int = 2) -> dict:
    """The parts of a training step's peak, GiB."""
    n = rows * tokens
    parts = {"weights": shape.parameters() * bytes_per_weight,
             "lora_states": shape.lora_parameters(16) * 16,
             "activations": n * (shape.layers * shape.hidden * bytes_per_weight + a_layer) if checkpointing
             else n * shape.layers * a_layer,
             "loss": 3 * min(head_chunk, n) * shape.vocab * bytes_per_weight}
    parts = {k: v / GIB for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def bootstrap_gib(shape: Shape, judge: Shape | None, batch: int, tokens: int) -> float:
    """Weights of the model (and judge) plus one generation batch's KV cache, GiB."""
    kv_cache = 2 * shape.layers * shape.kv_dim * 2 * batch * tokens
    weights = shape.parameters() * 2 + (judge.parameters() * 2 if judge else 0)
    return (weights + kv_cache) / GIB


def main() -> None:
    """Measure a_layer per shape, then print the table for every paper-model config and the embedded check."""
    rows, measured = [], {}
    for path in sorted((ROOT / "configs" / "models").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        data, model = config["data"], config["model"]["init_args"]
        name = data["backbone"]["name_or_path"]
        shape = SHAPES[name]
        layer = (shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.qkv_bias)  # not the vocabulary
        if layer not in measured:
            measured[layer] = layer_bytes_per_token(shape, torch.bfloat16)
        a_layer = measured[layer]
        head_chunk = model.get("head_chunk", 1024)
        judge = data.get("judge", {}).get("model")  # a separate judge model stays loaded beside the base
        judge_shape = SHAPES.get(judge["name_or_path"]) if judge else None
        answers = data["answers"]["decoding"]
        with_gc = training_gib(shape, a_layer, data["batch_size"], data["max_length"], head_chunk, True)
        without = training_gib(shape, a_layer, data["batch_size"], data["max_length"], head_chunk, False)
        prompt = data["queries"]["decoding"]["max_new_tokens"] + PERSONA_AND_TEMPLATE
        boot = bootstrap_gib(shape, judge_shape, answers["batch_size"], prompt + answers["max_new_tokens"])
        rows.append({"config": path.name, "model": name, "parameters_b": round(shape.parameters() / 1e9, 2),
                     "a_layer_kib_per_token": round(a_layer / 1024, 1), "rows": data["batch_size"],
                     "tokens": data["max_length"], "train_gc": {k: round(v, 1) for k, v in with_gc.items()},
                     "train_no_gc_total": round(without["total"], 1), "bootstrap": round(boot, 1),
                     "generation_batch": answers["batch_size"]})
    print("| config | params | a_layer KiB/token | step (rows × tokens) | weights | LoRA+AdamW | activations | loss | "
          "train total (gc) | train total (no gc) | bootstrap |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["train_gc"]
        print(f"| {r['config']} | {r['parameters_b']} B | {r['a_layer_kib_per_token']} | {r['rows']} × {r['tokens']} "
              f"| {t['weights']} | {t['lora_states']} | {t['activations']} | {t['loss']} | **{t['total']} GiB** | "
              f"{r['train_no_gc_total']} GiB | {r['bootstrap']} GiB (batch {r['generation_batch']}) |")
    # Check against a measurement: bench/memory.py, embedded, 4 × 1024, float32, gradient checkpointing.
    embedded = SHAPES["embedded"]
    a32 = layer_bytes_per_token(embedded, torch.float32)
    estimate = training_gib(embedded, a32, 4, 1024, 1024, True, bytes_per_weight=4)
    step_only = (estimate["activations"] + estimate["loss"] + estimate["lora_states"]) * 1024
    result = ROOT / "bench" / "results" / "memory.json"
    seen = json.loads(result.read_text()).get("embedded/4x1024/float32/cpu", {}) if result.is_file() else {}
    measured_mib = seen.get("runs", {}).get("after+gc", {}).get("peak_mib")
    print(f"\ncheck: embedded 4 × 1024 fp32 with checkpointing — estimated step memory above the loaded weights "
          f"{step_only:.0f} MiB (a_layer {a32 / 1024:.1f} KiB/token); bench/memory.py measured {measured_mib} MiB")
    out = ROOT / "bench" / "results" / "memory_estimate.json"
    out.write_text(json.dumps({"configs": rows, "check": {"estimated_mib": round(step_only),
                                                          "measured_mib": measured_mib}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
