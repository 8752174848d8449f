"""End to end: the DVC pipeline in a temporary copy of the repository.

Runs the real embedded models with small settings (few training steps, short
captions), then checks repro semantics: a second ``dvc repro`` does nothing and a
param change reruns exactly the stages that read it and their descendants.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from conftest import COCO_MINI
from helpers.pipeline import STAGES, copy_repo, copy_reproduced, env, ran, run, set_keys, small_params
from same_outputs import assert_byte_identical
from mmn.stage_specs import RESULT_STEMS

pytestmark = pytest.mark.slow

def _assert_numbers_only(node, where: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _assert_numbers_only(v, f"{where}.{k}")
    else:
        assert node is None or (isinstance(node, (int, float)) and not isinstance(node, bool)), (where, node)


@pytest.fixture(scope="module")
def pipeline_repo(reproduced_pipeline, tmp_path_factory):
    """A copy of the session's reproduced pipeline (conftest) that this module's tests may change."""
    src, r = reproduced_pipeline
    return copy_reproduced(src, tmp_path_factory.mktemp("e2e") / "repo"), r


def test_full_dag_runs_and_outputs_are_consistent(pipeline_repo):
    repo, r = pipeline_repo
    assert ran(r.stdout) == set(STAGES)
    caps = pl.read_parquet(repo / "data/captions.parquet")
    n_images = len(list((repo / "data/coco/images").iterdir()))
    assert caps.height == n_images == 7
    att = pl.read_parquet(repo / "data/attributions.parquet")
    with_noun = caps.filter(pl.col("has_noun"))
    assert att.group_by("image_id").len()["len"].to_list() == [25] * with_noun.height
    neu = pl.read_parquet(repo / "data/neurons.parquet")
    units = att.select("layer", "unit").unique()
    assert neu.height == units.height  # every attributed unit decoded exactly once
    assert all(len(t) == 10 for t in neu["tokens"].to_list())
    inter = pl.read_parquet(repo / "data/interpretable.parquet")
    assert inter.height == neu.height and inter["interpretable"].dtype == pl.Boolean
    # the target token is the caption token at target_pos
    for row in with_noun.iter_rows(named=True):
        assert row["caption_token_ids"][row["target_pos"]] == row["target_token_id"]
        assert 0.0 <= row["p_target"] <= 1.0
    meta = yaml.safe_load((repo / "data/projection/meta.json").read_text())
    assert meta["d_in"] == 1280 and meta["d_out"] == 576 and meta["max_steps"] == 4
    # DVCLive curves: the train loss of every step, the validation loss at every evaluation (step 0 too)
    live = repo / "data/projection_live"
    train = pl.read_csv(live / "plots/metrics/train/loss.tsv", separator="\t")
    val = pl.read_csv(live / "plots/metrics/val/loss.tsv", separator="\t")
    assert train["step"].to_list() == [1, 2, 3, 4] and val["step"].to_list() == [0, 2, 4]
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["step"] == 4 and summary["val"]["loss"] == val["loss"][-1]
    assert summary["train"]["loss"] == train["loss"][-1]
    assert min(val["loss"]) == pytest.approx(meta["best_val_loss"], abs=1e-6)


def test_second_repro_does_nothing_and_param_change_reruns_only_downstream(pipeline_repo):
    repo, _ = pipeline_repo
    r = run(["dvc", "repro"], repo)
    assert r.returncode == 0, r.stderr
    assert ran(r.stdout) == set()
    assert "up to date" in r.stdout.lower()
    before = (repo / "data/attributions.parquet").read_bytes()
    # iou.random_draws: read by iou alone, downstream only plot and summary (which stages read which
    # key is checked for every key in test_dvc_deps; this checks that DVC acts on it). Not
    # iou.quantile: controls reads it too (the planted unit's IoU)
    small_params(repo, **{"iou.random_draws": 3})
    r = run(["dvc", "repro"], repo)
    assert r.returncode == 0, r.stderr
    assert ran(r.stdout) == {"iou", "plot", "summary"}
    assert (repo / "data/attributions.parquet").read_bytes() == before
    # back to the old value: DVC's run cache restores the outputs without running the stages;
    # only `summary` (cache: false outputs: no run cache) runs, a copy of the restored results
    small_params(repo, **{"iou.random_draws": 5})
    r = run(["dvc", "repro"], repo)
    assert r.returncode == 0, r.stderr
    assert ran(r.stdout) == {"summary"}
    cached = {s for s in STAGES if f"Stage '{s}' is cached" in r.stdout}
    assert cached == {"iou", "plot"}
    copies = sorted((repo / "summary").glob("*.json"))
    assert [p.stem for p in copies] == sorted(RESULT_STEMS)
    for p in copies:  # the git copy equals DVC's restored results
        assert p.read_bytes() == (repo / "data/results" / p.name).read_bytes(), p.name


def test_coco_source_stage_from_local_mirror(tmp_path):
    """download_coco with source `coco` against a 127.0.0.1 mirror of coco-mini."""
    if not COCO_MINI.is_dir():
        pytest.skip(f"coco-mini not found at {COCO_MINI}")
    from coco_server import coco_server

    repo = copy_repo(tmp_path / "repo")
    with coco_server(tmp_path / "mirror") as srv:
        small_params(repo, **{"profiles.embedded.data_source": "coco", "data.coco.base_url": srv.base_url,
                              "data.coco.annotations_sha1": srv.sha1, "data.coco.subset": 6})
        r = run(["dvc", "repro", "download_coco"], repo)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    from pycocotools.coco import COCO

    inst = COCO(str(repo / "data/coco/annotations/instances.json"))
    assert len(inst.getImgIds()) == 6
    for img in inst.loadImgs(inst.getImgIds()):
        assert (repo / "data/coco/images" / img["file_name"]).read_bytes() == (
            COCO_MINI / "images" / img["file_name"]).read_bytes()


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_download_coco_bad_image_policy(tmp_path, policy):
    """A corrupt image on the server: `fail` stops download_coco naming it; `skip` leaves it
    out and lists it in data/coco/skipped.csv (the stage log says so)."""
    if not COCO_MINI.is_dir():
        pytest.skip(f"coco-mini not found at {COCO_MINI}")
    from coco_server import coco_server, load_mini_json

    from mmn.data.coco import select_image_ids

    ids = [im["id"] for im in load_mini_json("instances", COCO_MINI)["images"]]
    chosen = select_image_ids(ids, 4, 0)
    by_id = {im["id"]: im for im in load_mini_json("instances", COCO_MINI)["images"]}
    victim = by_id[chosen[1]]["file_name"]
    repo = copy_repo(tmp_path / "repo")
    with coco_server(tmp_path / "mirror", corrupt_images=[victim]) as srv:
        small_params(repo, **{"profiles.embedded.data_source": "coco", "data.coco.base_url": srv.base_url,
                              "data.coco.annotations_sha1": srv.sha1, "data.coco.subset": 4,
                              "data.on_bad_image": policy})
        r = _stage(repo, "download_coco")
    if policy == "fail":
        assert r.returncode == 1
        assert victim in r.stderr and "decode" in r.stderr and "[download_coco] error:" in r.stderr
        assert not (repo / "data/coco").exists()
        return
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped 1 bad image(s)" in r.stderr and "data/coco/skipped.csv" in r.stderr
    skipped = pl.read_csv(repo / "data/coco/skipped.csv")
    assert skipped["file_name"].to_list() == [victim] and skipped["image_id"].to_list() == [chosen[1]]
    assert "decode" in skipped["reason"][0]
    kept = sorted(p.name for p in (repo / "data/coco/images").iterdir())
    assert kept == sorted(by_id[i]["file_name"] for i in chosen if i != chosen[1])


def test_attribute_layers_restrict_the_stage(pipeline_repo, tmp_path):
    """`attribute.layers` (as `dvc exp run -S 'attribute.layers=[...]'` sets it): only those
    layers in the output, k rows per image; a layer the LM lacks fails naming the key."""
    repo, _ = pipeline_repo
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["attribute"]["layers"] = [2, 5]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(p))
    out = tmp_path / "att.parquet"
    r = _stage(repo, "attribute", "--params", str(params), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    att = pl.read_parquet(out)
    assert set(att["layer"].unique()) <= {2, 5} and 5 in set(att["layer"])
    assert set(att.group_by("image_id").len()["len"]) == {p["attribute"]["k"]}
    full = pl.read_parquet(repo / "data/attributions.parquet")
    # the same (layer, unit, patch) g as the all-layer run wherever both kept a triple
    both = att.join(full, on=["image_id", "layer", "unit", "patch"], suffix="_all")
    assert both.height > 0 and (both["g"] - both["g_all"]).abs().max() < 1e-5
    p["attribute"]["layers"] = [0, 400]
    params.write_text(yaml.safe_dump(p))
    r = _stage(repo, "attribute", "--params", str(params), "--out", str(tmp_path / "bad.parquet"))
    assert r.returncode == 1 and "attribute.layers: [400] out of range" in r.stderr
    assert not (tmp_path / "bad.parquet").exists()


# the stages that run under torchrun; their two-rank run, byte-identical to the single-process one,
# also pins their rerun determinism, so the forced rerun below skips them
TWO_RANK_OUTS = {
    "caption": {"--out": "data/captions.parquet"},
    "attribute": {"--out": "data/attributions.parquet"},
    "iou": {"--out": "data/iou.parquet", "--selectivity-out": "data/selectivity.parquet",
            "--metrics": "metrics/iou.json", "--results": "data/results/iou.json"},
    "ablate": {"--out": "data/ablation.parquet", "--metrics": "metrics/ablation.json",
               "--results": "data/results/ablation.json"},
}


@pytest.mark.parametrize(("stage", "outs"), list(TWO_RANK_OUTS.items()))
def test_two_rank_gloo_stage_equals_single_process(pipeline_repo, tmp_path, stage, outs):
    """torchrun with 2 CPU ranks (gloo) writes byte for byte what one process wrote."""
    repo, _ = pipeline_repo
    torchrun = Path(sys.executable).parent / "torchrun"
    # torchrun defaults to OMP_NUM_THREADS=1; CPU results are bit-identical only with the
    # thread count of the single-process run, i.e. what a fresh stage process picks (not
    # this pytest process, which another test may have changed)
    threads = run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], repo).stdout.strip()
    # two ranks of that many threads share the cores: passive OpenMP waits (no numeric effect) keep
    # libgomp's spinning threads from starving the other rank (ablate: 102 s -> 48 s on 2 cores)
    run_env = {**env(), "OMP_NUM_THREADS": threads, "OMP_WAIT_POLICY": "PASSIVE"}
    for rel in outs.values():  # metrics/iou.json and data/results/iou.json share a name: keep the folders
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    args = [a for opt, rel in outs.items() for a in (opt, str(tmp_path / rel))]
    r = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", f"stages.{stage}", *args],
                       cwd=repo, env=run_env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "merged 2 shards" in r.stderr
    assert_byte_identical({rel: (tmp_path / rel, repo / rel) for rel in outs.values()})


def _stage(repo: Path, stage: str, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", f"stages.{stage}", *args], repo)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_bad_image_fails_caption_clearly(pipeline_repo, tmp_path, damage):
    repo, _ = pipeline_repo
    coco = tmp_path / "coco"
    shutil.copytree(repo / "data/coco", coco)
    for p in coco.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    img = coco / "images" / "chelsea.png"
    if damage == "truncate":
        img.write_bytes(img.read_bytes()[:3000])
    else:
        img.unlink()
    out = tmp_path / "captions.parquet"
    r = _stage(repo, "caption", "--coco", str(coco), "--out", str(out))
    _assert_one_line_error(r, "caption", "chelsea.png",
                           "cannot be decoded" if damage == "truncate" else "missing from disk")
    assert not out.exists()


@pytest.mark.parametrize(
    ("categories", "needle"),
    [(["dgo"], "not COCO category names: ['dgo']"), (["dog"], "no single-instance image of ['dog']")],
)
def test_bad_iou_category_fails_clearly(pipeline_repo, tmp_path, categories, needle):
    repo, _ = pipeline_repo
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["profiles"]["embedded"]["iou_categories"] = categories
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(p))
    out = tmp_path / "iou.parquet"
    r = _stage(repo, "iou", "--params", str(params), "--out", str(out))
    _assert_one_line_error(r, "iou", needle, "iou_categories")
    assert not out.exists()


def test_wrong_projection_checkpoint_fails_clearly(pipeline_repo, tmp_path):
    import torch

    repo, _ = pipeline_repo
    ckpt = tmp_path / "proj.ckpt"
    torch.save(torch.nn.Linear(1024, 4096).state_dict(), ckpt)
    out = tmp_path / "projection"
    r = _stage(repo, "load_projection", "--ckpt", str(ckpt), "--out", str(out))
    _assert_one_line_error(r, "load_projection", "proj.ckpt", "expected (576, 1280)")
    assert not out.exists()


def test_images_without_noun_are_kept_with_nulls(pipeline_repo):
    repo, _ = pipeline_repo
    caps = pl.read_parquet(repo / "data/captions.parquet")
    no_noun = caps.filter(~pl.col("has_noun"))
    assert no_noun.select(pl.col("target_token_id").is_null().all()).item()
    att = pl.read_parquet(repo / "data/attributions.parquet")
    assert set(att["image_id"].to_list()) == set(caps.filter(pl.col("has_noun"))["image_id"].to_list())


def test_forced_rerun_is_byte_identical(pipeline_repo, tmp_path):
    """Determinism on CPU: a forced rerun rewrites every table and metric byte for byte (a failure
    says whether only float low bits moved, the signature of MKL VML's first-call race, mmn.numerics).

    Every stage but the four of TWO_RANK_OUTS is forced (``dvc repro --force --single-item``): those
    four are rerun in fresh processes, sharded over two ranks, by the two-rank test, which asserts the
    same bytes. Each stage deterministic on the same inputs makes the whole DAG deterministic."""
    repo, _ = pipeline_repo
    files = sorted([*repo.glob("data/*.parquet"), *repo.glob("data/*.csv"), *repo.glob("metrics/*.json"), *repo.glob("summary/*.json"),
                    *repo.glob("data/results/*.json"), repo / "data/projection/projection.safetensors"])
    assert len(files) >= 14
    before = {}
    for f in files:
        rel = str(f.relative_to(repo))
        before[rel] = tmp_path / rel.replace("/", "__")
        shutil.copyfile(f, before[rel])
    forced = [s for s in STAGES if s not in TWO_RANK_OUTS]
    r = run(["dvc", "repro", "--force", "--single-item", *forced], repo)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert ran(r.stdout) == set(forced)
    assert_byte_identical({rel: (repo / rel, old) for rel, old in before.items()})


def test_every_result_has_its_shape_and_range(pipeline_repo):
    """The session DAG's results: Table 1/2 items, KS per k, the ablation curve, CLIPScore said to be
    not computed offline, and every DVC metric (metrics/) and full result (summary/) numbers or null."""
    import json

    repo, _ = pipeline_repo
    caps = pl.read_parquet(repo / "data/captions.parquet")
    m = {n: json.loads((repo / "summary" / f"{n}.json").read_text()) for n in ("scores", "ablation")}
    s = m["scores"]
    assert s["clipscore"] is None and s["scale"] == {"bertscore_rescaled": 0, "clip_w": 1.0}
    for table in ("table1", "table2"):
        for item, v in s["bertscore"][table].items():
            assert v is None or (0 <= v["mean"] <= 1 and (v["lo"] is None or v["lo"] <= v["mean"] <= v["hi"])), item
    n = s["bertscore"]["table2"]["prompts"]["n"]  # one value per attributed image
    assert n == caps["has_noun"].sum()
    assert all(k["n"] == n and 0 <= k["D"] <= 1 for k in s["bertscore"]["ks"].values())
    info = json.loads((repo / "data/info/score.json").read_text())
    assert info["clipscore"]["not_computed"].startswith("CLIPScore not computed")
    curve = pl.read_csv(repo / "data/ablation_curve.csv")
    from mmn.experiments.ablation import KINDS

    for kind in KINDS:
        k0 = curve.filter((pl.col("kind") == kind) & (pl.col("k") == 0))
        assert k0["rel_drop"][0] == pytest.approx(0, abs=1e-4)
        assert m["ablation"][kind], kind  # the headline ks (here 100)
        for r in (v["rel_drop"] for v in m["ablation"][kind].values()):
            assert r["mean"] <= 1 and r["n"] == m["ablation"]["n_images"]
    from mmn.headline import HEADLINE, headline

    for f in HEADLINE:  # DVC metrics (metrics/) and the full results (summary/): numbers or null only
        full = json.loads((repo / "summary" / f"{f}.json").read_text())
        _assert_numbers_only(full, f)
        assert json.loads((repo / "metrics" / f"{f}.json").read_text()) == headline(f, full), f"metrics/{f}.json"
    assert (repo / "report" / "index.html").is_file()


def test_real_coco_images_through_iou_from_a_mirror(tmp_path):
    """Real COCO images up to `iou` (`dvc repro iou`: downloads, training, captions, attribution,
    decode, filter, IoU): the projection is trained on coco-mini's 21 train2017 images
    (`coco-train`), the experiments run on a seeded subset of its val2017 images, both fetched
    through the `coco` source from a 127.0.0.1 mirror that, like the official server, lists train
    and val images apart. Checks disjointness, the real masks' IoU per category, and the shapes
    and ranges of what these stages write. The stages after `iou` read only these stages' tables,
    whose shapes the session DAG's tests check; scripts/run_coco_mini_dag.py runs the whole DAG
    on all 100 images."""
    if not COCO_MINI.is_dir():
        pytest.skip(f"coco-mini not found at {COCO_MINI}")
    import json

    from coco_server import coco_server

    repo = copy_repo(tmp_path / "repo")
    with coco_server(tmp_path / "mirror", merged_val=False) as srv:
        small_params(repo, **{
            "profiles.embedded.data_source": "coco", "data.coco.base_url": srv.base_url,
            "data.coco.annotations_sha1": srv.sha1, "data.coco.subset": 10,
            "projection.train.data": "coco-train", "projection.train.subset": 0,
            # training is exercised, not judged, here: a short float32 loop (the float64 default is 2x slower)
            "projection.train.max_steps": 4, "projection.train.batch_size": 4, "profiles.embedded.train_dtype": "float32",
            "projection.train.eval_every": 2, "projection.train.val_fraction": 0.2,
            "profiles.embedded.iou_categories": ["person", "elephant", "giraffe", "bear", "sheep"],
            "iou.single": "one_instance", "caption.max_new_tokens": 8,
        })
        r = run(["dvc", "repro", "iou"], repo)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert ran(r.stdout) == {"download_coco", "download_train", "load_projection", "plant", "caption", "attribute",
                             "decode", "filter", "iou"}
    split = json.loads((repo / "data/coco_train/split.json").read_text())
    eval_ids = {im["id"] for im in json.loads((repo / "data/coco/annotations/instances.json").read_text())["images"]}
    assert split["mode"] == "coco-train" and split["held_out"] is True
    assert len(split["train_ids"]) == 21 and not set(split["train_ids"]) & eval_ids
    assert json.loads((repo / "data/projection/meta.json").read_text())["held_out"] is True
    m = {n: json.loads((repo / "data/results" / f"{n}.json").read_text()) for n in ("captions", "neurons", "iou")}
    # No direction is asserted: at n = 10 after a few training steps the own-vs-shuffled margin is
    # small (after 40 steps one machine measured own 0.207 vs shuffled 0.199, p = 0.66), so its sign
    # is a coin that a CPU with other float kernels may flip. The 100-image run (scripts/run_coco_mini_dag.py) tests it.
    for key in ("bertscore_own", "bertscore_shuffled"):
        assert -1 <= m["captions"][key]["mean"] <= 1, m["captions"]
    caps = pl.read_parquet(repo / "data/captions.parquet")
    assert caps.height == 10
    nm = m["neurons"]
    assert 0 <= nm["kept_fraction"]["mean"] <= 1 and nm["kept_fraction"]["n"] == caps["has_noun"].sum()
    assert nm["n_image_units"] == 25 * caps["has_noun"].sum()  # k distinct units per image
    att = pl.read_parquet(repo / "data/attributions.parquet")
    assert att.group_by("image_id").agg(pl.struct("layer", "unit").n_unique())["layer"].to_list() == [25] * att[
        "image_id"].n_unique()
    assert set(m["iou"]["per_category"]) == {"person", "elephant", "giraffe", "bear", "sheep"}
    for v in (m["iou"]["overall"]["multimodal"], m["iou"]["overall"]["random"]):
        assert 0 <= v["mean"] <= 1 and v["n"] == m["iou"]["n_images"]
    from mmn.headline import headline

    for f in ("captions", "neurons", "iou"):
        _assert_numbers_only(m[f], f)
        assert json.loads((repo / "metrics" / f"{f}.json").read_text()) == headline(f, m[f]), f"metrics/{f}.json"


def test_experiment_queue_run_all_and_show(pipeline_repo):
    """`dvc exp run --queue -S` with a sweep, `--run-all`, and `dvc exp show` with metrics as
    columns. plot.dpi is used because only the plot stage reads it (cheap to rerun)."""
    import json

    repo, _ = pipeline_repo
    r = run(["dvc", "exp", "run", "--queue", "-S", "plot.dpi=60,70"], repo)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Queued experiment") == 2
    r = run(["dvc", "exp", "run", "--run-all", "--jobs", "1"], repo)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = run(["dvc", "exp", "show", "--json"], repo)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    exps = [e for row in rows for e in (row.get("experiments") or [])]
    dpis = set()
    for e in exps:
        for rev in e.get("revs", []):
            data = rev.get("data") or {}
            dpis.add(data.get("params", {}).get("params.yaml", {}).get("data", {}).get("plot", {}).get("dpi"))
            metrics = data.get("metrics", {})
            assert "metrics/neurons.json" in metrics
            assert "kept_fraction" in metrics["metrics/neurons.json"]["data"]
            # the projection training's DVCLive row: its latest losses
            assert metrics["data/projection_live/metrics.json"]["data"]["val"]["loss"] > 0
    assert {60, 70} <= dpis


# -- the troubleshooting table (docs/operations.md): every stage error there is one line, no traceback ----------

def _assert_one_line_error(r: subprocess.CompletedProcess, stage: str, *needles: str) -> None:
    """Exit 1, an ``[<stage>] error: ...`` line, every needle in stderr, no Python traceback."""
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert any(line.startswith(f"[{stage}] error:") for line in r.stderr.splitlines()), r.stderr[-2000:]
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr[-2000:])


def _params_with(repo: Path, tmp_path: Path, **overrides) -> Path:
    p = yaml.safe_load((repo / "params.yaml").read_text())
    set_keys(p, overrides)
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(p))
    return out


def test_troubleshooting_params_rows(pipeline_repo, tmp_path):
    """Rows `attribute.k: Input should be greater than 0` and `attribute.layers: [40] out of range`."""
    repo, _ = pipeline_repo
    out = tmp_path / "att.parquet"
    r = _stage(repo, "attribute", "--params", str(_params_with(repo, tmp_path, **{"attribute.k": 0})),
               "--out", str(out))
    _assert_one_line_error(r, "attribute", "invalid parameters", "attribute.k", "greater than 0")
    r = _stage(repo, "attribute", "--params", str(_params_with(repo, tmp_path, **{"attribute.layers": [40]})),
               "--out", str(out))
    _assert_one_line_error(r, "attribute", "attribute.layers", "out of range")
    assert not out.exists()


def test_troubleshooting_untrusted_checkpoint(pipeline_repo, tmp_path):
    """Row `evil.ckpt: not a loadable state dict with weights_only=True`: a pickle of an arbitrary
    object is refused, never unpickled in full."""
    import argparse

    import torch

    repo, _ = pipeline_repo
    ckpt = tmp_path / "evil.ckpt"
    torch.save(argparse.Namespace(weight=torch.zeros(2)), ckpt)
    out = tmp_path / "projection"
    r = _stage(repo, "load_projection", "--ckpt", str(ckpt), "--out", str(out))
    _assert_one_line_error(r, "load_projection", "evil.ckpt", "weights_only=True")
    assert not out.exists()


def test_troubleshooting_missing_word_list(pipeline_repo, tmp_path):
    """Row `data/wordlist/american-english: word list missing`."""
    repo, _ = pipeline_repo
    wordlist = repo / "data/wordlist/american-english"
    moved = tmp_path / "american-english"
    shutil.move(wordlist, moved)
    try:
        out = tmp_path / "interpretable.parquet"
        r = _stage(repo, "filter", "--out", str(out), "--layers-out", str(tmp_path / "l.csv"),
                   "--metrics", str(tmp_path / "n.json"), "--results", str(tmp_path / "s.json"),
                   "--info", str(tmp_path / "i.json"))
    finally:
        shutil.move(moved, wordlist)
    _assert_one_line_error(r, "filter", "american-english", "word list missing")
    assert not out.exists()


@pytest.mark.parametrize("fault", ["sha1", "http404"])
def test_troubleshooting_download_rows(tmp_path, fault):
    """Rows `sha1 mismatch` (the archive differs from data.coco.annotations_sha1) and
    `HTTP 404 Not Found` (an image the server lacks, with data.on_bad_image: fail)."""
    if not COCO_MINI.is_dir():
        pytest.skip(f"coco-mini not found at {COCO_MINI}")
    from coco_server import coco_server, load_mini_json

    from mmn.data.coco import select_image_ids

    images = load_mini_json("instances", COCO_MINI)["images"]
    victim = {im["id"]: im for im in images}[select_image_ids([im["id"] for im in images], 3, 0)[0]]
    repo = copy_repo(tmp_path / "repo")
    with coco_server(tmp_path / "mirror") as srv:
        sha1 = "0" * 40 if fault == "sha1" else srv.sha1
        if fault == "http404":
            next(srv.root.rglob(victim["file_name"])).unlink()
        small_params(repo, **{"profiles.embedded.data_source": "coco", "data.coco.base_url": srv.base_url,
                              "data.coco.annotations_sha1": sha1, "data.coco.subset": 3,
                              "data.on_bad_image": "fail"})
        r = _stage(repo, "download_coco")
    needles = ("sha1 mismatch",) if fault == "sha1" else (victim["file_name"], "HTTP 404")
    _assert_one_line_error(r, "download_coco", *needles)
    assert not (repo / "data/coco").exists()
