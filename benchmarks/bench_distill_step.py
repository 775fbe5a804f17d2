"""One MiniLM-L6 distillation step on the CPU, student packed and trainable against student masked dense.

The step is :func:`pysparse.prune.distill`'s (teacher forward under no_grad, student forward and backward on the
last-hidden-state loss, AdamW), on batches of 16 sentences padded to ``--length`` tokens, 2 threads by default.
Students, all from the pretrained encoder with its 36 encoder Linear layers pruned by magnitude:
  * dense: not pruned (the cost of a dense fine-tuning step);
  * masked PATTERN: ``prune_`` masks held (what recovery ran on before the backward kernels);
  * packed PATTERN: the same weights through ``sparsify(trainable=True, fuse_activations=True)`` (the forward and
    backward kernels; the residual adds in the kernels' stores, GELU in pysparse's pass over the stored
    pre-activation).
The teacher runs pysparse's attention kernel (``distill`` switches it for the run), and so do the students in
``--recovery`` (no attention dropout: pysparse's forward and backward); with dropout they train on SDPA.
Timed interleaved (each student once per round, the median of rounds kept). ``--recovery`` times the step as the
frontier's recovery runs it: dropout off, the embeddings frozen (only the encoder trained), the ``"embedding"`` loss.
``--student-dtypes float32,bfloat16`` adds each student converted to bfloat16 (parameters, AdamW state and every
product in bfloat16: on AMX CPUs the packed layers run on tiles), with its speed over the same student in float32.
bfloat16 students run HF's eager attention: torch's CPU flash-attention backward is slow in bfloat16 (16 x 12 heads x
128 tokens, forward + backward, 2 threads on Sapphire Rapids: 42.6 ms, against 11.7 ms eager and 14.2 ms float32).

    python benchmarks/bench_distill_step.py [--length 64] [--patterns 16x1:0.7,32x32:0.9] [--rounds 3] [--recovery]
        [--teacher-dtype bfloat16] [--student-dtypes float32,bfloat16]
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
                                                        filter_fn=encoder_linear, trainable=True,
                                                        fuse_activations=True)
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
                    help="the teacher in float32 or as a bfloat16 copy (distill's teacher_dtype)")
    ap.add_argument("--student-dtypes", default="float32",
                    help="comma-separated float32 / bfloat16: each student in each dtype (default: %(default)s)")
    args = ap.parse_args(argv)
    dtypes = args.student_dtypes.split(",")
    if not dtypes or any(d not in ("float32", "bfloat16") for d in dtypes):
        ap.error(f"--student-dtypes takes float32 and/or bfloat16, got {args.student_dtypes!r}")
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
    students = {f"{name} {d}": copy.deepcopy(s).to(getattr(torch, d))
                for name, s in _students(teacher, patterns).items() for d in dtypes}
    for name, student in students.items():
        if name.endswith("bfloat16"):  # torch's CPU flash-attention backward runs bfloat16 3.6x slower than matmuls
            student.config._attn_implementation = "eager"
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
    print("| student | ms per step | vs masked (same pattern, dtype) | vs dense student (same dtype) "
          "| vs the same student in float32 |")
    print("|---|---|---|---|---|")
    for name, value in ms.items():
        dtype = name.rsplit(" ", 1)[1]
        masked = ms.get(name.replace("packed", "masked")) if name.startswith("packed") else None
        versus = f"{masked / value:.2f}x" if masked else "-"
        f32 = ms.get(name.replace(dtype, "float32")) if dtype != "float32" else None
        over_f32 = f"{f32 / value:.2f}x" if f32 else "-"
        print(f"| {name} | {value:.0f} | {versus} | {ms[f'dense {dtype}'] / value:.2f}x | {over_f32} |")


if __name__ == "__main__":
    main()
