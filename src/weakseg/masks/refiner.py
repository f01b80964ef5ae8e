"""The weaktr-refinery CNN-decoder refiner: a small conv decoder trained on frozen classifier features to
reproduce the CAM; pseudo-masks come from the per-pixel normalised decoder-vs-CAM loss (`loss_threshold`).

Differences from weaktr-refinery, on purpose:
  - the clipped loss covers every window of the map (padded tiling), not only the top-left 120 x 120;
  - polarity: refinery writes 1 = low loss (which is background, and scores it as positive). Here low-loss
    pixels are background (0) and the rest get a class id, so the foreground is always the positive class;
  - one decoder output per foreground class, trained on the CAMs of the image's present classes (refinery:
    one output for the predicted class). Features are the backbone's `forward_features` (ViT: after the
    final norm; refinery took the pre-norm tokens). The learning rate is constant, as in refinery.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from weakseg.train.loop import train_keep_best
from weakseg.train.losses import window_means

DECODER_WIDTHS = {"small": (64, 32, 16), "medium": (128, 64, 32), "large": (256, 128, 64)}


class RefinerDecoder(nn.Module):
    """features (B, D, h, w) -> logits (B, num_outputs, 16h, 16w).

    conv3x3-BN-ReLU-up2, conv3x3-BN-ReLU-up2, conv3x3-(BN, large only)-ReLU-up4, conv1x1; Kaiming-normal convs.
    """

    def __init__(self, in_channels: int, num_outputs: int = 1, size: str = "medium"):
        super().__init__()
        if size not in DECODER_WIDTHS:
            raise ValueError(f"unknown refiner size {size!r}; valid names: {', '.join(DECODER_WIDTHS)}")
        c1, c2, c3 = DECODER_WIDTHS[size]
        self.in_channels, self.num_outputs, self.size = in_channels, num_outputs, size
        self.block1 = nn.Sequential(nn.Conv2d(in_channels, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(inplace=True))
        self.block2 = nn.Sequential(nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(inplace=True))
        norm3 = nn.BatchNorm2d(c3) if size == "large" else nn.Identity()
        self.block3 = nn.Sequential(nn.Conv2d(c2, c3, 3, padding=1), norm3, nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(c3, num_outputs, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def low_res_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """features (B, D, h, w) -> logits (B, num_outputs, 4h, 4w) before the last x4 upsampling.

        The 1x1 classifier commutes with bilinear upsampling (both linear, the interpolation weights sum to 1),
        so applying it first gives the same logits while upsampling num_outputs instead of c3 channels; callers
        that need a few class channels upsample only those (`refiner_forward`).
        """
        x = F.interpolate(self.block1(feats), scale_factor=2, mode="bilinear", align_corners=False)
        x = F.interpolate(self.block2(x), scale_factor=2, mode="bilinear", align_corners=False)
        return self.classifier(self.block3(x))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.low_res_logits(feats), scale_factor=4, mode="bilinear", align_corners=False)


def clipped_refiner_loss(logits: torch.Tensor, target: torch.Tensor, window: int = 120,
                         tau: float = 1.2) -> torch.Tensor:
    """refinery's `compute_clipped_loss` over every window: logits, target (N, H, W) soft CAMs -> scalar.

    l_p = BCE(z_p, y_p); g_p = |dL_w/dz_p| with L_w = sum(l*clip(y)) / sum(clip(y)); per map and window i,
    lambda_i = mean g, lambda_glob = mean_i lambda_i; keep p if g_p <= tau * max(lambda_i(p), lambda_glob);
    loss = mean over maps of sum(l * keep) / sum(keep).
    """
    pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    with torch.no_grad():
        weight = target.clamp(0, 1)
        grad = (torch.sigmoid(logits) - target).abs() * weight / weight.sum().clamp_min(1e-12)
        local, per_window = window_means(grad, window)
        global_mean = per_window.flatten(1).mean(dim=1)[:, None, None]
        keep = (grad <= tau * torch.maximum(local, global_mean)).to(pixel.dtype)
    per_map = (pixel * keep).sum(dim=(1, 2)) / keep.sum(dim=(1, 2)).clamp_min(1.0)
    return per_map.mean()


def cam_weighted_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """refinery's validation loss L_w = sum(BCE * clip(y, 0, 1)) / sum(clip(y, 0, 1)); (N, H, W) -> scalar."""
    weight = target.clamp(0, 1)
    pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (pixel * weight).sum() / weight.sum().clamp_min(1e-12)


