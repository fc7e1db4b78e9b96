"""Decoder-only models against transformers' PyTorch Llama / Mistral / Qwen2 / Qwen3.

Each checkpoint is a random tiny config written with `save_pretrained` and read back by
`hf.load_decoder`: logits on a left-padded batch, greedy continuations through the
sampler, `DecoderOnlyModel`'s scores and loss, the sampler and Realigner with two
decoder-only models, and the loader's errors.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
# Tiny models: a second torch thread only contends with XLA's (generate() ran 100x slower).
torch.set_num_threads(1)

from deranj import decoding  # noqa: E402
from deranj import dera  # noqa: E402
from deranj.models import base  # noqa: E402
from deranj.models import decoder  # noqa: E402
from deranj.models import hf  # noqa: E402
from numerics import assert_close_f32  # noqa: E402

VOCAB = 160
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)
CONFIGS = {  # (transformers config class, its arguments beyond SIZES)
    "llama_gqa_tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # head_dim 12 != 32 / 4; one key/value head for all four query heads.
    "llama_head_dim_untied": ("LlamaConfig", dict(num_key_value_heads=1, head_dim=12,
                                                  tie_word_embeddings=False)),
    # Wavelengths 6 to 13500 against original_max_position_embeddings 64: all three regimes.
    "llama3_rope": ("LlamaConfig", dict(num_key_value_heads=2, head_dim=12,
                                        rope_parameters=LLAMA3_ROPE)),
    "mistral_sliding_window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=6)),
    "qwen2_qkv_bias": ("Qwen2Config", dict(
        num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen3_qk_norm": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16)),
}
NEW_TOKENS = 32


def _model(config, pad_id=0):
  """Most tests here pad with 0, as a vocabulary with PAD 0 would (the sampler then never
  emits 0, so transformers suppresses it too); the NO_PAD tests below use every id."""
  return base.DecoderOnlyModel(decoder.Transformer(config), pad_id=pad_id)


def hf_model(name, seed=0):
  """A random transformers model of CONFIGS[name] with weights large enough for sharp
  logits (greedy choices far from ties) and norms and biases away from their init."""
  cls, kwargs = CONFIGS[name]
  config = getattr(transformers, cls)(initializer_range=0.3, **SIZES, **kwargs)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for param_name, p in model.named_parameters():
      if "norm" in param_name:
        p.mul_(1.0 + 0.2 * torch.randn_like(p))
      elif param_name.endswith("bias"):
        p.normal_(0.0, 0.3)
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (transformers model, our config, our params), read from save_pretrained."""
  out = {}
  for name in CONFIGS:
    model = hf_model(name)
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    out[name] = (model, *hf.load_decoder(str(directory)))
  return out


