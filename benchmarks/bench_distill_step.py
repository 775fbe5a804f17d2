"""One MiniLM-L6 distillation step on the CPU, student packed and trainable against student masked dense.

The step is :func:`pysparse.prune.distill`'s (teacher forward under no_grad, student forward and backward on the
last-hidden-state loss, AdamW), on batches of 16 sentences padded to ``--length`` tokens, 2 threads by default.
Students, all from the pretrained encoder with its 36 encoder Linear layers pruned by magnitude:
  * dense: not pruned (the cost of a dense fine-tuning step);
  * masked PATTERN: ``prune_`` masks held (what recovery ran on before the backward kernels);
  * packed PATTERN: the same weights through ``sparsify(trainable=True)`` (the forward and backward kernels).
Timed interleaved (each student once per round, the median of rounds kept). ``--recovery`` times the step as the
frontier's recovery runs it: dropout off, the embeddings frozen (only the encoder trained), the ``"embedding"`` loss.

    python benchmarks/bench_distill_step.py [--length 64] [--patterns 16x1:0.7,32x32:0.9] [--rounds 3] [--recovery]
        [--teacher-dtype bfloat16]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch import nn

import pysparse
from pysparse.analysis.embedding_quality import load_minilm
from pysparse.data import sentences
from pysparse.prune import distill, prune_, remove_masks


def _students(teacher: nn.Module, patterns: list[tuple[tuple[int, int], float]]) -> dict[str, nn.Module]:
    def encoder_linear(name, module):
        return name.startswith("encoder.") and isinstance(module, nn.Linear)

    students = {"dense": copy.deepcopy(teacher)}
    for block, sparsity in patterns:
        label = f"{block[0]}x{block[1]} {sparsity:.0%}"
        masked = copy.deepcopy(teacher)
        prune_(masked, sparsity=sparsity, norm="l2", filter_fn=encoder_linear, pattern="block", block_size=block)
        packed = copy.deepcopy(masked)
        remove_masks(packed)
        students[f"masked {label}"] = masked
        students[f"packed {label}"] = pysparse.sparsify(packed.train(), block_size=block, min_sparsity=0.3,
                                                        filter_fn=encoder_linear, trainable=True)
    return students


def _seconds_per_step(student, teacher, batches, steps: int, recovery: bool, teacher_dtype=None) -> float:
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
    start = time.perf_counter()
    distill(student, teacher, batches, optimizer, steps=steps, progress=False,
            loss="embedding" if recovery else "hidden", dropout=not recovery, teacher_dtype=teacher_dtype)
    return (time.perf_counter() - start) / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=64, help="tokens per sentence (padded), default 64")
    ap.add_argument("--patterns", default="16x1:0.7,32x32:0.9", help="BHxBW:SPARSITY, comma-separated")
    ap.add_argument("--steps", type=int, default=6, help="steps per timing (after 2 warm-up steps)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recovery", action="store_true",
                    help="the frontier's recovery step: dropout off, embeddings frozen, the embedding loss")
    ap.add_argument("--teacher-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the teacher's forward in float32 or under bfloat16 autocast (distill's teacher_dtype)")
    args = ap.parse_args(argv)
    try:
        patterns = [(tuple(int(v) for v in p.split(":")[0].split("x")), float(p.split(":")[1]))
                    for p in args.patterns.split(",")]
    except (ValueError, IndexError):
        ap.error(f"--patterns takes BHxBW:SPARSITY,... (e.g. 16x1:0.7), got {args.patterns!r}")
    torch.set_num_threads(args.threads)
    teacher_dtype = torch.bfloat16 if args.teacher_dtype == "bfloat16" else None
    teacher, tokenizer = load_minilm()
    text = sentences("train")[:16 * args.steps]
    batches = [dict(tokenizer(text[i:i + 16], padding="max_length", truncation=True, max_length=args.length,
                              return_tensors="pt")) for i in range(0, len(text), 16)]
    students = _students(teacher, patterns)
    if args.recovery:
        for student in students.values():
            for name, param in student.named_parameters():
                param.requires_grad_(name.startswith("encoder."))
    for student in students.values():  # warm-up: first-call allocations, the column indexes
        _seconds_per_step(student, teacher, batches[:2], 2, args.recovery, teacher_dtype)
    times = {name: [] for name in students}
    for _ in range(args.rounds):
        for name, student in students.items():
            times[name].append(_seconds_per_step(student, teacher, batches, args.steps, args.recovery, teacher_dtype))
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    step = "recovery" if args.recovery else "distillation"
    print(f"# MiniLM-L6 {step} step, batch 16 x {args.length} tokens, teacher {args.teacher_dtype}, "
          f"{torch.get_num_threads()} threads, CPU path {pysparse.ops.available_backends()['cpu']}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| student | ms per step | vs masked (same pattern) | vs dense student |")
    print("|---|---|---|---|")
    for name, value in ms.items():
        masked = ms.get(name.replace("packed", "masked")) if name.startswith("packed") else None
        versus = f"{masked / value:.2f}x" if masked else "-"
        print(f"| {name} | {value:.0f} | {versus} | {ms['dense'] / value:.2f}x |")


if __name__ == "__main__":
    main()
