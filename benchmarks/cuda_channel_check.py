"""CUDA channel-sparse ops: correctness on one case, then timing vs dense at 50% kept channels (same process).

    python benchmarks/cuda_channel_check.py            # table
    python benchmarks/cuda_channel_check.py --tiny     # one small call (for compute-sanitizer)
"""
import sys

import torch
import torch.nn.functional as F

from pysparse import ops
from pysparse.formats import ChannelSparseWeight


def half_index(n, gen):
    return torch.randperm(n, generator=gen)[: n // 2].sort().values


def time_ms(fn, reps=50):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    gen = torch.Generator().manual_seed(0)
    if "--tiny" in sys.argv:
        csw = ChannelSparseWeight.from_dense(torch.randn(70, 45, generator=gen), half_index(70, gen),
                                             half_index(45, gen))
        x = torch.randn(33, 45, generator=gen).cuda()
        y = ops.channel_sparse_linear(x, csw.values.cuda(), csw.out_index.cuda(), csw.in_index.cuda(), None, 70)
        c = ChannelSparseWeight.from_dense(torch.randn(9, 6, 3, 3, generator=gen), [0, 4, 8], [1, 5])
        z = ops.channel_sparse_conv2d(torch.randn(2, 6, 5, 5).cuda(), c.values.cuda(), c.out_index.cuda(),
                                      c.in_index.cuda(), torch.randn(9).cuda(), 9, 1, 1)
        torch.cuda.synchronize()
        print("tiny ok", tuple(y.shape), tuple(z.shape))
        return
    print(f"{'case':<40} {'dtype':<9} {'dense ms':>9} {'sparse ms':>10} {'speed-up':>9}")
    for dtype in (torch.float32, torch.bfloat16):
        for m, k, n in ((4096, 4096, 4096), (256, 4096, 4096), (8, 4096, 4096)):
            w = torch.randn(n, k, generator=gen)
            csw = ChannelSparseWeight.from_dense(w, half_index(n, gen), half_index(k, gen)).to("cuda", dtype)
            x = torch.randn(m, k, generator=gen).to("cuda", dtype)
            dense = csw.to_dense()
            args = (x, csw.values, csw.out_index, csw.in_index, None, n)
            err = ((ops.channel_sparse_linear(*args).float() - F.linear(x, dense).float()).norm()
                   / F.linear(x, dense).float().norm()).item()
            td = time_ms(lambda: F.linear(x, dense))
            ts = time_ms(lambda: ops.channel_sparse_linear(*args, check_indices=False))
            print(f"{f'linear M={m} {k}->{n} (err {err:.1e})':<40} {str(dtype)[6:]:<9} {td:9.3f} {ts:10.3f} "
                  f"{td / ts:8.2f}x")
        w = torch.randn(256, 256, 3, 3, generator=gen)
        csw = ChannelSparseWeight.from_dense(w, half_index(256, gen), half_index(256, gen)).to("cuda", dtype)
        x = torch.randn(32, 256, 28, 28, generator=gen).to("cuda", dtype)
        dense = csw.to_dense()
        td = time_ms(lambda: F.conv2d(x, dense, None, 1, 1))
        ts = time_ms(lambda: ops.channel_sparse_conv2d(x, csw.values, csw.out_index, csw.in_index, None, 256, 1, 1,
                                                       check_indices=False))
        print(f"{'conv 256->256 k3 32x28x28':<40} {str(dtype)[6:]:<9} {td:9.3f} {ts:10.3f} {td / ts:8.2f}x")


if __name__ == "__main__":
    main()
