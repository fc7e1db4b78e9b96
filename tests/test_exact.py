"""The enumerable world: enumeration, the closed-form optimum, token conditionals, DeRa
on exact conditionals, and model scores over the set, each against a direct float64
computation."""
import functools
import itertools

import jax
import numpy as np
import pytest

from deranj import dera
from deranj import exact
from deranj.models import base
from deranj.models import build
from tests import tiny_models

IDS = (3, 4, 5, 6, 7, 8)
LAMS = (0.25, 0.5, 2 / 3, 1.5, 2.0, 4.0, 10.0)


def _random_table(shape, seed, scale=2.0):
  """A normalised float64 log-probability table [P, N]."""
  x = scale * np.random.default_rng(seed).standard_normal(shape)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def world():
  return exact.make_world(num_prompts=8, content_ids=IDS, max_len=5)


# ----------------------------------------------------------------------------- the world

@pytest.mark.parametrize("num_ids,max_len", [(6, 5), (3, 3), (2, 1), (1, 4)])
@pytest.mark.parametrize("allow_truncated", [False, True])
def test_enumeration_covers_every_response_once(num_ids, max_len, allow_truncated):
  ids = IDS[:num_ids]
  responses = exact.enumerate_responses(ids, 1, max_len, allow_truncated=allow_truncated)
  expected = sum(num_ids**k for k in range(max_len)) + (num_ids**max_len if allow_truncated
                                                        else 0)
  assert responses.shape == (expected, max_len) and responses.dtype == np.int32
  assert exact.num_responses(num_ids, max_len, allow_truncated) == expected
  # The same set built independently: every body, then EOS, then PAD.
  direct = set()
  for k in range(max_len + 1 if allow_truncated else max_len):
    for body in itertools.product(ids, repeat=k):
      direct.add(tuple(body) + ((1,) if k < max_len else ()) + (0,) * (max_len - k - 1))
  assert {tuple(r) for r in responses.tolist()} == direct
  exact.check_responses(responses)  # tokens, EOS, PAD; no row twice


def test_world_has_distinct_eos_terminated_prompts(world):
  assert world.prompts.shape == (8, 5)
  assert len({tuple(p) for p in world.prompts.tolist()}) == 8
  assert np.all(world.prompts[:, -1] == 1) and np.all(np.isin(world.prompts[:, :-1], IDS))
  assert world.responses.shape == (1555, 5)
  np.testing.assert_array_equal(np.bincount(world.lengths), [6**k for k in range(5)])


def test_too_large_a_world_is_refused_with_its_count():
  with pytest.raises(ValueError, match="55,987 responses") as err:
    exact.enumerate_responses(IDS, 1, 7)
  assert "\n" not in str(err.value)
  assert exact.enumerate_responses(IDS, 1, 7, limit=60_000).shape == (55_987, 7)


@pytest.mark.parametrize("ids", [(0, 3), (1, 3), (3, 3), ()])
def test_bad_content_ids(ids):
  with pytest.raises(ValueError, match="content_ids"):
    exact.enumerate_responses(ids, 1, 3)


@pytest.mark.parametrize("rows,match", [
    ([[3, 0, 1]], "not tokens, EOS"),  # PAD inside
    ([[3, 1, 4]], "not tokens, EOS"),  # a token after EOS
    ([[3, 4, 0]], "not tokens, EOS"),  # no EOS, not full length
    ([[3, 1, 0], [3, 1, 0]], "repeated"),
])
def test_bad_responses(rows, match):
  with pytest.raises(ValueError, match=match):
    exact.check_responses(np.array(rows))


# ----------------------------------------------------------------------------- the optimum

@pytest.mark.parametrize("beta", [0.1, 0.5, 3.0])
def test_optimal_policy_against_direct_numpy(world, beta):
  logp_ref = _random_table((8, 1555), seed=1)
  for r in (exact.gold_reward(world.responses, IDS, seed=2),
            np.random.default_rng(3).uniform(-1, 1, (8, 1555))):
    unnormalised = np.exp(logp_ref) * np.exp(r / beta)
    direct = unnormalised / unnormalised.sum(-1, keepdims=True)
    got = exact.optimal_policy(logp_ref, r, beta)
    np.testing.assert_allclose(np.exp(got), direct, rtol=1e-10)
    # An unnormalised reference (a model's raw scores) gives the same optimum.
    np.testing.assert_allclose(np.exp(exact.optimal_policy(logp_ref - 0.7, r, beta)),
                               np.exp(got), rtol=1e-12)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_optimal_policy_refuses_bad_beta(beta):
  with pytest.raises(ValueError, match="beta must be a positive finite") as err:
    exact.optimal_policy(np.zeros((1, 3)), np.zeros(3), beta)
  assert "\n" not in str(err.value)


