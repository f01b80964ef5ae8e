"""Seed parity (docs/migrating.md): class-specific CCAM, background images as the extra class, the options added
for weaktr-refinery / WeakTr, and every preset the migration guide names."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from weakseg.cams.base import CamMethod
from weakseg.cams.class_specific import ClassSpecificCAM, ClassSpecificCCAMNet, default_groups
from weakseg.cams.generate import CamGenerator, finalize_cam, present_classes
from weakseg.config import ClsTrainCfg, ConfigError, PipelineCfg, load_config, to_dict
from weakseg.io import load_cam, load_label_png
from weakseg.models.backbones import BACKBONES
from weakseg.models.classifier import CamClassifier
from weakseg.runs import STAGES, stage_fingerprint
from weakseg.train.class_specific import expand_by_class, grouped_batches
from weakseg.train.classifier import build_classifier, check_model_for_method, init_backbone_from
from weakseg.train.loop import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "migrating.md"
SEEDS = ROOT / "configs" / "seeds"
NORM = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def demo_cfg(tmp_path: Path, name: str, extra: list[str]):
    return load_config(ROOT / "configs" / "demo.yaml", [
        f"runs_dir={tmp_path}", f"name={name}", "device=cpu", "data.demo_train=20", "data.demo_test=4",
        "data.demo_size=64", "data.val_fraction=0.3", "train_cls.backbone=test_efficientnet",
        "train_cls.pretrained=false", "train_cls.epochs=3", "train_cls.batch_size=6", "train_cls.image_size=64",
        "train_cls.lr=0.02", "masks.method=threshold", "cams.scales=[1.0]", "cams.flip=false", "cams.batch_size=8",
        *extra])


# --- class-specific CCAM -----------------------------------------------------------------------------------------

class OneHead(CamMethod):
    """Reference: head k alone (as if it were the only, class-agnostic, CCAM), copied into every channel."""

    def __init__(self, model: ClassSpecificCCAMNet, k: int):
        super().__init__()
        self.model, self.k = model, k

    def maps(self, x):
        z = self.model.features(x)
        fg = F.relu(self.model.head_logit(z, self.k))
        return self.model.probe_logits(z), fg.expand(-1, self.model.num_classes, -1, -1)


def random_heads_net(num_classes: int = 3) -> ClassSpecificCCAMNet:
    torch.manual_seed(0)
    net = ClassSpecificCCAMNet.from_config(
        ClsTrainCfg(backbone="test_efficientnet", pretrained=False, model="class_specific_ccam"), num_classes)
    with torch.no_grad():
        for k, head in enumerate(net.heads):  # make the heads clearly different
            head[0].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(100 + k))
    return net.eval()


def test_class_specific_cam_reads_each_image_with_its_labelled_or_predicted_class_head():
    net = random_heads_net(3)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    gen = CamGenerator(ClassSpecificCAM(net), NORM, NORM, stride=16, scales=[1.0, 1.5], flip=True)
    logits, summed = gen(x)
    refs = [CamGenerator(OneHead(net, k), NORM, NORM, stride=16, scales=[1.0, 1.5], flip=True)(x)[1]
            for k in range(3)]
    for b, k in enumerate([2, 0, 1]):  # image b is labelled with class k
        labels = np.eye(3, dtype=np.float32)[k]
        classes = present_classes(labels, logits[b])
        stored = finalize_cam(summed[b], classes, (40, 40))
        assert classes.tolist() == [k]
        np.testing.assert_allclose(stored[0], finalize_cam(refs[k][b], classes, (40, 40))[0], atol=1e-5)
        for j in set(range(3)) - {k}:  # any other head's map would be clearly different
            assert np.abs(stored[0] - finalize_cam(refs[j][b], classes, (40, 40))[0]).max() > 0.05
    # An unlabelled image: the predicted class picks the head.
    with torch.no_grad():
        net.probe.bias.copy_(torch.tensor([-10.0, -10.0, 10.0]))
    logits, summed = gen(x[:1])
    classes = present_classes(None, logits[0])
    assert classes.tolist() == [2]
    np.testing.assert_allclose(finalize_cam(summed[0], classes, (40, 40)),
                               finalize_cam(refs[2][0], classes, (40, 40)), atol=1e-5)


def test_a_training_step_changes_only_the_heads_of_the_classes_in_the_batch():
    net = random_heads_net(3).train()
    before = {n: t.detach().clone() for n, t in net.state_dict().items()}
    opt = torch.optim.AdamW(net.param_groups(1e-2, 0.1, 0.0))
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([[1.0, 0, 0]] * 4)
    loss = net(x, targets=y, groups=torch.zeros(4, dtype=torch.long))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    after = net.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(n.startswith("heads.0.") for n in changed) and "border_mean" in changed
    assert not any(n.startswith(("heads.1.", "heads.2.", "backbone.")) for n in changed), changed
    assert before["border_mean"][1:].tolist() == after["border_mean"][1:].tolist()  # only head 0's polarity moved
    assert not net.backbone.training  # frozen backbone: BN statistics frozen too


def test_held_out_loss_is_the_training_objective_and_leaves_running_statistics_alone():
    """Selection normalises with the held-out batch's statistics (as training does), not with running statistics
    that lag behind a head updated only a few times per epoch."""
    net = random_heads_net(3)
    z = net.features(torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(3)))
    g = torch.tensor([0, 0, 1, 1, 1])
    stats = [h[1].running_var.clone() for h in net.heads]
    held_out = net.group_losses(z, g, batch_stats=True)
    eval_mode = net.group_losses(z, g)
    assert all(torch.equal(h[1].running_var, v) for h, v in zip(net.heads, stats))
    train_net = random_heads_net(3).train()
    train_net.load_state_dict(net.state_dict())
    with torch.no_grad():
        trained = train_net.group_losses(z, g)
    for k in (0, 1):
        assert torch.allclose(held_out[k][0], trained[k][0], atol=1e-5)
    assert any(not torch.allclose(held_out[k][0], eval_mode[k][0], atol=1e-3) for k in (0, 1))


def test_entries_and_grouped_batches_are_per_class():
    class Labels:
        def labels(self, i):
            return [np.array([1, 0, 0]), np.array([0, 1, 1]), np.zeros(3)][i % 3].astype(np.float32)

    images, groups = expand_by_class(Labels(), list(range(9)))
    assert list(zip(images[:4], groups[:4])) == [(0, 0), (1, 1), (1, 2), (2, -1)]  # -1: no head (probe only)
    assert default_groups(torch.tensor([[0.0, 1, 1], [0, 0, 0]])).tolist() == [1, -1]
    batches = grouped_batches(groups, batch_size=3, seed=0, epoch=0)
    assert all(len({groups[p] for p in b}) == 1 for b in batches)  # class-homogeneous
    assert sorted(p for b in batches for p in b) == list(range(len(groups)))  # every entry once per epoch
    assert grouped_batches(groups, 3, 0, 0) == batches and grouped_batches(groups, 3, 0, 1) != batches
    pairs = grouped_batches(groups, batch_size=2, seed=0, epoch=0)  # 3 per group: a pair, the leftover 1 dropped
    assert sorted(len(b) for b in pairs) == [2, 2, 2, 2]
    assert grouped_batches([5, 5, 5, 7], batch_size=2, seed=0, epoch=0)[-1:] in ([[3]], [[0, 1]], [[0, 2]],
                                                                                [[1, 2]], [[1, 0]], [[2, 0]], [[2, 1]])
    assert [3] in grouped_batches([5, 5, 5, 7], batch_size=2, seed=0, epoch=0)  # a class's only batch is kept


@pytest.fixture(scope="module")
def class_specific_run(tmp_path_factory):
    from weakseg.pipeline import run_stages

    tmp = tmp_path_factory.mktemp("cs")
    cfg = demo_cfg(tmp, "cs", ["train_cls.model=class_specific_ccam", "cams.method=class_specific_ccam"])
    results = run_stages(cfg, ["train-cls", "cams"])
    assert results["train-cls"]["status"] == results["cams"]["status"] == "ran"
    return cfg


def test_class_specific_stage_selects_each_head_on_held_out_images_of_its_class(class_specific_run):
    from weakseg.data import build_dataset

    cfg = class_specific_run
    out = cfg.run_dir / "train-cls"
    metrics = json.loads((out / "metrics.json").read_text())
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [h for h in history if "val_bce" in h]
    assert len(epochs) == 3
    ds = build_dataset(cfg.data, cfg.data.train_split)
    val_ids = set(json.loads((out / "splits.json").read_text())["val"])
    state = load_checkpoint(out / "model.pt")["model"]
    chosen = load_checkpoint(out / "checkpoints" / "head_selection.pt")["heads"]
    for k, name in enumerate(ds.class_names[1:]):
        held_out = sum(1 for i, sid in enumerate(ds.ids) if sid in val_ids and ds.labels(i)[k] > 0.5)
        sel = metrics["head_selection"][name]
        if held_out == 0:
            assert sel["epoch"] == "last"
            continue
        losses = [h[f"val_ccam_loss/{name}"] for h in epochs]
        assert sel["epoch"] == int(np.argmin(losses)) + 1 and sel["val_images"] == held_out
        for n, t in chosen[k]["state"].items():  # model.pt holds head k as it was at its own best epoch
            assert torch.equal(state[n][k] if n == "border_mean" else state[n], t), n
    assert "no pixel labels" in metrics["selection"]


def test_a_head_that_got_worse_is_restored_to_its_own_best_epoch(class_specific_run, tmp_path):
    """finish() assembles model.pt from each head's best held-out epoch, not from the last epoch."""
    from types import SimpleNamespace

    from weakseg.data import build_dataset, train_val_indices
    from weakseg.models.backbones import normalizer
    from weakseg.train.class_specific import ClassSpecificTraining
    from weakseg.train.loop import FitResult

    cfg = class_specific_run
    ds = build_dataset(cfg.data, cfg.data.train_split)
    train_idx, val_idx = train_val_indices(len(ds), cfg.data.val_fraction, cfg.seed)
    net = build_classifier(cfg, ds.num_classes - 1, pretrained=False)
    net.load_state_dict(load_checkpoint(cfg.run_dir / "train-cls" / "model.pt")["model"])
    net.eval()
    ctx = SimpleNamespace(cfg=cfg, out=tmp_path, device=torch.device("cpu"))
    cs = ClassSpecificTraining(ctx, net, ds, train_idx, val_idx, normalizer(net.backbone.mean, net.backbone.std))
    k = next(k for k in range(len(net.heads)) if k in cs.val_groups)
    good = net.heads[k][0].weight.detach().clone()
    cs.train_set.epoch = 0
    first = cs.validate(net)
    with torch.no_grad():
        net.heads[k][0].weight.zero_()  # a constant map: fg = bg, a much worse contrastive loss
    cs.train_set.epoch = 1
    second = cs.validate(net)
    name = ds.class_names[k + 1]
    assert second[f"val_ccam_loss/{name}"] > first[f"val_ccam_loss/{name}"]
    info = cs.finish(FitResult(best_epoch=2, best_score=0.0, history=[]))
    assert info["head_selection"][name]["epoch"] == 1
    assert torch.equal(net.heads[k][0].weight, good)
    saved = load_checkpoint(tmp_path / "model.pt")
    assert torch.equal(saved["model"][f"heads.{k}.0.weight"], good) and saved["head_epochs"][name] == 1


