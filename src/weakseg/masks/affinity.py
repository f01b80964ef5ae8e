"""AffinityNet-style pixel affinity and random-walk propagation of CAMs (Ahn & Kwak, CVPR 2018; IRN's walk).

A small head on the frozen classifier's multi-level features embeds each cell of a stride-`s` grid; the
affinity of two cells within `radius` is a = exp(-mean_c |f_p - f_q|). It is trained, without pixel labels,
on seeds made from the CAMs: confident foreground (top CAM >= seed_high, labelled with its argmax class),
confident background (top CAM < seed_low), the band between ignored. Pairs of equal seeds pull together,
pairs of different seeds push apart (AffinityNet's loss: bg-pos / 4 + fg-pos / 4 + neg / 2).

The walk: T = D^-1 A^beta over each cell's disk of neighbours (the cell itself included), applied
`iterations` times to the present classes' CAMs on the grid: v <- T v, i.e. every cell becomes the
affinity-weighted average of its neighbourhood, so a class spreads inside its object and stops at edges.
IRN applies T^256 (beta 10); AffinityNet T^256 (beta 8). The walked maps are divided by their global
maximum (IRN) and thresholded against a constant background plane.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from weakseg.io import IGNORE_INDEX as IGNORE
from weakseg.train.loop import train_keep_best

AFFINITY_LEVELS = 3  # the backbone's last three feature levels (EfficientNet-Lite at output stride 16: 8, 16, 16)


def disk_offsets(radius: int) -> list[tuple[int, int]]:
    """Every (dy, dx) with dy^2 + dx^2 <= radius^2, the centre included, in raster order."""
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
            if dy * dy + dx * dx <= radius * radius]


def half_disk_offsets(radius: int) -> list[tuple[int, int]]:
    """One offset of each symmetric pair of the disk (dy > 0, or dy == 0 and dx > 0): the training pairs."""
    return [(dy, dx) for dy, dx in disk_offsets(radius) if dy > 0 or (dy == 0 and dx > 0)]


def shifted(x: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """x (..., h, w) -> y with y[..., i, j] = x[..., i + dy, j + dx], `fill` outside the map."""
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill)
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def pair_distances(embedding: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """embedding (B, E, h, w) -> (d (B, O, h, w) = mean_c |f_p - f_{p+o}|, inside (O, h, w) bool: p+o on the map).

    Affinity a = exp(-d); d is returned so that -log a = d stays exact. Off-map pairs hold garbage: mask them.
    """
    h, w = embedding.shape[-2:]
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(embedding, (r, r, r, r))
    on_map = F.pad(torch.ones(h, w, dtype=torch.bool, device=embedding.device), (r, r, r, r))
    window = [(slice(r + dy, r + dy + h), slice(r + dx, r + dx + w)) for dy, dx in offsets]
    dist = torch.stack([(embedding - padded[..., ys, xs]).abs().mean(dim=1) for ys, xs in window], dim=1)
    return dist, torch.stack([on_map[ys, xs] for ys, xs in window])


def affinity_loss(dist: torch.Tensor, inside: torch.Tensor, seeds: torch.Tensor,
                  offsets: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, dict]:
    """AffinityNet's loss: dist (B, O, h, w) from `pair_distances`, seeds (B, h, w) long (0 bg, c > 0, 255 ignore).

    loss = mean_{bg pairs} -log a / 4 + mean_{same-class fg pairs} -log a / 4 + mean_{different} -log(1 - a) / 2;
    a term without pairs in the batch counts 0. Returns (loss, pair counts).
    """
    others = torch.stack([shifted(seeds, dy, dx, IGNORE) for dy, dx in offsets], dim=1)  # (B, O, h, w)
    here = seeds[:, None].expand_as(others)
    labelled = (here != IGNORE) & (others != IGNORE) & inside[None]
    same = labelled & (here == others)
    bg_pos, fg_pos, neg = same & (here == 0), same & (here > 0), labelled & (here != others)
    neg_log = -torch.log((-torch.expm1(-dist)).clamp_min(1e-5))  # -log(1 - exp(-d))
    terms = {"bg_pos": (dist, bg_pos, 0.25), "fg_pos": (dist, fg_pos, 0.25), "neg": (neg_log, neg, 0.5)}
    loss = dist.new_zeros(())
    counts = {}
    for name, (values, mask, weight) in terms.items():
        n = int(mask.sum())
        counts[name] = n
        if n:
            loss = loss + weight * values[mask].sum() / n
    return loss, counts


class AffinityHead(nn.Module):
    """Frozen-backbone levels [(B, C_i, h_i, w_i)], finest first -> embedding (B, dim, h_0, w_0).

    Per level conv1x1-BN-ReLU to `widths[i]`, resized to the finest level, concatenated, conv1x1 to `dim`
    (AffinityNet's f8_3 / f8_4 / f8_5 -> f9 at 448 channels; 64 here: the pairwise L1 distances over a radius-5
    disk dominate the cost on a CPU and grow with the width).
    """

    def __init__(self, in_channels: Sequence[int], widths: Sequence[int] = (64, 128, 128), dim: int = 64):
        super().__init__()
        if len(widths) != len(in_channels):
            raise ValueError(f"AffinityHead: {len(in_channels)} levels but {len(widths)} widths")
        self.in_channels, self.widths, self.dim = tuple(in_channels), tuple(widths), dim
        self.reduce = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
            for c, w in zip(in_channels, widths))
        self.project = nn.Conv2d(sum(widths), dim, 1)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        size = levels[0].shape[-2:]
        maps = [r(x) for r, x in zip(self.reduce, levels)]
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in maps]
        return self.project(torch.cat(maps, dim=1))


def transition_weights(dist: torch.Tensor, inside: torch.Tensor, beta: float) -> torch.Tensor:
    """dist (O, h, w) over the full disk (centre included), inside (O, h, w) -> T (O, h, w), sum over O = 1.

    T[o, p] = a(p, p+o)^beta / sum_o' a(p, p+o')^beta with a = exp(-d); neighbours off the map weigh 0.
    """
    log_w = (-beta * dist).masked_fill(~inside, -math.inf)
    return torch.softmax(log_w, dim=0)


def transition_matrix(weights: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """weights T (O, h, w) from `transition_weights` -> the same T as a sparse CSR matrix (h*w, h*w).

    Row p holds T[o, p] at column p + o for the neighbours on the map (off the map they weigh 0 anyway).
    """
    o, h, w = weights.shape
    device = weights.device
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    dy = torch.tensor([d for d, _ in offsets], device=device)[:, None, None]
    dx = torch.tensor([d for _, d in offsets], device=device)[:, None, None]
    to_y, to_x = ys + dy, xs + dx  # (O, h, w)
    on_map = (to_y >= 0) & (to_y < h) & (to_x >= 0) & (to_x < w)
    rows = (ys * w + xs).expand(o, h, w)[on_map]
    cols = (to_y * w + to_x)[on_map]
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), weights[on_map], (h * w, h * w),
                                  check_invariants=False).coalesce()
    with warnings.catch_warnings():  # CSR is "beta" in torch; its matmul is what makes the walk cheap
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.to_sparse_csr()


def random_walk(scores: torch.Tensor, weights: torch.Tensor, offsets: Sequence[tuple[int, int]],
                iterations: int) -> torch.Tensor:
    """scores (K, h, w), weights T (O, h, w) from `transition_weights` -> T^iterations applied to scores.

    Each step is one sparse product with `transition_matrix`: on a 40 x 40 grid, 16 steps, radius 5, 2.2 x
    faster than gathering each cell's neighbours per step with 4 maps and 11 x with 21 (`bench.random_walk`).
    """
    if scores.shape[0] == 0 or iterations <= 0:
        return scores
    k, (h, w) = scores.shape[0], scores.shape[-2:]
    dtype = torch.promote_types(scores.dtype, weights.dtype)  # e.g. bf16 weights from an autocast head
    matrix = transition_matrix(weights.float(), offsets)  # the sparse product wants one dtype: walk in fp32
    v = scores.float().reshape(k, h * w).T.contiguous()  # (h*w, K)
    for _ in range(iterations):
        v = matrix @ v
    return v.T.reshape(k, h, w).to(dtype)


class AffinitySeeds(torch.utils.data.Dataset):
    """Item n: (levels [(C_i, h_i, w_i)] float32 of image n, seeds (h_0, w_0) long)."""

    def __init__(self, levels: Sequence[np.ndarray], seeds: np.ndarray, indices: Sequence[int]):
        self.levels, self.seeds, self.indices = levels, seeds, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        n = self.indices[k]
        levels = [torch.from_numpy(np.asarray(level[n], dtype=np.float32)) for level in self.levels]
        return levels, torch.from_numpy(self.seeds[n].astype(np.int64))


def train_affinity(head: AffinityHead, train_set: AffinitySeeds, epochs: int, batch_size: int, lr: float,
                   radius: int, seed: int, device: torch.device | str = "cpu",
                   val_set: Optional[AffinitySeeds] = None, log: Optional[Callable[[dict], None]] = None) -> dict:
    """Adam on `affinity_loss`; keeps the epoch with the lowest loss on `val_set` (its seeds: label-free)."""
    device = torch.device(device)
    head.to(device)
    offsets = half_disk_offsets(radius)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed),
                                         drop_last=len(train_set) > batch_size)

    def train_epoch() -> float:
        running, batches = 0.0, 0
        for levels, seeds in loader:
            if seeds.shape[0] < 2:
                continue  # BatchNorm cannot train on one sample
            dist, inside = pair_distances(head([x.to(device) for x in levels]), offsets)
            loss, _ = affinity_loss(dist, inside, seeds.to(device), offsets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += float(loss.detach())
            batches += 1
        return running / max(batches, 1)

    validate = (lambda: evaluate_affinity(head, val_set, batch_size, radius, device)) \
        if val_set is not None and len(val_set) else None
    return train_keep_best(head, epochs, train_epoch, "affinity", validate, "affinity_val_loss", log)


@torch.no_grad()
def evaluate_affinity(head: AffinityHead, dataset: AffinitySeeds, batch_size: int, radius: int,
                      device: torch.device | str = "cpu") -> float:
    """Mean `affinity_loss` per batch over `dataset`."""
    head.eval()
    offsets = half_disk_offsets(radius)
    total, batches = 0.0, 0
    for levels, seeds in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        dist, inside = pair_distances(head([x.to(device) for x in levels]), offsets)
        total += float(affinity_loss(dist, inside, seeds.to(device), offsets)[0])
        batches += 1
    return total / max(batches, 1)


SUMMARY_KEYS = ("best_epoch", "best_score", "seconds", "feature_seconds", "train_images", "val_images",
                "seed_foreground_fraction", "seed_ignored_fraction")


def save_affinity(path: Path, head: AffinityHead, summary: dict) -> None:
    from weakseg.train.loop import save_checkpoint

    save_checkpoint(path, {"model": head.state_dict(), "in_channels": list(head.in_channels),
                           "widths": list(head.widths), "dim": head.dim,
                           "summary": {k: summary[k] for k in SUMMARY_KEYS if k in summary}})


def load_affinity(path: Path) -> tuple[AffinityHead, dict]:
    """-> (head in eval mode, its training summary)."""
    from weakseg.train.loop import load_checkpoint

    state = load_checkpoint(path)
    head = AffinityHead([int(c) for c in state["in_channels"]], [int(w) for w in state["widths"]], int(state["dim"]))
    head.load_state_dict(state["model"])
    return head.eval(), dict(state.get("summary", {}))


def cams_on_grid(cams: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """(K, H, W) CAMs at any size -> (K, gh, gw) float32 by area averaging (bilinear when upsampling)."""
    t = torch.from_numpy(np.ascontiguousarray(cams, dtype=np.float32))[None]
    if t.shape[1] == 0:
        return torch.zeros(0, *grid)
    bigger = t.shape[-2] >= grid[0] and t.shape[-1] >= grid[1]
    mode = {"mode": "area"} if bigger else {"mode": "bilinear", "align_corners": False}
    return F.interpolate(t, size=grid, **mode)[0]


def seed_grid(cam_dir: Path, ids: list[str], grid: tuple[int, int], seed_low: float, seed_high: float) -> np.ndarray:
    """Seeds of every image on the grid -> (N, gh, gw) uint8: class id where top CAM >= seed_high, 0 where
    < seed_low, 255 between (the `threshold_labels` band)."""
    from weakseg.io import load_cam
    from weakseg.masks.makers import threshold_labels

    seeds = np.empty((len(ids), *grid), dtype=np.uint8)
    for n, sid in enumerate(ids):
        cam, classes, _ = load_cam(cam_dir / f"{sid}.npz")
        seeds[n] = threshold_labels(cams_on_grid(cam, grid).numpy(), classes, seed_high, seed_low, seed_high)
    return seeds


def crf_seed_grid(ctx, ds, cam_dir: Path, grid: tuple[int, int], seed_low: float, seed_high: float) -> np.ndarray:
    """IRN's confident regions as seeds -> (N, gh, gw) uint8: the dense CRF of the `crf` maker run twice on each
    image's CAMs, class where the pass with its background plane at `seed_high` says foreground, 0 where the
    pass at `seed_low` says background, 255 elsewhere; sampled at the grid cells' centres.

    The seed maps (full size, or `masks.affinity_seed_scale` of it) go to `<stage>/affinity_seeds/` (in
    `masks.num_workers` processes); a resumed attempt keeps the ones already written.
    """
    from dataclasses import replace

    from weakseg.io import load_label_png
    from weakseg.masks.makers import CrfMaker
    from weakseg.masks.stage import MaskJob, make_masks

    mc = ctx.cfg.masks
    scale = mc.affinity_seed_scale  # in (0, 1]: checked by the affinity makers
    seed_dir = ctx.out / "affinity_seeds"
    seed_dir.mkdir(parents=True, exist_ok=True)
    maker = CrfMaker(replace(mc, method="crf", ignore_low=seed_low, ignore_high=seed_high,
                             crf_gaussian_sxy=mc.crf_gaussian_sxy * scale,
                             crf_bilateral_sxy=mc.crf_bilateral_sxy * scale))
    todo = [i for i, sid in enumerate(ds.ids) if not (seed_dir / f"{sid}.png").exists()]
    make_masks(MaskJob(ds, maker, cam_dir, seed_dir, binary=False, scale=scale), todo, mc.num_workers,
               desc="affinity seeds (CRF)")
    seeds = np.empty((len(ds.ids), *grid), dtype=np.uint8)
    for n, sid in enumerate(ds.ids):
        labels = torch.from_numpy(load_label_png(seed_dir / f"{sid}.png"))[None, None].float()
        seeds[n] = F.interpolate(labels, size=grid, mode="nearest-exact")[0, 0].numpy().astype(np.uint8)
    return seeds


def feature_paths(stage_dir: Path) -> list[Path]:
    """The frozen backbone's levels of every training image (float16 memmaps), written by `fit_affinity_for_run`."""
    return [stage_dir / "checkpoints" / f"affinity_level{i}.npy" for i in range(AFFINITY_LEVELS)]


