"""The stage runner (mmn/runner.py): options from the declaration, one-line errors, checked
inputs, atomic outputs and the one info-JSON convention."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from mmn.errors import DataError, MMNError, ModelError, NetworkError, ParamsError, QualityError, StageError
from mmn.runner import Run, flag, settings, stage
from mmn.stage_specs import STAGES

REPO = Path(__file__).resolve().parents[1]


def _invoke(cmd, *args: str):
    return CliRunner().invoke(cmd, ["--params", str(REPO / "params.yaml"), *args])


def test_flags_follow_the_declared_names():
    assert flag("categories_out") == "--categories-out" and flag("out") == "--out"


def test_undeclared_params_read_is_one_line_and_exit_1(tmp_path):
    @stage("decode")
    def body(run: Run) -> None:
        run.params.iou  # noqa: B018 - a section read is allowed, a leaf is not
        _ = run.params.iou.quantile

    att = tmp_path / "a.parquet"
    pl.DataFrame({"x": [1]}).write_parquet(att)
    r = _invoke(body, "--attributions", str(att), "--plant", str(tmp_path), "--out", str(tmp_path / "n.parquet"))
    assert r.exit_code == 1
    assert r.output.startswith("[decode] error: stage decode reads params key 'iou.quantile'")
    assert "Traceback" not in r.output


def test_a_bug_keeps_its_traceback(tmp_path):
    @stage("decode")
    def bug(run: Run) -> None:
        raise KeyError("a bug keeps its traceback")

    att = tmp_path / "a.parquet"
    att.write_bytes(b"x")
    r = _invoke(bug, "--attributions", str(att), "--plant", str(tmp_path))
    assert isinstance(r.exception, KeyError)
    for cls in (DataError, ModelError, NetworkError, ParamsError, QualityError, StageError):
        assert issubclass(cls, MMNError)


def test_missing_input_names_file_and_stage_before_the_body_runs(tmp_path):
    ran = []

    @stage("filter")
    def body(run: Run) -> None:
        ran.append(1)

    r = _invoke(body, "--attributions", str(tmp_path / "nope.parquet"), "--neurons", str(tmp_path / "n.parquet"),
                "--wordlist", str(tmp_path / "words"))
    assert r.exit_code == 1 and not ran
    assert r.output.startswith(f"[filter] error: {tmp_path}/nope.parquet: input does not exist (input "
                               f"'attributions' of stage filter;")
    assert "2 more input(s) missing" in r.output  # neurons and wordlist are not there either
    # an input no stage produces (DVC-tracked) gets its own remedy, not `dvc repro`
    for name in ("attributions", "neurons"):
        (tmp_path / f"{name}.parquet").write_bytes(b"")
    r = _invoke(body, "--attributions", str(tmp_path / "attributions.parquet"),
                "--neurons", str(tmp_path / "neurons.parquet"), "--wordlist", str(tmp_path / "words"))
    assert r.exit_code == 1 and not ran
    assert r.output.startswith(f"[filter] error: {tmp_path}/words: word list missing; run scripts/setup.sh")
    assert "(input 'wordlist' of stage filter)" in r.output and "dvc repro" not in r.output


def test_corrupt_input_is_one_line_and_no_output_is_half_written(tmp_path):
    """A truncated parquet read through the runner: one line naming the file, exit 1, and the
    output written before the failure is not left behind (writes are atomic, and the failing
    read comes first)."""
    good = tmp_path / "good.parquet"
    pl.DataFrame({"x": list(range(100))}).write_parquet(good)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out = tmp_path / "out.parquet"

    @stage("decode")
    def body(run: Run) -> None:
        df = run.read_parquet("attributions")
        run.write_parquet("out", df)

    r = _invoke(body, "--attributions", str(bad), "--plant", str(tmp_path), "--out", str(out))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.startswith(f"[decode] error: {bad}") and not out.exists()
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))
    r = _invoke(body, "--attributions", str(good), "--plant", str(tmp_path), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert pl.read_parquet(out).equals(pl.read_parquet(good))


def test_info_json_convention(tmp_path):
    """write_info: stage, the value of every declared params key (profile name substituted),
    output paths, then the description."""
    import yaml

    @stage("filter")
    def body(run: Run) -> None:
        run.write_info({"rule": "r"})

    paths = {k: str(tmp_path / Path(v).name) for k, v in STAGES["filter"].outputs.items()}
    for k in STAGES["filter"].inputs:
        (tmp_path / k).write_text("x")
    args = [a for k, v in paths.items() for a in (flag(k), v)]
    args += [a for k in STAGES["filter"].inputs for a in (flag(k), str(tmp_path / k))]
    r = _invoke(body, *args)
    assert r.exit_code == 0, r.output
    info = json.loads(Path(paths["info"]).read_text())
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert info["stage"] == "filter" and info["rule"] == "r" and info["outputs"] == paths
    assert info["settings"] == {"seed": raw["seed"], "attribute.rank_by": raw["attribute"]["rank_by"],
                                "decode": raw["decode"], "filter": raw["filter"]}


def test_write_metrics_writes_the_full_results_and_their_headline_or_neither(tmp_path):
    """Run.write_metrics: ``full`` to the results output, ``headline(stem, full)`` to the metrics
    output, byte for byte the committed pair (summary/ holds the results' git copy); a path the
    headline needs that ``full`` lacks writes neither file."""
    from mmn.headline import HeadlineError, headline

    full = json.loads((REPO / "summary/iou.json").read_text())

    def body_with(numbers: dict):
        @stage("iou")
        def body(run: Run) -> None:
            run.write_metrics(numbers, headline)
        return body

    def args_in(folder: Path) -> tuple[dict, list[str]]:
        folder.mkdir()
        paths = {k: str(folder / k) for k in STAGES["iou"].outputs}
        for k in STAGES["iou"].inputs:
            (tmp_path / k).write_text("x")
        return paths, [a for k, v in paths.items() for a in (flag(k), v)] + [
            a for k in STAGES["iou"].inputs for a in (flag(k), str(tmp_path / k))]

    paths, args = args_in(tmp_path / "good")
    r = _invoke(body_with(full), *args)
    assert r.exit_code == 0, r.output
    assert Path(paths["results"]).read_bytes() == (REPO / "summary/iou.json").read_bytes()
    assert Path(paths["metrics"]).read_bytes() == (REPO / "metrics/iou.json").read_bytes()
    assert json.loads(Path(paths["metrics"]).read_text()) == headline("iou", full)
    paths, args = args_in(tmp_path / "bad")
    r = _invoke(body_with({"n_images": 1}), *args)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    with pytest.raises(HeadlineError):
        headline("iou", {"n_images": 1})
    assert not Path(paths["results"]).exists() and not Path(paths["metrics"]).exists()


def test_settings_resolve_the_active_profile():
    from mmn.params import load_params

    p = load_params(REPO / "params.yaml")
    s = settings(p, ("profile", "profiles.${profile}.lm", "caption.prompt"))
    assert s == {"profile": p.profile, f"profiles.{p.profile}.lm": p.model.lm, "caption.prompt": p.caption.prompt}


def test_model_load_error_is_one_line_in_a_stage(tmp_path):
    from mmn.models.lm import ModelLoadError

    @stage("decode")
    def body(run: Run) -> None:
        raise ModelLoadError("language model 'x' is not in the Hugging Face cache")

    att = tmp_path / "a.parquet"
    att.write_bytes(b"x")
    r = _invoke(body, "--attributions", str(att), "--plant", str(tmp_path))
    assert r.exit_code == 1
    assert r.output == "[decode] error: language model 'x' is not in the Hugging Face cache\n"


def test_summary_stage_copies_every_result_or_writes_nothing(tmp_path):
    """stages.summary: summary/<stem>.json equals data/results/<stem>.json byte for byte; a
    corrupt input fails naming it, before any summary is written."""
    from mmn.io import write_json
    from mmn.stage_specs import RESULT_STEMS
    from stages.summary import main

    args = []
    for i, stem in enumerate(RESULT_STEMS):
        write_json({"n_images": i, "x": {"mean": 0.5 + i, "lo": None}}, tmp_path / "results" / f"{stem}.json")
        args += [flag(stem), str(tmp_path / "results" / f"{stem}.json"),
                 flag(f"{stem}_summary"), str(tmp_path / "summary" / f"{stem}.json")]
    last = tmp_path / "results" / f"{RESULT_STEMS[-1]}.json"
    good = last.read_bytes()
    last.write_text('{"n_images": ')
    r = _invoke(main, *args)
    assert r.exit_code == 1 and str(last) in r.output and r.output.startswith("[summary] error:")
    assert not (tmp_path / "summary").exists() or not any((tmp_path / "summary").iterdir())
    last.write_bytes(good)
    r = _invoke(main, *args)
    assert r.exit_code == 0, r.output
    for stem in RESULT_STEMS:
        assert (tmp_path / "summary" / f"{stem}.json").read_bytes() == (tmp_path / "results" / f"{stem}.json").read_bytes()
