"""The losses on a CUDA device agree with the CPU (skipped where no GPU is present)."""

from __future__ import annotations

import pytest
import torch

from hf_longtail.losses import ConfusionSpectralRegularizer, LongTailLossConfig, build_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

COUNTS = [500, 200, 90, 40, 20, 9, 4, 2]
K = len(COUNTS)


def _batches(n=4, b=32):
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randn(b, K, generator=g) * 2, torch.randint(0, K, (b,), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize("base", ["ce", "focal", "cb", "ldam", "la", "bs"])
def test_full_loss_matches_cpu(base):
    cfg = LongTailLossConfig(base=base, ccar=True, car_weight=0.5, drw_epoch=0)
    cpu, gpu = build_loss(cfg, COUNTS), build_loss(cfg, COUNTS).cuda()
    for z, y in _batches():
        zc = z.clone().requires_grad_(True)
        zg = z.cuda().requires_grad_(True)
        lc, lg = cpu(zc, y), gpu(zg, y.cuda())
        lc.backward()
        lg.backward()
        torch.testing.assert_close(lg.cpu(), lc, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(zg.grad.cpu(), zc.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        gpu.regularizer.confusion.cpu(), cpu.regularizer.confusion, rtol=1e-5, atol=1e-7
    )


def test_bf16_autocast_on_cuda_and_state_moves_to_cpu():
    loss = build_loss(LongTailLossConfig(ccar=True, car_weight=0.5), COUNTS).cuda()
    layer = torch.nn.Linear(6, K).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = layer(torch.randn(16, 6, device="cuda"))
        total = loss(logits, torch.arange(16, device="cuda") % K)
    assert logits.dtype == torch.bfloat16 and total.dtype == torch.float32
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(layer.weight.grad).all()
    restored = build_loss(LongTailLossConfig(ccar=True, car_weight=0.5), COUNTS)
    restored.load_state_dict({k: v.cpu() for k, v in loss.state_dict().items()})
    assert torch.equal(restored.regularizer.confusion, loss.regularizer.confusion.cpu())


def test_car_value_matches_matrix_norm_on_cuda():
    reg = ConfusionSpectralRegularizer(COUNTS, alpha=1.0).cuda()
    z, y = _batches(1, b=64)[0]
    for _ in range(60):
        value = reg(z.cuda(), y.cuda())
    exact = torch.linalg.matrix_norm(
        reg.confusion.double() @ torch.diag(reg.weights.double()), ord=2
    )
    assert abs(value.item() - exact.item()) <= 1e-4 * exact.item()
