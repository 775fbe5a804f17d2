"""Recovery training: one loop that trains a pruned model with its masks held, pruning on a schedule, used by
``fine_tune`` (labelled batches, a task loss) and ``distill`` (unlabelled batches, a dense teacher's outputs).

The loop adds a :class:`~pysparse.prune.regularize.SparsityRegularizer`'s penalty (or applies its proximal step),
steps a learning-rate scheduler, evaluates periodically, and writes resumable checkpoints (safetensors + JSON,
see :mod:`pysparse.prune.train_checkpoint`).

Under ``torch.distributed`` (a model wrapped in ``DistributedDataParallel``, every rank calling the same function on
its own shard of the batches) only rank 0 writes the checkpoint, and the state it writes is the wrapped module's,
without DDP's ``module.`` prefix, so it resumes on any number of processes, one included.
"""
from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Mapping
from numbers import Integral

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..transforms.attention_switch import pysparse_attention_while
from ..transforms.gelu_switch import pysparse_gelu_while
from .batches import call_model, floats_as, mean_over_positions, real_positions, to_device
from .mask_holding import apply_masks, mask_sparsity, masks_from_state_dict, prune_
from .regularize import SparsityRegularizer
from .schedules import GradualSchedule
from .train_checkpoint import load_training_state, rng_states, save_training_state, set_rng_states

__all__ = ["DISTILL_LOSSES", "distill", "fine_tune"]

DISTILL_LOSSES = ("hidden", "embedding", "logits")
_END = object()


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def fine_tune(model: nn.Module, data, loss_fn, optimizer: torch.optim.Optimizer, *, steps: int,
              schedule: GradualSchedule | None = None, lr_scheduler=None,
              regularizer: SparsityRegularizer | None = None,
              eval_fn=None, eval_every: int | None = None, checkpoint: str | os.PathLike | None = None,
              checkpoint_every: int | None = None, resume: bool = False, progress: bool = True,
              desc: str = "fine-tune", **prune_kwargs) -> list[dict]:
    """Train ``model`` for ``steps`` optimizer steps, pruning on ``schedule`` and holding masks throughout.

    Args:
        data: an iterable of ``(input, target)`` batches (moved to the model's device), iterated again (a new epoch)
            whenever it runs out, so a shuffling ``DataLoader`` reshuffles. ``input`` reaches the model through
            :func:`~pysparse.prune.batches.call_model` (a tensor, a tuple of positional inputs or a dict of
            keyword inputs).
        loss_fn: ``loss_fn(model(input), target) -> scalar tensor``.
        schedule: when given, ``prune_(model, sparsity=schedule(step), **prune_kwargs)`` runs at each of its
            pruning steps (before that step's update). Without it, the masks the model already holds (if any)
            are kept as they are: one-shot pruning followed by fine-tuning, or plain training.
        lr_scheduler: a ``torch.optim.lr_scheduler`` stepped after every optimizer step.
        regularizer: a :class:`SparsityRegularizer` on ``model``: its penalty is added to the loss (or, when it is
            proximal, its :meth:`~SparsityRegularizer.proximal_step` runs after each optimizer step with the first
            parameter group's learning rate); ``regularizer.update(step)`` anneals alpha before each step.
        eval_fn: ``eval_fn(model) -> result`` (a number or a dict of numbers), called after every ``eval_every``
            steps and after the last one; the model is put back in train mode afterwards.
        checkpoint: a path written every ``checkpoint_every`` steps and after the last one: model state (masks
            included), optimizer and scheduler state, step, RNG states, data position, history.
        resume: continue from ``checkpoint`` when it exists (a fresh start otherwise), bit for bit: the model
            and optimizer must be built as for the interrupted run; its masks are restored from the checkpoint.
            Batches replay from the start of the interrupted epoch, with the RNG states (torch's, and a
            ``DataLoader``'s own ``generator``) it started with, so a shuffled ``DataLoader`` yields the same order.
        progress: show a tqdm bar with the loss, the measured sparsity of the masked layers and the penalty.
    Returns:
        one ``{"step", "loss", "sparsity"}`` record per step (all steps, including those before a resume), with
        ``"penalty"`` when a regularizer is given (``loss`` is the task loss, without it) and ``"eval"`` at the
        evaluated steps.
    """
    _check_int("steps", steps, 0)

    def step_loss(batch):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"fine_tune's data must yield (input, target) pairs, got {type(batch).__name__}")
        inputs, targets = batch
        return loss_fn(call_model(model, inputs), targets)

    return _train(model, data, step_loss, optimizer, steps=steps, schedule=schedule, lr_scheduler=lr_scheduler,
                  regularizer=regularizer, eval_fn=eval_fn, eval_every=eval_every, checkpoint=checkpoint,
                  checkpoint_every=checkpoint_every, resume=resume, progress=progress, desc=desc,
                  prune_kwargs=prune_kwargs)


