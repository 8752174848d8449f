"""scripts/check_doc_numbers.py: the numbers the docs quote from summary/ and metrics/ equal the files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "check_doc_numbers.py"


def _check(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_the_docs_quote_the_committed_metrics():
    """README.md and docs/*.md against summary/ and metrics/ (the committed dvc.lock's outputs)."""
    r = _check()
    assert r.returncode == 0, r.stdout
    n = int(r.stdout.splitlines()[-1].split()[0])
    assert n >= 50, r.stdout  # the results summary and results.md's first section are marked


def test_hand_cases(tmp_path):
    (tmp_path / "summary").mkdir()
    (tmp_path / "metrics").mkdir()
    (tmp_path / "summary/a.json").write_text(json.dumps({"x": {"mean": 0.4095, "lo": -0.0080, "hi": 0.2588,
                                                               "p": 0.140625}, "k": 50, "s": "text",
                                                         "g:sum": {"mean": 0.75}}))
    (tmp_path / "metrics/a.json").write_text(json.dumps({"x": 0.4095, "x_p": 0.140625}))
    md = tmp_path / "doc.md"
    md.write_text("ok 0.41 [−0.01, 0.26]<!--m summary/a.json:x.mean-->, p = 0.14<!--m summary/a.json:x.p-->; "
                  "**0.410**<!--m summary/a.json:x.mean--> and 50<!--m summary/a.json:k-->; headline 0.41<!--m "
                  "metrics/a.json:x-->, p = 0.141<!--m metrics/a.json:x_p-->; "
                  "0.75<!--m summary/a.json:g:sum.mean-->\n")
    assert _check("--root", str(tmp_path), str(md)).returncode == 0
    for text, says in [("0.42<!--m summary/a.json:x.mean-->", "docs say 0.42, file has 0.4095"),
                       ("0.42<!--m metrics/a.json:x-->", "docs say 0.42, file has 0.4095"),
                       ("0.410 [0.01, 0.26]<!--m summary/a.json:x.mean-->", "docs say lo 0.01"),
                       ("0.41 [−0.01, 0.26]<!--m metrics/a.json:x-->", "has no lo beside the key"),
                       ("0.4<!--m summary/a.json:x.nope-->", "no such key"),
                       ("text<!--m summary/a.json:s-->", "no number right before the marker"),
                       ("1<!--m summary/a.json:s-->", "file has text"),
                       ("1<!--m summary/b.json:k-->", "no file"),
                       ("50<!--m a.json:k-->", "name the folder: summary/a.json"),
                       ("0.76<!--m summary/a.json:g:sum.mean-->", "docs say 0.76, file has 0.75"),
                       ("0.41<!--m summary/a.json:x mean-->", "malformed marker"),
                       ("0.41<!--m summary/a.json x.mean-->", "malformed marker")]:
        md.write_text(f"line one\n{text}\n")
        r = _check("--root", str(tmp_path), str(md))
        assert r.returncode == 1 and f"{md}:2: " in r.stdout and says in r.stdout, (text, r.stdout)


def test_fix_rewrites_marked_numbers_keeping_decimals_and_signs(tmp_path):
    (tmp_path / "summary").mkdir()
    (tmp_path / "summary/a.json").write_text(json.dumps({"x": {"mean": -0.0456, "lo": -0.0912, "hi": 0.0014},
                                                         "d": {"diff": 0.1646}, "k": 60}))
    md = tmp_path / "doc.md"
    md.write_text("kept **0.046 [0.041, 0.051]**<!--m summary/a.json:x.mean--> and +0.133<!--m summary/a.json:"
                  "d.diff--> at step 50<!--m summary/a.json:k--> of 60\nuntouched 0.5\n")
    r = _check("--root", str(tmp_path), "--fix", str(md))
    assert r.returncode == 0, r.stdout
    assert md.read_text() == ("kept **−0.046 [−0.091, 0.001]**<!--m summary/a.json:x.mean--> and +0.165<!--m "
                              "summary/a.json:d.diff--> at step 60<!--m summary/a.json:k--> of 60\nuntouched 0.5\n")


def test_a_p_value_at_the_monte_carlo_floor_is_written_as_a_bound(tmp_path):
    """0.0002 = 2/(9999+1), the paired test's floor: "p ≤ 0.0002" passes, "p = 0.0002" fails; an
    ordinary p is written with "="; the script's floor is the library's."""
    from mmn.metrics.stats import MC_FLOOR, PAIRED_RESAMPLES, format_p

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import check_doc_numbers
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert check_doc_numbers.MC_FLOOR == MC_FLOOR == 2 / (PAIRED_RESAMPLES + 1)
    assert format_p(MC_FLOOR) == "p ≤ 0.0002" and format_p(0.0312) == "p = 0.031" and format_p(None) == "p = n/a"
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/a.json").write_text(json.dumps({"x_p": MC_FLOOR, "y_p": 0.0004, "p": MC_FLOOR}))
    md = tmp_path / "doc.md"
    for text, ok in [("p ≤ 0.0002<!--m metrics/a.json:x_p-->", True), ("p = 0.0002<!--m metrics/a.json:x_p-->", False),
                     ("p ≤ **0.0002**<!--m metrics/a.json:p-->", True), ("p = 0.0004<!--m metrics/a.json:y_p-->", True)]:
        md.write_text(f"{text}\n")
        r = _check("--root", str(tmp_path), str(md))
        assert (r.returncode == 0) is ok, (text, r.stdout)
        if not ok:
            assert "Monte Carlo floor: write p ≤ 0.0002" in r.stdout
