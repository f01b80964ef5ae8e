"""CAM methods on tiny timm models: one shared tester (smp style) over every method, plus method-specific maths."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from weakseg.cams.base import max_normalize, minmax_normalize
from weakseg.cams.ccam import CCAMNet, sim_max_loss, sim_min_loss
from weakseg.cams.class_specific import ClassSpecificCCAMNet
from weakseg.cams.recam import ReCAMClassifier
from weakseg.cams.ecs import combine_erased, erase_by_blur, erased_cam_supervision, gaussian_blur
from weakseg.cams.finecam import FineCAM
from weakseg.cams.generate import CamGenerator, finalize_cam
from weakseg.cams.methods import METHODS, build_cam_method, required_model
from weakseg.cams.weaktr import WeakTrNet
from weakseg.config import CamCfg, ClsTrainCfg, ConfigError, load_config
from weakseg.models.classifier import CamClassifier
from weakseg.train.classifier import build_classifier, check_model_for_method

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODEL_CLASSES = {"cam_classifier": CamClassifier, "weaktr": WeakTrNet, "ccam": CCAMNet,
                 "class_specific_ccam": ClassSpecificCCAMNet, "recam": ReCAMClassifier}
SIZE, SQUARE = 64, 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def planted_batch(n: int, seed: int, p_object: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, list]:
    """n noise images (B, 3, 64, 64) in [0, 1], a bright yellow 24x24 square in each positive one.

    Returns images, labels (B, 1) and the square's top-left corner per image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.4
    y = (torch.rand(n, 1, generator=g) < p_object).float()
    corners = []
    for i in range(n):
        r, c = torch.randint(0, SIZE - SQUARE + 1, (2,), generator=g).tolist()
        if y[i, 0] > 0:
            x[i, :, r:r + SQUARE, c:c + SQUARE] = torch.tensor([1.0, 0.9, 0.2])[:, None, None]
        corners.append((r, c))
    return x, y, corners


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.5


