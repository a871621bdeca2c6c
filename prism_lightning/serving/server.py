"""``prism serve``: load an export, check the settings, and run the application under uvicorn (SIGTERM and Ctrl-C
stop accepting, finish the requests in flight, then exit)."""

from __future__ import annotations

import signal
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Optional

from prism_lightning.utils.errors import PrismError


@dataclass
class ServeConfig:
    """Settings of ``prism serve``.

    Args:
        export: export directory written by ``prism fit`` / ``prism export``.
        host: interface to listen on (``0.0.0.0`` for every interface).
        port: TCP port.
        device: ``cpu``, ``cuda``, ``cuda:1``…; default: the export's backbone setting (``auto``).
        model_name: the served model id (``<name>:base`` and ``<name>:adapter`` force a route).
        max_batch_size: most requests generated in one batch.
        max_wait_ms: how long the first request of a batch waits for others to join it.
        max_tokens: completion budget of a request that sets none (shrunk to the room left in the context).
        temperature: default temperature (0 = greedy) of a request that sets none.
        top_p: default nucleus mass.
        log_level: uvicorn's log level (``warning`` hides the access log).
        engine: what generates: ``hf`` (transformers, micro-batched) or ``vllm`` (vLLM's async engine with the
            export's adapters as LoRA requests; the gate still runs here, on layer 0; in the environment
            scripts/install-vllm.sh builds).
        kv_cache_gib: vLLM's KV-cache memory (``engine: vllm``).
    """

    export: str
    host: str = "127.0.0.1"
    port: int = 8000
    device: Optional[str] = None
    model_name: str = "prism"
    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    log_level: str = "info"
    engine: Literal["hf", "vllm"] = "hf"
    kv_cache_gib: float = 2.0

    def check(self) -> None:
        """One line naming the setting that cannot work."""
        if not 0 <= self.port <= 65535:
            raise PrismError(f"port: {self.port} is not a TCP port (0–65535)")
        if self.max_batch_size < 1:
            raise PrismError(f"max_batch_size: must be at least 1, got {self.max_batch_size}")
        if self.max_wait_ms < 0:
            raise PrismError(f"max_wait_ms: must be 0 or more, got {self.max_wait_ms}")
        if self.max_tokens < 1:
            raise PrismError(f"max_tokens: must be at least 1, got {self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise PrismError(f"temperature must be >= 0 and top_p in (0, 1]; got {self.temperature}, {self.top_p}")
        if self.kv_cache_gib <= 0:
            raise PrismError(f"kv_cache_gib: must be above 0, got {self.kv_cache_gib}")
        if not self.model_name or ":" in self.model_name:
            raise PrismError(f"model_name: {self.model_name!r} must be non-empty and without ':' (it is the prefix "
                             f"of the forced-route ids)")


def serve(config: ServeConfig) -> None:
    """Load the export and serve it until SIGTERM or Ctrl-C."""
    config.check()
    try:
        import uvicorn

        from prism_lightning.serving.app import ServeSettings, create_app
    except ImportError as exc:
        raise PrismError(f"prism serve needs the `serve` extra ({exc.name} is missing): "
                         f"pip install 'prism-lightning[serve]'") from None
    from prism_lightning.inference.gated_model import GatedModel
    from prism_lightning.model.vllm_engine import require_vllm

    if config.engine == "vllm":
        require_vllm("engine")  # before loading anything
    model = GatedModel.from_pretrained(config.export, device=config.device)
    batcher = None
    if config.engine == "vllm":
        from prism_lightning.serving.vllm_batcher import VllmBatcher

        batcher = VllmBatcher(model, Path(config.export), config.max_batch_size, config.max_wait_ms,
                              config.kv_cache_gib)
        model.keep_gate_only()  # vLLM holds the weights that generate; here only the gate's layer 0 stays
    names = {f.name for f in fields(ServeSettings)}
    app = create_app(model, ServeSettings(**{k: v for k, v in vars(config).items() if k in names}), batcher)
    print(f"serving {config.export} as {config.model_name!r} ({len(model.adapters)} adapter(s), "
          f"threshold {model.threshold:.3f}) on http://{config.host}:{config.port} — "
          + (f"vLLM engine (continuous batching), gate batches of up to {config.max_batch_size}"
             if config.engine == "vllm" else f"batches of up to {config.max_batch_size}")
          + f", {config.max_wait_ms:g} ms wait", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                          timeout_graceful_shutdown=None))
    # uvicorn catches SIGTERM/SIGINT, drains the requests in flight, then raises the signal again to the handlers it
    # found: these end the process with exit 0, as a finished drain should (the default ones would kill it).
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    except SystemExit:  # uvicorn exits 1 when it cannot bind; it has logged why
        if server.started:
            raise
    except _Stop as stop:
        print(f"stopped by {signal.Signals(stop.args[0]).name}: requests in flight were finished", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise PrismError(f"could not listen on {config.host}:{config.port} (in use, or not an address of this "
                         f"machine); choose another --port or --host")


class _Stop(Exception):
    """A stop signal that arrived after uvicorn finished its drain."""


def _stopped(signum: int, frame: Any) -> None:
    raise _Stop(signum)
