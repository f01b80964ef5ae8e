"""Mask makers beyond the threshold: dense CRF, the CNN-decoder refiner, class-agnostic + specific fusion."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from weakseg import dist
from weakseg.config import MaskCfg, load_config
from weakseg.io import IGNORE_INDEX, load_label_png, save_cam, write_json
from weakseg.masks.crf import CrfUnavailable
from weakseg.masks.fusion import fuse_agnostic_specific, fused_scores, resolve_cams_dir
from weakseg.masks.makers import MAKERS, build_mask_maker
from weakseg.masks.refiner import (DECODER_WIDTHS, RefinerDecoder, RefinerPairs, loss_threshold_labels,
                                   normalised_loss_maps, refiner_forward, train_refiner)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---------------------------------------------------------------- dense CRF


def two_colour_image(h: int = 40, w: int = 40, edge: int = 24, seed: int = 0) -> np.ndarray:
    """Red left of column `edge`, green right of it, with mild noise: (H, W, 3) uint8."""
    image = np.zeros((h, w, 3), np.int64)
    image[:, :edge] = (200, 40, 40)
    image[:, edge:] = (40, 160, 60)
    noise = np.random.default_rng(seed).integers(-10, 11, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def blurry_cam(h: int = 40, w: int = 40, centre: float = 18.0, width: float = 3.0) -> np.ndarray:
    """A soft object map falling off around column `centre`: (1, H, W) float32 in [0, 1]."""
    x = np.arange(w)[None, :].repeat(h, 0)
    return (1 / (1 + np.exp((x - centre) / width)))[None].astype(np.float32)


@pytest.mark.crf
@pytest.mark.parametrize("unary", ["softmax", "labels"])
def test_crf_snaps_a_blurry_mask_to_the_colour_edge(unary):
    pytest.importorskip("pydensecrf.densecrf")
    image, cams = two_colour_image(edge=24), blurry_cam(centre=18.0)
    truth = np.arange(40)[None, :].repeat(40, 0) < 24
    threshold = build_mask_maker(MaskCfg(method="threshold"))
    threshold.bg_threshold = 0.5
    crf = build_mask_maker(MaskCfg(method="crf", crf_unary=unary))
    crf.bg_threshold = 0.5
    before = ((threshold.make(cams, np.array([3]), image) == 3) == truth).mean()
    after_labels = crf.make(cams, np.array([3]), image)
    after = ((after_labels == 3) == truth).mean()
    assert before < 0.9  # the CAM boundary is 6 px off
    assert after > 0.98
    assert set(np.unique(after_labels)) <= {0, 3}  # background + the image's class only


@pytest.mark.crf
def test_crf_labels_are_background_plus_the_image_classes():
    pytest.importorskip("pydensecrf.densecrf")
    image = two_colour_image()
    cams = np.concatenate([blurry_cam(centre=24), 1 - blurry_cam(centre=24)])  # two classes, left / right
    crf = build_mask_maker(MaskCfg(method="crf"))
    crf.bg_threshold = 0.3
    out = crf.make(cams, np.array([7, 12]), image)
    assert set(np.unique(out)) <= {0, 7, 12}
    assert (out[:, :20] == 7).mean() > 0.95 and (out[:, 28:] == 12).mean() > 0.95


@pytest.mark.crf
@pytest.mark.parametrize("unary", ["softmax", "labels"])
def test_the_ignore_band_passes_share_one_crf_and_equal_separate_crfs(unary):
    """The band's two passes reuse one CRF's pairwise kernels: labels identical to two independent CRFs."""
    pytest.importorskip("pydensecrf.densecrf")
    from weakseg.masks.crf import background_softmax, crf_from_labels, crf_from_probabilities

    # four 10-column stripes (red, grey, blue, green): class 7 sure, nothing, class 12 unsure, class 12 sure
    image = np.zeros((40, 40, 3), np.int64)
    for stripe, colour in enumerate([(200, 40, 40), (128, 128, 128), (40, 40, 200), (40, 160, 60)]):
        image[:, 10 * stripe:10 * stripe + 10] = colour
    image = np.clip(image + np.random.default_rng(0).integers(-10, 11, image.shape), 0, 255).astype(np.uint8)
    cams = np.zeros((2, 40, 40), np.float32)
    cams[0, :, :10], cams[:, :, 10:20], cams[1, :, 20:30], cams[1, :, 30:] = 0.9, 0.05, 0.35, 0.9
    cfg = MaskCfg(method="crf", crf_unary=unary, crf_softmax_temperature=0.25, ignore_low=0.2, ignore_high=0.5)
    maker = build_mask_maker(cfg)
    band = maker.make(cams, np.array([7, 12]), image)

    def separate(bg_value):
        if unary == "softmax":
            marginals = crf_from_probabilities(image, background_softmax(cams, bg_value, 0.25), maker.params)
        else:
            index = np.where(cams.max(0) >= bg_value, cams.argmax(0) + 1, 0)
            marginals = crf_from_labels(image, index, 3, cfg.crf_gt_prob, maker.params)
        return np.array([0, 7, 12])[marginals.argmax(0)]

    at_high, at_low = separate(0.5), separate(0.2)
    assert np.array_equal(band, np.where(at_high > 0, at_high, np.where(at_low == 0, 0, IGNORE_INDEX)))
    assert band[20].tolist() == [7] * 10 + [0] * 10 + [IGNORE_INDEX] * 10 + [12] * 10


@pytest.mark.crf
def test_crf_refuses_a_normalised_image():
    pytest.importorskip("pydensecrf.densecrf")
    normalised = (two_colour_image().astype(np.float32) / 255 - 0.45) / 0.22
    crf = build_mask_maker(MaskCfg(method="crf"))
    with pytest.raises(ValueError, match="uint8"):
        crf.make(blurry_cam(), np.array([1]), normalised)


def test_missing_pydensecrf_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(CrfUnavailable, match=r'pip install "weakseg\[crf\]"'):
        build_mask_maker(MaskCfg(method="crf"))  # fails when built, before any image is processed


def test_unknown_maker_lists_the_valid_names():
    with pytest.raises(ValueError, match="crf, fusion, fusion_crf, refiner, threshold"):
        build_mask_maker(MaskCfg(method="nope"))
    assert {"threshold", "crf", "refiner", "fusion", "fusion_crf"} <= set(MAKERS)


# ---------------------------------------------------------------- fusion


def test_fusion_takes_where_from_the_agnostic_map_and_which_from_the_class_cams():
    foreground = np.array([[0.9, 0.9, 0.1, 0.45]], dtype=np.float32)
    cams = np.array([[[0.8, 0.1, 0.9, 0.9]],   # class 4
                     [[0.2, 0.7, 0.0, 0.1]]], dtype=np.float32)  # class 9
    out = fuse_agnostic_specific(foreground, cams, np.array([4, 9]), fg_threshold=0.5)
    assert out.tolist() == [[4, 9, 0, 0]]  # high class-4 CAM outside the foreground stays background
    banded = fuse_agnostic_specific(foreground, cams, np.array([4, 9]), 0.5, ignore_low=0.4, ignore_high=0.6)
    assert banded.tolist() == [[4, 9, 0, IGNORE_INDEX]]
    assert fuse_agnostic_specific(foreground, cams[:0], np.array([], dtype=np.int64), 0.5).tolist() == [[0, 0, 0, 0]]


def test_fused_scores_threshold_to_the_fusion_labels():
    rng = np.random.default_rng(0)
    foreground = rng.random((9, 11)).astype(np.float32)
    cams = rng.random((3, 9, 11)).astype(np.float32)
    cams[:, 0, 0] = 0.0  # no CAM evidence at all: the first class, as argmax gives
    classes = np.array([2, 5, 7])
    scores = fused_scores(foreground, cams)
    np.testing.assert_allclose(scores.max(axis=0), foreground, rtol=1e-5)
    for t in (0.2, 0.5, 0.8):
        top = scores.max(axis=0)
        via_scores = np.where(top > t, classes[scores.argmax(axis=0)], 0)
        assert (via_scores == fuse_agnostic_specific(foreground, cams, classes, t)).all()


def test_fusion_crf_snaps_the_fused_mask_to_the_colour_edge():
    pytest.importorskip("pydensecrf.densecrf")
    image = two_colour_image(edge=24)
    foreground = np.zeros((40, 40), np.float32)
    foreground[:, :30] = 0.9  # the agnostic map spills 6 columns past the red object's edge
    cams = np.stack([np.full((40, 40), 0.6, np.float32), np.full((40, 40), 0.3, np.float32)])
    maker = build_mask_maker(MaskCfg(method="fusion_crf", crf_softmax_temperature=0.1))
    maker.bg_threshold = 0.5
    fused = fuse_agnostic_specific(foreground, cams, np.array([3, 8]), 0.5)
    out = maker.make(cams, np.array([3, 8]), image, foreground=foreground)
    assert (fused[:, 24:30] == 3).all()  # the fusion alone keeps the spill
    assert (out[:, :20] == 3).all() and (out[:, 28:] == 0).all() and set(np.unique(out)) <= {0, 3}
    assert (out[:, 24:30] == 0).mean() > 0.8
    with pytest.raises(ValueError, match="softmax"):
        build_mask_maker(MaskCfg(method="fusion_crf", crf_unary="labels"))


def test_the_refiner_refuses_an_ignore_band_instead_of_dropping_it():
    with pytest.raises(ValueError, match="masks.method=refiner writes no ignore band"):
        build_mask_maker(MaskCfg(method="refiner", ignore_low=0.2, ignore_high=0.4))
    build_mask_maker(MaskCfg(method="refiner"))  # unset band: fine
    for banded in ("threshold", "fusion"):
        assert build_mask_maker(MaskCfg(method=banded, ignore_low=0.2, ignore_high=0.4)).writes_ignore_band


def three_stripe_scene() -> tuple[np.ndarray, np.ndarray]:
    """Red | grey | green stripes (columns 0-15, 16-27, 28-39) and a CAM that is sure on red (0.9), unsure on
    grey (0.3) and off on green (0.02), with noise: image (40, 40, 3) uint8, cams (1, 40, 40) float32."""
    image = two_colour_image(edge=28)
    image[:, 16:28] = (120, 120, 120)
    cam = np.zeros((40, 40), np.float32)
    cam[:, :16], cam[:, 16:28], cam[:, 28:] = 0.9, 0.3, 0.02
    cam += np.random.default_rng(1).uniform(-0.05, 0.05, cam.shape).astype(np.float32)
    return image, np.clip(cam, 0, 1)[None]


@pytest.mark.crf
@pytest.mark.parametrize("unary", ["softmax", "labels"])
def test_crf_ignore_band_keeps_the_confident_regions_and_ignores_the_unsure_one(unary):
    pytest.importorskip("pydensecrf.densecrf")
    image, cams = three_stripe_scene()
    banded = build_mask_maker(MaskCfg(method="crf", crf_unary=unary, crf_softmax_temperature=0.1,
                                      ignore_low=0.1, ignore_high=0.6))
    out = banded.make(cams, np.array([5]), image)
    assert (out[:, :16] == 5).all() and (out[:, 16:28] == IGNORE_INDEX).all() and (out[:, 28:] == 0).all()
    single = build_mask_maker(MaskCfg(method="crf", crf_unary=unary, crf_softmax_temperature=0.1))
    single.bg_threshold = 0.37  # one pass at a threshold inside the band decides the grey stripe: background
    assert (single.make(cams, np.array([5]), image)[:, 16:28] == 0).all()


@pytest.mark.crf
def test_fusion_crf_ignore_band_acts_on_the_foreground_map():
    pytest.importorskip("pydensecrf.densecrf")
    image, foreground = three_stripe_scene()
    cams = np.stack([np.full((40, 40), 0.2, np.float32), np.full((40, 40), 0.7, np.float32)])  # class 8 wins
    maker = build_mask_maker(MaskCfg(method="fusion_crf", crf_softmax_temperature=0.1, ignore_low=0.1,
                                     ignore_high=0.6))
    out = maker.make(cams, np.array([3, 8]), image, foreground=foreground[0])
    assert (out[:, :16] == 8).all() and (out[:, 16:28] == IGNORE_INDEX).all() and (out[:, 28:] == 0).all()


def test_fusion_maker_needs_the_agnostic_map():
    maker = build_mask_maker(MaskCfg(method="fusion"))
    maker.bg_threshold = 0.5
    with pytest.raises(ValueError, match="foreground"):
        maker.make(np.zeros((1, 2, 2), np.float32), np.array([1]), np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="agnostic_cams_run"):
        resolve_cams_dir("", "runs")


# ---------------------------------------------------------------- refiner


@pytest.mark.parametrize("size", list(DECODER_WIDTHS))
def test_refiner_decoder_upsamples_by_16(size):
    decoder = RefinerDecoder(in_channels=12, num_outputs=3, size=size)
    assert decoder(torch.randn(2, 12, 3, 5)).shape == (2, 3, 48, 80)
    has_bn3 = isinstance(decoder.block3[1], torch.nn.BatchNorm2d)
    assert has_bn3 == (size == "large")
    assert decoder.block1[0].out_channels == DECODER_WIDTHS[size][0]


@pytest.mark.parametrize("size", list(DECODER_WIDTHS))
def test_refiner_forward_equals_refinerys_upsample_then_classify_order(size):
    """refinery upsamples block3's c3 channels and then applies the 1x1 classifier; we classify first and
    upsample only the picked channels. Same logits, for one channel per item and for K channels per item."""
    torch.manual_seed(1)
    decoder = RefinerDecoder(in_channels=12, num_outputs=5, size=size).eval()
    feats = torch.randn(3, 12, 3, 4)

    def reference(out_size: int | tuple[int, int]) -> torch.Tensor:
        x = F.interpolate(decoder.block1(feats), scale_factor=2, mode="bilinear", align_corners=False)
        x = F.interpolate(decoder.block2(x), scale_factor=2, mode="bilinear", align_corners=False)
        x = F.interpolate(decoder.block3(x), scale_factor=4, mode="bilinear", align_corners=False)
        full = decoder.classifier(x)  # (3, 5, 48, 64)
        hw = out_size if isinstance(out_size, tuple) else (out_size, out_size)
        return F.interpolate(full, size=hw, mode="bilinear", align_corners=False)

    with torch.no_grad():
        one = torch.tensor([4, 0, 2])
        many = torch.tensor([[1, 3], [0, 4], [2, 2]])
        for out_size in (40, 57):
            ref = reference(out_size)
            torch.testing.assert_close(refiner_forward(decoder, feats, one, out_size), ref[torch.arange(3), one],
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(refiner_forward(decoder, feats, many, out_size),
                                       ref[torch.arange(3)[:, None], many], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(decoder(feats), reference((48, 64)), atol=1e-5, rtol=1e-5)


def toy_refiner_data(n: int = 24, dim: int = 6, seed: int = 0):
    """Features (N, D, 2, 2); the target CAM of channel c is the sign of feature channel c, upsampled to 32 x 32."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, dim, 2, 2, generator=g)
    blocks = (feats[:, :2] > 0).float()
    targets = F.interpolate(blocks, size=(32, 32), mode="bilinear", align_corners=False)
    pairs = [(i, c) for i in range(n) for c in range(2)]
    return feats.numpy(), targets, pairs


