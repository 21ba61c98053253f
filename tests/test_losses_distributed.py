"""CAR under torch.distributed: 2 gloo processes on CPU == one process with the full batch.

Each rank gets half of every batch. After each step every rank must hold the single-process EMA
confusion (bit-identical across ranks), and the DDP-style average of the ranks' parameter
gradients must equal the single-process gradient.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
COUNTS = [300, 150, 80, 40, 20, 12, 6, 3]
K = len(COUNTS)
BATCH = 16
STEPS = 4
DIM = 5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(2024)
    x = torch.randn(STEPS, BATCH, DIM, generator=g)
    y = torch.randint(0, K, (STEPS, BATCH), generator=g)
    y[0, : BATCH // 2] = 0  # class 0 only on rank 0 in step 0, so the ranks' class sets differ
    y[0, BATCH // 2 :] = torch.arange(BATCH // 2) % (K - 1) + 1
    weight = torch.randn(DIM, K, generator=g)
    return x, y, weight


def _step_grads(module, x, y, weight):
    w = weight.clone().requires_grad_(True)
    value = module(x @ w, y)
    value.backward()
    return value.detach(), w.grad


def _worker(rank: int, port: int, out_dir: str) -> None:
    from hf_longtail.losses import ConfusionSpectralRegularizer, LongTailLossConfig, build_loss

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        torch.manual_seed(0)
        x, y, weight = _data()
        half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        cfg = LongTailLossConfig(base="ce", ccar=True, car_weight=0.5)
        pairs = [
            (
                ConfusionSpectralRegularizer(COUNTS, **kwargs),
                ConfusionSpectralRegularizer(COUNTS, distributed=False, **kwargs),
            )
            for kwargs in ({}, {"solver": "subspace", "subspace_size": 3}, {"ema": "per_class"})
        ]
        pairs.append((build_loss(cfg, COUNTS), build_loss(cfg, COUNTS)))
        # The single-process reference must not communicate.
        pairs[-1][1].regularizer.distributed = False
        for ours, ref in pairs:
            for step in range(STEPS):
                value, grad = _step_grads(ours, x[step, half], y[step, half], weight)
                dist.all_reduce(grad)
                grad /= WORLD  # what DDP does
                ref_value, ref_grad = _step_grads(ref, x[step], y[step], weight)
                reg = ours if isinstance(ours, ConfusionSpectralRegularizer) else ours.regularizer
                reg_ref = ref if isinstance(ref, ConfusionSpectralRegularizer) else ref.regularizer
                torch.testing.assert_close(reg.confusion, reg_ref.confusion, rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(reg.u, reg_ref.u, rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
                if ours is not pairs[-1][0]:  # the regularizer alone: same value on every rank
                    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-7)
                # Every rank holds the identical EMA (bit for bit).
                c0 = reg.confusion.contiguous().clone()
                dist.broadcast(c0, src=0)
                assert torch.equal(c0, reg.confusion.contiguous()), "ranks disagree on Cbar"
        Path(out_dir, f"rank{rank}.ok").write_text("ok")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_match_single_process_full_batch(tmp_path):
    ctx = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:  # pragma: no cover - a hang is a failure, not a stall
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed CAR test timed out (collective mismatch?)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok"]
