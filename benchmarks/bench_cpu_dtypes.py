"""SparseLinear on the CPU in float32, bfloat16 and float16, in one process: what halving the weight bytes buys.

For each case (in->out, density of kept 32x32 blocks, M) it times, interleaved (``alternating_medians``), the same
layer in float32, in bfloat16 and float16 as ``SparseLinear`` keeps them (block-transposed where the kernel reads them
so: the broadcast kernel, v19), and in bfloat16 with row-major values (the dot / outer-product kernels: what 16-bit
layers ran before v19). In "from memory" cases each variant cycles through copies of its layer holding over 96 MB of
weights together, so every call finds its weights in DRAM, as in a model larger than the caches. Each 16-bit result
is checked against the float32 layer first.

    python benchmarks/bench_cpu_dtypes.py --threads 2
"""
from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # before torch loads libgomp (see bench_cpu_bsr_linear.py)

import torch  # noqa: E402

from pysparse.analysis.timing import alternating_medians  # noqa: E402
from pysparse.nn import SparseLinear  # noqa: E402

# (in_features, out_features, density, M, weights from memory)
CASES = (
    (768, 3072, 0.1, 1, False),
    (768, 3072, 0.1, 4, False),
    (768, 3072, 0.1, 128, False),
    (768, 3072, 0.5, 32, False),
    (4096, 4096, 0.5, 1, True),
    (4096, 4096, 0.5, 4, True),
    (4096, 4096, 0.1, 1, True),
    (4096, 4096, 0.5, 128, False),
)
BLOCK = 32


def layers(k: int, n: int, density: float, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    dense = torch.nn.Linear(k, n)
    keep = torch.rand(-(-n // BLOCK), -(-k // BLOCK), generator=gen) < density
    mask = keep.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    base = SparseLinear.from_dense(dense, (BLOCK, BLOCK), mask=mask)
    out = {"float32": base, "bfloat16": copy.deepcopy(base).to(torch.bfloat16),
           "float16": copy.deepcopy(base).to(torch.float16)}
    row_major = copy.deepcopy(base).to(torch.bfloat16)
    row_major.values = row_major.values.contiguous()  # the op takes any layout; this one goes to the other kernels
    out["bfloat16 row-major"] = row_major
    return out


def measure(k: int, n: int, density: float, m: int, from_memory: bool) -> dict:
    mods = layers(k, n, density)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    inputs = {name: x.to(mod.values.dtype) for name, mod in mods.items()}
    with torch.no_grad():
        want = mods["float32"](x)
        for name in mods:
            got = mods[name](inputs[name]).float()
            torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item(), msg=name)

    def call(name):
        mod, xi = mods[name], inputs[name]
        if not from_memory:
            return lambda: mod(xi)
        copies = [mod] + [copy.deepcopy(mod) for _ in range(-(-(96 << 20) // mod.values.nbytes))]
        turn = iter(range(1 << 62))
        return lambda: copies[next(turn) % len(copies)](xi)

    fns = {name: call(name) for name in mods}
    with torch.no_grad():
        t = alternating_medians(fns, rounds=15, min_run_time=0.03)
    return {name: t[name] * 1e6 for name in mods}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {torch.get_num_threads()} threads, {BLOCK}x{BLOCK} blocks, load average {os.getloadavg()[0]:.2f}")
    print("| in->out | density | M | weights | fp32 us | bf16 us | fp16 us | bf16 row-major us | bf16 vs fp32 "
          "| fp16 vs fp32 | bf16 vs row-major |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k, n, density, m, from_memory in CASES:
        us = measure(k, n, density, m, from_memory)
        print(f"| {k}->{n} | {density} | {m} | {'from memory' if from_memory else 'in cache'} | {us['float32']:.0f} "
              f"| {us['bfloat16']:.0f} | {us['float16']:.0f} | {us['bfloat16 row-major']:.0f} "
              f"| {us['float32'] / us['bfloat16']:.2f}x | {us['float32'] / us['float16']:.2f}x "
              f"| {us['bfloat16 row-major'] / us['bfloat16']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
