"""``PrismLM``: an export as an lm-evaluation-harness model (``--model prism``), the gate deciding per request.

The gate sees exactly the tokens the model is conditioned on (lm-eval's context; with ``--apply_chat_template``
the chat-formatted prompt, which is what the gate was trained on), and each batch mixes routes in one forward as
``GatedModel`` does. Every request's route is recorded per task (``routing``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from prism_lightning.harness.routing_rates import RoutingLog
from prism_lightning.inference.export import check_export, export_adapters
from prism_lightning.inference.gated_model import ROUTES, GatedModel
from prism_lightning.model.generation import DecodingConfig, length_batches
from prism_lightning.utils.errors import PrismError

# lm-eval's generation keywords this model honours; any other is refused by name rather than ignored.
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")


def _positive_int(name: str, value: Any) -> int:
    """A positive integer from a keyword or lm-eval's command line (which passes "4" for --batch_size 4)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrismError(f"{name}: expected a positive integer, got {value!r} (--model prism has no automatic batch "
                         f"size)" if name == "batch_size" else f"{name}: expected a positive integer, got {value!r}")
    return value


@register_model("prism")
class PrismLM(TemplateLM):
    """lm-eval model over a PRISM export: ``export=DIR,route=gate|base|adapter|<adapter name>``.

    ``batch_size``, ``device`` and ``max_batch_size`` may come from lm-eval's own options; the last is not used
    (there is no automatic batch size).
    """

    last: Optional["PrismLM"] = None  # the newest instance: `prism lm-eval` reads its routing after the run

    def __init__(self, export: str, route: str = "gate", batch_size: Any = 16, max_batch_size: Any = None,
                 device: Optional[str] = None, max_length: Optional[int] = None, seed: int = 0,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise PrismError(f"--model_args: unknown key(s) {', '.join(sorted(unknown))} for --model prism "
                             f"(expected export, route, batch_size, device, max_length, seed)")
        self.export = str(export)
        # Everything that can be checked without the weights is, before a 7B model spends minutes loading.
        adapters = export_adapters(check_export(Path(self.export)))
        if route not in ROUTES and route not in adapters:
            raise PrismError(f"--model_args route: expected one of {', '.join(ROUTES + tuple(adapters))}, "
                             f"got {route!r}")
        self.route = route
        self.batch_size = _positive_int("batch_size", batch_size)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            raise PrismError(f"--device {device}: this machine has no CUDA device (leave --device out for auto, or "
                             f"pass --device cpu)")
        self.gated = GatedModel.from_pretrained(self.export, device=device)
        self.tokenizer = self.gated.backbone.tokenizer
        limit = self.gated.backbone.context_length or 2048
        self.max_length = limit if max_length is None else _positive_int("max_length", max_length)
        self.seed = int(seed)
        self.routing = RoutingLog()
        self._tasks: list[Optional[str]] = []
        self._device = self.gated.backbone.device
        PrismLM.last = self

    # --- tokenization, as lm-eval's TemplateLM expects it
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return (getattr(self.tokenizer, "name_or_path", "") or "prism").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        """Token ids; no special tokens unless asked (a chat-formatted context already carries its own)."""
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids. lm-eval moves a context's trailing whitespace into the continuation (so
        "Answer: " + "A" scores " A"); where the context's own tokens already start the whole text's, they are kept
        as they are: a chat prompt ending in its generation prompt's newline then scores the answer alone, as
        ``prism test`` does, and the gate sees the prompt it was trained on."""
        whole = self.tok_encode(context + continuation)
        context_ids = self.tok_encode(context)
        if context_ids and whole[:len(context_ids)] == context_ids and len(whole) > len(context_ids):
            return context_ids, whole[len(context_ids):]
        return super()._encode_pair(context, continuation)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The export's chat template, with the template variables the backbone loader attached."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt,
                                                  **self.gated.formatter.template_kwargs)

    # --- routing
    def _routes(self, prompts: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], tuple[str, float]]:
        """Route (PEFT adapter name or ``__base__``) and gate probability for each distinct prompt."""
        distinct = list(dict.fromkeys(prompts))
        names, probs = self.gated.routes([list(p) for p in distinct], self.route, self.batch_size)
        return {p: (n, float(q)) for p, n, q in zip(distinct, names, probs.tolist())}

    def _record(self, tasks: Sequence[Optional[str]], prompts: Sequence[tuple[int, ...]],
                routes: dict[tuple[int, ...], tuple[str, float]]) -> None:
        for task, prompt in zip(tasks, prompts):
            name, probability = routes[prompt]
            fields = self.gated.route_fields(name, probability)  # base | adapter, or the adapter's name when K > 1
            self.routing.add(task, prompt, fields.get("adapter") or fields["route"], probability)

    # --- lm-eval's three request types
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM tokenizes; the task of each request is kept for the routing log."""
        self._tasks = [r.task_name for r in requests]
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Sum of log-probs and greedy match per (context, continuation); a too-long context loses its start."""
        tasks = self._tasks if len(self._tasks) == len(requests) else [None] * len(requests)
        contexts, continuations = [], []
        for _, context, continuation in requests:
            continuation = list(continuation)[-self.max_length:]
            keep = max(1, self.max_length - len(continuation))
            contexts.append(tuple(context[-keep:]))
            continuations.append(continuation)
        routes = self._routes(contexts)
        self._record(tasks, contexts, routes)
        out: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        # One-token continuations (a multiple-choice letter) read every choice from one forward of their context.
        waiting: dict[tuple[int, ...], list[int]] = {}
        for i, continuation in enumerate(continuations):
            if len(continuation) == 1:
                waiting.setdefault(contexts[i], []).append(i)
        distinct = list(waiting)
        for index in length_batches(distinct, self.batch_size):
            batch = [distinct[i] for i in index]
            logprobs = self.gated.next_token_rows([list(c) for c in batch], [routes[c][0] for c in batch])
            for context, row in zip(batch, logprobs):
                best = int(row.argmax())
                for i in waiting[context]:
                    token = continuations[i][0]
                    out[i] = (float(row[token]), best == token)
        several = [i for i, c in enumerate(continuations) if len(c) != 1]
        whole = [list(contexts[i]) + continuations[i] for i in several]
        for batch in length_batches(whole, self.batch_size):
            index = [several[b] for b in batch]
            logprob, greedy = self.gated.score_rows([list(contexts[i]) for i in index],
                                                    [continuations[i] for i in index],
                                                    [routes[contexts[i]][0] for i in index])
            for i, lp, g in zip(index, logprob.tolist(), greedy.tolist()):
                out[i] = (float(lp), bool(g))
        for request, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", request[0], result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity scoring: each document in disjoint windows of at most ``max_length`` tokens, all on the
        route the gate picks for the document's first window."""
        out = []
        for request in requests:
            (string,) = request.args
            tokens = self.tok_encode(string)
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)]
            first = tuple(([self.prefix_token_id] + tokens)[:self.max_length])
            routes = self._routes([first])
            self._record([request.task_name], [first], routes)
            name = routes[first][0]
            total = 0.0
            for start in range(0, len(windows), self.batch_size):
                chunk = windows[start:start + self.batch_size]
                logprob, _ = self.gated.score_rows([list(c) for c, _ in chunk], [list(p) for _, p in chunk],
                                                   [name] * len(chunk))
                total += float(logprob.sum())
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Routed generation, grouped by generation settings; the text is cut at the first stop string."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        out: list[Optional[str]] = [None] * len(requests)
        for key, members in groups.items():
            kwargs = dict(requests[members[0]].args[1])
            unknown = sorted(set(kwargs) - set(GEN_KWARGS))
            if unknown:
                raise PrismError(f"generation_kwargs: unsupported key(s) {', '.join(unknown)} for --model prism "
                                 f"(supported: {', '.join(GEN_KWARGS)})")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 0) or 0) > 0
            decoding = DecodingConfig(max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                                      temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                                      top_p=float(kwargs.get("top_p", 1.0) or 1.0) if sample else 1.0,
                                      top_k=int(kwargs.get("top_k", 0) or 0) if sample else 0,
                                      seed=self.seed, batch_size=self.batch_size)
            keep = max(1, self.max_length - decoding.max_new_tokens)
            prompts = [tuple(self.tok_encode(requests[i].args[0])[-keep:]) for i in members]
            routes = self._routes(prompts)
            self._record([requests[i].task_name for i in members], prompts, routes)
            extra = {"stop_strings": until, "tokenizer": self.tokenizer} if until else {}
            for index in length_batches(prompts, self.batch_size):
                rows = self.gated.generate_rows([list(prompts[i]) for i in index],
                                                [routes[prompts[i]][0] for i in index], decoding,
                                                seed=self.seed + members[index[0]], **extra)
                for i, row in zip(index, rows):
                    text = row["text"]
                    for stop in until:
                        text = text.split(stop)[0]
                    out[members[i]] = text
                    self.cache_hook.add_partial("generate_until", requests[members[i]].args, text)
        return out
