"""Thin command-line interface: `weakseg <command> ...`. All logic lives in the library modules."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from weakseg import dist
from weakseg.runs import STAGES


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train_cls.epochs=3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weakseg", description="Weakly-supervised semantic segmentation from "
                                     "image-level labels.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the whole pipeline (skips up-to-date stages)")
    _add_config_args(p)
    p.add_argument("--from", dest="from_stage", choices=STAGES, help="force this stage and all that follow")
    p.add_argument("--dry-run", action="store_true", help="validate the config and show what would run")

    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run only the {stage} stage")
        _add_config_args(p)
        p.add_argument("--force", action="store_true", help="redo the stage even if it is up to date")

    p = sub.add_parser("predict", help="write one palette PNG label map per input image")
    p.add_argument("--run", required=True, help="run directory (runs/<name>)")
    p.add_argument("--images", required=True, help="folder of input images")
    p.add_argument("--out", required=True, help="output folder for <stem>.png label maps")
    p.add_argument("--device", default="auto")
    p.add_argument("--crf-workers", type=int, default=None,
                   help="processes running the inference CRF beside the network (default: the run's "
                        "train_seg.infer_crf_workers)")

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="scan a dataset and report classes, counts and every problem found")
    _add_config_args(c)

    p = sub.add_parser("demo-data", help="write a split of the built-in demo dataset to disk")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="test", choices=["train", "test", "val"])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)

    p = sub.add_parser("export", help="export a run's segmentation model to ONNX and check parity")
    p.add_argument("--run", required=True, help="run directory (runs/<name>)")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--size", type=int, default=0, help="input size (default: train_seg.infer_size or crop_size)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max |torch - onnxruntime| logit difference")

    p = sub.add_parser("report", help="write runs/<name>/report.html (tables, curves, example grid)")
    p.add_argument("run", help="run directory (runs/<name>)")

    p = sub.add_parser("compare", help="side-by-side table of several runs (prints Markdown, writes .md + .csv)")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default="compare", help="output prefix for <out>.md and <out>.csv")

    p = sub.add_parser("config", help="print the resolved config")
    _add_config_args(p)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    from weakseg.config import ConfigError, dump_yaml, load_config
    from weakseg.data.base import DataError

    args = build_parser().parse_args(argv)
    dist.keep_freed_heap_memory()
    try:
        if args.command == "run":
            from weakseg.evaluate.stage import format_summary
            from weakseg.pipeline import run_pipeline

            cfg = load_config(args.config, args.overrides)
            results = run_pipeline(cfg, from_stage=args.from_stage, dry_run=args.dry_run)
            _print_summary(cfg, format_summary)
            if not args.dry_run:
                _write_report_quietly(cfg.run_dir)
            return 0 if results else 1
        if args.command in STAGES:
            from weakseg.pipeline import run_stages

            cfg = load_config(args.config, args.overrides)
            run_stages(cfg, [args.command], force={args.command} if args.force else set())
            return 0
        if args.command == "predict":
            from weakseg.predict import predict_folder

            written = predict_folder(args.run, args.images, args.out, args.device, args.crf_workers)
            print(f"wrote {len(written)} label maps to {args.out}")
            return 0
        if args.command == "data":
            from weakseg.data.check import check_dataset, format_check_report

            cfg = load_config(args.config, args.overrides)
            report = check_dataset(cfg)
            print(format_check_report(report))
            return 1 if report.get("problems") else 0
        if args.command == "demo-data":
            from weakseg.data.demo import write_demo_split

            out = write_demo_split(args.out, args.split, args.n, args.seed, args.size)
            print(f"wrote {args.n} demo images, masks and labels.csv to {out}")
            return 0
        if args.command == "export":
            from weakseg.models.export import export_onnx, onnx_parity
            from weakseg.predict import load_predictor

            predictor, _ = load_predictor(args.run, "cpu")
            size = args.size or predictor.infer_size
            weights = None if predictor.class_weights is None else predictor.class_weights.tolist()
            path = export_onnx(predictor.model, args.out, size, class_weights=weights)
            diff = onnx_parity(predictor.model, path, size, class_weights=weights)
            print(f"wrote {path} (input 1x3x{size}x{size} RGB in [0, 1]); max |torch - onnxruntime| = {diff:.2e}")
            if diff > args.tolerance:
                print(f"weakseg: error: ONNX parity {diff:.2e} exceeds tolerance {args.tolerance}", file=sys.stderr)
                return 3
            return 0
        if args.command == "report":
            from weakseg.evaluate.report import write_report

            print(f"wrote {write_report(Path(args.run))}")
            return 0
        if args.command == "compare":
            from weakseg.evaluate.compare import compare_runs, format_markdown, write_compare

            dirs = [Path(r) for r in args.runs]
            print(format_markdown(compare_runs(dirs)))
            md, csv = write_compare(dirs, Path(args.out))
            print(f"wrote {md} and {csv}")
            return 0
        if args.command == "config":
            print(dump_yaml(load_config(args.config, args.overrides)), end="")
            return 0
    # OSError: e.g. disk full (the message says what to do); ImportError: a missing optional extra (e.g. CRF).
    except (ConfigError, DataError, OSError, ValueError, RuntimeError, ImportError) as e:
        print(f"weakseg: error: {e}", file=sys.stderr)
        return 2
    return 1


def _write_report_quietly(run_dir: Path) -> None:
    """The HTML report is a convenience: a failure to draw it is reported, never fatal to the run."""
    from weakseg import dist

    if not dist.is_main_process() or not (run_dir / "evaluate" / "done.json").exists():
        return
    try:
        from weakseg.evaluate.report import write_report

        print(f"report: {write_report(run_dir)}")
    except Exception as e:  # noqa: BLE001 - reported and ignored on purpose
        print(f"weakseg: warning: could not write the HTML report ({type(e).__name__}: {e}); "
              f"try `weakseg report {run_dir}`", file=sys.stderr)


def _print_summary(cfg, format_summary) -> None:
    from weakseg import dist
    from weakseg.io import read_json

    summary = cfg.run_dir / "evaluate" / "summary.json"
    if dist.is_main_process() and summary.exists():
        print("\n" + format_summary(read_json(summary)))


if __name__ == "__main__":
    sys.exit(main())
