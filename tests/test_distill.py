"""distill: a pruned student learns from its dense teacher on unlabelled batches, masks held; checkpoints resume
bit for bit; bad input gets a clear error."""
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import op_calls
from pysparse.prune import GradualSchedule, SparsityRegularizer, distill, fine_tune, get_masks, mask_sparsity, prune_


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and far faster than on two of a busy machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp(dropout=0.0):
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(16, 64), act=nn.ReLU(), drop=nn.Dropout(dropout),
                                     fc2=nn.Linear(64, 64), act2=nn.ReLU(), out=nn.Linear(64, 8)))


def batches(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 16, generator=g) for _ in range(n)]


@torch.no_grad()
def gap(student, teacher, data):
    return sum(F.mse_loss(student(x), teacher(x)).item() for x in data)


def check_masks_held(model, masks):
    for name, mask in get_masks(model).items():
        assert torch.equal(mask, masks[name])
        assert bool((model.get_submodule(name).weight[~mask] == 0).all())


@pytest.mark.parametrize("loss", ["hidden", "embedding", "logits"])
def test_distill_lowers_the_loss_and_keeps_the_masks(loss):
    teacher = mlp().eval()
    student = copy.deepcopy(teacher)
    masks = {n: m.clone() for n, m in prune_(student, sparsity=0.75, pattern="block", block_size=(8, 8)).items()}
    data = batches()
    before = gap(student, teacher, data)
    history = distill(student, teacher, data, torch.optim.Adam(student.parameters(), lr=3e-3), steps=30,
                      loss=loss, progress=False)
    assert [h["step"] for h in history] == list(range(30))
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert gap(student, teacher, data) < before
    check_masks_held(student, masks)
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())


class Tokens(nn.Module):
    """A stand-in encoder on dict batches: token vectors [B, T, D], with noise added at the ``noisy`` positions."""

    def __init__(self, noisy=None):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(20, 8)
        self.noisy = noisy

    def forward(self, input_ids, attention_mask):
        out = self.table(input_ids)
        return out if self.noisy is None else out + 5.0 * self.noisy.unsqueeze(-1) * torch.randn_like(out)


@pytest.mark.parametrize("loss", ["hidden", "embedding"])
def test_hidden_losses_leave_padding_out(loss):
    ids = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    teacher, student = Tokens(), Tokens(noisy=mask == 0)
    data = [{"input_ids": ids, "attention_mask": mask}]
    frozen = torch.optim.SGD(student.parameters(), lr=0.0)
    history = distill(student, teacher, data, frozen, steps=1, loss=loss, progress=False)
    assert history[0]["loss"] == pytest.approx(0.0, abs=1e-6)     # the outputs differ at padding only
    mask[1, 3] = 1                                                 # now one noisy position counts
    history = distill(student, teacher, data, frozen, steps=1, loss=loss, progress=False)
    assert history[0]["loss"] > 0.01


def test_embedding_loss_adds_the_pooled_cosine():
    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(2))
    data = [{"input_ids": ids, "attention_mask": torch.ones(3, 5, dtype=torch.long)}]
    teacher, student = Tokens(), Tokens()
    with torch.no_grad():
        student.table.weight.mul_(-1.0).add_(0.3)
    frozen = torch.optim.SGD(student.parameters(), lr=0.0)
    hidden = distill(student, teacher, data, frozen, steps=1, loss="hidden", progress=False)[0]["loss"]
    embedding = distill(student, teacher, data, frozen, steps=1, loss="embedding", progress=False)[0]["loss"]
    with torch.no_grad():
        s, t = student(**data[0]).mean(1), teacher(**data[0]).mean(1)
    assert embedding - hidden == pytest.approx((1 - F.cosine_similarity(s, t, dim=-1)).mean().item(), rel=1e-5)