def normalised_loss_maps(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(K, H, W) -> per-map (L - min L) / (max L + 1e-6) of the per-pixel BCE (refinery's normaliser)."""
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    flat = loss.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    return (loss - lo) / (hi + 1e-6)


def loss_threshold_labels(norm_loss: np.ndarray, probs: np.ndarray, classes: np.ndarray,
                          loss_threshold: float) -> np.ndarray:
    """norm_loss, probs (K, H, W), classes (K,) 1-based -> (H, W) uint8.

    Background (0) where every class's normalised loss is <= loss_threshold (refinery's mask = 1 region);
    elsewhere the class whose map exceeds the threshold with the highest decoder probability.
    """
    h, w = norm_loss.shape[1:]
    if norm_loss.shape[0] == 0:
        return np.zeros((h, w), dtype=np.uint8)
    above = norm_loss > loss_threshold
    best = np.where(above, probs, -1.0).argmax(axis=0)
    labels = np.asarray(classes, dtype=np.uint8)[best]
    return np.where(above.any(axis=0), labels, 0).astype(np.uint8)


class RefinerPairs(torch.utils.data.Dataset):
    """One item per (image, present class): (features (D, h, w) float32, channel, CAM target (S, S) float32)."""

    def __init__(self, features: np.ndarray, pairs: list[tuple[int, int]],
                 target_fn: Callable[[int, int], np.ndarray]):
        self.features, self.pairs, self.target_fn = features, pairs, target_fn

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int):
        n, channel = self.pairs[k]
        feats = torch.from_numpy(np.asarray(self.features[n], dtype=np.float32))
        return feats, channel, torch.from_numpy(self.target_fn(n, channel).astype(np.float32))


def refiner_forward(decoder: RefinerDecoder, feats: torch.Tensor, channels: torch.Tensor, size: int) -> torch.Tensor:
    """feats (B, D, h, w), channels (B,) or (B, K) class channels -> their logits (B, size, size) / (B, K, S, S).

    The same values as selecting the channels of `decoder(feats)` resized to (size, size), but only the selected
    channels are upsampled (a training step at VOC's shapes 1.8x faster: `python -m bench.refiner_step`).
    """
    low = decoder.low_res_logits(feats)
    rows = torch.arange(len(channels), device=low.device)
    picked = low[rows[:, None], channels] if channels.ndim == 2 else low[rows, channels][:, None]
    logits = F.interpolate(picked, scale_factor=4, mode="bilinear", align_corners=False)
    if logits.shape[-1] != size or logits.shape[-2] != size:
        logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
    return logits if channels.ndim == 2 else logits[:, 0]


def train_refiner(decoder: RefinerDecoder, train_set: torch.utils.data.Dataset, epochs: int, batch_size: int,
                  lr: float, window: int, tau: float, seed: int, device: torch.device | str = "cpu",
                  val_set: Optional[torch.utils.data.Dataset] = None,
                  log: Optional[Callable[[dict], None]] = None) -> dict:
    """Adam on the clipped loss; keeps the epoch with the lowest CAM-weighted BCE on `val_set` (label-free).

    Items of the datasets: (features (D, h, w), channel, target (S, S)). Returns a summary dict.
    """
    device = torch.device(device)
    decoder.to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator,
                                         drop_last=len(train_set) > batch_size)

    def train_epoch() -> float:
        running, count = 0.0, 0
        for feats, channels, target in loader:
            feats, channels, target = feats.to(device), channels.to(device), target.to(device)
            if feats.shape[0] < 2 and any(isinstance(m, nn.BatchNorm2d) for m in decoder.modules()):
                continue  # BatchNorm cannot train on a single sample
            loss = clipped_refiner_loss(refiner_forward(decoder, feats, channels, target.shape[-1]), target, window,
                                        tau)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += float(loss.detach()) * feats.shape[0]
            count += feats.shape[0]
        return running / max(count, 1)

    validate = (lambda: evaluate_refiner(decoder, val_set, batch_size, device)) \
        if val_set is not None and len(val_set) else None
    return train_keep_best(decoder, epochs, train_epoch, "refiner", validate, "refiner_val_weighted_bce", log)


