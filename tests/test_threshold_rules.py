"""Label-free background thresholds of the masks stage: Otsu, and area matching for CAMs made at a larger input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from weakseg.config import load_config
from weakseg.io import save_cam
from weakseg.masks.makers import otsu_threshold
from weakseg.masks.stage import (area_matched_threshold, cam_histogram, choose_mask_threshold, share_above,
                                 threshold_keeping)
from weakseg.pipeline import run_stages

ROOT = Path(__file__).resolve().parents[1]


def _bimodal(rng: np.random.Generator, n: int) -> np.ndarray:
    """Top-CAM-like values in [0, 1]: 60 % background near 0.15, 40 % object near 0.7."""
    bg = rng.normal(0.15, 0.07, int(0.6 * n))
    fg = rng.normal(0.7, 0.12, n - len(bg))
    return np.clip(np.concatenate([bg, fg]), 0.0, 1.0)


def test_threshold_keeping_is_the_inverse_of_share_above():
    hist = np.histogram(np.linspace(0.0, 1.0, 100_001), bins=1000, range=(0.0, 1.0))[0]
    assert threshold_keeping(hist, 0.3) == pytest.approx(0.7, abs=1e-3)
    assert share_above(hist, 0.7) == pytest.approx(0.3, abs=1e-3)
    assert threshold_keeping(hist, 1.0) == 0.0


def test_area_match_follows_a_monotone_sharpening_of_the_maps_where_otsu_does_not(tmp_path):
    """Larger-input CAMs are peakier: modelled as v -> v**2 of the reference maps. The area-matched threshold
    lands on the image of the reference Otsu threshold (same pixels kept); Otsu on the sharpened maps does not."""
    rng = np.random.default_rng(0)
    reference = _bimodal(rng, 40_000)
    ids = []
    for k, part in enumerate(np.split(reference, 10)):
        save_cam(tmp_path / f"im{k}.npz", (part ** 2).reshape(1, 40, 100), np.array([1]), (160, 400))
        ids.append(f"im{k}")
    reference_hist = np.histogram(reference, bins=100, range=(0.0, 1.0))[0]
    t_ref = otsu_threshold(reference_hist)
    threshold, details = area_matched_threshold(tmp_path, ids, reference_hist)

    assert 0.35 < t_ref < 0.5
    assert threshold == pytest.approx(t_ref ** 2, abs=0.01)
    assert details["foreground_share"] == pytest.approx((reference >= t_ref).mean(), abs=2e-3)
    sharpened_otsu = otsu_threshold(cam_histogram(tmp_path, ids))
    assert sharpened_otsu > threshold + 0.05  # what plain Otsu would keep: too little foreground


def test_an_unknown_threshold_rule_is_an_error_naming_the_valid_ones_before_any_stage_runs(tiny_overrides):
    cfg = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + ["masks.bg_threshold_rule=median"])
    with pytest.raises(ValueError, match="bg_threshold_rule 'median'; valid: otsu, area_match"):
        choose_mask_threshold(SimpleNamespace(cfg=cfg), None, Path("."), [])
    with pytest.raises(ValueError, match="bg_threshold_rule 'median'"):
        run_stages(cfg, ["train-cls", "cams", "masks"])
    assert not (cfg.run_dir / "train-cls").exists()


def test_area_match_refuses_a_maker_that_thresholds_other_maps(tiny_overrides, monkeypatch):
    """E.g. the fusion maker thresholds the class-agnostic CAMs of another run: their 224 px reference is not these."""
    from weakseg.masks.makers import ThresholdMaker
    from weakseg.runs import StageError

    cfg = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + [
        "masks.method=threshold", "masks.bg_threshold_rule=area_match"])
    monkeypatch.setattr(ThresholdMaker, "threshold_cam_dir", lambda self, cam_dir: cam_dir.parent / "agnostic")
    with pytest.raises(StageError, match="area_match re-makes the cams stage's CAMs"):
        run_stages(cfg, ["train-cls", "cams", "masks"])


def test_threshold_maps_dir_refuses_other_maps_only_under_a_label_free_area_match(tmp_path):
    """The guard the masks stage and bench.mask_quality share."""
    from types import SimpleNamespace

    from weakseg.config import MaskCfg
    from weakseg.masks.stage import threshold_maps_dir
    from weakseg.runs import StageError

    cams, other = tmp_path / "cams", tmp_path / "agnostic"
    same = SimpleNamespace(threshold_cam_dir=lambda cam_dir: cam_dir)
    fused = SimpleNamespace(threshold_cam_dir=lambda cam_dir: other)
    area_match = MaskCfg(method="fusion", bg_threshold_rule="area_match")
    assert threshold_maps_dir(same, cams, area_match) == cams
    with pytest.raises(StageError, match=f"masks.method=fusion thresholds other maps \\({other}\\)"):
        threshold_maps_dir(fused, cams, area_match)
    assert threshold_maps_dir(fused, cams, MaskCfg(bg_threshold_rule="otsu")) == other
    assert threshold_maps_dir(fused, cams, MaskCfg(bg_threshold_rule="area_match", bg_threshold=0.3)) == other


def test_masks_stage_area_match_keeps_the_reference_share_of_foreground(tiny_overrides):
    """CAMs stored at twice the classifier's input; the reference CAMs at its own input over every training
    image. The stage's threshold keeps exactly the share of stored-CAM pixels that Otsu keeps on the reference."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + [
        "cams.image_size=64", "masks.method=threshold", "masks.bg_threshold_rule=area_match",
        "masks.area_match_images=1000"])
    run_stages(cfg, ["train-cls", "cams", "masks"])
    metrics = json.loads((cfg.run_dir / "masks" / "metrics.json").read_text())
    details = metrics["threshold_rule_details"]
    cam_dir = cfg.run_dir / "cams" / "cams"
    ids = sorted(p.stem for p in cam_dir.glob("*.npz"))
    assert details["reference_images"] == len(ids) and details["reference_size"] == 32
    assert metrics["threshold_rule"].startswith("label-free: the foreground share of Otsu")
    kept = share_above(cam_histogram(cam_dir, ids, bins=1000), metrics["bg_threshold"])
    # the closest bin edge: off by at most the pixels of one 1/1000 bin
    assert kept == pytest.approx(details["foreground_share"], abs=0.02)
    assert 0.0 < details["foreground_share"] < 1.0


def test_the_rule_is_part_of_the_masks_fingerprint_only():
    from weakseg.runs import stage_fingerprint

    base, matched = load_config(None), load_config(None, ["masks.bg_threshold_rule=area_match"])
    assert stage_fingerprint(matched, "masks") != stage_fingerprint(base, "masks")
    assert stage_fingerprint(matched, "cams") == stage_fingerprint(base, "cams")
