"""`shared_vocab=N`: models whose vocabularies differ only by padding rows (here 40 and 37
ids) realign over the first N ids, against float64 NumPy; and the errors without it."""
import json

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_models
from deranj import decoding
from deranj import dera
from deranj import gin_utils
from deranj import sample
from deranj.data import tokenizer
from deranj.models import base
from deranj.models import build
from deranj.models import decoder
from deranj.models import loading
from numerics import assert_close_f32

N, WIDE = 37, 40  # the aligned model's vocabulary, the reference's (3 padding rows)
EOS, T = 1, 8
WIDTH = 32  # the widest contraction in the tiny networks below


def _t5(vocab):
  return base.EncoderDecoderModel(build.network(build.T5Config(
      vocab_size=vocab, d_model=16, d_kv=8, d_ff=WIDTH, num_heads=2, num_layers=1,
      dropout_rate=0.0)))


def _decoder(vocab):
  return base.DecoderOnlyModel(decoder.Transformer(decoder.DecoderConfig(
      vocab_size=vocab, hidden_size=16, intermediate_size=WIDTH, num_layers=1, num_heads=2,
      num_kv_heads=1, head_dim=8)), pad_id=base.NO_PAD)


FAMILIES = {"t5": _t5, "decoder": _decoder}


def _pair(family, aligned_vocab=N, seed=0):
  """(reference [40 ids], its params, aligned [aligned_vocab ids], its params). The
  reference's padding rows get large logits, so without the cut it emits them often."""
  ref, al = FAMILIES[family](WIDE), FAMILIES[family](aligned_vocab)
  ref_p, al_p = tiny_models.random_params(ref, seed), tiny_models.random_params(al, seed + 1)
  if family == "t5":  # tied: the output head is the embedding
    table = ref_p["token_embedder"]["embedding"]
    table[N:] = 3.0 * table[2:2 + WIDE - N]
  else:
    table = ref_p["lm_head"]["kernel"]
    table[:, N:] = 3.0 * table[:, 2:2 + WIDE - N]
  return ref, ref_p, al, al_p


def _prompts(family, seed=0):
  """[4, 6] right-padded prompts of ids < N (T5: ending in EOS)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, N, size=(4, 6)).astype(np.int32)
  pad = 0 if family == "t5" else base.NO_PAD
  for row, length in enumerate((6, 4, 2, 5)):
    tokens[row, length:] = pad
    if family == "t5":
      tokens[row, length - 1] = EOS
  return tokens


def _teacher_logits(model, params, prompts, responses):
  """Each model's own float32 logits [B, T, V] as float64."""
  return np.asarray(model.logits(params, base.response_batch(jnp.asarray(prompts),
                                                             jnp.asarray(responses))),
                    np.float64)


def _log_softmax(x, pad_id):
  x = np.array(x, np.float64)
  if pad_id >= 0:
    x[..., pad_id] = -np.inf
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _replay(realigner, prompts, responses, lam):
  """float64 (mixed logits [B, T, N], log q [B], each model's log p [B, M]) along
  `responses`, every distribution over ids < N without PAD."""
  per_model = [_teacher_logits(m, p, prompts, responses)[..., :N]
               for m, p in zip(realigner.models, realigner.params)]
  lam = np.asarray(lam, np.float64).reshape(len(prompts), -1)
  weights = np.concatenate([1 - lam.sum(1, keepdims=True), lam], axis=1)
  mixed = sum(weights[:, m, None, None] * h for m, h in enumerate(per_model))
  real = (responses != realigner.pad_id)
  ids = np.maximum(responses, 0)[..., None]

  def total(logits):
    logp = np.take_along_axis(_log_softmax(logits, realigner.pad_id), ids, -1)[..., 0]
    return np.where(real, logp, 0.0).sum(-1)

  return mixed, total(mixed), np.stack([total(h) for h in per_model], axis=1), per_model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def realigned(request):
  family = request.param
  ref, ref_p, al, al_p = _pair(family)
  return family, dera.Realigner(ref, ref_p, al, al_p, max_decode_len=T, eos_id=EOS,
                                shared_vocab=N)


def test_logits_are_the_mix_of_the_shared_ids(realigned):
  family, realigner = realigned
  prompts = _prompts(family)
  responses = np.random.default_rng(1).integers(2, N, size=(4, T)).astype(np.int32)
  lam = np.array([0.0, 0.5, 1.0, 2.5], np.float32)
  got = np.asarray(realigner.logits(prompts, responses, lam))
  assert got.shape == (4, T, N)
  expected, _, _, per_model = _replay(realigner, prompts, responses, lam)
  # The models' float32 logits (each a contraction whose terms are of the size of the
  # largest logit, not of each logit), then two products and a sum.
  scale = sum(abs(w) * np.abs(h).max(-1, keepdims=True) for w, h in zip(
      (1 - lam[:, None, None], lam[:, None, None]), per_model))
  assert_close_f32(got, expected, WIDTH + 3, scale)