def test_class_specific_cams_stage_stores_each_labelled_class_with_its_own_head(class_specific_run):
    from weakseg.cams.generate import CamInputs
    from weakseg.data import build_dataset

    cfg = class_specific_run
    ds = build_dataset(cfg.data, cfg.data.train_split)
    net = build_classifier(cfg, ds.num_classes - 1, pretrained=False)
    net.load_state_dict(load_checkpoint(cfg.run_dir / "train-cls" / "model.pt")["model"])
    net.eval()
    mean, std = net.backbone.mean, net.backbone.std
    refs = [CamGenerator(OneHead(net, k), mean, std, net.backbone.stride, [1.0], False) for k in range(len(net.heads))]
    inputs = CamInputs(ds, list(range(6)), cfg.train_cls.image_size)
    compared = 0
    for n in range(6):
        x, labels, h, w, i = inputs[n]
        cam, classes, size = load_cam(cfg.run_dir / "cams" / "cams" / f"{ds.ids[i]}.npz")
        assert (classes - 1).tolist() == np.flatnonzero(labels.numpy() > 0.5).tolist()
        for row, c in enumerate(classes - 1):
            expected = finalize_cam(refs[c](x[None])[1][0], np.array([c]), cam.shape[1:])[0]
            np.testing.assert_allclose(cam[row], expected, atol=2e-3)  # float16 storage
            compared += 1
    assert compared >= 6


