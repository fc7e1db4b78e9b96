"""An enumerable world: every response, the closed-form optimum and exact distances.

A world is a few prompts and *every* response over a small vocabulary, so any policy's
sequence distribution is a [P, N] table (P prompts, N responses) and the KL-regularised
optimum (paper eq. 2) is computed exactly:

    pi*(beta)(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z_beta(x).

Responses follow the sampler's conventions (PAD = 0, EOS = 1): a response is 0 .. L-1
content tokens followed by EOS, then PAD up to length L. Sequences of L content tokens
without EOS (a sampler cut at `max_decode_len` = L) are left out by default, because
they are not finished responses and would multiply the count by about V + 1; pass
`allow_truncated=True` to include them, which makes the set the sampler's whole support
when `content_ids` are all the ids it can emit.

All tables are float64 log-probabilities. A model's log-probabilities over the set sum
to less than one (mass on longer sequences and on ids outside the world):
`renormalize` divides by the mass on the set and returns the missing mass, to be
reported next to any result computed from the renormalised table.

    world = make_world(content_ids=range(3, 9), max_len=5)
    logp_ref, missing = renormalize(sequence_logprobs(model, params, world.prompts,
                                                      world.responses))
    r = gold_reward(world.responses, world.content_ids, seed=0)
    logp_opt = optimal_policy(logp_ref, r, beta=0.5)
    cond_ref = token_conditionals(logp_ref, world.responses)
    cond_opt = token_conditionals(logp_opt, world.responses)
    logp_dera = dera_from_conditionals(cond_ref, cond_opt, lam=2.0)
    kl(logp_dera, optimal_policy(logp_ref, r, beta=0.25)).mean

A closed world: when the model's vocabulary is PAD, EOS and `content_ids` only and the
set includes cut responses (`allow_truncated=True`, max_len = the sampler's
max_decode_len), the set is the sampler's whole support; `sequence_logprobs(...,
exclude_pad=True)` then scores what the sampler draws (it never emits PAD) and sums to
one up to float error. Training against the world: `GoldReward` is `gold_reward` as a
rollout reward (gin), and `KLToOptimum` a `train.eval_hook` logging the exact KL of the
model being trained to pi*(beta) (experiments/exact_world.py uses both).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable, Optional, Sequence, Union

import gin
import jax
import jax.numpy as jnp
import numpy as np

from deranj import decoding
from deranj import dera
from deranj import rewards as rewards_lib
from deranj.data import batching
from deranj.models import base as models_base

PAD_ID, EOS_ID = 0, 1
MAX_RESPONSES = 20_000  # per prompt; every table is [P, N]
NORMALISED_ATOL = 1e-6  # float64 tables summing further from one are not distributions


# ----------------------------------------------------------------------------- the world

def num_responses(num_content: int, max_len: int, allow_truncated: bool = False) -> int:
  """sum_{k < max_len} V^k responses ending with EOS (+ V^max_len cut ones)."""
  count = sum(num_content**k for k in range(max_len))
  return count + (num_content**max_len if allow_truncated else 0)


def _check_content_ids(content_ids: Iterable[int], eos_id: int) -> np.ndarray:
  ids = np.asarray(list(content_ids), np.int64)
  if ids.ndim != 1 or ids.size == 0:
    raise ValueError(f"content_ids must be a non-empty list of token ids, got {ids.tolist()}.")
  if len(set(ids.tolist())) != ids.size or np.any(ids == PAD_ID) or np.any(ids == eos_id) or (
      np.any(ids < 0)):
    raise ValueError(f"content_ids must be distinct ids other than PAD ({PAD_ID}) and EOS "
                     f"({eos_id}), got {ids.tolist()}.")
  return ids


def _digits(codes: np.ndarray, base: int, width: int) -> np.ndarray:
  """[M] integers -> [M, width] base-`base` digits, most significant first (so codes in
  increasing order are tuples in lexicographic order)."""
  return (codes[:, None] // base**np.arange(width - 1, -1, -1)) % base


def enumerate_responses(content_ids: Iterable[int], eos_id: int = EOS_ID, max_len: int = 5, *,
                        allow_truncated: bool = False,
                        limit: int = MAX_RESPONSES) -> np.ndarray:
  """Every response of at most `max_len` tokens, each exactly once: [N, max_len] int32.

  Shorter responses come first; within a length, lexicographic in `content_ids` order.
  Rows are the content tokens, EOS, then PAD (0); with `allow_truncated`, also every row
  of `max_len` content tokens and no EOS.

  Raises:
    ValueError: bad ids, max_len < 1, or more than `limit` responses (the message says
      how many there would be).
  """
  ids = _check_content_ids(content_ids, eos_id)
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1 (EOS takes one position), got {max_len}.")
  count = num_responses(ids.size, max_len, allow_truncated)
  if count > limit:
    raise ValueError(f"{ids.size} content ids up to {max_len} tokens make {count:,} responses "
                     f"per prompt, over the limit of {limit:,}: use fewer ids or a shorter "
                     "max_len (or raise limit).")
  rows = []
  for k in range(max_len + 1 if allow_truncated else max_len):
    body = ids[_digits(np.arange(ids.size**k), ids.size, k)]
    out = np.zeros((body.shape[0], max_len), np.int32)
    out[:, :k] = body
    if k < max_len:
      out[:, k] = eos_id
    rows.append(out)
  return np.concatenate(rows)


def check_responses(responses, eos_id: int = EOS_ID) -> np.ndarray:
  """[N, L] int32 responses, checked: tokens, EOS, then only PAD (or L tokens, no EOS;
  no PAD inside), no row twice. So no response is a proper prefix of another."""
  tokens = np.asarray(responses)
  if tokens.ndim != 2 or tokens.shape[0] == 0 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"responses must be a non-empty [N, L] integer array, got shape "
                     f"{tokens.shape} of {tokens.dtype}.")
  ended = np.cumsum(tokens == eos_id, axis=1) - (tokens == eos_id) > 0  # after the first EOS
  bad = np.any(ended & (tokens != PAD_ID), axis=1) | np.any(~ended & (tokens == PAD_ID), axis=1)
  if np.any(bad):
    n = int(np.argmax(bad))
    raise ValueError(f"response {n} {tokens[n].tolist()} is not tokens, EOS ({eos_id}), then "
                     f"PAD ({PAD_ID}) only.")
  unique = np.unique(tokens, axis=0).shape[0]
  if unique != tokens.shape[0]:
    raise ValueError(f"responses hold {tokens.shape[0] - unique} repeated rows; each response "
                     "must appear once.")
  return tokens.astype(np.int32)


def make_prompts(num_prompts: int = 8, prompt_ids: Iterable[int] = range(3, 9),
                 length: int = 4, *, seed: int = 0, eos_id: int = EOS_ID) -> np.ndarray:
  """`num_prompts` distinct random prompts of `length` ids, then EOS: [P, length + 1] int32
  (encoder inputs are EOS-terminated, as the data pipeline makes them)."""
  ids = _check_content_ids(prompt_ids, eos_id)
  if num_prompts < 1 or num_prompts > ids.size**length:
    raise ValueError(f"num_prompts must be in [1, {ids.size**length}] for {ids.size} ids of "
                     f"length {length}, got {num_prompts}.")
  rng = np.random.default_rng(seed)
  codes = rng.choice(ids.size**length, size=num_prompts, replace=False)
  eos = np.full((num_prompts, 1), eos_id)
  return np.concatenate([ids[_digits(codes, ids.size, length)], eos], axis=1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class World:
  """Prompts [P, S] and every response [N, L] over `content_ids`."""
  prompts: np.ndarray
  responses: np.ndarray
  content_ids: tuple[int, ...]
  eos_id: int = EOS_ID

  @property
  def lengths(self) -> np.ndarray:
    """[N] response lengths, EOS excluded."""
    return np.asarray(rewards_lib.response_lengths(self.responses, self.eos_id))


def make_world(num_prompts: int = 8, content_ids: Iterable[int] = range(3, 9),
               max_len: int = 5, *, prompt_len: int = 4, seed: int = 0,
               eos_id: int = EOS_ID, allow_truncated: bool = False) -> World:
  """Prompts over the content ids and every response up to `max_len` tokens."""
  ids = tuple(int(i) for i in content_ids)
  responses = enumerate_responses(ids, eos_id, max_len, allow_truncated=allow_truncated)
  prompts = make_prompts(num_prompts, ids, prompt_len, seed=seed, eos_id=eos_id)
  return World(prompts, responses, ids, eos_id)


# ----------------------------------------------------------------------------- rewards

def length_reward(responses, l_min: int, l_max: int, eos_id: int = EOS_ID) -> np.ndarray:
  """Paper eq. 10 per response: 0 if l_min <= length <= l_max, else -1; [N] float64."""
  lengths = rewards_lib.response_lengths(np.asarray(responses), eos_id)
  return np.asarray(rewards_lib.length_reward(lengths, l_min, l_max), np.float64)


def gold_weights(content_ids: Iterable[int], seed: int = 0, scale: float = 1.0) -> np.ndarray:
  """The gold reward's weight per content id: N(0, scale^2), seeded; [V] float64."""
  ids = list(content_ids)
  return scale * np.random.default_rng(seed).standard_normal(len(ids))