@functools.lru_cache(maxsize=None)
def trained_model(model: str, backbone: str, steps: int, options: tuple = ()) -> torch.nn.Module:
    """A 1-class model trained from scratch with its own training loss for `steps` Adam steps of 8 images."""
    torch.manual_seed(0)
    cfg = ClsTrainCfg(backbone=backbone, pretrained=False, model=model, **dict(options))
    net = MODEL_CLASSES[model].from_config(cfg, 1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for step in range(steps):
        x, y, _ = planted_batch(8, seed=step)
        loss = net.training_loss(normalize(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


class CamMethodTester:
    """Shared checks for one CAM method; subclasses name the method, the model and the backbone."""

    method: str
    backbone: str
    options: tuple = ()  # ClsTrainCfg overrides
    cam_options: tuple = ()  # CamCfg overrides (e.g. ECS)
    num_classes = 3

    @property
    def model_name(self) -> str:
        return required_model(self.method)

    def build(self, model: torch.nn.Module):
        return build_cam_method(self.method, model, CamCfg(**dict(self.cam_options))).eval()

    @functools.cached_property
    def untrained(self):
        torch.manual_seed(0)
        cfg = ClsTrainCfg(backbone=self.backbone, pretrained=False, model=self.model_name, **dict(self.options))
        return self.build(MODEL_CLASSES[self.model_name].from_config(cfg, self.num_classes).eval())

    def test_shapes_and_non_negative(self):
        method = self.untrained
        for h, w in [(64, 64), (64, 96)]:
            with torch.no_grad():
                logits, cams = method.maps(normalize(torch.rand(2, 3, h, w)))
            assert logits.shape == (2, self.num_classes)
            assert cams.shape == (2, self.num_classes, h // 16, w // 16)
            assert torch.isfinite(cams).all() and (cams >= 0).all()

    def test_batch_independence(self):
        method = self.untrained
        x = normalize(torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5)))
        with torch.no_grad():
            logits, cams = method.maps(x)
            for i in range(3):
                one_logits, one_cams = method.maps(x[i:i + 1])
                torch.testing.assert_close(one_logits[0], logits[i], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(one_cams[0], cams[i], atol=1e-4, rtol=1e-4)

    def test_runs_in_the_shared_multiscale_generator(self):
        method = self.untrained
        gen = CamGenerator(method, (0.5,) * 3, (0.5,) * 3, stride=16, scales=[1.0, 1.5], flip=True)
        logits, summed = gen(torch.rand(2, 3, 64, 64))
        assert logits.shape == (2, self.num_classes) and summed.shape == (2, self.num_classes, 16, 16)
        final = finalize_cam(summed[0], torch.tensor([0, 2]).numpy(), (40, 50))
        assert final.shape == (2, 40, 50) and final.min() >= 0 and final.max() == pytest.approx(1.0, abs=1e-3)



class PlantedObjectCheck:
    """Mixin: train the 1-class model from scratch on noise +- a bright square, then the CAM must peak on it."""

    planted_steps: int = 40

    def test_cam_peaks_on_a_planted_object(self):
        model = trained_model(self.model_name, self.backbone, self.planted_steps, self.options)
        x, _, corners = planted_batch(8, seed=1000, p_object=1.0)
        with torch.no_grad():
            _, cams = self.build(model).maps(normalize(x))
        stride = SIZE // cams.shape[-1]
        hits, ratios = 0, []
        for i, (r, c) in enumerate(corners):
            square = torch.zeros(1, 1, SIZE, SIZE)
            square[..., r:r + SQUARE, c:c + SQUARE] = 1
            cover = F.avg_pool2d(square, stride)[0, 0]  # fraction of each CAM cell covered by the object
            cam = cams[i, 0]
            hits += int(cover.flatten()[cam.flatten().argmax()] > 0)
            inside = (cam * cover).sum() / cover.sum()
            outside = (cam * (1 - cover)).sum() / (1 - cover).sum()
            ratios.append(float(inside / (outside + 1e-8)))
        assert hits >= 5, f"CAM peak on the object in only {hits}/8 images"
        assert sorted(ratios)[4] > 1.5, f"mean CAM inside / outside the object: {ratios}"


class TestClassicCAM(PlantedObjectCheck, CamMethodTester):
    method, backbone = "cam", "test_efficientnet"


class TestClassicCAMOnViT(CamMethodTester):
    """The ViT path of classic CAM (timm test_vit); localisation is covered by the CNN and FineCAM tests."""

    method, backbone = "cam", "test_vit"


class TestClassicCAMWithECS(PlantedObjectCheck, CamMethodTester):
    """ECS at inference on top of CAM, on the same trained CNN as TestClassicCAM."""

    method, backbone = "cam", "test_efficientnet"
    cam_options = (("ecs", True), ("ecs_sigma", 6.0))


class TestFineCAM(PlantedObjectCheck, CamMethodTester):
    method, backbone = "finecam", "test_vit"
    options = (("cls_pool", "token"),)


class TestFineCAMOnHybrid(CamMethodTester):
    """Hybrid ViT path. No planted check: a from-scratch test_efficientnet stem + 2 blocks does not localise
    reliably in 40 steps (its CLS attention is the part FineCAM needs pretrained/trained)."""

    method, backbone = "finecam", "hybrid_test"
    options = (("cls_pool", "token"),)


class TestWeakTrFused(PlantedObjectCheck, CamMethodTester):
    method, backbone = "weaktr_fused", "test_vit"


class TestWeakTrRefined(CamMethodTester):
    """The refined CAM multiplies by the patch-to-patch attention, an affinity only in a (pre)trained ViT: a
    40-step random test_vit spreads it, so the planted check is on `weaktr_fused`; the refinement itself is
    checked against its formula in test_weaktr_refined_cam_is_patch_attention_times_fused_cam."""

    method, backbone = "weaktr", "test_vit"


class TestWeakTrOnHybrid(CamMethodTester):
    method, backbone = "weaktr", "hybrid_test"


class TestCCAM(PlantedObjectCheck, CamMethodTester):
    method, backbone = "ccam", "test_efficientnet"


class TestCCAMWithECSTraining(PlantedObjectCheck, CamMethodTester):
    method, backbone = "ccam", "test_efficientnet"
    options = (("ecs", True),)


class TestCCAMOnResNet(CamMethodTester):
    method, backbone = "ccam", "test_resnet"


class TestClassSpecificCCAM(PlantedObjectCheck, CamMethodTester):
    """Shared backbone (a frozen random test backbone has no features to localise with); the planted check
    trains head 0 on the object images only (unlabelled images train the probe only)."""

    method, backbone = "class_specific_ccam", "test_efficientnet"
    options = (("ccam_backbone", "shared"),)


class TestClassSpecificCCAMFrozen(CamMethodTester):
    method, backbone = "class_specific_ccam", "test_resnet"


class TestReCAM(CamMethodTester):
    """Localisation (two planted classes: a one-class softmax cannot train) is in tests/test_recam.py."""

    method, backbone = "recam", "test_efficientnet"


class TestReCAMBlend(CamMethodTester):
    method, backbone = "recam_blend", "test_efficientnet"


def test_every_registered_method_has_a_tester():
    tested = {cls.method for cls in CamMethodTester.__subclasses__()}
    assert tested == set(METHODS)


# --- FineCAM -----------------------------------------------------------------------------------------------------

def finecam_by_the_formula(classifier: CamClassifier, x: torch.Tensor) -> torch.Tensor:
    """Explicit loops over blocks, heads and classes of the FineCAM formula, for one image -> (C, h, w)."""
    vp = classifier.backbone.forward_with_attention(x)
    tokens = F.normalize(vp.tokens[0, 1:], dim=-1)  # (N, D)
    m = tokens.mean(dim=-1)
    fused = torch.zeros(tokens.shape[0])
    for attn in vp.attentions:
        heads = attn.shape[1]
        rows = [attn[0, h, 0, 1:] for h in range(heads)]
        w = torch.softmax(torch.stack([torch.dot(a, m) for a in rows]), dim=0)
        for h in range(heads):
            fused += w[h] * rows[h] / heads
    _, _, gh, gw = vp.features.shape
    out = []
    for c in range(classifier.num_classes):
        s = (classifier.head.weight[c, :, 0, 0][:, None, None] * vp.features[0]).sum(0)
        t = fused.view(gh, gw)
        out.append((t - t.min()) / (t.max() - t.min() + 1e-6) * (s - s.min()) / (s.max() - s.min() + 1e-6))
    return torch.stack(out)


def test_finecam_matches_the_formula_and_uses_one_backbone_pass_for_all_classes():
    torch.manual_seed(0)
    classifier = CamClassifier.from_config(ClsTrainCfg(backbone="test_vit", pretrained=False, cls_pool="token"),
                                           5).eval()
    passes = []
    classifier.backbone.model.patch_embed.register_forward_pre_hook(lambda *_: passes.append(1))
    x = normalize(torch.rand(1, 3, 64, 80))
    with torch.no_grad():
        logits, cams = FineCAM(classifier).maps(x)
        assert len(passes) == 1, "FineCAM must run the backbone once per image, not once per class"
        expected = finecam_by_the_formula(classifier, x)
        torch.testing.assert_close(cams[0], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits, classifier(x), atol=1e-5, rtol=1e-4)


def test_minmax_normalisation_divides_by_the_range():
    m = torch.tensor([[[[-2.0, 0.0], [1.0, 2.0]]]])
    out = minmax_normalize(m)
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 0.5], [0.75, 1.0]]]]), atol=1e-5, rtol=0)


