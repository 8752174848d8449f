"""dvc.yaml declares exactly what each stage reads: its code and its params.

Code: the transitive set of project modules that ``stages/<name>.py`` imports (module- and
function-level imports, relative imports, ``from pkg import submodule``; imports under
``if TYPE_CHECKING:`` do not run and are skipped), plus the package-data files those
modules read. Params and data paths: each stage's declaration in :mod:`mmn.stage_specs`, the
table the stage runner builds the options from and enforces at run time (a read of an
undeclared params key is a ParamsError).

Each check fails naming the stage and the missing or unused item.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from mmn.stage_params import ACTIVE_PROFILE, STAGE_PARAMS, ParamsView, covered
from mmn.stage_specs import STAGES as SPECS

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mmn", "stages")
#: project modules -> the non-Python package files they read (importlib.resources / __file__).
PACKAGE_DATA = {
    "mmn/params.py": ("mmn/data/sample_annotations.json",),
    "mmn/data/sample.py": ("mmn/data/sample_annotations.json",),
    "mmn/report/build.py": ("mmn/report/templates", "mmn/report/static"),
}


def _dvc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _module_file(module: str) -> Path | None:
    """``mmn.a.b`` -> mmn/a/b.py or mmn/a/b/__init__.py (None when not a project module)."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _package_of(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1]) if parts[-1] != "__init__" else ".".join(parts[:-1])


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imported_modules(path: Path) -> set[str]:
    """Every module name ``path`` imports anywhere (functions included), resolved to absolute names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = _package_of(path)
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import submodule`
    return names


def _with_parents(module: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _trivial(path: Path) -> bool:
    """An ``__init__.py`` with nothing but a docstring/``__version__`` cannot change a result."""
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
               or isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id == "__version__"
                                                    for t in n.targets) for n in body)


@lru_cache(maxsize=None)
def code_deps(stage: str) -> frozenset[str]:
    """Repo-relative files stage ``stage`` runs or reads: its entrypoint, every project module
    it imports transitively, and their package data."""
    todo, seen = [REPO / "stages" / f"{stage}.py"], set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for name in _imported_modules(f):
            for mod in _with_parents(name):
                mf = _module_file(mod)
                if mf is not None and mf not in seen:
                    todo.append(mf)
    files = {str(f.relative_to(REPO)) for f in seen if not (f.name == "__init__.py" and _trivial(f))}
    for f in list(files):
        files |= set(PACKAGE_DATA.get(f, ()))
    return frozenset(files)


def _py_files_under(rel: str) -> set[str]:
    p = REPO / rel
    if p.is_file():
        return {rel}
    return {str(f.relative_to(REPO)) for f in p.rglob("*.py") if not (f.name == "__init__.py" and _trivial(f))}


def _declared_code(stage: str) -> list[str]:
    return [d for d in _dvc()[stage].get("deps", []) if d.split("/")[0] in PACKAGES]


def _declared_params(stage: str) -> list[str]:
    out: list[str] = []
    for p in _dvc()[stage].get("params", []):
        out += list(p.values())[0] if isinstance(p, dict) else [p]
    return out


def _covers(dep: str, path: str) -> bool:
    return path == dep or path.startswith(dep.rstrip("/") + "/")


STAGES = sorted(_dvc())


def test_every_stage_has_an_entry_and_a_declaration():
    assert set(STAGES) == set(STAGE_PARAMS), "dvc.yaml stages and mmn.stage_params.STAGE_PARAMS differ"
    for s in STAGES:
        assert (REPO / "stages" / f"{s}.py").is_file(), s


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_declared(stage):
    """Every project file the stage imports is a dep (directly or through a declared folder)."""
    declared = _declared_code(stage)
    missing = sorted(f for f in code_deps(stage) if not any(_covers(d, f) for d in declared))
    assert not missing, f"stage {stage}: dvc.yaml deps lack {missing}"


@pytest.mark.parametrize("stage", STAGES)
def test_no_unused_code_deps(stage):
    """A declared file is imported; a declared folder only when the stage imports ALL its modules."""
    used = code_deps(stage)
    unused = []
    for d in _declared_code(stage):
        if not (REPO / d).exists():
            unused.append(f"{d} (does not exist)")
            continue
        wanted = _py_files_under(d) if (REPO / d).is_dir() and d not in used else {d}
        not_imported = sorted(wanted - used)
        if not_imported:
            unused.append(f"{d} (not imported: {not_imported})")
    assert not unused, f"stage {stage}: dvc.yaml declares unused code deps {unused}"


@pytest.mark.parametrize("stage", STAGES)
def test_params_match_declaration(stage):
    """dvc.yaml params == STAGE_PARAMS[stage], both ways."""
    declared = _declared_params(stage)
    table = STAGE_PARAMS[stage]
    missing = sorted(set(table) - set(declared))
    unused = sorted(set(declared) - set(table))
    assert not missing, f"stage {stage}: dvc.yaml params lack {missing} (the stage reads them)"
    assert not unused, f"stage {stage}: dvc.yaml declares params {unused} that the stage does not read"
    assert len(declared) == len(set(declared)), f"stage {stage}: duplicate params {declared}"


@pytest.mark.parametrize("stage", STAGES)
def test_params_exist_in_params_yaml(stage):
    """Every declared key resolves in params.yaml for every profile (DVC fails on a missing key)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for profile in raw["profiles"]:
        for key in STAGE_PARAMS[stage]:
            node = raw
            for part in key.replace("${profile}", profile).split("."):
                assert isinstance(node, dict) and part in node, f"stage {stage}: {key} missing (profile {profile})"
                node = node[part]


