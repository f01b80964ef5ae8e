"""ReCAM: its loss against a per-image loop, its training hook, and localisation of two planted classes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weakseg.cams.methods import build_cam_method, compatible_models
from weakseg.cams.recam import ReCAMClassifier
from weakseg.config import ClsTrainCfg, ConfigError, load_config
from weakseg.train.classifier import check_model_for_method

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def recam_net(num_classes: int, weight: float = 1.0, seed: int = 0) -> ReCAMClassifier:
    torch.manual_seed(seed)
    cfg = ClsTrainCfg(backbone="test_efficientnet", pretrained=False, model="recam", recam_loss_weight=weight)
    return ReCAMClassifier.from_config(cfg, num_classes)


def loss_by_the_formula(net: ReCAMClassifier, x: torch.Tensor, y: torch.Tensor, weight: float) -> torch.Tensor:
    """Explicit loops: BCE + weight * (1/B) sum_b mean_{k in y_b} CE(W_re . mean_hw(CAM_k / max CAM_k * F), k)."""
    feats = net.backbone.forward_features(x)
    w_bce, w_re = net.head.weight[:, :, 0, 0], net.recam_head.weight[:, :, 0, 0]
    logits = torch.einsum("cd,bdhw->bc", w_bce, feats) / (feats.shape[2] * feats.shape[3]) + net.head.bias
    total = torch.zeros(())
    for b in range(x.shape[0]):
        classes = [k for k in range(y.shape[1]) if y[b, k] > 0.5]
        per_image = []
        for k in classes:
            cam = torch.relu(torch.einsum("d,dhw->hw", w_bce[k], feats[b]))
            cam = cam / cam.max().clamp(min=1e-5)
            pooled = (cam[None] * feats[b]).mean(dim=(1, 2))
            per_image.append(F.cross_entropy((w_re @ pooled)[None], torch.tensor([k])))
        if per_image:
            total = total + torch.stack(per_image).mean()
    return F.binary_cross_entropy_with_logits(logits, y) + weight * total / x.shape[0]


def test_the_loss_is_bce_plus_the_per_image_mean_of_the_softmax_ce_on_cam_weighted_features():
    net = recam_net(4, weight=0.7).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]])  # 3 classes, 1 class, none
    with torch.no_grad():
        loss, logits = net.loss_and_logits(x, y)
        expected = loss_by_the_formula(net, x, y, 0.7)
        bce = F.binary_cross_entropy_with_logits(net(x), y)
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, net(x), atol=1e-5, rtol=1e-5)
        assert loss.item() > bce.item() + 0.1  # the CE term is there: ~0.7 * ln 4 for an untrained head
        assert net(x, targets=y).item() == pytest.approx(loss.item(), abs=1e-6)
        torch.testing.assert_close(recam_net(4, weight=0.0).eval().loss_and_logits(x, y)[0], bce)


def test_one_foreground_class_is_rejected_and_methods_pair_with_models():
    with pytest.raises(ConfigError, match="at least 2 foreground classes"):
        recam_net(1)
    assert compatible_models("recam") == ("recam",) and compatible_models("cam") == ("cam_classifier", "recam")
    assert compatible_models("recam_blend") == ("recam",)
    check_model_for_method(load_config(None, ["train_cls.model=recam", "cams.method=recam"]))
    check_model_for_method(load_config(None, ["train_cls.model=recam", "cams.method=cam"]))  # the BCE head's CAM
    with pytest.raises(ConfigError, match="cams.method=recam needs train_cls.model=recam"):
        check_model_for_method(load_config(None, ["cams.method=recam"]))
    with pytest.raises(ConfigError, match="cams.method=recam_blend needs train_cls.model=recam"):
        check_model_for_method(load_config(None, ["cams.method=recam_blend"]))
    from weakseg.models.classifier import CamClassifier

    plain = CamClassifier.from_config(ClsTrainCfg(backbone="test_efficientnet", pretrained=False), 2)
    for method in ("recam", "recam_blend"):
        with pytest.raises(TypeError, match=f"cams.method={method} needs train_cls.model=recam"):
            build_cam_method(method, plain)


def two_object_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, 3, 64, 64) noise with a yellow 24x24 square (class 0) in the left half and / or a cyan one (class 1)
    in the right half, each present with p = 0.6; returns images, (n, 2) labels, (n, 2, 64, 64) object masks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 64, 64, generator=g) * 0.4
    y = (torch.rand(n, 2, generator=g) < 0.6).float()
    masks = torch.zeros(n, 2, 64, 64)
    colours = (torch.tensor([1.0, 0.9, 0.2]), torch.tensor([0.1, 0.9, 1.0]))
    for i in range(n):
        for k in range(2):
            r = int(torch.randint(0, 41, (1,), generator=g))
            c = int(torch.randint(0, 9, (1,), generator=g)) + 32 * k
            if y[i, k] > 0:
                x[i, :, r:r + 24, c:c + 24] = colours[k][:, None, None]
                masks[i, k, r:r + 24, c:c + 24] = 1
    return (x - 0.5) / 0.5, y, masks


def test_trained_recam_maps_peak_on_their_own_class_object():
    net = recam_net(2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for step in range(100):  # at 40 steps neither head localises yet (11 / 22, chance)
        x, y, _ = two_object_batch(8, seed=step)
        loss = net.training_loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x, y, masks = two_object_batch(16, seed=1000)
    with torch.no_grad():
        _, maps = build_cam_method("recam", net).maps(x)
    cover = F.avg_pool2d(masks, 64 // maps.shape[-1])  # (16, 2, h, w) object fraction per map cell
    hits = total = 0
    for i in range(16):
        for k in range(2):
            if y[i, k] > 0:
                total += 1
                hits += int(cover[i, k].flatten()[maps[i, k].flatten().argmax()] > 0)
    assert total >= 12 and hits >= 0.8 * total, f"ReCAM peaks on its own object in {hits} / {total} cases"


def test_init_from_starts_the_backbone_and_the_bce_head_from_a_cam_classifier_run(tmp_path):
    from weakseg.models.classifier import CamClassifier
    from weakseg.train.classifier import init_backbone_from
    from weakseg.train.loop import save_checkpoint

    torch.manual_seed(3)
    source = CamClassifier.from_config(ClsTrainCfg(backbone="test_efficientnet", pretrained=False), 4)
    save_checkpoint(tmp_path / "model.pt", {"model": source.state_dict(), "epoch": 1})
    target = recam_net(4, seed=4)
    recam_before = target.recam_head.weight.detach().clone()
    info = init_backbone_from(target, tmp_path / "model.pt")
    assert info["init_from_head"] == 2 and info["init_from_tensors"] == len(source.backbone.state_dict())
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    assert torch.equal(target.recam_head.weight, recam_before)  # the softmax head is ReCAM's own, learnt anew
    with pytest.raises(ConfigError, match="no CAM classifier head of this shape"):
        init_backbone_from(recam_net(3), tmp_path / "model.pt")


def net_with_a_drawn_softmax_head(seed: int) -> tuple[ReCAMClassifier, torch.Tensor]:
    """A 3-class ReCAM classifier whose softmax head is drawn at unit scale (its init is ~0), and a (2, 3, 64, 64)
    input batch."""
    net = recam_net(3).eval()
    with torch.no_grad():
        net.recam_head.weight.normal_()
    return net, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_the_recam_map_is_the_bce_cam_with_channels_reweighted_by_the_softmax_head():
    net, x = net_with_a_drawn_softmax_head(seed=2)
    with torch.no_grad():
        logits, maps = build_cam_method("recam", net).maps(x)
        feats = net.backbone.forward_features(x)
        w = net.recam_head.weight[:, :, 0, 0] * net.head.weight[:, :, 0, 0]  # (C, D)
        torch.testing.assert_close(maps, torch.relu(torch.einsum("cd,bdhw->bchw", w, feats)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, net(x), atol=1e-5, rtol=1e-5)
        softmax_head_alone = torch.relu(torch.einsum("cd,bdhw->bchw", net.recam_head.weight[:, :, 0, 0], feats))
        assert not torch.allclose(maps, softmax_head_alone, atol=1e-3)


def test_the_blend_is_the_mean_of_the_max_normalised_recam_map_and_bce_cam():
    net, x = net_with_a_drawn_softmax_head(seed=4)
    with torch.no_grad():
        logits, blend = build_cam_method("recam_blend", net).maps(x)
        _, cam = build_cam_method("cam", net).maps(x)
        _, recam = build_cam_method("recam", net).maps(x)
        per_map_max = lambda m: m / m.amax(dim=(2, 3), keepdim=True).clamp(min=1e-5)  # noqa: E731
        torch.testing.assert_close(blend, (per_map_max(cam) + per_map_max(recam)) / 2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, net(x), atol=1e-5, rtol=1e-5)
        assert blend.amax() <= 1.0 + 1e-5
        # a real mixture: neither normalised map alone
        assert not torch.allclose(blend, per_map_max(cam), atol=1e-2)
        assert not torch.allclose(blend, per_map_max(recam), atol=1e-2)


def run_recam_train_cls(tmp_path, monkeypatch, name: str, overrides: list[str], stages: list[str]):
    """train-cls (ReCAM's two phases) on 16 tiny demo images with `_fit_classifier` spied on -> (results, calls:
    (model class, epochs, lr, out, its state dict as the phase started) per phase)."""
    from pathlib import Path

    import weakseg.train.classifier as train_cls
    from weakseg.pipeline import run_stages

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", [
        f"name={name}", f"runs_dir={tmp_path}", "device=cpu", "data.demo_train=16", "data.demo_test=4",
        "data.demo_size=64", "train_cls.pretrained=false", "train_cls.backbone=test_efficientnet",
        "train_cls.batch_size=8", "train_cls.image_size=64", "cams.scales=[1.0]", "train_cls.model=recam",
        "cams.method=recam", *overrides])
    calls, real = [], train_cls._fit_classifier

    def spy(ctx, model, ds, train_idx, val_idx, epochs, lr, out=None):
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        calls.append((type(model).__name__, epochs, lr, out, start))
        return real(ctx, model, ds, train_idx, val_idx, epochs, lr, out)

    monkeypatch.setattr(train_cls, "_fit_classifier", spy)
    return run_stages(cfg, stages), calls


def test_train_cls_trains_a_bce_classifier_then_fine_tunes_it_as_recam(tmp_path, monkeypatch):
    """ReCAM's schedule in one train-cls stage (train_cls.recam_epochs): phase 2 starts from phase 1's model.pt."""
    from weakseg.io import read_json
    from weakseg.train.loop import load_checkpoint

    results, calls = run_recam_train_cls(tmp_path, monkeypatch, "e2e", [
        "train_cls.epochs=2", "train_cls.lr=0.002", "train_cls.recam_epochs=1", "train_cls.recam_lr=0.0003"],
        ["train-cls", "cams"])
    assert results["train-cls"]["status"] == results["cams"]["status"] == "ran"
    stage = tmp_path / "e2e" / "train-cls"
    assert [c[:4] for c in calls] == [("CamClassifier", 2, 0.002, stage / "bce"), ("ReCAMClassifier", 1, 0.0003, None)]
    phase1 = load_checkpoint(stage / "bce" / "model.pt")["model"]
    assert all(torch.equal(calls[1][4][k], v) for k, v in phase1.items())  # backbone and BCE head carried over
    final = load_checkpoint(stage / "model.pt")["model"]
    assert "recam_head.weight" in final and not torch.equal(final["head.weight"], phase1["head.weight"])
    metrics = read_json(stage / "metrics.json")
    assert metrics["bce_phase"]["best_epoch"] in (1, 2) and metrics["best_epoch"] == 1
    assert metrics["recam_init"]["init_from_head"] == 2
    assert len(list((tmp_path / "e2e" / "cams" / "cams").glob("*.npz"))) == 16
    with pytest.raises(ConfigError, match="recam_epochs"):
        check_model_for_method(load_config(None, ["train_cls.recam_epochs=2"]))


def test_frozen_backbone_levels_hold_the_stem_in_both_phases_of_train_cls(tmp_path, monkeypatch):
    import weakseg.train.classifier as train_cls
    from weakseg.io import read_json
    from weakseg.train.loop import load_checkpoint

    optimised = []  # per phase: (tensors given to the optimiser that need no gradient, tensors given)

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, groups, **kwargs):
            params = [p for g in groups for p in g["params"]]
            optimised.append((sum(not p.requires_grad for p in params), len(params)))
            super().__init__(groups, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    results, calls = run_recam_train_cls(tmp_path, monkeypatch, "frozen", [
        "train_cls.epochs=1", "train_cls.lr=0.01", "train_cls.backbone_lr_scale=1.0", "train_cls.recam_epochs=1",
        "train_cls.frozen_backbone_levels=2"], ["train-cls"])
    assert results["train-cls"]["status"] == "ran"
    assert len(optimised) == 2 and all(frozen == 0 and given > 0 for frozen, given in optimised)
    stage = tmp_path / "frozen" / "train-cls"
    frozen = tuple(f"backbone.model.{m}." for m in ("conv_stem", "bn1", "blocks.0", "blocks.1"))
    for (*_, start), path in zip(calls, [stage / "bce" / "model.pt", stage / "model.pt"], strict=True):
        trained = load_checkpoint(path)["model"]
        weights = [k for k in trained if k.endswith(".weight") and k.startswith("backbone.model.")]
        for key in weights:  # frozen: as the phase started (the stem as initialised); later levels: trained
            assert torch.equal(trained[key], start[key]) == key.startswith(frozen), (path, key)
    assert read_json(stage / "metrics.json")["frozen_backbone_tensors"] > 0
    with pytest.raises(ConfigError, match=r"frozen_backbone_levels=1: Linear has no timm backbone"):
        train_cls.freeze_backbone_levels(torch.nn.Linear(2, 2), 1)