def test_finecam_rejects_a_cnn_classifier():
    classifier = CamClassifier.from_config(ClsTrainCfg(backbone="test_efficientnet", pretrained=False), 2)
    with pytest.raises(TypeError, match="ViT"):
        FineCAM(classifier)


# --- WeakTr ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weaktr():
    torch.manual_seed(0)
    return WeakTrNet.from_config(ClsTrainCfg(backbone="test_vit", pretrained=False, model="weaktr"), 3)


def grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]


def test_weaktr_fusion_weights_learn_only_from_the_fused_cam_loss(weaktr):
    x, y = normalize(torch.rand(2, 3, 64, 64)), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    weaktr.train()
    weaktr.zero_grad()
    parts = weaktr.losses(x, y)
    (parts["token"] + parts["coarse"]).backward()
    assert all((g == 0).all() for g in grads(weaktr.aaf)), "token/coarse losses reached the fusion weights"
    assert any((g != 0).any() for g in grads(weaktr.backbone))
    weaktr.zero_grad()
    weaktr.losses(x, y)["fine"].backward()
    assert all((g != 0).any() for g in grads(weaktr.aaf)), "the fused-CAM loss must train every fusion layer"
    others = [g for n, g in zip([n for n, _ in weaktr.named_parameters()], grads(weaktr)) if not n.startswith("aaf.")]
    assert all((g == 0).all() for g in others), "the fused-CAM loss reached the ViT or the conv head"
    weaktr.eval()


