"""Shared fixtures: a tiny demo pipeline config that runs in seconds on CPU."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")

TINY_OVERRIDES = [
    "data.demo_train=24",
    "data.demo_test=8",
    "data.demo_size=32",
    "data.val_fraction=0.25",
    "train_cls.backbone=test_efficientnet",
    "train_cls.pretrained=false",
    "train_cls.epochs=2",
    "train_cls.batch_size=8",
    "train_cls.image_size=32",
    "cams.batch_size=8",
    "cams.scales=[1.0]",
    "train_seg.model=lraspp_test_efficientnet",
    "train_seg.pretrained=false",
    "train_seg.epochs=2",
    "train_seg.batch_size=8",
    "train_seg.crop_size=32",
    "evaluate.thresholds=[0.2,0.4,0.6]",
]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits when the 2 shared cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_overrides(tmp_path):
    return TINY_OVERRIDES + [f"runs_dir={tmp_path / 'runs'}", "name=tiny"]