def _prompts(seed=0, length=9):
  """Left-padded [3, length]: a full row holding an inner 0 (a real token), a shorter
  row, and a one-token row."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, VOCAB, size=(3, length))
  tokens[0, 3] = 0
  tokens[1, :length - 5] = 0
  tokens[2, :length - 1] = 0
  mask = np.ones_like(tokens, bool)
  mask[1, :length - 5] = False
  mask[2, :length - 1] = False
  return tokens, mask


def _assert_logits_match(ours, theirs):
  """Two float32 implementations of one network: rounding grows with the widest
  contraction (intermediate_size) and the size of the logits."""
  assert_close_f32(ours, theirs, SIZES["intermediate_size"], np.abs(theirs).max())


# ----------------------------------------------------------------------------- network


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, checkpoints):
  model, config, params = checkpoints[name]
  ours_model = _model(config)
  shapes = jax.tree_util.tree_map(jnp.shape, params)
  assert shapes == ours_model.param_shapes()
  tokens, mask = _prompts(1, length=20)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # what generate() uses
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(positions)).logits.numpy()
  net = decoder.Transformer(config)
  apply = jax.jit(net.apply)  # op by op, every small op would compile on its own
  ours = np.asarray(apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask)))
  assert ours.shape == theirs.shape
  _assert_logits_match(ours[mask], theirs[mask])

  # The same rows right-padded (and the full row with no mask at all): same logits.
  right = np.stack([np.roll(t, -int((~m).sum())) for t, m in zip(tokens, mask)])
  right_mask = np.stack([np.roll(m, -int((~m).sum())) for m in mask])
  ours_right = np.asarray(apply({"params": params}, jnp.asarray(right),
                                jnp.asarray(right_mask)))
  _assert_logits_match(ours_right[right_mask], theirs[mask])
  unpadded = np.asarray(apply({"params": params}, jnp.asarray(tokens[:1])))
  _assert_logits_match(unpadded[0], theirs[0])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_continuations_match_generate(name, checkpoints):
  """32 greedy tokens from left-padded prompts through `decoding.sample`; PAD (0) is never
  emitted by the sampler, so transformers suppresses it too."""
  model, config, params = checkpoints[name]
  tokens, mask = _prompts(2)
  with torch.no_grad():
    theirs = model.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                            do_sample=False, max_new_tokens=NEW_TOKENS, suppress_tokens=[0])
  theirs = theirs[:, tokens.shape[1]:].numpy()
  assert theirs.shape == (3, NEW_TOKENS)
  out = decoding.sample(_model(config), params,
                        jnp.asarray(tokens), jax.random.PRNGKey(0), max_decode_len=NEW_TOKENS,
                        eos_id=-1, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(out.tokens), theirs)


def test_greedy_stops_at_eos_like_generate(checkpoints):
  model, config, params = checkpoints["qwen3_qk_norm"]
  tokens, mask = _prompts(3)
  generate = lambda **kw: model.generate(  # noqa: E731
      input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), do_sample=False,
      max_new_tokens=NEW_TOKENS, suppress_tokens=[0], **kw)[:, tokens.shape[1]:].numpy()
  with torch.no_grad():
    eos = int(generate()[0, 6])  # row 0 ends by its 7th token
    theirs = generate(eos_token_id=eos)
  out = decoding.sample(_model(config), params,
                        jnp.asarray(tokens), jax.random.PRNGKey(0), max_decode_len=NEW_TOKENS,
                        eos_id=eos, temperature=0.0)
  assert int(out.lengths[0]) <= 7
  ours = np.asarray(out.tokens)[:, :theirs.shape[1]]  # generate stops when every row has
  np.testing.assert_array_equal(ours, theirs)  # ended, filling with its pad id 0


@pytest.mark.parametrize("name,transposed", [("mistral_sliding_window", False),
                                             ("mistral_sliding_window", True),
                                             ("qwen2_qkv_bias", True)])
def test_cache_prefill_and_steps_match_full_forward(checkpoints, name, transposed):
  """A prefill, then one token per step (padding given by the mask, so a row may start
  late): the logits of one full pass, the sliding window included. `transposed`: the
  steps read `decoder.step_params` (kernels [N, K], biases kept)."""
  _, config, params = checkpoints[name]
  net = decoder.Transformer(config)
  stepping = decoder.step_params(params, config) if transposed else params
  if transposed:
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(stepping)]
    assert not any("'kernel'" in k for k in paths)
    assert any("bias" in k for k in paths) == config.attention_bias
    assert decoder.step_params(stepping, config) is stepping
  tokens, mask = _prompts(4, length=16)
  full = np.asarray(jax.jit(net.apply)({"params": params}, jnp.asarray(tokens),
                                       jnp.asarray(mask)))
  prefill = jax.jit(lambda t, m: net.apply({"params": params}, t, m, decode=True,
                                           max_decode_length=16, mutable=["cache"]))
  logits, variables = prefill(jnp.asarray(tokens[:, :6]), jnp.asarray(mask[:, :6]))
  step = jax.jit(lambda cache, t, m: net.apply({"params": stepping, "cache": cache}, t, m,
                                               decode=True, mutable=["cache"]))
  steps = [np.asarray(logits)]
  for t in range(6, 16):
    logits, variables = step(variables["cache"], tokens[:, t:t + 1], mask[:, t:t + 1])
    steps.append(np.asarray(logits))
  _assert_logits_match(np.concatenate(steps, axis=1)[mask], full[mask])


# ----------------------------------------------------------------------------- wrapper


def _responses(seed=5):
  """[3, 7] responses: tokens, EOS (1), then PAD."""
  rng = np.random.default_rng(seed)
  responses = rng.integers(2, VOCAB, size=(3, 7))
  responses[0, 6] = 1
  responses[1, 3], responses[1, 4:] = 1, 0
  responses[2, 0], responses[2, 1:] = 1, 0
  return responses


def _packed(tokens, mask, responses):
  """transformers' inputs for prompt + response: ids, attention mask, positions."""
  ids = np.concatenate([tokens, responses], axis=1)
  full_mask = np.concatenate([mask, responses > 0], axis=1)
  positions = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)
  return torch.tensor(ids), torch.tensor(full_mask), torch.tensor(positions)