# --- background images as the extra class ------------------------------------------------------------------------

def test_background_images_enter_training_with_empty_masks_and_never_as_positives(tmp_path, monkeypatch):
    from weakseg.data import build_dataset, seg_dataset
    from weakseg.data.torch_datasets import ClassificationDataset
    from weakseg.pipeline import run_stages

    bg = tmp_path / "bg"
    bg.mkdir()
    rng = np.random.default_rng(0)
    for n in range(4):
        Image.fromarray(rng.integers(0, 255, (48 + 8 * n, 64, 3), dtype=np.uint8)).save(bg / f"scene{n}.jpg")
    cfg = demo_cfg(tmp_path, "bg", [f"data.background_dir={bg}", "masks.method=threshold", "masks.bg_threshold=0.3"])
    bg_ids = [f"bg_scene{n}" for n in range(4)]
    ds = build_dataset(cfg.data, cfg.data.train_split)
    idx = [ds.ids.index(b) for b in bg_ids]
    assert all(not ds.labels(i).any() for i in idx)  # a negative for every class: no "background" class id
    assert all(not y.any() for _, y in (ClassificationDataset(ds, idx, 32, train=True)[k] for k in range(4)))

    # Make the classifier see every class everywhere (logits and CAMs): background images must still get none.
    original = CamClassifier.forward_with_cam
    monkeypatch.setattr(CamClassifier, "forward_with_cam", lambda self, x: tuple(t + 10.0 for t in original(self, x)))
    run_stages(cfg, ["train-cls", "cams", "masks"])
    splits = json.loads((cfg.run_dir / "train-cls" / "splits.json").read_text())
    assert set(bg_ids) <= set(splits["train"]) | set(splits["val"])
    assert set(bg_ids) & set(splits["train"])  # they do train the classifier
    for sid in bg_ids:
        cam, classes, size = load_cam(cfg.run_dir / "cams" / "cams" / f"{sid}.npz")
        assert classes.size == 0 and cam.shape[0] == 0
        mask = load_label_png(cfg.run_dir / "masks" / "masks" / f"{sid}.png")
        assert mask.shape == tuple(size) and not mask.any()  # all background
    pets = [sid for sid in ds.ids if not sid.startswith("bg_")]
    assert sum(load_label_png(cfg.run_dir / "masks" / "masks" / f"{sid}.png").any() for sid in pets) == len(pets)
    seg = seg_dataset(cfg.data, cfg.data.train_split)  # what train-seg trains on: the bg ids, no GT (not scored)
    assert set(bg_ids) <= set(seg.ids) and not any(seg.has_mask(seg.ids.index(b)) for b in bg_ids)
    # class-specific CCAM: background images train the probe only (no head)
    assert set(expand_by_class(ds, idx)[1]) == {-1}