def test_refiner_learns_a_toy_target():
    feats, targets, pairs = toy_refiner_data()
    dataset = RefinerPairs(feats, pairs, lambda n, c: targets[n, c].numpy())
    torch.manual_seed(0)
    decoder = RefinerDecoder(in_channels=feats.shape[1], num_outputs=2, size="small")
    summary = train_refiner(decoder, dataset, epochs=25, batch_size=16, lr=0.01, window=20, tau=1.2, seed=0)
    losses = [h["refiner_train_loss"] for h in summary["history"]]
    assert losses[-1] < 0.6 * losses[0]
    with torch.no_grad():
        channels = torch.tensor([[0, 1]] * len(feats))
        probs = torch.sigmoid(refiner_forward(decoder, torch.from_numpy(feats), channels, 32))
    pred, truth = probs > 0.5, targets > 0.5
    iou = (pred & truth).sum() / (pred | truth).sum()
    assert iou > 0.85


def test_loss_threshold_polarity_background_is_low_loss():
    norm_loss = np.array([[[0.1, 0.9, 0.8, 0.2]],
                          [[0.2, 0.6, 0.9, 0.1]]], dtype=np.float32)
    probs = np.array([[[0.5, 0.9, 0.2, 0.5]],
                      [[0.5, 0.3, 0.8, 0.5]]], dtype=np.float32)
    out = loss_threshold_labels(norm_loss, probs, np.array([2, 5]), loss_threshold=0.35)
    # low loss everywhere -> background; above -> the above-threshold class with the higher probability
    assert out.tolist() == [[0, 2, 5, 0]]


