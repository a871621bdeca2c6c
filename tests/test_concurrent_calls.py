"""GatedModel shared between threads: each call runs on its own routes (issue #26, item 3)."""

from __future__ import annotations

import threading

from test_evaluation import gated  # noqa: F401  (the tiny GatedModel fixture: random LoRA, so routes differ)

from prism_lightning.model.generation import DecodingConfig

PROMPTS = ["Write a haiku about rain.", "What is 17 * 23?", "Name three primes.", "Explain LoRA briefly."]
DECODING = DecodingConfig(max_new_tokens=12, batch_size=4)


def test_two_threads_with_opposite_routes_get_their_single_threaded_outputs(gated):  # noqa: F811
    ids = [gated.prompt_ids(p) for p in PROMPTS]
    alone = {route: [r["text"] for r in gated.generate_ids(ids, DECODING, route)] for route in ("adapter", "base")}
    assert alone["adapter"] != alone["base"]  # the adapter changes the text, so a crossed route would show
    got: dict[str, list] = {"adapter": [], "base": []}
    start = threading.Barrier(2)

    def worker(route: str) -> None:
        start.wait()
        for _ in range(3):
            got[route].append([r["text"] for r in gated.generate_ids(ids, DECODING, route)])

    threads = [threading.Thread(target=worker, args=(route,)) for route in ("adapter", "base")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for route in ("adapter", "base"):
        assert got[route] == [alone[route]] * 3, route
