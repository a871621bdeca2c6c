"""`prism serve` (issue #26; `--engine vllm`, issue #27): the server in a subprocess on a tiny random export, driven
by the real `openai` client, on each engine.

Every served text is checked against ``GatedModel`` in this process on the same export: forced routes, the gate's
route and probability, a mixed batch of concurrent requests with different budgets, streaming, stop strings.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

openai = pytest.importorskip("openai")
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (scripts/install-vllm.sh)")

from test_cli_fit import save_tiny_model  # noqa: E402
from test_routing import _randomise  # noqa: E402

from prism_lightning.inference.gated_model import GatedModel  # noqa: E402
from prism_lightning.model.backbone import BackboneConfig  # noqa: E402
from prism_lightning.model.generation import DecodingConfig  # noqa: E402
from prism_lightning.training.modules import LoraSettings, PrismModule  # noqa: E402

PRISM = [sys.executable, "-m", "prism_lightning.cli"]
PROMPTS = ["Write a haiku about rain.", "What is 17 * 23?", "Name three primes.", "Explain LoRA briefly, please."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_export(directory: Path, model_dir: Path) -> Path:
    """An export whose adapter and gate visibly change outputs and spread the gate's probabilities."""
    module = PrismModule(backbone=BackboneConfig(name_or_path=str(model_dir)), lora=LoraSettings(rank=4, alpha=8),
                         threshold=0.5)
    module.configure_model()
    _randomise(module)
    module.model.eval()
    return module.export(directory)


class Server:
    """A `prism serve` subprocess; ``url`` once /health answers."""

    def __init__(self, export: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([*PRISM, "serve", "--export", str(export), "--port", str(self.port),
                                         "--log_level", "warning", *extra],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "TERM": "dumb"})
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited {self.process.returncode}: {self.process.stderr.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.process.kill()
        raise AssertionError("server did not answer /health within 240 s")

    def client(self) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=300)

    def post(self, path: str, body: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(f"{self.url}{path}", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture(scope="module")
def export(smol_tokenizer, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serve")
    # Head size 64: one vLLM's CPU attention kernels take (the HF path takes any).
    return make_export(tmp / "export", save_tiny_model(tmp / "model", smol_tokenizer, seed=0, hidden_size=128,
                                                       heads=2))


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=needs_vllm)])
def engine(request) -> tuple[str, ...]:
    """`prism serve`'s engine arguments: every test below runs on the HF path and, where vLLM is installed
    (scripts/install-vllm.sh), on vLLM with the same expectations."""
    return ("--engine", request.param) + (("--kv_cache_gib", "0.5") if request.param == "vllm" else ())


@pytest.fixture(scope="module")
def server(export, engine) -> Iterator[Server]:
    running = Server(export, *engine, "--max_wait_ms", "200", "--max_tokens", "16")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def gated(export) -> GatedModel:
    return GatedModel.from_pretrained(export, device="cpu")


def alone(gated: GatedModel, prompt_ids: list[int], route: str, max_tokens: int = 16) -> dict:
    return gated.generate_ids([prompt_ids], DecodingConfig(max_new_tokens=max_tokens), route)[0]


# --------------------------------------------------------------------------- endpoints and routes
def test_models_lists_the_gated_model_and_the_forced_routes(server):
    assert [m.id for m in server.client().models.list()] == ["prism", "prism:base", "prism:adapter"]


def test_chat_on_each_route_equals_the_gated_model_with_its_route_and_real_usage(server, gated):
    client = server.client()
    ids = gated.prompt_ids(PROMPTS[0])
    texts = {}
    for model, route in (("prism:base", "base"), ("prism:adapter", "adapter"), ("prism", "gate")):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=12)
        reply = raw.parse()
        expected = alone(gated, ids, route, 12)
        texts[route] = reply.choices[0].message.content
        assert texts[route].strip() == expected["text"], model
        assert reply.model_extra["prism"]["route"] == expected["route"]
        assert reply.model_extra["prism"]["probability"] == expected["probability"]
        assert raw.headers["x-prism-route"] == expected["route"]
        assert reply.usage.prompt_tokens == len(ids)
        assert 1 <= reply.usage.completion_tokens <= 12
        assert reply.choices[0].finish_reason in ("stop", "length")
    assert texts["base"] != texts["adapter"]  # the adapter changes the text, so a crossed route would show
    assert reply.model_extra["prism"]["probability"] is not None  # the gated route ran the gate


def test_text_completion_routes_the_raw_prompt(server, gated):
    reply = server.client().completions.create(model="prism:adapter", prompt="The capital of France is",
                                               max_tokens=10)
    expected = alone(gated, gated.backbone.tokenizer("The capital of France is")["input_ids"], "adapter", 10)
    assert reply.choices[0].text.strip() == expected["text"]
    assert reply.model_extra["prism"]["route"] == "adapter"


