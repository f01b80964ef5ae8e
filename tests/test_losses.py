"""WeakTr's gradient-clipping loss and the refiner's clipped loss, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from weakseg.masks.refiner import clipped_refiner_loss
from weakseg.train.losses import (GradientClippingLoss, build_seg_loss, gradient_clipping_loss, pixel_cross_entropy,
                                  window_means)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A 4x4 loss map with 2x2 windows: outliers 2.0 (top-left window) and 0.5 (bottom-right window); the top-right
# 0.2 is above its window mean (0.1) but below the global mean (0.275), so it must not be clipped.
LOSS_4X4 = [[0.0, 0.0, 0.0, 0.2],
            [0.0, 2.0, 0.1, 0.1],
            [0.2, 0.2, 0.2, 0.5],
            [0.2, 0.2, 0.25, 0.25]]


def leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_clipping_matches_hand_computed_windows():
    loss_map = leaf([LOSS_4X4])
    # global mean 4.4 / 16 = 0.275; window means TL 0.5, TR 0.1, BL 0.2, BR 0.3
    # tau = max(window, global): TL 0.5, TR 0.275, BL 0.275, BR 0.3 -> 2.0 -> 0.5 and 0.5 -> 0.3
    loss = gradient_clipping_loss(loss_map, start_value=1.2, window_size=2)
    assert loss.item() == pytest.approx((0.5 + 0.4 + 0.8 + 1.0) / 16)
    loss.backward()
    expected_grad = torch.full((1, 4, 4), 1 / 16, dtype=torch.float64)
    expected_grad[0, 1, 1] = expected_grad[0, 2, 3] = 0.0  # clipped pixels: constant loss, zero gradient
    assert torch.allclose(loss_map.grad, expected_grad)


def test_no_clipping_while_mean_loss_above_start_value():
    values = [[5.0 * v for v in row] for row in LOSS_4X4]  # mean 1.375 > 1.2
    loss_map = leaf([values])
    loss = gradient_clipping_loss(loss_map, start_value=1.2, window_size=2)
    assert loss.item() == pytest.approx(22.0 / 16)
    loss.backward()
    assert torch.allclose(loss_map.grad, torch.full((1, 4, 4), 1 / 16, dtype=torch.float64))  # outlier included


def test_clipping_starts_exactly_at_start_value():
    values = [[5.0 * v for v in row] for row in LOSS_4X4]
    at_start = gradient_clipping_loss(leaf([values]), start_value=22.0 / 16, window_size=2)
    assert at_start.item() < 22.0 / 16  # mean == start_value: clipping is on ("no clipping while mean > start")


def test_window_thresholds_use_the_batch_mean_map_and_the_global_mean():
    # window 1: tau_p = max(mean_b l_b(p), global mean); global mean = 1.2 / 8 = 0.15
    loss_map = leaf([[[1.0, 0.0], [0.0, 0.0]],
                     [[0.0, 0.0], [0.0, 0.2]]])
    loss = gradient_clipping_loss(loss_map, start_value=1.2, window_size=1)
    # batch mean map [[0.5, 0], [0, 0.1]] -> tau [[0.5, .15], [.15, .15]] -> 1.0 -> 0.5, 0.2 -> 0.15
    assert loss.item() == pytest.approx((0.5 + 0.15) / 8)
    loss.backward()
    assert loss_map.grad[0, 0, 0] == 0 and loss_map.grad[1, 1, 1] == 0
    assert loss_map.grad.count_nonzero() == 6


def test_every_window_of_the_crop_is_clipped_separately():
    # 4 x 6 map, 2 x 2 windows (6 windows): one outlier per window, each clipped by its own window's mean.
    loss_map = torch.full((1, 4, 6), 0.1, dtype=torch.float64)
    outliers = [(0, 0), (1, 3), (0, 5), (3, 0), (2, 2), (3, 5)]
    for r, c in outliers:
        loss_map[0, r, c] = 1.0
    loss_map.requires_grad_(True)
    gradient_clipping_loss(loss_map, start_value=1.2, window_size=2).backward()
    zero = {(r, c) for r in range(4) for c in range(6) if loss_map.grad[0, r, c] == 0}
    assert zero == set(outliers)


def test_crop_not_divisible_by_window_is_an_error():
    with pytest.raises(ValueError, match="divisible by window_size=2"):
        gradient_clipping_loss(torch.zeros(1, 5, 4), start_value=1.2, window_size=2)
    with pytest.raises(ValueError, match="crop_size"):
        build_seg_loss("gradient_clipping", window_size=120, crop_size=224)
    with pytest.raises(ValueError, match="valid names"):
        build_seg_loss("focal")


def test_module_uses_cross_entropy_with_ignored_pixels_as_zero():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, :2] = 255
    pixel = pixel_cross_entropy(logits, target)
    assert torch.all(pixel[0, :2] == 0)
    assert GradientClippingLoss(start_value=0.0, window_size=2)(logits, target).item() == pytest.approx(
        pixel.sum().item() / 32)  # warm-up: mean over all pixels, ignored ones counted as 0 (WeakTr)
    clipped = GradientClippingLoss(start_value=10.0, window_size=2)(logits, target)
    clipped.backward()
    local, _ = window_means(pixel.detach().mean(0, keepdim=True), 2)
    above = pixel.detach() > torch.maximum(local, pixel.detach().mean())
    assert above.any()
    assert torch.all(logits.grad.abs().sum(1)[above] == 0)  # no gradient from clipped pixels
    assert torch.all(logits.grad.abs().sum(1)[target == 255] == 0)


def test_window_means_cover_partial_border_windows():
    x = torch.arange(25, dtype=torch.float64).view(1, 5, 5)
    per_pixel, means = window_means(x, 2)
    assert means.shape == (1, 3, 3)
    assert means[0, 0, 0] == (0 + 1 + 5 + 6) / 4
    assert means[0, 2, 2] == 24  # the 1x1 corner window
    assert means[0, 0, 2] == (4 + 9) / 2  # the 2x1 right-border window
    assert per_pixel[0, 4, 4] == 24 and per_pixel[0, 1, 4] == 6.5


def test_refiner_clipped_loss_covers_every_window_and_drops_outliers_outside_the_top_left():
    # 224 x 224, windows of 120: the top-left 120 x 120 has soft target 0.5 and logit 0 (zero gradient);
    # the rest has target 0 and logit -2 (zero gradient, BCE = softplus(-2)); one outlier at (200, 200)
    # with target 0.5 and logit 5 has a large gradient and must be dropped by its own (bottom-right) window.
    target = torch.zeros(1, 224, 224, dtype=torch.float64)
    logits = torch.full((1, 224, 224), -2.0, dtype=torch.float64)
    target[:, :120, :120] = 0.5
    logits[:, :120, :120] = 0.0
    target[0, 200, 200], logits[0, 200, 200] = 0.5, 5.0
    loss = clipped_refiner_loss(logits, target, window=120, tau=1.2)
    kept = 224 * 224 - 1
    expected = (120 * 120 * math.log(2) + (kept - 120 * 120) * F.softplus(torch.tensor(-2.0)).item()) / kept
    assert loss.item() == pytest.approx(expected)
    top_left_only = math.log(2)  # weaktr-refinery's single-window result
    assert abs(loss.item() - top_left_only) > 0.1


@pytest.mark.parametrize("name", ["ce", "gradient_clipping"])
def test_label_smoothing_moves_eps_of_the_target_onto_every_class_and_ignores_void(name):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, :2] = 255
    eps = 0.3
    log_p = logits.log_softmax(1)
    labelled = target != 255
    hard = -log_p.gather(1, target.clamp(max=2)[:, None])[:, 0]
    uniform = -log_p.mean(1)
    by_hand = ((1 - eps) * hard + eps * uniform)[labelled]  # eps over the C = 3 classes, the target's included
    # start_value 0: gradient clipping stays in its warm-up (no clipping), a mean over every pixel, void as 0
    loss = build_seg_loss(name, start_value=0.0, window_size=2, label_smoothing=eps)(logits, target)
    if name == "ce":
        assert loss.item() == pytest.approx(by_hand.mean().item())  # mean over the labelled pixels
    else:
        assert loss.item() == pytest.approx(by_hand.sum().item() / target.numel())  # WeakTr's warm-up mean
    assert build_seg_loss(name, start_value=0.0, window_size=2)(logits, target).item() == pytest.approx(
        hard[labelled].mean().item() if name == "ce" else hard[labelled].sum().item() / target.numel())
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        build_seg_loss(name, label_smoothing=1.0)
