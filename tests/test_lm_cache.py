"""The embedded LM's one-time gguf conversion under concurrency (a fresh cache, several processes)."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path


def _fake_convert(gguf: Path, out: Path) -> None:
    """Stands in for the ~20 s dequantization: slow, written through atomic_dir like the real one."""
    from mmn.io import atomic_dir

    with (out.parent / "conversions.log").open("a") as fh:
        fh.write("1\n")
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
        time.sleep(1.0)  # another process arriving now must not clear this temp folder
        (tmp / "model.safetensors").write_bytes(b"x")


def _worker(cache: str, q) -> None:
    import os

    os.environ["MMN_CACHE"] = cache
    import mmn.models.lm as lm

    lm._convert_gguf = _fake_convert
    try:
        q.put(str(lm.embedded_lm_dir("embedded:smollm2-135m")))
    except Exception as err:  # noqa: BLE001  (reported to the parent)
        q.put(f"error: {type(err).__name__}: {err}")


def test_concurrent_first_conversion_converts_once(tmp_path):
    """Three processes on an empty cache: one converts, the others wait for it and reuse the
    folder. (Before the lock, a second process's atomic_dir deleted the first's temp folder:
    bench_attribution's workers failed with 'No such file or directory' on a fresh machine.)"""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), q)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    out = tmp_path / "embedded_smollm2-135m"
    assert got == [str(out)] * 3, got
    assert (out / "config.json").read_text() == "{}" and (out / "model.safetensors").read_bytes() == b"x"
    assert (tmp_path / "conversions.log").read_text() == "1\n"
    assert not list(tmp_path.glob(".tmp-*"))


def test_gguf_loader_requirements_are_named(monkeypatch):
    """transformers' gguf load needs accelerate (>= its ACCELERATE_MIN_VERSION) and gguf; a
    missing or too old one stops with one ModelError naming it, before the 20 s load starts."""
    import sys

    import pytest
    from transformers.utils import import_utils

    from mmn.errors import ModelError
    from mmn.models.lm import require_gguf_loader

    require_gguf_loader("x")  # the locked environment has both, new enough
    monkeypatch.setattr(import_utils, "is_accelerate_available", lambda *a, **k: False)
    with pytest.raises(ModelError, match=rf"needs accelerate >= {import_utils.ACCELERATE_MIN_VERSION}, installed"):
        require_gguf_loader("the gguf of embedded:smollm2-135m")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate -> ImportError
    with pytest.raises(ModelError, match=r"needs the package 'accelerate', which is not installed"):
        require_gguf_loader("the gguf of embedded:smollm2-135m")
