"""The online teacher's reuse of persona-block keys/values: same hidden states, targets and loss as full forwards."""

from __future__ import annotations

import pytest
import torch

from prism_lightning.model.chat import ChatFormatter
from prism_lightning.model.generation import right_pad
from prism_lightning.model.prefix_states import PrefixStates, hidden_after_prefixes, shared_prefix_len
from prism_lightning.training.datamodule import Collator
from prism_lightning.training.modules import LoraSettings, PrismModule

PERSONAS = {"math": "You are a meticulous mathematician who proves every step and names each rule you use.",
            "coding": "You are a senior Python engineer."}
ITEMS = [
    {"id": "d-0", "query": "How do I add two fractions?", "label": 1, "target_persona": "math",
     "persona_answer": "Find a common denominator, rewrite both, then add the numerators.", "baseline_answer": "Add."},
    {"id": "d-1", "query": "Why is the sum of two even numbers even?", "label": 1, "target_persona": "math",
     "persona_answer": "Write them as 2a and 2b; the sum 2(a + b) is even.", "baseline_answer": "It is."},
    {"id": "d-2", "query": "Reverse a list in Python.", "label": 1, "target_persona": "coding",
     "persona_answer": "Use xs[::-1]; it returns a new list.", "baseline_answer": "Reverse it."},
    {"id": "r-0", "query": "What is the capital of France?", "label": 0, "target_persona": "math",
     "persona_answer": "Paris.", "baseline_answer": "The capital of France is Paris."},
]


def test_shared_prefix_len_stops_at_the_first_difference_and_the_limit():
    assert shared_prefix_len([1, 2, 3, 4], [1, 2, 9], 10) == 2
    assert shared_prefix_len([1, 2, 3, 4], [1, 2, 3, 4, 5], 3) == 3
    assert shared_prefix_len([7], [1], 5) == 0


def test_hidden_states_after_reused_prefixes_equal_the_full_forward(tiny_llama):
    model = tiny_llama(0)
    a, b = list(range(100, 117)), list(range(300, 309))
    rows = [a + [5, 6, 7, 8], a + [9, 10], b + [11, 12, 13, 14, 15, 16], [17, 18, 19]]
    lens = torch.tensor([len(a), len(a), len(b), 0])  # two prefixes of different length and a row without one
    ids, mask = right_pad(rows, 0)
    store = PrefixStates()
    calls = []
    decoder = model.get_decoder()
    handle = decoder.register_forward_pre_hook(lambda m, args, kw: calls.append(kw["input_ids"].shape),
                                               with_kwargs=True)
    with torch.no_grad():
        full = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        calls.clear()
        for _ in range(2):
            hidden, skipped = hidden_after_prefixes(model, ids, mask, lens, store)
    handle.remove()
    assert skipped.tolist() == lens.tolist()
    for row, (tokens, n) in enumerate(zip(rows, lens.tolist())):
        torch.testing.assert_close(hidden[row, :len(tokens) - n], full[row, n:len(tokens)], atol=1e-5, rtol=1e-5)
    # Each prefix ran once (first call), then only the tokens after the prefixes: 6 per row at most.
    assert sorted(calls[:3]) == sorted([torch.Size([1, len(a)]), torch.Size([1, len(b)]), torch.Size([4, 6])])
    assert calls[3:] == [torch.Size([4, 6])] and len(store) == 2


def test_a_sliding_window_model_falls_back_to_full_forwards():
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=4)).eval()
    ids, mask = right_pad([[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 8]], 0)
    with torch.no_grad():
        assert hidden_after_prefixes(model, ids, mask, torch.tensor([3, 3]), PrefixStates()) is None


