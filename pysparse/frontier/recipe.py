"""One frontier point: the best one-shot criterion, distillation from the dense model with the masks held, held-out
quality, and the end-to-end speedup of the packed model measured against the dense one in the same process.

The recipe, and why:
- one-shot: magnitude (L2), Wanda and SparseGPT each prune a copy; the one whose embeddings (accuracy) on a
  validation split, not the held-out one, stay closest to the dense model's is kept, since no criterion wins on
  every pattern (SparseGPT's weight updates help most where the pattern leaves freedom inside a group);
- optionally first the article's method (``alpha``): the dense model distilled from itself with a group-lasso
  penalty over the pattern's groups (:class:`pysparse.prune.SparsityRegularizer`), so that the groups the one-shot
  step removes are already small when it removes them;
- recovery: :func:`pysparse.prune.distill` on unlabelled training batches, the dense model as teacher, AdamW with
  a linear warm-up and a linear decay (the short budgets here leave no room for a constant-rate tail), on the
  quality that is measured (MiniLM: the mean-pooled embedding beside the token states, padding left out).
  Training block by block on each layer's output (local distillation, the teacher's hidden states as targets) was
  tried and lost to this end-to-end loss at equal minutes (BENCHMARKS.md). The masks are fixed by then, so the
  student trains through packed trainable layers (``sparsify(trainable=True)``, the backward kernels) where a timed
  forward + backward on a training batch says that is faster than the masked dense layers: the same updates of the
  kept weights, more steps per minute. Likewise the teacher runs as a bfloat16 copy where a timed forward says
  that is faster and its outputs agree with float32's (on a CPU with bfloat16 matrix units the teacher is a third
  of each step otherwise);
- speed: ``sparsify(..., autotune=True)`` with activation fusion and fast attention, so a layer runs sparse only
  where that is faster on the timed input; timed against the stock dense model and against the dense model with
  the same exact options (fast attention), all three alternating in one process.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ..analysis.timing import alternating_medians
from ..bench.environment import collect
from ..prune import SparsityRegularizer, distill, prune_, remove_masks, wanda_scores
from ..prune.batches import call_model, floats_as
from ..prune.recovery import _first_tensor, dropout_off
from ..prune.sparsegpt import sparsegpt_
from ..transforms.sparsify import sparsify
from ..transforms.attention_switch import use_pysparse_attention
from .patterns import Pattern
from .workloads import Workload

__all__ = ["one_shot", "packed_for_training", "teacher_precision", "recover", "measure_speed", "run_point",
           "CRITERIA"]

CRITERIA = ("magnitude", "wanda", "sparsegpt")


def _prune_with(criterion: str, model: nn.Module, work: Workload, pattern: Pattern, sparsity: float) -> None:
    kwargs = pattern.prune_kwargs()
    if criterion == "magnitude":
        prune_(model, sparsity=sparsity, norm="l2", filter_fn=work.filter_fn, scope=work.scope, **kwargs)
    elif criterion == "wanda":
        scores = wanda_scores(model, work.calibration,
                              names=[n for n, m in model.named_modules() if work.filter_fn(n, m)])
        prune_(model, sparsity=sparsity, norm="l1", filter_fn=work.filter_fn, importance=scores, scope=work.scope,
               **kwargs)
    elif criterion == "sparsegpt":
        sparsegpt_(model, work.calibration, sparsity=sparsity, filter_fn=work.filter_fn, **kwargs)
    else:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


def one_shot(work: Workload, pattern: Pattern, sparsity: float, criteria=CRITERIA, start: nn.Module | None = None
             ) -> tuple[nn.Module, str, dict]:
    """``start`` (default: the teacher) pruned by each criterion; returns (best masked copy, its criterion,
    {criterion: quality})."""
    best, scores = None, {}
    for criterion in criteria:
        student = copy.deepcopy(work.teacher if start is None else start)
        _prune_with(criterion, student, work, pattern, sparsity)
        scores[criterion] = work.quick_quality(student)
        if best is None or scores[criterion] > scores[best[1]]:
            best = (student, criterion)
    return best[0], best[1], scores


def penalised(work: Workload, pattern: Pattern, alpha: float, steps: int, *, progress: bool = False,
              teacher_dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of the dense model distilled from the original for ``steps`` steps with ``alpha`` x the group norms of
    the pattern's groups (group lasso; single entries: L1) added to the loss (the teacher as in :func:`recover`)."""
    student = copy.deepcopy(work.teacher)
    groups = "block" if pattern.pattern == "block" else "unstructured"
    reg = SparsityRegularizer(student, alpha=alpha, pattern=groups, block_size=pattern.block_size,
                              norm="group" if groups == "block" else "l1", filter_fn=work.filter_fn)
    recover(student, work, steps, progress=progress, regularizer=reg, teacher_dtype=teacher_dtype)
    return student