def test_normalised_loss_map_is_refinerys_min_over_max():
    logits = torch.tensor([[[0.0, 3.0], [-3.0, 1.0]]])
    target = torch.tensor([[[0.5, 1.0], [1.0, 0.0]]])
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    expected = (loss - loss.min()) / (loss.max() + 1e-6)
    assert torch.allclose(normalised_loss_maps(logits, target), expected)


# ---------------------------------------------------------------- the masks stage with refiner / fusion


def write_marker(stage_dir):
    write_json(stage_dir / "done.json", {"fingerprint": "test", "files": 0, "checksum": ""})


def fake_upstream(cfg, agnostic_run: str = ""):
    """Write train-cls (random test classifier) and cams (GT-derived soft CAMs at stride 4) for a tiny run."""
    from weakseg.data import build_dataset
    from weakseg.train.classifier import build_classifier
    from weakseg.train.loop import save_checkpoint

    ds = build_dataset(cfg.data, cfg.data.train_split)
    run = cfg.run_dir
    classifier = build_classifier(cfg, ds.num_classes - 1, pretrained=False)
    save_checkpoint(run / "train-cls" / "model.pt", {"model": classifier.state_dict()})
    write_marker(run / "train-cls")
    agnostic = cfg.run_dir.parent / agnostic_run if agnostic_run else None
    for i, sid in enumerate(ds.ids):
        mask = ds.mask(i)
        classes = np.flatnonzero(ds.labels(i) > 0.5) + 1
        h, w = mask.shape
        cams = np.stack([(mask == c).astype(np.float32) for c in classes]) if len(classes) else \
            np.zeros((0, h, w), np.float32)
        small = F.interpolate(torch.from_numpy(cams)[None], size=(h // 4, w // 4), mode="area")[0].numpy()
        save_cam(run / "cams" / "cams" / f"{sid}.npz", small, classes, (h, w))
        if agnostic is not None:
            fg = ((mask > 0) & (mask < 255)).astype(np.float32)[None]
            fg_small = F.interpolate(torch.from_numpy(fg)[None], size=(h // 4, w // 4), mode="area")[0].numpy()
            save_cam(agnostic / "cams" / "cams" / f"{sid}.npz", fg_small, np.array([1]), (h, w))
    write_marker(run / "cams")
    if agnostic is not None:
        write_marker(agnostic / "cams")
    return ds


def masks_stage(cfg):
    from weakseg.masks import stage
    from weakseg.runs import StageContext

    return stage.run(StageContext(cfg, "masks", torch.device("cpu")))


TINY_DEMO = ["data.name=demo", "data.demo_train=10", "data.demo_size=32", "data.val_fraction=0.2",
             "train_cls.backbone=test_efficientnet", "train_cls.pretrained=false", "train_cls.output_stride=16"]


def test_masks_stage_trains_the_refiner_and_writes_masks(tmp_path):
    cfg = load_config(None, TINY_DEMO + [f"runs_dir={tmp_path}", "name=ref", "masks.method=refiner",
                                         "masks.refiner_epochs=2", "masks.refiner_batch_size=8",
                                         "masks.refiner_image_size=32", "masks.refiner_size=small",
                                         "masks.refiner_window=20"])
    ds = fake_upstream(cfg)
    metrics = masks_stage(cfg)
    assert (cfg.run_dir / "masks" / "refiner.pt").exists()
    assert metrics["refiner_best_epoch"] in (1, 2) and metrics["loss_threshold"] == 0.35
    assert not (cfg.run_dir / "masks" / "checkpoints" / "refiner_features.npy").exists()
    for i, sid in enumerate(ds.ids):
        mask = load_label_png(cfg.run_dir / "masks" / "masks" / f"{sid}.png")
        allowed = {0, IGNORE_INDEX} | set((np.flatnonzero(ds.labels(i) > 0.5) + 1).tolist())
        assert mask.shape == ds.image(i).shape[:2] and set(np.unique(mask)) <= allowed


def test_masks_stage_fuses_another_runs_agnostic_cams(tmp_path):
    cfg = load_config(None, TINY_DEMO + [f"runs_dir={tmp_path}", "name=specific", "masks.method=fusion",
                                         "masks.agnostic_cams_run=agnostic", "masks.bg_threshold=0.5"])
    ds = fake_upstream(cfg, agnostic_run="agnostic")
    metrics = masks_stage(cfg)
    assert metrics["agnostic_cams_dir"].endswith("agnostic/cams/cams")
    agree = total = 0
    for i, sid in enumerate(ds.ids):
        mask, gt = load_label_png(cfg.run_dir / "masks" / "masks" / f"{sid}.png"), ds.mask(i)
        valid = gt != IGNORE_INDEX
        agree += int((mask[valid] == gt[valid]).sum())
        total += int(valid.sum())
    assert agree / total > 0.9  # GT-derived agnostic + class maps give back the GT (up to stride-4 blur)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_masks_stage_in_worker_processes_writes_the_same_masks(tmp_path, monkeypatch, start_method):
    pytest.importorskip("pydensecrf.densecrf")
    monkeypatch.setattr(dist, "pool_context", lambda: mp.get_context(start_method))  # spawn = macOS / Windows
    outputs = {}
    for workers in (0, 2):
        cfg = load_config(None, TINY_DEMO + [f"runs_dir={tmp_path}", f"name=w{workers}", "masks.method=crf",
                                             "masks.bg_threshold=0.4", f"masks.num_workers={workers}"])
        ds = fake_upstream(cfg)
        metrics = masks_stage(cfg)
        assert metrics["workers"] == workers
        outputs[workers] = {sid: load_label_png(cfg.run_dir / "masks" / "masks" / f"{sid}.png") for sid in ds.ids}
    assert outputs[0].keys() == outputs[2].keys() and len(outputs[0]) == 10
    for sid, mask in outputs[0].items():
        np.testing.assert_array_equal(mask, outputs[2][sid], err_msg=sid)


class _JobThatKillsItsWorker:
    """A masks job whose worker process dies (as under the OOM killer) on image 3."""

    def __call__(self, i: int) -> float:
        if i == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return i / 10


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="fork only: a spawned worker re-imports")
@pytest.mark.timeout(120)  # a multiprocessing.Pool would wait for the dead worker forever
def test_a_masks_worker_that_dies_is_an_error_naming_the_stage(monkeypatch):
    from weakseg.masks.stage import make_masks

    monkeypatch.setattr(dist, "pool_context", lambda: mp.get_context("fork"))
    assert make_masks(_JobThatKillsItsWorker(), [0, 1, 2], workers=2) == [0.0, 0.1, 0.2]
    with pytest.raises(RuntimeError, match=r"^masks: a worker process died .*Rerun with masks.num_workers=0 "):
        make_masks(_JobThatKillsItsWorker(), list(range(12)), workers=2)
    with pytest.raises(ZeroDivisionError):  # an error inside the job keeps its type
        with dist.worker_pool(2, "division", "division.workers=0") as pool:
            list(pool.map(divmod, [4, 5], [2, 0]))


def test_worker_count_is_not_part_of_the_masks_fingerprint():
    from weakseg.runs import stage_fingerprint

    one, two = (load_config(None, [f"masks.num_workers={n}"]) for n in (0, 2))
    assert stage_fingerprint(one, "masks") == stage_fingerprint(two, "masks")
    assert stage_fingerprint(one, "masks") != stage_fingerprint(load_config(None, ["masks.bg_threshold=0.3"]), "masks")
