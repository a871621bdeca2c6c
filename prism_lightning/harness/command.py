"""``prism lm-eval``: lm-eval's own command line with the ``prism`` model registered and the project's offline tasks
on the task path; afterwards the routing rates per task, printed and written beside lm-eval's results file.

lm-eval 0.4 finds third-party models only in its in-process registry (no entry points), so the stock ``lm_eval``
script cannot see ``--model prism``: this command imports the model first and then hands every argument to lm-eval.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from prism_lightning.utils.errors import PrismError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SUBCOMMANDS = ("run", "ls", "validate")
USAGE = ("prism lm-eval: lm-evaluation-harness on a PRISM export, e.g.\n"
         "  prism lm-eval --model prism --model_args export=runs/quickstart/export,route=gate \\\n"
         "      --tasks prism_mmlu --output_path runs/lm-eval\n"
         "model_args: export (directory), route (gate | base | adapter | an adapter's name), batch_size, device,\n"
         "max_length, seed. The project's offline tasks (prism_mmlu, prism_mmlu_chat, prism_mt_bench) are on the task\n"
         "path. Every other argument is lm-eval's own (below).\n")


def _results_file(output_path: Optional[str], since: float) -> Optional[Path]:
    """The results JSON lm-eval wrote in this run (newest ``results_*.json`` under --output_path), if any."""
    if not output_path:
        return None
    root = Path(output_path)
    if root.suffix == ".json":
        candidates = list(root.parent.glob(f"{root.stem}_*.json"))
    else:
        candidates = list(root.rglob("results_*.json"))
    fresh = [p for p in candidates if p.stat().st_mtime >= since - 1]
    return max(fresh, key=lambda p: p.stat().st_mtime) if fresh else None


def lm_eval_command(args: list[str]) -> None:
    """Run lm-eval with ``--model prism`` available, then report the routing rates per task."""
    try:
        from lm_eval._cli.harness import HarnessCLI
    except ImportError:
        raise PrismError("prism lm-eval needs lm-evaluation-harness: pip install 'prism-lightning[lmeval]'") from None
    from prism_lightning.harness.lm import PrismLM  # registers --model prism
    from prism_lightning.harness.routing_rates import rates_table

    argv = list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        argv = ["run", "--help"]
    elif argv[0] not in SUBCOMMANDS:
        argv = ["run", *argv]
    if argv[0] == "run" and not any(a == "--device" or a.startswith("--device=") for a in argv):
        argv.append("--device=auto")  # lm-eval's default is cuda:0; the export's own is auto (cuda when there is one)
    cli = HarnessCLI()
    parsed = cli._parser.parse_args(argv)  # HarnessCLI.parse_args reads sys.argv; its parser takes ours
    if hasattr(parsed, "include_path"):  # lm-eval's TaskManager takes a list: the user's directory and ours
        parsed.include_path = [str(TASKS_DIR)] + ([parsed.include_path] if parsed.include_path else [])
    PrismLM.last = None
    started = time.time()
    try:
        cli.execute(parsed)
    except ValueError as exc:  # lm-eval's word for bad input (an unknown task, a malformed --metadata): one line
        raise PrismError(f"lm-eval: {' '.join(str(exc).split())}") from None
    lm = PrismLM.last
    if argv[0] != "run" or lm is None or not lm.routing.records:
        return
    from rich.console import Console

    rates = lm.routing.rates()
    Console().print(rates_table(rates, lm.route))
    results = _results_file(getattr(parsed, "output_path", None), started)
    if results is None:
        print("[prism] routing rates not written: give --output_path to keep them beside lm-eval's results")
        return
    name = ("routing_" + results.name[len("results_"):] if results.name.startswith("results_")
            else f"{results.stem}_routing.json")
    path = lm.routing.write(results.with_name(name), lm.route, lm.export)
    print(f"[prism] routing rates per task: {path}")
