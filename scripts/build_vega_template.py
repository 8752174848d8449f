#!/usr/bin/env python3
"""Write the offline HTML template for ``dvc plots show`` / ``dvc plots diff``.

DVC's default page loads vega, vega-lite and vega-embed from a CDN. This script inlines
the three libraries' UMD builds from their npm packages (installed by scripts/setup.sh
into ``.cache/npm``) into one template, which ``.dvc/config`` names
(``plots.html_template``, relative to ``.dvc/``). The generated file is large (~0.8 MB
of minified JS) and git-ignored (``.cache/``): it is rebuilt at set-up, never committed.

How DVC fills it (dvc-render ``render_html``): the template must contain ``{plot_divs}``,
replaced by one ``<div>`` per plot, each with an inline ``vegaEmbed('#id', spec)`` call;
``{scripts}``, if present, would be replaced by DVC's CDN ``<script src=...>`` tags, so
this template leaves it out and loads the inlined libraries in ``<head>`` instead.

Usage: python scripts/build_vega_template.py [--npm-dir .cache/npm] [--out .cache/dvc-plots/offline.html]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package -> (UMD build inside the package, major version DVC's vega-lite v5 specs need)
LIBS = {
    "vega": ("build/vega.min.js", 5),
    "vega-lite": ("build/vega-lite.min.js", 5),
    "vega-embed": ("build/vega-embed.min.js", 6),
}
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots (offline)</title>
<!-- mmn offline template: {versions}; built by scripts/build_vega_template.py -->
{libs}
<style>
  body { font-family: system-ui, "DejaVu Sans", sans-serif; margin: 1em 2em; }
  table { border-spacing: 15px; }
  body > div { display: inline-block; vertical-align: top; margin: 0 1.5em 1.5em 0; }
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


class BuildError(RuntimeError):
    pass


def _script(code: str) -> str:
    # keep the HTML parser inside the <script> element whatever the minified code contains
    code = code.replace("</script", "<\\/script").replace("<!--", "<\\!--")
    return f"<script>\n{code}\n</script>"


def build(npm_dir: Path, out: Path) -> Path:
    modules = npm_dir / "node_modules"
    parts, versions = [], []
    for pkg, (rel, major) in LIBS.items():
        meta_path = modules / pkg / "package.json"
        js_path = modules / pkg / rel
        if not meta_path.is_file() or not js_path.is_file():
            raise BuildError(f"{js_path} not found: install the npm packages first "
                             f"(scripts/setup.sh runs `npm install --prefix {npm_dir} ...`)")
        version = json.loads(meta_path.read_text())["version"]
        if int(version.split(".")[0]) != major:
            raise BuildError(f"{pkg}@{version}: DVC's templates are vega-lite v5 specs; need {pkg}@{major}.x")
        code = js_path.read_text(encoding="utf-8")
        for ph in PLACEHOLDERS:
            if ph in code:
                raise BuildError(f"{js_path} contains the DVC placeholder {ph}; cannot inline it")
        parts.append(_script(code))
        versions.append(f"{pkg}@{version}")
    # DVC's placeholders ({refresh_tag}, {plot_divs}) stay literal; the libraries go in last
    html = PAGE.replace("{versions}", ", ".join(versions)).replace("{libs}", "\n".join(parts))
    if html.count("{plot_divs}") != 1 or "{scripts}" in html:
        raise BuildError("template must contain {plot_divs} exactly once and no {scripts}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".tmp-{out.name}-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(html)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--npm-dir", type=Path, default=ROOT / ".cache" / "npm")
    ap.add_argument("--out", type=Path, default=ROOT / ".cache" / "dvc-plots" / "offline.html")
    args = ap.parse_args(argv)
    try:
        out = build(args.npm_dir, args.out)
    except BuildError as err:
        print(f"build_vega_template: error: {err}", file=sys.stderr)
        return 1
    print(f"mmn: dvc plots template {out} ({out.stat().st_size // 1024} KiB, vega inlined)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