def test_streaming_gives_the_same_text_in_chunks_and_usage_when_asked(server):
    client = server.client()
    messages = [{"role": "user", "content": PROMPTS[3]}]
    whole = client.chat.completions.create(model="prism:adapter", messages=messages, max_tokens=14)
    chunks = list(client.chat.completions.create(model="prism:adapter", messages=messages, max_tokens=14,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.model_extra["prism"]["route"] == "adapter" for c in chunks)


def test_a_stop_string_cuts_the_text_before_it(server):
    client = server.client()
    messages = [{"role": "user", "content": PROMPTS[2]}]
    full = client.chat.completions.create(model="prism:base", messages=messages, max_tokens=16)
    text = full.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    cut = client.chat.completions.create(model="prism:base", messages=messages, max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="prism:base", messages=messages, max_tokens=16, stop=[stop], stream=True) if c.choices)
    assert streamed == text[:text.index(stop)]


def test_concurrent_requests_share_a_batch_and_each_gets_its_own_output(server, gated):
    """Mixed routes and budgets in one batch: every reply equals its request run alone."""
    client = server.client()
    before = server.health()["largest_batch"]
    asks = [(PROMPTS[i % 4], ("prism", "prism:base", "prism:adapter")[i % 3], 4 + 2 * (i % 5)) for i in range(8)]
    got: dict[int, object] = {}
    start = threading.Barrier(len(asks))

    def ask(i: int) -> None:
        prompt, model, budget = asks[i]
        start.wait()
        got[i] = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=budget)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert server.health()["largest_batch"] > max(before, 1)
    routes = {"prism": "gate", "prism:base": "base", "prism:adapter": "adapter"}
    for i, (prompt, model, budget) in enumerate(asks):
        expected = alone(gated, gated.prompt_ids(prompt), routes[model], budget)
        assert got[i].choices[0].message.content.strip() == expected["text"], asks[i]
        assert got[i].usage.completion_tokens <= budget
        assert got[i].model_extra["prism"]["route"] == expected["route"]


def test_the_gate_only_model_of_a_vllm_server_routes_as_the_whole_model(export):
    """`prism serve --engine vllm` keeps only layer 0 of the HF copy: the same gate probabilities and routes as the
    whole model, and generating with it is refused (in a subprocess: the cut model is the process's backbone)."""
    script = f"""
import torch
from prism_lightning.inference.gated_model import GatedModel
from prism_lightning.utils.errors import PrismError
model = GatedModel.from_pretrained({str(export)!r}, device="cpu")
prompts = [model.prompt_ids(p) for p in {PROMPTS!r}]
before = model.routes(prompts)
whole = sum(1 for _ in model.model.get_base_model().get_decoder().layers)
model.keep_gate_only()
after = model.routes(prompts)
assert before[0] == after[0] and torch.equal(before[1], after[1]), (before, after)
assert whole == 3 and len(model.model.get_base_model().get_decoder().layers) == 1
try:
    model.generate(["hi"])
except PrismError as exc:
    print("refused:", exc)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refused: this GatedModel keeps only the gate's layers" in out.stdout


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("body, status, param", [
    (b'{"model": "prism", "messages": [', 400, None),
    (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404, "model"),
    (json.dumps({"model": "prism", "messages": []}).encode(), 400, "messages"),
    (json.dumps({"model": "prism", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(),
     400, "max_tokens"),
    (json.dumps({"model": "prism", "messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400,
     "messages[0].role"),
    (json.dumps({"model": "prism", "messages": [{"role": "user", "content": "word " * 2100}]}).encode(), 400,
     "messages"),
    (json.dumps({"model": "prism", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}).encode(),
     400, "logprobs"),
])
def test_a_bad_request_gets_an_openai_error_and_the_server_goes_on(server, body, status, param):
    code, reply = server.post("/v1/chat/completions", body)
    assert code == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["param"] == param
    assert reply["error"]["message"]
    if b"word word" in body:
        assert reply["error"]["code"] == "context_length_exceeded" and "2048" in reply["error"]["message"]
    ok = server.client().chat.completions.create(model="prism", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_the_openai_client_raises_its_own_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="prism", prompt="hi", max_tokens=-3)


def test_a_streaming_client_that_leaves_stops_its_rows_generation(server):
    before = server.health()["cancelled_rows"]
    stream = server.client().chat.completions.create(
        model="prism:adapter", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=1900, stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)  # generating
    stream.close()
    deadline = time.monotonic() + 120
    while server.health()["cancelled_rows"] == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.health()["cancelled_rows"] == before + 1


def test_sigterm_finishes_the_request_in_flight_then_exits(export, engine):
    running = Server(export, *engine, "--max_tokens", "200")
    stream = running.client().chat.completions.create(
        model="prism:adapter", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=200, stream=True)
    first = next(iter(stream))  # the request is in flight (routed, generating)
    running.process.send_signal(signal.SIGTERM)
    rest = list(stream)
    out, err = running.process.communicate(timeout=120)
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] in ("stop", "length")
    assert running.process.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out
    assert first.model_extra["prism"]["route"] == "adapter"


def test_a_bad_export_or_setting_is_one_line_at_start(tmp_path, export):
    cases = [(["--export", str(tmp_path / "missing")], "missing"),
             (["--export", str(export), "--max_batch_size", "0"], "max_batch_size"),
             (["--export", str(export), "--engine", "tgi"], "engine")]
    if not HAS_VLLM:
        cases.append((["--export", str(export), "--engine", "vllm"], "scripts/install-vllm.sh"))
    for args, needle in cases:
        result = subprocess.run([*PRISM, "serve", *args], capture_output=True, text=True, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr[-2000:]
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