# --- options added for refinery / WeakTr / Ensembled ------------------------------------------------------------

def test_late_keys_leave_existing_fingerprints_alone_until_set():
    cfg = load_config(None)
    tree = to_dict(cfg)
    assert not {"ccam_backbone", "init_from", "weaktr_token_init"} & set(tree["train_cls"])
    full = dataclasses.asdict(cfg)
    for section, key in (("train_cls", "ccam_backbone"), ("train_cls", "init_from"),
                         ("train_cls", "weaktr_token_init"), ("train_cls", "recam_loss_weight"),
                         ("train_cls", "recam_epochs"), ("train_cls", "recam_lr"),
                         ("train_cls", "frozen_backbone_levels"),
                         ("train_seg", "infer_window"),
                         ("train_seg", "infer_window_overlap"), ("train_seg", "encoder_from_classifier"),
                         ("train_seg", "calibration"), ("train_seg", "self_training_rounds"),
                         ("train_seg", "self_training_confidence"), ("train_seg", "self_training_init"),
                         ("train_seg", "self_training_epochs"), ("train_seg", "ema_decay"),
                         ("train_seg", "label_smoothing"), ("train_seg", "frozen_encoder_levels"),
                         ("train_seg", "zero_init_head"), ("train_seg", "infer_affinity_walk"),
                         ("train_seg", "unseen_folds"), ("train_seg", "unseen_fold"),
                         ("masks", "bg_threshold_rule"), ("masks", "area_match_images"),
                         *(("masks", key) for key in full["masks"] if key.startswith("affinity_")),
                         *(("train_seg", key) for key in full["train_seg"] if key.startswith("infer_crf")),
                         ("masks", "num_workers"),
                         ("train_cls", "num_workers"), ("train_seg", "num_workers"), ("cams", "batch_size")):
        full[section].pop(key)
    full.pop("precision")  # top-level, LATE too
    assert tree == full
    # the hash of runs recorded before the worker counts became speed-only kept the two training stages' ones
    legacy = to_dict(cfg, legacy=True)
    assert legacy["train_cls"]["num_workers"] == legacy["train_seg"]["num_workers"] == 0
    assert legacy["cams"]["batch_size"] == 16
    assert "num_workers" not in legacy["masks"]
    changed = load_config(None, ["train_cls.init_from=other-run"])
    assert stage_fingerprint(changed, "train-cls") != stage_fingerprint(cfg, "train-cls")
    assert stage_fingerprint(changed, "cams") == stage_fingerprint(cfg, "cams")


