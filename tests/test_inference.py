"""SegPredictor: whole-image, multi-scale + flip and sliding-window inference at the input's own size."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

import numpy as np
import pytest
import torch

from weakseg import dist
from weakseg.config import load_config
from weakseg.models.inference import SegPredictor, _window_starts


class PixelwiseModel(torch.nn.Module):
    """A 1x1 conv: its output at a pixel depends on that pixel only, so tiling must not change it."""

    mean, std, size_divisor = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 1

    def __init__(self, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, classes, 1)
        self.calls: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape[2:]))
        return self.conv(x)


class TileMeanModel(PixelwiseModel):
    """Output = the mean of its whole input tile: tiling changes it, so overlaps must be averaged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape[2:]))
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("length,window,stride", [(70, 32, 21), (64, 32, 32), (32, 32, 10), (33, 32, 21)])
def test_window_starts_cover_the_length_and_end_flush(length, window, stride):
    starts = _window_starts(length, window, stride)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + window] = True
    assert covered.all() and starts[0] == 0 and starts[-1] == length - window
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


def test_sliding_window_equals_whole_image_for_a_pixelwise_model():
    model = PixelwiseModel()
    whole = SegPredictor(model, infer_size=70).probabilities(image(50, 70))
    model.calls.clear()
    tiled = SegPredictor(model, infer_size=70, window=32, window_overlap=0.33).probabilities(image(50, 70))
    assert len(model.calls) == 2 * 3 and set(model.calls) == {(32, 32)}  # rows 0,18 x cols 0,21,38
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_overlapping_tiles_are_averaged_pixel_by_pixel():
    model = TileMeanModel()
    x = torch.zeros(1, 3, 4, 6)
    x[..., :, 3:] = 1.0  # left half 0, right half 1
    predictor = SegPredictor(model, infer_size=6, window=4, window_overlap=0.5)  # tiles at columns 0 and 2
    out = predictor.logits(x)
    # tile [0, 4) has mean 0.25, tile [2, 6) mean 0.75; columns 2-3 are in both -> 0.5
    expected = torch.tensor([0.25, 0.25, 0.5, 0.5, 0.75, 0.75])
    torch.testing.assert_close(out[0, 0, 0], expected)


def test_a_window_larger_than_the_image_is_one_plain_forward_pass():
    model = PixelwiseModel()
    SegPredictor(model, infer_size=40, window=64).probabilities(image(30, 40))
    assert model.calls == [(30, 40)]


def test_small_side_is_zero_padded_up_to_the_window_and_cropped_back():
    model = PixelwiseModel()
    predictor = SegPredictor(model, infer_size=80, window=32)
    x = torch.randn(1, 3, 20, 80)
    out = predictor.logits(x)
    assert out.shape == (1, 3, 20, 80) and set(model.calls) == {(32, 32)}
    torch.testing.assert_close(out, model.conv(x), atol=1e-5, rtol=0)


def test_multiscale_flip_probabilities_are_a_distribution_at_the_input_size():
    predictor = SegPredictor(PixelwiseModel(), infer_size=48, scales=[0.75, 1.0, 1.5], flip=True, window=32)
    probs = predictor.probabilities(image(37, 53))
    assert probs.shape == (3, 37, 53)
    torch.testing.assert_close(probs.sum(0), torch.ones(37, 53))
    assert predictor.labels(image(37, 53)).shape == (37, 53)


def test_bad_window_settings_are_errors():
    with pytest.raises(ValueError, match="overlap"):
        SegPredictor(PixelwiseModel(), infer_size=32, window=16, window_overlap=1.0)


def test_from_config_reads_the_inference_keys(tmp_path):
    cfg = load_config(None, ["train_seg.crop_size=96", "train_seg.infer_window=64", "train_seg.infer_flip=true",
                             "train_seg.infer_scales=[1.0,1.25]"])
    p = SegPredictor.from_config(PixelwiseModel(), cfg.train_seg)
    assert (p.infer_size, p.window, p.flip, p.scales) == (96, 64, True, [1.0, 1.25])


def test_channels_last_converts_conv_weights_and_images_only_and_keeps_values():
    from weakseg import dist

    model = PixelwiseModel()
    x = torch.randn(2, 3, 5, 7)
    before = model.conv(x)
    dist.channels_last(model)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    y = dist.channels_last(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model.conv(y), before)
    labels = torch.zeros(2, 5, 7, dtype=torch.long)
    assert dist.channels_last(labels) is labels and dist.channels_last("text") == "text"


