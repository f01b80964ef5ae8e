"""`train-cls` for class-specific CCAM (train_cls.model=class_specific_ccam): class-homogeneous batches and
per-class checkpoint selection without pixel labels.

- Every training image enters once per labelled class k, as a sample of head k; images without a label
  (e.g. data.background_dir images) enter once with no head and only train the linear probe (as negatives).
- Batches are drawn per class (seeded per epoch, batch order shuffled), so head k only ever sees images of
  class k in a batch, as the reference's per-class training loops did.
- Selection, frozen backbone: head k keeps the epoch with the lowest CCAM loss on the held-out images of
  class k (the seeded data.val_fraction hold-out restricted to that class, in chunks of at most batch_size,
  BatchNorm on the chunk's statistics as in training); the probe keeps the epoch with the lowest held-out BCE.
  model.pt is assembled from these. Heads without held-out images keep the last epoch. Shared backbone: one
  epoch for everything (lowest held-out summed loss), since the heads share it.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from weakseg import dist
from weakseg.runs import StageContext
from weakseg.train.loop import FitResult, load_checkpoint, save_checkpoint


def expand_by_class(ds, indices: list[int]) -> tuple[list[int], list[int]]:
    """Dataset indices -> (entry image indices, entry groups): one entry per labelled class, -1 if none."""
    images, groups = [], []
    for i in indices:
        classes = np.flatnonzero(np.asarray(ds.labels(i)) > 0.5)
        for k in classes.tolist() or [-1]:
            images.append(i)
            groups.append(int(k))
    return images, groups


def grouped_batches(groups: list[int], batch_size: int, seed: int, epoch: int, min_size: int = 2,
                    shuffle: bool = True) -> list[list[int]]:
    """This rank's batches of entry positions; every batch holds entries of one group only.

    Each group's entries are permuted with (seed, epoch, group), cut into batches of `batch_size` (a last
    partial batch is kept if it has at least `min_size` entries, or if it is the group's only batch), then
    the batch order is shuffled. Ranks take a strided share of each batch, as `epoch_batches` does.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    per_rank = max(1, batch_size // world)
    global_bs = per_rank * world
    by_group: dict[int, list[int]] = {}
    for pos, g in enumerate(groups):
        by_group.setdefault(g, []).append(pos)
    batches: list[list[int]] = []
    for g in sorted(by_group):
        members = by_group[g]
        if shuffle:
            order = np.random.default_rng([seed, 104729, epoch, g + 1]).permutation(len(members))
            members = [members[j] for j in order]
        chunks = [members[s:s + global_bs] for s in range(0, len(members), global_bs)]
        batches.extend(c for j, c in enumerate(chunks) if len(c) >= min_size or len(chunks) == 1)
    if shuffle:
        order = np.random.default_rng([seed, 7, epoch]).permutation(len(batches))
        batches = [batches[j] for j in order]
    out = [b[rank::world] for b in batches]
    return [b for b in out if b]


class GroupedClassification(torch.utils.data.Dataset):
    """(image, labels, group) for each entry of `expand_by_class`; `epoch` drives the augmentation."""

    def __init__(self, base: torch.utils.data.Dataset, groups: list[int]):
        self.base, self.groups = base, list(groups)

    @property
    def epoch(self) -> int:
        return self.base.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.base.epoch = value

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, k: int):
        x, y = self.base[k]
        return x, y, torch.tensor(self.groups[k], dtype=torch.long)


