"""The benchmark files shipped in the package: present, readable by the loaders, the row counts their README
states, and a licence text for each source."""

from __future__ import annotations

from collections import Counter

import pytest

from prism_lightning.evaluation.benchmarks import (
    BUILTIN_DIR,
    builtin_names,
    load_harmbench,
    load_mt_bench,
    load_prompt_list,
    resolve,
)
from prism_lightning.utils.errors import PrismError


def test_shipped_benchmarks_load_with_the_counts_their_readme_states():
    assert builtin_names() == ["harmbench", "jailbreak", "mt_bench"]
    mt = load_mt_bench("builtin:mt_bench")
    assert len(mt) == 80 and Counter(q["category"] for q in mt) == Counter({c: 10 for c in (
        "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")})
    assert all(len(q["turns"]) == 2 for q in mt)
    harm = load_harmbench("builtin:harmbench")
    assert len(harm) == 400 and Counter(r["category"] for r in harm) == {"standard": 200, "copyright": 100,
                                                                        "contextual": 100}
    assert len(load_prompt_list("builtin:jailbreak")) == 79
    readme = (BUILTIN_DIR / "README.md").read_text(encoding="utf-8")
    for name, rows in (("mt_bench", "80"), ("harmbench", "400"), ("jailbreak", "79")):
        assert f"`{name}`" in readme and rows in readme
    licences = sorted(p.name for p in (BUILTIN_DIR / "licenses").iterdir())
    assert licences == ["Apache-2.0-FastChat.txt", "MIT-HarmBench.txt", "MIT-PRISM-reference-code.txt",
                        "MIT-llm-attacks.txt"]
    assert "`refusal_strings`" in readme and "| 29 |" in readme


def test_an_unknown_builtin_name_lists_the_shipped_ones():
    with pytest.raises(PrismError, match="builtin:nosuch: no such shipped benchmark; shipped: builtin:harmbench"):
        resolve("builtin:nosuch")
    assert str(resolve("some/own/file.jsonl")) == "some/own/file.jsonl"
