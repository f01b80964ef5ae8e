"""Runs stages in order, skipping the ones whose outputs are complete and up to date."""

from __future__ import annotations

import time
from typing import Callable, Optional

from tqdm import tqdm

from weakseg import dist
from weakseg.config import ConfigError, PipelineCfg
from weakseg.runs import (STAGES, UPSTREAM, StageContext, StageError, begin_stage, finish_stage, stage_is_done,
                          verify_outputs, write_run_info)


def _stage_functions() -> dict[str, Callable[[StageContext], dict]]:
    from weakseg.cams import generate
    from weakseg.evaluate import stage as evaluate
    from weakseg.masks import stage as masks
    from weakseg.train import classifier, segmentation

    return {
        "train-cls": classifier.run,
        "cams": generate.run,
        "masks": masks.run,
        "train-seg": segmentation.run,
        "evaluate": evaluate.run,
    }


def run_stages(cfg: PipelineCfg, stages: list[str], force: Optional[set[str]] = None,
               dry_run: bool = False) -> dict[str, dict]:
    """Run `stages` in pipeline order. A stage in `force` (or after a redone one) is redone."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; valid stages: {', '.join(STAGES)}")
    check_settings(cfg, stages)
    device = dist.resolve_device(cfg.device)
    dist.init_from_env(device)
    force = set(force or ())
    results: dict[str, dict] = {}
    funcs = _stage_functions()
    if not dry_run:
        write_run_info(cfg)
    trusted: set[str] = set()  # stages verified (or produced) by this call
    for stage in [s for s in STAGES if s in stages]:
        done, reason = stage_is_done(cfg, stage)
        redone_before = [up for up in UPSTREAM[stage] if results.get(up, {}).get("status") in ("would run", "may run")]
        if dry_run and done and stage not in force and redone_before:
            _say(f"[{stage}] may run: up to date now, redone if {' or '.join(redone_before)} changes its outputs")
            results[stage] = {"status": "may run"}
            continue
        if done and stage not in force:
            _say(f"[{stage}] skipped: {reason}")
            results[stage] = {"status": "skipped"}
            trusted.add(stage)
            continue
        if dry_run:
            _say(f"[{stage}] would run ({'forced' if stage in force else reason})")
            results[stage] = {"status": "would run"}
            continue
        _check_upstream(cfg, stage, trusted)
        _say(f"[{stage}] running ({'forced' if stage in force else reason}) -> {cfg.run_dir / stage}")
        begin_stage(cfg, stage)
        ctx = StageContext(cfg, stage, device)
        t0 = time.time()
        try:
            metrics = funcs[stage](ctx)
        finally:
            ctx.close()
        metrics["stage_seconds"] = round(time.time() - t0, 1)
        finish_stage(cfg, stage, metrics)
        results[stage] = {"status": "ran", "metrics": metrics}
        trusted.add(stage)
        _say(f"[{stage}] done in {metrics['stage_seconds']} s")
    return results


def check_settings(cfg: PipelineCfg, stages: list[str]) -> None:
    """Refuse what the config alone shows to be wrong before any stage runs, not hours later when the stage that
    reads it starts. Limits that depend on a model (how many feature levels it has) are checked by its stage."""
    from weakseg.masks.affinity import check_probability_walk
    from weakseg.masks.makers import build_mask_maker
    from weakseg.masks.stage import check_threshold_rule

    check_threshold_rule(cfg.masks.bg_threshold_rule)
    if "masks" in stages and not stage_is_done(cfg, "masks")[0]:
        build_mask_maker(cfg.masks)  # every maker checks its settings (and pydensecrf) when built
    for stage, key, levels in [("train-cls", "train_cls.frozen_backbone_levels", cfg.train_cls.frozen_backbone_levels),
                               ("train-seg", "train_seg.frozen_encoder_levels", cfg.train_seg.frozen_encoder_levels)]:
        if stage in stages and levels < 0:
            raise ConfigError(f"{key}={levels}: the number of leading feature levels to freeze, 0 or more")
    if {"train-seg", "evaluate"} & set(stages):  # the stages that predict with the trained model
        check_probability_walk(cfg)
    folds, fold = cfg.train_seg.unseen_folds, cfg.train_seg.unseen_fold
    if "train-seg" in stages and (folds, fold) != (0, 0) and not 0 <= fold < folds:
        raise ConfigError(f"train_seg.unseen_folds={folds} / unseen_fold={fold}: the fold must lie in 0..folds-1 "
                          "(unseen_folds 0: off)")


def _check_upstream(cfg: PipelineCfg, stage: str, trusted: set[str]) -> None:
    """A stage run on its own (`weakseg cams`, ...) must not consume upstream outputs that changed after their
    stage completed (a truncated model.pt, a corrupt mask PNG): refuse and say how to redo them."""
    for up in UPSTREAM[stage]:
        if up in trusted or not (cfg.run_dir / up / "done.json").exists():
            continue  # a missing upstream is reported by the stage itself (StageContext.upstream)
        ok, reason = verify_outputs(cfg.run_dir / up)
        if not ok:
            raise StageError(f"stage {stage!r} needs the output of {up!r} in {cfg.run_dir / up}, which cannot be "
                             f"trusted: {reason}. Run `weakseg {up}` (or `weakseg run`) to redo it.")
        trusted.add(up)


def run_pipeline(cfg: PipelineCfg, from_stage: Optional[str] = None, dry_run: bool = False) -> dict[str, dict]:
    force: set[str] = set()
    if from_stage is not None:
        if from_stage not in STAGES:
            raise ValueError(f"--from {from_stage!r} is not a stage; valid stages: {', '.join(STAGES)}")
        force = set(STAGES[STAGES.index(from_stage):])
    return run_stages(cfg, STAGES, force=force, dry_run=dry_run)


def _say(msg: str) -> None:
    if dist.is_main_process():
        tqdm.write(msg)