def test_samples_stay_below_n_and_score_is_the_samplers_log_q(realigned):
  family, realigner = realigned
  prompts = _prompts(family)
  lam = np.array([0.0, 0.5, 1.0, 2.0], np.float32)
  rng = jax.random.PRNGKey(0)
  alone = decoding.sample(realigner.models[0], realigner.params[0], jnp.asarray(prompts), rng,
                          max_decode_len=T, eos_id=EOS, num_decodes=8)
  assert np.sum(np.asarray(alone.tokens) >= N) >= 10  # the reference alone uses its padding
  out = realigner.sample(prompts, lam, rng, num_decodes=8)
  tokens = np.asarray(out.tokens)
  lengths = np.asarray(out.lengths)
  for row, n in zip(tokens, lengths):
    assert np.all((row[:n] >= 0) & (row[:n] < N)) and np.all(row[n:] == realigner.pad_id)
  rows = np.repeat(prompts, 8, axis=0)
  lam_rows = np.repeat(lam, 8)
  _, logq, logp, _ = _replay(realigner, rows, tokens, lam_rows)
  terms = 2 * T * WIDTH
  scale = np.abs(logp).max() + np.abs(logq).max()
  assert_close_f32(out.logq, logq, terms, scale)
  assert_close_f32(out.logp_ref, logp[:, 0], terms, scale)
  assert_close_f32(out.logp_aligned, logp[:, 1], terms, scale)
  assert_close_f32(realigner.score(rows, tokens, lam_rows), out.logq, terms, scale)


def test_greedy_picks_the_argmax_of_the_shared_mix(realigned):
  family, realigner = realigned
  prompts = _prompts(family, seed=2)
  lam = np.array([0.0, 0.7, 1.0, 1.5], np.float32)
  out = realigner.sample(prompts, lam, temperature=0.0)
  tokens = np.asarray(out.tokens)
  mixed, _, _, per_model = _replay(realigner, prompts, tokens, lam)
  mixed = np.where(np.arange(N) == realigner.pad_id, -np.inf, mixed)
  top2 = np.sort(mixed, -1)[..., -2:]
  scale = sum(np.abs(h).max() for h in per_model) * (1 + np.abs(lam).max())
  clear = top2[..., 1] - top2[..., 0] > 1e-4 * scale  # no near-ties between float32 and 64
  live = np.arange(T) < np.asarray(out.lengths)[:, None]
  assert np.sum(clear & live) >= 10
  np.testing.assert_array_equal(tokens[clear & live], np.argmax(mixed, -1)[clear & live])


def test_every_rule_and_path_stays_below_n(realigned):
  family, realigner = realigned
  prompts = jnp.asarray(_prompts(family, seed=3))
  rng = jax.random.PRNGKey(4)
  below = lambda out: np.all(np.asarray(out.tokens)[  # noqa: E731
      np.asarray(out.tokens) != realigner.pad_id] < N)
  aad = realigner.sample(prompts, rule="aad", alpha=0.5, rng=rng, num_decodes=4)
  assert below(aad)
  resampled = realigner.resample(prompts, 0.0, rng, num_candidates=4)
  assert below(resampled.samples) and np.all(np.isfinite(resampled.ess))
  best = realigner.best_of_n(prompts, 4, dera.implicit_reward_scorer(), rng, lam=1.0)
  assert below(best.samples)
  # K = 2 aligned models of 37 and 40 ids; the reference gets 1 - 0.5 - 1 = -0.5.
  ref, ref_p, al, al_p = _pair(family)
  wide_p = tiny_models.random_params(ref, 9)
  many = dera.Realigner(ref, ref_p, [al, ref], [al_p, wide_p], max_decode_len=T, eos_id=EOS,
                        shared_vocab=N)
  lam = np.array([0.5, 1.0], np.float32)
  out = many.sample(prompts, lam, rng, num_decodes=4)
  assert below(out) and out.logp_aligned.shape == (16, 2)
  rows = np.repeat(np.asarray(prompts), 4, axis=0)
  _, logq, _, _ = _replay(many, rows, np.asarray(out.tokens), np.tile(lam, (16, 1)))
  assert_close_f32(out.logq, logq, 3 * T * WIDTH, np.abs(logq).max())
  # Weight mixing of two 40-id models over 37 ids: lam 0 is the reference, as by logits.
  weights = dera.Realigner(ref, ref_p, ref, wide_p, max_decode_len=T, eos_id=EOS,
                           combine="weights", shared_vocab=N)
  logits = dera.Realigner(ref, ref_p, ref, wide_p, max_decode_len=T, eos_id=EOS,
                          shared_vocab=N)
  by_weights, by_logits = weights.sample(prompts, 0.0, rng), logits.sample(prompts, 0.0, rng)
  assert below(by_weights)
  np.testing.assert_array_equal(by_weights.tokens, by_logits.tokens)
  np.testing.assert_array_equal(by_weights.logq, by_logits.logq)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_equal_vocabularies_without_shared_vocab_are_untouched(family):
  """No cut without shared_vocab: lam 0 and 1 are each model alone, bit for bit."""
  ref, ref_p, _, _ = _pair(family)
  other = tiny_models.random_params(ref, 5)
  realigner = dera.Realigner(ref, ref_p, ref, other, max_decode_len=T, eos_id=EOS)
  prompts = jnp.asarray(_prompts(family))
  rng = jax.random.PRNGKey(6)
  for lam, params in ((0.0, ref_p), (1.0, other)):
    mixed = realigner.sample(prompts, lam, rng)
    alone = decoding.sample(ref, params, prompts, rng, max_decode_len=T, eos_id=EOS)
    np.testing.assert_array_equal(mixed.tokens, alone.tokens)
    np.testing.assert_array_equal(mixed.logq, alone.logq)
  assert np.any(np.asarray(realigner.sample(prompts, 0.0, rng, num_decodes=4).tokens) >= N)


