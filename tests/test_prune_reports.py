"""sparsity_report: parameters, nonzeros, FLOPs and packed bytes per layer and in total."""
from collections import OrderedDict

import torch
from torch import nn

from pysparse.analysis import sparsity_report
from pysparse.formats import BlockSparseWeight
from pysparse.prune import prune_


def model():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 3, stride=2, padding=1), flat=nn.Flatten(),
                                     fc=nn.Linear(8 * 4 * 4, 32), out=nn.Linear(32, 5, bias=False)))


def test_report_counts_before_and_after_pruning():
    m = model()
    masks = prune_(m, sparsity=0.75, pattern="block", block_size=(8, 8))
    report = sparsity_report(m, torch.randn(6, 3, 8, 8), block_size=(8, 8))
    rows = {r.name: r for r in report.layers}
    assert list(rows) == ["conv", "fc", "out"]
    conv, fc, out = rows["conv"], rows["fc"], rows["out"]
    assert conv.params == 8 * 27 + 8 and fc.params == 128 * 32 + 32 and out.params == 32 * 5
    assert fc.nonzeros == int(masks["fc"].sum()) + 32 and out.nonzeros == 160
    assert conv.flops_dense == 2 * 8 * 27 * (6 * 4 * 4)            # per output position of the whole batch
    assert fc.flops_dense == 2 * 128 * 32 * 6 and fc.flops_sparse == 2 * int(masks["fc"].sum()) * 6
    packed = BlockSparseWeight.from_dense(m.fc.weight.detach(), block_size=(8, 8))
    assert fc.bytes_packed == packed.nbytes + 32 * 4 and fc.bytes_dense == fc.params * 4
    assert fc.bytes_packed < fc.bytes_dense / 3
    total = report.total
    assert total.params == sum(r.params for r in report.layers)
    assert total.bytes_packed == sum(r.bytes_packed for r in report.layers)
    text = report.table()
    assert "total" in text and "8x8 blocks" in text and "forward of example_input" in text


def test_report_without_example_counts_per_row():
    m = model()
    rows = {r.name: r for r in sparsity_report(m).layers}
    assert rows["fc"].flops_dense == 2 * 128 * 32 and rows["fc"].density == 1.0
