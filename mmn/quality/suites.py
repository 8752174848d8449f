"""Expectation suites, as data, and the ``check_*`` gates built on them.

A suite is a function returning a list of :func:`mmn.quality.core.expect` dicts;
:data:`SUITES` maps suite names to those functions so later stages can register
theirs (``register_suite("attributions", attributions_suite)``) and run them with
``run_suite(df, name, SUITES[name]())``.

Tables checked here:

* ``captions``: ``data/captions.parquet`` (stage ``caption``), one row per image.
* ``coco_images`` / ``coco_instances`` / ``coco_captions`` / ``coco_categories``:
  frames derived from a COCO-format layout by :func:`check_coco_layout`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import pathlib
import warnings
from typing import Any, Callable, Sequence

import pandas as pd

from mmn.data.coco_format import read_coco_json

from .core import QualityError, expect, format_failures, run_suite, validate, when

__all__ = [
    "SUITES",
    "register_suite",
    "CAPTIONS_COLUMNS",
    "captions_suite",
    "check_captions",
    "coco_images_suite",
    "coco_instances_suite",
    "coco_captions_suite",
    "coco_categories_suite",
    "coco_frames",
    "check_coco_layout",
    "train_eval_disjoint_suite",
    "check_train_eval_disjoint",
]

SUITES: dict[str, Callable[..., list]] = {}


def register_suite(name: str, factory: Callable[..., list]) -> Callable[..., list]:
    """Register ``factory`` (returns an expectation list) under ``name``."""
    SUITES[name] = factory
    return factory


def _exists(*cols: str) -> list[dict]:
    return [expect("expect_column_to_exist", column=c) for c in cols]




# ------------------------------------------------------------------ captions


#: column -> GX type name for ``expect_column_values_to_be_of_type`` (pandas
#: semantics: "int64" also admits nullable Int64, "str" admits str/string/object-of-str).
CAPTIONS_COLUMNS: dict[str, str] = {
    "image_id": "int64",
    "file_name": "str",
    "caption": "str",
    "has_noun": "bool",
    "noun": "str",
    "target_token_id": "int64",
    "target_token": "str",
    "target_pos": "int64",
    "p_target": "float64",
    "n_caption_tokens": "int64",
}

#: columns that are null exactly when ``has_noun`` is False
_NOUN_DEPENDENT = ("noun", "target_token_id", "target_token", "target_pos", "p_target")


def captions_suite() -> list[dict]:
    """Schema of ``captions.parquet``: one row per image, the caption, its first noun
    and the target token c (null iff the caption has no noun)."""
    es: list[dict] = _exists(*CAPTIONS_COLUMNS)
    es.append(expect("expect_table_row_count_to_be_between", min_value=1))
    es += [expect("expect_column_values_to_be_of_type", column=c, type_=t)
           for c, t in CAPTIONS_COLUMNS.items()]
    es += [expect("expect_column_values_to_not_be_null", column=c)
           for c in ("image_id", "file_name", "caption", "has_noun", "n_caption_tokens")]
    es += [
        expect("expect_column_values_to_be_unique", column="image_id"),
        expect("expect_column_values_to_be_between", column="p_target",
               min_value=0.0, max_value=1.0),
        expect("expect_column_values_to_be_between", column="target_pos", min_value=0),
        expect("expect_column_values_to_be_between", column="target_token_id", min_value=0),
        expect("expect_column_values_to_be_between", column="n_caption_tokens", min_value=0),
    ]
    for c in _NOUN_DEPENDENT:
        es.append(expect("expect_column_values_to_not_be_null", column=c,
                         description=f"{c} must be set when has_noun is True",
                         row_condition=when("has_noun", "==", True)))
        es.append(expect("expect_column_values_to_be_null", column=c,
                         description=f"{c} must be null when has_noun is False",
                         row_condition=when("has_noun", "==", False)))
    return es


register_suite("captions", captions_suite)

#: per-image caption-quality columns written by the caption stage (mmn.captioning.caption_quality)
CAPTION_QUALITY_COLUMNS: dict[str, str] = {
    "bertscore_own": "float64",
    "shuffled_image_id": "int64",
    "bertscore_shuffled": "float64",
    "noun_in_refs": "bool",
}


def caption_quality_suite() -> list[dict]:
    """The quality columns: BERTScore F1 in [-1, 1] vs own and shuffled references, never null;
    the shuffled image is another image of the set (a derangement: never the row's own image)."""
    es: list[dict] = _exists(*CAPTION_QUALITY_COLUMNS)
    es += [expect("expect_column_values_to_be_of_type", column=c, type_=t)
           for c, t in CAPTION_QUALITY_COLUMNS.items()]
    es += [expect("expect_column_values_to_not_be_null", column=c) for c in CAPTION_QUALITY_COLUMNS]
    es += [expect("expect_column_values_to_be_between", column=c, min_value=-1.0, max_value=1.0)
           for c in ("bertscore_own", "bertscore_shuffled")]
    es.append(expect("expect_column_values_to_be_in_set", column="noun_in_refs", value_set=[True, False]))
    return es


register_suite("caption_quality", caption_quality_suite)


def check_captions(df: Any, with_quality: bool = False) -> None:
    """Gate for ``captions.parquet``: a pandas/polars frame, or a path to the file.

    ``with_quality``: also the caption-quality columns (:func:`caption_quality_suite`).
    A path is read with nullable dtypes, so integer columns holding nulls stay
    integer (plain ``pd.read_parquet`` would make them float64 and fail the type check).
    """
    if isinstance(df, (str, pathlib.Path)):
        df = pd.read_parquet(df, dtype_backend="numpy_nullable")
    run_suite(df, "captions", captions_suite() + (caption_quality_suite() if with_quality else []))
    if with_quality:
        pdf = df if isinstance(df, pd.DataFrame) else df.to_pandas()
        same = pdf.loc[pdf["shuffled_image_id"] == pdf["image_id"], "image_id"].tolist()
        if len(pdf) > 1 and same:
            raise QualityError(f"captions: shuffled_image_id equals image_id for images {same[:10]} "
                               "(the shuffled baseline must use another image's references)", suite="captions")


# ---------------------------------------------------------------------- COCO


def coco_images_suite() -> list[dict]:
    """One row per ``images`` record of instances.json, with derived
    ``file_exists`` and ``n_captions``."""
    return [
        *_exists("id", "file_name", "width", "height", "file_exists", "n_captions"),
        expect("expect_table_row_count_to_be_between", min_value=1),
        expect("expect_column_values_to_not_be_null", column="id"),
        expect("expect_column_values_to_be_unique", column="id"),
        expect("expect_column_values_to_not_be_null", column="file_name"),
        expect("expect_column_values_to_be_between", column="width", min_value=1),
        expect("expect_column_values_to_be_between", column="height", min_value=1),
        expect("expect_column_values_to_be_in_set", column="file_exists", value_set=[True],
               description="the image file must exist under images/"),
        expect("expect_column_values_to_be_between", column="n_captions", min_value=1,
               description="every image needs at least one caption in captions.json"),
    ]


def coco_instances_suite(image_ids: list, category_ids: list) -> list[dict]:
    """One row per instance annotation, with derived ``mask_pixels`` (pixels of
    pycocotools ``annToMask``; 0 when it fails, the reason in ``mask_error``)."""
    return [
        *_exists("id", "image_id", "category_id", "mask_pixels"),
        expect("expect_column_values_to_not_be_null", column="id"),
        expect("expect_column_values_to_be_unique", column="id"),
        expect("expect_column_values_to_be_in_set", column="image_id", value_set=image_ids,
               description="annotation refers to an image missing from 'images'"),
        expect("expect_column_values_to_be_in_set", column="category_id",
               value_set=category_ids,
               description="annotation refers to a category missing from 'categories'"),
        expect("expect_column_values_to_be_between", column="mask_pixels", min_value=1,
               description="the instance mask (pycocotools annToMask) must be non-empty"),
    ]


def coco_captions_suite(image_ids: list) -> list[dict]:
    """One row per caption annotation of captions.json."""
    return [
        *_exists("id", "image_id", "caption"),
        expect("expect_column_values_to_be_in_set", column="image_id", value_set=image_ids,
               description="caption refers to an image missing from 'images'"),
        expect("expect_column_values_to_not_be_null", column="caption"),
        expect("expect_column_value_lengths_to_be_between", column="caption", min_value=1),
    ]


def coco_categories_suite(n_instances: int = 1) -> list[dict]:
    """At least one category when there are instance annotations (a captions-only training
    layout, :mod:`mmn.data.captions_source`, has none of either)."""
    return [
        *_exists("id", "name"),
        expect("expect_table_row_count_to_be_between", min_value=1 if n_instances else 0),
        expect("expect_column_values_to_not_be_null", column="id"),
        expect("expect_column_values_to_be_unique", column="id"),
        expect("expect_column_values_to_not_be_null", column="name"),
    ]


def coco_skipped_suite(image_ids: Sequence[int]) -> list[dict]:
    """``skipped.csv``: images the source left out (``data.on_bad_image: skip``); none
    of them may still be in the layout, and every row says why."""
    return [
        *_exists("image_id", "file_name", "reason"),
        expect("expect_column_values_to_not_be_null", column="image_id"),
        expect("expect_column_values_to_be_unique", column="image_id"),
        expect("expect_column_values_to_not_be_in_set", column="image_id", value_set=list(image_ids),
               description="a skipped image must not be in instances.json"),
        expect("expect_column_values_to_not_be_null", column="reason"),
    ]


register_suite("coco_images", coco_images_suite)
register_suite("coco_instances", coco_instances_suite)
register_suite("coco_captions", coco_captions_suite)
register_suite("coco_categories", coco_categories_suite)
register_suite("coco_skipped", coco_skipped_suite)


def _structural(path: pathlib.Path) -> Callable[[str], QualityError]:
    """Error factory for :mod:`mmn.data.coco_format`: a structural problem of ``path``."""
    return lambda msg: QualityError(f"data-quality suite 'coco_layout' failed: {msg}",
                                    suite="coco_layout", path=path)


def _load_json(path: pathlib.Path, kind: str) -> dict:
    """``path`` read and checked by :func:`mmn.data.coco_format.read_coco_json` (lists of objects)."""
    return read_coco_json(path, kind, _structural(path))


def _records(items: list, columns: list[str]) -> pd.DataFrame:
    df = pd.DataFrame.from_records(items)
    for c in columns:  # a key missing from every record -> all-null column
        if c not in df.columns:
            df[c] = None
    return df


def _mask_pixels(instances: dict) -> tuple[list[int], list[str | None]]:
    """Pixels of pycocotools ``annToMask`` per annotation (0 + reason on failure)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = instances
    with contextlib.redirect_stdout(io.StringIO()):  # "creating index..."
        coco.createIndex()
    pixels: list[int] = []
    errors: list[str | None] = []
    for ann in instances["annotations"]:
        try:
            with warnings.catch_warnings():  # pycocotools vs numpy 2 copy= on crowd RLEs
                warnings.simplefilter("ignore", DeprecationWarning)
                n = int(coco.annToMask(ann).sum()) if isinstance(ann, dict) else 0
            errors.append(None if n else "empty mask")
        except Exception as e:  # noqa: BLE001 - any decode failure is a data failure
            n = 0
            errors.append(f"{type(e).__name__}: {e}"[:80])
        pixels.append(n)
    return pixels, errors


def coco_frames(root: pathlib.Path) -> dict[str, pd.DataFrame]:
    """Frames derived from a COCO layout (``images``, ``instances``, ``captions``,
    ``categories``); raises :class:`QualityError` on structural problems."""
    root = pathlib.Path(root)
    ann_dir = root / "annotations"
    img_dir = root / "images"
    if not img_dir.is_dir():
        raise _structural(img_dir)(f"{img_dir}: images directory missing")
    inst_path, cap_path = ann_dir / "instances.json", ann_dir / "captions.json"
    inst = _load_json(inst_path, "instances")
    caps = _load_json(cap_path, "captions")

    images = _records(inst["images"], ["id", "file_name", "width", "height"])
    images["file_exists"] = [
        isinstance(f, str) and bool(f) and (img_dir / f).is_file()
        for f in images["file_name"]
    ]
    captions = _records(caps["annotations"], ["id", "image_id", "caption"])
    counts = captions["image_id"].value_counts()
    images["n_captions"] = [int(counts.get(i, 0)) for i in images["id"]]

    instances = _records(inst["annotations"], ["id", "image_id", "category_id", "iscrowd"])
    instances["mask_pixels"], instances["mask_error"] = _mask_pixels(inst)
    instances = instances.drop(columns=[c for c in ("segmentation",) if c in instances])
    categories = _records(inst["categories"], ["id", "name"])
    skipped_path = root / "skipped.csv"  # written by the project's sources; absent = nothing skipped
    dtypes = {"image_id": "Int64", "file_name": "string", "reason": "string"}
    skipped = (pd.read_csv(skipped_path, dtype=dtypes) if skipped_path.is_file()
               else pd.DataFrame({c: pd.Series(dtype=t) for c, t in dtypes.items()}))
    return {"images": images, "instances": instances, "captions": captions,
            "categories": categories, "skipped": skipped}


def check_coco_layout(root: pathlib.Path) -> None:
    """Gate for ``root/images/<file_name>``, ``root/annotations/instances.json`` and
    ``root/annotations/captions.json`` (COCO format). Raises :class:`QualityError`
    naming the file on structural problems, else listing every unmet expectation of
    the four derived-frame suites."""
    frames = coco_frames(root)
    image_ids = [i for i in frames["images"]["id"].tolist() if i is not None]
    category_ids = [i for i in frames["categories"]["id"].tolist() if i is not None]
    plan = [
        ("coco_images", frames["images"], coco_images_suite()),
        ("coco_instances", frames["instances"], coco_instances_suite(image_ids, category_ids)),
        ("coco_captions", frames["captions"], coco_captions_suite(image_ids)),
        ("coco_categories", frames["categories"], coco_categories_suite(len(frames["instances"]))),
        ("coco_skipped", frames["skipped"], coco_skipped_suite(image_ids)),
    ]
    keys = {
        "coco_images": ("id", "file_name"),
        "coco_instances": ("id", "image_id", "mask_error"),
        "coco_captions": ("id", "image_id", "caption"),
        "coco_categories": ("id", "name"),
        "coco_skipped": ("image_id", "file_name", "reason"),
    }
    messages, failures = [], []
    for name, df, suite in plan:
        found = validate(df, name, suite, key_columns=keys[name])
        if found:
            failures += found
            messages.append(format_failures(name, found, len(suite), tuple(df.shape)))
    if failures:
        raise QualityError(
            f"data-quality gate 'coco_layout' failed for {pathlib.Path(root)}:\n"
            + "\n".join(messages),
            suite="coco_layout",
            failures=failures,
            path=pathlib.Path(root),
        )



# ------------------------------------------------------------ train/eval disjointness


def train_eval_disjoint_suite(eval_ids: Sequence[int] | None, eval_hashes: Sequence[str] = ()) -> list[dict]:
    """One row per image of the *training* layout (``data/coco_train``): none may be evaluated,
    by content (``sha256`` of the image file) and, where both layouts share an id space
    (``eval_ids`` not None: COCO ids), by id."""
    why = ("a training image of the projection is also an evaluated image (data/coco): its results would be "
           "partly memorisation")
    suite = [*_exists("sha256"),
             expect("expect_column_values_to_not_be_in_set", column="sha256", value_set=list(eval_hashes),
                    description=why + " (same file content)")]
    if eval_ids is not None:
        suite += [*_exists("id"), expect("expect_column_values_to_not_be_null", column="id"),
                  expect("expect_column_values_to_not_be_in_set", column="id", value_set=list(eval_ids),
                         description=why)]
    return suite


register_suite("train_eval_disjoint", train_eval_disjoint_suite)


def _layout_image_ids(root: pathlib.Path) -> list[int]:
    inst = _load_json(pathlib.Path(root) / "annotations" / "instances.json", "instances")
    ids = _records(inst["images"], ["id"])["id"]
    return [int(i) for i in ids.tolist() if i is not None]


def _layout_image_hashes(root: pathlib.Path) -> dict[int, str]:
    """``image id -> sha256`` of its file under ``root/images`` (a missing file hashes to its name)."""
    inst = _load_json(pathlib.Path(root) / "annotations" / "instances.json", "instances")
    out = {}
    for rec in inst["images"]:
        if not isinstance(rec, dict) or rec.get("id") is None:
            continue
        path = pathlib.Path(root) / "images" / str(rec.get("file_name"))
        out[int(rec["id"])] = (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file()
                               else f"missing:{rec.get('file_name')}")
    return out


def check_train_eval_disjoint(train_root: pathlib.Path, eval_root: pathlib.Path, *,
                              allow_overlap: bool = False, train_label: str | None = None,
                              compare_ids: bool = True) -> list[int]:
    """Gate of stage ``download_train``: no image of the training layout ``train_root`` may be in
    the evaluation layout ``eval_root``, compared by file content (sha256) and, unless
    ``compare_ids`` is False (``projection.train.data: captions``, whose ids are its own
    numbering), by image id. Returns the overlapping training ids (sorted); raises
    :class:`QualityError` naming them unless ``allow_overlap`` (``projection.train.data: eval``,
    whose caller must log it loudly). ``train_label``: how the message names the training layout
    (e.g. its final path while it is still being built in a temp folder)."""
    train_ids = _layout_image_ids(train_root)
    eval_ids = _layout_image_ids(eval_root)
    train_hash = _layout_image_hashes(train_root)
    eval_hashes = set(_layout_image_hashes(eval_root).values())
    same_id = set(train_ids) & set(eval_ids) if compare_ids else set()
    same_content = {i for i, h in train_hash.items() if h in eval_hashes}
    overlap = sorted(same_id | same_content)
    if allow_overlap:
        return overlap
    suite = train_eval_disjoint_suite(eval_ids if compare_ids else None, sorted(eval_hashes))
    frame = pd.DataFrame({"id": pd.Series(train_ids, dtype="int64"),
                          "sha256": [train_hash.get(i) for i in train_ids]})
    failures = validate(frame, "train_eval_disjoint", suite, key_columns=("id",))
    if failures or overlap:
        shown = ", ".join(str(i) for i in overlap[:50])
        if len(overlap) > 50:
            shown += f", ... ({len(overlap)} in all)"
        how = "by image id or file content" if compare_ids else "by file content"
        raise QualityError(
            f"data-quality gate 'train_eval_disjoint' failed: {len(overlap)} of the {len(train_ids)} training "
            f"images in {train_label or pathlib.Path(train_root)} are also evaluated in "
            f"{pathlib.Path(eval_root)}: image id(s) {shown} of the training layout (compared {how})\n"
            + format_failures("train_eval_disjoint", failures, len(suite), tuple(frame.shape)),
            suite="train_eval_disjoint",
            failures=failures,
            path=pathlib.Path(train_root),
        )
    return overlap
    suite = train_eval_disjoint_suite(eval_ids)
    failures = validate(pd.DataFrame({"id": pd.Series(train_ids, dtype="int64")}), "train_eval_disjoint", suite,
                        key_columns=("id",))
    if failures or overlap:
        shown = ", ".join(str(i) for i in overlap[:50])
        if len(overlap) > 50:
            shown += f", ... ({len(overlap)} in all)"
        raise QualityError(
            f"data-quality gate 'train_eval_disjoint' failed: {len(overlap)} of the {len(train_ids)} training "
            f"images in {train_label or pathlib.Path(train_root)} are also evaluated in "
            f"{pathlib.Path(eval_root)}: image id(s) {shown}\n" + format_failures("train_eval_disjoint", failures, len(suite), (len(train_ids), 1)),
            suite="train_eval_disjoint",
            failures=failures,
            path=pathlib.Path(train_root),
        )
    return overlap