@pytest.mark.parametrize("placement", ["system", "user"])
def test_the_collator_marks_each_teacher_rows_persona_block(smol_tokenizer, placement):
    formatter = ChatFormatter(smol_tokenizer, placement)
    batch = Collator(formatter, PERSONAS)(ITEMS)
    persona_tokens = len(smol_tokenizer(PERSONAS["math"], add_special_tokens=False)["input_ids"])
    for row, item in enumerate(ITEMS):
        n = int(batch["teacher_prefix"][row])
        first_read = int(batch["teacher_pos"][row, 0])
        assert 0 < n <= first_read  # the prefix never reaches a position whose hidden state the loss reads
        prefix = formatter.context_prefix(PERSONAS[item["target_persona"]] if item["label"] else None)
        assert batch["teacher_ids"][row, :n].tolist() == prefix[:n]
        if item["label"]:
            assert n > persona_tokens if item["target_persona"] == "math" else n > 5
            assert PERSONAS[item["target_persona"]] in smol_tokenizer.decode(prefix)
        query_start = smol_tokenizer.decode(batch["teacher_ids"][row, n:first_read + 1].tolist())
        assert item["query"] in query_start  # everything item-specific is after the prefix


@pytest.fixture
def two_modules(tiny_backbone):
    def make(reuse: bool) -> PrismModule:
        torch.manual_seed(0)
        module = PrismModule(backbone=tiny_backbone.config, lora=LoraSettings(rank=4, alpha=8, dropout=0.0),
                             prefix_reuse=reuse)
        module.configure_model()
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for name, p in module.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        return module
    return make


def test_the_loss_and_gradients_with_reused_prefixes_equal_full_teacher_forwards(two_modules, tiny_backbone):
    batch = Collator(ChatFormatter(tiny_backbone.tokenizer), PERSONAS)(ITEMS)
    results = {}
    for reuse in (False, True):
        module = two_modules(reuse)
        module.model.train()
        losses = []
        for _ in range(2):  # the second step reads the stored persona blocks
            module.zero_grad()
            out = module.distill_loss(batch, module.student_hidden(batch))
            out["loss"].backward()
            losses.append(out["kl"].detach())
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results[reuse] = losses, grads, len(module.prefix_states)
    (loss_full, grads_full, stored_full), (loss_reuse, grads_reuse, stored_reuse) = results[False], results[True]
    assert stored_full == 0 and stored_reuse == 2  # math and coding
    for full, reused in zip(loss_full, loss_reuse):
        torch.testing.assert_close(reused, full, atol=1e-6, rtol=1e-5)
    assert loss_full[0] > 1e-3 and grads_full.keys() == grads_reuse.keys() and grads_full
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_reuse[name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", ["llama3_tokenizer", "mistral_tokenizer"])
def test_the_persona_block_is_found_with_the_paper_models_tokenizers(request, name):
    tokenizer = request.getfixturevalue(name)
    formatter = ChatFormatter(tokenizer)
    batch = Collator(formatter, PERSONAS)(ITEMS[:3])
    persona_tokens = len(tokenizer(PERSONAS["math"], add_special_tokens=False)["input_ids"])
    for row, item in enumerate(ITEMS[:3]):
        n = int(batch["teacher_prefix"][row])
        prefix = tokenizer.decode(batch["teacher_ids"][row, :n].tolist())
        rest = tokenizer.decode(batch["teacher_ids"][row, n:int(batch["teacher_pos"][row, 0]) + 1].tolist())
        assert PERSONAS[item["target_persona"]] in prefix and item["query"] in rest, (prefix, rest)
        if item["target_persona"] == "math":
            assert n > persona_tokens


def test_a_sliding_window_model_runs_the_prefix_forward_once_then_never_again():
    """A model whose cache keeps only a window cannot reuse a prefix: found out once, not at every step."""
    calls = []

    class Cache:
        is_sliding = [True, False]
        layers = []

    class Decoder:
        def __call__(self, **kwargs):
            calls.append(kwargs["input_ids"].shape)
            return type("Out", (), {"cache": Cache()})()

    class Model:
        def get_decoder(self):
            return Decoder()

    store = PrefixStates()
    for _ in range(3):
        assert store.key_values(Model(), (1, 2, 3), torch.device("cpu")) is None
    assert len(calls) == 1 and store.unsupported and len(store) == 0
    store.clear()
    assert not store.unsupported