def test_optimal_policy_refuses_misshapen_rewards():
  with pytest.raises(ValueError, match="rewards must be finite, of shape"):
    exact.optimal_policy(np.zeros((2, 3)), np.zeros(4), 1.0)


def test_geometric_mixture_of_the_optimum_is_the_optimum_at_beta_over_lam(world):
  """Paper eq. 5 / Sec. 3: pi_ref^(1-lam) pi*(beta)^lam / Z = pi*(beta/lam), exactly."""
  logp_ref = _random_table((8, 1555), seed=4)
  r = exact.gold_reward(world.responses, IDS, seed=5)
  beta = 0.8
  opt = exact.optimal_policy(logp_ref, r, beta)
  for lam in LAMS + (1.0,):
    mixed = exact.geometric_mixture(logp_ref, opt, lam)
    np.testing.assert_allclose(np.exp(mixed), np.exp(exact.optimal_policy(logp_ref, r, beta / lam)),
                               rtol=1e-9)
  np.testing.assert_allclose(np.exp(exact.geometric_mixture(logp_ref, opt, 0.0)),
                             np.exp(logp_ref), rtol=1e-12)


# ----------------------------------------------------------------------------- measures

def test_kl_tv_expected_against_hand_values():
  p = np.array([[np.log(0.5), np.log(0.5), -np.inf], np.log([0.2, 0.3, 0.5])])
  q = np.log([[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]])
  k = exact.kl(p, q)
  np.testing.assert_allclose(k.per_prompt, [np.log(2.0), 0.0], rtol=1e-12, atol=1e-15)
  assert k.mean == pytest.approx(np.log(2.0) / 2, rel=1e-12)
  np.testing.assert_allclose(exact.tv(p, q).per_prompt, [0.5, 0.0], rtol=1e-12, atol=1e-15)
  assert exact.kl(q, p).per_prompt[0] == np.inf  # q puts mass where p has none
  e = exact.expected(p, [1.0, 2.0, 10.0])
  np.testing.assert_allclose(e.per_prompt, [1.5, 0.2 + 0.6 + 5.0], rtol=1e-12)


def test_measures_refuse_unnormalised_tables():
  with pytest.raises(ValueError, match="renormalise") as err:
    exact.kl(np.log([[0.5, 0.4]]), np.log([[0.5, 0.5]]))
  assert "\n" not in str(err.value)
  logp, missing = exact.renormalize(np.log([[0.5, 0.3], [0.1, 0.1]]))
  np.testing.assert_allclose(missing, [0.2, 0.8], rtol=1e-12)
  np.testing.assert_allclose(np.exp(logp), [[0.625, 0.375], [0.5, 0.5]], rtol=1e-12)


def test_rewards(world):
  lengths = np.asarray(world.lengths)
  np.testing.assert_array_equal(exact.length_reward(world.responses, 2, 3),
                                np.where((lengths >= 2) & (lengths <= 3), 0.0, -1.0))
  w = exact.gold_weights(IDS, seed=7)
  direct = [sum(w[IDS.index(t)] for t in row if t in IDS) for row in world.responses.tolist()]
  gold = exact.gold_reward(world.responses, IDS, seed=7)
  np.testing.assert_allclose(gold, direct, rtol=1e-12, atol=1e-12 * np.abs(w).sum())
  assert not np.allclose(gold, exact.gold_reward(world.responses, IDS, seed=8))


# ----------------------------------------------------------------------------- token level

