"""embedding_quality: mean cosine and nearest-neighbour agreement against the dense model's embeddings."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pysparse.analysis.embedding_quality import embedding_quality, mean_pooled_embeddings, neighbour_agreement


def test_identical_embeddings_agree_fully_and_a_swap_is_seen():
    want = F.normalize(torch.randn(10, 6, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert neighbour_agreement(want, want) == pytest.approx((1.0, 1.0))
    got = want.clone()
    got[0] = -want[0]                                        # sentence 0 turned around
    cosine, top1 = neighbour_agreement(got, want)
    assert cosine == pytest.approx((9 - 1) / 10)
    assert top1 < 1.0


class Encoder(nn.Module):
    """Token embeddings as the last hidden state: mean pooling over real tokens is then a plain average."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(20, 4)

    def forward(self, input_ids, attention_mask):
        return (self.table(input_ids),)


def test_mean_pooling_leaves_padding_out():
    model = Encoder()
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    got = mean_pooled_embeddings(model, [{"input_ids": ids, "attention_mask": mask}])
    table = model.table.weight.detach()
    want = F.normalize(torch.stack([table[[1, 2, 3]].mean(0), table[[4, 5]].mean(0)]), dim=-1)
    torch.testing.assert_close(got, want)
    batches = [{"input_ids": ids, "attention_mask": mask}]
    assert embedding_quality(model, got, batches) == pytest.approx((1.0, 1.0))


def test_bad_input():
    with pytest.raises(ValueError, match="got and want must be"):
        neighbour_agreement(torch.randn(3, 4), torch.randn(4, 4))