def test_weaktr_refined_cam_is_patch_attention_times_fused_cam(weaktr):
    x = normalize(torch.rand(1, 3, 48, 64))
    with torch.no_grad():
        from weakseg.models.vit_utils import record_attention

        with record_attention(weaktr.backbone.blocks) as maps:
            out = weaktr.forward_all(x)
        attn = torch.stack(maps, 1).flatten(1, 2)[0]  # (K, T, T)
        a_bar = (out.map_weights[0][:, None, None] * attn).mean(0)
        c, (h, w) = 3, out.coarse_cam.shape[-2:]
        cross = a_bar[:c, c:].reshape(c, h, w)
        torch.testing.assert_close(out.fused_cam[0], cross * out.coarse_cam[0].clamp(min=0), atol=1e-6, rtol=1e-4)
        refined = (a_bar[c:, c:] @ out.fused_cam[0].reshape(c, -1).T).T.reshape(c, h, w)
        torch.testing.assert_close(out.refined_cam[0], refined, atol=1e-6, rtol=1e-4)
    assert len(maps) == weaktr.backbone.depth and out.map_weights.shape == (1, weaktr.aaf.fc1.in_features)


def test_weaktr_replicates_a_pretrained_cls_token_per_class(tmp_path):
    from weakseg.models.backbones import build_backbone

    torch.manual_seed(0)
    source = build_backbone("test_vit", pretrained=False)
    torch.save(source.model.state_dict(), tmp_path / "vit.pt")  # stands in for a DeiT checkpoint file
    cfg = ClsTrainCfg(backbone="test_vit", pretrained=False, checkpoint=str(tmp_path / "vit.pt"), model="weaktr")
    net = WeakTrNet.from_config(cfg, 4)
    torch.testing.assert_close(net.class_tokens, source.model.cls_token.expand(1, 4, -1))
    torch.testing.assert_close(net.class_pos, source.model.pos_embed[:, :1].expand(1, 4, -1))
    assert net.backbone.model.cls_token is None  # no parameter without gradient left for DDP
    scratch = WeakTrNet.from_config(ClsTrainCfg(backbone="hybrid_test", pretrained=False, model="weaktr"), 4)
    assert not torch.allclose(scratch.class_tokens[0, 0], scratch.class_tokens[0, 1])  # independent init


# --- CCAM --------------------------------------------------------------------------------------------------------

def test_sim_max_rank_weights_self_minus_one_nearest_zero():
    u = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    sim = (F.normalize(u, dim=1) @ F.normalize(u, dim=1).T).clamp(5e-4, 0.9995)
    alpha = 0.25
    # row 0: self (rank -1), row 1 (cos .8, rank 0), row 2 (cos 5e-4, rank 1); rows 1 and 2 likewise
    ranks = torch.tensor([[-1, 0, 1], [0, -1, 1], [1, 0, -1]], dtype=torch.float)
    expected = (torch.exp(-alpha * ranks) * -torch.log(sim)).mean()
    torch.testing.assert_close(sim_max_loss(u, alpha), expected)
    assert sim_min_loss(u[:1], u[2:]) == pytest.approx(-torch.log(torch.tensor(1 - 5e-4)).item(), rel=1e-4)