def _train_only(model: nn.Module, work: Workload) -> nn.Module:
    """``model`` with the parameters that recovery does not train frozen (``work.trained``)."""
    for name, param in model.named_parameters():
        if not work.trained(name):
            param.requires_grad_(False)
    return model


def _train_seconds(model: nn.Module, batch) -> float:
    """Median seconds of one forward + backward of ``model`` on ``batch`` as recovery runs it (dropout off; gradients
    cleared after)."""
    def step():
        with torch.enable_grad():  # the timer runs under no_grad
            _first_tensor(call_model(model, batch)).float().square().mean().backward()
    with dropout_off(model):
        seconds = alternating_medians({"step": step}, rounds=3, min_run_time=0.3)["step"]
    model.zero_grad(set_to_none=True)
    return seconds


def _unpacked(model: nn.Module) -> nn.Module:
    """``model`` with each packed layer replaced in place by its dense equivalent (``to_linear``)."""
    for name, module in list(model.named_modules()):
        if name and hasattr(module, "to_linear"):
            model.set_submodule(name, module.to_linear())
    return model


def packed_for_training(student: nn.Module, work: Workload, pattern: Pattern) -> tuple[nn.Module, dict]:
    """(the model to distil, what was chosen): ``student`` with its masks made permanent, packed trainable where one
    timed forward + backward on a training batch runs faster packed than masked dense, else ``student`` itself
    (masks held). The record says which and the two timings."""
    _train_only(student, work)
    packed = copy.deepcopy(student)
    remove_masks(packed)  # the pruned weights are zeros from here; the packed layers hold only the kept ones
    packed = sparsify(packed, block_size=pattern.block_size, min_sparsity=0.3, filter_fn=work.filter_fn,
                      trainable=True)
    if not any(r.swapped for r in packed.sparsify_report.layers):
        return student, {"layers": "masked", "masked_ms": None, "packed_ms": None}
    batch = work.train[0]
    masked_s, packed_s = _train_seconds(student.train(), batch), _train_seconds(packed.train(), batch)
    choice = {"layers": "packed" if packed_s < masked_s else "masked",
              "masked_ms": round(masked_s * 1e3, 2), "packed_ms": round(packed_s * 1e3, 2)}
    return (packed if packed_s < masked_s else student), choice


# bfloat16's targets must agree with float32's this closely (mean cosine over the output's rows); MiniLM's token
# states agree to 0.9999, a model whose activations overflow bfloat16's precision would not.
_TEACHER_AGREEMENT = 0.999
# ... and run at least this much faster, or the float32 targets are kept.
_TEACHER_GAIN = 1.2


@torch.no_grad()
def teacher_precision(work: Workload) -> dict:
    """How recovery runs the teacher: ``{"dtype": "bfloat16" | "float32", "float32_ms", "bfloat16_ms", "cosine"}``,
    as a bfloat16 copy (what ``distill(teacher_dtype=torch.bfloat16)`` runs) where one timed forward on a training
    batch runs at least 1.2x faster than float32 and its outputs agree (mean cosine over the output's rows >= 0.999),
    else the teacher's float32."""
    teachers = {None: work.teacher.eval(), torch.bfloat16: copy.deepcopy(work.teacher).to(torch.bfloat16).eval()}
    batch = work.train[0]

    def forward(dtype):
        return call_model(teachers[dtype], floats_as(batch, dtype) if dtype else batch)

    def rows(out):
        out = _first_tensor(out).float()
        return out.flatten(0, -2) if out.dim() > 1 else out[None]

    cosine = torch.nn.functional.cosine_similarity(rows(forward(None)), rows(forward(torch.bfloat16)), dim=-1)
    seconds = alternating_medians({"float32": lambda: forward(None), "bfloat16": lambda: forward(torch.bfloat16)},
                                  rounds=3, min_run_time=0.2)
    agree = bool(cosine.mean() >= _TEACHER_AGREEMENT)
    faster = seconds["float32"] >= _TEACHER_GAIN * seconds["bfloat16"]
    return {"dtype": "bfloat16" if agree and faster else "float32", "float32_ms": round(seconds["float32"] * 1e3, 2),
            "bfloat16_ms": round(seconds["bfloat16"] * 1e3, 2), "cosine": round(float(cosine.mean()), 6)}