def test_distill_with_intermediate_layers_schedule_regularizer_and_eval():
    teacher = mlp().eval()
    student = copy.deepcopy(teacher)
    reg = SparsityRegularizer(student, alpha=1e-4, pattern="block", block_size=(8, 8))
    evaluated = []

    def eval_fn(model):
        evaluated.append(model.training)
        return {"gap": gap(model, teacher, batches(2, seed=9))}

    history = distill(student, teacher, batches(), torch.optim.Adam(student.parameters(), lr=3e-3), steps=12,
                      layers=[("fc1", "fc1"), ("fc2", "fc2")], schedule=GradualSchedule(0.0, 0.5, 0, 8, 4),
                      pattern="block", block_size=(8, 8), regularizer=reg, eval_fn=eval_fn, eval_every=5,
                      progress=False)
    assert [h["step"] for h in history if "eval" in h] == [4, 9, 11]
    assert all("penalty" in h and h["penalty"] > 0 for h in history)
    assert history[-1]["sparsity"] == pytest.approx(0.5) and mask_sparsity(student) == pytest.approx(0.5)
    assert student.training                                   # train mode restored after each evaluation


def test_layers_pairs_add_the_intermediate_mse():
    teacher = mlp().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.fc1.weight.mul_(0.5)
    data = batches(1)
    plain = distill(copy.deepcopy(student), teacher, data, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0),
                    steps=1, progress=False)[0]["loss"]
    s = copy.deepcopy(student)
    with_layers = distill(s, teacher, data, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0), steps=1,
                          layers=[("fc1", "fc1")], intermediate_weight=2.0, progress=False)[0]["loss"]
    with torch.no_grad():
        expected = 2.0 * F.mse_loss(student.fc1(data[0]), teacher.fc1(data[0])).item()
    assert with_layers - plain == pytest.approx(expected, rel=1e-5)


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=160, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def test_distill_a_tiny_bert_on_dict_batches():
    teacher = _bert()
    torch.manual_seed(1)
    student = type(teacher)(teacher.config, add_pooling_layer=False)   # another init: far from the teacher
    masks = {n: m.clone() for n, m in prune_(student, sparsity=0.5, pattern="block", block_size=(16, 16),
                                              filter_fn=lambda name, m: ".encoder." in f".{name}").items()}
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 120, (4, 12), generator=g),
             "attention_mask": torch.ones(4, 12, dtype=torch.int64)} for _ in range(3)]
    assert teacher.config._attn_implementation == student.config._attn_implementation == "sdpa"
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    calls, history = op_calls(lambda: distill(student, teacher, data, optimizer, steps=30, intermediate=True,
                                              progress=False))
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    check_masks_held(student, masks)
    # The teacher's forward (no gradient) ran pysparse's attention kernel, the student (no attention dropout) its
    # training forward and backward, one call per layer and step each; both models run SDPA again afterwards.
    assert calls.get("pysparse::attention") == 2 * 30
    assert calls.get("pysparse::attention_forward") == calls.get("pysparse::attention_backward") == 2 * 30
    # Both models' GELU modules ran pysparse's GELU (2 layers each), the student's with its backward.
    assert calls.get("pysparse::gelu") == 2 * 2 * 30 and calls.get("pysparse::gelu_backward") == 2 * 30
    assert all(type(m.intermediate.intermediate_act_fn).__name__ == "GELUActivation"
               for model in (teacher, student) for m in model.encoder.layer)
    assert teacher.config._attn_implementation == student.config._attn_implementation == "sdpa"


def _resumable_run(path, steps, resume=False, every=None):
    """A student with dropout, pruned on a gradual schedule, Adam, a cosine lr schedule, a shuffling DataLoader with
    its own generator: everything a resume must restore. Models and optimizer are built from scratch each call."""
    teacher = mlp().eval()
    student = mlp(dropout=0.2)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 12)
    data = DataLoader(TensorDataset(torch.cat(batches(5))), batch_size=32, shuffle=True,
                      generator=torch.Generator().manual_seed(3))     # batches are 1-tuples: model(*batch)
    torch.manual_seed(1)
    history = distill(student, teacher, data, optimizer, steps=steps, lr_scheduler=scheduler,
                      schedule=GradualSchedule(0.0, 0.6, 0, 10, 3), pattern="block", block_size=(8, 8),
                      checkpoint=path, checkpoint_every=every, resume=resume, progress=False)
    return student, optimizer, history