@pytest.mark.parametrize("name", ["llama_gqa_tied", "qwen2_qkv_bias"])
def test_sequence_logprobs_against_float64(name, checkpoints):
  model, config, params = checkpoints[name]
  tokens, mask = _prompts(6)
  responses = _responses()
  ids, full_mask, positions = _packed(tokens, mask, responses)
  with torch.no_grad():
    logits = model.double()(input_ids=ids, attention_mask=full_mask,
                            position_ids=positions).logits.numpy()
  model.float()
  s = tokens.shape[1]
  response_logits = logits[:, s - 1:-1]  # the logit before each response token
  top = response_logits.max(-1, keepdims=True)
  logp = response_logits - top - np.log(np.exp(response_logits - top).sum(-1, keepdims=True))
  expected = (np.take_along_axis(logp, responses[..., None], -1)[..., 0] * (responses > 0)).sum(-1)

  ours = _model(config)
  got = ours.sequence_logprobs(params, jnp.asarray(tokens), jnp.asarray(responses))
  # Each log-probability is off by about twice a logit's error; T of them are summed.
  terms = 2 * responses.shape[1] * SIZES["intermediate_size"]
  assert_close_f32(got, expected, terms, np.abs(response_logits).max())
  batch = base.response_batch(jnp.asarray(tokens), jnp.asarray(responses))
  np.testing.assert_array_equal(ours.score_batch(params, batch), got)


def test_loss_masks_the_prompt_like_transformers(checkpoints):
  model, config, params = checkpoints["llama_head_dim_untied"]
  tokens, mask = _prompts(7)
  responses = _responses(8)
  ids, full_mask, positions = _packed(tokens, mask, responses)
  labels = np.concatenate([np.full_like(tokens, -100), np.where(responses > 0, responses, -100)],
                          axis=1)
  with torch.no_grad():
    theirs = model(input_ids=ids, attention_mask=full_mask, position_ids=positions,
                   labels=torch.tensor(labels))
  ours = _model(config)
  batch = base.response_batch(jnp.asarray(tokens), jnp.asarray(responses))
  loss, metrics = ours.loss_fn(params, batch)
  assert int(metrics["num_tokens"]) == int((responses > 0).sum())
  # A mean of log-probabilities over softmaxes of V terms, from logits of size ~|logits|.
  assert_close_f32(float(loss), float(theirs.loss), 2 * SIZES["intermediate_size"],
                   float(theirs.logits.abs().max()))


def test_hidden_states_are_what_the_head_reads(checkpoints):
  """hidden_states [B, T, D] through the tied head are the scoring logits, and the reward
  pooling reads each right-padded row's last token."""
  _, config, params = checkpoints["llama_gqa_tied"]
  ours = _model(config)
  tokens, _ = _prompts(16)
  responses = _responses(17)
  # Compiled: op by op, every small op would compile on its own.
  hidden = jax.jit(ours.hidden_states)(params, jnp.asarray(tokens), jnp.asarray(responses))
  assert hidden.shape == responses.shape + (config.hidden_size,)
  logits = jax.jit(ours.logits)(params, base.response_batch(jnp.asarray(tokens),
                                                            jnp.asarray(responses)))
  via_head = np.asarray(hidden) @ np.asarray(params["token_embedder"]["embedding"]).T
  _assert_logits_match(via_head, np.asarray(logits))
  # Row r of a right-padded batch pools at its last token: the network's final hidden
  # state there, as one unpadded row gives it.
  joined = np.array([[5, 6, 7, 8], [9, 10, 0, 0]])
  pooled = np.asarray(jax.jit(ours.pooled_hidden)(params, jnp.asarray(joined)))
  net = decoder.Transformer(config)
  apply = jax.jit(functools.partial(net.apply, hidden=True))
  for row, n in zip(range(2), (4, 2)):
    alone = apply({"params": params}, jnp.asarray(joined[row:row + 1, :n]))
    assert_close_f32(pooled[row], alone[0, -1], SIZES["intermediate_size"],
                     np.abs(alone).max())


