"""Run the whole DAG on the coco-mini images through the `coco` source (a 127.0.0.1 mirror).

Not a test (pytest does not collect it): the check the README asks for before a pipeline change
is called done, at a size CI cannot afford, and the recorded recipe of the held-out results in
docs/results.md. It copies the repository into ``DIR/repo``, serves coco-mini from
``DIR/mirror``, and runs ``dvc repro`` with the embedded models on the `coco` source. Two ways
to keep the projection's training images out of the evaluated ones (``--train``):

* ``split`` (default; ~30–60 min on 2 cores): ``projection.train.data=split`` with ``holdout``
  0.2: the projection learns from 80 coco-mini images, the other 20 are evaluated (coco-mini
  has only 21 train2017 images for ``coco-train``);
* ``flickr8k``: the projection learns from the Flickr8k sample (``--flickr DIR``, served from a
  second 127.0.0.1 mirror, ``projection.train.data=captions``: 1000 steps of batch 16, bf16
  autocast, float16 features on disk), and **all 100** coco-mini images are evaluated. A user
  runs the same with their own copy: ``-S projection.train.captions.path=<path or URL of
  captions.txt> -S projection.train.captions.images=<folder, archive or URL>``.

    python -m scripts.run_coco_mini_dag /tmp/coco100 [--train flickr8k] [-S key=value ...]

Run it from the repository root (``-m``: ``scripts`` and ``tests`` are found there).

Writes ``DIR/repro.log`` as the run goes and echoes each stage's "done in" line (and any WARNING
or error) with the clock time when it comes; at the end prints the stage wall times and every
full-results file (summary/, else metrics/); the copy stays in DIR for inspection. Run again on
the same DIR after an interruption: the copy is refreshed from the repository and keeps its
outputs and ``.cache``. Pass the first run's ports (``--ports COCO FLICKR``, printed at its
start and kept in ``DIR/ports``; the default reuses them) so that the URLs in params.yaml, and
so every finished stage, stay unchanged (pass the same ``-S`` too): DVC then reruns only the
stages that had not finished.
With other ports the downloads rerun and the URL they record changes every later stage's
inputs; the training still reuses its feature store (keyed on the images' contents) and resumes
from its last checkpoint (keyed on the caption texts, not on captions.json, which records the URL).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.coco_server import coco_server, require_flickr8k, serve
from tests.helpers.pipeline import copy_repo, env, set_keys

DEFAULTS = {
    "profiles.embedded.data_source": "coco",
    "data.coco.subset": 0,
    "projection.train.data": "split",
    "projection.train.holdout": 0.2,
    # the paper's 12 categories; the iou stage uses those that have qualifying images
    # none of the 20 held-out images holds a single object only (`only_object`): one instance of the category
    "iou.single": "one_instance",
    "profiles.embedded.iou_categories": ["person", "cat", "dog", "horse", "giraffe", "zebra", "elephant", "bus",
                                         "train", "airplane", "pizza", "teddy bear"],
}
#: Flickr8k sample's captions.csv (its README), pinned so that the run fails on another file
FLICKR8K_SHA256 = "7145a5c242495b9ba7a4a63fe2cc33ad73ae7190565475aef2d54446dd0e80f4"
FLICKR8K = {
    "projection.train.data": "captions",
    "profiles.embedded.train_data": None,
    "projection.train.captions.format": "csv",
    "projection.train.captions.sha256": FLICKR8K_SHA256,
    "profiles.embedded.train_max_steps": 1000,
    "profiles.embedded.train_batch_size": 16,
    "profiles.embedded.train_views": 2,
    "profiles.embedded.train_dtype": "bfloat16",
    "projection.train.feature_dtype": "float16",
    "projection.train.eval_every": 50,
    "projection.train.patience": 5,
}
DONE = re.compile(r"^\[(?P<stage>[\w-]+)\] done in (?P<s>[\d.]+) s", re.M)


def repro_live(repo: Path, log: Path) -> tuple[int, str]:
    """``dvc repro`` in ``repo``, its output (stdout and stderr merged) written to ``log`` line by
    line as it comes, and each stage's "done in", WARNING and error line echoed with the clock
    time: a two-hour run shows where it is, and a killed one leaves its log. Returns (exit code,
    the whole output)."""
    lines: list[str] = []
    with log.open("w") as f, subprocess.Popen(["dvc", "repro"], cwd=repo, env=env(), stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            f.write(line)
            f.flush()
            if DONE.match(line) or "WARNING" in line or "error" in line.lower():
                print(time.strftime("%H:%M:%S"), line.rstrip(), flush=True)
        code = proc.wait()
    return code, "".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("-S", dest="sets", action="append", default=[], help="params override key=yaml-value")
    ap.add_argument("--train", choices=("split", "flickr8k"), default="split")
    ap.add_argument("--flickr", type=Path, default=None, help="the Flickr8k sample (captions.csv + images/)")
    ap.add_argument("--ports", type=int, nargs=2, metavar=("COCO", "FLICKR"), default=None,
                    help="the mirrors' ports (default: those of DIR/ports, else free ones)")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    ports_file = args.dir / "ports"
    coco_port, flickr_port = args.ports or (
        [int(p) for p in ports_file.read_text().split()] if ports_file.is_file() else [0, 0])
    repo = copy_repo(args.dir / "repo")
    shutil.rmtree(args.dir / "mirror", ignore_errors=True)  # rebuilt each run (links to coco-mini)
    with coco_server(args.dir / "mirror", coco_port) as srv, contextlib.ExitStack() as stack:
        p = yaml.safe_load((repo / "params.yaml").read_text())
        overrides = dict(DEFAULTS)
        overrides.update({"data.coco.base_url": srv.base_url, "data.coco.annotations_sha1": srv.sha1})
        if args.train == "flickr8k":
            try:
                flickr = args.flickr or require_flickr8k()
            except BaseException as err:  # pytest's skip: the sample is not where tests look for it
                print(f"error: --train flickr8k: {err}; pass --flickr DIR", file=sys.stderr)
                return 2
            if not (flickr / "captions.csv").is_file():
                print(f"error: --flickr {flickr}: no captions.csv there", file=sys.stderr)
                return 2
            httpd = stack.enter_context(serve(flickr, flickr_port))
            base = "http://%s:%d" % httpd.server_address[:2]
            flickr_port = httpd.server_address[1]
            overrides.update(FLICKR8K)
            overrides.update({"projection.train.captions.path": f"{base}/captions.csv",
                              "projection.train.captions.images": f"{base}/images"})
        for s in args.sets:
            k, v = s.split("=", 1)
            overrides[k] = yaml.safe_load(v)
        ports = f"{srv.httpd.server_address[1]} {flickr_port}"
        ports_file.write_text(ports + "\n")
        print(f"mirrors on ports {ports} (kept in {ports_file})", flush=True)
        set_keys(p, overrides)
        (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        t0 = time.time()
        code, out = repro_live(repo, args.dir / "repro.log")
        dt = time.time() - t0
    print(f"dvc repro exit {code} in {dt / 60:.1f} min (log: {args.dir / 'repro.log'})")
    times = [(m["stage"], float(m["s"])) for m in DONE.finditer(out)]
    if times:
        print("stage wall times: " + ", ".join(f"{s} {t:.0f} s" for s, t in times)
              + f"; sum {sum(t for _, t in times) / 60:.1f} min")
    if code != 0:
        print(out[-6000:])
        return code
    for f in sorted((repo / "summary" if (repo / "summary").is_dir() else repo / "metrics").glob("*.json")):
        print(f"== {f.name}\n{json.dumps(json.loads(f.read_text()), indent=1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
