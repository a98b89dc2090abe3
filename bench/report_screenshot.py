"""Render a `slimtorch report` page in headless Chromium and check the screenshot is not blank.

    .venv/bin/python bench/report_screenshot.py DIR [--out REPORT_DIR] [--png shot.png]
                                                [--latency] [--width 1280] [--height 3000]

DIR is what `slimtorch report` reads (an artifact, an automatic search, a sensitivity run), or
a directory that already holds report.html (then it is screenshotted as is). Chromium comes from
Debian (`apt-get install chromium`). The check: the PNG exists, decodes, and its pixels vary
(standard deviation of grey levels above 10 and at least 3% of the pixels not near white), so a
page that failed to render, or rendered empty, fails. Prints the PNG's path and the numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("no chromium on PATH: apt-get install -y chromium")


def screenshot(html: Path, png: Path, width: int, height: int) -> None:
    """Headless Chromium renders ``html`` (file://, no network) into ``png``."""
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        cmd = [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--disable-background-networking",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={width},{height}",
            html.resolve().as_uri(),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    if done.returncode != 0 or not png.is_file():
        sys.exit(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")


def pixel_stats(png: Path) -> dict[str, Any]:
    from matplotlib.image import imread

    img = imread(str(png))  # floats in [0, 1], HxWx{3,4}
    grey = np.asarray(img[..., :3], dtype=np.float64).mean(axis=2) * 255.0
    return {
        "width": int(grey.shape[1]),
        "height": int(grey.shape[0]),
        "grey_std": float(grey.std()),
        "non_white": float((grey < 235).mean()),
        "coloured": float((np.ptp(np.asarray(img[..., :3]), axis=2) > 0.15).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--out", type=Path, help="report directory (default: slimtorch's)")
    parser.add_argument("--png", type=Path, help="screenshot path (default: OUT/screenshot.png)")
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args()

    if (args.dir / "report.html").is_file():
        html = args.dir / "report.html"
    else:
        from slimtorch.report import write_report

        result = write_report(args.dir, args.out, latency=args.latency, force=True)
        html = Path(result["html"])
    png = args.png or html.parent.with_name(html.parent.name + "-screenshot.png")
    screenshot(html, png, args.width, args.height)
    stats = pixel_stats(png)
    ok = stats["grey_std"] > 10 and stats["non_white"] > 0.03
    print(json.dumps({"html": str(html), "png": str(png), "ok": ok, **stats}, indent=1))
    if not ok:
        sys.exit(f"{png} looks blank: {stats}")


if __name__ == "__main__":
    main()
