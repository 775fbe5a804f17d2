"""The table of channel rules: a new op is one entry, and a rule that raises is reported by name while the
channels it touches are kept (never pruned on a guess, never dropped from the report)."""
import copy

import pytest
import torch
import torch.fx
from test_prune_channels import masked_dense, run_eval
from torch import nn

from pysparse.prune import channel_surgery_record, prune_channels
from pysparse.prune.channels import register_channel_rule
from pysparse.prune.channels.elementwise_rules import same_labels
from pysparse.prune.channels.layer_rules import conv_module
from pysparse.prune.channels.rules import CHANNEL_RULES


def channel_gate(x):
    """An op the rule table does not know: fx keeps it as one call_function node (wrapped below)."""
    return x * torch.sigmoid(x)


torch.fx.wrap("channel_gate")


class Gated(nn.Module):
    """c1 -> channel_gate -> c2 -> relu -> c3: c1's channels pass through the unknown op, c2's do not."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(channel_gate(self.c1(x)))))


@pytest.fixture
def gate_rule():
    """Register a rule for channel_gate for one test, and always take it out again."""
    def register(rule):
        register_channel_rule(channel_gate, rule)
    yield register
    CHANNEL_RULES.unregister(channel_gate)


def test_an_op_without_a_rule_keeps_its_channels_and_says_which():
    torch.manual_seed(0)
    pruned, report = prune_channels(Gated(), torch.randn(1, 3, 8, 8), ratio=0.5, round_to=1, return_report=True)
    assert pruned.c1.out_channels == 16 and pruned.c2.out_channels < 16
    assert "channel_gate is not understood" in report.unpruned()["c1"]
    assert any("channel_gate" in n for n in report.notes) and report.rule_failures == []


def test_a_new_op_is_one_entry(gate_rule):
    gate_rule(same_labels)
    torch.manual_seed(0)
    model, x = Gated(), torch.randn(1, 3, 8, 8)
    dense = copy.deepcopy(model)
    pruned, report = prune_channels(model, x, ratio=0.5, round_to=1, return_report=True)
    assert pruned.c1.out_channels == 8 == pruned.c2.in_channels and pruned.c2.out_channels == 8
    assert report.rule_failures == [] and report.removed() == {"c1": 8, "c2": 8, "c3": 0}
    expected = run_eval(masked_dense(dense, channel_surgery_record(pruned)), x)
    torch.testing.assert_close(run_eval(pruned, x), expected)


def test_a_rule_that_raises_is_reported_and_its_channels_are_kept(gate_rule):
    def broken(ctx, call):
        raise RuntimeError("bug in the gate rule")
    gate_rule(broken)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    pruned, report = prune_channels(Gated(), x, ratio=0.5, round_to=1, return_report=True)
    [failure] = report.rule_failures  # once, though the eval-mode and the train-mode graph both ran the rule
    assert failure.op.endswith("channel_gate") and failure.node == "channel_gate"
    assert failure.error == "RuntimeError: bug in the gate rule"
    assert "RULE FAILED" in str(report) and "bug in the gate rule" in str(report)
    # conservative: what flows through the failed op keeps every channel; the rest of the model still prunes
    assert pruned.c1.out_channels == 16 and pruned.c2.in_channels == 16
    assert "bug in the gate rule" in report.unpruned()["c1"]
    assert pruned.c2.out_channels == 8 and report.ran
    assert pruned(x).shape == (1, 4, 8, 8)


def test_a_rule_that_raises_after_coupling_keeps_its_module_whole():
    """A rule that marked the conv's outputs removable and then raised must not leave them removable."""
    model = Gated()

    def breaks_on_c2(ctx, call):
        labels = conv_module(ctx, call)  # does all the coupling first
        if call.target is model.c2:
            raise ValueError("c2 is special")
        return labels

    register_channel_rule(nn.Conv2d, breaks_on_c2, replace=True)
    try:
        torch.manual_seed(0)
        pruned, report = prune_channels(model, torch.randn(1, 3, 8, 8), ratio=0.5, round_to=1, return_report=True)
    finally:
        register_channel_rule(nn.Conv2d, conv_module, replace=True)
    assert {f.op for f in report.rule_failures} == {"c2 (Conv2d)"}
    assert pruned.c2.out_channels == 16 and pruned.c2.in_channels == 16 and pruned.c3.in_channels == 16
    assert "c2 is special" in report.unpruned()["c2"]


def test_registering_checks_its_arguments():
    with pytest.raises(ValueError, match="already has a channel rule"):
        register_channel_rule(nn.Conv2d, conv_module)
    with pytest.raises(TypeError, match="op must be"):
        register_channel_rule(3, same_labels)
    with pytest.raises(TypeError, match="rule must be callable"):
        register_channel_rule(channel_gate, "same")
    with pytest.raises(ValueError, match="kind must be one of"):
        register_channel_rule(channel_gate, same_labels, kind="operator")
    assert CHANNEL_RULES.tables["function"].get(channel_gate) is None


def test_rules_are_looked_up_along_the_class_hierarchy():
    """LazyLinear (a Linear subclass, and an fx leaf) finds Linear's rule: it prunes like a Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(2, 5)
    model(x)
    pruned, report = prune_channels(model, x, ratio=0.5, round_to=1, return_report=True)
    assert pruned[0].out_features == 8 == pruned[2].in_features and report.rule_failures == []
