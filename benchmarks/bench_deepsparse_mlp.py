"""The MLP of issue 7 (768->3072->768->3072->768, ReLU; 90% of 32x32 blocks pruned per layer) in pysparse,
dense torch and DeepSparse 1.8, side by side, batch 128 and batch 1.

DeepSparse is an optional, benchmark-only dependency (end-of-life; wheels for Python <= 3.11). Installing it
into the project's environment downgrades numpy, so use a separate environment that still sees torch:

    python -m venv --system-site-packages /tmp/dsvenv && /tmp/dsvenv/bin/pip install deepsparse==1.8.0
    PYTHONPATH=. /tmp/dsvenv/bin/python benchmarks/bench_deepsparse_mlp.py

Without deepsparse the script still times pysparse against dense torch. All outputs are checked against the
float64 reference before timing; times are medians of interleaved batches (see bench_cpu_bsr_linear.py).
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile

from bench_cpu_bsr_linear import block_sparse_weight, rel_err, time_interleaved  # sets OMP_WAIT_POLICY first

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pysparse.nn import SparseLinear  # noqa: E402

DIMS = (768, 3072, 768, 3072, 768)


def build_mlp(sparsity: float, block: int, seed: int = 0) -> tuple[nn.Sequential, nn.Sequential, int]:
    """(dense masked MLP, the same MLP with SparseLinear layers, kept weights)."""
    dense_layers, sparse_layers, kept = [], [], 0
    for i, (k, n) in enumerate(zip(DIMS[:-1], DIMS[1:])):
        weight, packed = block_sparse_weight(n, k, block, sparsity, seed=seed + i)
        linear = nn.Linear(k, n)
        with torch.no_grad():
            linear.weight.copy_(weight)
        dense_layers.append(linear)
        sparse_layers.append(SparseLinear(packed, linear.bias.detach()))
        kept += packed.values.numel()
        if i < len(DIMS) - 2:
            dense_layers.append(nn.ReLU())
            sparse_layers.append(nn.ReLU())
    return nn.Sequential(*dense_layers).eval(), nn.Sequential(*sparse_layers).eval(), kept


def deepsparse_engine(model: nn.Module, batch: int, threads: int, workdir: str):
    """A DeepSparse engine for `model` (exported to ONNX, opset 17), or None with the reason printed."""
    try:
        import deepsparse
    except ImportError as exc:
        print(f"# deepsparse not available ({exc}); timing pysparse and dense only")
        return None
    path = os.path.join(workdir, f"mlp_b{batch}.onnx")
    torch.onnx.export(model, (torch.randn(batch, DIMS[0]),), path, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamo=False)
    return deepsparse.Engine(model=path, batch_size=batch, num_cores=threads)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--batches", nargs="*", type=int, default=[128, 1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=1.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense, sparse, kept = build_mlp(args.sparsity, args.block)
    print(f"# MLP {'->'.join(map(str, DIMS))}, {args.sparsity:.0%} of {args.block}x{args.block} blocks pruned, "
          f"{args.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| batch | pysparse ms | dense torch ms | DeepSparse ms | pysparse vs dense | pysparse vs DeepSparse "
          "| pysparse GFLOP/s useful | DeepSparse GFLOP/s useful |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir, torch.no_grad():
        for batch in args.batches:
            x = torch.randn(batch, DIMS[0], generator=torch.Generator().manual_seed(batch))
            ref = copy.deepcopy(dense).double()(x.double())
            fns = {"pysparse": lambda: sparse(x), "dense": lambda: dense(x)}
            assert rel_err(fns["pysparse"](), ref) < 1e-4, "pysparse MLP output is wrong"
            engine = deepsparse_engine(dense, batch, args.threads, workdir)
            if engine is not None:
                x_np = [x.numpy()]
                fns["deepsparse"] = lambda: engine(x_np)
                err = rel_err(torch.from_numpy(fns["deepsparse"]()[0]), ref)
                assert err < 1e-3, f"DeepSparse output is wrong: rel err {err:.3g}"
            t = time_interleaved(fns, min_time=args.min_time)
            useful = 2.0 * batch * kept
            ds = t.get("deepsparse")
            ds_ms = "-" if ds is None else f"{ds * 1e3:.3f}"
            vs_ds = "-" if ds is None else f"{ds / t['pysparse']:.2f}x"
            ds_gflops = "-" if ds is None else f"{useful / ds / 1e9:.1f}"
            print(f"| {batch} | {t['pysparse'] * 1e3:.3f} | {t['dense'] * 1e3:.3f} | {ds_ms} | "
                  f"{t['dense'] / t['pysparse']:.1f}x | {vs_ds} | {useful / t['pysparse'] / 1e9:.1f} | {ds_gflops} |",
                  flush=True)


if __name__ == "__main__":
    main()