def test_ccam_polarity_is_a_model_property_updated_only_in_training():
    torch.manual_seed(0)
    net = CCAMNet.from_config(ClsTrainCfg(backbone="test_efficientnet", pretrained=False, model="ccam"), 2)
    x = normalize(torch.rand(2, 3, 64, 64))
    net.eval()
    with torch.no_grad():
        before = net.border_mean.clone()
        upright = net.forward_parts(x)
        assert torch.equal(net.border_mean, before)
        net.border_mean.fill_(0.9)  # the border looked like foreground in training -> flip
        flipped = net.forward_parts(x)
    torch.testing.assert_close(flipped.map_logit, -upright.map_logit)
    torch.testing.assert_close(flipped.fg, upright.bg)
    net.train()
    net.forward_parts(x)
    assert not torch.equal(net.border_mean, torch.tensor(0.9))


def test_ccam_gives_every_class_the_same_foreground_map():
    torch.manual_seed(0)
    net = CCAMNet.from_config(ClsTrainCfg(backbone="test_efficientnet", pretrained=False, model="ccam"), 3).eval()
    with torch.no_grad():
        _, cams = build_cam_method("ccam", net).maps(normalize(torch.rand(2, 3, 64, 64)))
    assert torch.equal(cams[:, 0], cams[:, 1]) and torch.equal(cams[:, 0], cams[:, 2])


# --- ECS ---------------------------------------------------------------------------------------------------------

def test_ecs_combines_pixelwise_not_by_column():
    cams = torch.zeros(1, 1, 4, 4)
    cams[0, 0, 0, 0] = 2.0
    erased = torch.zeros(1, 1, 4, 4)
    erased[0, 0, 3, 1] = 4.0  # a new part lights up on the erased image
    erased[0, 0, 2, 2] = 1.0
    out = combine_erased(cams, erased)
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 0, 0], expected[0, 0, 3, 1], expected[0, 0, 2, 2] = 1.0, 1.0, 0.25
    torch.testing.assert_close(out, expected)  # a column max would have lit the whole columns 1 and 2


def test_ecs_erases_only_the_high_cam_region_of_the_classes_of_interest():
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cams = torch.zeros(1, 2, 4, 4)
    cams[0, 0, :2, :2] = 1.0  # class 0 high in the top-left quadrant
    cams[0, 1, 2:, 2:] = 1.0  # class 1 (not of interest) high bottom-right
    seen = []

    def cam_fn(images):
        seen.append(images)
        return torch.ones(1, 2, 4, 4)

    ecs = erased_cam_supervision(cam_fn, x, cams, torch.tensor([[1.0, 0.0]]), delta=0.5, sigma=2.0)
    erased = seen[0]
    changed = (erased != x).any(dim=1)[0]
    assert changed[:12, :12].all() and not changed[20:, :].any() and not changed[:, 20:].any()
    torch.testing.assert_close(erased[:, :, :12, :12], gaussian_blur(x, 2.0)[:, :, :12, :12])
    assert ecs.shape == (1, 2, 4, 4) and torch.equal(ecs, torch.ones(1, 2, 4, 4))
    torch.testing.assert_close(erase_by_blur(x, torch.zeros(1, 1, 32, 32, dtype=torch.bool), 2.0), x)
    assert max_normalize(torch.zeros(1, 1, 2, 2)).abs().sum() == 0


# --- train-cls hook and presets ----------------------------------------------------------------------------------

def test_train_cls_builds_the_model_each_method_needs():
    cfg = load_config(None, ["train_cls.backbone=test_vit", "train_cls.pretrained=false", "train_cls.model=weaktr",
                             "cams.method=weaktr"])
    check_model_for_method(cfg)
    model = build_classifier(cfg, 3)
    assert isinstance(model, WeakTrNet)
    x, y = normalize(torch.rand(2, 3, 32, 32)), torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    loss = model(x, targets=y)  # the DDP-safe path train-cls uses
    assert loss.ndim == 0 and loss.requires_grad
    loss_v, logits = model.loss_and_logits(x, y)
    assert logits.shape == (2, 3)
    bad = load_config(None, ["cams.method=weaktr"])
    with pytest.raises(ConfigError, match="train_cls.model=weaktr"):
        check_model_for_method(bad)
    with pytest.raises(TypeError, match="train_cls.model=ccam"):
        build_cam_method("ccam", build_classifier(load_config(None, ["train_cls.backbone=test_vit",
                                                                      "train_cls.pretrained=false"]), 2))