def test_token_conditionals_recompose_the_distribution(world):
  logp = _random_table((8, 1555), seed=9)
  cond = exact.token_conditionals(logp, world.responses)
  np.testing.assert_allclose(np.exp(cond.sequence_logprobs()), np.exp(logp), rtol=1e-6)
  # Siblings sum to one: the mass leaving each prefix.
  tree = cond.tree
  edges = np.arange(1, tree.num_prefixes)
  mass = np.zeros((8, tree.num_prefixes))
  np.add.at(mass.T, tree.parent[edges], np.exp(cond.log_cond[:, edges]).T)
  parents = np.unique(tree.parent[edges])
  np.testing.assert_allclose(mass[:, parents], 1.0, rtol=1e-12)
  # First-token conditional directly: the mass of responses starting with that token.
  p = np.exp(logp)
  first = world.responses[:, 0]
  per_token = cond.per_token()
  for token in (1, 3, 8):
    n = int(np.argmax(first == token))
    np.testing.assert_allclose(np.exp(per_token[:, n, 0]), p[:, first == token].sum(-1),
                               rtol=1e-12)
  # Second position of [4, 5, ...]: mass of [4, 5, ...] over mass of [4, ...].
  n = int(np.argmax((first == 4) & (world.responses[:, 1] == 5)))
  direct = (p[:, (first == 4) & (world.responses[:, 1] == 5)].sum(-1) /
            p[:, first == 4].sum(-1))
  np.testing.assert_allclose(np.exp(per_token[:, n, 1]), direct, rtol=1e-12)
  assert np.all(per_token[:, world.lengths == 0, 1:] == 0.0)  # PAD positions


def test_token_conditionals_of_an_unnormalised_table_are_its_renormalisation(world):
  logp = _random_table((2, 1555), seed=10) - 0.3
  cond = exact.token_conditionals(logp, exact.PrefixTree.build(world.responses))
  np.testing.assert_allclose(np.exp(cond.sequence_logprobs()), np.exp(logp + 0.3), rtol=1e-9)


def test_dera_on_exact_conditionals(world):
  logp_ref = _random_table((8, 1555), seed=11)
  r = exact.gold_reward(world.responses, IDS, seed=12)
  beta = 0.5
  opt = exact.optimal_policy(logp_ref, r, beta)
  tree = exact.PrefixTree.build(world.responses)
  c_ref, c_opt = exact.token_conditionals(logp_ref, tree), exact.token_conditionals(opt, tree)
  np.testing.assert_allclose(np.exp(exact.dera_from_conditionals(c_ref, c_opt, 0.0)),
                             np.exp(logp_ref), rtol=1e-10)
  at_one = exact.dera_from_conditionals(c_ref, c_opt, 1.0)
  np.testing.assert_allclose(np.exp(at_one), np.exp(opt), rtol=1e-10)
  assert abs(exact.kl(at_one, opt).mean) < 1e-12
  for lam in (0.5, 2.0):
    q = exact.dera_from_conditionals(c_ref, c_opt, lam)
    np.testing.assert_allclose(np.exp(exact._logsumexp(q)), 1.0, rtol=1e-12)
    # Per-token DeRa is an approximation: a real, positive gap to pi*(beta/lam).
    gap = exact.kl(q, exact.optimal_policy(logp_ref, r, beta / lam)).mean
    assert 1e-4 < gap < 1.0
  # One step of DeRa by hand at lam = 2, first token.
  cr, co = c_ref.per_token()[:, :, 0], c_opt.per_token()[:, :, 0]
  lam = 2.0
  firsts = [int(np.argmax(world.responses[:, 0] == t)) for t in (1,) + IDS]
  logits = lam * co[:, firsts] + (1 - lam) * cr[:, firsts]
  step = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  only_eos = int(np.argmax(world.lengths == 0))
  np.testing.assert_allclose(np.exp(exact.dera_from_conditionals(c_ref, c_opt, lam)[:, only_eos]),
                             np.exp(step[:, 0]), rtol=1e-10)


def test_dera_refuses_different_response_sets(world):
  a = exact.token_conditionals(_random_table((1, 13), 0), exact.enumerate_responses(IDS[:3], 1, 3))
  b = exact.token_conditionals(_random_table((1, 13), 1),
                               exact.enumerate_responses(IDS[3:], 1, 3))
  with pytest.raises(ValueError, match="different response sets"):
    exact.dera_from_conditionals(a, b, 0.5)
  with np.errstate(divide="ignore"):
    zero = exact.token_conditionals(np.log([[0.0] + [1 / 12] * 12]), a.tree)
  assert np.isneginf(exact.dera_from_conditionals(a, zero, 0.5)[0, 0])
  with pytest.raises(ValueError, match="extrapolates"):
    exact.dera_from_conditionals(a, zero, 2.0)


# ----------------------------------------------------------------------------- model scores

VOCAB = 12
CFG = build.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_heads=2, num_layers=1,
                  dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
