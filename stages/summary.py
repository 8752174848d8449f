"""Stage summary: git-tracked copies of every stage's full results.

Reads data/results/<name>.json (DVC-cached, written by the stage that computes them next to its
headline metrics/<name>.json) and writes summary/<name>.json, the same JSON, which git tracks so
that the docs, `git diff` and a clone without `dvc pull` can read every CI and test. Its outputs
are `cache: false`, which turns DVC's run cache off for this stage only (it takes about a second):
kept in the computing stages, those outputs would turn it off for them.
"""

from __future__ import annotations

from mmn.runner import Run, stage
from mmn.stage_specs import RESULT_STEMS


@stage("summary")
def main(run: Run) -> None:
    full = {stem: run.read_json(stem) for stem in RESULT_STEMS}  # read every input before writing any
    for stem, obj in full.items():
        run.write_json(f"{stem}_summary", obj)
    run.log(f"wrote {run.wrote()}")


if __name__ == "__main__":
    main()
