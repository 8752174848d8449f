"""Self-check of a written report: every ``href``/``src`` is relative and resolves inside
the report folder (and ``#fragment`` to an ``id`` on the target page). The plot stage
runs it before it replaces ``report/``."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if a.get(key) is not None:
                self.refs.append(a[key])


def broken_links(report: Path) -> list[str]:
    """``["page: problem", ...]``; empty when every reference resolves inside ``report``."""
    report = Path(report).resolve()
    pages: dict[Path, _Refs] = {}
    for page in sorted(report.rglob("*.html")):
        p = _Refs()
        p.feed(page.read_text(encoding="utf-8"))
        pages[page.resolve()] = p
    problems = []
    for page, parsed in pages.items():
        rel = page.relative_to(report)
        for ref in parsed.refs:
            u = urlparse(ref)
            if u.scheme or u.netloc:
                problems.append(f"{rel}: external reference {ref}")
                continue
            target = (page.parent / unquote(u.path)).resolve() if u.path else page
            if report not in target.parents or not target.is_file():
                problems.append(f"{rel}: broken reference {ref}")
            elif u.fragment and (target not in pages or u.fragment not in pages[target].ids):
                problems.append(f"{rel}: missing anchor {ref}")
    return problems
