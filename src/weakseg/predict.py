"""`weakseg predict`: one palette PNG label map per input image (same stem, same size as the input)."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from weakseg import dist
from weakseg.config import inference_only_keys, load_config
from weakseg.data.imageio import list_images, read_image
from weakseg.io import read_json, save_label_png
from weakseg.models.inference import SegPredictor
from weakseg.runs import StageError, require_all_written, verify_outputs
from weakseg.train.calibration import load_class_weights
from weakseg.train.segmentation import load_trained_seg_model, probability_walk_for


def load_predictor(run_dir: str | Path, device: str = "auto",
                   crf_workers: int | None = None) -> tuple[SegPredictor, list[str]]:
    """Rebuild the trained segmentation model of `run_dir` (weights from its train-seg stage); `crf_workers`
    replaces the run's train_seg.infer_crf_workers."""
    seg_dir = Path(run_dir) / "train-seg"
    if not (seg_dir / "done.json").exists():
        raise FileNotFoundError(f"{seg_dir}: no completed train-seg stage in this run directory")
    cfg = load_config(seg_dir / "config.yaml")
    evaluated = Path(run_dir) / "evaluate"
    if (evaluated / "done.json").exists():  # inference-only keys (e.g. the CRF) may be set after training, without
        scored = load_config(evaluated / "config.yaml")  # retraining: predict as the run was last scored
        for key in inference_only_keys(cfg)["train_seg"]:
            setattr(cfg.train_seg, key, getattr(scored.train_seg, key))
    class_names = read_json(seg_dir / "classes.json")["class_names"]
    model = load_trained_seg_model(cfg.train_seg.model, len(class_names), seg_dir / "model.pt")
    sc = cfg.train_seg
    if crf_workers is not None:
        sc.infer_crf_workers = crf_workers
    dev = dist.resolve_device(device if device != "auto" else cfg.device)
    weights = load_class_weights(seg_dir, sc.calibration)
    walk = probability_walk_for(cfg, Path(run_dir), dev)
    return SegPredictor.from_config(model, sc, dev, cfg.precision, weights, walk), class_names


def predict_folder(run_dir: str | Path, images: str | Path, out: str | Path, device: str = "auto",
                   crf_workers: int | None = None) -> list[Path]:
    """Predict every image of `images` into `out`/<stem>.png; returns the written paths (this rank's).
    `crf_workers`: processes for the inference CRF (None: the run's train_seg.infer_crf_workers)."""
    files = list_images(images)
    if not files:
        raise FileNotFoundError(f"{images}: no image files (.jpg/.png/...) found")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise ValueError(f"{f} and {stems[f.stem]} share the stem {f.stem!r}: outputs would collide")
        stems[f.stem] = f
    seg_dir = Path(run_dir) / "train-seg"
    if (seg_dir / "done.json").exists():  # (a missing stage is reported by load_predictor)
        ok, reason = verify_outputs(seg_dir)  # a model.pt changed after training (truncated, replaced) is not used
        if not ok:
            raise StageError(f"{seg_dir}: the trained model cannot be trusted: {reason}. Run `weakseg run` on this "
                             "run's config to redo train-seg.")
    predictor, _ = load_predictor(run_dir, device, crf_workers)
    out = Path(out)
    written = []
    mine = dist.shard(files)
    predictions = predictor.iter_labels(read_image(f) for f in mine)
    for f, labels in tqdm(zip(mine, predictions), total=len(mine), desc="predict",
                          disable=not dist.is_main_process(), dynamic_ncols=True):
        target = out / f"{f.stem}.png"
        save_label_png(target, labels)
        written.append(target)
    require_all_written(out, [f.stem for f in files], ".png", "predict")
    return written
