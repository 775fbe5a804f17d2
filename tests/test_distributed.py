"""Recovery training under DistributedDataParallel: 2 CPU processes over gloo on loopback, started by the test.

One spawn runs every distributed case (starting processes and importing torch is most of the time): ``fine_tune``
with ``prune_`` masks and a pruning schedule, ``distill`` from a dense teacher, packed trainable layers from
``pysparse.sparsify(trainable=True)``, and a checkpoint that rank 0 alone writes. Each rank trains on its half of
every batch, so a single process fed the whole batches computes the same mean gradient: the test resumes the
2-process checkpoint in this process and compares with the 2-process run's end (float32 rounding apart).
"""
from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pysparse
from pysparse.prune import GradualSchedule, distill, fine_tune, get_masks, mask_sparsity, prune_, recovery
from pysparse.prune.train_checkpoint import load_training_state

WORLD = 2
SPLIT_STEP, STEPS = 3, 6  # the checkpoint resumed on one process is 3 batches into the first epoch of 4


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def _global_batches(n: int = 4, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 64, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(n)]


def _shard(batches, rank: int, world: int):
    """This rank's half of every global batch: DDP's averaged gradient is then the whole batch's mean gradient."""
    return [tuple(t.chunk(world)[rank] for t in batch) for batch in batches]


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _same_on_all_ranks(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(gathered[0], t) for t in gathered)


def _pruned_entries_zero(model: nn.Module) -> bool:
    return all(not model.get_submodule(name).weight[~mask].any() for name, mask in get_masks(model).items())


def _worker(rank: int, port: int, tmp: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        writes = []  # which ranks write checkpoints: counted by wrapping the writer recovery calls
        write = recovery.save_training_state
        recovery.save_training_state = lambda path, state: (writes.append(path), write(path, state))
        out = {}
        data = _shard(_global_batches(), rank, WORLD)

        # fine_tune: one-shot masks before wrapping, then a schedule pruning further under DDP (step 2).
        model = _model()
        prune_(model, sparsity=0.5, block_size=(16, 16))
        ddp = nn.parallel.DistributedDataParallel(model)
        ckpt = os.path.join(tmp, "fine_tune.ckpt")
        schedule = GradualSchedule(initial=0.5, final=0.75, start_step=0, end_step=2, every=2)
        fine_tune(ddp, data, nn.functional.cross_entropy, _optimizer(ddp), steps=SPLIT_STEP, schedule=schedule,
                  block_size=(16, 16), checkpoint=ckpt, progress=False)
        if rank == 0:
            shutil.copy(ckpt, os.path.join(tmp, f"step{SPLIT_STEP}.ckpt"))
        dist.barrier()
        optimizer = _optimizer(ddp)
        fine_tune(ddp, data, nn.functional.cross_entropy, optimizer, steps=STEPS, schedule=schedule,
                  block_size=(16, 16), checkpoint=ckpt, resume=True, progress=False)
        out["fine_tune_identical"] = _same_on_all_ranks(_flat(model))
        out["fine_tune_pruned_zero"] = _pruned_entries_zero(model)
        out["fine_tune_sparsity"] = mask_sparsity(model)
        out["writes"] = len(writes)

        # distill: the student under DDP, the dense teacher plain on each rank.
        teacher, student = _model(), _model()
        prune_(student, sparsity=0.75, block_size=(16, 16))
        ddp = nn.parallel.DistributedDataParallel(student)
        inputs = [x for x, _ in data]
        distill(ddp, teacher, inputs, _optimizer(ddp), steps=4, progress=False)
        out["distill_identical"] = _same_on_all_ranks(_flat(student))
        out["distill_pruned_zero"] = _pruned_entries_zero(student)

        # packed trainable layers: 32x32 blocks, the values are the parameters DDP reduces.
        dense = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
        torch.manual_seed(0)
        dense.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
        prune_(dense, sparsity=0.5, block_size=(32, 32))
        packed = pysparse.sparsify(dense, trainable=True, block_size=(32, 32))
        before = {n: p.detach().clone() for n, p in packed.named_parameters()}
        ddp = nn.parallel.DistributedDataParallel(packed)
        g = torch.Generator().manual_seed(2)
        wide = [(torch.randn(8, 128, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
        fine_tune(ddp, _shard(wide, rank, WORLD), nn.functional.cross_entropy, _optimizer(ddp), steps=3,
                  progress=False)
        out["packed_layers"] = sum(isinstance(m, pysparse.nn.SparseLinear) for m in packed.modules())
        out["packed_identical"] = _same_on_all_ranks(_flat(packed))
        out["packed_trained"] = all(not torch.equal(before[n], p) for n, p in packed.named_parameters())
        results[rank] = out
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Each rank's findings, and the folder holding the checkpoints the 2-process run wrote."""
    tmp = str(tmp_path_factory.mktemp("ddp"))
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), tmp, results), nprocs=WORLD, join=True)
        return dict(results), tmp


def test_fine_tune_under_ddp_keeps_replicas_identical_and_masks_held(two_ranks):
    results, _ = two_ranks
    for rank in range(WORLD):
        assert results[rank]["fine_tune_identical"]
        assert results[rank]["fine_tune_pruned_zero"]
        assert results[rank]["fine_tune_sparsity"] == pytest.approx(0.75, abs=0.02)  # the schedule's final step


def test_checkpoints_are_written_by_rank_0_only(two_ranks):
    results, tmp = two_ranks
    assert results[0]["writes"] == 2  # the end of each fine_tune call
    assert results[1]["writes"] == 0
    state = load_training_state(os.path.join(tmp, "fine_tune.ckpt"))
    assert not any(key.startswith("module.") for key in state["model"])  # DDP's wrapper is not in the keys
    assert len(state["history"]) == STEPS


def test_ddp_checkpoint_resumes_on_one_process(two_ranks):
    """The 2-process checkpoint at step 3, resumed here on whole batches, ends where the 2-process run ended."""
    _, tmp = two_ranks
    model = _model()
    prune_(model, sparsity=0.5, block_size=(16, 16))  # built as for the interrupted run: same parameter order
    optimizer = _optimizer(model)
    schedule = GradualSchedule(initial=0.5, final=0.75, start_step=0, end_step=2, every=2)
    history = fine_tune(model, _global_batches(), nn.functional.cross_entropy, optimizer, steps=STEPS,
                        schedule=schedule, block_size=(16, 16), checkpoint=os.path.join(tmp, f"step{SPLIT_STEP}.ckpt"),
                        resume=True, progress=False)
    assert len(history) == STEPS
    reference = load_training_state(os.path.join(tmp, "fine_tune.ckpt"))["model"]
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        if value.dtype == torch.bool:
            assert torch.equal(state[key], value), key
        else:
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_distill_under_ddp(two_ranks):
    results, _ = two_ranks
    for rank in range(WORLD):
        assert results[rank]["distill_identical"]
        assert results[rank]["distill_pruned_zero"]


def test_packed_trainable_layers_under_ddp(two_ranks):
    results, _ = two_ranks
    for rank in range(WORLD):
        assert results[rank]["packed_layers"] == 2  # the output layer stays dense
        assert results[rank]["packed_identical"]
        assert results[rank]["packed_trained"]