def test_errors_name_shared_vocab():
  ref, ref_p, al, al_p = _pair("t5")
  make = lambda **kw: dera.Realigner(ref, ref_p, al, al_p, max_decode_len=T, **kw)  # noqa: E731
  with pytest.raises(ValueError, match=r"^the models must share a vocabulary: reference "
                     r"vocab_size=40, aligned vocab_size=37; if they differ only by padding "
                     r"rows, pass shared_vocab=N \(at most 37\)"):
    make()
  with pytest.raises(ValueError, match=r"^shared_vocab=38 must be in 1\.\.37, the smallest "
                     r"vocabulary \(reference vocab_size=40, aligned vocab_size=37\)"):
    make(shared_vocab=38)
  with pytest.raises(ValueError, match=r"^shared_vocab=1 cuts off eos_id=1"):
    make(shared_vocab=1)
  for bad in (36.5, True, "37"):
    with pytest.raises(ValueError, match=r"^shared_vocab must be an integer"):
      make(shared_vocab=bad)
  assert make(shared_vocab=np.int64(N)).shared_vocab == N


# ----------------------------------------------------------------------------- sample CLI


def _save(directory, vocab, seed, boost=None):
  """A random T5 saved to `directory`; ids >= `boost` get large logits (padding rows the
  model alone would emit)."""
  model = _t5(vocab)
  params = tiny_models.random_params(model, seed)
  if boost is not None:
    table = params["token_embedder"]["embedding"]
    table[boost:] = 3.0 * table[2:2 + vocab - boost]
  loading.save_model(str(directory), model.config, params)
  return model, params


def test_sample_cli_realigns_over_shared_vocab(tmp_path):
  """A reference of the tokenizer's 4096 ids and an aligned model padded to 4224:
  refused without SampleConfig.shared_vocab, sampled with it (lam 0 = the reference)."""
  vocab = tokenizer.vocab_size()
  ref, ref_p = _save(tmp_path / "ref", vocab, 0)
  al, al_p = _save(tmp_path / "padded", vocab + 128, 1, boost=vocab)
  texts = ["Rain fell.", "A third."]
  inp = tmp_path / "in.jsonl"
  inp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
  out = tmp_path / "out.jsonl"
  config = lambda **kw: sample.SampleConfig(  # noqa: E731
      reference_checkpoint=str(tmp_path / "ref"), aligned_checkpoint=str(tmp_path / "padded"),
      max_decode_len=6, max_input_length=16, batch_size=2, temperature=0.0, **kw)
  with pytest.raises(sample.SampleError, match=r"^vocabulary mismatch: .* If they differ only "
                     r"by padding rows, set SampleConfig.shared_vocab .*at most 4096"):
    sample.run(config(), [0.0, 1.0], str(inp), str(out), 0)
  for bad in (vocab + 1, 0, 4000.0):
    with pytest.raises(sample.SampleError, match=rf"^SampleConfig.shared_vocab={bad!r}: must "
                       r"be an integer in 1\.\.4096"):
      sample.run(config(shared_vocab=bad), [0.0, 1.0], str(inp), str(out), 0)
  assert not out.exists()
  assert sample.run(config(shared_vocab=vocab), [0.0, 1.0], str(inp), str(out), 0) == 4
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  tok = sample.Tokenizer(None, None)
  prompts = jnp.asarray(sample.encode_prompts(texts, tok, config()))
  greedy = lambda model, params: decoding.sample(  # noqa: E731
      model, params, prompts, jax.random.PRNGKey(0), max_decode_len=6, temperature=0.0)
  assert np.any(np.asarray(greedy(al, al_p).tokens) >= vocab)  # the cut matters at lam 1
  alone = greedy(ref, ref_p)
  for line in lines:
    assert np.isfinite([line["logq"], line["logp_ref"], line["logp_aligned"]]).all()
    if line["lam"] == 0.0:
      row = np.asarray(alone.tokens)[line["prompt_index"]]
      assert line["text"] == tok.decode(row)
      assert line["length"] == int(alone.lengths[line["prompt_index"]])


def test_gin_binding():
  with gin.unlock_config():
    gin.clear_config()
    try:
      gin_utils.parse_gin([], ["SampleConfig.shared_vocab = 151665"], [])
      assert gin_utils.build(sample.SampleConfig).shared_vocab == 151665
    finally:
      gin.clear_config()