class StoredLevels:
    """Image n's stored levels [(1, C_i, h_i, w_i)] float32, from `feature_paths` (opened on first use, so that
    forked workers open their own read-only maps); None when the files are gone."""

    def __init__(self, paths: list[Path], ids: list[str]):
        self.paths, self.index = paths, {sid: n for n, sid in enumerate(ids)}
        self.maps: Optional[list[np.ndarray]] = None

    def available(self) -> bool:
        return all(p.exists() for p in self.paths)

    def __call__(self, sample_id: str) -> Optional[list[torch.Tensor]]:
        if self.maps is None:
            if not self.available():
                return None
            self.maps = [np.load(p, mmap_mode="r") for p in self.paths]
        n = self.index[sample_id]
        return [torch.from_numpy(np.asarray(m[n], dtype=np.float32))[None] for m in self.maps]

    def delete(self) -> None:
        self.maps = None
        for p in self.paths:
            p.unlink(missing_ok=True)


def fit_affinity_for_run(ctx, ds, cam_dir: Path, backbone: nn.Module) -> tuple[AffinityHead, dict]:
    """Train (rank 0, once per attempt) or load masks/affinity.pt -> (head in eval mode, metrics).

    Label-free: the seeds come from this run's CAMs; the epoch with the lowest affinity loss on the seeded
    hold-out images (data.val_fraction) is kept.
    """
    from weakseg import dist
    from weakseg.data import train_val_indices
    from weakseg.masks.refiner import extract_feature_maps
    from weakseg.models.backbones import normalizer

    mc = ctx.cfg.masks
    path = ctx.out / "affinity.pt"
    if dist.is_main_process() and not path.exists():
        size = mc.affinity_image_size
        normalize = normalizer(backbone.mean, backbone.std)
        backbone.eval()
        t0 = time.time()
        paths = feature_paths(ctx.out)
        levels = extract_feature_maps(lambda x: backbone.forward_pyramid(normalize(x), AFFINITY_LEVELS), ds, size,
                                      paths, device=ctx.device)
        feature_seconds = time.time() - t0
        grid = tuple(levels[0].shape[-2:])
        if mc.affinity_seeds == "crf":
            seeds = crf_seed_grid(ctx, ds, cam_dir, grid, mc.affinity_seed_low, mc.affinity_seed_high)
        else:
            seeds = seed_grid(cam_dir, ds.ids, grid, mc.affinity_seed_low, mc.affinity_seed_high)
        train_idx, val_idx = train_val_indices(len(ds), ctx.cfg.data.val_fraction, ctx.cfg.seed)
        torch.manual_seed(ctx.cfg.seed)
        head = AffinityHead([level.shape[1] for level in levels])
        summary = train_affinity(head, AffinitySeeds(levels, seeds, train_idx), mc.affinity_epochs,
                                 mc.affinity_batch_size, mc.affinity_lr, mc.affinity_radius, ctx.cfg.seed, ctx.device,
                                 AffinitySeeds(levels, seeds, val_idx), log=ctx.log)
        summary.update(feature_seconds=round(feature_seconds, 1), train_images=len(train_idx),
                       val_images=len(val_idx), seed_foreground_fraction=float(((seeds > 0) & (seeds < IGNORE)).mean()),
                       seed_ignored_fraction=float((seeds == IGNORE).mean()))
        save_affinity(path, head, summary)
        del levels  # the files stay: the maker walks from them (`stored_levels`) and deletes them when done
    dist.barrier()
    head, summary = load_affinity(path)
    return head.to(ctx.device), {"affinity_" + k: v for k, v in summary.items()}


