"""python -m pysparse frontier: pattern names, the Pareto front, the chosen point, and one real digits point."""
import json
import re

import pytest

from pysparse.frontier.patterns import parse_pattern, parse_point
from pysparse.frontier.report import POINT_KEYS, choose, format_table, pareto_front


def test_patterns_parse_to_prune_keywords_and_pack_sizes():
    assert parse_pattern("unstructured").prune_kwargs() == {"pattern": "unstructured"}
    assert parse_pattern("1x1").name == "unstructured"
    nm = parse_pattern("2:4")
    assert nm.prune_kwargs() == {"pattern": "nm", "nm": (2, 4)} and nm.block_size == (1, 1)
    assert nm.fixed_sparsity() == 0.5
    vec = parse_pattern("16x1")
    assert vec.prune_kwargs() == {"pattern": "block", "block_size": (16, 1)} and vec.block_size == (16, 1)
    assert parse_point("32x32,0.7") == (parse_pattern("32x32"), 0.7)


@pytest.mark.parametrize("text, words", [("3:2", "0 < N < M"), ("0x4", "positive"), ("blocks", "pattern must be"),
                                         ("16x16", "PATTERN,SPARSITY"), ("16x16,1.5", "in (0, 1)"),
                                         ("2:4,0.7", "fixes sparsity"), ("4x4,abc", "fraction")])
def test_bad_pattern_or_point_names_what_was_expected(text, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_point(text) if "," in text or text == "16x16" else parse_pattern(text)


def _point(pattern, sparsity, cosine, top1, speedup):
    return {"pattern": pattern, "block_size": [1, 1], "sparsity": sparsity, "criterion": "wanda", "steps": 10,
            "minutes": 1.0, "cosine": cosine, "top1": top1, "speedup": speedup, "speedup_same_options": speedup}


def test_pareto_front_and_choice():
    points = [_point("a", 0.5, 0.99, 0.98, 1.2), _point("b", 0.7, 0.95, 0.91, 2.0),
              _point("c", 0.7, 0.90, 0.95, 1.9), _point("d", 0.9, 0.80, 0.70, 4.0),
              _point("e", 0.9, 0.96, 0.85, 2.5)]
    front = pareto_front(points)
    assert front == [3, 4, 0]                        # b and c are beaten by e (higher cosine, faster)
    assert choose(points, quality=0.95, agreement=0.90) == 1   # e is faster but misses the agreement
    assert choose(points, quality=0.95, agreement=None) == 4
    assert choose(points, quality=0.999, agreement=None) is None
    assert choose(points, quality=None, agreement=None) is None
    table = format_table(points, quality_name="cosine", chosen=1, front=front)
    assert table.splitlines()[2].startswith(">")      # the chosen row is marked


def test_cli_rejects_bad_options_before_any_work(capsys):
    from pysparse.__main__ import main
    assert main(["frontier", "--model", "digits-mlp", "--patterns", "5x"]) == 2
    assert "pattern must be" in capsys.readouterr().out
    assert main(["frontier", "--model", "digits-mlp", "--save", "x.safetensors"]) == 2
    assert "--save needs --point" in capsys.readouterr().out
    assert main(["frontier", "--model", "digits-mlp", "--criteria", "random"]) == 2


def test_cli_without_matplotlib_stops_before_any_work(capsys, monkeypatch):
    import importlib.util

    from pysparse.__main__ import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["frontier", "--model", "digits-mlp", "--point", "16x16,0.9"]) == 2
    assert "the plot needs matplotlib" in capsys.readouterr().out


@pytest.mark.slow
def test_digits_point_end_to_end(tmp_path):
    """One real point: it prunes to the sparsity asked for, distillation leaves accuracy well above chance, the
    packed model runs, and the JSON has every key the schema names."""
    pytest.importorskip("sklearn")
    from pysparse.__main__ import main
    out = tmp_path / "digits"
    assert main(["frontier", "--model", "digits-mlp", "--point", "16x16,0.8", "--steps", "30", "--criteria",
                 "magnitude,wanda", "--out", str(out), "--no-plot", "--quality", "0.5"]) == 0
    result = json.loads((tmp_path / "digits.json").read_text())
    (point,) = result["points"]
    assert set(POINT_KEYS) <= set(point)
    assert point["pattern"] == "16x16" and point["sparsity"] == 0.8 and point["criterion"] in ("magnitude", "wanda")
    assert point["cosine"] > 0.5                       # accuracy of 10 classes after 80% pruning + recovery
    assert point["speedup"] > 0 and point["layers_sparse"] >= 0
    assert len(point["measured"]["load_average"]) == 3 and point["measured"]["date"].startswith("20")
    assert result["chosen"] == 0 and result["machine"]["cpu_isa"] in ("avx512", "avx2", "generic")
    assert 0.9 < result["dense"]["cosine"] <= 1.0      # the dense MLP's own test accuracy, beside the point's