def test_left_pad_and_prompt_mask():
  right = jnp.array([[5, 0, 7, 0, 0], [3, 4, 5, 6, 8], [0, 0, 0, 0, 0], [9, 0, 0, 0, 0]])
  left = base.left_pad(right)
  np.testing.assert_array_equal(left, [[0, 0, 5, 0, 7], [3, 4, 5, 6, 8], [0, 0, 0, 0, 0],
                                       [0, 0, 0, 0, 9]])
  # Only leading zeros are padding: the inner 0 of row 0 is a token.
  np.testing.assert_array_equal(base.prompt_mask(left)[0], [False, False, True, True, True])


def test_one_token_prompts_and_bad_prompts(checkpoints):
  """A prompt of one token (BOS alone) decodes from an empty prefill; no prompt at all is
  refused."""
  model, config, params = checkpoints["llama_gqa_tied"]
  ours = _model(config)
  bos = np.array([[7], [9]])
  with torch.no_grad():
    theirs = model.generate(input_ids=torch.tensor(bos), do_sample=False, max_new_tokens=5,
                            suppress_tokens=[0])[:, 1:].numpy()
  out = decoding.sample(ours, params, jnp.asarray(bos), jax.random.PRNGKey(0), max_decode_len=5, eos_id=-1,
                        temperature=0.0)
  np.testing.assert_array_equal(out.tokens, theirs)
  with pytest.raises(ValueError, match="length >= 1"):
    ours.init_cache(params, jnp.zeros((2, 0), jnp.int32), 4)


# ----------------------------------------------------------------------------- realigner


@pytest.fixture(scope="module")
def realigner(checkpoints):
  """A Llama reference and a Qwen3 aligned model (different architectures, one vocab)."""
  (_, ref_cfg, ref_p), (_, al_cfg, al_p) = (checkpoints["llama_gqa_tied"],
                                            checkpoints["qwen3_qk_norm"])
  return dera.Realigner(_model(ref_cfg), ref_p,
                        _model(al_cfg), al_p,
                        max_decode_len=12)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_realigner_lam_zero_and_one_are_each_model(realigner, temperature):
  tokens, _ = _prompts(9)
  prompts = jnp.asarray(tokens)
  rng = jax.random.PRNGKey(1)
  outs = []
  for lam, index in ((0.0, 0), (1.0, 1)):
    mixed = realigner.sample(prompts, lam, rng, temperature=temperature)
    alone = decoding.sample(realigner.models[index], realigner.params[index], prompts, rng,
                            max_decode_len=12, temperature=temperature)
    np.testing.assert_array_equal(mixed.tokens, alone.tokens)
    np.testing.assert_array_equal(mixed.logq, alone.logq)
    np.testing.assert_array_equal(mixed.logp_aligned if index else mixed.logp_ref,
                                  alone.logp[:, 0])
    outs.append(np.asarray(mixed.tokens))
  assert not np.array_equal(outs[0], outs[1])


def test_realigner_samples_score_and_decodes_per_prompt(realigner):
  """Cached decoding agrees with teacher forcing (`score`), and num_decodes prefills each
  prompt once for the same greedy samples."""
  tokens, _ = _prompts(10)
  prompts = jnp.asarray(tokens)
  lam = np.array([0.5, 2.0, -0.5], np.float32)
  out = realigner.sample(prompts, lam, jax.random.PRNGKey(2))
  scale = np.abs(np.asarray(out.logp_ref)).max() + np.abs(np.asarray(out.logq)).max()
  assert_close_f32(realigner.score(prompts, out.tokens, lam), out.logq,
                   2 * SIZES["intermediate_size"] * out.tokens.shape[1], scale)

  once = realigner.sample(prompts, lam, None, temperature=0.0)
  twice = realigner.sample(prompts, lam, None, temperature=0.0, num_decodes=2)
  np.testing.assert_array_equal(twice.tokens[::2], once.tokens)
  np.testing.assert_array_equal(twice.tokens[1::2], once.tokens)


