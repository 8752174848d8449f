#!/usr/bin/env python3
"""Screenshot of the report's index for docs/operations.md: docs/report.png (< 300 KB).

Runs headless Chromium (Debian's ``chromium``) on ``report/index.html`` and stores a
palette PNG. Usage: python scripts/report_screenshot.py [--report report] [--out docs/report.png]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", type=Path, default=ROOT / "report")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "report.png")
    ap.add_argument("--size", default="1100,820", help="window width,height")
    ap.add_argument("--max-kb", type=int, default=300)
    args = ap.parse_args(argv)
    index = args.report / "index.html"
    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                  None)
    if not index.is_file() or binary is None:
        print(f"report_screenshot: need {index} (dvc repro plot) and a chromium binary", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        subprocess.run([binary, *FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={args.size}",
                        f"--screenshot={shot}", index.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        im = Image.open(shot).convert("RGB")
        colors = 256
        while True:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            im.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
                args.out, optimize=True)
            if args.out.stat().st_size <= args.max_kb * 1024 or colors <= 32:
                break
            colors //= 2
    print(f"report_screenshot: {args.out} ({args.out.stat().st_size // 1024} KiB, {im.size[0]}x{im.size[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