def distill(student: nn.Module, teacher: nn.Module, data, optimizer: torch.optim.Optimizer, *, steps: int,
            schedule: GradualSchedule | None = None, loss: str = "hidden", temperature: float = 2.0, layers=None,
            intermediate: bool = False, intermediate_weight: float = 1.0, lr_scheduler=None,
            regularizer: SparsityRegularizer | None = None, eval_fn=None, eval_every: int | None = None,
            checkpoint: str | os.PathLike | None = None, checkpoint_every: int | None = None, resume: bool = False,
            dropout: bool = True, teacher_dtype: torch.dtype | None = None, progress: bool = True,
            desc: str = "distill", **prune_kwargs) -> list[dict]:
    """Train the pruned ``student`` to reproduce the dense ``teacher`` on unlabelled ``data``, masks held.

    Both models are called on each batch through :func:`~pysparse.prune.batches.call_model` (a tensor, a tuple of
    positional inputs, or a dict of keyword inputs such as a tokenizer's output). The teacher runs in eval mode
    under ``no_grad``. A transformers teacher or student on SDPA runs pysparse's CPU attention kernels for the run,
    switched back on return: the same results and gradients within float32 rounding; on MiniLM's 16 x 128 tokens
    (Zen 3, 2 threads) the teacher's attention about 1.7x faster than torch's, and the student's forward + backward,
    which needs attention dropout off (``dropout=False``; with it SDPA runs), about 1.4x. Both models' exact-GELU
    modules run pysparse's GELU for the run (:mod:`pysparse.transforms.gelu_switch`). The loop, and
    ``schedule`` / ``lr_scheduler`` / ``regularizer`` / ``eval_fn`` / ``checkpoint`` / ``resume`` / ``progress`` /
    ``prune_kwargs``, are those of :func:`fine_tune`.

    Args:
        loss: ``"hidden"``: ``1 - cosine + MSE`` between the outputs (a transformers output's
            ``last_hidden_state``, else its first tensor; a plain tensor output itself), cosine along the last
            dimension; positions that a dict batch's ``attention_mask`` (shape ``[B, T]`` of the output's first two
            dimensions) marks as padding are left out, so the student does not spend capacity on them;
            ``"embedding"``: ``"hidden"`` plus ``1 - cosine`` between the outputs mean-pooled over the real
            positions (a sentence encoder's embedding: the loss then trains what its quality is measured on; on
            MiniLM it recovers more embedding cosine per step than ``"hidden"``, BENCHMARKS.md);
            ``"logits"``: ``T^2 x KL(teacher || student)`` of the softmax at temperature ``T``
            (``.logits`` of a transformers output), over the last dimension.
        temperature: ``T`` for ``loss="logits"``.
        layers: ``[(student module name, teacher module name), ...]``: the MSE between those modules' outputs
            (first tensor of a tuple output) is added, mean over pairs, times ``intermediate_weight``.
        intermediate: for transformers models: call both with ``output_hidden_states=True`` and add the mean of
            the per-layer MSE between their ``hidden_states`` (times ``intermediate_weight``).
        dropout: ``False`` switches the student's ``nn.Dropout`` layers off for the run (their ``p`` set to 0,
            restored on return). The teacher runs without dropout, so the student then chases its exact outputs;
            on a CPU it also saves the random masks (about 15% of a MiniLM step) and lets transformers' attention
            take the fused path, which has no dropout.
        teacher_dtype: None (the teacher runs in its own dtype) or ``torch.bfloat16`` / ``torch.float16``: the
            teacher runs as a copy converted to that dtype (made once per call; ``teacher`` itself is untouched,
            and the copy's memory is held for the run), and its outputs are cast to the student's dtype. The
            targets move by that dtype's rounding (MiniLM's embeddings in bfloat16: cosine 0.99994 to float32),
            and a teacher that is a third of each step on a CPU with bfloat16 matrix units (AMX) costs a quarter
            as much: MiniLM, 16 x 128 tokens, 2 threads on Sapphire Rapids: 234 ms float32, 91 ms under
            ``torch.autocast`` (which re-casts every weight and activation per op), 62 ms as a bfloat16 copy.
    Returns:
        :func:`fine_tune`'s history, ``loss`` being the distillation loss.
    """
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    _check_int("steps", steps, 1)
    if loss not in DISTILL_LOSSES:
        raise ValueError(f"loss must be one of {DISTILL_LOSSES}, got {loss!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not isinstance(dropout, bool):
        raise TypeError(f"dropout must be a bool, got {type(dropout).__name__}")
    if teacher_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"teacher_dtype must be None, torch.bfloat16 or torch.float16, got {teacher_dtype!r}")
    if teacher_dtype is not None:
        teacher = copy.deepcopy(teacher).to(teacher_dtype)
    captured, hooks = {}, []
    for pair in layers or ():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"layers must be (student module name, teacher module name) pairs, got {pair!r}")
        for who, model, name in (("student", student, pair[0]), ("teacher", teacher, pair[1])):
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"layers names {name!r}, which is not a module of the {who}") from None
            hooks.append(module.register_forward_hook(
                lambda _m, _i, out, key=(who, name): captured.__setitem__(key, _first_tensor(out))))
    extra = {"output_hidden_states": True} if intermediate else {}
    teacher.eval()

    def step_loss(batch):
        with torch.no_grad():
            t_out = call_model(teacher, floats_as(batch, teacher_dtype) if teacher_dtype else batch, **extra)
        s_out = call_model(student, batch, **extra)
        s, t = _output(s_out, loss), _output(t_out, loss)
        t = t.to(s.dtype)
        if s.shape != t.shape:
            raise ValueError(f"student and teacher outputs differ in shape: student {tuple(s.shape)}, teacher "
                             f"{tuple(t.shape)} (loss={loss!r})")
        if loss == "logits":
            value = _logits_loss(s, t, temperature)
        else:
            real = real_positions(batch, s)
            value = _hidden_loss(s, t) if real is None else _hidden_loss(s[real], t[real])
            if loss == "embedding":
                pooled_s, pooled_t = mean_over_positions(s, real), mean_over_positions(t, real)
                value = value + (1 - F.cosine_similarity(pooled_s, pooled_t, dim=-1)).mean()
        pairs = [(captured[("student", a)], captured[("teacher", b)]) for a, b in layers or ()]
        if intermediate:
            pairs += list(zip(_hidden_states(s_out, "student"), _hidden_states(t_out, "teacher")))
        if pairs:
            value = value + intermediate_weight * sum(F.mse_loss(a, b.to(a.dtype)) for a, b in pairs) / len(pairs)
        return value

    try:
        trained = student.module if isinstance(student, DistributedDataParallel) else student
        with (contextlib.nullcontext() if dropout else dropout_off(student), pysparse_attention_while(teacher),
              pysparse_attention_while(trained), pysparse_gelu_while(teacher), pysparse_gelu_while(student)):
            return _train(student, data, step_loss, optimizer, steps=steps, schedule=schedule,
                          lr_scheduler=lr_scheduler, regularizer=regularizer, eval_fn=eval_fn, eval_every=eval_every,
                          checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
                          progress=progress, desc=desc, prune_kwargs=prune_kwargs)
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def dropout_off(model: nn.Module):
    """``model``'s ``nn.Dropout`` layers switched off (``p`` = 0) inside the block, restored after, whatever the
    model's train/eval mode (transformers' attention reads its dropout's ``p`` too)."""
    saved = [(m, m.p) for m in model.modules() if isinstance(m, nn.Dropout)]
    for module, _ in saved:
        module.p = 0.0
    try:
        yield model
    finally:
        for module, p in saved:
            module.p = p


