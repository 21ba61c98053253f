"""Class-aware samplers: target frequencies, determinism, padding, DDP (2 gloo ranks), accelerate."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_longtail.data import (
    ClassAwareSampler,
    build_class_aware_sampler,
    create_sampler,
    sampling_distribution,
)

COUNTS = np.array([2000, 600, 150, 40, 8])
LABELS = np.repeat(np.arange(len(COUNTS)), COUNTS)
# Shuffle rows so that class membership is not contiguous in index space.
LABELS = LABELS[np.random.default_rng(11).permutation(LABELS.size)]
WORLD = 2
N_DIST = 20001  # odd: exercises the wrap padding
EPOCH = 3


def _reference_q(mode: str, epoch: float = 0.0, total: float = 1.0) -> np.ndarray:
    n = COUNTS.astype(float)
    inst = n / n.sum()
    bal = np.full(n.size, 1.0 / n.size)
    if mode == "instance":
        return inst
    if mode == "class_balanced":
        return bal
    if mode == "sqrt":
        return np.sqrt(n) / np.sqrt(n).sum()
    w = min(epoch / total, 1.0)
    return (1 - w) * inst + w * bal


def _z_scores(counts: np.ndarray, q: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return (counts - total * q) / np.sqrt(total * q * (1 - q))


# ---------------------------------------------------------------- single process


@pytest.mark.parametrize("mode", ["instance", "class_balanced", "sqrt"])
def test_distribution_and_epoch_class_frequencies(mode):
    q = _reference_q(mode)
    np.testing.assert_allclose(sampling_distribution(COUNTS, mode), q, rtol=1e-12)
    n = 100_000
    sampler = ClassAwareSampler(LABELS, mode=mode, num_samples=n, seed=5, num_replicas=1, rank=0)
    order = np.fromiter(iter(sampler), dtype=np.int64)
    assert order.size == n == len(sampler)
    counts = np.bincount(LABELS[order], minlength=COUNTS.size)
    # Systematic quotas: every class within one sample of N * q_c.
    assert np.all(np.abs(counts - n * q) < 1.0 + 1e-9)
    # Order is shuffled: the first 10% already follows q (binomial z-scores).
    head = np.bincount(LABELS[order[: n // 10]], minlength=COUNTS.size)
    assert np.all(np.abs(_z_scores(head, q)) < 5)
    # Within a class, images are cycled: each is drawn floor or ceil of k_c / n_c times.
    for c in range(COUNTS.size):
        per_image = np.bincount(order[LABELS[order] == c], minlength=LABELS.size)[LABELS == c]
        assert per_image.max() - per_image.min() <= 1


def test_progressive_interpolates_from_instance_to_balanced():
    sampler = ClassAwareSampler(LABELS, mode="progressive", total_epochs=10, num_replicas=1)
    for epoch, expected in ((0, _reference_q("instance")), (10, _reference_q("class_balanced"))):
        np.testing.assert_allclose(sampler.probabilities(epoch), expected, rtol=1e-12)
    np.testing.assert_allclose(sampler.probabilities(4), _reference_q("progressive", 4, 10))
    sampler.set_epoch(5)
    counts = np.bincount(LABELS[list(sampler)], minlength=COUNTS.size)
    assert np.all(np.abs(counts - LABELS.size * _reference_q("progressive", 5, 10)) < 1 + 1e-9)
    with pytest.raises(ValueError, match="total_epochs"):
        ClassAwareSampler(LABELS, mode="progressive")


def test_determinism_by_seed_and_epoch():
    a = ClassAwareSampler(LABELS, seed=1, num_replicas=1)
    b = ClassAwareSampler(LABELS, seed=1, num_replicas=1)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(ClassAwareSampler(LABELS, seed=2, num_replicas=1)) != first


def test_padding_drop_last_and_rank_positions():
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    ranks = [ClassAwareSampler(labels, num_replicas=3, rank=r, seed=0) for r in range(3)]
    assert [len(s) for s in ranks] == [4, 4, 4]
    order = ranks[0].global_order()
    padded = np.concatenate([order, order[:2]])
    for r, s in enumerate(ranks):
        assert list(s) == padded[r::3].tolist()
    dropped = [ClassAwareSampler(labels, num_replicas=3, rank=r, drop_last=True) for r in range(3)]
    assert [len(s) for s in dropped] == [3, 3, 3]
    union = np.concatenate([list(s) for s in dropped])
    assert sorted(union.tolist()) == sorted(order[:9].tolist())


def test_dataset_input_and_errors():
    from datasets import ClassLabel, Dataset, Features

    ds = Dataset.from_dict(
        {"label": LABELS}, features=Features({"label": ClassLabel(num_classes=5)})
    ).select(np.arange(0, LABELS.size, 2))
    sampler = build_class_aware_sampler(ds, "sqrt", seed=0, num_epochs=4.0)
    assert sampler.class_counts.tolist() == np.bincount(LABELS[::2]).tolist()
    assert create_sampler("balanced", LABELS).mode == "class_balanced"
    with pytest.raises(ValueError, match="unknown sampler"):
        create_sampler("oversample", LABELS)
    with pytest.raises(ValueError, match="rank"):
        ClassAwareSampler(LABELS, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="negative label -1 at index 1"):
        ClassAwareSampler([0, -1, 1])
    with pytest.raises(ValueError, match="integer class ids"):
        ClassAwareSampler([0.5, 1.0])


def test_accelerate_batch_sharding_of_the_global_order():
    # What accelerate (and the Trainer) do: one global order (num_replicas=1) on every process,
    # batches dealt round-robin by BatchSamplerShard.
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    n, batch = 1000, 10
    shares = []
    for rank in range(WORLD):
        sampler = ClassAwareSampler(LABELS, num_samples=n, seed=3, num_replicas=1, rank=0)
        sampler.set_epoch(2)
        shard = BatchSamplerShard(
            BatchSampler(sampler, batch, drop_last=False), num_processes=WORLD, process_index=rank
        )
        shares.append([list(b) for b in shard])
    order = ClassAwareSampler(LABELS, num_samples=n, seed=3, num_replicas=1).global_order(2)
    batches = [order[i : i + batch].tolist() for i in range(0, n, batch)]
    assert shares[0] == batches[0::2] and shares[1] == batches[1::2]


# ---------------------------------------------------------------- two gloo processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        for mode in ("class_balanced", "sqrt"):
            sampler = ClassAwareSampler(LABELS, mode=mode, num_samples=N_DIST, seed=7)
            sampler.set_epoch(EPOCH)
            got = np.fromiter(iter(sampler), dtype=np.int64)
            meta = np.array([sampler.num_replicas, sampler.rank, len(sampler)])
            np.save(Path(out_dir) / f"{mode}_rank{rank}.npy", got)
            np.save(Path(out_dir) / f"{mode}_meta{rank}.npy", meta)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_rank_gloo_disjoint_shares_of_one_global_order(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for mode in ("class_balanced", "sqrt"):
        shares = [np.load(tmp_path / f"{mode}_rank{r}.npy") for r in range(WORLD)]
        metas = [np.load(tmp_path / f"{mode}_meta{r}.npy").tolist() for r in range(WORLD)]
        half = (N_DIST + 1) // 2
        # num_replicas / rank were read from torch.distributed; equal lengths per rank.
        assert metas == [[WORLD, 0, half], [WORLD, 1, half]]
        assert [s.size for s in shares] == [half, half]
        # Positions: rank r holds positions r, r+2, ... of ONE global order (padded by wrap),
        # so the shares are disjoint in position and together are exactly that order.
        ref = ClassAwareSampler(LABELS, mode=mode, num_samples=N_DIST, seed=7, num_replicas=1)
        order = ref.global_order(EPOCH)
        padded = np.concatenate([order, order[:1]])
        interleaved = np.empty(WORLD * half, dtype=np.int64)
        interleaved[0::2], interleaved[1::2] = shares
        assert np.array_equal(interleaved, padded)
        # Class frequencies of the union follow the target distribution.
        q = _reference_q(mode)
        union = np.bincount(LABELS[np.concatenate(shares)], minlength=COUNTS.size)
        assert np.all(np.abs(union - padded.size * q) <= 2)
        # And each rank's share on its own matches it statistically.
        for share in shares:
            z = _z_scores(np.bincount(LABELS[share], minlength=COUNTS.size), q)
            assert np.all(np.abs(z) < 5)
    assert not torch.distributed.is_initialized()