SMALL_IDS = (3, 4, 5)


def _direct_logprobs(model_logits, responses):
  """float64 sum over each response's tokens (EOS included) of log softmax(logits)[token]."""
  logits = np.asarray(model_logits, np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  tok = np.take_along_axis(log_probs, responses[..., None], -1)[..., 0]
  return np.where(responses > 0, tok, 0.0).sum(-1)


def _without_pad(logits):
  """The logits as the sampler uses them: PAD (id 0) never drawn."""
  out = np.array(logits, np.float64)
  out[..., 0] = -np.inf
  return out


@functools.partial(jax.jit, static_argnums=0)  # op by op, each small op compiles alone
def _jitted_logits(model, params, batch):
  return model.logits(params, batch)


def _logits(model, params, prompt, responses):
  targets = np.asarray(responses)
  batch = {"prompts": np.repeat(prompt[None], len(targets), 0),
           "responses": targets}
  return _jitted_logits(model, params, batch)


def test_sequence_logprobs_of_a_tiny_t5_against_its_logits():
  model = base.EncoderDecoderModel(build.network(CFG))
  params = tiny_models.random_params(model, seed=0)
  world = exact.make_world(num_prompts=2, content_ids=SMALL_IDS, max_len=3)
  # 26 rows in batches of 5: the last batch is padded, every call has one shape.
  got = exact.sequence_logprobs(model, params, world.prompts, world.responses, batch_size=5)
  assert got.shape == (2, 13) and got.dtype == np.float64
  for p, prompt in enumerate(world.prompts):
    direct = _direct_logprobs(_logits(model, params, prompt, world.responses), world.responses)
    np.testing.assert_allclose(got[p], direct, rtol=1e-5)
  logp, missing = exact.renormalize(got)
  np.testing.assert_allclose(missing, 1 - np.exp(got).sum(-1), rtol=1e-9)
  assert np.all((missing > 0) & (missing < 1))  # ids outside the world get mass too
  # The sampler's distribution: PAD's mass goes to the other ids, step by step.
  sampled = exact.sequence_logprobs(model, params, world.prompts, world.responses,
                                    exclude_pad=True, batch_size=5)
  for p, prompt in enumerate(world.prompts):
    direct = _direct_logprobs(_without_pad(_logits(model, params, prompt, world.responses)),
                              world.responses)
    np.testing.assert_allclose(sampled[p], direct, rtol=1e-5)
  assert np.all(sampled > got)


def test_dera_sequence_logprobs_mix_the_models_logits():
  ref = base.EncoderDecoderModel(build.network(CFG))
  aligned = base.EncoderDecoderModel(build.network(CFG))
  ref_p, al_p = tiny_models.random_params(ref, 1), tiny_models.random_params(aligned, 2)
  realigner = dera.Realigner(ref, ref_p, aligned, al_p, max_decode_len=3)
  world = exact.make_world(num_prompts=1, content_ids=SMALL_IDS, max_len=3)
  prompt = world.prompts[0]
  h_ref = np.asarray(_logits(ref, ref_p, prompt, world.responses), np.float64)
  h_al = np.asarray(_logits(aligned, al_p, prompt, world.responses), np.float64)
  for lam in (0.5, 2.0):
    got = exact.dera_sequence_logprobs(realigner, world.prompts, world.responses, lam)
    direct = _direct_logprobs(_without_pad(lam * h_al + (1 - lam) * h_ref), world.responses)
    np.testing.assert_allclose(got[0], direct, rtol=1e-5)


def test_fit_by_exact_gradient_measures_and_lowers_the_exact_kl():
  model = base.EncoderDecoderModel(build.network(CFG))
  params = tiny_models.random_params(model, seed=0)
  world = exact.make_world(num_prompts=2, content_ids=SMALL_IDS, max_len=3)
  logp, _ = exact.renormalize(exact.sequence_logprobs(model, params, world.prompts,
                                                      world.responses, exclude_pad=True))
  r = exact.gold_reward(world.responses, world.content_ids, seed=1)
  target = exact.optimal_policy(logp, r, beta=0.5)
  _, curve = exact.fit_by_exact_gradient(model, params, world, target, steps=30,
                                         learning_rate=3e-2, eval_every=10)
  assert [s for s, _ in curve] == [0, 10, 20, 30]
  # Its first point is the KL that `exact.kl` measures on the model's table.
  np.testing.assert_allclose(curve[0][1], exact.kl(logp, target).mean, rtol=1e-4)
  assert curve[-1][1] < 0.5 * curve[0][1]
  with pytest.raises(ValueError, match="the world has 2 prompts"):
    exact.fit_by_exact_gradient(model, params, world, target[:1], steps=1, learning_rate=1e-3)


def test_sequence_logprobs_refuses_a_bare_module():
  with pytest.raises(TypeError, match="EncoderDecoderModel"):
    exact.sequence_logprobs(build.network(CFG), {}, np.ones((1, 2), np.int32),
                            np.array([[1]]))


# ----------------------------------------------------------------------------- sampling, SIR

def test_random_policy_is_a_prompt_dependent_distribution(world):
  logp = exact.random_policy(world.responses, 3, seed=0)
  np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, rtol=1e-12)
  assert exact.tv(logp[:1], logp[1:2]).mean > 0.1
  np.testing.assert_array_equal(logp, exact.random_policy(world.responses, 3, seed=0))