@gin.configurable
class GoldReward:
  """`gold_reward` as a rollout reward (PolicyGradient.reward / PPO.reward), jnp:
  sum_v count_v(y) w_v with w = gold_weights(content_ids, seed, scale)."""

  def __init__(self, content_ids: Sequence[int] = gin.REQUIRED, seed: int = 0,
               scale: float = 1.0):
    self.content_ids = tuple(int(i) for i in content_ids)
    if not self.content_ids or min(self.content_ids) <= max(PAD_ID, EOS_ID):
      raise ValueError(f"GoldReward.content_ids must be ids other than PAD and EOS, got "
                       f"{list(self.content_ids)}.")
    self.weights = gold_weights(self.content_ids, seed, scale)

  def params(self) -> dict:
    return {}

  def logical_axes(self) -> dict:
    return {}

  def __call__(self, params, prompts: jax.Array, responses: jax.Array) -> jax.Array:
    del params, prompts
    ids = jnp.asarray(self.content_ids, responses.dtype)
    counts = jnp.sum(responses[:, :, None] == ids, axis=1).astype(jnp.float32)  # [B, V]
    return counts @ jnp.asarray(self.weights, jnp.float32)


def gold_reward(responses, content_ids: Iterable[int], seed: int = 0,
                scale: float = 1.0) -> np.ndarray:
  """A fixed random linear function of token counts: sum_v count_v(y) w_v; [N] float64.

  EOS and PAD count nothing; `gold_weights(content_ids, seed, scale)` are the w_v.
  """
  ids = np.asarray(list(content_ids))
  counts = (np.asarray(responses)[:, :, None] == ids).sum(axis=1)
  return counts @ gold_weights(ids, seed, scale)