@torch.no_grad()
def walk_image(backbone: nn.Module, head: AffinityHead, image: np.ndarray, cams: np.ndarray, image_size: int,
               radius: int, beta: float, iterations: int, device: torch.device | str = "cpu",
               levels: Optional[list[torch.Tensor]] = None, background: Optional[np.ndarray] = None) -> np.ndarray:
    """image (H, W, 3) uint8, cams (K, H, W) -> walked scores (K, H, W) float32, divided by their global max.

    `levels`: the backbone's levels of this image at `image_size` if already at hand (`StoredLevels`).
    `background` (H, W): a background map walked with the CAMs -> (1 + K, H, W), the background first.
    """
    from weakseg.data.torch_datasets import resize_image, to_float_tensor
    from weakseg.models.backbones import normalizer

    h, w = cams.shape[1:]
    if cams.shape[0] == 0:
        return np.zeros((0, h, w), dtype=np.float32)
    if levels is None:
        x = resize_image(to_float_tensor(image), (image_size, image_size))[None].to(device)
        levels = backbone.forward_pyramid(normalizer(backbone.mean, backbone.std)(x), AFFINITY_LEVELS)
    if background is not None:
        cams = np.concatenate([background[None], cams]).astype(np.float32)
    embedding = head([level.to(device) for level in levels])  # (1, E, gh, gw)
    offsets = disk_offsets(radius)
    dist, inside = pair_distances(embedding, offsets)
    weights = transition_weights(dist[0], inside, beta)
    walked = random_walk(cams_on_grid(cams, tuple(embedding.shape[-2:])).to(device), weights, offsets, iterations)
    walked = F.interpolate(walked[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return (walked / walked.max().clamp_min(1e-6)).cpu().numpy()


def check_probability_walk(cfg) -> None:
    """`train_seg.infer_affinity_walk` of a `PipelineCfg`: 0 (off) or more steps, and only on a masks stage that
    learns an affinity head."""
    from weakseg.config import ConfigError
    from weakseg.masks.makers import AFFINITY_MAKERS

    steps, method = cfg.train_seg.infer_affinity_walk, cfg.masks.method
    if steps < 0 or (steps and method not in AFFINITY_MAKERS):
        raise ConfigError(f"train_seg.infer_affinity_walk={steps}: the steps of the random walk on the masks stage's "
                          f"affinities at inference, 0 (off) or more, and only with masks.method "
                          f"{' or '.join(AFFINITY_MAKERS)} (this run's: {method})")


class ProbabilityWalk:
    """Inference-time refinement of a segmentation model's output: the masks stage's random walk applied to the
    model's class probabilities (background included) on the affinities of the same image, each pixel then
    renormalised. The walk runs on the affinity grid (`image_size` / stride), so the result is as coarse as the
    walked CAMs were; the inference CRF, when on, restores the image's edges after it."""

    def __init__(self, backbone: nn.Module, head: AffinityHead, image_size: int, radius: int, beta: float,
                 iterations: int, device: torch.device | str = "cpu"):
        if iterations <= 0:
            raise ValueError(f"ProbabilityWalk needs iterations > 0, got {iterations}")
        self.backbone, self.head = backbone.eval(), head.eval()
        self.image_size, self.radius, self.beta, self.iterations = image_size, radius, beta, iterations
        self.device = torch.device(device)

    @torch.inference_mode()
    def __call__(self, image: np.ndarray, probs: torch.Tensor) -> torch.Tensor:
        """image (H, W, 3) uint8, probs (C, H, W) -> walked probabilities (C, H, W) float32, summing to 1."""
        walked = torch.from_numpy(walk_image(self.backbone, self.head, image, probs.float().cpu().numpy(),
                                             self.image_size, self.radius, self.beta, self.iterations, self.device))
        return walked / walked.sum(0, keepdim=True).clamp_min(1e-12)


def load_probability_walk(cfg, run_dir: Path, iterations: int, device: torch.device | str = "cpu") -> ProbabilityWalk:
    """The walk of `run_dir`'s affinity head (masks/affinity.pt) on its classifier's features (train-cls/model.pt),
    with the masks stage's radius, beta and image size from `cfg` (a `PipelineCfg`)."""
    from weakseg.io import read_json
    from weakseg.runs import StageError, verify_outputs
    from weakseg.train.classifier import load_trained_classifier

    check_probability_walk(cfg)
    mc = cfg.masks
    run_dir = Path(run_dir)
    for stage, product in (("train-cls", "model.pt"), ("masks", "affinity.pt")):
        ok, reason = verify_outputs(run_dir / stage)
        if not ok or not (run_dir / stage / product).is_file():
            raise StageError(f"{run_dir / stage / product}: train_seg.infer_affinity_walk needs this file of a "
                             f"completed {stage} stage ({reason if not ok else 'missing'}); redo the run's {stage} "
                             "stage or set train_seg.infer_affinity_walk=0")
    # the classifier's own classes (Pet's breeds), which need not be the segmentation's (pet / background)
    try:
        num_foreground = len(read_json(run_dir / "train-cls" / "data.json")["dataset"]["classes"]) - 1
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StageError(f"{run_dir / 'train-cls' / 'data.json'}: cannot read the classifier's classes ({e!r}); "
                         "redo the run's train-cls stage or set train_seg.infer_affinity_walk=0") from e
    classifier = load_trained_classifier(cfg, num_foreground, run_dir / "train-cls" / "model.pt")
    head, _ = load_affinity(run_dir / "masks" / "affinity.pt")
    return ProbabilityWalk(classifier.backbone.to(device), head.to(device), mc.affinity_image_size, mc.affinity_radius,
                           mc.affinity_beta, iterations, device)