def test_other_profiles_do_not_invalidate_the_active_one():
    """Editing only profiles.paper (or any inactive profile) leaves the embedded pipeline up to
    date: no stage declares ``profiles`` wholesale or a fixed profile's keys, only the
    templated active profile ``profiles.${profile}``."""
    profiles = yaml.safe_load((REPO / "params.yaml").read_text())["profiles"]
    for stage in STAGES:
        for key in _declared_params(stage):
            assert key != "profiles", f"stage {stage} depends on every profile ('profiles')"
            if key.startswith("profiles."):
                assert key.split(".")[1] == "${profile}", f"stage {stage} declares {key}"
                assert key.split(".")[1] not in profiles
        if any(k.startswith(ACTIVE_PROFILE) for k in _declared_params(stage)):
            assert "profile" in _declared_params(stage), stage


def test_dvc_resolves_the_active_profile(tmp_path):
    """DVC's own parser turns ``profiles.${profile}`` into the active profile's key."""
    from dvc.repo import Repo

    repo = Repo.init(str(tmp_path), no_scm=True)
    (tmp_path / "params.yaml").write_text("profile: b\nprofiles:\n  a: {x: 1}\n  b: {x: 2}\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: echo\n    params:\n      - profile\n      - profiles.${profile}\n")
    (stage,) = Repo(str(tmp_path)).index.stages
    keys = [p for d in stage.deps if hasattr(d, "params") for p in d.params]
    assert keys == ["profile", "profiles.b"]
    repo.close()


# -- the run-time check ---------------------------------------------------------------------

def _params():
    from mmn.params import load_params

    return load_params(REPO / "params.yaml")


def test_view_refuses_undeclared_reads():
    from mmn.params import ParamsError

    v = ParamsView(_params(), "filter")
    assert v.filter.top_n == 10 and v.decode.lens == "unembed" and v.seed == 0
    with pytest.raises(ParamsError, match=r"stage filter reads params key 'caption.prompt'"):
        _ = v.caption.prompt
    with pytest.raises(ParamsError, match=r"'profile'"):
        _ = v.model  # the active profile (filter declares none)
    assert v.reads == {"filter.top_n", "decode.lens", "seed"}


def test_view_profile_and_properties():
    from mmn.params import ParamsError

    p = _params()
    v = ParamsView(p, "download_train")
    assert v.model.data_source == p.model.data_source
    assert v.coco_train == p.coco_train and v.train_data == p.train_data
    assert {"profile", "profiles.${profile}.data_source", "data.coco", "projection.train.split"} <= v.reads
    with pytest.raises(ParamsError, match="'profiles'"):
        _ = ParamsView(p, "caption").profiles


def test_load_params_checks_only_inside_a_stage():
    from mmn.params import ParamsError, load_params
    from mmn.stage_params import reset_active_stage, set_active_stage

    assert not isinstance(load_params(REPO / "params.yaml"), ParamsView)
    token = set_active_stage("decode")
    try:
        v = load_params(REPO / "params.yaml")
        assert v.decode.top_n == 10
        with pytest.raises(ParamsError, match="stage decode reads params key 'iou.quantile'"):
            _ = v.iou.quantile
    finally:
        reset_active_stage(token)
    assert not isinstance(load_params(REPO / "params.yaml"), ParamsView)


# -- paths: each stage's declaration (mmn.stage_specs) is what dvc.yaml lists and what click offers -----