# ----------------------------------------------------------------------------- model scores

def _batched_scores(score: Callable, prompts, responses, batch_size: int) -> np.ndarray:
  """score(enc [B, S], targets [B, L]) -> [B], over every (prompt, response): [P, N].

  Fixed-shape batches (`batching.map_in_fixed_batches`): one compilation serves the table.
  """
  prompts = np.asarray(prompts, np.int32)
  if prompts.ndim != 2 or prompts.shape[0] == 0:
    raise ValueError(f"prompts must be a non-empty [P, S] array, got shape {prompts.shape}.")
  responses = check_responses(responses)
  p, n = prompts.shape[0], responses.shape[0]
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  scores = batching.map_in_fixed_batches(
      lambda index: score(prompts[index // n], responses[index % n]),
      (np.arange(p * n),), min(int(batch_size), p * n))
  return np.asarray(scores, np.float64).reshape(p, n)


def _scores(model, params, enc, targets, exclude_pad):
  if not exclude_pad:
    return model.sequence_logprobs(params, enc, targets)
  return jnp.sum(decoding.sampled_token_logprobs(model, params, enc, targets)[0], axis=-1)


_model_scores = jax.jit(_scores, static_argnums=(0, 4))


def sequence_logprobs(model: models_base.EncoderDecoderModel, params, prompts, responses, *,
                      exclude_pad: bool = False, batch_size: int = 1024) -> np.ndarray:
  """log pi(y|x) of every response under a deranj model, teacher-forced: [P, N] float64.

  `exclude_pad`: each token's distribution without PAD, i.e. the distribution
  `deranj.decoding` samples from (it never emits PAD); otherwise the model's own
  softmax. Not renormalised (see `renormalize`). Scores are the model's own float32
  sums, widened to float64.
  """
  if not hasattr(model, "sequence_logprobs"):
    raise TypeError(f"expected a deranj EncoderDecoderModel, got {type(model).__name__} "
                    "(wrap a t5.Transformer in deranj.models.base.EncoderDecoderModel).")
  return _batched_scores(
      lambda enc, tgt: _model_scores(model, params, enc, tgt, bool(exclude_pad)),
      prompts, responses, batch_size)


def reward_table(reward: Callable, prompts, responses, *, batch_size: int = 1024
                 ) -> np.ndarray:
  """r(x, y) of every (prompt, response) under a rollout reward object (`GoldReward`,
  a learned reward model's `LearnedReward`, ...): [P, N] float64."""
  params = reward.params()
  score = jax.jit(lambda p, enc, tgt: reward(p, enc, tgt))
  return _batched_scores(lambda enc, tgt: score(params, enc, tgt), prompts, responses,
                         batch_size)


def dera_sequence_logprobs(realigner: dera.Realigner, prompts, responses, lam, *,
                           batch_size: int = 1024) -> np.ndarray:
  """log q_lam(y|x) of every response under DeRa (`Realigner.score`): [P, N] float64.

  This is DeRa of the models' logits over the whole vocabulary, as sampled; not
  renormalised. `dera_from_conditionals` instead mixes conditionals over the set.
  """
  return _batched_scores(lambda enc, tgt: realigner.score(enc, tgt, lam),
                         prompts, responses, batch_size)


def fit_by_exact_gradient(model: models_base.EncoderDecoderModel, params, world: World,
                          logp_target, *, steps: int, learning_rate: float,
                          eval_every: int = 0) -> tuple[object, list[list[float]]]:
  """The trainers' problem without sampling noise: Adam, its rate decayed to 0 by a
  cosine over `steps`, on the exact KL(pi_theta || target) over the whole set (every
  prompt and response in every step; pi_theta as `KLToOptimum` measures it: PAD
  excluded, renormalised over the set).

  A trainer near this curve at the same step count is limited by optimisation, not by
  a defect. Returns (params, [[step, KL], ...]) with the KL every `eval_every` steps
  (0: the first and last only), KL in nats per prompt.
  """
  import optax  # pylint: disable=g-import-not-at-top
  target = jnp.asarray(_check_normalised(logp_target, "logp_target"), jnp.float32)
  p, n = target.shape
  if p != len(world.prompts) or n != len(world.responses):
    raise ValueError(f"logp_target is {target.shape}; the world has {len(world.prompts)} "
                     f"prompts and {len(world.responses)} responses.")
  if steps < 1 or not learning_rate > 0:
    raise ValueError(f"steps must be >= 1 and learning_rate > 0, got {steps}, {learning_rate}.")
  enc = jnp.asarray(np.repeat(world.prompts, n, axis=0), jnp.int32)
  tgt = jnp.asarray(np.tile(world.responses, (p, 1)), jnp.int32)

  def kl_to_target(params):
    logp = _scores(model, params, enc, tgt, True).reshape(p, n)
    logp = logp - jax.nn.logsumexp(logp, axis=1, keepdims=True)
    return jnp.mean(jnp.sum(jnp.exp(logp) * (logp - target), axis=1))

  optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

  @jax.jit
  def update(params, opt_state):
    loss, grads = jax.value_and_grad(kl_to_target)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, curve = optimizer.init(params), []
  for step in range(steps):
    params, opt_state, loss = update(params, opt_state)
    if step == 0 or (eval_every and step % eval_every == 0):
      curve.append([step, float(loss)])  # the KL before this step's update
  curve.append([steps, float(jax.jit(kl_to_target)(params))])
  return params, curve


# ----------------------------------------------------------------------------- distributions

def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
  """float64 logsumexp; -inf when every entry is -inf."""
  m = np.max(x, axis=axis, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    return np.log(np.sum(np.exp(x - m), axis=axis)) + np.squeeze(m, axis)


def _table(logp, name: str) -> np.ndarray:
  table = np.asarray(logp, np.float64)
  if table.ndim != 2:
    raise ValueError(f"{name} must be a [prompts, responses] table, got shape {table.shape}.")
  if np.any(np.isnan(table)) or np.any(table == np.inf):
    raise ValueError(f"{name} holds NaN or +inf log-probabilities.")
  return table


def renormalize(logp) -> tuple[np.ndarray, np.ndarray]:
  """Conditions a table on the set: (logp - log mass, missing mass 1 - mass per prompt [P])."""
  table = _table(logp, "logp")
  log_mass = _logsumexp(table)
  if np.any(np.isneginf(log_mass)):
    raise ValueError("logp gives zero mass to every response of a prompt; nothing to "
                     "renormalise.")
  return table - log_mass[:, None], -np.expm1(log_mass)


def _check_normalised(logp, name: str) -> np.ndarray:
  table = _table(logp, name)
  mass = np.exp(_logsumexp(table))
  if np.any(np.abs(mass - 1.0) > NORMALISED_ATOL):
    raise ValueError(f"{name} sums to {mass.min():.6g}..{mass.max():.6g} per prompt, not 1: "
                     "renormalise it over the set first (exact.renormalize).")
  return table


def _per_response(values, shape: tuple[int, int], name: str) -> np.ndarray:
  """[N] or [P, N] finite values, broadcast to [P, N]."""
  v = np.asarray(values, np.float64)
  if v.shape not in {shape, shape[1:]} or not np.all(np.isfinite(v)):
    raise ValueError(f"{name} must be finite, of shape {shape} or {shape[1:]}, got {v.shape}.")
  return np.broadcast_to(v, shape)


def optimal_policy(logp_ref, rewards, beta: float) -> np.ndarray:
  """log pi*(beta) = log pi_ref + r / beta - log Z_beta, per prompt over the set: [P, N].

  `logp_ref` need not be normalised (the optimum is over the set either way);
  `rewards` are [N] (one per response) or [P, N].
  """
  beta = float(beta)
  if not beta > 0 or not np.isfinite(beta):
    raise ValueError(f"beta must be a positive finite KL strength, got {beta}.")
  table = _table(logp_ref, "logp_ref")
  tilted = table + _per_response(rewards, table.shape, "rewards") / beta
  return tilted - _logsumexp(tilted)[:, None]


def geometric_mixture(logp_ref, logp_aligned, lam: float) -> np.ndarray:
  """The realigned model of paper eq. 5: pi_ref^(1-lam) pi_aligned^lam / Z, over the set.

  For pi_aligned = pi*(beta) this is exactly pi*(beta / lam).
  """
  lam = float(lam)
  if not np.isfinite(lam):
    raise ValueError(f"lam must be finite, got {lam}.")
  ref, al = _table(logp_ref, "logp_ref"), _table(logp_aligned, "logp_aligned")
  if ref.shape != al.shape:
    raise ValueError(f"logp_ref {ref.shape} and logp_aligned {al.shape} differ in shape.")
  mixed = _weighted(1 - lam, ref) + _weighted(lam, al)
  return mixed - _logsumexp(mixed)[:, None]


def _weighted(w: float, logp: np.ndarray) -> np.ndarray:
  """w * logp with 0 * -inf = 0 (a weight of zero drops the model)."""
  return np.zeros_like(logp) if w == 0 else w * logp


@dataclasses.dataclass(frozen=True)
class PerPrompt:
  """A measure per prompt [P] and its mean over prompts."""
  per_prompt: np.ndarray

  @property
  def mean(self) -> float:
    return float(np.mean(self.per_prompt))


def kl(logp, logq) -> PerPrompt:
  """KL(p || q) in nats over the set; both tables normalised per prompt."""
  p, q = _check_normalised(logp, "logp"), _check_normalised(logq, "logq")
  if p.shape != q.shape:
    raise ValueError(f"logp {p.shape} and logq {q.shape} differ in shape.")
  with np.errstate(invalid="ignore"):
    terms = np.where(np.isneginf(p), 0.0, np.exp(p) * (p - q))
  return PerPrompt(np.sum(terms, axis=-1))


def tv(logp, logq) -> PerPrompt:
  """Total variation 0.5 sum |p - q| over the set; both tables normalised per prompt."""
  p, q = _check_normalised(logp, "logp"), _check_normalised(logq, "logq")
  if p.shape != q.shape:
    raise ValueError(f"logp {p.shape} and logq {q.shape} differ in shape.")
  return PerPrompt(0.5 * np.sum(np.abs(np.exp(p) - np.exp(q)), axis=-1))


def expected(logp, values) -> PerPrompt:
  """E_p[values] per prompt; `values` [N] or [P, N] (a reward, a length, ...)."""
  p = _check_normalised(logp, "logp")
  return PerPrompt(np.sum(np.exp(p) * _per_response(values, p.shape, "values"), axis=-1))


# ----------------------------------------------------------------------------- token level

@dataclasses.dataclass(frozen=True)
class PrefixTree:
  """The prefixes of a response set. Prefix 0 is the empty one; prefix e >= 1 is a
  non-empty prefix, reached from prefix `parent[e]` by one token.

  responses: [N, L] int32.
  prefix: [N, L] id of y_{<=t} for each response position t; 0 at PAD positions.
  parent: [E + 1] id of each prefix's parent (parent[0] = 0).
  """
  responses: np.ndarray
  prefix: np.ndarray
  parent: np.ndarray

  @property
  def num_prefixes(self) -> int:
    return self.parent.shape[0]

  @classmethod
  def build(cls, responses, eos_id: int = EOS_ID) -> "PrefixTree":
    tokens = check_responses(responses, eos_id)
    ids: dict[tuple, int] = {(): 0}
    parent = [0]
    prefix = np.zeros(tokens.shape, np.int64)
    for n, row in enumerate(tokens.tolist()):
      last = 0
      for t, token in enumerate(row):
        if token == PAD_ID:
          break
        key = tuple(row[:t + 1])
        if key not in ids:
          ids[key] = len(parent)
          parent.append(last)
        last = prefix[n, t] = ids[key]
    return cls(tokens, prefix, np.asarray(parent, np.int64))

  def _positions(self) -> tuple[np.ndarray, np.ndarray]:
    """(response index, prefix id) of every non-PAD position."""
    n, t = np.nonzero(self.prefix)
    return n, self.prefix[n, t]


def _segment_logsumexp(values: np.ndarray, segments: np.ndarray, num: int) -> np.ndarray:
  """logsumexp of values [P, M] grouped by segments [M] in [0, num): [P, num]."""
  vt = np.ascontiguousarray(values.T)
  top = np.full((num, values.shape[0]), -np.inf)
  np.maximum.at(top, segments, vt)
  top = np.where(np.isfinite(top), top, 0.0)
  total = np.zeros_like(top)
  np.add.at(total, segments, np.exp(vt - top[segments]))
  with np.errstate(divide="ignore"):
    return (np.log(total) + top).T


@dataclasses.dataclass(frozen=True)
class Conditionals:
  """pi(y_t | x, y_<t) of a sequence distribution over a response set.

  log_cond: [P, E + 1]: for prefix e >= 1, log pi(last token of e | x, parent of e);
    column 0 (the empty prefix) is 0. Siblings (prefixes sharing a parent) sum to one.
  """
  tree: PrefixTree
  log_cond: np.ndarray

  def per_token(self) -> np.ndarray:
    """[P, N, L] log pi(y_t | x, y_<t) of each response's tokens; 0 at PAD positions."""
    return self.log_cond[:, self.tree.prefix]

  def sequence_logprobs(self) -> np.ndarray:
    """sum_t log pi(y_t | x, y_<t): [P, N], the distribution recomposed."""
    return self.per_token().sum(axis=-1)


def _tree(responses: Union[PrefixTree, np.ndarray]) -> PrefixTree:
  return responses if isinstance(responses, PrefixTree) else PrefixTree.build(responses)


def token_conditionals(logp_seq, responses: Union[PrefixTree, np.ndarray]) -> Conditionals:
  """The token conditionals of a sequence distribution over the set: each is the mass of
  the completions of y_{<=t} over the mass of the completions of y_<t.

  A table that does not sum to one is taken renormalised over the set (the empty
  prefix's mass cancels); the product of the conditionals is then the renormalised
  table. A prefix whose completions all have probability 0 gets conditionals of -inf.

  Args:
    logp_seq: [P, N] log-probabilities of the responses.
    responses: the [N, L] responses (or their `PrefixTree`, built once for many calls).
  """
  tree = _tree(responses)
  table = _table(logp_seq, "logp_seq")
  if table.shape[1] != tree.responses.shape[0]:
    raise ValueError(f"logp_seq has {table.shape[1]} columns for "
                     f"{tree.responses.shape[0]} responses.")
  n, e = tree._positions()
  log_mass = _segment_logsumexp(table[:, n], e, tree.num_prefixes)
  log_mass[:, 0] = _logsumexp(table)
  parent_mass = log_mass[:, tree.parent]
  with np.errstate(invalid="ignore"):
    log_cond = np.where(np.isneginf(parent_mass), -np.inf, log_mass - parent_mass)
  log_cond[:, 0] = 0.0
  return Conditionals(tree, log_cond)


def dera_from_conditionals(cond_ref: Conditionals, cond_aligned: Conditionals,
                           lam: float) -> np.ndarray:
  """DeRa (paper eq. 6/9) applied to conditionals: log q_lam over the set, [P, N].

  Each step samples from softmax(lam log c_aligned + (1 - lam) log c_ref) over the next
  tokens that exist in the set (the siblings of a prefix), so q_lam sums to one over the
  set; lam = 1 gives the aligned distribution and lam = 0 the reference.
  """
  lam = float(lam)
  if not np.isfinite(lam):
    raise ValueError(f"lam must be finite, got {lam}.")
  tree = cond_ref.tree
  if cond_aligned.tree is not tree and not (
      cond_aligned.tree.responses.shape == tree.responses.shape
      and np.array_equal(cond_aligned.tree.responses, tree.responses)):
    raise ValueError("cond_ref and cond_aligned are over different response sets.")
  if cond_ref.log_cond.shape != cond_aligned.log_cond.shape:
    raise ValueError(f"cond_ref covers {cond_ref.log_cond.shape[0]} prompts and cond_aligned "
                     f"{cond_aligned.log_cond.shape[0]}.")
  if not 0 <= lam <= 1 and (np.any(np.isneginf(cond_ref.log_cond)) or
                            np.any(np.isneginf(cond_aligned.log_cond))):
    raise ValueError(f"lam={lam} extrapolates past the models, which needs every conditional "
                     "positive; some are 0.")
  mixed = _weighted(1 - lam, cond_ref.log_cond) + _weighted(lam, cond_aligned.log_cond)
  edges = np.arange(1, tree.num_prefixes)
  log_z = _segment_logsumexp(mixed[:, edges], tree.parent[edges], tree.num_prefixes)
  step = mixed - log_z[:, tree.parent]
  step[:, 0] = 0.0
  return Conditionals(tree, step).sequence_logprobs()


def random_policy(responses: Union[PrefixTree, np.ndarray], num_prompts: int, *,
                  seed: int = 0, scale: float = 1.0) -> np.ndarray:
  """A known autoregressive distribution over the set, different per prompt: [P, N].

  Each prefix's next-token logits are N(0, scale^2), seeded; so a model trained on
  its samples has a non-trivial reference to learn.
  """
  tree = _tree(responses)
  logits = scale * np.random.default_rng(seed).standard_normal((num_prompts, tree.num_prefixes))
  edges = np.arange(1, tree.num_prefixes)
  log_z = _segment_logsumexp(logits[:, edges], tree.parent[edges], tree.num_prefixes)
  log_cond = logits - log_z[:, tree.parent]
  log_cond[:, 0] = 0.0
  return Conditionals(tree, log_cond).sequence_logprobs()


# ----------------------------------------------------------------------------- sampling

def sample_responses(logp, num_per_prompt: int, *, seed: int = 0) -> np.ndarray:
  """Exact draws from a normalised table: [P, num_per_prompt] response indices."""
  table = _check_normalised(logp, "logp")
  rng = np.random.default_rng(seed)
  cdf = np.cumsum(np.exp(table), axis=-1)
  u = rng.uniform(size=(table.shape[0], int(num_per_prompt))) * cdf[:, -1:]
  index = np.stack([np.searchsorted(c, row, side="right") for c, row in zip(cdf, u)])
  return np.minimum(index, table.shape[1] - 1)


def preference_pairs(logp, rewards, num_per_prompt: int, *,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Pairs of draws from `logp`, labelled by Bradley-Terry on `rewards`.

  The first response is preferred with probability sigmoid(r_a - r_b) (noisy labels, so
  the Bradley-Terry reward has a finite fit and DPO a beta-dependent optimum).

  Returns:
    (chosen, rejected): [P, num_per_prompt] response indices each.
  """
  table = _check_normalised(logp, "logp")
  r = _per_response(rewards, table.shape, "rewards")
  draws = sample_responses(table, 2 * int(num_per_prompt), seed=seed)
  a, b = draws[:, 0::2], draws[:, 1::2]
  rows = np.arange(table.shape[0])[:, None]
  margin = r[rows, a] - r[rows, b]
  first = np.random.default_rng([seed, 1]).uniform(size=a.shape) < 1 / (1 + np.exp(-margin))
  return np.where(first, a, b), np.where(first, b, a)


def sir_distribution(logq, logp_target, num_candidates: int, *, num_draws: int = 4096,
                     seed: int = 0) -> np.ndarray:
  """The output distribution of importance resampling (`Realigner.resample`): [P, N].

  N candidates are drawn from q and one kept with probability proportional to
  w = p_target / q, so

    P(y) = N q(y) E[w(y) / (w(y) + S)],  S = sum of w over N - 1 other draws from q.

  The expectation is averaged over `num_draws` seeded draws of S, shared by all y
  (Rao-Blackwellised: far less noisy than counting resampled responses), then the
  table is renormalised. Exact for N = 1 (P = q); tends to p_target as N grows.
  """
  q = _check_normalised(logq, "logq")
  target = _check_normalised(logp_target, "logp_target")
  if q.shape != target.shape:
    raise ValueError(f"logq {q.shape} and logp_target {target.shape} differ in shape.")
  if num_candidates < 1:
    raise ValueError(f"num_candidates must be >= 1, got {num_candidates}.")
  with np.errstate(invalid="ignore"):
    log_w = np.where(np.isneginf(q), -np.inf, target - q)
  w = np.exp(log_w - np.max(log_w, axis=-1, keepdims=True))  # in [0, 1]; ratios unchanged
  others = sample_responses(q, (num_candidates - 1) * num_draws, seed=seed)
  out = np.empty_like(q)
  for p in range(q.shape[0]):
    s = w[p, others[p]].reshape(num_draws, num_candidates - 1).sum(-1)  # [M]
    denom = w[p][None, :] + s[:, None]  # [M, N_set]
    with np.errstate(invalid="ignore", divide="ignore"):
      share = np.where(denom > 0, w[p][None, :] / denom, 0.0).mean(0)
    with np.errstate(divide="ignore"):
      out[p] = np.log(num_candidates * share) + q[p]
  return renormalize(out)[0]


# ----------------------------------------------------------------------------- DeRa's error

def realignment_errors(logp_ref, rewards, beta: float, lams: Iterable[float],
                       responses: Union[PrefixTree, np.ndarray], *,
                       num_candidates: Iterable[int] = (),
                       num_draws: int = 4096, seed: int = 0) -> list[dict]:
  """DeRa's own approximation error at the exact optimum, one row per lam.

  DeRa_lam is applied to the token conditionals of pi_ref and of pi*(beta) and compared
  with pi*(beta / lam), which the exact geometric mixture equals. Per row (means over
  prompts): kl_dera = KL(DeRa_lam || pi*(beta/lam)), tv_dera, reward_optimum and
  reward_dera (expected rewards), kl_optimum_ref = KL(pi*(beta/lam) || pi_ref), and
  kl_sir[N] for importance-resampled DeRa with N candidates.
  """
  tree = _tree(responses)
  ref = renormalize(logp_ref)[0]
  r = _per_response(rewards, ref.shape, "rewards")
  c_ref = token_conditionals(ref, tree)
  c_opt = token_conditionals(optimal_policy(ref, r, beta), tree)
  rows = []
  for lam in lams:
    lam = float(lam)
    if not lam > 0:
      raise ValueError(f"lam must be positive (beta / lam is the KL strength), got {lam}.")
    optimum = optimal_policy(ref, r, beta / lam)
    dera_q = dera_from_conditionals(c_ref, c_opt, lam)
    rows.append({
        "lam": lam, "beta_over_lam": beta / lam,
        "kl_dera": kl(dera_q, optimum).mean, "tv_dera": tv(dera_q, optimum).mean,
        "reward_optimum": expected(optimum, r).mean, "reward_dera": expected(dera_q, r).mean,
        "kl_optimum_ref": kl(optimum, ref).mean,
        "kl_sir": {int(n): kl(sir_distribution(dera_q, optimum, int(n), num_draws=num_draws,
                                               seed=seed), optimum).mean
                   for n in num_candidates},
    })
  return rows


# ----------------------------------------------------------------------------- training hook

def save_tables(path: str, world: World, logp_ref, rewards: dict[str, np.ndarray]) -> None:
  """A world, its reference table [P, N] (normalised) and named rewards [N] or [P, N],
  as one .npz file (what `KLToOptimum` reads)."""
  from deranj.data import files  # pylint: disable=g-import-not-at-top
  with files.atomic_write(path, "wb") as f:
    np.savez(f, prompts=world.prompts, responses=world.responses,
             content_ids=np.asarray(world.content_ids), eos_id=world.eos_id,
             logp_ref=_check_normalised(logp_ref, "logp_ref"),
             **{f"reward_{k}": np.asarray(v, np.float64) for k, v in rewards.items()})


def load_tables(path: str) -> tuple[World, np.ndarray, dict[str, np.ndarray]]:
  """(world, logp_ref, rewards) as `save_tables` wrote them."""
  with np.load(path) as data:
    world = World(data["prompts"], data["responses"],
                  tuple(int(i) for i in data["content_ids"]), int(data["eos_id"]))
    rewards = {k[len("reward_"):]: data[k] for k in data.files if k.startswith("reward_")}
    return world, data["logp_ref"], rewards


@gin.configurable
class KLToOptimum:
  """A `train.eval_hook`: the exact KL(pi_trained || pi*(beta)) over the world.

  pi_trained is the model's sampling distribution (PAD excluded) over the world's
  responses, renormalised over the set (`missing_mass`, what falls outside, is
  reported: 0 up to float error in a closed world); pi*(beta) is the optimum of
  `reward` (a name in the tables file) against the tables' reference.
  Metrics: exact/kl_to_optimum (mean over prompts), exact/kl_to_optimum_max,
  exact/kl_to_ref, exact/reward (expected), exact/missing_mass (max over prompts).
  Each call also appends a JSON line to `log_file` when given (for plots).
  """

  def __init__(self, model: models_base.EncoderDecoderModel = gin.REQUIRED,
               tables: str = gin.REQUIRED, reward: str = gin.REQUIRED,
               beta: float = gin.REQUIRED, log_file: Optional[str] = None,
               batch_size: int = 2048):
    self.world, self.logp_ref, rewards = load_tables(tables)
    if reward not in rewards:
      raise ValueError(f"KLToOptimum.reward={reward!r} is not in {tables} (has "
                       f"{sorted(rewards)}).")
    self.model, self.rewards, self.beta = model, rewards[reward], float(beta)
    self.optimum = optimal_policy(self.logp_ref, self.rewards, self.beta)
    self.log_file, self.batch_size = log_file, batch_size

  def table(self, params) -> tuple[np.ndarray, np.ndarray]:
    """(renormalised log pi [P, N], missing mass [P]) of the model at `params`."""
    return renormalize(sequence_logprobs(self.model, params, self.world.prompts,
                                         self.world.responses, exclude_pad=True,
                                         batch_size=self.batch_size))

  def __call__(self, params, step: int) -> dict[str, float]:
    logp, missing = self.table(params)
    to_opt = kl(logp, self.optimum)
    metrics = {"exact/kl_to_optimum": to_opt.mean,
               "exact/kl_to_optimum_max": float(np.max(to_opt.per_prompt)),
               "exact/kl_to_ref": kl(logp, self.logp_ref).mean,
               "exact/reward": expected(logp, self.rewards).mean,
               "exact/missing_mass": float(np.max(missing))}
    if self.log_file:
      import json  # pylint: disable=g-import-not-at-top
      with open(self.log_file, "a") as f:
        f.write(json.dumps({"step": int(step), **metrics}) + "\n")
    return metrics