def test_resume_equals_the_uninterrupted_run(tmp_path):
    straight, straight_opt, straight_history = _resumable_run(None, 14)
    path = tmp_path / "run.safetensors"
    _resumable_run(path, 7, every=7)           # stops mid-epoch (5 batches an epoch), between two pruning steps
    resumed, resumed_opt, history = _resumable_run(path, 14, resume=True, every=7)
    assert history == straight_history
    want, got = straight.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    for a, b in zip(straight_opt.state.values(), resumed_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight_opt.param_groups[0]["lr"] == resumed_opt.param_groups[0]["lr"]
    _, _, again = _resumable_run(path, 14, resume=True, every=7)      # the finished run's checkpoint: nothing to do
    assert again == straight_history


def test_fine_tune_resume_with_a_regularizer(tmp_path):
    def run(steps, resume):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        reg = SparsityRegularizer(model, alpha=0.01, pattern="block", block_size=(8, 8), proximal=True,
                                  alpha_schedule=lambda step: 0.001 * step)
        data = [(x, (x[:, 0] > 0).long()) for x in batches(3)]
        history = fine_tune(model, data, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                            steps=steps, regularizer=reg, checkpoint=tmp_path / "ft.safetensors", checkpoint_every=4,
                            resume=resume, progress=False)
        return model, history

    straight, history = run(10, False)
    run(4, False)
    resumed, resumed_history = run(10, True)
    assert resumed_history == history
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_checkpoint_is_safetensors_with_json_metadata(tmp_path):
    from safetensors import safe_open
    path = tmp_path / "run.safetensors"
    _resumable_run(path, 3, every=3)
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.endswith("parametrizations.weight.0.mask") for k in keys)
    assert any("optimizer" in k and "exp_avg" in k for k in keys)
    assert meta["format"] == "pysparse.training_state/1" and '"epoch_batches"' in meta["state"]
    with pytest.raises(ValueError, match="is not a pysparse training checkpoint"):
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        _resumable_run(tmp_path / "other.safetensors", 3, resume=True)


def test_bad_input(tmp_path):
    teacher, student = mlp().eval(), mlp()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    data = batches(2)
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        distill(student, teacher, data, opt, steps=0, progress=False)
    with pytest.raises(TypeError, match="teacher must be an nn.Module, got function"):
        distill(student, lambda x: x, data, opt, steps=1, progress=False)
    with pytest.raises(ValueError, match="data yielded no batches"):
        distill(student, teacher, [], opt, steps=1, progress=False)
    other = nn.Sequential(nn.Linear(16, 5))
    with pytest.raises(ValueError, match=r"student and teacher outputs differ in shape: student \(32, 8\), "
                                         r"teacher \(32, 5\)"):
        distill(student, other, data, opt, steps=1, progress=False)
    with pytest.raises(ValueError, match="loss must be one of"):
        distill(student, teacher, data, opt, steps=1, loss="mse", progress=False)
    with pytest.raises(ValueError, match="layers names 'nope', which is not a module of the teacher"):
        distill(student, teacher, data, opt, steps=1, layers=[("fc1", "nope")], progress=False)
    class TakesKeywords(nn.Sequential):
        def forward(self, x, **kwargs):
            return super().forward(x)

    with pytest.raises(ValueError, match="intermediate=True needs the student's output to have hidden_states"):
        distill(TakesKeywords(nn.Linear(16, 8)), TakesKeywords(nn.Linear(16, 8)), data, opt, steps=1,
                intermediate=True, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every and resume need checkpoint"):
        distill(student, teacher, data, opt, steps=1, resume=True, progress=False)
    with pytest.raises(ValueError, match="eval_every needs eval_fn"):
        distill(student, teacher, data, opt, steps=1, eval_every=2, progress=False)


def test_dropout_off_trains_as_without_dropout_and_restores_p():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    with_dropout = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 8))
    without = copy.deepcopy(with_dropout)
    without[2].p = 0.0
    data = [torch.randn(6, 12) for _ in range(3)]
    for model, dropout in ((with_dropout, False), (without, True)):
        torch.manual_seed(1)
        distill(model, teacher, data, torch.optim.SGD(model.parameters(), lr=0.1), steps=4, progress=False,
                dropout=dropout)
    assert with_dropout[2].p == 0.5
    for a, b in zip(with_dropout.parameters(), without.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError, match="dropout"):
        distill(without, teacher, data, torch.optim.SGD(without.parameters(), lr=0.1), steps=1, dropout="no")