def _dvc_paths(stage: str) -> dict[str, set[str]]:
    """Data paths dvc.yaml declares for ``stage``, by section (deps without code, outs, metrics, plots)."""
    st, out = _dvc()[stage], {}
    for key in ("deps", "outs", "metrics", "plots"):
        paths = set()
        for e in st.get(key) or []:
            paths |= set(e) if isinstance(e, dict) else {e}
        out[key] = {p for p in paths if p.split("/")[0] not in PACKAGES}
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_matches_the_stage_declaration(stage):
    """dvc.yaml's cmd, data deps, outs and metrics of each stage are exactly its StageSpec's
    (mmn/stage_specs.py): changing one without the other fails here, naming the stage and path."""
    spec, dvc = SPECS[stage], _dvc_paths(stage)
    assert _dvc()[stage]["cmd"].split("#")[0].strip() == spec.cmd, f"stage {stage}: cmd"
    metrics = {spec.outputs[k] for k in spec.metrics}
    for section, want in (("deps", set(spec.inputs.values())),
                          ("outs", set(spec.outputs.values()) - metrics), ("metrics", metrics)):
        for path in sorted(want - dvc[section]):
            pytest.fail(f"stage {stage}: {path} is declared in mmn/stage_specs.py but not under {section} in dvc.yaml")
        for path in sorted(dvc[section] - want):
            pytest.fail(f"stage {stage}: dvc.yaml {section} lists {path}, which mmn/stage_specs.py does not declare")
    assert not dvc["plots"], f"stage {stage}: plots are declared at the top level of dvc.yaml"


@pytest.mark.parametrize("stage", STAGES)
def test_click_options_are_the_declaration(stage):
    """The stage's command-line options and their defaults are its declared paths (+ --params)."""
    import importlib

    import click

    cmd = importlib.import_module(f"stages.{stage}").main
    spec = SPECS[stage]
    paths = {p.name: p.default for p in cmd.params if isinstance(p.type, click.Path) and p.name != "params_path"}
    paths.pop("ckpt", None)  # load_projection's optional local checkpoint (no default)
    assert paths == {**spec.inputs, **spec.outputs, **spec.options}


def test_dvc_check_catches_a_drift(monkeypatch):
    """Mutation: a dvc.yaml out renamed without the declaration makes the check fail."""
    st = {k: dict(v) for k, v in _dvc().items()}
    st["caption"]["outs"] = ["data/captions_renamed.parquet" if o == "data/captions.parquet" else o
                             for o in st["caption"]["outs"]]
    monkeypatch.setitem(globals(), "_dvc", lambda: st)
    with pytest.raises(pytest.fail.Exception, match="stage caption: data/captions.parquet is declared"):
        test_dvc_yaml_matches_the_stage_declaration("caption")


def test_an_edit_reruns_only_the_stages_that_run_the_edited_code():
    """Exact invalidation, on the derived import sets: the data stages import no model or
    attribution code (the quality suites read the method names from an import-free module),
    so an edit to attribution re-runs attribute and what reads its code, never the downloads
    or the projection training; a BERTScore edit re-runs the stages that score captions."""
    deps = {s: code_deps(s) for s in STAGES}
    def users(f: str) -> set[str]:
        return {s for s, d in deps.items() if f in d}
    assert users("mmn/neurons/attribution.py") == {"attribute", "ablate", "compare_methods", "controls", "plot"}
    assert users("mmn/metrics/bertscore.py") == {"caption", "score", "ablate", "plot"}
    for s in ("download_coco", "download_train"):
        assert not any(f.startswith(("mmn/models/", "mmn/neurons/attribution", "mmn/neurons/methods"))
                       for f in deps[s]), s
    assert "mmn/neurons/names.py" in deps["download_coco"]  # the quality suites' one import from neurons


def test_a_profile_key_edit_reruns_only_the_stages_that_read_it():
    """Per-key profile params: bert_layers is read by the stages that score with BERTScore,
    iou_categories by iou and plot, the LM by every stage that runs it; the downloads read
    only data keys, so a model or scorer edit never re-downloads or retrains."""
    def readers(key: str) -> set[str]:
        return {s for s in STAGES if f"{ACTIVE_PROFILE}.{key}" in _declared_params(s)}

    assert readers("bert_layers") == {"caption", "score", "ablate"}
    assert readers("iou_categories") == {"iou", "plot"}
    assert readers("clip_pretrained") == {"score"}
    assert readers("lm") == set(STAGES) - {"download_coco", "download_train", "filter", "summary"}
    for s in ("download_coco", "download_train"):
        assert not any(k.endswith(("lm", "encoder", "bert_model", "bert_layers", "iou_categories", "dtype"))
                       for k in _declared_params(s)), s
    assert ACTIVE_PROFILE not in {k for s in STAGES for k in _declared_params(s)}  # never the whole profile
