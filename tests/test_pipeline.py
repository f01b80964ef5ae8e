"""The tiny demo pipeline end to end: stage contract, skipping, --from, corruption, predict, kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weakseg.cli import main
from weakseg.config import ConfigError, load_config
from weakseg.pipeline import run_pipeline, run_stages
from weakseg.runs import STAGES

ROOT = Path(__file__).resolve().parents[1]


def _statuses(results):
    return {k: v["status"] for k, v in results.items()}


@pytest.fixture
def tiny_cfg(tiny_overrides):
    return load_config(ROOT / "configs" / "demo.yaml", tiny_overrides)


def test_full_run_contract_skip_and_from(tiny_cfg, monkeypatch):
    results = run_pipeline(tiny_cfg)
    assert _statuses(results) == {s: "ran" for s in STAGES}
    run_dir = tiny_cfg.run_dir
    info = json.loads((run_dir / "run.json").read_text())
    assert info["git_sha"] and info["torch"] and info["seed"] == tiny_cfg.seed
    for stage in STAGES:
        d = run_dir / stage
        for f in ("config.yaml", "metrics.json", "done.json"):
            assert (d / f).is_file(), f"{stage}/{f} missing"
        assert load_config(d / "config.yaml") == tiny_cfg
    assert len(list((run_dir / "cams" / "cams").glob("*.npz"))) == 24
    assert len(list((run_dir / "masks" / "masks").glob("*.png"))) == 24
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    seg = metrics["segmentation"]["segmentation"]
    assert 0.0 <= seg["mIoU"] <= 1.0 and "dataset-pooled" in seg["convention"]
    assert [r["threshold"] for r in metrics["cams"]["sweep"]] == [0.2, 0.4, 0.6]
    assert 0 < metrics["cams"]["threshold_used"] < 1

    # Second run: everything up to date, and the masks settings are not checked again (no mask maker is built, so
    # a finished run does not need, say, pydensecrf installed to go on).
    import weakseg.masks.makers as makers

    def no_maker(cfg):
        raise AssertionError("a mask maker was built for a finished masks stage")

    with monkeypatch.context() as m:
        m.setattr(makers, "build_mask_maker", no_maker)
        assert _statuses(run_pipeline(tiny_cfg)) == {s: "skipped" for s in STAGES}
    # --from masks redoes masks and what follows only.
    st = _statuses(run_pipeline(tiny_cfg, from_stage="masks"))
    assert st == {"train-cls": "skipped", "cams": "skipped", "masks": "ran", "train-seg": "ran", "evaluate": "ran"}


def test_config_change_reruns_downstream_only(tiny_cfg, tiny_overrides):
    run_pipeline(tiny_cfg)
    changed = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + ["masks.bg_threshold=0.9"])
    st = _statuses(run_pipeline(changed, dry_run=True))  # downstream of a stage to redo: up to date only for now
    assert st == {"train-cls": "skipped", "cams": "skipped", "masks": "would run", "train-seg": "may run",
                  "evaluate": "may run"}
    st = _statuses(run_pipeline(changed))
    assert st == {"train-cls": "skipped", "cams": "skipped", "masks": "ran", "train-seg": "ran", "evaluate": "ran"}
    assert json.loads((changed.run_dir / "masks" / "metrics.json").read_text())["bg_threshold"] == 0.9


def test_segmentation_encoder_can_start_from_the_runs_classifier(tiny_cfg, tiny_overrides):
    run_pipeline(tiny_cfg)
    changed = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + ["train_seg.encoder_from_classifier=true"])
    st = _statuses(run_pipeline(changed))
    assert st == {"train-cls": "skipped", "cams": "skipped", "masks": "skipped", "train-seg": "ran", "evaluate": "ran"}
    metrics = json.loads((changed.run_dir / "train-seg" / "metrics.json").read_text())
    assert metrics["encoder_init"].endswith("train-cls/model.pt")
    assert metrics["encoder_init_tensors"] == metrics["encoder_tensors"] > 0


def test_frozen_encoder_levels_keep_the_classifiers_stem_through_training(tiny_overrides):
    from weakseg.train.loop import load_checkpoint

    changed = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + [
        "train_seg.encoder_from_classifier=true", "train_seg.frozen_encoder_levels=1"])
    run_pipeline(changed)
    metrics = json.loads((changed.run_dir / "train-seg" / "metrics.json").read_text())
    assert metrics["frozen_encoder_tensors"] > 0
    classifier = load_checkpoint(changed.run_dir / "train-cls" / "model.pt")["model"]
    segmenter = load_checkpoint(changed.run_dir / "train-seg" / "model.pt")["model"]
    for key in ("conv_stem.weight", "blocks.0.0.conv.weight", "blocks.2.0.conv_exp.weight"):
        same = torch.equal(segmenter[f"encoder.{key}"], classifier[f"backbone.model.{key}"])
        assert same == key.startswith(("conv_stem", "blocks.0")), key  # level 1 frozen, level 3 trained
    bad = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + ["train_seg.frozen_encoder_levels=9"])
    with pytest.raises(ConfigError, match=r"train_seg\.frozen_encoder_levels=9: can freeze 0 to 5"):
        run_pipeline(bad)


@pytest.mark.parametrize("override, message", [
    ("train_cls.frozen_backbone_levels=-1", r"train_cls\.frozen_backbone_levels=-1: .* 0 or more"),
    ("train_seg.frozen_encoder_levels=-2", r"train_seg\.frozen_encoder_levels=-2: .* 0 or more"),
    ("masks.affinity_seed_scale=0", r"masks\.affinity_seed_scale must be in \(0, 1\], got 0"),
    ("masks.method=affinity_crf masks.affinity_background=flat", r"affinity_background must be plane or walked"),
    ("masks.method=walk", r"unknown mask maker 'walk'; valid names: .*affinity_crf"),
    ("train_seg.unseen_folds=4 train_seg.unseen_fold=4", r"train_seg\.unseen_folds=4 / unseen_fold=4: .* 0\.\.folds-1"),
])
def test_bad_settings_of_a_later_stage_are_refused_before_the_first_stage_runs(tiny_overrides, override, message):
    cfg = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + ["masks.method=affinity_crf"] + override.split())
    with pytest.raises(ValueError, match=message):
        run_pipeline(cfg)
    assert not (cfg.run_dir / "train-cls").exists()
    run_stages(cfg, ["evaluate"], dry_run=True)  # a stage that does not read the setting is not refused


def test_prior_match_calibration_is_fitted_by_train_seg_and_used_by_evaluate_and_predict(tiny_cfg, tiny_overrides):
    from weakseg.predict import load_predictor

    run_pipeline(tiny_cfg)
    changed = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + ["train_seg.calibration=prior_match"])
    st = _statuses(run_pipeline(changed))
    assert st == {"train-cls": "skipped", "cams": "skipped", "masks": "skipped", "train-seg": "ran", "evaluate": "ran"}
    seg_dir = changed.run_dir / "train-seg"
    record = json.loads((seg_dir / "calibration.json").read_text())
    assert len(record["class_weights"]) == len(record["target_shares"]) == 6 and record["class_weights"][0] == 1.0
    assert record["images"] == 6 and "held-out" in record["fitted_on"]  # 25 % of the 24 demo images
    assert json.loads((seg_dir / "metrics.json").read_text())["calibration"] == "prior_match"
    predictor, _ = load_predictor(changed.run_dir, "cpu")
    assert predictor.class_weights.tolist() == pytest.approx(record["class_weights"])
    (seg_dir / "calibration.json").unlink()  # a product of the stage: its loss is noticed and the stage redone
    assert _statuses(run_pipeline(changed))["train-seg"] == "ran"


def test_inference_crf_rescores_a_trained_run_and_predict_uses_it(tiny_cfg, tiny_overrides, tmp_path):
    pytest.importorskip("pydensecrf.densecrf")
    from weakseg.predict import load_predictor

    run_pipeline(tiny_cfg)
    assert load_predictor(tiny_cfg.run_dir, "cpu")[0].crf is None
    changed = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + ["train_seg.infer_crf=true"])
    st = _statuses(run_pipeline(changed))
    assert st == {"train-cls": "skipped", "cams": "skipped", "masks": "skipped", "train-seg": "skipped",
                  "evaluate": "ran"}
    predictor, _ = load_predictor(changed.run_dir, "cpu")  # train-seg's config predates the key: evaluate's has it
    assert predictor.crf is not None and predictor.crf.bilateral_compat == 4.0
    scored = json.loads((changed.run_dir / "evaluate" / "metrics.json").read_text())
    # the CRF in 2 worker processes: a speed setting, so evaluate is up to date; forced, it scores the same
    parallel = load_config(ROOT / "configs" / "demo.yaml",
                           tiny_overrides + ["train_seg.infer_crf=true", "train_seg.infer_crf_workers=2"])
    assert _statuses(run_pipeline(parallel))["evaluate"] == "skipped"
    run_stages(parallel, ["evaluate"], force={"evaluate"})
    rescored = json.loads((changed.run_dir / "evaluate" / "metrics.json").read_text())
    assert rescored["segmentation"]["segmentation"] == scored["segmentation"]["segmentation"]
    assert rescored["segmentation"]["images"] == 8 and "per_image_mIoU" in scored["segmentation"]["segmentation"]
    assert load_predictor(changed.run_dir, "cpu", crf_workers=3)[0].crf_workers == 3
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for stem, (h, w) in {"a": (30, 40), "b": (53, 17), "c": (32, 32)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{stem}.png")
    labels = {}
    for workers in ("0", "2"):
        out = tmp_path / f"pred{workers}"
        assert main(["predict", "--run", str(changed.run_dir), "--images", str(images), "--out", str(out),
                     "--crf-workers", workers]) == 0
        labels[workers] = {p.name: np.array(Image.open(p)) for p in sorted(out.iterdir())}
    assert list(labels["0"]) == ["a.png", "b.png", "c.png"]
    for name, want in labels["0"].items():
        np.testing.assert_array_equal(labels["2"][name], want)


# the masks stage's affinity head, tiny: what train_seg.infer_affinity_walk walks on
TINY_AFFINITY = ["masks.method=affinity", "masks.affinity_epochs=1", "masks.affinity_image_size=64",
                 "masks.affinity_radius=2", "masks.affinity_iterations=4"]


@pytest.mark.parametrize("binary", [False, True])  # binary: the classifier's 5 classes, the segmentation's pet / bg
def test_affinity_walk_rescores_a_trained_run_and_predict_uses_it(tiny_overrides, tmp_path, binary):
    from weakseg.data.imageio import read_image
    from weakseg.predict import load_predictor
    from weakseg.runs import StageError

    affinity = tiny_overrides + TINY_AFFINITY + [f"data.binary_masks={str(binary).lower()}"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", affinity)
    run_pipeline(cfg)
    plain, _ = load_predictor(cfg.run_dir, "cpu")
    assert plain.walk is None
    walked = load_config(ROOT / "configs" / "demo.yaml", affinity + ["train_seg.infer_affinity_walk=8"])
    assert _statuses(run_pipeline(walked)) == {"train-cls": "skipped", "cams": "skipped", "masks": "skipped",
                                               "train-seg": "skipped", "evaluate": "ran"}
    predictor, _ = load_predictor(cfg.run_dir, "cpu")  # train-seg's config has no walk: evaluate's has it
    assert (predictor.walk.iterations, predictor.walk.image_size, predictor.walk.radius) == (8, 64, 2)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(2)
    for stem, (h, w) in {"a": (30, 40), "b": (53, 17)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{stem}.png")
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(cfg.run_dir), "--images", str(images), "--out", str(out)]) == 0
    assert predictor.model(torch.zeros(1, 3, 32, 32)).shape[1] == (2 if binary else 6)
    for stem in ("a", "b"):
        picture = read_image(images / f"{stem}.png")
        np.testing.assert_array_equal(np.array(Image.open(out / f"{stem}.png")), predictor.labels(picture))
        moved = predictor.network_probabilities(picture) - plain.network_probabilities(picture)
        assert moved.abs().max() > 1e-3
    (cfg.run_dir / "masks" / "affinity.pt").rename(tmp_path / "affinity.pt")
    with pytest.raises(StageError, match=r"masks/affinity\.pt: train_seg\.infer_affinity_walk needs this file"):
        load_predictor(cfg.run_dir, "cpu")


@pytest.mark.parametrize("override", ["masks.method=crf train_seg.infer_affinity_walk=4",
                                      "masks.method=affinity train_seg.infer_affinity_walk=-1"])
def test_a_walk_without_an_affinity_head_or_with_negative_steps_is_refused_before_training(tiny_overrides, override):
    cfg = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + override.split())
    with pytest.raises(ConfigError, match=r"train_seg\.infer_affinity_walk=-?4?1?: .* masks\.method affinity or "):
        run_pipeline(cfg)
    assert not (cfg.run_dir / "train-cls").exists()


def expected_relabel(predictor, ds, i: int, confidence: float) -> np.ndarray:
    """What a self-training relabel should write for image i: the predictor's labels over background + the image's
    labelled classes, 255 where the top probability is below `confidence`."""
    from weakseg.models.inference import present_classes

    top, labels = predictor.final_probabilities(ds.image(i), present_classes(ds.labels(i) > 0.5)).max(0)
    return np.where(top.numpy() < confidence, 255, labels.numpy()).astype(np.uint8)


def test_self_training_relabels_with_the_models_own_gated_predictions_and_resumes(tiny_cfg, tiny_overrides):
    import torch

    from weakseg.data import seg_dataset
    from weakseg.io import load_label_png
    from weakseg.models.inference import SegPredictor, present_classes
    from weakseg.models.segmentation import build_seg_model
    from weakseg.train.loop import load_checkpoint

    run_pipeline(tiny_cfg)
    changed = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + [
        "train_seg.self_training_rounds=1", "train_seg.self_training_confidence=0.5"])
    st = _statuses(run_pipeline(changed))
    assert st == {"train-cls": "skipped", "cams": "skipped", "masks": "skipped", "train-seg": "ran", "evaluate": "ran"}
    seg_dir = changed.run_dir / "train-seg"
    metrics = json.loads((seg_dir / "metrics.json").read_text())
    rounds = metrics["self_training"]
    assert [r["round"] for r in rounds] == [0, 1] and "round 1's relabelled masks" in metrics["selection"]
    folder = seg_dir / "self_training" / "round1_masks"
    ds = seg_dataset(changed.data, changed.data.train_split)
    pngs = {p.stem: load_label_png(p) for p in folder.glob("*.png")}
    assert sorted(pngs) == sorted(ds.ids)  # every training and held-out image, none from pixel GT
    ignored = sum(int((m == 255).sum()) for m in pngs.values()) / sum(m.size for m in pngs.values())
    assert rounds[0]["relabel"]["images"] == 24 and rounds[0]["relabel"]["ignored_fraction"] == pytest.approx(ignored)
    assert 0 < ignored < 1
    model = build_seg_model(changed.train_seg.model, ds.num_classes, pretrained=False)
    model.load_state_dict(load_checkpoint(seg_dir / "self_training" / "round0" / "model.pt")["model"])
    predictor = SegPredictor.from_config(model.eval(), changed.train_seg)
    for i in range(len(ds)):
        present = present_classes(ds.labels(i) > 0.5)
        assert set(np.unique(pngs[ds.ids[i]])) - {255} <= set(np.flatnonzero(present))
    np.testing.assert_array_equal(pngs[ds.ids[0]], expected_relabel(predictor, ds, 0, confidence=0.5))
    final = load_checkpoint(seg_dir / "model.pt")["model"]
    assert any(not torch.equal(final[k], v) for k, v in model.state_dict().items())

    # killed as the last round began: the earlier round and its labels are kept, only the last round is redone
    kept = {p: p.stat().st_mtime_ns for p in [seg_dir / "self_training" / "round0" / "model.pt", *folder.glob("*.png")]}
    for product in ("done.json", "model.pt", "checkpoints/last.pt"):
        (seg_dir / product).unlink()
    assert _statuses(run_pipeline(changed))["train-seg"] == "ran"
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert json.loads((seg_dir / "metrics.json").read_text())["self_training"] == rounds


def test_self_training_relabels_through_the_affinity_walk_when_evaluate_walks(tiny_overrides):
    from weakseg.data import seg_dataset
    from weakseg.io import load_label_png
    from weakseg.models.inference import SegPredictor
    from weakseg.train.segmentation import load_trained_seg_model, probability_walk_for

    cfg = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + TINY_AFFINITY + [
        "train_seg.infer_affinity_walk=8", "train_seg.self_training_rounds=1", "train_seg.self_training_confidence=0.5"])
    run_pipeline(cfg)
    seg_dir = cfg.run_dir / "train-seg"
    ds = seg_dataset(cfg.data, cfg.data.train_split)
    model = load_trained_seg_model(cfg.train_seg.model, ds.num_classes, seg_dir / "self_training" / "round0" / "model.pt")
    walked = SegPredictor.from_config(model.eval(), cfg.train_seg, walk=probability_walk_for(cfg, cfg.run_dir, "cpu"))
    plain = SegPredictor.from_config(model, cfg.train_seg)

    walk_mattered = False
    for i in range(len(ds)):
        relabelled = load_label_png(seg_dir / "self_training" / "round1_masks" / f"{ds.ids[i]}.png")
        np.testing.assert_array_equal(relabelled, expected_relabel(walked, ds, i, confidence=0.5))
        walk_mattered |= not np.array_equal(relabelled, expected_relabel(plain, ds, i, confidence=0.5))
    assert walk_mattered  # the walk changed some image's labels, so the equality above tells the two apart


def test_a_later_self_training_round_can_fine_tune_the_previous_model_for_its_own_epochs(tiny_overrides, monkeypatch):
    import torch

    from weakseg.train import segmentation
    from weakseg.train.loop import load_checkpoint

    calls = []  # (parameters at the start of each round's fit, its epochs)
    real_fit = segmentation.fit

    def spy(ctx, model, train_set, loss_fn, optimizer, epochs, *args, **kwargs):
        calls.append(({k: v.detach().clone() for k, v in model.named_parameters()}, epochs))
        return real_fit(ctx, model, train_set, loss_fn, optimizer, epochs, *args, **kwargs)

    monkeypatch.setattr(segmentation, "fit", spy)
    cfg = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + [
        "train_seg.self_training_rounds=1", "train_seg.self_training_confidence=0.5",
        "train_seg.self_training_init=previous", "train_seg.self_training_epochs=1"])
    run_pipeline(cfg)
    seg_dir = cfg.run_dir / "train-seg"
    round0 = load_checkpoint(seg_dir / "self_training" / "round0" / "model.pt")["model"]
    (start0, epochs0), (start1, epochs1) = calls
    assert (epochs0, epochs1) == (cfg.train_seg.epochs, 1)
    for name, value in start1.items():  # round 1 starts from round 0's selected model, not from a fresh one
        torch.testing.assert_close(value, round0[name].float(), rtol=0, atol=0)
    assert any(not torch.equal(start0[k], start1[k]) for k in start1)
    metrics = json.loads((seg_dir / "metrics.json").read_text())
    assert metrics["round_init"] == str(seg_dir / "self_training" / "round0" / "model.pt")
    assert metrics["self_training_init"] == "previous" and metrics["self_training_epochs"] == 1
    assert metrics["best_epoch"] == 1
    with pytest.raises(ValueError, match="self_training_init must be fresh or previous"):
        run_pipeline(load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + [
            "train_seg.self_training_rounds=1", "train_seg.self_training_init=last"]))


def test_masked_folds_are_disjoint_seeded_and_cover_every_masked_image():
    from weakseg.data import DemoDataset, Subset, masked_fold

    ds = Subset(DemoDataset("train", 30, 0, 32), list(range(30)))
    ds.has_mask = lambda i: i % 3 != 0  # 20 masked images
    folds = [masked_fold(ds, 3, f, seed=0) for f in range(3)]
    assert sorted(sum(folds, [])) == [i for i in range(30) if i % 3 != 0]
    assert sorted(len(f) for f in folds) == [6, 7, 7]
    assert masked_fold(ds, 3, 1, seed=0) == folds[1] != masked_fold(ds, 3, 1, seed=1)
    assert masked_fold(ds, 1, 0, seed=0) == sorted(sum(folds, []))
    with pytest.raises(ValueError, match="only 20 have one"):
        masked_fold(ds, 21, 0, seed=0)


def test_unseen_fold_is_kept_out_of_segmentation_training_and_scored_alone(tiny_overrides, monkeypatch):
    import weakseg.train.segmentation as train_seg
    from weakseg.data import masked_fold, seg_dataset, train_val_indices
    from weakseg.runs import StageError

    seen: list[int] = []
    real_dataset = train_seg.SegmentationDataset

    def spy(ds, indices, *args, **kwargs):
        seen.extend(indices)
        return real_dataset(ds, indices, *args, **kwargs)

    monkeypatch.setattr(train_seg, "SegmentationDataset", spy)
    cfg = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + ["train_seg.unseen_folds=4",
                                                                         "train_seg.unseen_fold=1"])
    run_pipeline(cfg)
    ds = seg_dataset(cfg.data, cfg.data.train_split)
    unseen = masked_fold(ds, 4, 1, cfg.seed)
    assert len(unseen) == 6 and seen and not set(seen) & set(unseen)  # neither trained on nor used for selection
    train_idx, _ = train_val_indices(len(ds), cfg.data.val_fraction, cfg.seed)
    seg_metrics = json.loads((cfg.run_dir / "train-seg" / "metrics.json").read_text())
    assert seg_metrics["train_images"] == len(set(train_idx) - set(unseen)) and seg_metrics["unseen_images"] == 6
    record = json.loads((cfg.run_dir / "train-seg" / "unseen.json").read_text())
    assert record["ids"] == [ds.ids[i] for i in unseen] and (record["folds"], record["fold"]) == (4, 1)

    metrics = json.loads((cfg.run_dir / "evaluate" / "metrics.json").read_text())
    assert "segmentation_train" not in metrics  # the images it trained on are not scored as if unseen
    result = metrics["segmentation_unseen"]
    assert result["images"] == 6 and "never saw: fold 1 of 4" in result["split"]
    matrix = np.array(result["segmentation"]["confusion_matrix"])
    gt = [ds.mask(i) for i in unseen]
    assert matrix.sum() == result["segmentation"]["pixels"] == sum(int((m != 255).sum()) for m in gt)
    assert matrix.sum(1).tolist() == [sum(int((m == c).sum()) for m in gt) for c in range(ds.num_classes)]
    assert any("never saw" in row["what"] for row in metrics["summary"])
    too_many = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + ["train_seg.unseen_folds=30"])
    with pytest.raises(ConfigError, match=r"unseen_folds=30 / unseen_fold=0: .* only 24 have one"):
        run_stages(too_many, ["train-seg"])
    everything = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + ["train_seg.unseen_folds=1"])
    with pytest.raises(StageError, match="leaves no training image: all 24"):  # every demo image has a mask
        run_stages(everything, ["train-seg"])


def test_mask_eval_split_restricts_cam_and_mask_scoring_to_its_images(tiny_cfg, tiny_overrides):
    import torch

    from weakseg.evaluate import stage as evaluate
    from weakseg.runs import StageContext, StageError

    run_pipeline(tiny_cfg)
    for split, expected in (("train", 24), ("test", None)):
        cfg = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + [f"data.mask_eval_split={split}",
                                                                            "evaluate.segmentation_on_train=false"])
        ctx = StageContext(cfg, "evaluate", torch.device("cpu"))
        if expected is None:  # the test images have no CAMs: a clear error, not an empty score
            with pytest.raises(StageError, match="mask_eval_split='test'"):
                evaluate.run(ctx)
        else:
            assert evaluate.run(ctx)["cams"]["images"] == expected


def test_corrupt_or_missing_output_is_redone(tiny_cfg):
    run_stages(tiny_cfg, ["train-cls", "cams"])
    cam_files = sorted((tiny_cfg.run_dir / "cams" / "cams").glob("*.npz"))
    cam_files[0].write_bytes(b"garbage")
    cam_files[1].unlink()
    st = _statuses(run_stages(tiny_cfg, ["train-cls", "cams"]))
    assert st == {"train-cls": "skipped", "cams": "ran"}
    assert len(list((tiny_cfg.run_dir / "cams" / "cams").glob("*.npz"))) == 24
    np.load(cam_files[0])  # valid again


def test_stage_alone_needs_upstream(tiny_cfg):
    with pytest.raises(RuntimeError, match="train-cls"):
        run_stages(tiny_cfg, ["cams"])


def test_predict_writes_palette_png_per_image(tiny_cfg, tiny_overrides, tmp_path):
    run_pipeline(tiny_cfg)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a": (40, 30), "b": (17, 53), "c": (32, 32)}
    for stem, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{stem}.jpg")
    Image.fromarray(rng.integers(0, 255, (9, 11), dtype=np.uint8), mode="L").save(images / "gray.png")
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(tiny_cfg.run_dir), "--images", str(images), "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["a.png", "b.png", "c.png", "gray.png"]
    for stem, (w, h) in {**sizes, "gray": (11, 9)}.items():
        with Image.open(out / f"{stem}.png") as im:
            assert im.mode == "P" and im.size == (w, h)
            assert set(np.unique(np.array(im))) <= set(range(6))
    # The same model exported to ONNX gives the same logits (the CLI fails on a parity miss).
    assert main(["export", "--run", str(tiny_cfg.run_dir), "--out", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 1000


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["run", str(ROOT / "configs" / "demo.yaml"), "train_cls.epohcs=1"]) == 2
    assert "valid keys" in capsys.readouterr().err


def test_dry_run_validates_without_writing(tiny_cfg):
    results = run_pipeline(tiny_cfg, dry_run=True)
    assert _statuses(results) == {s: "would run" for s in STAGES}
    assert not tiny_cfg.run_dir.exists()


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_completed_stages(tiny_overrides, tmp_path):
    """SIGKILL `weakseg run` once train-cls has completed and cams are being written; rerun finishes."""
    overrides = [o for o in tiny_overrides if not o.startswith("data.demo_train")] + ["data.demo_train=200"]
    cmd = [sys.executable, "-m", "weakseg.cli", "run", str(ROOT / "configs" / "demo.yaml"), *overrides,
           "cams.batch_size=1", "cams.scales=[1.0,1.5,2.0]"]
    run_dir = tmp_path / "runs" / "tiny"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        if len(list((run_dir / "cams" / "cams").glob("*.npz"))) >= 5 if (run_dir / "cams" / "cams").exists() else False:
            break
        if proc.poll() is not None:
            pytest.fail("run finished before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run_dir / "train-cls" / "done.json").exists()
    assert not (run_dir / "cams" / "done.json").exists()
    cls_marker = (run_dir / "train-cls" / "done.json").read_text()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[train-cls] skipped" in out.stdout + out.stderr
    assert (run_dir / "train-cls" / "done.json").read_text() == cls_marker
    for stage in STAGES:
        assert (run_dir / stage / "done.json").exists()


def test_cams_of_a_threshold_free_mask_maker_are_scored_at_the_label_free_threshold(tiny_overrides):
    from weakseg.masks.makers import otsu_threshold
    from weakseg.masks.stage import cam_histogram

    cfg = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides + [
        "masks.method=refiner", "masks.refiner_epochs=1", "masks.refiner_batch_size=8", "masks.refiner_image_size=32",
        "masks.refiner_size=small", "masks.refiner_window=20", "train_seg.epochs=1",
        "evaluate.segmentation_on_train=false"])
    run_pipeline(cfg)
    masks = json.loads((cfg.run_dir / "masks" / "metrics.json").read_text())
    cams = json.loads((cfg.run_dir / "evaluate" / "metrics.json").read_text())["cams"]
    ids = [p.stem for p in (cfg.run_dir / "cams" / "cams").glob("*.npz")]
    assert masks["bg_threshold"] is None and cams["threshold_used"] != 0.5  # not the old fixed default
    assert cams["threshold_used"] == otsu_threshold(cam_histogram(cfg.run_dir / "cams" / "cams", ids))