class BlurryEdgeModel(PixelwiseModel):
    """Two classes whose logits cross 6 pixels left of the image's colour edge (column 24), softly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        ramp = (torch.arange(w, dtype=torch.float32) - 18.0) / 4.0  # class 1 wins from column 18 on
        logits = torch.stack([-ramp, ramp])[None, :, None, :]
        return logits.expand(x.shape[0], 2, x.shape[2], w)


def test_inference_crf_snaps_the_labels_to_the_colour_edge():
    pytest.importorskip("pydensecrf.densecrf")
    picture = np.zeros((40, 40, 3), np.uint8)
    picture[:, :24] = (200, 40, 40)
    picture[:, 24:] = (40, 160, 60)
    plain = SegPredictor(BlurryEdgeModel(), infer_size=40).labels(picture)
    assert (plain[:, 19:24] == 1).all()  # the model alone puts the boundary at column 18
    sc = load_config(None, ["train_seg.infer_crf=true", "train_seg.crop_size=40"]).train_seg
    snapped = SegPredictor.from_config(BlurryEdgeModel(), sc)
    assert snapped.crf is not None and snapped.crf.bilateral_sxy == 67.0
    labels = snapped.labels(picture)
    assert (labels[:, :24] == 0).mean() > 0.95 and (labels[:, 24:] == 1).all()
    assert SegPredictor.from_config(BlurryEdgeModel(), load_config(None).train_seg).crf is None


def test_the_class_gate_removes_absent_classes_and_renormalises():
    predictor = SegPredictor(PixelwiseModel(classes=4), infer_size=24)
    picture = image(20, 24)
    plain = predictor.probabilities(picture)
    gated = predictor.final_probabilities(picture, np.array([True, False, True, False]))
    assert (gated[[1, 3]] == 0).all()
    torch.testing.assert_close(gated.sum(0), torch.ones(20, 24))
    expected = plain[[0, 2]] / plain[[0, 2]].sum(0, keepdim=True)  # the kept classes keep their odds
    torch.testing.assert_close(gated[[0, 2]], expected)
    assert set(np.unique(gated.argmax(0).numpy())) <= {0, 2}
    torch.testing.assert_close(predictor.final_probabilities(picture), plain)
    with pytest.raises(ValueError, match="gate of 3 classes"):
        predictor.final_probabilities(picture, np.array([True, True, False]))


def test_the_walk_gets_the_image_and_the_gated_probabilities_and_its_output_feeds_the_crf(monkeypatch):
    from weakseg.models import inference

    seen = {}

    def sharpen(probs):
        return probs ** 4 / (probs ** 4).sum(0, keepdim=True)

    def sharpening_walk(picture, probs):  # a stand-in walk whose effect is easy to see
        seen["image"], seen["probs"] = picture, probs.clone()
        return sharpen(probs)

    sc = load_config(None, ["train_seg.infer_crf=true", "train_seg.crop_size=24"]).train_seg
    predictor = SegPredictor.from_config(PixelwiseModel(classes=4), sc, walk=sharpening_walk)
    picture, keep = image(20, 24), np.array([True, True, False, True])
    plain = SegPredictor(PixelwiseModel(classes=4), infer_size=24).final_probabilities(picture, keep)
    crf_inputs = []
    monkeypatch.setattr(inference, "crf_from_probabilities",
                        lambda img, probs, params: crf_inputs.append(probs) or probs)
    refined = predictor.final_probabilities(picture, keep)
    assert seen["image"] is picture
    torch.testing.assert_close(seen["probs"], plain)  # walked after the gate
    assert not torch.allclose(sharpen(plain), plain, atol=1e-2)
    torch.testing.assert_close(refined, sharpen(plain))  # and the CRF ran on the walked probabilities
    torch.testing.assert_close(torch.from_numpy(crf_inputs[0]), sharpen(plain)[torch.from_numpy(keep)])


def test_the_gated_crf_runs_over_the_kept_classes_only_and_matches_the_crf_of_all(monkeypatch):
    pytest.importorskip("pydensecrf.densecrf")
    import weakseg.models.inference as inference

    sc = load_config(None, ["train_seg.infer_crf=true", "train_seg.crop_size=24"]).train_seg
    predictor = SegPredictor.from_config(PixelwiseModel(classes=5), sc)
    picture, present = image(20, 24, seed=3), np.array([True, False, True, True, False])
    # reference: the CRF over all 5 classes of the gated probabilities (the gated-out ones at ~0)
    gated_plain = SegPredictor(PixelwiseModel(classes=5), infer_size=24).final_probabilities(picture, present)
    every_class = inference.crf_from_probabilities(picture, gated_plain.numpy(), predictor.crf)
    labels_seen: list[int] = []
    real = inference.crf_from_probabilities

    def spy(img, probs, params):
        labels_seen.append(probs.shape[0])
        return real(img, probs, params)

    monkeypatch.setattr(inference, "crf_from_probabilities", spy)
    gated = predictor.final_probabilities(picture, present)
    assert predictor.final_probabilities(picture).shape == (5, 20, 24)
    assert labels_seen == [3, 5]  # gated: background + the 2 kept classes; ungated: all 5
    assert (gated[[1, 4]] == 0).all()
    torch.testing.assert_close(gated.sum(0), torch.ones(20, 24))
    np.testing.assert_array_equal(gated.argmax(0).numpy(), every_class.argmax(0))
    torch.testing.assert_close(gated[[0, 2, 3]], torch.from_numpy(every_class[[0, 2, 3]]), atol=1e-4, rtol=0)
    background_only = predictor.final_probabilities(picture, np.array([True, False, False, False, False]))
    assert labels_seen == [3, 5] and (background_only[0] == 1).all() and (background_only[1:] == 0).all()


def crf_config(*overrides: str):
    return load_config(None, ["train_seg.infer_crf=true", "train_seg.crop_size=24", *overrides]).train_seg


@pytest.mark.parametrize("start_method", ["fork", "spawn"])  # spawn = macOS / Windows
def test_the_crf_in_worker_processes_gives_the_labels_of_the_crf_in_process(monkeypatch, start_method):
    pytest.importorskip("pydensecrf.densecrf")
    pools: list[str] = []
    monkeypatch.setattr(dist, "pool_context", lambda: pools.append(start_method) or mp.get_context(start_method))
    pictures = [image(20, 24, seed=s) for s in range(4)] + [image(17, 31, seed=9), image(24, 24, seed=11)]
    serial = SegPredictor.from_config(PixelwiseModel(classes=4), crf_config())
    expected = [serial.labels(p) for p in pictures]
    assert [labels.tolist() for labels in serial.iter_labels(pictures)] == [labels.tolist() for labels in expected]
    assert pools == []  # no CRF worker: no pool
    no_crf = SegPredictor(PixelwiseModel(classes=4), infer_size=24)
    assert any((no_crf.labels(p) != labels).any() for p, labels in zip(pictures, expected))  # the CRF did work
    parallel = SegPredictor.from_config(PixelwiseModel(classes=4), crf_config("train_seg.infer_crf_workers=2"))
    assert parallel.crf_workers == 2
    got = list(parallel.iter_labels(iter(pictures)))
    assert pools == [start_method]
    assert len(got) == len(pictures)
    for labels, want in zip(got, expected):
        assert labels.dtype == np.uint8
        np.testing.assert_array_equal(labels, want)


def _crf_that_kills_its_worker(image, probs, params):
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="spawned workers see the CRF unpatched")
@pytest.mark.timeout(120)  # a multiprocessing.Pool would wait for the dead worker forever
def test_a_crf_worker_that_dies_is_an_error_and_the_threads_come_back(monkeypatch):
    import weakseg.models.inference as inference

    pytest.importorskip("pydensecrf.densecrf")
    monkeypatch.setattr(dist, "pool_context", lambda: mp.get_context("fork"))
    monkeypatch.setattr(inference, "_crf_labels", _crf_that_kills_its_worker)
    predictor = SegPredictor.from_config(PixelwiseModel(classes=3), crf_config("train_seg.infer_crf_workers=1"))
    threads = torch.get_num_threads()
    rerun = r"Rerun with train_seg.infer_crf_workers=0 \(predict: --crf-workers 0\) "
    with pytest.raises(RuntimeError, match=r"^the inference CRF: a worker process died .*" + rerun):
        list(predictor.iter_labels(image(20, 24, seed=s) for s in range(5)))
    assert torch.get_num_threads() == threads


def test_the_crf_workers_read_at_most_one_image_more_than_they_run():
    pytest.importorskip("pydensecrf.densecrf")
    pulled: list[int] = []

    def pictures():
        for seed in range(6):
            pulled.append(seed)
            yield image(20, 24, seed=seed)

    predictor = SegPredictor.from_config(PixelwiseModel(classes=3), crf_config("train_seg.infer_crf_workers=2"))
    threads = torch.get_num_threads()
    labels = predictor.iter_labels(pictures())
    next(labels)
    assert pulled == [0, 1, 2]  # 2 images in the workers, 1 waiting: the rest not yet read (bounded memory)
    assert torch.get_num_threads() == max(1, threads - 2)  # the network leaves the workers their cores
    assert [next(labels) is not None for _ in range(5)] == [True] * 5 and pulled == list(range(6))
    assert torch.get_num_threads() == threads  # the pool is closed by the last label, before the caller asks again
    assert list(labels) == []
    with pytest.raises(ValueError, match="crf_workers must be >= 0"):
        SegPredictor(PixelwiseModel(), infer_size=24, crf_workers=-1)
