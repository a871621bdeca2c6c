"""Can any router read a corpus's gate labels from the query? Probes on the fit's own train/held-out split.

    PRISM_CACHE_DIR=/tmp/prismcache python bench/label_separability.py --corpus runs/demo/corpus

A gate that ends at chance is either badly trained or given labels that nothing in the query predicts. This
script tells the two apart with simple probes trained on the fit's train split and scored on its held-out split
(AUROC with the gate verdict's 95 % interval), plus 5-fold cross-validated AUROC over the whole corpus:

- ``persona prior``: the train distill rate of the item's persona (what a router learns from the domain alone);
- ``layer-0 probe``: L2 logistic regression on the gate's own input (layer-0 output at the last prompt token);
- ``last-layer probe``: the same on the final layer's output at that token (what a full-model router would see);
- the label margins: how many labels were decided by a hair (|margin| below 0.05 nats per token for likelihood).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism_lightning.bootstrap.corpus import load_corpus  # noqa: E402
from prism_lightning.model.backbone import BackboneConfig, load_backbone  # noqa: E402
from prism_lightning.model.chat import ChatFormatter  # noqa: E402
from prism_lightning.model.features import capture_layer0, gather_positions  # noqa: E402
from prism_lightning.model.generation import left_pad, length_batches  # noqa: E402
from prism_lightning.training.gate_verdict import auroc_interval  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "label_separability.json"


@torch.no_grad()
def features(backbone, prompts: list[list[int]], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer-0, last-layer) hidden states at each prompt's last token, one left-padded forward per batch."""
    first = torch.empty(len(prompts), backbone.model.config.hidden_size)
    last = torch.empty_like(first)
    for index in length_batches(prompts, batch_size):
        ids, mask = left_pad([prompts[i] for i in index], backbone.tokenizer.pad_token_id, backbone.device)
        position = torch.full((len(index),), ids.shape[1] - 1)
        with capture_layer0(backbone.model) as box:
            out = backbone.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        first[index] = gather_positions(box["hidden"], position).cpu()
        last[index] = gather_positions(out.hidden_states[-1], position).cpu()
    return first, last


def logistic_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, l2: float = 1.0) -> torch.Tensor:
    """Scores of an L2-regularised logistic regression (standardised inputs, LBFGS) for ``x_test``."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    a, b = (x_train - mean) / std, (x_test - mean) / std
    w = torch.zeros(a.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a @ w + bias, y_train.float())
        loss = loss + l2 * (w ** 2).sum() / len(a)
        loss.backward()
        return loss

    optimizer.step(closure)
    return (b @ w + bias).detach()


def cross_validated(x: torch.Tensor, y: torch.Tensor, folds: int = 5, seed: int = 0) -> torch.Tensor:
    """Out-of-fold probe scores for every item."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    scores = torch.empty(len(y))
    for k in range(folds):
        test = order[k::folds]
        train = order[torch.tensor([i % folds != k for i in range(len(y))])]
        scores[test] = logistic_probe(x[train], y[train], x[test])
    return scores


def row(name: str, scores: torch.Tensor, labels: torch.Tensor) -> dict:
    auroc, low, high = auroc_interval(scores, labels.long())
    return {"probe": name, "auroc": round(auroc, 3), "ci95": [round(low, 3), round(high, 3)], "n": len(labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="runs/demo/corpus")
    parser.add_argument("--out", default=str(RESULTS), help="where the JSON goes (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    corpus = load_corpus(Path(args.corpus))
    split = json.loads((Path(args.corpus) / "split.json").read_text())
    by_id = {i["id"]: i for i in corpus.items}
    train, val = [by_id[i] for i in split["train"]], [by_id[i] for i in split["val"]]
    backbone = load_backbone(BackboneConfig(name_or_path=corpus.manifest["model"]["name_or_path"]))
    formatter = ChatFormatter(backbone.tokenizer)
    items = train + val
    first, last = features(backbone, [formatter.prompt_ids(i["query"]) for i in items])
    labels = torch.tensor([i["label"] for i in items])
    n = len(train)
    y_train, y_val = labels[:n], labels[n:]
    rates = {}
    for item in train:
        rates.setdefault(item["persona"], []).append(item["label"])
    prior = torch.tensor([sum(rates.get(i["persona"], [0])) / max(1, len(rates.get(i["persona"], []))) for i in val])
    rows = [row("persona prior (train distill rate)", prior, y_val),
            row("layer-0 probe (the gate's input)", logistic_probe(first[:n], y_train, first[n:]), y_val),
            row("last-layer probe", logistic_probe(last[:n], y_train, last[n:]), y_val),
            row("layer-0 probe, 5-fold CV (all items)", cross_validated(first, labels), labels),
            row("last-layer probe, 5-fold CV (all items)", cross_validated(last, labels), labels)]
    # Labels by construction (the intent protocol) have no margin: the margin figures cover the judged ones.
    margins = torch.tensor([abs(i["margin"]) for i in corpus.items if i.get("margin") is not None])
    result = {"corpus": str(args.corpus), "protocol": corpus.manifest["judge"]["protocol"], "items": len(items),
              "distill_rate": round(float(labels.float().mean()), 3),
              "distill_rate_per_persona": {p: round(sum(v) / len(v), 3) for p, v in sorted(rates.items())},
              "share_margin_below_0.05": round(float((margins < 0.05).float().mean()), 3) if len(margins) else None,
              "median_abs_margin": round(float(margins.median()), 4) if len(margins) else None, "probes": rows}
    print(f"corpus {args.corpus}: {len(items)} items ({n} train, {len(val)} held out), distill rate "
          f"{result['distill_rate']:.0%}, protocol {result['protocol']}")
    print(f"{'probe':45s} {'AUROC':>6s}  95% CI")
    for r in rows:
        print(f"{r['probe']:45s} {r['auroc']:6.3f}  {r['ci95'][0]:.2f}–{r['ci95'][1]:.2f} (n = {r['n']})")
    if len(margins):
        print(f"labels decided by |margin| < 0.05: {result['share_margin_below_0.05']:.0%}; median |margin| "
              f"{result['median_abs_margin']}")
    else:
        print("no judged label: every label is by construction (no margin to report)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
