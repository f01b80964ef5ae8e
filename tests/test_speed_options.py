"""Speed options of the stages: mixed precision (autocast + loss scaling, fp32 depthwise convs under CPU bf16),
torch.compile, channels-last."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from weakseg import dist
from weakseg.config import PipelineCfg, load_config, to_dict
from weakseg.models.inference import SegPredictor
from weakseg.runs import StageContext, stage_fingerprint
from weakseg.train.loop import fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ToySet(torch.utils.data.Dataset):
    """Noise images shifted by +1 (class 1) or -1 (class 0): learnable by a tiny conv net in a few steps."""

    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.x = torch.randn(n, 3, 8, 8, generator=g) + (2.0 * self.y - 1.0)[:, None, None, None]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def toy_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 2))


def train_toy(tmp_path, **cfg_keys):
    cfg = PipelineCfg(runs_dir=str(tmp_path), name="toy", **cfg_keys)
    ctx = StageContext(cfg, "toy", torch.device("cpu"))
    ctx.out.mkdir(parents=True, exist_ok=True)
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    seen_dtypes = []

    def loss_fn(m, batch):
        logits = m(batch[0])
        seen_dtypes.append(logits.dtype)
        return F.cross_entropy(logits.float(), batch[1])

    result = fit(ctx, model, ToySet(), loss_fn, opt, epochs=3, batch_size=8, seed=0)
    ctx.close()
    return model, result, seen_dtypes


def test_precision_auto_is_fp32_on_the_cpu_and_bad_names_list_the_valid_ones():
    assert dist.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert dist.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        dist.resolve_precision("half", torch.device("cpu"))


def test_bf16_on_a_cpu_without_native_bf16_warns_that_it_is_emulated(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.warns(RuntimeWarning, match="emulated"):
        assert dist.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dist.resolve_precision("bf16", torch.device("cpu")) == "bf16"
        assert dist.resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_a_set_precision_is_part_of_the_fingerprints_of_the_stages_that_run_a_network():
    auto, bf16 = load_config(None), load_config(None, ["precision=bf16"])
    assert "precision" not in to_dict(auto)  # LATE: runs recorded before the key keep their fingerprints
    for stage in ("train-cls", "cams", "train-seg", "evaluate"):
        assert stage_fingerprint(bf16, stage) != stage_fingerprint(auto, stage), stage
    assert stage_fingerprint(bf16, "masks") == stage_fingerprint(auto, "masks")  # no autocast there
    assert stage_fingerprint(load_config(None, ["precision=fp32"]), "cams") != stage_fingerprint(bf16, "cams")


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_fit_trains_under_each_precision(tmp_path, precision, dtype):
    model, result, dtypes = train_toy(tmp_path, precision=precision)
    assert set(dtypes) == {dtype}  # the forward really ran under (or outside) autocast
    losses = [h["epoch_train_loss"] for h in result.history]
    assert losses[-1] < losses[0] * 0.5
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_fp16_uses_loss_scaling_and_resumes_its_state(tmp_path):
    model, result, dtypes = train_toy(tmp_path, precision="fp16")
    assert set(dtypes) == {torch.float16}
    state = torch.load(tmp_path / "toy" / "toy" / "checkpoints" / "last.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the GradScaler's state is checkpointed for resume
    assert np.isfinite([h["epoch_train_loss"] for h in result.history]).all()


def test_compile_option_compiles_the_training_model(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    train_toy(tmp_path / "off")
    assert compiled == []
    train_toy(tmp_path / "on", compile=True)
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)


def depthwise_net() -> torch.nn.Module:
    """stem conv -> frozen depthwise -> trainable depthwise -> pointwise, as in an EfficientNet block."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
                              torch.nn.Conv2d(8, 8, 5, padding=2, groups=8), torch.nn.Conv2d(8, 4, 1))
    net[1].requires_grad_(False)
    return net