# ---- distillation losses ------------------------------------------------------------------------------------------
def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError(f"model output holds no tensor: {type(out).__name__}")


def _output(out, loss: str) -> torch.Tensor:
    """The tensor a loss compares: ``.last_hidden_state`` / ``.logits`` of a transformers output, else its first."""
    key = "logits" if loss == "logits" else "last_hidden_state"
    if isinstance(out, Mapping) and isinstance(out.get(key), torch.Tensor):
        return out[key]
    return _first_tensor(out)


def _hidden_states(out, who: str) -> tuple:
    states = out.get("hidden_states") if isinstance(out, Mapping) else None
    if not states:
        raise ValueError(f"intermediate=True needs the {who}'s output to have hidden_states (a transformers model "
                         f"called with output_hidden_states=True), got {type(out).__name__}")
    return states


def _hidden_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    cosine = F.cosine_similarity(s.flatten(0, -2), t.flatten(0, -2), dim=-1) if s.dim() > 1 else \
        F.cosine_similarity(s, t, dim=0)
    return (1 - cosine).mean() + F.mse_loss(s, t)


def _logits_loss(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    classes = s.shape[-1]
    log_p_s = F.log_softmax(s.reshape(-1, classes) / temperature, dim=-1)
    log_p_t = F.log_softmax(t.reshape(-1, classes) / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature ** 2


# ---- the loop -----------------------------------------------------------------------------------------------------
def _train(model: nn.Module, data, step_loss, optimizer, *, steps, schedule, lr_scheduler, regularizer, eval_fn,
           eval_every, checkpoint, checkpoint_every, resume, progress, desc, prune_kwargs) -> list[dict]:
    """``steps`` optimizer steps on ``step_loss(batch) -> scalar`` over ``data`` (see :func:`fine_tune`)."""
    if schedule is not None and not isinstance(schedule, GradualSchedule):
        raise TypeError(f"schedule must be a GradualSchedule or None, got {type(schedule).__name__}")
    if schedule is None and prune_kwargs:
        raise TypeError(f"pruning arguments {sorted(prune_kwargs)} need a schedule")
    if regularizer is not None:
        if not isinstance(regularizer, SparsityRegularizer):
            raise TypeError(f"regularizer must be a SparsityRegularizer or None, got {type(regularizer).__name__}")
        if regularizer.model is not model and regularizer.model is not _unwrap(model):
            raise ValueError("regularizer was built on another model than the one trained")
    if eval_every is not None:
        _check_int("eval_every", eval_every, 1)
        if eval_fn is None:
            raise ValueError("eval_every needs eval_fn")
    if checkpoint_every is not None:
        _check_int("checkpoint_every", checkpoint_every, 1)
    if checkpoint is None and (checkpoint_every is not None or resume):
        raise ValueError("checkpoint_every and resume need checkpoint=<path>")
    generator = getattr(data, "generator", None)
    generator = generator if isinstance(generator, torch.Generator) else None

    inner = _unwrap(model)  # what a checkpoint holds: the same keys with or without DDP around it
    history, skip, epoch_rng = [], 0, None
    if resume and os.path.exists(checkpoint):
        state = load_training_state(checkpoint)
        apply_masks(inner, masks_from_state_dict(state["model"]))
        inner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if lr_scheduler is not None:
            if state["lr_scheduler"] is None:
                raise ValueError(f"cannot resume with an lr_scheduler: {checkpoint} was written without one")
            lr_scheduler.load_state_dict(state["lr_scheduler"])
        if regularizer is not None:
            regularizer.alpha = state["alpha"]
        history, skip, epoch_rng = state["history"], state["epoch_batches"], state["epoch_rng"]
        resume_rng = state["rng"]

    distributed = dist.is_available() and dist.is_initialized()

    def save(epoch_rng, epoch_batches):
        if distributed and dist.get_rank() != 0:  # replicas are identical: one writer, no races on the file
            return
        save_training_state(checkpoint, {
            "model": inner.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
            "alpha": None if regularizer is None else regularizer.alpha, "history": history,
            "epoch_batches": epoch_batches, "epoch_rng": epoch_rng, "rng": rng_states(generator)})

    device = next(model.parameters(), torch.empty(0)).device   # batches follow the model (CPU without parameters)
    model.train()
    sparsity = mask_sparsity(model)
    with tqdm(total=steps, initial=len(history), desc=desc, disable=not progress, leave=False) as bar:
        while len(history) < steps:
            if skip:  # resuming mid-epoch: replay the epoch's start, skip the batches already trained on
                set_rng_states(epoch_rng, generator)
                batches = iter(data)
                for _ in range(skip):
                    if next(batches, _END) is _END:
                        raise ValueError(f"cannot resume: the checkpoint is {skip} batches into an epoch, but data "
                                         f"now yields fewer")
                set_rng_states(resume_rng, generator)
            else:
                epoch_rng = rng_states(generator)
                batches = iter(data)
            epoch_batches, skip = skip, 0
            for batch in batches:
                step = len(history)
                if schedule is not None and schedule.is_pruning_step(step):
                    prune_(model, sparsity=schedule(step), **prune_kwargs)
                    sparsity = mask_sparsity(model)
                record = _step(model, to_device(batch, device), step_loss, optimizer, regularizer, step)
                if lr_scheduler is not None:
                    lr_scheduler.step()
                record["sparsity"] = sparsity
                epoch_batches += 1
                done = len(history) + 1 == steps
                if eval_fn is not None and (done or (eval_every is not None and (step + 1) % eval_every == 0)):
                    record["eval"] = eval_fn(model)
                    model.train()
                history.append(record)
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "sparsity", "penalty")},
                                refresh=False)
                bar.update(1)
                if checkpoint is not None and (done or (checkpoint_every and (step + 1) % checkpoint_every == 0)):
                    save(epoch_rng, epoch_batches)
                if done:
                    if checkpoint is not None and distributed:
                        dist.barrier()  # every rank returns with the final checkpoint on disk
                    break
            if epoch_batches == 0:
                raise ValueError("data yielded no batches (pass a re-iterable such as a list or a DataLoader, "
                                 "not a one-shot iterator)")
    return history


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _step(model, batch, step_loss, optimizer, regularizer, step) -> dict:
    """One optimizer step; the record of its loss (and penalty)."""
    optimizer.zero_grad(set_to_none=True)
    if regularizer is not None:
        regularizer.update(step)
    loss = step_loss(batch)
    record = {"step": step, "loss": loss.item()}
    total = loss
    if regularizer is not None:
        if regularizer.proximal:  # the penalty acts through the proximal step, not the gradient
            with torch.no_grad():
                record["penalty"] = regularizer.penalty().item()
        else:
            penalty = regularizer.penalty()
            record["penalty"] = penalty.item()
            total = loss + penalty
    total.backward()
    optimizer.step()
    if regularizer is not None and regularizer.proximal:
        regularizer.proximal_step(optimizer.param_groups[0]["lr"])
    return record