def test_sample_responses_follow_the_table():
  p = np.array([[0.1, 0.0, 0.6, 0.3], [0.25, 0.25, 0.25, 0.25]])
  with np.errstate(divide="ignore"):
    draws = exact.sample_responses(np.log(p), 100_000, seed=0)
  freq = np.stack([np.bincount(d, minlength=4) for d in draws]) / 100_000
  np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / 100_000) + 1e-12)


def test_preference_pairs_are_bradley_terry_labelled():
  logp = np.log([[0.5, 0.5]])
  chosen, rejected = exact.preference_pairs(logp, [1.0, 0.0], 100_000, seed=0)
  distinct = chosen != rejected
  won = np.mean(chosen[distinct] == 0)  # the higher reward chosen in a sigmoid(1) share
  sigma = np.sqrt(0.25 / distinct.sum())  # binomial, p(1 - p) <= 1/4
  assert abs(won - 1 / (1 + np.exp(-1.0))) < 5 * sigma
  assert np.all(chosen[~distinct] == rejected[~distinct])


def test_sir_distribution():
  q = np.log([[0.4, 0.3, 0.2, 0.1]])
  target = np.log([[0.1, 0.2, 0.3, 0.4]])
  np.testing.assert_allclose(np.exp(exact.sir_distribution(q, target, 1, num_draws=16)),
                             np.exp(q), rtol=1e-12)
  # N = 2 exactly: P(y) = 2 q(y) sum_y' q(y') w(y) / (w(y) + w(y')).
  pq, w = np.exp(q[0]), np.exp(target[0] - q[0])
  direct = 2 * pq * (pq[None, :] * w[:, None] / (w[:, None] + w[None, :])).sum(1)
  got = np.exp(exact.sir_distribution(q, target, 2, num_draws=200_000, seed=1))[0]
  np.testing.assert_allclose(got, direct / direct.sum(), rtol=0.02)
  assert exact.kl(exact.sir_distribution(q, target, 256, seed=2), target).mean < (
      0.01 * exact.kl(q, target).mean)


def test_realignment_errors_at_the_optimum(world):
  tree = exact.PrefixTree.build(world.responses)
  logp_ref = exact.random_policy(tree, 4, seed=3)
  r = exact.length_reward(world.responses, 3, 4)
  rows = exact.realignment_errors(logp_ref, r, 0.5, (0.5, 1.0, 2.0, 4.0), tree,
                                  num_candidates=(32,), num_draws=512)
  by_lam = {row["lam"]: row for row in rows}
  assert by_lam[1.0]["kl_dera"] < 1e-12
  assert by_lam[1.0]["reward_dera"] == pytest.approx(by_lam[1.0]["reward_optimum"], rel=1e-9)
  for row in rows:
    assert row["beta_over_lam"] == pytest.approx(0.5 / row["lam"])
  # The optimum trades KL for reward monotonically along the lam grid.
  assert all(np.diff([row["reward_optimum"] for row in rows]) > 0)
  assert all(np.diff([row["kl_optimum_ref"] for row in rows]) > 0)
  assert by_lam[2.0]["kl_dera"] > 1e-4
  assert by_lam[2.0]["kl_sir"][32] < by_lam[2.0]["kl_dera"]
  with pytest.raises(ValueError, match="lam must be positive"):
    exact.realignment_errors(logp_ref, r, 0.5, (0.0,), tree)