@pytest.mark.parametrize("preset, method, model, backbone", [
    ("refinery-stage1.yaml", "finecam", "cam_classifier", "deit_tiny"),
    ("ensembled-ccam.yaml", "ccam", "ccam", "resnet50"),
    ("weaktr-voc12.yaml", "weaktr", "weaktr", "deit_small"),
    ("cpu-lite0-cam.yaml", "cam", "cam_classifier", "efficientnet_lite0"),
    ("cpu-hybrid-finecam.yaml", "finecam", "cam_classifier", "hybrid_lite0"),
])
def test_stage1_presets_load_and_pair_method_with_model(preset, method, model, backbone):
    cfg = load_config(CONFIGS / preset)
    assert (cfg.cams.method, cfg.train_cls.model, cfg.train_cls.backbone) == (method, model, backbone)
    check_model_for_method(cfg)


@pytest.mark.parametrize("overrides", [
    ["train_cls.model=weaktr", "train_cls.backbone=test_vit", "cams.method=weaktr"],
    ["train_cls.model=ccam", "train_cls.backbone=test_efficientnet", "train_cls.ecs=true", "cams.method=ccam"],
    ["train_cls.backbone=hybrid_test", "train_cls.cls_pool=token", "cams.method=finecam", "cams.ecs=true"],
    ["train_cls.model=recam", "train_cls.backbone=test_efficientnet", "cams.method=recam"],
], ids=["weaktr", "ccam-ecs", "hybrid-finecam-ecs", "recam"])
def test_train_cls_and_cams_stages_run_end_to_end(tmp_path, overrides):
    """The real stages on 16 demo images: train-cls trains and saves the method's model, cams reloads it."""
    from weakseg.io import load_cam
    from weakseg.pipeline import run_stages

    cfg = load_config(CONFIGS / "demo.yaml", [
        "name=e2e", f"runs_dir={tmp_path}", "device=cpu", "data.demo_train=16", "data.demo_test=4",
        "data.demo_size=64", "train_cls.pretrained=false", "train_cls.epochs=1", "train_cls.batch_size=8",
        "train_cls.image_size=64", "cams.scales=[1.0]", "cams.ecs_sigma=4.0", *overrides])
    results = run_stages(cfg, ["train-cls", "cams"])
    assert results["train-cls"]["status"] == results["cams"]["status"] == "ran"
    files = sorted((tmp_path / "e2e" / "cams" / "cams").glob("*.npz"))
    assert len(files) == 16
    cam, classes, _ = load_cam(files[0])
    assert cam.shape[0] == len(classes) and (cam >= 0).all() and cam.max() <= 1.0 + 1e-3


@pytest.mark.parametrize("model, backbone, options", [
    ("cam_classifier", "test_efficientnet", ()),
    ("cam_classifier", "test_vit", (("cls_pool", "token"),)),
    ("cam_classifier", "hybrid_test", (("cls_pool", "token"),)),
    ("weaktr", "test_vit", ()),
    ("weaktr", "hybrid_test", ()),
    ("ccam", "test_efficientnet", (("ecs", True),)),
    ("ccam", "test_resnet", ()),
    ("class_specific_ccam", "test_efficientnet", (("ccam_backbone", "shared"),)),
    ("class_specific_ccam", "test_resnet", ()),
    ("recam", "test_efficientnet", ()),
])
def test_every_trainable_parameter_gets_a_gradient(model, backbone, options):
    """DDP (find_unused_parameters=False) fails on a trainable parameter outside the loss graph."""
    torch.manual_seed(0)
    net = MODEL_CLASSES[model].from_config(
        ClsTrainCfg(backbone=backbone, pretrained=False, model=model, **dict(options)), 2).train()
    net.training_loss(normalize(torch.rand(2, 3, 64, 64)), torch.tensor([[1.0, 0.0], [0.0, 1.0]])).backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    grouped = {id(p) for g in net.param_groups(1e-3, 0.1, 0.0) for p in g["params"]}
    assert grouped == {id(p) for p in net.parameters() if p.requires_grad}


def test_training_time_ecs_is_rejected_where_it_would_be_ignored():
    with pytest.raises(ConfigError, match="cams.ecs"):
        check_model_for_method(load_config(None, ["train_cls.ecs=true"]))
