"""Helpers shared between test files (and the scripts that reuse them), so that no test file
imports another: :mod:`helpers.pipeline` copies the repository and runs DVC in the copy,
:mod:`helpers.fakes` has seeded stand-ins for an image encoder and a caption table,
:mod:`helpers.report` builds the HTML report from synthetic stage outputs and checks its
links, :mod:`helpers.tables` has valid stage tables. Tests import them as
``from helpers.<module> import ...`` (pytest puts tests/ on ``sys.path``: tests/conftest.py
exists and tests/ is no package); a script run from the repository root as ``python -m``
imports ``tests.helpers.pipeline``, which therefore imports neither conftest nor a test file.
"""
