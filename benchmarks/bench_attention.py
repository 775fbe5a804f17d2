"""pysparse's CPU attention kernel against torch's ``F.scaled_dot_product_attention``, in the same process.

Shapes are the encoders pysparse sparsifies (MiniLM-L6: 12 heads x 32; BERT-base: 12 x 64) at a few batch sizes and
lengths, transformers' layout (q / k / v are transposed views of [batch, seq, heads, dim] projections) and mask (bool
[batch, 1, seq, seq] with padding in the last rows), plus a causal case. GFLOP/s counts the attention over kept keys
only (a padded key is work neither needed nor, here, done). What is timed is what a transformers model
needs next: torch's output made contiguous as [batch, seq, heads, dim] (what transformers does after SDPA), and
pysparse's op, which writes that layout directly. Every result is checked against the float64 reference first.

    python benchmarks/bench_attention.py [--threads 2] [--rounds 3] [--min-run-time 0.3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from pysparse.analysis.timing import alternating_medians
from pysparse.bench.check import rel_err
from pysparse.ops import attention_reference

# (name, batch, heads, seq, head dim, mask): "pad" = bool padding mask (half the batch pads its last quarter),
# "none" = no mask (every key real), "causal" = is_causal.
CASES = [
    ("MiniLM b8 s128", 8, 12, 128, 32, "pad"),
    ("MiniLM b8 s128 no mask", 8, 12, 128, 32, "none"),
    ("MiniLM b1 s128", 1, 12, 128, 32, "none"),
    ("MiniLM b8 s256", 8, 12, 256, 32, "pad"),
    ("BERT-base b8 s128", 8, 12, 128, 64, "pad"),
    ("BERT-base b1 s384", 1, 12, 384, 64, "none"),
    ("causal b4 s256 d64", 4, 12, 256, 64, "causal"),
]


def make(batch, heads, seq, dim, kind, gen):
    q, k, v = (torch.randn(batch, seq, heads, dim, generator=gen).transpose(1, 2) for _ in range(3))
    mask = None
    if kind == "pad":   # padding: the last quarter of the second half of the batch's keys are masked out
        mask = torch.ones(batch, 1, seq, seq, dtype=torch.bool)
        mask[batch // 2:, :, :, seq - seq // 4:] = False
    return q, k, v, mask


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-run-time", type=float, default=0.3)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, b, h, s, d, kind in CASES:
        causal = kind == "causal"
        q, k, v, mask = make(b, h, s, d, kind, gen)
        ref = attention_reference(q, k, v, mask, causal)
        out = torch.ops.pysparse.attention(q, k, v, mask, causal, None)
        err = rel_err(out, ref)
        assert err < 1e-5, f"{name}: rel. error {err:.2e}"
        ms = alternating_medians({
            "torch": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            .transpose(1, 2).contiguous(),
            "pysparse": lambda: torch.ops.pysparse.attention(q, k, v, mask, causal, None),
        }, rounds=args.rounds, min_run_time=args.min_run_time)
        # Useful work: 4 flop per (query, kept key, dim); the kernel skips keys past the last one a tile keeps.
        kept = s * (s + 1) // 2 * b if causal else (int(mask.sum()) if mask is not None else b * s * s)
        flop = 4 * h * d * kept
        row = {"case": name, "torch_ms": ms["torch"] * 1e3, "pysparse_ms": ms["pysparse"] * 1e3,
               "speedup": ms["torch"] / ms["pysparse"], "pysparse_gflops": flop / ms["pysparse"] / 1e9,
               "rel_err": err}
        rows.append(row)
        print(f"{name:20s} torch {row['torch_ms']:7.3f} ms  pysparse {row['pysparse_ms']:7.3f} ms  "
              f"{row['speedup']:5.2f}x  ({row['pysparse_gflops']:5.1f} GFLOP/s, err {err:.1e})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
