"""Render the static report from page records (Jinja2, autoescaped).

The ``plot`` stage fills :class:`Report` (which pictures exist, which units and images
have pages) and calls :func:`render_report`; this module only lays out HTML. Links are
relative (``root`` is ``""`` on top-level pages, ``"../"`` below), so the folder can
be moved or opened from disk.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from mmn.metrics.stats import at_mc_floor, format_p
from mmn.report.paper import NOTES, PAPER, score_scale_note

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"


@dataclass
class UnitRow:
    """A unit as listed on an image page or the unit index."""

    key: str
    layer: int
    unit: int
    interpretable: bool | None
    tokens: list[str]
    g: float | None = None
    rank: int | None = None
    heat: str | None = None          # heatmap of this unit over the page's image (report-relative path)


@dataclass
class ImageRow:
    """An image as listed on a unit page."""

    image_id: int
    has_page: bool
    g: float | None = None
    rank: int | None = None
    activation: float | None = None
    heat: str | None = None


@dataclass
class ImagePage:
    image_id: int
    file_name: str
    caption: tuple[str, str, str]    # before, target word, after
    noun: str | None
    target_token: str | None
    p_target: float | None
    refs: list[str]
    photo: str
    figure: str | None               # Fig. 2 (superimposed receptive fields)
    units: list[UnitRow]


@dataclass
class UnitPage:
    key: str
    layer: int
    unit: int
    interpretable: bool | None
    n_words: int | None
    tokens: list[tuple[str, float]]
    max_g: float
    n_images: int
    card: str | None                 # Fig. 1
    figure: str | None               # Fig. 4
    attributed: list[ImageRow]       # images where the unit is among the top-k triples
    top_images: list[ImageRow]       # top-activating images among those scanned


@dataclass
class Cell:
    value: str
    title: str | None = None


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[tuple[str, list[Cell]]]


@dataclass
class Section:
    name: str
    source: str
    note: str | None
    tables: list[Table]


@dataclass
class QualityBox:
    """First page: how the projection was trained and whether its captions carry image information."""

    held_out: bool                   # trained on images that are not evaluated
    train_data: str                  # projection.train.data (or the LiMBeR source)
    own: dict                        # BERTScore vs own references {"mean","lo","hi","n"}
    shuffled: dict                   # vs shuffled references
    test: dict                       # own - shuffled {"diff","lo","hi","p","n"}
    noun: dict                       # share of images whose first noun is in their own references
    distinct_nouns: int | None
    n_images: int | None
    bert_model: str
    warning: str | None              # set when own vs shuffled is not significant
    loss_figure: str | None = None   # report-relative path of the training-loss figure
    best_step: int | None = None
    steps_run: int | None = None


@dataclass
class Report:
    title: str
    subtitle: str
    images: list[ImagePage]
    units: list[UnitPage]
    sections: list[Section]
    figures: list[tuple[str, str, str]] = field(default_factory=list)  # (title, path, caption)
    cards: list[tuple[str, str]] = field(default_factory=list)        # (unit key, path)
    quality: QualityBox | None = None                                  # first-page box (caption stage)


# --------------------------------------------------------------------------- metric tables

def _fmt(v, key: str = "") -> Cell:
    """One table cell; a p-value (``key`` ``p`` or ``*_p``) at the paired test's Monte Carlo floor
    reads ``≤ 0.0002``, with the reason on hover."""
    if (key == "p" or key.endswith("_p")) and isinstance(v, float) and at_mc_floor(v):
        return Cell(f"≤ {v:.2g}", "Monte Carlo floor of the paired test: no sign flip reached the observed "
                                  "difference, so p is at most this")
    if v is None:
        return Cell("—")
    if isinstance(v, bool):
        return Cell(str(v).lower())
    if isinstance(v, int):
        return Cell(str(v))
    if isinstance(v, float):
        return Cell(f"{v:.4g}")
    s = str(v)
    if s.startswith("not computed"):
        return Cell("not computed", s)
    return Cell(s if len(s) <= 80 else s[:77] + "…", s if len(s) > 80 else None)


def _sort_keys(keys: list[str]) -> list[str]:
    """``k0, k50, k100`` in numeric order; other keys as given."""
    if keys and all(k[:1] == "k" and k[1:].isdigit() for k in keys):
        return sorted(keys, key=lambda k: int(k[1:]))
    return keys


def _leaf_dict(d) -> bool:
    return isinstance(d, dict) and all(not isinstance(v, dict) for v in d.values())


def _tables(obj: dict, path: str, title: str) -> list[Table]:
    """A dict whose children are all scalars or flat dicts becomes one grid (rows = keys,
    columns = the flat dicts' keys, a scalar child fills its whole row); otherwise its
    scalars form a key/value table and its dict children are laid out recursively."""
    scalars = {k: v for k, v in obj.items() if not isinstance(v, dict)}
    children = {k: v for k, v in obj.items() if isinstance(v, dict)}
    if children and all(_leaf_dict(v) for v in children.values()) and "." in path:
        cols_src = list(dict.fromkeys(c for v in children.values() for c in v))
        cols, spec = [], []
        for c in cols_src:
            cols.append(c), spec.append((c, False))
            if any(f"{path}.{k}.{c}" in PAPER for k in obj):
                cols.append(f"{c} (paper)"), spec.append((c, True))
        rows = []
        for k in _sort_keys(list(obj)):
            v = obj[k]
            cells = [_fmt(PAPER.get(f"{path}.{k}.{c}", PAPER.get(f"{path}.{k}") if not isinstance(v, dict) else None))
                     if paper else _fmt(v.get(c) if isinstance(v, dict) else v, c if isinstance(v, dict) else k)
                     for c, paper in spec]
            rows.append((k, cells))
        return [Table(title, cols, rows)]
    out: list[Table] = []
    if scalars:
        has_paper = any(f"{path}.{k}" in PAPER for k in scalars)
        cols = ["value"] + (["paper"] if has_paper else [])
        rows = [(k, [_fmt(v, k)] + ([_fmt(PAPER.get(f"{path}.{k}"))] if has_paper else [])) for k, v in scalars.items()]
        out.append(Table(title, cols, rows))
    for k, v in children.items():
        out += _tables(v, f"{path}.{k}", f"{title} / {k}")
    return out


def _paper_skeleton(prefix: str) -> dict:
    """The nested keys of the PAPER entries under ``prefix`` with every value None (ours not computed)."""
    out: dict = {}
    for key in PAPER:
        if key.startswith(prefix):
            *parents, leaf = key[len(prefix):].split(".")
            d = out
            for k in parents:
                d = d.setdefault(k, {})
            d[leaf] = None
    return out


def metric_tables(metrics: dict[str, dict]) -> list[Section]:
    """One section per results file (summary/*.json, ``{"scores": {...}, "iou": {...}}``): its values as
    tables, with the paper's value (:data:`mmn.report.paper.PAPER`) beside each entry
    the paper reports."""
    sections = []
    for name, obj in metrics.items():
        note = NOTES.get(name)
        if name == "scores" and isinstance(obj, dict):
            note = f"{note or ''} {score_scale_note(obj.get('scale'), obj.get('clipscore') is not None)}".strip()
            if obj.get("clipscore") is None:  # not computed: keep the paper's CLIPScores on show, ours "—"
                obj = {**obj, "clipscore": _paper_skeleton("scores.clipscore.")}
        tables = _tables(obj, name, name) if isinstance(obj, dict) else []
        sections.append(Section(name, f"summary/{name}.json", note, tables))
    return sections


# --------------------------------------------------------------------------- rendering

def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["num"] = lambda v, d=4: "—" if v is None else f"{v:.{d}g}"
    env.filters["pval"] = format_p  # "p ≤ 0.0002" at the Monte Carlo floor
    env.filters["tok"] = _show_token
    return env


def _show_token(t: str) -> str:
    from mmn.plots.figures import show_token

    return show_token(t)


def render_report(report: Report, out: Path) -> list[Path]:
    """Write ``index.html``, ``units.html``, ``tables.html``, ``figures.html``,
    ``images/<id>.html``, ``units/<key>.html`` and ``style.css`` under ``out`` (the pictures
    the pages name must already be there). Returns the pages written."""
    env = _env()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(STATIC / "style.css", out / "style.css")
    written = []

    def page(template: str, path: str, **ctx) -> None:
        root = "../" * path.count("/")
        html = env.get_template(template).render(report=report, root=root, **ctx)
        dst = out / path
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(html, encoding="utf-8")
        written.append(dst)

    pages_of_units = {u.key for u in report.units}
    pages_of_images = {i.image_id for i in report.images}
    ctx = {"unit_pages": pages_of_units, "image_pages": pages_of_images}
    page("index.html.j2", "index.html", **ctx)
    page("units.html.j2", "units.html", **ctx)
    page("tables.html.j2", "tables.html", **ctx)
    page("figures.html.j2", "figures.html", **ctx)
    for im in report.images:
        page("image.html.j2", f"images/{im.image_id}.html", image=im, **ctx)
    for u in report.units:
        page("unit.html.j2", f"units/{u.key}.html", unit=u, **ctx)
    return written