@torch.no_grad()
def evaluate_refiner(decoder: RefinerDecoder, dataset: torch.utils.data.Dataset, batch_size: int,
                     device: torch.device | str = "cpu") -> float:
    """Mean CAM-weighted BCE over `dataset` (refinery's validation loss; no pixel labels)."""
    decoder.eval()
    total, count = 0.0, 0
    for feats, channels, target in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        feats, channels, target = feats.to(device), channels.to(device), target.to(device)
        total += float(cam_weighted_bce(refiner_forward(decoder, feats, channels, target.shape[-1]), target)) \
            * feats.shape[0]
        count += feats.shape[0]
    return total / max(count, 1)


SUMMARY_KEYS = ("best_epoch", "best_score", "seconds", "feature_seconds", "train_pairs", "val_pairs")


def save_refiner(path: Path, decoder: RefinerDecoder, summary: dict) -> None:
    """Decoder weights + architecture + the scalar training summary (SUMMARY_KEYS)."""
    from weakseg.train.loop import save_checkpoint

    save_checkpoint(path, {"model": decoder.state_dict(), "in_channels": decoder.in_channels,
                           "num_outputs": decoder.num_outputs, "size": decoder.size,
                           "summary": {k: summary[k] for k in SUMMARY_KEYS if k in summary}})


def load_refiner(path: Path) -> tuple[RefinerDecoder, dict]:
    """-> (decoder in eval mode, its training summary)."""
    from weakseg.train.loop import load_checkpoint

    state = load_checkpoint(path)
    decoder = RefinerDecoder(int(state["in_channels"]), int(state["num_outputs"]), str(state["size"]))
    decoder.load_state_dict(state["model"])
    return decoder.eval(), dict(state.get("summary", {}))


class _ResizedImages(torch.utils.data.Dataset):
    def __init__(self, ds, size: int):
        self.ds, self.size = ds, size

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        from weakseg.data.torch_datasets import resize_image, to_float_tensor

        return resize_image(to_float_tensor(self.ds.image(i)), (self.size, self.size))


@torch.no_grad()
def extract_feature_maps(forward: Callable[[torch.Tensor], Sequence[torch.Tensor]], ds, size: int,
                         paths: Sequence[Path], batch_size: int = 16, device: torch.device | str = "cpu",
                         num_workers: int = 0) -> list[np.ndarray]:
    """`forward` ((B, 3, S, S) in [0, 1] -> maps [(B, D_i, h_i, w_i)]) of every image resized to (size, size)
    -> one (N, D_i, h_i, w_i) float16 memmap per map, at `paths`."""
    from tqdm import tqdm

    from weakseg import dist

    loader = torch.utils.data.DataLoader(_ResizedImages(ds, size), batch_size=batch_size, num_workers=num_workers)
    out: list[np.ndarray] = []
    start = 0
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    for x in tqdm(loader, desc="features", disable=not dist.is_main_process(), dynamic_ncols=True):
        maps = [m.float().cpu().numpy() for m in forward(x.to(device))]
        if len(maps) != len(paths):
            raise ValueError(f"feature extraction gave {len(maps)} maps for {len(paths)} files")
        if not out:
            out = [np.lib.format.open_memmap(p, mode="w+", dtype=np.float16, shape=(len(ds), *m.shape[1:]))
                   for p, m in zip(paths, maps)]
        for store, m in zip(out, maps):
            store[start:start + len(m)] = m
        start += len(maps[0])
    if not out:
        raise ValueError("no images to extract features from")
    for store in out:
        store.flush()
    return out