def test_fp32_depthwise_convs_switches_only_trainable_depthwise_convs_and_restores_them():
    net = depthwise_net()
    x = torch.randn(2, 3, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = net(x)
        with dist.fp32_depthwise_convs(net) as count:
            assert count == 1  # not the stem, not the frozen depthwise conv, not the pointwise one
            assert [type(m) is torch.nn.Conv2d for m in net] == [True, True, False, True]
            hidden = []
            hook = net[2].register_forward_hook(lambda m, i, o: hidden.append((i[0].dtype, o.dtype)))
            mixed = net(x)
            hook.remove()
            mixed.float().sum().backward()
    assert hidden == [(torch.bfloat16, torch.bfloat16)]  # the next layer still gets bf16
    assert all(type(m) is torch.nn.Conv2d for m in net)  # restored
    assert mixed.dtype == torch.bfloat16 and net[2].weight.grad.dtype == torch.float32
    torch.testing.assert_close(mixed.float(), net.float()(x), atol=0.05, rtol=0.05)
    torch.testing.assert_close(mixed.float(), plain.float(), atol=0.05, rtol=0.05)
    with dist.fp32_depthwise_convs(net, enabled=False) as count:
        assert count == 0 and all(type(m) is torch.nn.Conv2d for m in net)
    with pytest.raises(RuntimeError, match="boom"):
        with dist.fp32_depthwise_convs(net):
            raise RuntimeError("boom")
    assert all(type(m) is torch.nn.Conv2d for m in net)


@pytest.mark.parametrize("precision,fp32_calls", [("bf16", 2), ("fp32", 0)])  # 2 training batches
def test_fit_runs_trainable_depthwise_convs_in_fp32_under_cpu_bf16_only(tmp_path, monkeypatch, precision,
                                                                         fp32_calls):
    calls, fp32_forward = [], dist._Fp32DepthwiseConv2d.forward
    monkeypatch.setattr(dist._Fp32DepthwiseConv2d, "forward",
                        lambda self, x: calls.append(x.dtype) or fp32_forward(self, x))
    cfg = PipelineCfg(runs_dir=str(tmp_path), name="dw", precision=precision)
    ctx = StageContext(cfg, "dw", torch.device("cpu"))
    ctx.out.mkdir(parents=True, exist_ok=True)
    net = depthwise_net()
    head = torch.nn.Sequential(net, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.1)
    fit(ctx, head, ToySet(16), lambda m, b: F.cross_entropy(m(b[0]).float(), b[1]), opt, epochs=1, batch_size=8,
        seed=0, validate=lambda m: {"val_loss": float(F.cross_entropy(m(ToySet(16).x), ToySet(16).y))})
    ctx.close()
    assert calls == [torch.bfloat16] * fp32_calls  # validation runs the plain classes
    assert all(type(m) is torch.nn.Conv2d for m in net)


def test_bf16_inference_returns_fp32_probabilities_close_to_fp32():
    class Net(torch.nn.Module):
        mean, std, size_divisor = (0.5,) * 3, (0.25,) * 3, 1

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    net = Net()
    full = SegPredictor(net, 30).probabilities(image)
    half = SegPredictor(net, 30, precision="bf16").probabilities(image)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.03, rtol=0)


@pytest.mark.parametrize("device, workers, threads, cores, slows", [
    ("cpu", 1, 2, 2, True),    # our machines: a worker beside both compute threads
    ("cpu", 2, 1, 2, True),
    ("cpu", 0, 2, 2, False),   # no worker process
    ("cpu", 1, 1, 2, False),   # a free core for the worker
    ("cpu", 4, 4, 8, False),
    ("cuda", 4, 2, 2, False),  # the GPU computes; workers feed it
])
def test_loader_oversubscription_flags_workers_that_take_the_compute_threads_cores(monkeypatch, device, workers,
                                                                                   threads, cores, slows):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(dist, "usable_cpu_count", lambda: cores)
    why = dist.loader_oversubscription(torch.device(device), workers)
    assert (why is not None) == slows
    if slows:
        assert f"num_workers={workers}" in why and f"{cores} CPU core" in why and "num_workers=0" in why


def test_fit_warns_when_its_loader_workers_oversubscribe_the_cpu(tmp_path, monkeypatch):
    ctx = StageContext(PipelineCfg(runs_dir=str(tmp_path), name="toy"), "train-cls", torch.device("cpu"))
    ctx.out.mkdir(parents=True, exist_ok=True)
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    monkeypatch.setattr(dist, "usable_cpu_count", lambda: torch.get_num_threads())  # every core computes
    with pytest.warns(RuntimeWarning, match=r"\[train-cls\] num_workers=1 DataLoader worker"):
        fit(ctx, model, ToySet(16), lambda m, b: F.cross_entropy(m(b[0]), b[1]), opt, epochs=1, batch_size=8,
            seed=0, num_workers=1)
    ctx.close()