# ----------------------------------------------------------------------------- NO_PAD


@pytest.fixture(scope="module")
def zero_emitter(tmp_path_factory):
  """An untied Llama whose greedy continuations hold id 0 (a real token here): its head
  row for 0 is 1.05 x the row of a token the model emits, so 0 takes that token's
  place. (transformers model, config, params)."""
  model = hf_model("llama_head_dim_untied", seed=3)
  tokens, mask = _prompts(11)
  with torch.no_grad():
    plain = model.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                           do_sample=False, max_new_tokens=NEW_TOKENS)[:, tokens.shape[1]:]
    common = int(torch.mode(plain.flatten()).values)
    head = model.lm_head.weight
    head[0] = 1.05 * head[common]
  directory = tmp_path_factory.mktemp("zero_emitter")
  model.save_pretrained(directory)
  return (model, *hf.load_decoder(str(directory)))


def _no_pad_prompts(seed):
  """(left-padded with NO_PAD, attention mask): a full row that starts with the real
  token 0, a shorter row, a one-token row."""
  tokens, mask = _prompts(seed)
  tokens[0, 0] = 0
  return np.where(mask, tokens, base.NO_PAD), mask


def test_no_pad_greedy_emits_zero_like_generate(zero_emitter):
  """With pad_id=NO_PAD (the default) every id can be emitted: 32 greedy tokens equal
  transformers' `generate` with nothing suppressed, 0 among them; right-padded prompts
  give the same tokens."""
  model, config, params = zero_emitter
  tokens, mask = _no_pad_prompts(12)
  with torch.no_grad():
    theirs = model.generate(input_ids=torch.tensor(np.where(mask, tokens, 5)),
                            attention_mask=torch.tensor(mask), do_sample=False,
                            max_new_tokens=NEW_TOKENS)[:, tokens.shape[1]:].numpy()
  assert (theirs == 0).sum() >= 2, theirs
  ours = base.DecoderOnlyModel(decoder.Transformer(config))
  assert ours.pad_id == base.NO_PAD
  sample = lambda prompts: np.asarray(decoding.sample(  # noqa: E731
      ours, params, jnp.asarray(prompts), jax.random.PRNGKey(0), max_decode_len=NEW_TOKENS,
      eos_id=-1, temperature=0.0).tokens)
  np.testing.assert_array_equal(sample(tokens), theirs)
  right = np.stack([np.roll(t, -int((~m).sum())) for t, m in zip(tokens, mask)])
  np.testing.assert_array_equal(sample(right), theirs)
  # The same model with PAD 0 never emits 0, as generate(suppress_tokens=[0]).
  with torch.no_grad():
    suppressed = model.generate(input_ids=torch.tensor(np.where(mask, tokens, 5)),
                                attention_mask=torch.tensor(mask), do_sample=False,
                                max_new_tokens=NEW_TOKENS,
                                suppress_tokens=[0])[:, tokens.shape[1]:].numpy()
  padded_with_0 = np.where(mask, tokens, 0)
  padded_with_0[0, 0] = 7  # with PAD 0, a leading 0 would be padding
  np.testing.assert_array_equal(
      np.asarray(decoding.sample(_model(config), params, jnp.asarray(padded_with_0),
                                 jax.random.PRNGKey(0), max_decode_len=NEW_TOKENS, eos_id=-1,
                                 temperature=0.0).tokens)[1:], suppressed[1:])