def recover(student: nn.Module, work: Workload, steps: int, *, progress: bool = False, regularizer=None,
            teacher_dtype: torch.dtype | None = None) -> list[dict]:
    """Distil ``student`` (masks held, or packed trainable layers) from the dense teacher for ``steps`` steps, dropout
    off (the student chases the teacher's exact outputs), only the ``work.trained`` parameters updated; the teacher
    as a copy in ``teacher_dtype`` when one is given (:func:`teacher_precision`)."""
    if steps == 0:
        return []
    _train_only(student, work)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=work.lr,
                                  weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    return distill(student, work.teacher, work.train, optimizer, steps=steps, lr_scheduler=schedule,
                   progress=progress, regularizer=regularizer, dropout=False, teacher_dtype=teacher_dtype,
                   **work.distill_kwargs)


@torch.no_grad()
def measure_speed(work: Workload, pruned: nn.Module, pattern: Pattern, *, rounds: int = 3,
                  min_run_time: float = 0.5) -> tuple[float, float, nn.Module]:
    """(speedup over the stock dense model, over the dense model with the same exact options, the packed model).

    ``pruned`` holds zeros where it was pruned (masks removed)."""
    inputs = work.timing_inputs
    sparse = sparsify(pruned.eval(), block_size=pattern.block_size, min_sparsity=0.3, filter_fn=work.filter_fn,
                      autotune=True, example_inputs=inputs, fuse_activations=True, fast_attention=True)
    dense_same = copy.deepcopy(work.teacher).eval()
    if hasattr(dense_same, "config"):      # a transformers model: the same fast attention as the sparse one
        use_pysparse_attention(dense_same)
    seconds = alternating_medians({
        "dense": lambda: call_model(work.teacher, inputs),
        "dense_same": lambda: call_model(dense_same, inputs),
        "sparse": lambda: call_model(sparse, inputs),
    }, rounds=rounds, min_run_time=min_run_time)
    return seconds["dense"] / seconds["sparse"], seconds["dense_same"] / seconds["sparse"], sparse


def run_point(work: Workload, pattern: Pattern, sparsity: float, *, steps: int, criteria=CRITERIA,
              progress: bool = False, timing_rounds: int = 3, alpha: float | None = None,
              penalty_steps: int = 0) -> tuple[dict, nn.Module]:
    """One point of the frontier: returns (its record, the packed model). With ``alpha``, ``penalty_steps`` of
    penalised distillation come before the one-shot step (:func:`penalised`)."""
    start = time.perf_counter()
    teacher = teacher_precision(work) if steps or (alpha and penalty_steps) else None
    teacher_dtype = torch.bfloat16 if teacher and teacher["dtype"] == "bfloat16" else None
    base = penalised(work, pattern, alpha, penalty_steps, progress=progress, teacher_dtype=teacher_dtype) \
        if alpha else None
    student, criterion, one_shot_scores = one_shot(work, pattern, sparsity, criteria, start=base)
    one_shot_quality = work.evaluate(student)
    trained, training_layers = packed_for_training(student, work, pattern) if steps else (student, None)
    history = recover(trained, work, steps, progress=progress, teacher_dtype=teacher_dtype)
    student = _unpacked(trained)
    minutes = (time.perf_counter() - start) / 60
    remove_masks(student)
    quality = work.evaluate(student)
    speedup, speedup_same, sparse = measure_speed(work, student, pattern, rounds=timing_rounds)
    environment = collect("cpu")
    record = {
        "pattern": pattern.name, "block_size": list(pattern.block_size), "sparsity": sparsity,
        "criterion": criterion if not alpha else f"{criterion} after penalty alpha={alpha:g} ({penalty_steps} steps)",
        "steps": steps + (penalty_steps if alpha else 0), "minutes": round(minutes, 2),
        "cosine": quality["cosine"], "top1": quality["top1"],
        "speedup": speedup, "speedup_same_options": speedup_same,
        "one_shot": {"criteria": one_shot_scores, "cosine": one_shot_quality["cosine"],
                     "top1": one_shot_quality["top1"]},
        "final_loss": history[-1]["loss"] if history else None,
        "recovery_loss": work.distill_kwargs.get("loss"),
        "recovery_layers": training_layers,
        "recovery_teacher": teacher,
        "layers_sparse": sum(r.swapped for r in sparse.sparsify_report.layers),
        # a frontier built in parts (--append) mixes runs, even machines: each point keeps what its speed was
        # timed on and under what load
        "measured": {key: environment[key] for key in ("date", "cpu", "cpu_isa", "threads", "load_average")},
    }
    return record, sparse
