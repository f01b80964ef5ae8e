"""AffinityNet-style affinity and random walk (weakseg.masks.affinity) and the affinity / affinity_crf makers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weakseg.config import MaskCfg, load_config
from weakseg.io import IGNORE_INDEX, load_label_png, save_cam
from weakseg.masks.affinity import (AffinityHead, AffinitySeeds, affinity_loss, disk_offsets, half_disk_offsets,
                                    pair_distances, random_walk, seed_grid, shifted, train_affinity,
                                    transition_weights)
from weakseg.masks.makers import build_mask_maker
from test_masks_refine import TINY_DEMO, fake_upstream, masks_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def two_region_embedding(h: int = 12, w: int = 12, edge: int = 6, gap: float = 2.0) -> torch.Tensor:
    """(1, 4, h, w): 0 left of column `edge`, `gap` right of it."""
    emb = torch.zeros(1, 4, h, w)
    emb[..., edge:] = gap
    return emb


def test_offsets_cover_the_disk_once_per_pair():
    full, half = disk_offsets(2), half_disk_offsets(2)
    assert len(full) == 13 and (0, 0) in full and (2, 0) in full and (2, 1) not in full
    assert len(half) == 6 and (0, 0) not in half
    assert sorted(half + [(-dy, -dx) for dy, dx in half] + [(0, 0)]) == sorted(full)


def test_shifted_reads_the_neighbour_at_the_offset():
    x = torch.arange(12.0).reshape(3, 4)
    y = shifted(x, 1, -1, -7.0)  # y[i, j] = x[i + 1, j - 1]
    assert y[0, 1] == x[1, 0] and y[1, 3] == x[2, 2]
    assert (y[2] == -7).all() and (y[:, 0] == -7).all()


def test_pair_distance_is_the_mean_absolute_feature_difference():
    dist, inside = pair_distances(two_region_embedding(gap=2.0), [(0, 1), (1, 0)])
    assert dist.shape == (1, 2, 12, 12) and inside.shape == (2, 12, 12)
    assert dist[0, 0, :, 5].eq(2.0).all()  # column 5 -> 6 crosses the edge: every channel differs by 2
    assert dist[0, 0, :, :5].eq(0).all() and dist[0, 0, :, 6:11].eq(0).all() and dist[0, 1][inside[1]].eq(0).all()
    assert not inside[0, :, 11].any() and inside[0, :, :11].all() and not inside[1, 11].any()


def test_affinity_loss_matches_hand_computed_terms():
    # one row of 4 cells, offset (0, 1): pairs (0,1) bg-bg, (1,2) bg-fg, (2,3) fg-ignored; cell 3 has no right one
    emb = torch.tensor([0.0, 0.5, 2.0, 2.1]).reshape(1, 1, 1, 4)
    seeds = torch.tensor([[[0, 0, 3, IGNORE_INDEX]]])
    dist, inside = pair_distances(emb, [(0, 1)])
    loss, counts = affinity_loss(dist, inside, seeds, [(0, 1)])
    assert counts == {"bg_pos": 1, "fg_pos": 0, "neg": 1}
    expected = 0.25 * 0.5 + 0.5 * -math.log(1 - math.exp(-1.5))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # two fg cells of the same class pull together; of different classes push apart
    seeds = torch.tensor([[[0, 0, 3, 3]]])
    loss, counts = affinity_loss(dist, inside, seeds, [(0, 1)])
    assert counts == {"bg_pos": 1, "fg_pos": 1, "neg": 1}
    assert float(loss) == pytest.approx(expected + 0.25 * 0.1, rel=1e-5)


def test_transition_weights_are_a_distribution_over_the_neighbours_on_the_map():
    offsets = disk_offsets(2)
    dist, inside = pair_distances(two_region_embedding(), offsets)
    weights = transition_weights(dist[0], inside, beta=8.0)
    assert torch.allclose(weights.sum(dim=0), torch.ones(12, 12))
    assert weights[~inside].eq(0).all()
    across = offsets.index((0, 1))
    assert weights[across, 0, 5] < 1e-6 < weights[across, 0, 4]  # exp(-8 * 2) vs exp(0) before normalising


def test_random_walk_fills_the_region_of_its_seed_and_stops_at_the_edge():
    offsets = disk_offsets(3)
    dist, inside = pair_distances(two_region_embedding(gap=2.0), offsets)
    weights = transition_weights(dist[0], inside, beta=8.0)
    scores = torch.zeros(1, 12, 12)
    scores[0, 2, 1] = 1.0  # one confident cell on the left
    walked = random_walk(scores, weights, offsets, iterations=64)[0]
    assert walked[:, :6].min() > 0.5 * walked[:, :6].max()  # spread over the whole left region
    assert walked[:, 6:].max() < 1e-3 * walked[:, :6].min()  # hardly across the edge
    constant = random_walk(torch.full((1, 12, 12), 0.3), weights, offsets, iterations=16)
    assert torch.allclose(constant, torch.full_like(constant, 0.3))  # T is row-stochastic
    assert random_walk(scores, weights, offsets, iterations=0) is scores


def test_random_walk_equals_the_step_by_step_neighbour_average():
    """Each step: v[p] <- sum over the disk of T[o, p] v[p + o], neighbours off the map skipped; checked against
    that sum written out cell by cell on a map with edges, several classes and an odd shape."""
    torch.manual_seed(0)
    offsets = disk_offsets(2)
    h, w = 5, 7
    dist, inside = pair_distances(torch.rand(1, 3, h, w), offsets)
    weights = transition_weights(dist[0], inside, beta=4.0)
    scores = torch.rand(3, h, w)
    expected = scores.clone()
    for _ in range(3):
        step = torch.zeros_like(expected)
        for y in range(h):
            for x in range(w):
                for o, (dy, dx) in enumerate(offsets):
                    if 0 <= y + dy < h and 0 <= x + dx < w:
                        step[:, y, x] += weights[o, y, x] * expected[:, y + dy, x + dx]
        expected = step
    assert torch.allclose(random_walk(scores, weights, offsets, iterations=3), expected, atol=1e-6)
    mixed = random_walk(scores, weights.bfloat16(), offsets, iterations=3)  # weights from a bf16 autocast head
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, expected, atol=2e-2)


def test_seeds_are_the_threshold_band_on_the_grid(tmp_path):
    cam = np.zeros((2, 8, 8), np.float32)
    cam[0, :, :2] = 0.9   # class 4: confident
    cam[1, :, 6:] = 0.3   # class 7: in the band -> ignored
    save_cam(tmp_path / "a.npz", cam, np.array([4, 7]), (16, 16))
    seeds = seed_grid(tmp_path, ["a"], (4, 4), seed_low=0.1, seed_high=0.5)[0]
    assert seeds.dtype == np.uint8 and seeds.shape == (4, 4)
    assert (seeds[:, 0] == 4).all() and (seeds[:, 1:3] == 0).all() and (seeds[:, 3] == IGNORE_INDEX).all()


def test_crf_seeds_are_the_two_pass_crf_band_on_the_grid(tmp_path):
    """Seeds from the `crf` maker's two passes (planes seed_low / seed_high), sampled at the grid's cells; a
    resumed attempt keeps the seed maps already written."""
    pytest.importorskip("pydensecrf.densecrf")
    from dataclasses import replace
    from types import SimpleNamespace

    from weakseg.io import load_cam, save_label_png
    from weakseg.masks.affinity import crf_seed_grid
    from weakseg.masks.makers import CrfMaker
    from weakseg.masks.stage import upsample_cam

    cfg = load_config(None, TINY_DEMO + [f"runs_dir={tmp_path}", "name=seeds", "masks.num_workers=0"])
    ds = fake_upstream(cfg)
    ctx = SimpleNamespace(cfg=cfg, out=tmp_path / "stage")
    cam_dir = cfg.run_dir / "cams" / "cams"
    save_label_png(ctx.out / "affinity_seeds" / f"{ds.ids[0]}.png", np.full((32, 32), 9, np.uint8))
    seeds = crf_seed_grid(ctx, ds, cam_dir, (8, 8), seed_low=0.1, seed_high=0.5)
    assert seeds.shape == (len(ds), 8, 8) and seeds.dtype == np.uint8
    assert (seeds[0] == 9).all()  # written by an earlier attempt: kept, not re-made

    band = CrfMaker(replace(cfg.masks, method="crf", ignore_low=0.1, ignore_high=0.5))
    labelled = 0
    for i in range(1, len(ds)):
        cam, classes, size = load_cam(cam_dir / f"{ds.ids[i]}.npz")
        full = band.make(upsample_cam(cam, size), classes, ds.image(i))
        assert (load_label_png(ctx.out / "affinity_seeds" / f"{ds.ids[i]}.png") == full).all()
        assert (seeds[i] == full[2::4, 2::4]).all()  # nearest: each 4 x 4 cell's pixel (2, 2)
        labelled += int(((seeds[i] > 0) & (seeds[i] < IGNORE_INDEX)).sum())
    assert labelled and (seeds[1:] == IGNORE_INDEX).any() and (seeds[1:] == 0).any()


def test_scaled_crf_seeds_run_both_passes_on_the_shrunk_image_with_scaled_kernels(tmp_path):
    """masks.affinity_seed_scale=0.5: the seed maps are the two-pass CRF of the half-size image and CAMs with the
    spatial kernel widths halved, sampled on the grid like full-size ones."""
    pytest.importorskip("pydensecrf.densecrf")
    from dataclasses import replace
    from types import SimpleNamespace

    from PIL import Image

    from weakseg.io import load_cam
    from weakseg.masks.affinity import crf_seed_grid
    from weakseg.masks.makers import CrfMaker
    from weakseg.masks.stage import upsample_cam

    cfg = load_config(None, TINY_DEMO + [f"runs_dir={tmp_path}", "name=seeds", "masks.num_workers=0",
                                         "masks.affinity_seed_scale=0.5", "masks.crf_bilateral_sxy=20"])
    ds = fake_upstream(cfg)
    ctx = SimpleNamespace(cfg=cfg, out=tmp_path / "stage")
    cam_dir = cfg.run_dir / "cams" / "cams"
    seeds = crf_seed_grid(ctx, ds, cam_dir, (8, 8), seed_low=0.1, seed_high=0.5)
    band = CrfMaker(replace(cfg.masks, method="crf", ignore_low=0.1, ignore_high=0.5, crf_gaussian_sxy=1.5,
                            crf_bilateral_sxy=10.0))
    for i in range(len(ds)):
        cam, classes, size = load_cam(cam_dir / f"{ds.ids[i]}.npz")
        assert size == (32, 32)
        half = np.array(Image.fromarray(ds.image(i)).resize((16, 16), Image.BILINEAR))
        expected = band.make(upsample_cam(cam, (16, 16)), classes, half)
        assert (load_label_png(ctx.out / "affinity_seeds" / f"{ds.ids[i]}.png") == expected).all()
        assert (seeds[i] == expected[1::2, 1::2]).all()  # nearest: each 2 x 2 cell's pixel (1, 1)
    with pytest.raises(ValueError, match=r"masks.affinity_seed_scale must be in \(0, 1\], got 1.5"):
        build_mask_maker(MaskCfg(method="affinity_crf", affinity_seed_scale=1.5))


def toy_affinity_data(n: int = 16, size: int = 8, seed: int = 0) -> AffinitySeeds:
    """Features whose channel 0 marks the right half (plus noise); seeds: left bg, right class 1, a third ignored."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(0, 0.3, (n, 3, size, size)).astype(np.float32)
    feats[:, 0, :, size // 2:] += 2.0
    seeds = np.zeros((n, size, size), np.uint8)
    seeds[:, :, size // 2:] = 1
    seeds[rng.random(seeds.shape) < 0.33] = IGNORE_INDEX
    return AffinitySeeds([feats], seeds, range(n))


def test_affinity_head_learns_the_seed_boundary():
    torch.manual_seed(0)
    data = toy_affinity_data()
    head = AffinityHead([3], widths=(8,), dim=8)
    summary = train_affinity(head, data, epochs=30, batch_size=8, lr=0.01, radius=2, seed=0)
    losses = [h["affinity_train_loss"] for h in summary["history"]]
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        levels, _ = next(iter(torch.utils.data.DataLoader(data, batch_size=16)))
        dist, _ = pair_distances(head(levels), [(0, 1)])
    affinity = torch.exp(-dist[:, 0])
    assert affinity[..., 3].mean() < 0.2  # column 3 -> 4 crosses the boundary
    assert affinity[..., :3].mean() > 0.6 and affinity[..., 4:7].mean() > 0.6  # the noisy features differ a little


def test_affinity_head_embeds_at_the_finest_level():
    head = AffinityHead([5, 7], widths=(4, 6), dim=9).eval()
    out = head([torch.zeros(2, 5, 10, 12), torch.zeros(2, 7, 5, 6)])
    assert out.shape == (2, 9, 10, 12)
    with pytest.raises(ValueError, match="2 levels but 1 widths"):
        AffinityHead([5, 7], widths=(4,))


AFFINITY = ["masks.affinity_epochs=2", "masks.affinity_batch_size=4", "masks.affinity_image_size=64",
            "masks.affinity_radius=2", "masks.affinity_iterations=8"]


@pytest.mark.parametrize("method,seeds,background", [("affinity", "cams", "plane"), ("affinity_crf", "cams", "plane"),
                                                     ("affinity", "crf", "plane"), ("affinity_crf", "crf", "walked")])
def test_masks_stage_trains_the_affinity_head_and_walks_the_cams(tmp_path, method, seeds, background):
    if method == "affinity_crf" or seeds == "crf":
        pytest.importorskip("pydensecrf.densecrf")
    cfg = load_config(None, TINY_DEMO + AFFINITY + [f"runs_dir={tmp_path}", "name=aff", f"masks.method={method}",
                                                    "masks.bg_threshold=0.5", f"masks.affinity_seeds={seeds}",
                                                    f"masks.affinity_background={background}"])
    ds = fake_upstream(cfg)
    metrics = masks_stage(cfg)
    seed_maps = sorted(p.stem for p in (cfg.run_dir / "masks" / "affinity_seeds").glob("*.png"))
    assert seed_maps == (sorted(ds.ids) if seeds == "crf" else [])
    assert (cfg.run_dir / "masks" / "affinity.pt").exists()
    assert metrics["affinity_best_epoch"] in (1, 2) and metrics["affinity_train_images"] == 8
    assert 0 < metrics["affinity_seed_foreground_fraction"] < 1
    assert not list((cfg.run_dir / "masks" / "checkpoints").glob("affinity_level*.npy"))
    for i, sid in enumerate(ds.ids):
        mask = load_label_png(cfg.run_dir / "masks" / "masks" / f"{sid}.png")
        allowed = {0} | set((np.flatnonzero(ds.labels(i) > 0.5) + 1).tolist())
        assert mask.shape == ds.image(i).shape[:2] and set(np.unique(mask)) <= allowed


def test_affinity_maker_walks_then_thresholds(tmp_path):
    """With a head that sees two regions, a CAM peak on one region becomes the whole region."""
    from weakseg.masks import makers

    cfg = load_config(None, TINY_DEMO + AFFINITY + [f"runs_dir={tmp_path}", "name=aff", "masks.method=affinity",
                                                    "masks.affinity_iterations=256"])
    maker = build_mask_maker(cfg.masks)
    maker.bg_threshold = 0.4

    class TwoRegions(torch.nn.Module):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

        def forward_pyramid(self, x, n):  # channel 0 of the image, at stride 4
            return [torch.nn.functional.avg_pool2d(x[:, :1], 4)] * n

    maker.backbone, maker.head = TwoRegions(), lambda levels: 10 * levels[0]
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, 16:] = 255
    cams = np.zeros((1, 32, 32), np.float32)
    cams[0, 8:12, 22:26] = 1.0  # a peak inside the right region
    mask = maker.make(cams, np.array([5]), image)
    assert (mask[:, 17:] == 5).all() and (mask[:, :15] == 0).all()
    assert makers.threshold_labels(cams, np.array([5]), 0.4)[:, 17:].mean() < 1  # the peak alone covers less


def test_walked_background_holds_a_class_to_its_cam_where_the_plane_lets_it_spread():
    """On a featureless image every cell is alike, so the walk is a blur. Against a plane, the blurred CAM divided
    by its max spreads past the CAM's square; walked with it, the background (1 - CAM)^alpha keeps it inside.
    A weaker class on the same square stays below the stronger one, though both far outweigh the background."""
    image = np.zeros((32, 32, 3), np.uint8)
    cams = np.zeros((2, 32, 32), np.float32)
    cams[:, 8:24, 8:24] = np.array([0.5, 1.0])[:, None, None]  # class 7 at 0.5, class 3 at 1.0
    square = cams[1] > 0

    class Featureless(torch.nn.Module):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

        def forward_pyramid(self, x, n):
            return [torch.nn.functional.avg_pool2d(x[:, :1], 4)] * n

    masks = {}
    for background in ("plane", "walked"):
        cfg = load_config(None, TINY_DEMO + AFFINITY + ["masks.method=affinity", "masks.affinity_iterations=2",
                                                        f"masks.affinity_background={background}"])
        maker = build_mask_maker(cfg.masks)
        maker.bg_threshold = 0.3
        maker.backbone, maker.head = Featureless(), lambda levels: 0 * levels[0]
        mask = maker.make(cams, np.array([7, 3]), image)
        assert not (mask == 7).any()
        masks[background] = mask == 3
        maps = maker.walked(cams, image)
        assert maps.max() <= 1.0 and (maps[1][square] > maps[0][square]).all()
    assert masks["plane"].sum() > 1.2 * square.sum() and (masks["plane"] & ~square).any()
    assert not (masks["walked"] & ~square).any() and masks["walked"].sum() > 0.8 * square.sum()


def test_walked_background_refuses_bad_settings():
    maker = build_mask_maker(MaskCfg(method="affinity", affinity_background="walked"))
    maker.head, maker.backbone, maker.bg_threshold = object(), object(), 1.0
    with pytest.raises(ValueError, match="needs a background threshold in \\(0, 1\\), got 1.0"):
        maker.walked(np.ones((1, 4, 4), np.float32), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="masks.affinity_background must be plane or walked, got 'zero'"):
        build_mask_maker(MaskCfg(method="affinity", affinity_background="zero"))
    with pytest.raises(ValueError, match="masks.affinity_background_power must be >= 0"):
        build_mask_maker(MaskCfg(method="affinity", affinity_background="walked", affinity_background_power=-2.0))


def test_affinity_needs_a_cnn_classifier(tmp_path):
    cfg = load_config(None, TINY_DEMO + AFFINITY + [f"runs_dir={tmp_path}", "name=vit", "masks.method=affinity",
                                                    "train_cls.backbone=test_vit"])
    ds = fake_upstream(cfg)
    with pytest.raises(ValueError, match="masks.method=affinity needs a CNN classifier backbone"):
        masks_stage(cfg)
    assert len(ds)


def test_affinity_seeds_must_be_cams_or_crf():
    with pytest.raises(ValueError, match="masks.affinity_seeds must be cams or crf, got 'gt'"):
        build_mask_maker(MaskCfg(method="affinity", affinity_seeds="gt"))


def test_affinity_writes_no_ignore_band_but_affinity_crf_does():
    with pytest.raises(ValueError, match="masks.method=affinity writes no ignore band"):
        build_mask_maker(MaskCfg(method="affinity", ignore_low=0.2, ignore_high=0.4))
    pytest.importorskip("pydensecrf.densecrf")
    build_mask_maker(MaskCfg(method="affinity_crf", ignore_low=0.2, ignore_high=0.4))


def test_stored_levels_walk_like_a_fresh_backbone_pass(tmp_path):
    """The maker walks from the levels stored while training the head; they match a second backbone pass."""
    from weakseg.data import build_dataset
    from weakseg.masks.affinity import AFFINITY_LEVELS, StoredLevels, feature_paths, walk_image
    from weakseg.masks.refiner import extract_feature_maps
    from weakseg.models.backbones import build_backbone, normalizer

    cfg = load_config(None, TINY_DEMO)
    ds = build_dataset(cfg.data, cfg.data.train_split)
    torch.manual_seed(0)
    backbone = build_backbone("test_efficientnet", pretrained=False, output_stride=16).eval()
    normalize = normalizer(backbone.mean, backbone.std)
    paths = feature_paths(tmp_path)
    extract_feature_maps(lambda x: backbone.forward_pyramid(normalize(x), AFFINITY_LEVELS), ds, 64, paths)
    stored = StoredLevels(paths, list(ds.ids))
    head = AffinityHead([level.shape[1] for level in stored(ds.ids[0])]).eval()
    image = ds.image(3)
    cams = np.random.default_rng(0).random((2, *image.shape[:2])).astype(np.float32)
    fresh = walk_image(backbone, head, image, cams, 64, radius=2, beta=8.0, iterations=8)
    reused = walk_image(backbone, head, image, cams, 64, radius=2, beta=8.0, iterations=8, levels=stored(ds.ids[3]))
    assert fresh.shape == cams.shape and np.abs(fresh - reused).max() < 1e-2  # float16 storage
    stored.delete()
    assert not any(p.exists() for p in paths) and stored(ds.ids[0]) is None


class TwoRegionBackbone(torch.nn.Module):
    """Levels = channel 0 of the image at stride 4, so a head scaling it tells a dark from a bright region."""

    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def forward_pyramid(self, x, n):
        return [torch.nn.functional.avg_pool2d(x[:, :1], 4)] * n


class ScaledHead(torch.nn.Module):
    def forward(self, levels):
        return 10 * levels[0]


def test_probability_walk_outvotes_a_stray_class_inside_its_region_and_stops_at_the_edge():
    from weakseg.masks.affinity import ProbabilityWalk

    image = np.zeros((32, 32, 3), np.uint8)
    image[:, 16:] = 255
    probs = torch.zeros(3, 32, 32)
    probs[:, :, :16] = torch.tensor([0.3, 0.7, 0.0])[:, None, None]  # left: class 1
    probs[:, 4:8, 4:8] = torch.tensor([0.3, 0.1, 0.6])[:, None, None]  # a stray class-2 patch inside it
    probs[:, :, 16:] = torch.tensor([0.8, 0.0, 0.2])[:, None, None]  # right: background, some class 2
    walk = ProbabilityWalk(TwoRegionBackbone(), ScaledHead(), image_size=32, radius=2, beta=8.0, iterations=32)
    walked = walk(image, probs)
    assert walked.shape == probs.shape and torch.allclose(walked.sum(0), torch.ones(32, 32), atol=1e-5)
    labels = walked.argmax(0)
    assert (probs.argmax(0)[4:8, 4:8] == 2).all() and (labels[:, :14] == 1).all()  # the patch is outvoted
    assert (labels[:, 18:] == 0).all() and walked[1, :, 18:].max() < 1e-3  # class 1 does not cross the edge
    with pytest.raises(ValueError, match="iterations > 0"):
        ProbabilityWalk(TwoRegionBackbone(), ScaledHead(), 32, 2, 8.0, 0)
