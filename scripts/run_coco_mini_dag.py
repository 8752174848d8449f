"""Run the whole DAG on all 100 coco-mini images through the `coco` source (a 127.0.0.1 mirror).

Not a test (pytest does not collect it): the check the README asks for before a pipeline change
is called done, at a size CI cannot afford (~30–60 min on 2 cores). It copies the repository
into ``DIR/repo``, serves coco-mini from ``DIR/mirror``, and runs ``dvc repro`` with the
embedded models on the `coco` source. The projection is trained only on images that are not
evaluated: ``projection.train.data=split`` with ``holdout`` 0.2 (80 train / 20 evaluated),
because coco-mini has only 21 train2017 images for ``coco-train``.

    python -m scripts.run_coco_mini_dag /tmp/coco100 [-S key=value ...]

Run it from the repository root (``-m``: ``scripts`` and ``tests`` are found there).

Prints every full-results file (summary/, else metrics/) at the end; the copy stays in DIR for inspection.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from tests.coco_server import coco_server
from tests.helpers.pipeline import copy_repo, run, set_keys

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("-S", dest="sets", action="append", default=[], help="params override key=yaml-value")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    repo = copy_repo(args.dir / "repo")
    with coco_server(args.dir / "mirror") as srv:
        p = yaml.safe_load((repo / "params.yaml").read_text())
        overrides = dict(DEFAULTS)
        overrides.update({"data.coco.base_url": srv.base_url, "data.coco.annotations_sha1": srv.sha1})
        for s in args.sets:
            k, v = s.split("=", 1)
            overrides[k] = yaml.safe_load(v)
        set_keys(p, overrides)
        (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        t0 = time.time()
        r = run(["dvc", "repro"], repo, timeout=4 * 3600)
        dt = time.time() - t0
    (args.dir / "repro.log").write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
    print(f"dvc repro exit {r.returncode} in {dt / 60:.1f} min (log: {args.dir / 'repro.log'})")
    if r.returncode != 0:
        print(r.stdout[-4000:], r.stderr[-4000:])
        return r.returncode
    for f in sorted((repo / "summary" if (repo / "summary").is_dir() else repo / "metrics").glob("*.json")):
        print(f"== {f.name}\n{json.dumps(json.loads(f.read_text()), indent=1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