def test_inference_only_keys_rescore_a_run_without_retraining_it():
    cfg = load_config(None)
    crf = load_config(None, ["train_seg.infer_crf=true"])
    assert stage_fingerprint(crf, "train-seg") == stage_fingerprint(cfg, "train-seg")
    assert stage_fingerprint(crf, "evaluate") != stage_fingerprint(cfg, "evaluate")
    kernel = load_config(None, ["train_seg.infer_crf=true", "train_seg.infer_crf_bilateral_compat=5"])
    assert stage_fingerprint(kernel, "evaluate") != stage_fingerprint(crf, "evaluate")
    workers = load_config(None, ["train_seg.infer_crf=true", "train_seg.infer_crf_workers=2"])  # speed only
    assert [stage_fingerprint(workers, s) for s in STAGES] == [stage_fingerprint(crf, s) for s in STAGES]
    assert stage_fingerprint(load_config(None, ["train_seg.infer_flip=true"]), "train-seg") != \
        stage_fingerprint(cfg, "train-seg")  # the older inference keys stay train-seg's, as runs recorded them
    # self-training trains on the model's own CRF'd predictions: then the CRF keys are train-seg's too
    selftrain = load_config(None, ["train_seg.self_training_rounds=1"])
    assert stage_fingerprint(selftrain, "train-seg") != stage_fingerprint(cfg, "train-seg")
    selftrain_crf = load_config(None, ["train_seg.self_training_rounds=1", "train_seg.infer_crf=true"])
    assert stage_fingerprint(selftrain_crf, "train-seg") != stage_fingerprint(selftrain, "train-seg")


def test_train_cls_is_redone_when_the_init_from_model_changes(tmp_path):
    from weakseg.runs import stage_fingerprint

    cfg = load_config(None, [f"runs_dir={tmp_path}", "train_cls.init_from=src"])
    missing = stage_fingerprint(cfg, "train-cls")
    model = tmp_path / "src" / "train-cls" / "model.pt"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights v1")
    v1 = stage_fingerprint(cfg, "train-cls")
    model.write_bytes(b"weights v2")
    v2 = stage_fingerprint(cfg, "train-cls")
    (model.parent / "done.json").write_text('{"checksum": "abc"}')
    marked = stage_fingerprint(cfg, "train-cls")
    assert len({missing, v1, v2, marked}) == 4
    assert stage_fingerprint(cfg, "train-cls") == marked  # stable while nothing changes


