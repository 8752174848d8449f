"""Adapters, encoders, projection loading and the image-prefix LM on tiny random models."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mmn.hooks import Trace, TraceDict
from mmn.models.prefix_lm import ImagePrefixLM, stop_token_ids
from mmn.models.projection import Projection, ProjectionError, load_limber, load_projection, save_projection

FAMILIES = ["gptj", "gpt2", "llama", "gemma3"]
MODEL_TYPE = {"gemma3": "gemma3_text"}  # test key -> the FAMILIES row (config.model_type)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_recomputes_mlp_output(tiny_adapters, family):
    """MLP output == A @ W_out^T (+ bias), with A read at the adapter's act_module."""
    ad, tok = tiny_adapters[family]
    ids = tok("a cat on a mat", return_tensors="pt").input_ids
    mods = {}
    for l in range(ad.n_layers):
        mods[f"a{l}"] = ad.act_module(l)
        mods[f"m{l}"] = ad.mlp(l)
    with TraceDict(mods, retain_input=True, retain_output=True) as traces:
        ad.model(ids)
    for l in range(ad.n_layers):
        a = traces[f"a{l}"].input  # [1, T, d_mlp]
        out = traces[f"m{l}"].output
        w = ad.w_out(l)  # [d_model, d_mlp]
        assert a.shape[-1] == ad.d_mlp and w.shape == (ad.d_model, ad.d_mlp)
        bias = getattr(ad.act_module(l), "bias", None)
        recomputed = a @ w.T + (0 if bias is None else bias)
        torch.testing.assert_close(recomputed, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_parts(tiny_adapters, family):
    ad, tok = tiny_adapters[family]
    assert ad.n_layers == 3
    assert ad.vocab_size == len(tok)
    assert ad.unembed_weight().shape == (len(tok), ad.d_model)
    # final norm + unembedding reproduce the model's logits from the last hidden state
    ids = tok("a dog", return_tensors="pt").input_ids
    out = ad.model(ids, output_hidden_states=True)
    h = out.hidden_states[-1]
    # HF applies the final norm inside the base model, so hidden_states[-1] is already normed
    logits = ad.unembed(h)
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)
    assert isinstance(ad.final_norm, nn.Module)


