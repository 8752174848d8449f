"""Check the numbers the docs quote from ``summary/*.json`` and ``metrics/*.json`` against the files.

A quoted number is marked in the Markdown with an HTML comment right after it (invisible
when rendered)::

    difference +0.133 [−0.008, 0.259]<!--m summary/captions.json:own_vs_shuffled.diff-->, p = 0.14<!--m metrics/captions.json:own_vs_shuffled_p-->

The marker names a JSON file by its path from the repository root (``summary/<name>.json``:
the full results; ``metrics/<name>.json``: the headline numbers, mmn/headline.py) and the
dotted key of one number. The text just before it must end with that number, rounded to the
decimals shown, optionally followed by a bracketed ``[lo, hi]`` that must match the ``lo``
and ``hi`` beside the key (the CI of the same block, so only summary/ files have them).
``−`` (U+2212) is read as a minus; ``**bold**`` around the value is allowed. A p-value at the
paired test's Monte Carlo floor (0.0002) must be written ``p ≤ 0.0002``. Prints one line
per mismatch (``file:line: key: docs say X, file has Y``) and exits 1 when there is any;
tests/test_doc_numbers.py runs it on the repository.

    python scripts/check_doc_numbers.py [--root .] [FILE.md ...]   # default: README.md docs/*.md
    python scripts/check_doc_numbers.py --fix   # after a dvc repro: rewrite them (same decimals), then reread
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

NUM = r"[−+-]?\d+(?:\.\d+)?"
MARKER = re.compile(r"<!--m ([\w./-]+\.json):([\w.:]+)-->")  # a key may hold ":" (``grad_x_act:sum``)
ANY_MARKER = re.compile(r"<!--m\b.*?-->")  # what a reader takes for a marker: every one must parse
VALUE = re.compile(rf"(?P<v>{NUM})\**(?:\s*\[(?P<lo>{NUM}), (?P<hi>{NUM})\])?\**\s*$")


def _number(text: str) -> tuple[float, int]:
    """``(value, decimals shown)`` of a printed number."""
    t = text.replace("−", "-").lstrip("+")
    return float(t), len(t.split(".")[1]) if "." in t else 0


def _matches(printed: str, actual: object) -> bool:
    if not isinstance(actual, (int, float)) or isinstance(actual, bool):
        return False
    value, decimals = _number(printed)
    return abs(float(actual) - value) <= 0.5 * 10 ** -decimals + 1e-12


def _at_floor(key: str, actual: object) -> bool:
    """A p-value (key ``p`` or ``*_p``) equal to 2/(9999+1), mmn.metrics.stats.MC_FLOOR: the paired
    test's Monte Carlo floor (kept in sync by tests/test_doc_numbers.py)."""
    last = key.rsplit(".", 1)[-1]
    return (last == "p" or last.endswith("_p")) and isinstance(actual, float) and abs(actual - MC_FLOOR) < 1e-12


MC_FLOOR = 2 / (9999 + 1)