def test_no_pad_scores_count_token_zero(zero_emitter):
  """Responses holding 0, EOS, then NO_PAD: log-probabilities and loss against float64
  transformers, every 0 counted."""
  model, config, params = zero_emitter
  tokens, mask = _no_pad_prompts(13)
  responses = _responses(14)
  responses[:, 1] = 0
  responses = np.where((responses == 0) & (np.arange(7) > 1), base.NO_PAD, responses)
  real = responses != base.NO_PAD
  ids = np.concatenate([np.where(mask, tokens, 5), np.where(real, responses, 5)], axis=1)
  full_mask = np.concatenate([mask, real], axis=1)
  positions = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)
  with torch.no_grad():
    logits = model.double()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(full_mask),
                            position_ids=torch.tensor(positions)).logits.numpy()
  model.float()
  response_logits = logits[:, tokens.shape[1] - 1:-1]
  top = response_logits.max(-1, keepdims=True)
  logp = response_logits - top - np.log(np.exp(response_logits - top).sum(-1, keepdims=True))
  token_logp = np.take_along_axis(logp, np.maximum(responses, 0)[..., None], -1)[..., 0] * real
  ours = base.DecoderOnlyModel(decoder.Transformer(config))
  got = ours.sequence_logprobs(params, jnp.asarray(tokens), jnp.asarray(responses))
  terms = 2 * responses.shape[1] * SIZES["intermediate_size"]
  assert_close_f32(got, token_logp.sum(-1), terms, np.abs(response_logits).max())
  loss, metrics = ours.loss_fn(params, base.response_batch(jnp.asarray(tokens),
                                                           jnp.asarray(responses)))
  assert int(metrics["num_tokens"]) == int(real.sum())
  assert_close_f32(float(loss), -token_logp.sum() / real.sum(),
                   2 * SIZES["intermediate_size"], np.abs(response_logits).max())


def test_no_pad_realigner_fills_with_no_pad_and_scores_its_samples(zero_emitter, checkpoints):
  """A NO_PAD pair: rows that end are filled with NO_PAD, not 0, and `score` of the
  samples is the sampler's log q; a pair whose PAD ids differ is refused."""
  _, config, params = zero_emitter
  _, al_cfg, al_p = checkpoints["llama_head_dim_untied"]
  ref = base.DecoderOnlyModel(decoder.Transformer(config))
  al = base.DecoderOnlyModel(decoder.Transformer(al_cfg))
  tokens, _ = _no_pad_prompts(15)
  greedy = decoding.sample(ref, params, jnp.asarray(tokens), jax.random.PRNGKey(0),
                           max_decode_len=12, eos_id=-1, temperature=0.0)
  eos = int(np.asarray(greedy.tokens)[0, 4])  # row 0 ends by its 5th token
  realigner = dera.Realigner(ref, params, al, al_p, max_decode_len=12, eos_id=eos)
  lam = np.array([0.0, 0.5, 2.0], np.float32)
  prompts = jnp.asarray(tokens)
  greedy = realigner.sample(prompts, lam, temperature=0.0)
  got, lengths = np.asarray(greedy.tokens), np.asarray(greedy.lengths)
  assert lengths[0] <= 5  # lam 0 is the reference's greedy continuation
  for row, n in zip(got, lengths):
    assert np.all(row[:n] != base.NO_PAD) and np.all(row[n:] == base.NO_PAD)
  # At lam 0 the score is the reference's own: the NO_PAD fill adds nothing.
  ref_logp = ref.sequence_logprobs(params, prompts, greedy.tokens)
  assert_close_f32(realigner.score(prompts, greedy.tokens, 0.0), ref_logp,
                   2 * SIZES["intermediate_size"] * got.shape[1], np.abs(ref_logp).max())
  out = realigner.sample(prompts, lam, jax.random.PRNGKey(3))
  scale = np.abs(np.asarray(out.logp_ref)).max() + np.abs(np.asarray(out.logq)).max()
  assert_close_f32(realigner.score(prompts, out.tokens, lam), out.logq,
                   2 * SIZES["intermediate_size"] * got.shape[1], scale)
  with pytest.raises(ValueError, match="share a PAD id: reference pad_id=-1, aligned pad_id=0"):
    dera.Realigner(ref, params, _model(al_cfg), al_p, max_decode_len=4)
  with pytest.raises(ValueError, match="pad_id=160 must be an id of the vocabulary"):
    base.DecoderOnlyModel(decoder.Transformer(config), pad_id=VOCAB)


# ----------------------------------------------------------------------------- loader


def _saved(tmp_path, name="llama_gqa_tied", **save_kwargs):
  model = hf_model(name, seed=1)
  model.save_pretrained(tmp_path, **save_kwargs)
  return model


