"""Which machine and library versions computed something: the CPU, its vector extensions, the
kernels torch dispatches to, and the versions of the numeric libraries.

Float results differ across CPUs (MKL/oneDNN pick kernels by CPU, e.g. AVX-512 vs AMX), so a
number that differs from a committed one on another machine is not by itself a bug. This is
what lets a user tell "another machine" from "a bug": ``results-environment.json`` (beside
``dvc.lock``) holds it for the committed results; the benchmarks' headers and the CPU-dependent
tests' skip messages name the CPU through it.

Gotcha: read ``/proc/cpuinfo``, not :func:`platform.processor` (empty on most Linux builds).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import platform
from pathlib import Path
from typing import Any

#: CPU flags that change which float kernels MKL / oneDNN / ATen run.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile")
#: Distributions whose version can move a float result of the pipeline.
NUMERIC_PACKAGES = ("torch", "torchvision", "transformers", "accelerate", "gguf", "numpy", "scipy", "timm",
                    "open-clip-torch", "bert-score", "spacy", "polars", "pandas", "pyarrow", "dvc")


def _cpuinfo() -> dict[str, str]:
    """First processor block of /proc/cpuinfo as ``{key: value}`` ({} off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out.setdefault(k.strip(), v.strip())
    return out


def cpu_model() -> str:
    """e.g. ``'AMD EPYC 9454 48-Core Processor'``; the machine type when unknown."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The :data:`KERNEL_FLAGS` this CPU has."""
    have = set(_cpuinfo().get("flags", "").split())
    return [f for f in KERNEL_FLAGS if f in have]


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def sha256_of(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def environment(threads: int | None = None) -> dict[str, Any]:
    """Machine and library facts for a provenance record (JSON-able; no timestamps, so two
    records from one machine and one environment are equal)."""
    import torch

    info = _cpuinfo()
    return {
        "cpu_model": cpu_model(),
        "cpu_vendor": info.get("vendor_id"),
        "cpu_family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
        "cpu_kernel_flags": cpu_flags(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.machine()}",
        "versions": {d: _version(d) for d in NUMERIC_PACKAGES},
    }


def describe(env: dict[str, Any]) -> str:
    """One line naming the CPU for messages (skip reasons, benchmark headers)."""
    flags = ",".join(env["cpu_kernel_flags"]) or "none"
    return (f"{env['cpu_model']} ({env['cpu_vendor']} {env['cpu_family_model']}; ATen {env['aten_cpu_capability']}; "
            f"flags {flags}); torch {env['versions']['torch']}")
