"""Token injection into CLIP text (docs/design.md §2.4) and the tiny CLIP tokenizer writer.

The independent references are transformers' own ``FlaxCLIPTextModel`` / PyTorch ``CLIPTextModel`` run
on a vocabulary extended by one row holding the audio token (the reference's inference path).
"""

import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTokenizer
from transformers.models.clip.modeling_flax_clip import FlaxCLIPTextModel

from conftest import torch_or_skip
from mtok_jax.demo.tokenizer import pretokens, write_clip_tokenizer
from mtok_jax.models.text import (
    SD14_TEXT_CONFIG,
    eos_positions,
    init_text_params,
    label_targets,
    load_text_encoder,
    load_tokenizer,
    plain_text_states,
    pooled_output,
    text_encoder_module,
    text_states,
    tokenize_plain,
    tokenize_prompts,
)

LABELS = [
    "20th century abstractionism", "20th century experimental figure", "20th century experimental open view",
    "20th century traditional figure", "20th century traditional open view", "African traditional folklore",
    "American traditional folklore", "Asian traditional folklore", "Baroque Classical secular subject",
    "Baroque Classical symbolism", "Electronic music", "European traditional folklore", "Heavy metal",
    "Modern instrumental music", "Renaissance secular subject", "Renaissance symbolism", "Romanticism figure",
    "Romanticism open view",
]
PROMPTS = ["an art image of <*>, 4k, high resolution", "<*> heavy metal", "An art image of <*>"]
HIDDEN = 32