@pytest.mark.parametrize("intermediate", [False, True])
def test_teacher_in_bfloat16_gives_the_targets_of_a_bfloat16_copy(intermediate):
    """teacher_dtype runs a bfloat16 copy of the teacher: the first loss is the one against that copy's outputs (cast
    to float32), the student stays float32 and still learns, and the teacher is left as it was."""
    teacher = _bert()
    torch.manual_seed(1)
    student = type(teacher)(teacher.config, add_pooling_layer=False)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 120, (4, 12), generator=g),
             "attention_mask": torch.ones(4, 12, dtype=torch.int64)} for _ in range(3)]
    frozen = torch.optim.SGD(student.parameters(), lr=0.0)
    kwargs = dict(loss="embedding", intermediate=intermediate, progress=False)
    first = distill(student, teacher, data[:1], frozen, steps=1, teacher_dtype=torch.bfloat16, **kwargs)[0]["loss"]
    plain = distill(student, teacher, data[:1], frozen, steps=1, **kwargs)[0]["loss"]
    with torch.no_grad():
        t_out = copy.deepcopy(teacher).to(torch.bfloat16)(**data[0], output_hidden_states=intermediate)
    with torch.no_grad():
        s_out = student(**data[0], output_hidden_states=intermediate)
        s, t = s_out.last_hidden_state, t_out.last_hidden_state.float()
        want = ((1 - F.cosine_similarity(s.flatten(0, 1), t.flatten(0, 1), dim=-1)).mean() + F.mse_loss(s, t)
                + (1 - F.cosine_similarity(s.mean(1), t.mean(1), dim=-1)).mean())
        if intermediate:
            want = want + sum(F.mse_loss(a, b.float()) for a, b in zip(s_out.hidden_states, t_out.hidden_states)) \
                / len(s_out.hidden_states)
    assert first == pytest.approx(want.item(), rel=1e-5)
    assert first != plain and first == pytest.approx(plain, rel=5e-2)
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    history = distill(student, teacher, data, torch.optim.Adam(student.parameters(), lr=3e-3), steps=20,
                      teacher_dtype=torch.bfloat16, progress=False)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    with pytest.raises(ValueError, match="teacher_dtype must be None, torch.bfloat16 or torch.float16, got "
                                         "torch.float64"):
        distill(student, teacher, data, frozen, steps=1, teacher_dtype=torch.float64, progress=False)


def test_teacher_dtype_takes_float_inputs_and_layer_pairs():
    """A teacher fed floating-point inputs gets them in its dtype, and ``layers`` pairs read the converted copy."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    data = [torch.randn(5, 6) for _ in range(2)]
    frozen = torch.optim.SGD(student.parameters(), lr=0.0)
    first = distill(student, teacher, data[:1], frozen, steps=1, teacher_dtype=torch.bfloat16, loss="hidden",
                    layers=[("0", "0")], progress=False)[0]["loss"]
    bf16 = copy.deepcopy(teacher).to(torch.bfloat16)
    with torch.no_grad():
        s, t = student(data[0]), bf16(data[0].bfloat16()).float()
        s0, t0 = student[0](data[0]), bf16[0](data[0].bfloat16()).float()
        want = (1 - F.cosine_similarity(s, t, dim=-1)).mean() + F.mse_loss(s, t) + F.mse_loss(s0, t0)
    assert first == pytest.approx(want.item(), rel=1e-5)
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
