"""Data-parallel training equals single-process training (2 processes, gloo on CPU).

``_ddp_train.py`` runs LongTailTrainer with CE + CCAR + CAR and the class-balanced sampler at a
global batch of 16 for 12 steps (two epochs), once in this process and once as 2 processes of 8
under ``python -m torch.distributed.run``. DDP averages the per-rank gradients of per-rank batch
means (which for a per-sample loss is the gradient of the global mean) and CAR reduces its
confusion sums over the ranks, so both runs must end with the same weights and CAR state up to
float32 reduction order.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _reliability_helpers import free_port, subprocess_env

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "_ddp_train.py"
ATOL, RTOL = 2e-5, 1e-4


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    sys.path.insert(0, str(HERE))
    import _ddp_train

    single = _ddp_train.train(tmp_path)  # one thread, as the children (conftest.py)
    assert single["world_size"] == 1 and single["global_step"] == _ddp_train.MAX_STEPS

    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(DRIVER), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(
        command,
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"result-ws2-rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(r["distributed_type"].endswith("MULTI_CPU") for r in ranks)
    assert all(r["global_step"] == _ddp_train.MAX_STEPS for r in ranks)

    # Same start, same end.
    for key, value in single["initial"].items():
        assert torch.equal(ranks[0]["initial"][key], value), key
    moved = max(
        (single["weights"][k] - single["initial"][k]).abs().max() for k in single["weights"]
    )
    assert moved > 100 * ATOL  # training changed the weights far beyond the tolerance
    for rank in ranks:
        for key, value in single["weights"].items():
            torch.testing.assert_close(rank["weights"][key], value, rtol=RTOL, atol=ATOL, msg=key)
        state = rank["loss_state"]
        assert int(state["regularizer.num_steps"]) == _ddp_train.MAX_STEPS
        for key, value in single["loss_state"].items():
            if value.is_floating_point():
                torch.testing.assert_close(state[key], value, rtol=RTOL, atol=ATOL, msg=key)
            else:
                assert torch.equal(state[key], value), key
