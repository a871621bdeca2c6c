"""bench/context_latency.py runs in its quick mode on the embedded model and writes every figure it reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_quick_mode_measures_every_variant(tmp_path):
    out = tmp_path / "latency.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "context_latency.py"), "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    cells = data["cells"]
    assert [(c["batch"]) for c in cells] == [1, 2, 1, 2]
    short, long = cells[0]["context_tokens"], cells[2]["context_tokens"]
    assert 48 <= short < long  # the context block reaches the asked length
    for cell in cells:
        assert cell["prompt_tokens_with_context"] == cell["prompt_tokens_without"] + cell["context_tokens"]
        assert cell["cached_prefix_tokens"] < cell["prompt_tokens_with_context"]
        for name in ("prepended", "prefix-cached", "gated adapter"):
            assert cell[name]["ttft_s"] > 0 and cell[name]["decode_tokens_per_s"] > 0
        for name in ("prepended", "prefix-cached"):
            assert cell[name]["ttft_ratio_vs_gated"] == pytest.approx(
                cell[name]["ttft_s"] / cell["gated adapter"]["ttft_s"], rel=1e-2, abs=0.006)  # stored to 2 places
    assert "TTFT prep/gated" in result.stdout
