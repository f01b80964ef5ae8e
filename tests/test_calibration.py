"""Label-free prior-matching calibration of a segmentation model's class scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weakseg.io import IGNORE_INDEX, write_json
from weakseg.models.inference import SegPredictor
from weakseg.train.calibration import (CALIBRATION_FILE, fit_class_weights, load_class_weights, predicted_shares,
                                       prior_match)


def under_predicting_probs(n: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes; class 2 owns 30 % of the pixels but the model gives it less probability than background
    on most of them: probs (3, n), true labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(n, dtype=torch.long)
    labels[: n // 5] = 1
    labels[n // 5: n // 2] = 2
    logits = torch.randn(3, n, generator=g) * 0.5
    logits[1, labels == 1] += 2.0
    logits[2, labels == 2] += 1.5
    logits[0] += 1.8  # background bias: class 2 mostly loses to it
    return logits.softmax(0), labels


def test_predicted_shares_count_the_argmax_of_the_weighted_scores():
    probs = torch.tensor([[0.6, 0.5, 0.2, 0.1], [0.4, 0.5, 0.8, 0.9]])
    assert predicted_shares(probs, torch.ones(2)).tolist() == [0.5, 0.5]  # a tie goes to the first class
    assert predicted_shares(probs, torch.tensor([1.0, 0.2])).tolist() == [0.75, 0.25]


def test_prior_matching_gives_each_class_its_target_share_and_fixes_the_under_predicted_one():
    probs, labels = under_predicting_probs()
    target = torch.bincount(labels, minlength=3).double() / len(labels)
    before = predicted_shares(probs, torch.ones(3))
    assert before[2] < 0.5 * target[2]  # the model under-predicts class 2 ...
    weights = fit_class_weights(probs, target)
    after = predicted_shares(probs, weights)
    assert weights[0] == 1 and weights[2] > 1.5
    assert torch.allclose(after, target, atol=0.01)  # ... and the weights restore its share
    acc_before = ((probs.argmax(0) == labels).float().mean())
    acc_after = (((probs * weights[:, None]).argmax(0) == labels).float().mean())
    assert acc_after > acc_before + 0.1


def test_a_class_without_target_pixels_keeps_weight_one():
    probs, _ = under_predicting_probs()
    weights = fit_class_weights(probs, torch.tensor([0.7, 0.3, 0.0]))
    assert weights[2] == 1.0 and weights[0] == 1.0


def test_prior_match_reads_pseudo_masks_and_skips_their_ignored_pixels():
    probs, labels = under_predicting_probs(n=16 * 16)
    probs, labels = probs.reshape(3, 16, 16), labels.reshape(16, 16).numpy().astype(np.uint8)
    ignored = labels.copy()
    ignored[:, 8:] = IGNORE_INDEX
    record = prior_match(lambda i: probs, lambda i: ignored, [0, 1], num_classes=3, stride=1)
    kept = labels[:, :8]
    expected = np.bincount(kept.ravel(), minlength=3) / kept.size
    assert np.allclose(record["target_shares"], expected, atol=1e-6)
    assert record["pixels"] == 2 * 16 * 8 and record["images"] == 2
    with pytest.raises(ValueError, match="labelled pseudo-mask pixels"):
        prior_match(lambda i: probs, lambda i: np.full((16, 16), IGNORE_INDEX, np.uint8), [0], 3)


def test_predictor_labels_apply_the_class_weights(tmp_path):
    class Fixed(torch.nn.Module):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

        def forward(self, x):  # background slightly ahead of class 1 everywhere
            out = torch.zeros(x.shape[0], 2, *x.shape[2:])
            out[:, 0] = 0.2
            return out

    image = np.zeros((32, 32, 3), np.uint8)
    assert (SegPredictor(Fixed(), 32).labels(image) == 0).all()
    write_json(tmp_path / CALIBRATION_FILE, {"class_weights": [1.0, 1.5]})
    weights = load_class_weights(tmp_path, "prior_match")
    assert (SegPredictor(Fixed(), 32, class_weights=weights).labels(image) == 1).all()
    assert load_class_weights(tmp_path, "none") is None
    with pytest.raises(ValueError, match="valid names: none, prior_match"):
        load_class_weights(tmp_path, "platt")
    with pytest.raises(FileNotFoundError, match="wrote no calibration"):
        load_class_weights(tmp_path / "missing", "prior_match")
