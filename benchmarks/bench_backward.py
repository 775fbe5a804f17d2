"""Training cost of one packed layer on the CPU: forward + backward (input, values and bias gradients) of
``sparsify(nn.Linear, trainable=True)`` against ``nn.Linear``, float32, in one process.

Variants, timed interleaved (``alternating_medians``: the median of rounds, each variant once per round):
  * dense: ``nn.Linear`` (oneDNN / MKL GEMMs for the three products);
  * new: the packed layer as pysparse runs it (CPU backward kernels ``bsr_linear_grad_input`` /
    ``bsr_linear_grad_values``; for 1x1, ``UnstructuredSparseLinear`` with ``unstructured_linear_grad_input`` /
    ``_grad_values``);
  * old: the same layer and forward kernel with the torch-glue backward (``W^T`` rebuilt per call, gathered slices,
    batched GEMMs; for 1x1 the dense weight and its dense gradient), the backward pysparse ran before the kernels,
    through an ``autograd.Function``.
Every call clears the gradients first, alike for all variants. The new gradients are checked against the dense
layer's (masked) before timing.

    python benchmarks/bench_backward.py --threads 2
    python benchmarks/bench_backward.py --threads 2 --dtype bfloat16 --blocks 32x32,16x1 --tokens 1024
    python benchmarks/bench_backward.py --threads 2 --conv          # 3x3 SparseConv2d(trainable=True)
    python benchmarks/bench_backward.py --threads 2 --epilogue [--activation gelu]   # act(layer(x) + residual)
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # before torch loads libgomp (see bench_cpu_bsr_linear.py)

import torch
from torch import nn

import pysparse
from pysparse._weight_layout import weight_from_matrix, weight_matrix
from pysparse.analysis.timing import alternating_medians
from pysparse.bench.sweep import block_mask
from pysparse.formats import BlockSparseWeight
from pysparse.formats.unstructured import entry_segments
from pysparse.ops import ACTIVATIONS
from pysparse.ops.bsr_linear_op import bsr_linear_autograd
from pysparse.ops.unstructured_linear import dense_grad_input, dense_grad_values

SHAPES = ((384, 1536), (768, 3072))  # (in_features, out_features): MiniLM and BERT-base FFN
TOKENS = (128, 1024)
BLOCKS = ((32, 32), (16, 16), (16, 1), (1, 1))  # 16x1: column vectors (own tiles); 1x1: the unstructured format
SPARSITIES = (0.5, 0.7, 0.9)

_glue_setup, _glue_backward = bsr_linear_autograd(torch.ops.pysparse.bsr_linear.default)


class _GlueBsrLinear(torch.autograd.Function):
    """bsr_linear with the torch-glue backward (the "old" variant)."""

    @staticmethod
    def forward(x, values, crow_indices, col_indices, bias, out_features):
        return torch.ops.pysparse.bsr_linear.default(x, values, crow_indices, col_indices, bias, out_features)

    setup_context = staticmethod(_glue_setup)
    backward = staticmethod(_glue_backward)


class _GlueUnstructuredLinear(torch.autograd.Function):
    """unstructured_linear with the dense-glue backward of the "old" variant: grad_x through the dense weight, the
    values' gradient gathered from the dense weight gradient."""

    @staticmethod
    def forward(x, values, columns, segment_ptr, bias, out_features):
        return torch.ops.pysparse.unstructured_linear.default(x, values, columns, segment_ptr, bias, out_features)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, values, columns, segment_ptr, _bias, n = inputs
        ctx.save_for_backward(x, values, columns, segment_ptr)
        ctx.n = n

    @staticmethod
    def backward(ctx, grad):
        x, values, columns, segment_ptr = ctx.saved_tensors
        shape = (ctx.n, x.shape[-1])
        return (dense_grad_input(grad, values, columns, segment_ptr, shape),
                dense_grad_values(grad, x, columns, segment_ptr, shape), None, None, grad.reshape(-1, ctx.n).sum(0),
                None)