def test_train_seg_follows_the_classifier_only_when_its_encoder_starts_from_it(tmp_path):
    from weakseg.runs import stage_fingerprint

    plain = load_config(None, [f"runs_dir={tmp_path}", "name=r"])
    from_cls = load_config(None, [f"runs_dir={tmp_path}", "name=r", "train_seg.encoder_from_classifier=true"])
    marker = tmp_path / "r" / "train-cls" / "done.json"
    marker.parent.mkdir(parents=True)
    prints = []
    for checksum in ("aaa", "bbb"):
        marker.write_text(f'{{"checksum": "{checksum}"}}')
        prints.append((stage_fingerprint(plain, "train-seg"), stage_fingerprint(from_cls, "train-seg")))
    assert prints[0][0] == prints[1][0]  # a retrained classifier reaches the default model through the masks only
    assert prints[0][1] != prints[1][1]  # with the classifier as its starting weights it is an input itself
    assert prints[0][0] != prints[0][1]


def test_init_from_loads_another_runs_backbone_and_rejects_a_different_one(tmp_path):
    from weakseg.runs import resolve_init_from

    torch.manual_seed(1)
    source = CamClassifier.from_config(ClsTrainCfg(backbone="test_efficientnet", pretrained=False), 2)
    (tmp_path / "src" / "train-cls").mkdir(parents=True)
    save_checkpoint(tmp_path / "src" / "train-cls" / "model.pt", {"model": source.state_dict(), "epoch": 1})
    path = resolve_init_from("src", tmp_path)
    torch.manual_seed(2)
    target = build_classifier(load_config(None, ["train_cls.model=ccam", "train_cls.backbone=test_efficientnet",
                                                 "train_cls.pretrained=false"]), 5)
    assert not torch.equal(target.backbone.model.conv_stem.weight, source.backbone.model.conv_stem.weight)
    info = init_backbone_from(target, path)
    for k, v in source.backbone.state_dict().items():
        assert torch.equal(target.backbone.state_dict()[k], v), k
    assert info["init_from_tensors"] == len(source.backbone.state_dict())
    other = build_classifier(load_config(None, ["train_cls.backbone=test_resnet", "train_cls.pretrained=false"]), 2)
    with pytest.raises(ConfigError, match="backbone tensors"):
        init_backbone_from(other, path)
    with pytest.raises(FileNotFoundError, match="init_from"):
        resolve_init_from("missing-run", tmp_path)


def test_weaktr_token_init_replicates_or_randomises_the_class_tokens():
    def tokens(init):
        torch.manual_seed(0)
        cfg = load_config(None, ["train_cls.model=weaktr", "train_cls.backbone=test_vit", "train_cls.pretrained=false",
                                 f"train_cls.weaktr_token_init={init}"])
        net = build_classifier(cfg, 4)
        return net.class_tokens.detach()[0]

    rep, rnd = tokens("replicate"), tokens("random")
    assert torch.equal(rep, rep[:1].expand_as(rep))  # C copies of the CLS token (WeakTr --extra-token)
    assert not torch.allclose(rnd[0], rnd[1])
    with pytest.raises(ConfigError, match="weaktr_token_init"):
        check_model_for_method(load_config(None, ["train_cls.weaktr_token_init=twice"]))


# --- presets named in docs/migrating.md --------------------------------------------------------------------------

PRESET_RE = re.compile(r"configs/seeds/[\w./-]+?\.yaml")


def named_presets() -> list[str]:
    return sorted(set(PRESET_RE.findall(DOC.read_text())))


def test_the_guide_names_every_seed_preset_and_covers_the_three_systems():
    named = named_presets()
    on_disk = sorted(str(p.relative_to(ROOT)) for p in SEEDS.rglob("*.yaml") if not p.name.startswith("_"))
    assert [p for p in named if not Path(p).name.startswith("_")] == on_disk
    text = DOC.read_text()
    for system, n_rows in (("refinery", 19), ("ensembled", 25), ("weaktr", 2)):
        assert sum(p.startswith(f"configs/seeds/{system}/") and "/_" not in p for p in named) == n_rows
    for heading in ("## weaktr-refinery", "## Ensembled-WSSS", "## WeakTr"):
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        assert "| their" in section and "weakseg run" in section and "differently on purpose" in section


