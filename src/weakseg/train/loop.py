"""A small training engine shared by the classifier and segmentation stages.

- deterministic epoch order: batches of epoch e are a permutation drawn from (seed, e), sharded across ranks;
- checkpoints (model, optimiser, scheduler, epoch, next batch, RNG state) every `checkpoint_every`
  iterations and at every epoch end, written atomically; a killed run resumes from the last one;
- DDP when launched by torchrun; tqdm and metrics.jsonl on rank 0;
- optionally an exponential moving average of the weights (`ema_decay`), which is then what is validated and saved.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from weakseg import dist
from weakseg.io import CheckpointError, load_weights_file, write_bytes
from weakseg.runs import StageContext


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> list[list[int]]:
    """All ranks' batches of one epoch, each rank then takes its strided share (global batch = batch_size)."""
    perm = np.random.default_rng([seed, 104729, epoch]).permutation(n).tolist()
    world, rank = dist.get_world_size(), dist.get_rank()
    per_rank = max(1, batch_size // world)
    global_bs = per_rank * world
    n_full = n // global_bs if drop_last else math.ceil(n / global_bs)
    if n_full == 0:  # tiny datasets: one (short) batch rather than none
        n_full = 1
    batches = []
    for b in range(n_full):
        chunk = perm[b * global_bs:(b + 1) * global_bs]
        mine = chunk[rank::world]
        if mine:
            batches.append(mine)
    return batches


def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load with weights_only=True: a checkpoint that would run code is refused (CheckpointError, a RuntimeError
    naming the file and the Python object it references); a truncated or corrupt one is a CheckpointError too."""
    state = load_weights_file(path, map_location)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a weakseg checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def load_classifier_backbone(path: Path, module: nn.Module, what: str, tensors: str,
                             names: Callable[[str], tuple[str, ...]] = lambda key: (key,)) -> int:
    """Copy a weakseg classifier checkpoint's `backbone.*` tensors into `module`, matched by name and shape.

    `names(key)`: the backbone names (without `backbone.`) a tensor of `module` may have in the checkpoint.
    Tensors `module` lacks are ignored; at least 90 % of its own must be found, otherwise the two networks differ:
    a ConfigError "`what`: `path` holds n of the N `tensors`". Returns the number of tensors copied.
    """
    from weakseg.config import ConfigError

    source = {k[len("backbone."):]: v for k, v in load_checkpoint(path)["model"].items() if k.startswith("backbone.")}
    own = module.state_dict()
    matched = {}
    for key, tensor in own.items():
        found = next((source[n] for n in names(key) if n in source), None)
        if found is not None and tuple(found.shape) == tuple(tensor.shape):
            matched[key] = found
    if len(matched) < 0.9 * len(own):
        raise ConfigError(f"{what}: {path} holds {len(matched)} of the {len(own)} {tensors}")
    module.load_state_dict(matched, strict=False)
    return len(matched)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    history: list[dict]


def fit(
    ctx: StageContext,
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    loss_fn: Callable[[nn.Module, tuple], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    seed: int,
    validate: Optional[Callable[[nn.Module], dict]] = None,
    select_key: str = "val_loss",
    num_workers: int = 0,
    checkpoint_every: int = 0,
    batch_fn: Optional[Callable[[int], list[list[int]]]] = None,
    out: Optional[Path] = None,
    ema_decay: float = 0.0,
) -> FitResult:
    """Train `model` for `epochs`; keep the epoch with the lowest `validate(model)[select_key]` as model.pt.

    model.pt and checkpoints/ go to `out` (default: the stage folder).
    `loss_fn(model, batch)` returns the scalar loss of one batch. `validate` must not use pixel labels
    unless the user asked for it (it is given the unwrapped model). `batch_fn(epoch)` replaces the default
    `epoch_batches` (this rank's batches of dataset indices); it must be deterministic in `epoch` so that a
    resumed run draws the same batches. The model and its 4-D inputs run channels-last (`dist.channels_last`).
    `ema_decay` in (0, 1): after every optimiser step ema = decay * ema + (1 - decay) * weights (buffers too;
    the first step copies); the EMA weights are validated and written to model.pt, the trained model is left as is.
    """
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if batch_fn is None:
        def batch_fn(epoch: int) -> list[list[int]]:
            return epoch_batches(len(dataset), batch_size, seed, epoch)

    device = ctx.device
    out = ctx.out if out is None else out
    ckpt_path = out / "checkpoints" / "last.pt"
    iters_per_epoch = len(batch_fn(0))
    total = max(1, epochs * iters_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - min(it, total - 1) / total) ** 0.9)

    model.to(device)
    dist.channels_last(model)
    dist.warn_loader_oversubscription(ctx.stage, device, num_workers)
    precision = dist.resolve_precision(ctx.cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    fp32_depthwise = device.type == "cpu" and precision == "bf16"
    ema = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(
        ema_decay), use_buffers=True) if ema_decay else None)
    start_epoch, start_batch, best = 0, 0, {"epoch": -1, "score": math.inf}
    history: list[dict] = []
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if ema is not None:
            if "ema" not in state:
                raise CheckpointError(f"{ckpt_path}: written without ema_decay, so it cannot resume a run that averages "
                                      f"the weights; delete the stage folder to start over")
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, start_batch = int(state["epoch"]), int(state["batch"])
        best = {"epoch": int(state["best_epoch"]), "score": float(state["best_score"])}
        history = [dict(h) for h in state.get("history", [])]
        if dist.is_main_process():
            tqdm.write(f"[{ctx.stage}] resuming from epoch {start_epoch}, batch {start_batch}")
    train_model: nn.Module = model
    if dist.is_distributed():
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    if ctx.cfg.compile:
        train_model = torch.compile(train_model)

    def checkpoint(epoch: int, batch: int) -> None:
        if dist.is_main_process():
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(),
                "epoch": epoch, "batch": batch, "best_epoch": best["epoch"], "best_score": best["score"],
                "history": history, **({"ema": ema.state_dict()} if ema is not None else {}),
            })
        dist.barrier()

    step = start_epoch * iters_per_epoch + start_batch
    for epoch in range(start_epoch, epochs):
        if hasattr(dataset, "epoch"):
            dataset.epoch = epoch
        batches = batch_fn(epoch)
        skip = start_batch if epoch == start_epoch else 0
        # A private generator: creating the loader must not consume the global RNG (which is checkpointed for
        # dropout), or a run resumed mid-epoch would diverge from an uninterrupted one.
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches[skip:], num_workers=num_workers,
                                             persistent_workers=False,
                                             generator=torch.Generator().manual_seed(seed + epoch))
        train_model.train()
        running, count = 0.0, 0
        bar = tqdm(loader, desc=f"{ctx.stage} epoch {epoch + 1}/{epochs}", initial=skip, total=len(batches),
                   disable=not dist.is_main_process(), leave=False, dynamic_ncols=True)
        # under CPU bf16, depthwise backward is far slower than in fp32 (dist.fp32_depthwise_convs); training only
        with dist.fp32_depthwise_convs(model, enabled=fp32_depthwise):
            for b, batch in enumerate(bar, start=skip):
                batch = tuple(dist.channels_last(t.to(device, non_blocking=True)) for t in batch)
                with dist.autocast(device, precision):
                    loss = loss_fn(train_model, batch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                step += 1
                loss_value = float(loss.detach())
                running += loss_value
                count += 1
                bar.set_postfix(loss=f"{loss_value:.4f}")
                if step % 10 == 0:
                    ctx.log({"step": step, "epoch": epoch, "train_loss": loss_value, "lr": scheduler.get_last_lr()[-1]})
                if checkpoint_every and (b + 1) % checkpoint_every == 0 and b + 1 < len(batches):
                    checkpoint(epoch, b + 1)
        record = {"step": step, "epoch": epoch + 1, "epoch_train_loss": running / max(count, 1)}
        kept = model if ema is None else ema.module  # the weights validated and saved
        if validate is not None:
            kept.eval()
            with torch.inference_mode():
                record.update(validate(kept))
            score = float(record[select_key])
            if score < best["score"]:
                best = {"epoch": epoch + 1, "score": score}
                if dist.is_main_process():
                    save_checkpoint(out / "model.pt", {"model": kept.state_dict(), "epoch": epoch + 1})
        elif dist.is_main_process():
            best = {"epoch": epoch + 1, "score": float("nan")}
            save_checkpoint(out / "model.pt", {"model": kept.state_dict(), "epoch": epoch + 1})
        history.append(record)
        ctx.log(record)
        if dist.is_main_process():
            tqdm.write(f"[{ctx.stage}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in record.items()))
        checkpoint(epoch + 1, 0)
    return FitResult(best_epoch=best["epoch"], best_score=best["score"], history=history)


def train_keep_best(model: nn.Module, epochs: int, train_epoch: Callable[[], float], prefix: str,
                    validate: Optional[Callable[[], float]] = None, val_key: str = "",
                    log: Optional[Callable[[dict], None]] = None) -> dict:
    """Call `train_epoch() -> mean train loss` `epochs` times (model in train mode) and keep the weights of the
    epoch with the lowest score: `validate()` (recorded as `val_key`) when given, else the train loss.

    Each epoch's record {prefix_epoch, prefix_train_loss[, val_key]} goes to `log`. -> {best_epoch, best_score,
    history, seconds}; the model is left in eval mode with the best weights.
    """
    best_state, best_score, best_epoch, history = None, math.inf, 0, []
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        record = {f"{prefix}_epoch": epoch, f"{prefix}_train_loss": train_epoch()}
        score = record[f"{prefix}_train_loss"]
        if validate is not None:
            record[val_key] = score = validate()
        history.append(record)
        if log is not None:
            log(record)
        if score < best_score:
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"best_epoch": best_epoch, "best_score": best_score, "history": history,
            "seconds": round(time.time() - t0, 1)}