def _layers(k: int, n: int, block: tuple[int, int], sparsity: float, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Linear(k, n).to(dtype)
    bh, bw = block
    keep = torch.rand(-(-n // bh), -(-k // bw), generator=gen) >= sparsity
    mask = keep.repeat_interleave(bh, 0)[:n].repeat_interleave(bw, 1)[:, :k]
    with torch.no_grad():
        dense.weight.mul_(mask)
    packed = pysparse.sparsify(nn.Sequential(dense), block_size=block, min_sparsity=0.0, trainable=True)[0]
    want = pysparse.nn.UnstructuredSparseLinear if block == (1, 1) else pysparse.nn.SparseLinear
    assert isinstance(packed, want), type(packed)
    return dense, packed, mask


def _step(module_call, params, x, grad):
    def run():
        for t in params:
            t.grad = None
        with torch.enable_grad():  # the timer runs under no_grad
            module_call(x).backward(grad)
    return run


def measure(k: int, n: int, block, sparsity: float, m: int, rounds: int, dtype=torch.float32,
            old_too: bool = True) -> dict:
    dense, packed, mask = _layers(k, n, block, sparsity, dtype=dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(2)).to(dtype)
    tol = {"rtol": 1e-4, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 0.25}
    if block == (1, 1):
        def old(inp):
            return _GlueUnstructuredLinear.apply(inp, packed.values, packed.columns, packed.segment_ptr, packed.bias, n)
    else:
        def old(inp):
            return _GlueBsrLinear.apply(inp, packed.values, packed.crow_indices, packed.col_indices, packed.bias, n)

    # The new gradients against the dense layer's before timing.
    _step(packed, [x, packed.values, packed.bias], x, grad)()
    got = (x.grad.clone(), packed.values.grad.clone(), packed.bias.grad.clone())
    _step(dense, [x, dense.weight, dense.bias], x, grad)()
    torch.testing.assert_close(got[0], x.grad, **tol)
    torch.testing.assert_close(got[2], dense.bias.grad, **tol)
    if block == (1, 1):  # at the packed entries, in their order (a kept weight that is exactly 0 is not packed)
        rows = entry_segments(packed.segment_ptr, packed.columns.numel()) % n
        want_values = dense.weight.grad[rows, packed.columns.long()]
    else:
        want_values = BlockSparseWeight.from_dense(dense.weight.grad, block_size=block, mask=mask).values
    torch.testing.assert_close(got[1], want_values, **tol)

    fns = {
        "dense": _step(dense, [x, dense.weight, dense.bias], x, grad),
        "new": _step(packed, [x, packed.values, packed.bias], x, grad),
    }
    if old_too:
        fns["old"] = _step(old, [x, packed.values, packed.bias], x, grad)
    if dtype != torch.float32:  # the same layer trained in float32, for the 16-bit step's speed over it
        _, packed32, _ = _layers(k, n, block, sparsity)
        x32 = x.detach().float().requires_grad_()
        fns["new_f32"] = _step(packed32, [x32, packed32.values, packed32.bias], x32, grad.float())
    t = alternating_medians(fns, rounds=rounds, min_run_time=0.05)
    return {name: s * 1e3 for name, s in t.items()}


# (channels, height = width, batch): 3x3 convolutions of ResNet stages, stride 1, padding 1
CONVS = ((64, 56, 8), (128, 28, 8), (256, 14, 8))


def conv_table(rounds: int) -> None:
    """forward + backward of a 3x3 ``SparseConv2d(trainable=True)`` (im2col, then the BSR kernels) against
    ``nn.Conv2d``, 32x32 blocks of the tap-major weight."""
    print("| conv 3x3 | input | sparsity | dense ms | sparse ms | sparse vs dense |")
    print("|---|---|---|---|---|---|")
    for c, hw, batch in CONVS:
        for sparsity in SPARSITIES:
            gen = torch.Generator().manual_seed(0)
            conv = nn.Conv2d(c, c, 3, padding=1)
            with torch.no_grad():
                matrix = weight_matrix(conv.weight)
                mask = block_mask(*matrix.shape, (32, 32), sparsity, gen)
                conv.weight.copy_(weight_from_matrix(matrix * mask, conv.weight.shape))
            sparse = pysparse.nn.SparseConv2d.from_dense(conv, block_size=(32, 32), trainable=True)
            x = torch.randn(batch, c, hw, hw, generator=gen).requires_grad_()
            grad = torch.randn(batch, c, hw, hw, generator=gen)
            _step(sparse, [x, *sparse.parameters()], x, grad)()
            got = x.grad.clone()
            _step(conv, [x, *conv.parameters()], x, grad)()
            torch.testing.assert_close(got, x.grad, rtol=1e-4, atol=1e-3)
            t = alternating_medians({"dense": _step(conv, [x, *conv.parameters()], x, grad),
                                     "sparse": _step(sparse, [x, *sparse.parameters()], x, grad)},
                                    rounds=rounds, min_run_time=0.2)
            print(f"| {c}->{c} | {batch}x{c}x{hw}x{hw} | {sparsity:.0%} | {t['dense'] * 1e3:.2f} "
                  f"| {t['sparse'] * 1e3:.2f} | {t['dense'] / t['sparse']:.2f}x |", flush=True)


def epilogue_table(shapes, tokens, blocks, rounds: int, activation: str = "relu") -> None:
    """forward + backward of ``act(layer(x) + residual)`` (float32, 70% sparse, gradients for x, the residual and
    the layer): the epilogue as the layer runs it ("fused": the residual add in the kernel's stores, ReLU there too
    and differentiated from the saved output, GELU in pysparse's pass over the stored pre-activation), against the
    packed layer followed by torch's add and activation ("torch", what training ran before) and dense
    ``nn.Linear``."""
    act = ACTIVATIONS[activation]
    print("| in->out | block | M | dense ms | torch epilogue ms | fused ms | fused vs torch | fused vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for k, n in shapes:
        for m in tokens:
            for block in blocks:
                dense, packed, _ = _layers(k, n, block, 0.7)
                gen = torch.Generator().manual_seed(1)
                x = torch.randn(m, k, generator=gen).requires_grad_()
                r = torch.randn(m, n, generator=gen).requires_grad_()
                grad = torch.randn(m, n, generator=gen)
                packed.activation = None
                unfused = lambda inp: act(packed(inp) + r)  # noqa: E731
                fused_layer = type(packed)(packed.weight, packed.bias, activation=activation, trainable=True)
                fused = lambda inp: fused_layer(inp, r)  # noqa: E731
                plain = lambda inp: act(dense(inp) + r)  # noqa: E731
                fns = {"dense": _step(plain, [x, r, *dense.parameters()], x, grad),
                       "torch": _step(unfused, [x, r, *packed.parameters()], x, grad),
                       "fused": _step(fused, [x, r, *fused_layer.parameters()], x, grad)}
                fns["fused"]()
                got = x.grad.clone()
                fns["torch"]()
                torch.testing.assert_close(got, x.grad, rtol=1e-4, atol=1e-3)
                t = alternating_medians(fns, rounds=rounds, min_run_time=0.05)
                print(f"| {k}->{n} | {block[0]}x{block[1]} | {m} | {t['dense'] * 1e3:.2f} | {t['torch'] * 1e3:.2f} "
                      f"| {t['fused'] * 1e3:.2f} | {t['torch'] / t['fused']:.2f}x | {t['dense'] / t['fused']:.2f}x |",
                      flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds per case (median kept)")
    ap.add_argument("--blocks", default=",".join(f"{h}x{w}" for h, w in BLOCKS),
                    help="block sizes, comma-separated (default: %(default)s)")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="M values (default: %(default)s)")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES),
                    help="in x out, comma-separated (default: %(default)s)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="the layers' dtype; 16-bit also times the float32 layer (1x1 runs float32 only)")
    ap.add_argument("--conv", action="store_true", help="time 3x3 SparseConv2d layers instead (float32)")
    ap.add_argument("--epilogue", action="store_true",
                    help="time act(layer(x) + residual) with the epilogue fused or in torch instead (float32, 70%%)")
    ap.add_argument("--activation", choices=("relu", "gelu"), default="relu", help="act of --epilogue")
    ap.add_argument("--no-old", action="store_true",
                    help="leave out the torch-glue backward (slow for column vectors at low sparsity and large M)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    try:
        blocks = [tuple(int(v) for v in b.split("x")) for b in args.blocks.split(",")]
        tokens = [int(m) for m in args.tokens.split(",")]
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        ap.error(f"--blocks and --shapes take AxB,... and --tokens M,...; got {args.blocks!r}, {args.shapes!r} and "
                 f"{args.tokens!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {torch.get_num_threads()} threads, CPU path {pysparse.ops.available_backends()['cpu']}, "
          f"load average {os.getloadavg()[0]:.2f}; forward + backward, "
          f"{'float32' if args.conv or args.epilogue else args.dtype}, ms (median)")
    if args.conv:
        conv_table(args.rounds)
        return
    if args.epilogue:
        epilogue_table(shapes, tokens, blocks, args.rounds, args.activation)
        return
    if dtype != torch.float32:
        blocks = [b for b in blocks if b != (1, 1)]  # the unstructured kernels are float32 only
    wide = dtype != torch.float32
    print("| in->out | block | sparsity | M | dense ms | old ms | new ms | old vs dense | new vs dense | new vs old |"
          + (" float32 new ms | new vs float32 |" if wide else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if wide else ""))
    for k, n in shapes:
        for m in tokens:
            for block, sparsity in ((b, s) for b in blocks for s in SPARSITIES):
                ms = measure(k, n, block, sparsity, m, args.rounds, dtype, old_too=not args.no_old)
                extra = f" {ms['new_f32']:.2f} | {ms['new_f32'] / ms['new']:.2f}x |" if wide else ""
                old = ((f"{ms['old']:.2f}", f"{ms['dense'] / ms['old']:.2f}x", f"{ms['old'] / ms['new']:.2f}x")
                       if "old" in ms else ("-", "-", "-"))
                print(f"| {k}->{n} | {block[0]}x{block[1]} | {sparsity:.0%} | {m} | {ms['dense']:.2f} "
                      f"| {old[0]} | {ms['new']:.2f} | {old[1]} | {ms['dense'] / ms['new']:.2f}x | {old[2]} |{extra}",
                      flush=True)


if __name__ == "__main__":
    main()
