"""Load bench of `prism serve`: the same requests sent one at a time vs by N concurrent clients (real `openai` client).

Starts `prism serve` on an export (default: an untrained export of the embedded model, built once under /tmp: the
cost does not depend on trained values), then alternates the two modes for ``--reps`` rounds on the same requests
(greedy chat completions, ``--max-tokens`` each, prompts from _common.QUESTIONS). Reports generated tokens/s (usage
counts from the responses), p50/p99 request latency, errors, the largest batch the server formed, and the ratio of
concurrent to one-at-a-time throughput. Target: >= 4x at 16 clients on CPU.

With ``--engines hf vllm`` (in the environment scripts/install-vllm.sh builds) it measures `prism serve` on each
engine in turn, on the same export and requests, and adds the vLLM / HF throughput ratio per mode and whether the
two engines wrote the same greedy texts.

    PRISM_CACHE_DIR=/tmp/prismcache python bench/serve_load.py
    .venv-vllm/bin/python bench/serve_load.py --engines hf vllm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import BENCH_DIR, QUESTIONS, setup, table, wait_for_quiet, write_results

TARGET = 4.0


def untrained_export(directory: Path) -> Path:
    """An export of the embedded model with PEFT's zero-init adapter and an untrained gate (same compute)."""
    if (directory / "prism.json").is_file():
        return directory
    from prism_lightning.model.backbone import BackboneConfig
    from prism_lightning.training.modules import PrismModule

    module = PrismModule(backbone=BackboneConfig())
    module.configure_model()
    module.model.eval()
    return module.export(directory)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all processes used so far (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


async def run_mode(url: str, requests: list[str], clients: int, max_tokens: int) -> dict:
    """Send every request with ``clients`` concurrent workers; latency per request, tokens, errors, wall time."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in requests:
        queue.put_nowait(prompt)
    latencies, tokens, errors, texts = [], 0, 0, []

    async def worker() -> None:
        nonlocal tokens, errors
        while not queue.empty():
            prompt = queue.get_nowait()
            start = time.perf_counter()
            try:
                reply = await client.chat.completions.create(
                    model="prism", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                    temperature=0)
            except openai.OpenAIError as exc:
                errors += 1
                print(f"  error: {exc}", flush=True)
                continue
            latencies.append(time.perf_counter() - start)
            tokens += reply.usage.completion_tokens
            texts.append(reply.choices[0].message.content)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return {"wall_s": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "p99_s": round(percentile(latencies, 99), 3) if latencies else None, "errors": errors,
            "requests": len(requests), "texts": sorted(texts)}


def measure(engine: str, export: Path, requests: list[str], args: argparse.Namespace) -> dict:
    """Start `prism serve` on ``engine``, run both modes for ``args.reps`` interleaved rounds, stop it."""
    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    server = subprocess.Popen([sys.executable, "-m", "prism_lightning.cli", "serve", "--export", str(export),
                               "--port", str(args.port), "--max_batch_size", str(args.max_batch_size),
                               "--max_wait_ms", str(args.max_wait_ms), "--log_level", "warning",
                               "--engine", engine], cwd=BENCH_DIR.parent, env=env)
    modes = {"one at a time": 1, f"{args.clients} concurrent clients": args.clients}
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"prism serve exited with {server.returncode}")
                time.sleep(0.5)
        print(f"[{engine}] {args.requests} chat requests (greedy, max_tokens={args.max_tokens}); server: batches of "
              f"up to {args.max_batch_size}, {args.max_wait_ms:g} ms wait; export {export}", flush=True)
        for name, clients in modes.items():  # warm-up: a few requests through each path
            asyncio.run(run_mode(url, requests[:clients if clients > 1 else 2], clients, args.max_tokens))
        rounds = []
        for rep in range(args.reps):
            order = list(modes) if rep % 2 == 0 else list(modes)[::-1]
            entry = {}
            for name in order:
                quiet = wait_for_quiet(120, log=False)
                busy0, own0 = machine_busy_s(), time.process_time()
                server0 = tree_cpu_seconds(server.pid)
                result = asyncio.run(run_mode(url, requests, modes[name], args.max_tokens))
                busy = machine_busy_s() - busy0
                ours = (tree_cpu_seconds(server.pid) - server0) + (time.process_time() - own0)
                result["other_processes_cores"] = round(max(0.0, busy - ours) / result["wall_s"], 3)
                result["idle_share_at_start"] = quiet["idle_share_at_start"]
                entry[name] = result
                print(f"  [{engine}] round {rep + 1} {name}: {result['wall_s']:.1f}s, {result['tokens_per_s']:.1f} "
                      f"tok/s, p50 {result['p50_s']}s, p99 {result['p99_s']}s, errors {result['errors']} (other "
                      f"processes used {result['other_processes_cores']} cores)", flush=True)
            rounds.append(entry)
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            health = json.loads(r.read())
    finally:
        server.terminate()
        server.wait(timeout=120)
    one, many = list(modes)
    ratios = [r[many]["tokens_per_s"] / r[one]["tokens_per_s"] for r in rounds]
    rows = []
    for name in modes:
        runs = [r[name] for r in rounds]
        rows.append([name, statistics.median(x["tokens_per_s"] for x in runs),
                     statistics.median(x["p50_s"] for x in runs), statistics.median(x["p99_s"] for x in runs),
                     sum(x["errors"] for x in runs), sum(x["tokens"] for x in runs) // len(runs)])
    print(table(rows, ["mode", "tok/s (median)", "p50 s", "p99 s", "errors", "tokens/round"]))
    ratio = statistics.median(ratios)
    print(f"[{engine}] throughput ratio {many} / one at a time: {ratio:.2f}x (rounds: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}); target >= {TARGET}x: {'met' if ratio >= TARGET else 'missed'}; "
          f"largest server batch {health['largest_batch']}; same texts in both modes: "
          f"{all(r[one]['texts'] == r[many]['texts'] for r in rounds)}")
    return {"rounds": rounds, "ratio_median": round(ratio, 3), "ratios": [round(r, 3) for r in ratios],
            "server_health": health, "modes": list(modes),
            "tokens_per_s": {name: statistics.median(r[name]["tokens_per_s"] for r in rounds) for name in modes}}


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its children (vLLM's engine runs in child processes)."""
    total = cpu_seconds(pid)
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for kid in child.read_text().split():
            try:
                total += tree_cpu_seconds(int(kid))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, default=None, help="export directory (default: untrained, embedded)")
    parser.add_argument("--engines", nargs="+", default=["hf"], choices=["hf", "vllm"],
                        help="`prism serve --engine` values, measured one after the other")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    setup()
    export = args.export or untrained_export(Path(tempfile.gettempdir()) / "prism-serve-bench-export")
    requests = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
    engines = {engine: measure(engine, export, requests, args) for engine in args.engines}
    texts = {e: sorted(t for r in m["rounds"] for x in r.values() for t in x["texts"]) for e, m in engines.items()}
    payload: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    if len(engines) == 1:
        only = next(iter(engines.values()))
        payload.update({k: only[k] for k in ("rounds", "ratio_median", "ratios", "server_health")},
                       target=TARGET, same_texts=all(r[only["modes"][0]]["texts"] == r[only["modes"][1]]["texts"]
                                                     for r in only["rounds"]))
    else:
        hf, vllm = engines["hf"], engines["vllm"]
        for mode in hf["modes"]:
            print(f"{mode}: vLLM / HF throughput {vllm['tokens_per_s'][mode] / hf['tokens_per_s'][mode]:.2f}x "
                  f"({vllm['tokens_per_s'][mode]:.1f} vs {hf['tokens_per_s'][mode]:.1f} tok/s)")
        print(f"same greedy texts on both engines: {texts['hf'] == texts['vllm']}")
        payload.update(engines=engines, same_texts_across_engines=texts["hf"] == texts["vllm"],
                       vllm_over_hf={mode: round(vllm["tokens_per_s"][mode] / hf["tokens_per_s"][mode], 3)
                                     for mode in hf["modes"]})
    for measured in engines.values():
        for r in measured["rounds"]:
            for x in r.values():
                x.pop("texts")
    write_results("serve_load" if len(engines) == 1 else "serve_load_engines", payload)


if __name__ == "__main__":
    main()