def extract_features(backbone: nn.Module, ds, size: int, path: Path, batch_size: int = 16,
                     device: torch.device | str = "cpu", num_workers: int = 0) -> np.ndarray:
    """Frozen `backbone.forward_features` of every image resized to (size, size) -> (N, D, h, w) float16 memmap.

    `backbone` needs `mean`, `std` and `forward_features((B, 3, S, S)) -> (B, D, h, w)`.
    """
    from weakseg.models.backbones import normalizer

    normalize = normalizer(backbone.mean, backbone.std)
    backbone.eval()
    return extract_feature_maps(lambda x: [backbone.forward_features(normalize(x))], ds, size, [path], batch_size,
                                device, num_workers)[0]


def cam_targets(cam_dir: Path, ids: list[str], size: int) -> tuple[list[tuple[int, int]], Callable]:
    """-> ((image index, 0-based class channel) pairs of every present class, target_fn(n, channel) -> (S, S))."""
    from weakseg.io import load_cam

    pairs = []
    for n, sid in enumerate(ids):
        _, classes, _ = load_cam(cam_dir / f"{sid}.npz")
        pairs.extend((n, int(c) - 1) for c in classes)

    def target(n: int, channel: int) -> np.ndarray:
        cam, classes, _ = load_cam(cam_dir / f"{ids[n]}.npz")
        k = int(np.flatnonzero(classes == channel + 1)[0])
        t = torch.from_numpy(cam[k])[None, None]
        return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()

    return pairs, target


def fit_refiner_for_run(ctx, ds, cam_dir: Path, classifier: nn.Module) -> tuple[RefinerDecoder, dict]:
    """Train (rank 0, once per attempt) or load masks/refiner.pt for this run -> (decoder in eval mode, metrics).

    Trained label-free on the CAMs + frozen classifier features of the train split; the epoch with the lowest
    CAM-weighted BCE on the seeded hold-out (data.val_fraction) is kept.
    """
    from weakseg import dist
    from weakseg.data import train_val_indices

    mc = ctx.cfg.masks
    backbone = getattr(classifier, "backbone", None)
    if backbone is None or not hasattr(backbone, "forward_features"):
        raise ValueError(f"masks.method=refiner needs a classifier with a `backbone.forward_features`; "
                         f"train_cls.model={getattr(ctx.cfg.train_cls, 'model', '?')!r} has none")
    path = ctx.out / "refiner.pt"
    if dist.is_main_process() and not path.exists():
        feat_path = ctx.out / "checkpoints" / "refiner_features.npy"
        t0 = time.time()
        features = extract_features(backbone, ds, mc.refiner_image_size, feat_path, device=ctx.device)
        feature_seconds = time.time() - t0
        pairs, target_fn = cam_targets(cam_dir, ds.ids, mc.refiner_image_size)
        train_idx, val_idx = train_val_indices(len(ds), ctx.cfg.data.val_fraction, ctx.cfg.seed)
        val_images = set(val_idx)
        train_set = RefinerPairs(features, [p for p in pairs if p[0] not in val_images], target_fn)
        val_set = RefinerPairs(features, [p for p in pairs if p[0] in val_images], target_fn)
        if len(train_set) == 0:
            raise ValueError("masks.method=refiner: no training image has a present class to learn from")
        torch.manual_seed(ctx.cfg.seed)
        decoder = RefinerDecoder(features.shape[1], ds.num_classes - 1, mc.refiner_size)
        summary = train_refiner(decoder, train_set, mc.refiner_epochs, mc.refiner_batch_size, mc.refiner_lr,
                                mc.refiner_window, mc.refiner_tau, ctx.cfg.seed, ctx.device, val_set, log=ctx.log)
        summary["feature_seconds"] = round(feature_seconds, 1)
        summary["train_pairs"], summary["val_pairs"] = len(train_set), len(val_set)
        save_refiner(path, decoder, summary)
        del features
        feat_path.unlink(missing_ok=True)
    dist.barrier()
    decoder, summary = load_refiner(path)
    return decoder.to(ctx.device), {"refiner_" + k: v for k, v in summary.items()}
