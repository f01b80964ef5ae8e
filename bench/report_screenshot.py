"""Open a run's report.html in headless Chromium, save a screenshot, and check it is not blank.

    .venv/bin/python bench/report_screenshot.py runs/demo [--out shot.png] [--height 3000] [--regenerate]

Writes the report first if it is missing (or with --regenerate). Checks on the screenshot: it is not blank
(enough non-background pixels), it shows table rules (rows of the tables' border colour) and pictures
(saturated colour from the figures). Prints the checks as JSON; exit status 1 if one fails.
Also importable: `screenshot(html, png)` and `check_screenshot(png)` (used by tests/test_report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
TABLE_RULE_RGB = (214, 216, 222)  # border colour of the report's tables (report.CSS: #d6d8de)


def find_chromium() -> str | None:
    for name in (CHROMIUM, "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name) if not os.path.isabs(name) else (name if os.access(name, os.X_OK) else None)
        if path:
            return path
    return None


def screenshot(html: Path, png: Path, width: int = 1400, height: int = 3000, chromium: str | None = None,
               timeout: float = 120.0) -> Path:
    """Render `html` (file://, no network) into `png` at width x height CSS pixels."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install chromium)")
    html, png = Path(html).resolve(), Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="weakseg-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={width},{height}",
               html.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not png.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return png


def check_screenshot(png: Path) -> dict:
    """Numbers and pass/fail flags: not blank, table rules visible, picture pixels visible."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(np.int16)
    h, w = rgb.shape[:2]
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    colours, counts = np.unique(packed.ravel(), return_counts=True)  # 1-D unique: fast on megapixels
    top = int(colours[counts.argmax()])
    background = np.array([(top >> 16) & 255, (top >> 8) & 255, top & 255])
    non_background = float((np.abs(rgb - background).sum(-1) > 30).mean())
    rule = (np.abs(rgb - np.array(TABLE_RULE_RGB)).sum(-1) <= 6)
    table_rule_rows = int((rule.mean(1) > 0.15).sum())  # horizontal table borders spanning >15% of the width
    mx, mn = rgb.max(-1), rgb.min(-1)
    saturated = float(((mx - mn) > 90).mean())  # figure colours (heat-maps, palette, curves), not text or rules
    checks = {
        "size": [w, h],
        "distinct_colours": int(len(colours)),
        "non_background_fraction": round(non_background, 4),
        "table_rule_rows": table_rule_rows,
        "saturated_fraction": round(saturated, 4),
    }
    checks["not_blank"] = non_background > 0.05 and len(colours) > 50
    checks["has_tables"] = table_rule_rows >= 5
    checks["has_images"] = saturated > 0.005
    checks["ok"] = checks["not_blank"] and checks["has_tables"] and checks["has_images"]
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, help="screenshot PNG (default: RUN_DIR/report/screenshot.png)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--regenerate", action="store_true", help="rewrite report.html first")
    args = ap.parse_args(argv)
    html = args.run_dir / "report.html"
    if args.regenerate or not html.is_file():
        from weakseg.evaluate.report import write_report

        html = write_report(args.run_dir)
    out = args.out or args.run_dir / "report" / "screenshot.png"
    screenshot(html, out, args.width, args.height)
    checks = check_screenshot(out)
    print(json.dumps({"screenshot": str(out), **checks}, indent=2))
    return 0 if checks["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