def _edit_config(directory, **changes):
  path = directory / "config.json"
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config))


def test_sharded_and_bfloat16(tmp_path, checkpoints):
  _saved(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  _saved(tmp_path / "single")
  config, sharded = hf.load_decoder(str(tmp_path / "sharded"))
  _, single = hf.load_decoder(str(tmp_path / "single"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, sharded, single)
  bf16_config, bf16 = hf.load_decoder(str(tmp_path / "single"), param_dtype=jnp.bfloat16)
  assert bf16_config.param_dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree_util.tree_leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}


def test_unsupported_checkpoints_are_refused(tmp_path):
  t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
      vocab_size=32, d_model=8, d_kv=4, d_ff=8, num_heads=2, num_layers=1))
  t5.save_pretrained(tmp_path / "t5")
  with pytest.raises(hf.CheckpointError, match="T5ForConditionalGeneration.*not a supported"):
    hf.load_decoder(str(tmp_path / "t5"))

  directory = tmp_path / "llama"
  _saved(directory)
  for changes, message in [
      (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)), "yarn"),
      (dict(attention_bias=True), "attention_bias=True"),
      (dict(hidden_act="gelu"), "hidden_act='gelu'"),
      (dict(num_key_value_heads=3), "num_heads=4 is not a multiple of num_kv_heads=3"),
  ]:
    original = (directory / "config.json").read_text()
    _edit_config(directory, **changes)
    with pytest.raises(hf.CheckpointError, match=message):
      hf.load_decoder(str(directory))
    (directory / "config.json").write_text(original)


def test_missing_and_mismatched_tensors(tmp_path):
  directory = tmp_path / "untied"
  _saved(directory, name="llama_head_dim_untied")
  _edit_config(directory, tie_word_embeddings=True)  # lm_head.weight then unused: fine
  hf.load_decoder(str(directory))
  _edit_config(directory, tie_word_embeddings=False, intermediate_size=50)
  with pytest.raises(hf.CheckpointError, match="gate_proj.weight.*shape"):
    hf.load_decoder(str(directory))

  tied = tmp_path / "tied"
  _saved(tied)
  _edit_config(tied, tie_word_embeddings=False)  # the head was never written
  with pytest.raises(hf.CheckpointError, match="'lm_head.weight' is missing"):
    hf.load_decoder(str(tied))
  _edit_config(tied, tie_word_embeddings=True, num_hidden_layers=1)
  with pytest.raises(hf.CheckpointError, match="not used by a decoder-only model.*layers.1"):
    hf.load_decoder(str(tied))


def test_pickle_only_directory_is_refused(tmp_path, monkeypatch):
  _saved(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  (tmp_path / "pytorch_model.bin").write_bytes(b"not to be unpickled")
  import pickle
  monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
  with pytest.raises(hf.CheckpointError, match="pickle.*AutoModelForCausalLM"):
    hf.load_decoder(str(tmp_path))


def test_config_from_older_transformers_files():
  """config.json as transformers 4 wrote it (Llama 3.1, Qwen2.5): rope_theta beside
  rope_scaling; the llama3 frequencies are transformers' at real sizes."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  llama31 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
                 hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                 rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=8192, rope_type="llama3"),
                 max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False)
  config = hf.decoder_config_from_hf(llama31)
  assert (config.rope_theta, config.head_dim, config.num_kv_heads) == (500000.0, 128, 8)
  assert config.rope_scaling == decoder.RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
  theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](transformers.LlamaConfig(**llama31))
  np.testing.assert_allclose(decoder.rope_frequencies(config), theirs.numpy(), rtol=1e-6)

  qwen25 = dict(architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=896,
                intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, rope_theta=1000000.0, rope_scaling=None,
                use_sliding_window=False, sliding_window=32768, tie_word_embeddings=True)
  config = hf.decoder_config_from_hf(qwen25)
  assert (config.rope_theta, config.head_dim, config.rope_scaling) == (1e6, 64, None)
  assert config.attention_bias and config.tie_word_embeddings and config.sliding_window is None
  with pytest.raises(hf.CheckpointError, match="use_sliding_window=True"):
    hf.decoder_config_from_hf(dict(qwen25, use_sliding_window=True))