def _valid_seg_model(name: str) -> bool:
    from weakseg.models.segmentation import SEG_FAMILIES, SEG_MODELS

    family, _, backbone = name.partition("_")
    return name in SEG_MODELS or (family in SEG_FAMILIES and (backbone in BACKBONES or backbone.startswith("timm:")))


@pytest.mark.parametrize("preset", named_presets())
def test_every_named_preset_loads_validates_and_dry_runs(preset, tmp_path):
    from weakseg.cams.methods import METHODS
    from weakseg.masks.makers import MAKERS
    from weakseg.pipeline import run_pipeline

    cfg = load_config(ROOT / preset, [f"runs_dir={tmp_path / 'runs'}"])
    check_model_for_method(cfg)
    assert cfg.train_cls.backbone in BACKBONES and cfg.cams.method in METHODS and cfg.masks.method in MAKERS
    assert _valid_seg_model(cfg.train_seg.model), cfg.train_seg.model
    if cfg.train_seg.loss == "gradient_clipping":
        assert cfg.train_seg.crop_size % cfg.train_seg.window_size == 0
    results = run_pipeline(cfg, dry_run=True)
    assert {s: r["status"] for s, r in results.items()} == {s: "would run" for s in STAGES}
    assert not (tmp_path / "runs").exists()  # nothing written, no dataset read


def test_presets_sharing_a_run_name_are_the_same_run():
    by_name: dict[str, list[PipelineCfg]] = {}
    for preset in named_presets():
        cfg = load_config(ROOT / preset)
        by_name.setdefault(cfg.name, []).append(cfg)
    shared = {n: cfgs for n, cfgs in by_name.items() if len(cfgs) > 1}
    assert set(shared) == {"ens-cs-ccam-37cls", "ens-cs-ccam-37cls-crf"}  # the U-Net aliases
    for cfgs in shared.values():
        assert all(c == cfgs[0] for c in cfgs)


@pytest.mark.parametrize("preset, expected", [
    ("refinery/tiny-medium-t025.yaml", {"train_cls.backbone": "deit_tiny", "masks.refiner_size": "medium",
                                        "masks.loss_threshold": 0.25, "cams.method": "finecam"}),
    ("refinery/small-small-gt30.yaml", {"train_cls.backbone": "vit_small", "train_seg.gt_ratio": 0.3}),
    ("refinery/rec-small-medium-finecam-t005.yaml", {"masks.method": "threshold", "masks.bg_threshold": 0.05}),
    ("refinery/full-gt.yaml", {"train_seg.targets": "gt"}),
    ("ensembled/cam-2cls-bg.yaml", {"data.label_mode": "species", "cams.method": "cam", "masks.bg_threshold": 0.05}),
    ("ensembled/ccam-ecs-37cls-bg.yaml", {"train_cls.init_from": "ens-cam-37cls-bg", "train_cls.ecs": True,
                                          "data.background_dir": ""}),
    ("ensembled/cs-ccam-2cls-crf.yaml", {"train_cls.model": "class_specific_ccam", "data.label_mode": "species",
                                         "masks.method": "crf", "masks.bg_threshold": 0.3,
                                         "masks.crf_bilateral_sxy": 50.0}),
    ("weaktr/voc12-deit-s.yaml", {"train_cls.backbone": "deit_small", "cams.method": "weaktr",
                                  "masks.bg_threshold": 0.43, "train_seg.model": "segmenter_deit_small",
                                  "train_seg.encoder_lr_scale": 0.1, "train_seg.window_size": 120}),
    ("weaktr/coco14-deit-s.yaml", {"data.name": "coco", "cams.scales": [1.0, 0.8, 1.2], "masks.bg_threshold": 0.42}),
])
def test_presets_carry_the_reference_settings(preset, expected):
    cfg = load_config(SEEDS / preset)
    for key, value in expected.items():
        section, _, field_name = key.partition(".")
        assert getattr(getattr(cfg, section), field_name) == value, key