#: the modules each family's table row must reach, spelled out by hand from the HF classes
_HAND_PATHS = {
    "gptj": lambda m, l: (m.transformer.h[l].mlp.fc_out, m.transformer.h[l].mlp.fc_in, m.transformer.ln_f),
    "gpt2": lambda m, l: (m.transformer.h[l].mlp.c_proj, m.transformer.h[l].mlp.c_fc, m.transformer.ln_f),
    "llama": lambda m, l: (m.model.layers[l].mlp.down_proj, m.model.layers[l].mlp.gate_proj, m.model.norm),
    "gemma3": lambda m, l: (m.model.layers[l].mlp.down_proj, m.model.layers[l].mlp.gate_proj, m.model.norm),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_table_reaches_the_hf_modules(tiny_adapters, family):
    """The table's dotted paths resolve to the HF modules named by hand; W_out is [d_model, d_mlp]
    (GPT-2's Conv1D stores the transpose); only Llama-family and Gemma models want a BOS."""
    ad, _ = tiny_adapters[family]
    for l in range(ad.n_layers):
        act, pre, norm = _HAND_PATHS[family](ad.model, l)
        assert ad.act_module(l) is act and ad.preact_module(l) is pre and ad.final_norm is norm
        w = act.weight.T if family == "gpt2" else act.weight
        assert ad.w_out(l).data_ptr() == w.data_ptr() and ad.w_out(l).shape == (ad.d_model, ad.d_mlp)
    assert ad.family == MODEL_TYPE.get(family, family) and ad.prepend_bos == (family in ("llama", "gemma3"))


def test_unsupported_family_is_a_model_error_listing_the_supported_ones(unchecked_signatures):
    from types import SimpleNamespace

    from mmn.errors import ModelError
    from mmn.models.adapters import FAMILIES as TABLE
    from mmn.models.adapters import make_adapter

    head = nn.Linear(4, 10)
    model = SimpleNamespace(config=SimpleNamespace(model_type="bloom"), get_output_embeddings=lambda: head)
    with pytest.raises(ModelError, match="'bloom'") as e:
        make_adapter(model)
    assert all(f in str(e.value) for f in TABLE)


def test_gptj_real_vocab_restriction(tiny_adapters):
    ad, tok = tiny_adapters["gptj"]
    assert ad.unembed.weight.shape[0] == len(tok) + 7
    assert ad.vocab_size == len(tok)
    # the 7 padded head rows are not real tokens
    assert ad.real_token_ids.tolist() == list(range(len(tok)))


@pytest.fixture
def added_token_lm(tokenizer):
    """A tiny GPT-2 whose tokenizer has 3 tokens added on top of its base vocabulary (like
    GPT-J's ``<|extratoken_n|>`` fillers), embeddings resized to match, plus 2 padded head rows."""
    import copy

    from conftest import tiny_lm

    from mmn.models.lm import prepare_lm

    tok = copy.deepcopy(tokenizer)
    base = len(tok)
    tok.add_tokens(["<|extratoken_1|>", "<|extratoken_2|>", "zzqxword"])
    model = tiny_lm("gpt2", base)
    model.resize_token_embeddings(len(tok) + 2)
    ad, tok = prepare_lm(model, tok)
    return ad, tok, base


def test_real_token_ids_exclude_added_tokens(added_token_lm):
    ad, tok, base = added_token_lm
    assert len(tok) == base + 3 and ad.unembed.weight.shape[0] == base + 5
    # generation logits still span every tokenizer id (added EOS-like tokens stay generable)
    assert ad.vocab_size == base + 3
    real = ad.real_token_ids
    assert real.dtype == torch.long and real.tolist() == list(range(base))
    # special tokens of the base vocabulary (EOS) are real
    assert tok.eos_token_id in set(real.tolist())


def test_real_token_ids_slow_and_missing_tokenizer(unchecked_signatures):
    from types import SimpleNamespace

    from mmn.models.adapters import real_token_ids

    slow = SimpleNamespace(vocab_size=10)  # no backend_tokenizer: base vocabulary = range(vocab_size)
    assert real_token_ids(slow, 8).tolist() == list(range(8))
    assert real_token_ids(slow, 20).tolist() == list(range(10))
    assert real_token_ids(None, 5).tolist() == list(range(5))


def test_preact_module_feeds_activation(tiny_adapters):
    """GPT-2: A = gelu(Z) where Z is the output of the pre-activation module."""
    ad, tok = tiny_adapters["gpt2"]
    ids = tok("two birds", return_tensors="pt").input_ids
    with Trace(ad.preact_module(1), retain_output=True) as z, Trace(ad.act_module(1), retain_input=True) as a:
        ad.model(ids)
    act = ad.mlp(1).act
    torch.testing.assert_close(act(z.output), a.input)


def test_trace_edit_input_zeroes_units(tiny_adapters):
    ad, tok = tiny_adapters["llama"]
    ids = tok("a red bus", return_tensors="pt").input_ids

    def zero(x):
        x = x.clone()
        x[..., 5] = 0
        return x

    with Trace(ad.act_module(0), retain_input=True) as clean:
        ad.model(ids)
    with Trace(ad.act_module(0), retain_input=True, edit_input=zero) as edited:
        ad.model(ids)
    assert torch.all(edited.input[..., 5] == 0)
    keep = [i for i in range(ad.d_mlp) if i != 5]
    torch.testing.assert_close(edited.input[..., keep], clean.input[..., keep])


def test_tiny_beit_drops_cls(tiny_beit):
    imgs = [Image.fromarray(np.full((40, 50, 3), v, dtype=np.uint8)) for v in (0, 128)]
    x = tiny_beit.preprocess(imgs)
    assert x.shape == (2, 3, 32, 32)
    feats = tiny_beit.encode(imgs)
    assert feats.shape == (2, 16, 24)
    full = tiny_beit.model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(feats, full[:, 1:])


def test_limber_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(1)
    lin = nn.Linear(1024, 4096)
    path = tmp_path / "proj.ckpt"
    torch.save(lin.state_dict(), path)
    loaded = load_limber(path, 1024, 4096)
    torch.testing.assert_close(loaded.weight, lin.weight)
    torch.testing.assert_close(loaded.bias, lin.bias)
    x = torch.randn(3, 1024)
    torch.testing.assert_close(loaded(x), lin(x))


def test_limber_wrong_shape_rejected(tmp_path):
    path = tmp_path / "proj.ckpt"
    torch.save(nn.Linear(768, 4096).state_dict(), path)
    with pytest.raises(ProjectionError, match=r"shape \(4096, 768\), expected \(4096, 1024\)"):
        load_limber(path, 1024, 4096)


class _NotAStateDict:
    pass


def test_limber_non_state_dict_rejected(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump(_NotAStateDict(), f)
    with pytest.raises(ProjectionError, match="evil.ckpt"):
        load_limber(path, 1024, 4096)
    path2 = tmp_path / "list.ckpt"
    torch.save([torch.zeros(2)], path2)
    with pytest.raises(ProjectionError, match="expected a state dict"):
        load_limber(path2, 1024, 4096)


def test_projection_standardises_and_roundtrips(tmp_path):
    """Projection(x) = W ((x - mean) / std) + b, computed by hand; mean/std survive save/load."""
    torch.manual_seed(0)
    mean, std = torch.randn(5), torch.rand(5) + 0.5
    proj = Projection(5, 3, mean, std)
    x = torch.randn(4, 5)
    want = ((x - mean) / std) @ proj.weight.detach().T + proj.bias.detach()
    torch.testing.assert_close(proj(x), want)
    save_projection(tmp_path, proj, {"source": "test"})
    back, meta = load_projection(tmp_path)
    assert meta["d_in"] == 5 and meta["d_out"] == 3
    assert torch.equal(back(x), proj(x))
    # a plain Linear (LiMBeR) is saved with mean 0 / std 1: exactly the Linear
    lin = nn.Linear(5, 3)
    save_projection(tmp_path / "lin", lin, {})
    assert torch.equal(load_projection(tmp_path / "lin")[0](x), lin(x))


def _plm(ad, tok, d_enc=24, seed=0):
    torch.manual_seed(seed)
    return ImagePrefixLM(ad, tok, nn.Linear(d_enc, ad.d_model))


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padding_keeps_real_logits(tiny_adapters, family):
    ad, tok = tiny_adapters[family]
    plm = _plm(ad, tok)
    soft = plm.soft_tokens(torch.randn(2, 16, 24))
    texts = [tok(" a cat on the mat").input_ids, tok(" a dog").input_ids]
    both = plm.logits(plm.build(soft, texts))
    for i in range(2):
        one = plm.build(soft[i : i + 1], texts[i : i + 1])
        single = plm.logits(one)
        n = one.lengths[0]
        torch.testing.assert_close(both[i, :n], single[0, :n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_captions_equal_one_by_one(tiny_adapters, tiny_beit, family):
    ad, tok = tiny_adapters[family]
    plm = _plm(ad, tok)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    soft = plm.soft_tokens(tiny_beit.encode(imgs))
    with_enc = ImagePrefixLM(ad, tok, plm.projection, encoder=tiny_beit)
    assert torch.equal(with_enc.image_soft_tokens(imgs), soft)  # encoder owned by the prefix LM: same tokens
    with pytest.raises(ValueError, match="no image encoder"):
        plm.image_soft_tokens(imgs)
    stop = stop_token_ids(tok, ad.vocab_size, stop_at_newline=False)
    ids_b, p_b = plm.generate(soft, 8, stop)
    for i in range(4):
        ids_1, p_1 = plm.generate(soft[i : i + 1], 8, stop)
        assert ids_1[0] == ids_b[i]
        np.testing.assert_allclose(p_1[0], p_b[i], rtol=1e-4)
    # greedy = argmax of a teacher-forced pass, with the same probabilities
    batch = plm.build(soft[:1], [ids_b[0]])
    logits = plm.logits(batch)[0]
    logits[:, ad.banned_ids] = -torch.inf  # Gemma: control tokens are never generated
    for j, t in enumerate(ids_b[0]):
        step = logits[batch.n_prefix - 1 + j]
        assert int(step.argmax()) == t
        assert float(step.softmax(-1)[t]) == pytest.approx(p_b[0][j], rel=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_soft_tokens_equal_to_input_embeddings_give_the_models_own_logits(tiny_adapters, family):
    """The prefix LM feeds soft tokens where the model's embedding module's OUTPUT goes (Gemma
    scales its embeddings by sqrt(d_model) inside that module): soft tokens that are the embedding
    of some ids give the model's logits on those ids, whatever the family."""
    ad, tok = tiny_adapters[family]
    plm = _plm(ad, tok)
    img_ids = tok(" a red bus", add_special_tokens=False).input_ids
    text = tok(" on the road", add_special_tokens=False).input_ids
    soft = ad.embed(torch.tensor([img_ids]))
    got = plm.logits(plm.build(soft, [text]))
    ids = torch.tensor([plm.bos_ids + img_ids + plm.prompt_ids + text])
    want = ad.model(input_ids=ids).logits[..., : ad.vocab_size]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if family == "gemma3":  # the scale is real: the raw rows would not match
        torch.testing.assert_close(soft[0], ad.embed.weight[img_ids] * ad.d_model ** 0.5, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_caption_loss_is_the_mean_nll_of_the_caption_tokens(tokenizer, family):
    """The training loss against a hand computation on the model's own token path: soft tokens
    that embed some ids, captions of different lengths (right padding) + EOS; the mean over all
    caption tokens of -log softmax at the position before each. The loss runs the LM head on the
    caption positions only, so this also checks which positions those are (the head is scaled
    up so that positions differ: a fresh tiny model's logits are nearly uniform)."""
    from conftest import tiny_lm

    from mmn.models.lm import prepare_lm

    model = tiny_lm(family, len(tokenizer), seed=3)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    ad, tok = prepare_lm(model, tokenizer)
    plm = _plm(ad, tok)
    img_ids = tok(" a red bus", add_special_tokens=False).input_ids
    caps = [tok(" on the road", add_special_tokens=False).input_ids, tok(" dog", add_special_tokens=False).input_ids]
    soft = ad.embed(torch.tensor([img_ids, img_ids]))
    got = plm.caption_loss(soft, caps)
    nll = []
    for c in caps:
        target = c + [tok.eos_token_id]
        ids = plm.bos_ids + img_ids + plm.prompt_ids + target
        logp = torch.log_softmax(ad.model(input_ids=torch.tensor([ids])).logits[0, :, : ad.vocab_size].double(), -1)
        first = len(ids) - len(target)  # position of the caption's first token
        nll += [-float(logp[first - 1 + j, t]) for j, t in enumerate(target)]
    assert float(got) == pytest.approx(sum(nll) / len(nll), rel=1e-4)
    with pytest.raises(ValueError, match="logits from position"):
        plm.logits(plm.build(soft, caps), 10_000)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_final_norm_gain_is_what_the_rmsnorm_multiplies_by(tiny_adapters, family):
    """RMSNorm(x) = x / rms(x) * gain: Llama's gain is its weight, Gemma's 1 + weight."""
    ad, _ = tiny_adapters[family]
    x = torch.randn(3, ad.d_model)
    eps = ad.final_norm.variance_epsilon if hasattr(ad.final_norm, "variance_epsilon") else ad.final_norm.eps
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * ad.final_norm_gain()
    torch.testing.assert_close(ad.final_norm(x), want, rtol=1e-5, atol=1e-5)


def test_gemma_ties_its_unembedding_and_drops_control_tokens(tiny_adapters):
    """Gemma 3: the LM head is the input embedding matrix; the tokenizer's special added tokens are
    neither real tokens (decoding) nor ever generated, except EOS, even when the head favours them."""
    ad, tok = tiny_adapters["gemma3"]
    assert ad.unembed.weight.data_ptr() == ad.embed.weight.data_ptr()
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert special and not special & set(ad.real_token_ids.tolist())
    assert set(ad.banned_ids.tolist()) == special - {tok.eos_token_id}
    assert len(ad.real_token_ids) == ad.vocab_size - len(special)
    assert tiny_adapters["llama"][0].banned_ids.numel() == 0  # the other families: as before
    plm = _plm(ad, tok)
    victim = int(ad.banned_ids[0])
    with torch.no_grad():
        saved = ad.embed.weight[victim].clone()
        ad.embed.weight[victim] *= 1e3  # tied: the head now favours the control token
    try:
        ids, _ = plm.generate(plm.soft_tokens(torch.randn(2, 16, 24)), 4, set())
        assert not {t for row in ids for t in row} & set(ad.banned_ids.tolist())
    finally:
        with torch.no_grad():
            ad.embed.weight[victim] = saved


def test_generation_never_emits_padded_head_rows(tiny_adapters):
    """GPT-J's head has rows beyond the tokenizer; push them up and check they are ignored."""
    ad, tok = tiny_adapters["gptj"]
    plm = _plm(ad, tok)
    with torch.no_grad():
        ad.unembed.bias[ad.vocab_size:] = 1e4
    try:
        ids, _ = plm.generate(plm.soft_tokens(torch.randn(1, 16, 24)), 4, set())
        assert all(t < ad.vocab_size for t in ids[0])
    finally:
        with torch.no_grad():
            ad.unembed.bias[ad.vocab_size:] = 0


# --------------------------------------------------------------- hub models that cannot be loaded


def _offline_hub():
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:  # conftest sets HF_HUB_OFFLINE=1; never reach the real hub
        pytest.skip("HF_HUB_OFFLINE is not set")


@pytest.mark.parametrize("kind", ["lm", "encoder"])
def test_uncached_hub_model_offline_is_one_clear_error(kind):
    """transformers' multi-line OSError becomes one ModelLoadError naming the model and the fix."""
    from mmn.models.lm import ModelLoadError, load_lm
    from mmn.models.vision import load_encoder

    _offline_hub()
    name = "mmn-tests/no-such-model"
    with pytest.raises(ModelLoadError) as err:
        if kind == "lm":
            load_lm(name, revision="float16")
        else:
            load_encoder(f"hf:{name}", 14, 224)
    msg = str(err.value)
    what = "language model 'mmn-tests/no-such-model' (revision 'float16')" if kind == "lm" else \
        "image encoder 'mmn-tests/no-such-model'"
    assert msg.startswith(what), msg
    assert "offline" in msg and "HF_HOME" in msg and "internet" in msg
    assert "\n" not in msg


def test_hub_error_message_online_and_local_path(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from mmn.models.lm import hub_error_message

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    err = OSError("mmn-tests/x is not a local folder and is not a valid model identifier\nmore text")
    msg = hub_error_message("language model", "mmn-tests/x", None, err)
    assert msg.startswith("language model 'mmn-tests/x' could not be loaded from the Hugging Face hub")
    assert "not a valid model identifier…]" in msg and "more text" not in msg and "HF_HOME" in msg
    msg = hub_error_message("image encoder", str(tmp_path / "beit"), None, OSError("no config.json"))
    assert msg.endswith("from that local folder [OSError: no config.json]: check the path")


@pytest.mark.parametrize("family", ["gptj", "gpt2", "llama"])
def test_tensor_logits_to_keep_selects_those_positions(tiny_adapters, family):
    """Attribution asks the model for the logits at chosen positions only, with a tensor
    ``logits_to_keep`` (transformers' lower bound must support it for every family): equal to
    the full forward's logits at those positions."""
    ad, _ = tiny_adapters[family]
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 7))
    keep = torch.tensor([1, 4, 6])
    with torch.no_grad():
        full = ad.model(input_ids=ids).logits
        some = ad.model(input_ids=ids, logits_to_keep=keep).logits
    assert some.shape == (2, 3, full.shape[-1])
    torch.testing.assert_close(some, full[:, keep], rtol=1e-5, atol=1e-6)