def _lookup(metrics: dict, key: str) -> object:
    node: object = metrics
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def check_file(md: Path, root: Path) -> list[str]:
    """Mismatch messages for one Markdown file (empty = every marked number agrees)."""
    problems: list[str] = []
    cache: dict[str, dict] = {}
    for lineno, line in enumerate(md.read_text().splitlines(), 1):
        parsed = {m.start() for m in MARKER.finditer(line)}
        for loose in ANY_MARKER.finditer(line):
            if loose.start() not in parsed:
                problems.append(f"{md}:{lineno}: malformed marker {loose.group(0)} (want <!--m folder/file.json:dotted.key-->)")
        start = 0
        for m in MARKER.finditer(line):
            where = f"{md}:{lineno}: {m.group(1)}:{m.group(2)}"
            before, start = line[start: m.start()], m.end()
            v = VALUE.search(before)
            if not v:
                problems.append(f"{where}: no number right before the marker")
                continue
            fname = m.group(1)
            if "/" not in fname:
                problems.append(f"{where}: name the folder: summary/{fname} (full results) or metrics/{fname} "
                                "(headline numbers)")
                continue
            if fname not in cache:
                path = root / fname
                if not path.is_file():
                    problems.append(f"{where}: no file {path}")
                    continue
                cache[fname] = json.loads(path.read_text())
            try:
                actual = _lookup(cache[fname], m.group(2))
            except KeyError:
                problems.append(f"{where}: no such key in {fname}")
                continue
            if not _matches(v.group("v"), actual):
                problems.append(f"{where}: docs say {v.group('v')}, file has {actual}")
            elif _at_floor(m.group(2), actual) and not re.search(r"(≤|<=)\s*\**\s*$", before[: v.start()]):
                problems.append(f"{where}: {v.group('v')} is the paired test's Monte Carlo floor: write p ≤ "
                                f"{v.group('v')}, not p = {v.group('v')}")
            if v.group("lo") is not None:
                parent = m.group(2).rsplit(".", 1)[0] if "." in m.group(2) else ""
                for bound in ("lo", "hi"):
                    try:
                        b = _lookup(cache[fname], f"{parent}.{bound}" if parent else bound)
                    except KeyError:
                        problems.append(f"{where}: a [lo, hi] is quoted but {fname} has no {bound} beside the key")
                        continue
                    if not _matches(v.group(bound), b):
                        problems.append(f"{where}: docs say {bound} {v.group(bound)}, file has {b}")
    return problems


def _format(actual: float, like: str) -> str:
    """``actual`` printed as ``like`` is: same decimals, ``−`` (U+2212) or ``-``, a ``+`` kept."""
    _, decimals = _number(like)
    text = f"{float(actual):.{decimals}f}"
    if text.startswith("-"):
        return ("−" if "−" in like or not like.startswith("-") else "-") + text[1:]
    return ("+" if like.startswith("+") else "") + text


def fix_file(md: Path, root: Path) -> int:
    """Rewrite every marked number (and its quoted ``[lo, hi]``) of ``md`` to the file's value,
    keeping the decimals shown; returns how many numbers changed. Markers whose key or file
    is missing are left for :func:`check_file` to report."""
    changed, out = 0, []
    cache: dict[str, dict] = {}
    for line in md.read_text().split("\n"):
        edits: list[tuple[int, int, str]] = []
        start = 0
        for m in MARKER.finditer(line):
            seg_start, before, start = start, line[start: m.start()], m.end()
            v = VALUE.search(before)
            fname = m.group(1)
            if not v or not (root / fname).is_file():
                continue
            cache.setdefault(fname, json.loads((root / fname).read_text()))
            parent = m.group(2).rsplit(".", 1)[0] if "." in m.group(2) else ""
            for group, key in (("v", m.group(2)), ("lo", f"{parent}.lo" if parent else "lo"),
                               ("hi", f"{parent}.hi" if parent else "hi")):
                if v.group(group) is None:
                    continue
                try:
                    actual = _lookup(cache[fname], key)
                except KeyError:
                    continue
                if isinstance(actual, (int, float)) and not isinstance(actual, bool) and not _matches(
                        v.group(group), actual):
                    edits.append((seg_start + v.start(group), seg_start + v.end(group),
                                  _format(actual, v.group(group))))
        for a, b, text in sorted(edits, reverse=True):
            line = line[:a] + text + line[b:]
        changed += len(edits)
        out.append(line)
    md.write_text("\n".join(out))
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--root", type=Path, default=Path("."), help="where summary/ and metrics/ are")
    ap.add_argument("--fix", action="store_true", help="rewrite the marked numbers to the files' values first "
                    "(same decimals); the prose around them is yours to reread")
    args = ap.parse_args(argv)
    files = args.files or [Path("README.md"), *sorted(Path("docs").glob("*.md"))]
    if args.fix:
        for f in files:
            print(f"{f}: {fix_file(f, args.root)} number(s) rewritten")
    problems, n = [], 0
    for f in files:
        n += len(MARKER.findall(f.read_text()))
        problems += check_file(f, args.root)
    for p in problems:
        print(p)
    print(f"{n} quoted numbers checked against {args.root}/{{summary,metrics}}/: {len(problems)} mismatch(es)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