def _tiny_work(seed=0):
    import torch
    from torch import nn

    from pysparse.frontier.workloads import Workload
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    batches = [torch.randn(24, 48) for _ in range(4)]
    return Workload(name="tiny", describe="tiny MLP", teacher=teacher, fresh=None,
                    filter_fn=lambda name, module: isinstance(module, nn.Linear), calibration=batches,
                    validation=batches[:1], train=batches, evaluate=None, quick_quality=None,
                    timing_inputs=batches[0], quality_name="cosine", distill_kwargs={"loss": "hidden"}, lr=1e-2)


def test_packed_recovery_makes_the_same_updates_as_masked_recovery():
    """The recipe may recover through packed trainable layers instead of masked dense ones, for speed alone: both
    from one pruned model, with the same batches and optimizer, land on the same weights, zeros kept."""
    import copy

    import torch
    from torch import nn

    import pysparse
    from pysparse.frontier.recipe import _unpacked, packed_for_training, recover
    from pysparse.prune import prune_, remove_masks
    work = _tiny_work()
    pattern = parse_pattern("16x1")
    masked = copy.deepcopy(work.teacher)
    prune_(masked, sparsity=0.7, filter_fn=work.filter_fn, **pattern.prune_kwargs())
    packed = copy.deepcopy(masked)
    remove_masks(packed)
    packed = pysparse.sparsify(packed, block_size=(16, 1), min_sparsity=0.3, trainable=True)
    assert all(isinstance(m, pysparse.nn.SparseLinear) for m in (packed[0], packed[2]))
    recover(masked, work, 5)
    recover(packed, work, 5)
    remove_masks(masked)
    dense_again = _unpacked(packed)
    for a, b in zip((masked[0], masked[2]), (dense_again[0], dense_again[2])):
        assert type(b) is nn.Linear
        torch.testing.assert_close(b.weight, a.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.bias, a.bias, rtol=1e-4, atol=1e-5)
        assert torch.equal(b.weight == 0, a.weight == 0)
        assert (a.weight == 0).float().mean() >= 0.6   # recovery kept the pruned weights at zero
    chosen, record = packed_for_training(masked, work, pattern)   # whichever is faster here; it says which
    assert record["layers"] in ("packed", "masked") and record["masked_ms"] > 0 and record["packed_ms"] > 0
    assert (chosen is masked) == (record["layers"] == "masked")


def test_teacher_precision_is_measured_and_recovery_takes_it(monkeypatch):
    """bfloat16 is chosen only where it is faster by the margin and its outputs agree; recovery then distils from
    a bfloat16 copy of the teacher."""
    import copy

    import torch

    from pysparse.frontier import recipe
    from pysparse.prune import prune_
    work = _tiny_work()
    choice = recipe.teacher_precision(work)
    assert choice["dtype"] in ("float32", "bfloat16") and choice["float32_ms"] > 0 and choice["bfloat16_ms"] > 0
    assert 0.99 < choice["cosine"] <= 1.0
    monkeypatch.setattr(recipe, "_TEACHER_GAIN", 0.0)       # any speed: agreement decides
    assert recipe.teacher_precision(work)["dtype"] == "bfloat16"
    monkeypatch.setattr(recipe, "_TEACHER_AGREEMENT", 1.1)  # no agreement is enough
    assert recipe.teacher_precision(work)["dtype"] == "float32"
    student = copy.deepcopy(work.teacher)
    prune_(student, sparsity=0.5, filter_fn=work.filter_fn)
    history = recipe.recover(student, work, 4, teacher_dtype=torch.bfloat16)
    assert len(history) == 4 and all(h["loss"] > 0 for h in history)