def _perturbed_init(module, key):
    leaves, treedef = jax.tree_util.tree_flatten(init_text_params(module, key))
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny tokenizer + tiny random CLIP text model saved as a Flax HF folder."""
    root = tmp_path_factory.mktemp("tiny_clip")
    vocab_size = write_clip_tokenizer(root / "tokenizer", ["an art image of <*>, 4k, high resolution", *LABELS])
    tokenizer = load_tokenizer(root / "tokenizer")
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    # transformers' init, then every leaf perturbed so LayerNorm scales/biases and Dense biases are not at
    # their trivial init (one jitted function: eager init costs ~10 s on the shared CPU).
    params = jax.jit(functools.partial(_perturbed_init, text_encoder_module(config)))(jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(np.asarray, params)
    model = FlaxCLIPTextModel(config, _do_init=False)
    model.save_pretrained(root / "text_encoder", params=params)
    input_ids, placeholder_pos = tokenize_prompts(tokenizer, PROMPTS)
    audio_token = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (len(PROMPTS), HIDDEN)) * 1.5)
    return dict(root=root, tokenizer=tokenizer, config=config, params=params, vocab_size=vocab_size,
                input_ids=input_ids, placeholder_pos=placeholder_pos, audio_token=audio_token)


@pytest.fixture(scope="module")
def ours(tiny):
    module, params = load_text_encoder(tiny["root"] / "text_encoder")
    fn = jax.jit(functools.partial(text_states, module))
    states = fn(params, tiny["input_ids"], tiny["placeholder_pos"], tiny["audio_token"])
    return module, params, np.asarray(states), fn


def _extended_flax_reference(tiny):
    """transformers FlaxCLIPTextModel with one extra vocabulary row = audio_token[b]; fn(b) → outputs."""
    cfg = CLIPTextConfig.from_dict({**tiny["config"].to_dict(), "vocab_size": tiny["vocab_size"] + 1})
    model = FlaxCLIPTextModel(cfg, _do_init=False)
    table = tiny["params"]["text_model"]["embeddings"]["token_embedding"]["embedding"]

    @jax.jit
    def run(input_ids, audio_token):
        params = jax.tree_util.tree_map(lambda x: x, tiny["params"])
        params["text_model"]["embeddings"]["token_embedding"]["embedding"] = jnp.concatenate(
            [table, audio_token[None]], axis=0)
        return model(input_ids, params=params)

    return lambda b: run(tiny["input_ids"][b:b + 1], tiny["audio_token"][b])


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def test_tiny_tokenizer_whole_words(tiny):
    tok = tiny["tokenizer"]
    n = tiny["vocab_size"]
    assert isinstance(tok, CLIPTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (n - 2, n - 1, n - 1)
    assert tok.model_max_length == 77
    assert tok.convert_tokens_to_ids("<*>") == n
    for text in LABELS + ["an art image of, 4k, high resolution"]:
        assert tok.tokenize(text) == [w + "</w>" for w in pretokens(text)], text
        assert tok.unk_token_id not in tok(text)["input_ids"][1:-1]
    assert tok.tokenize("Heavy metal") == ["heavy</w>", "metal</w>"]
    assert tok.tokenize("20th century") == ["2</w>", "0</w>", "th</w>", "century</w>"]


def test_tokenize_prompts(tiny):
    tok, ids, pos = tiny["tokenizer"], tiny["input_ids"], tiny["placeholder_pos"]
    n = tiny["vocab_size"]
    assert ids.shape == (3, 77) and ids.dtype == np.int32 and pos.dtype == np.int32
    np.testing.assert_array_equal(pos, [5, 1, 5])
    expected0 = [n - 2] + tok.convert_tokens_to_ids(
        ["an</w>", "art</w>", "image</w>", "of</w>", "<*>", ",</w>", "4</w>", "k</w>", ",</w>", "high</w>",
         "resolution</w>"]) + [n - 1]
    np.testing.assert_array_equal(ids[0, :13], expected0)
    np.testing.assert_array_equal(ids[0, 13:], n - 1)  # padded with EOS like SD-1.x
    np.testing.assert_array_equal(ids[2, :6], ids[0, :6])  # lower-cased


@pytest.mark.parametrize("prompt,count", [("an art image of heavy metal", 0), ("<*> and <*>", 2)])
def test_placeholder_count_errors(tiny, prompt, count):
    with pytest.raises(ValueError, match=re.escape(f"prompt {prompt!r} has {count} '<*>' placeholders")):
        tokenize_prompts(tiny["tokenizer"], ["an art image of <*>", prompt])


def test_label_targets(tiny, ours):
    _, params, _, _ = ours
    tok = tiny["tokenizer"]
    table = np.asarray(tiny["params"]["text_model"]["embeddings"]["token_embedding"]["embedding"])
    got = np.asarray(label_targets(tok, params, LABELS))
    assert got.shape == (18, HIDDEN) and got.dtype == np.float32
    for label, row in zip(LABELS, got):
        ids = tok.convert_tokens_to_ids(tok.tokenize(label))
        np.testing.assert_allclose(row, table[ids].mean(0), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Injection parity
# ---------------------------------------------------------------------------------------------

def test_text_states_match_flax_extended_vocab(tiny, ours):
    module, params, states, fn = ours
    assert states.shape == (3, 77, HIDDEN)
    pooled = np.asarray(pooled_output(module, states, tiny["input_ids"], tiny["placeholder_pos"]))
    reference = _extended_flax_reference(tiny)
    for b in range(len(PROMPTS)):
        ref = reference(b)
        np.testing.assert_allclose(states[b], ref.last_hidden_state[0], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(pooled[b], ref.pooler_output[0], atol=1e-5, rtol=1e-5)
    # The audio token matters, and only from its position on (causal attention). (A constant shift of
    # the token would be invisible: every read of the residual stream goes through a LayerNorm.)
    shifted = tiny["audio_token"] + np.linspace(-1.0, 1.0, HIDDEN, dtype=np.float32)
    other = fn(params, tiny["input_ids"], tiny["placeholder_pos"], shifted)
    p = tiny["placeholder_pos"]
    for b in range(len(PROMPTS)):
        np.testing.assert_array_equal(np.asarray(other)[b, :p[b]], states[b, :p[b]])
        assert np.abs(np.asarray(other)[b, p[b]:] - states[b, p[b]:]).max(axis=-1).min() > 1e-3


def test_plain_text_states(tiny, ours):
    """No placeholder: equals transformers' model; and injecting a token's own row changes nothing."""
    module, params, states, fn = ours
    ids = tokenize_plain(tiny["tokenizer"], ["", "an art image of heavy metal"])
    np.testing.assert_array_equal(ids[0, :2], [tiny["vocab_size"] - 2, tiny["vocab_size"] - 1])
    got = np.asarray(jax.jit(functools.partial(plain_text_states, module))(params, ids))
    ref = FlaxCLIPTextModel(tiny["config"], _do_init=False)(ids, params=tiny["params"]).last_hidden_state
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    table = np.asarray(tiny["params"]["text_model"]["embeddings"]["token_embedding"]["embedding"])
    pos = np.array([1, 5], np.int32)  # the first EOS of "" / "heavy"
    injected = fn(params, ids, pos, table[ids[np.arange(2), pos]])
    np.testing.assert_allclose(injected, got, atol=1e-5)


def test_eos_pooling_ignores_placeholder(tiny, ours):
    """With a legacy config (eos_token_id == 2, pool at argmax(ids)) the placeholder id is the largest id;
    pooling must still pick the EOS position."""
    module, _, states, _ = ours
    ids, pos = tiny["input_ids"], tiny["placeholder_pos"]
    first_eos = np.argmax(ids == tiny["vocab_size"] - 1, axis=1)
    np.testing.assert_array_equal(first_eos, [12, 4, 6])
    legacy = text_encoder_module({**tiny["config"].to_dict(), "eos_token_id": 2})
    np.testing.assert_array_equal(eos_positions(legacy.config, ids, pos), first_eos)
    assert (np.argmax(ids, axis=1) == pos).all()  # what a plain argmax would (wrongly) pick
    np.testing.assert_array_equal(pooled_output(legacy, states, ids, pos), states[np.arange(3), first_eos])
    np.testing.assert_array_equal(pooled_output(module, states, ids, pos), states[np.arange(3), first_eos])


def test_grad_reaches_audio_token(tiny, ours):
    _, params, _, fn = ours
    ids, pos = tiny["input_ids"], tiny["placeholder_pos"]
    grad = jax.grad(lambda a: jnp.sum(fn(params, ids, pos, a) ** 2))(jnp.asarray(tiny["audio_token"]))
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).min() > 0


def _pt_state_dict(flax_params):
    """Flax CLIP text params → PyTorch key names/layouts (numpy), written independently of transformers."""
    out = {}
    for path, v in traverse_util.flatten_dict(flax_params).items():
        v = np.asarray(v)
        name, leaf = ".".join(path[:-1]), path[-1]
        if leaf == "kernel":
            out[name + ".weight"] = np.ascontiguousarray(v.T)
        elif leaf in ("scale", "embedding"):
            out[name + ".weight"] = v
        else:
            out[name + "." + leaf] = v
    return out


def _assert_params_equal(got, want):
    got, want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=str(k))


def test_load_pytorch_safetensors_without_torch(tiny, ours, tmp_path, monkeypatch):
    _, _, states, fn = ours
    folder = tmp_path / "pt_text_encoder"
    folder.mkdir()
    tiny["config"].save_pretrained(folder)
    save_file(_pt_state_dict(tiny["params"]), str(folder / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` on this path would fail
    module, params = load_text_encoder(folder)
    assert module.config.vocab_size == tiny["vocab_size"]
    _assert_params_equal(params, tiny["params"])
    np.testing.assert_allclose(fn(params, tiny["input_ids"], tiny["placeholder_pos"], tiny["audio_token"]),
                               states, atol=1e-6)


def test_sd14_config_resolves_with_eval_shape():
    module = text_encoder_module(SD14_TEXT_CONFIG)
    shapes = jax.eval_shape(functools.partial(init_text_params, module), jax.random.PRNGKey(0))
    assert sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes)) == 123_060_480
    assert shapes["text_model"]["embeddings"]["token_embedding"]["embedding"].shape == (49408, 768)
    out = jax.eval_shape(functools.partial(text_states, module), shapes,
                         jax.ShapeDtypeStruct((2, 77), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32),
                         jax.ShapeDtypeStruct((2, 768), jnp.float32))
    assert out.shape == (2, 77, 768)


@pytest.mark.torch
def test_text_states_match_pytorch(tiny, ours, tmp_path):
    torch = torch_or_skip()
    from transformers import CLIPTextModel

    module, params, states, fn = ours
    # (transformers 4.57's from_flax=True leaves meta tensors, so load our PT-named state dict strictly.)
    pt = CLIPTextModel(tiny["config"]).eval()
    pt.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in _pt_state_dict(tiny["params"]).items()},
                       strict=True)
    pt.save_pretrained(tmp_path / "pt", safe_serialization=True)
    n = tiny["vocab_size"]
    pt.resize_token_embeddings(n + 1)
    for b in range(len(PROMPTS)):
        with torch.no_grad():
            pt.get_input_embeddings().weight[n] = torch.from_numpy(tiny["audio_token"][b].copy())
            ref = pt(input_ids=torch.from_numpy(tiny["input_ids"][b:b + 1].astype(np.int64)))
        np.testing.assert_allclose(states[b], ref.last_hidden_state[0].numpy(), atol=1e-5, rtol=1e-5)
        pooled = pooled_output(module, states, tiny["input_ids"], tiny["placeholder_pos"])[b]
        np.testing.assert_allclose(pooled, ref.pooler_output[0].numpy(), atol=1e-5, rtol=1e-5)
    # transformers' own PyTorch safetensors export loads through our loader.
    _, params2 = load_text_encoder(tmp_path / "pt")
    _assert_params_equal(params2, tiny["params"])


def test_bf16_msgpack_gives_float32_states(tiny, tmp_path):
    """A bf16 flax_model.msgpack loads as float32: its text states equal those of a float32 file holding the
    same (bf16-representable) values, with an audio token that bf16 cannot represent."""
    # From the saved folder (other tests of this module extend the fixture's config in place).
    saved = FlaxCLIPTextModel.from_pretrained(tiny["root"] / "text_encoder")
    rounded = jax.tree_util.tree_map(lambda x: np.asarray(x, jnp.bfloat16), saved.params)
    model = FlaxCLIPTextModel(saved.config, _do_init=False)
    model.save_pretrained(tmp_path / "bf16", params=rounded)
    model.save_pretrained(tmp_path / "f32", params=jax.tree_util.tree_map(lambda x: x.astype(np.float32), rounded))
    module, p16 = load_text_encoder(tmp_path / "bf16")
    _, p32 = load_text_encoder(tmp_path / "f32")
    assert {x.dtype for x in jax.tree_util.tree_leaves(p16)} == {jnp.dtype(jnp.float32)}
    token = tiny["audio_token"] + 1e-3  # not representable in bf16 (8 mantissa bits)
    assert not np.array_equal(np.asarray(token, jnp.bfloat16).astype(np.float32), token)
    fn = jax.jit(functools.partial(text_states, module))
    args = (tiny["input_ids"], tiny["placeholder_pos"], token)
    np.testing.assert_array_equal(np.asarray(fn(p16, *args)), np.asarray(fn(p32, *args)))