class ClassSpecificTraining:
    """Datasets, batches, loss, validation and per-head selection for one `train-cls` run."""

    def __init__(self, ctx: StageContext, model, ds, train_idx: list[int], val_idx: list[int], normalize):
        from weakseg.data.torch_datasets import ClassificationDataset

        tc = ctx.cfg.train_cls
        self.ctx, self.model, self.ds, self.normalize = ctx, model, ds, normalize
        self.batch_size, self.seed = tc.batch_size, ctx.cfg.seed
        self.class_names = ds.class_names[1:]
        train_images, self.train_groups = expand_by_class(ds, train_idx)
        val_images, self.val_groups = expand_by_class(ds, val_idx)
        self.train_set = GroupedClassification(
            ClassificationDataset(ds, train_images, tc.image_size, train=True, seed=self.seed), self.train_groups)
        self.val_set = GroupedClassification(
            ClassificationDataset(ds, val_images, tc.image_size, train=False), self.val_groups)
        model.touch_all_heads = dist.is_distributed()  # DDP: every head in every graph (zero gradient)
        self.per_head = model.frozen
        self.selection_path = ctx.out / "checkpoints" / "head_selection.pt"
        self.best: dict = {"heads": {}, "probe": None}
        if self.selection_path.exists():  # resumed run: keep what earlier epochs selected
            self.best = load_checkpoint(self.selection_path)

    # --- fit() hooks ---------------------------------------------------------------------------------------
    def batches(self, epoch: int) -> list[list[int]]:
        return grouped_batches(self.train_groups, self.batch_size, self.seed, epoch)

    def loss_fn(self, m, batch) -> torch.Tensor:
        x, y, g = batch
        return m(self.normalize(x), targets=y, groups=g)

    @torch.no_grad()
    def validate(self, m) -> dict:
        if len(self.val_set) == 0:
            return {"val_loss": 0.0}
        sums: dict[int, float] = {}
        counts: dict[int, int] = {}
        bce_sum, bce_n = 0.0, 0
        scores, labels, seen = [], [], set()
        images = self.val_set.base.indices
        for chunk in self._val_chunks():
            items = [self.val_set[j] for j in chunk]
            x = torch.stack([it[0] for it in items]).to(self.ctx.device)
            y = torch.stack([it[1] for it in items]).to(self.ctx.device)
            g = torch.stack([it[2] for it in items]).to(self.ctx.device)
            z = m.features(self.normalize(x))
            logits = m.probe_logits(z)
            first = [n for n, j in enumerate(chunk) if images[j] not in seen]  # one probe score per image
            seen.update(images[j] for j in chunk)
            if first:
                sel = torch.as_tensor(first, device=y.device)
                bce_sum += float(F.binary_cross_entropy_with_logits(logits[sel], y[sel], reduction="sum"))
                bce_n += int(y[sel].numel())
                scores.append(torch.sigmoid(logits[sel]).cpu().numpy())
                labels.append(y[sel].cpu().numpy())
            for k, (loss, n) in m.group_losses(z, g, batch_stats=True).items():
                sums[k] = sums.get(k, 0.0) + float(loss) * n
                counts[k] = counts.get(k, 0) + n
        from weakseg.train.classifier import mean_average_precision

        head_loss = {k: sums[k] / counts[k] for k in sums}
        bce = bce_sum / max(bce_n, 1)
        total = sum(counts.values())
        out = {"val_loss": bce + (sum(sums.values()) / total if total else 0.0), "val_bce": bce,
               "val_mAP": mean_average_precision(np.concatenate(scores), np.concatenate(labels)) if scores
               else float("nan")}
        out.update({f"val_ccam_loss/{self.class_names[k]}": v for k, v in sorted(head_loss.items())})
        if self.per_head:
            self._select(m, head_loss, counts, bce)
        return out

    def _val_chunks(self) -> list[list[int]]:
        """Held-out entries of each group in nearly equal chunks of at most batch_size (no tiny last chunk)."""
        by_group: dict[int, list[int]] = {}
        for pos, g in enumerate(self.val_groups):
            by_group.setdefault(g, []).append(pos)
        chunks = []
        for g in sorted(by_group):
            members = by_group[g]
            n_chunks = max(1, math.ceil(len(members) / self.batch_size))
            chunks.extend(c.tolist() for c in np.array_split(np.asarray(members), n_chunks) if len(c))
        return chunks

    def _select(self, m, head_loss: dict[int, float], counts: dict[int, int], bce: float) -> None:
        epoch = int(self.train_set.epoch) + 1
        for k, loss in head_loss.items():
            old = self.best["heads"].get(k)
            if old is None or loss < old["loss"]:
                self.best["heads"][k] = {"epoch": epoch, "loss": loss, "images": counts[k],
                                         "state": m.head_state(k)}
        old = self.best["probe"]
        if old is None or bce < old["loss"]:
            self.best["probe"] = {"epoch": epoch, "loss": bce,
                                  "state": {n: t.detach().clone() for n, t in m.probe.state_dict().items()}}
        if dist.is_main_process():
            save_checkpoint(self.selection_path, self.best)

    # --- after fit() -----------------------------------------------------------------------------------------
    def finish(self, result: FitResult) -> dict:
        """Frozen backbone: write model.pt assembled from each head's (and the probe's) selected epoch."""
        trained = {g for g in self.train_groups if g >= 0}
        untrained = [self.class_names[k] for k in range(len(self.class_names)) if k not in trained]
        info: dict = {"ccam_backbone": self.model.backbone_mode, "untrained_heads": untrained,
                      "train_entries": len(self.train_set), "val_entries": len(self.val_set)}
        if not self.per_head:
            info["selection"] = ("one epoch for all heads (shared backbone): lowest held-out CCAM + probe loss on "
                                 "image-level labels (no pixel labels)")
            return info
        model = self.model
        heads = {}
        for k, name in enumerate(self.class_names):
            chosen: Optional[dict] = self.best["heads"].get(k)
            if chosen is None:
                heads[name] = {"epoch": "last", "why": "no held-out image of this class"}
                continue
            model.load_head_state(k, chosen["state"])
            heads[name] = {"epoch": chosen["epoch"], "val_ccam_loss": chosen["loss"], "val_images": chosen["images"]}
        if self.best["probe"] is not None:
            model.probe.load_state_dict(self.best["probe"]["state"])
        if dist.is_main_process():
            save_checkpoint(self.ctx.out / "model.pt", {"model": model.state_dict(), "epoch": result.best_epoch,
                                                        "head_epochs": {n: h["epoch"] for n, h in heads.items()}})
        dist.barrier()
        info.update(selection=("per class: each head keeps the epoch with the lowest CCAM loss on the held-out "
                               "images of its class; the probe the lowest held-out BCE (no pixel labels)"),
                    head_selection=heads,
                    probe_epoch=self.best["probe"]["epoch"] if self.best["probe"] is not None else "last")
        return info
