"""Decoding from M autoregressive models with a pluggable step rule (T5X's decoding.py style).

The loop is one `lax.while_loop` over a pure function of `SamplingState`. Models are
reached only through a `tokens_to_logits(tokens [B], caches) -> (logits [M, B, V],
caches)` callback, so this module knows nothing of T5. At each step a *rule* (in the
spirit of T5X's `logit_callback_fn`) maps the models' float32 logits, its per-row
parameters and a key to the emitted token and the log-probabilities of the distribution
it used; the loop keeps tokens, EOS, lengths and the statistics below. Rules are frozen
dataclasses, static under jit: one compilation per rule, any values of its parameters.

  GeometricMixture (DeRa, Liu et al. 2024, eq. 9), parameters weights [B, M]:
      q_t = softmax(sum_m w_m h_m), e.g. softmax(lam * h_aligned + (1 - lam) * h_ref);
      sampled, or greedy at temperature 0, after top-k/top-p.
  AlignmentAware (AAD, Berdoz et al. 2025), parameters alpha [B], models (ref, aligned):
      greedy: argmax over V_alpha = {v : p_al(v) >= alpha max_u p_al(u)} of
      log p_al(v) - log p_ref(v) (`aad_select`); at temperature tau > 0, a draw from
      softmax((log p_al - log p_ref) / tau) restricted to V_alpha.

Per sequence the loop accumulates, over emitted tokens (EOS included, nothing after it):
  logq        log-probability under the distribution the rule used (after temperature
              and top-k/top-p; 0 for greedy decoding);
  logp        [B, M] each model's own log-probability of the sequence, as that model
              samples alone (PAD excluded, temperature 1);
  log_weight  geometric mixture only (None for other rules): sum_t log Z_t with
              Z_t = sum_{v != PAD} prod_m p_m,t(v)^w_m, the per-token normalisers. At
              temperature 1 with no filtering, exp(log_weight) is proportional to
              (exact mixture)/(q), the importance weight used by
              sampling-importance-resampling;
  kl_ref      sum_t KL(q_t || p_ref,t), exact over the vocabulary (model 0 is the
              reference).
Models' distributions p_m,t are as they sample alone (PAD excluded), so lam = 0 gives
logq = logp_ref and kl_ref = 0, and SIR's target is the mixture of what each model draws.

PAD (id `pad_id`: the model's, 0 for T5) is never emitted by any rule: it would end a
response without EOS and punch a hole in the response mask. Every rule (greedy included)
works with PAD's logit at NEG_INF (probability 0), and Z_t sums over the same support, so
the importance weights stay exact for the distribution actually sampled. A negative
`pad_id` (a vocabulary without PAD, `models.base.NO_PAD`) masks nothing; it still fills
the tokens after EOS.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp

from deranj.models import base as models_base

Array = jax.Array
NEG_INF = -1e10


def dera_logits(ref_logits: Array, aligned_logits: Array, lam) -> Array:
  """lam * aligned + (1 - lam) * ref; `lam` a scalar or one value per row [B].

  Written this way, lam=0 returns the reference logits bit for bit and lam=1 the
  aligned ones.
  """
  lam = jnp.asarray(lam, ref_logits.dtype)
  if lam.ndim == 1:
    lam = lam.reshape((-1,) + (1,) * (ref_logits.ndim - 1))
  return lam * aligned_logits + (1 - lam) * ref_logits


def mixture_logits(logits: Array, weights: Array) -> Array:
  """sum_m weights[:, m] * logits[m]: [M, B, V], [B, M] -> [B, V].

  With M = 2 and weights (1 - lam, lam) this equals `dera_logits` bit for bit.
  """
  mixed = weights[:, 0, None] * logits[0]
  for m in range(1, logits.shape[0]):
    mixed = mixed + weights[:, m, None] * logits[m]
  return mixed


def filter_logits(logits: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Sets logits outside the top-k / top-p (nucleus) set to NEG_INF; [B, V] -> [B, V]."""
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum_probs = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
    cutoff_index = jnp.sum(cum_probs < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, NEG_INF, logits)
  return logits


def mask_pad(logits: Array, pad_id: int) -> Array:
  """PAD's logit set to NEG_INF (no id masked when pad_id < 0); [..., V] -> [..., V].

  NEG_INF, not -inf: its probability is exactly 0 in float32 while log-probabilities stay
  finite, so a masked-out PAD position times a zero loss weight is 0, not NaN.
  """
  if pad_id < 0:
    return logits
  return logits.at[..., pad_id].set(NEG_INF)


def sampled_token_logprobs(model: models_base.Model, params, prompts: Array,
                           responses: Array) -> tuple[Array, Array]:
  """Teacher-forced log-probabilities of the distribution `sample` draws from (PAD's
  logit masked, as it is never emitted): ([B, T], 0 on padding; logits [B, T, V], PAD
  masked). `prompts` [B, S], or [B / N, S] for N adjacent responses per prompt."""
  batch = models_base.response_batch(prompts, responses)
  logits = mask_pad(model.logits(params, batch), model.pad_id)
  return models_base.masked_log_likelihood(
      logits, responses, models_base.loss_weights(batch, model.pad_id)), logits


CDF_BLOCK = 128  # sample_from_probs' block of ids


def sample_from_probs(rng: Array, probs: Array) -> Array:
  """One draw per row of [B, V] probabilities by inverting the CDF.

  One uniform per row instead of Gumbel noise over the whole vocabulary: the same
  distribution at a fraction of the random bits (which dominate on CPU at V = 32k).
  The CDF is inverted in two levels, as a prefix sum over the whole vocabulary costs
  XLA:CPU several passes (a reduce-window tree): the block of CDF_BLOCK ids holding u
  from the blocks' sums, then the id within that block. A zero-probability id is never
  drawn: neither a block of zero mass nor, within a block, an id whose CDF equals the one
  before it can be the first to reach u.
  """
  *lead, vocab = probs.shape
  blocks = -(-vocab // CDF_BLOCK)
  padded = jnp.pad(probs, [(0, 0)] * len(lead) + [(0, blocks * CDF_BLOCK - vocab)])
  padded = padded.reshape(*lead, blocks, CDF_BLOCK)
  block_cdf = jnp.cumsum(jnp.sum(padded, axis=-1), axis=-1)  # [..., blocks]
  # u in (0, total]: (1 - uniform) <= 1, so u never exceeds the last block's CDF.
  u = (1.0 - jax.random.uniform(rng, tuple(lead) + (1,))) * block_cdf[..., -1:]
  block = jnp.sum(block_cdf < u, axis=-1, keepdims=True)  # first with CDF >= u
  before = jnp.take_along_axis(jnp.pad(block_cdf, [(0, 0)] * len(lead) + [(1, 0)]), block,
                               axis=-1)
  inner = jnp.take_along_axis(padded, block[..., None], axis=-2)[..., 0, :]  # [..., BLOCK]
  index = jnp.sum(jnp.cumsum(inner, axis=-1) < u - before, axis=-1, keepdims=True)
  # Rounding may put u - before past the block's own sum: its last nonzero id then.
  last = jnp.max(jnp.where(inner > 0, jnp.arange(CDF_BLOCK), 0), axis=-1, keepdims=True)
  return (block * CDF_BLOCK + jnp.minimum(index, last))[..., 0]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static settings of one compiled sampler."""
  max_decode_len: int
  eos_id: int = 1
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0  # 0 = full vocabulary
  top_p: float = 1.0
  pad_id: int = 0  # never sampled, fills rows after EOS; < 0 allows every id

  def __post_init__(self):
    if self.max_decode_len < 1:
      raise ValueError(f"max_decode_len must be >= 1, got {self.max_decode_len}.")
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}.")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")


@flax.struct.dataclass
class SamplingState:
  step: Array  # [] int32, next position to write
  last_token: Array  # [B] int32, fed to the models at this step
  tokens: Array  # [B, T] int32
  ended: Array  # [B] bool
  caches: Any  # one decoding cache per model
  logq: Array  # [B]
  logp: Array  # [B, M]
  log_weight: Optional[Array]  # [B]; None when the rule has no log Z_t
  kl_ref: Array  # [B]
  lengths: Array  # [B] int32


@flax.struct.dataclass
class MixtureSamples:
  tokens: Array  # [B, T], pad_id after EOS
  lengths: Array  # [B], tokens emitted, EOS included
  logq: Array  # [B]
  logp: Array  # [B, M]
  log_weight: Optional[Array]  # [B]; None for rules other than the geometric mixture
  kl_ref: Array  # [B]


TokensToLogits = Callable[[Array, Any], tuple[Array, Any]]


class RuleStep(NamedTuple):
  """What a rule returns at one step."""
  token: Array  # [B] int32, never PAD
  logq: Array  # [B, V] log-probabilities of the distribution used (0 / -inf if greedy)
  log_z: Optional[Array] = None  # [B] log Z_t, for rules that have one


def _one_hot_logq(token: Array, vocab: int) -> Array:
  """The log-probabilities of a greedy choice: 0 at `token`, -inf elsewhere."""
  return jnp.where(jax.nn.one_hot(token, vocab, dtype=bool), 0.0, -jnp.inf)


def _draw(logits: Array, rng: Array, config: SamplingConfig) -> tuple[Array, Array]:
  """(token [B], log q [B, V]): a draw from softmax(logits / T) after top-k/top-p."""
  scaled = filter_logits(logits / config.temperature, config.top_k, config.top_p)
  q_logp = jax.nn.log_softmax(scaled, axis=-1)  # [B, V]
  return sample_from_probs(rng, jnp.exp(q_logp)), q_logp


@dataclasses.dataclass(frozen=True)
class GeometricMixture:
  """DeRa's rule: q_t = softmax(sum_m w_m h_m); parameters: weights [B, M].

  With M = 2 and weights (1 - lam, lam) this is eq. 9. Its log Z_t is the normaliser
  of prod_m p_m^w_m over the sampled support (see `log_weight`).
  """

  def __call__(self, logits: Array, model_logp: Array, weights: Array, rng: Array,
               config: SamplingConfig) -> RuleStep:
    mixed = mask_pad(mixture_logits(logits, weights), config.pad_id)  # [B, V]
    log_z = jax.nn.logsumexp(mask_pad(mixture_logits(model_logp, weights), config.pad_id),
                             axis=-1)  # [B]
    if config.temperature == 0:
      token = jnp.argmax(mixed, axis=-1)
      return RuleStep(token, _one_hot_logq(token, mixed.shape[-1]), log_z)
    token, q_logp = _draw(mixed, rng, config)
    return RuleStep(token, q_logp, log_z)


@dataclasses.dataclass(frozen=True)
class AlignmentAware:
  """AAD's rule over (reference, aligned) models; parameters: alpha [B] in (0, 1].

  Greedy (temperature 0): `aad_select`. Temperature tau > 0: a draw from
  softmax((log p_al - log p_ref) / tau) restricted to V_alpha (then top-k/top-p).
  """

  def __call__(self, logits: Array, model_logp: Array, alpha: Array, rng: Array,
               config: SamplingConfig) -> RuleStep:
    del logits  # the rule reads the models' PAD-free log-probabilities
    if model_logp.shape[0] != 2:
      raise ValueError(f"AlignmentAware needs 2 models (reference, aligned), got "
                       f"{model_logp.shape[0]}.")
    keep, ratio = _aad_candidates(model_logp[0], model_logp[1], alpha)
    if config.temperature == 0:
      token = _aad_argmax(keep, ratio, model_logp[1])
      return RuleStep(token, _one_hot_logq(token, ratio.shape[-1]))
    token, q_logp = _draw(jnp.where(keep, ratio, NEG_INF), rng, config)
    return RuleStep(token, q_logp)


Rule = Callable[..., RuleStep]
MIXTURE = GeometricMixture()
AAD = AlignmentAware()


def _aad_candidates(ref_logp: Array, aligned_logp: Array, alpha) -> tuple[Array, Array]:
  """(V_alpha mask [B, V], log-ratio log p_al - log p_ref [B, V]) from log-probabilities.

  PAD (log-probability ~ NEG_INF) is never in V_alpha for alpha in (0, 1].
  """
  alpha = jnp.asarray(alpha, jnp.float32)
  if alpha.ndim == 1:
    alpha = alpha[:, None]
  # p(v) >= alpha * max p, in logs so that tiny alphas and probabilities do not underflow.
  keep = aligned_logp - jnp.max(aligned_logp, axis=-1, keepdims=True) >= jnp.log(alpha)
  return keep, aligned_logp - ref_logp


def _aad_argmax(keep: Array, ratio: Array, aligned_logp: Array) -> Array:
  """argmax over `keep` of `ratio`, ties broken towards the higher aligned log-probability."""
  restricted = jnp.where(keep, ratio, -jnp.inf)
  best = keep & (restricted == jnp.max(restricted, axis=-1, keepdims=True))
  return jnp.argmax(jnp.where(best, aligned_logp, -jnp.inf), axis=-1)


def aad_select(ref_logits: Array, aligned_logits: Array, alpha, pad_id: int = 0) -> Array:
  """Alignment-aware decoding's choice per row: [B, V], [B, V], alpha [] or [B] -> [B].

  Candidates V_alpha = {v : p_al(v) >= alpha * max_u p_al(u)}; emits the v in V_alpha
  maximising log p_al(v) - log p_ref(v) (the token-level implicit reward, up to beta),
  ties broken towards the higher p_al. Each model's distribution excludes PAD, as the
  sampler's does; alpha = 1 is greedy decoding of the aligned model.
  """
  ref_logp = jax.nn.log_softmax(mask_pad(ref_logits.astype(jnp.float32), pad_id), axis=-1)
  al_logp = jax.nn.log_softmax(mask_pad(aligned_logits.astype(jnp.float32), pad_id), axis=-1)
  keep, ratio = _aad_candidates(ref_logp, al_logp, alpha)
  return _aad_argmax(keep, ratio, al_logp).astype(jnp.int32)


def mixture_sample(tokens_to_logits: TokensToLogits, caches: Any, rule_params: Any, rng: Array,
                   config: SamplingConfig, rule: Rule = MIXTURE) -> MixtureSamples:
  """Decodes one sequence per row with `rule` applied to M models' logits at each step.

  Args:
    tokens_to_logits: (tokens [B], caches) -> (logits [M, B, V], caches).
    caches: the models' decoding caches, batch B.
    rule_params: the rule's per-row parameters, leading axis B: mixing weights [B, M] for
      `GeometricMixture` (model 0 is the reference for `kl_ref`), alpha [B] for
      `AlignmentAware`.
    rng: PRNG key. Step t uses fold_in(rng, t), so a row's tokens depend only on its
      own inputs and parameters, the key and the batch shape.
    config: static settings.
    rule: (logits [M, B, V], model log-probs [M, B, V], rule_params, key, config) ->
      `RuleStep`; hashable (static under jit).
  """
  batch = jax.tree_util.tree_leaves(rule_params)[0].shape[0]
  f32 = jnp.float32
  # Shapes only (nothing runs): M and V, and whether the rule has a log Z_t.
  logits_shape = jax.eval_shape(tokens_to_logits, jnp.zeros((batch,), jnp.int32),
                                caches)[0].shape
  num_models = logits_shape[0]
  probe = jax.ShapeDtypeStruct(logits_shape, f32)
  has_log_z = jax.eval_shape(lambda h, w, key: rule(h, h, w, key, config).log_z, probe,
                             rule_params, rng) is not None

  def cond(state: SamplingState) -> Array:
    return (state.step < config.max_decode_len) & ~jnp.all(state.ended)

  def body(state: SamplingState) -> SamplingState:
    logits, caches = tokens_to_logits(state.last_token, state.caches)  # [M, B, V]
    logits = logits.astype(f32)
    # Each model as it samples alone: PAD excluded.
    model_logp = jax.nn.log_softmax(mask_pad(logits, config.pad_id), axis=-1)  # [M, B, V]
    step = rule(logits, model_logp, rule_params, jax.random.fold_in(rng, state.step), config)
    q_logp = step.logq
    q = jnp.exp(q_logp)
    token = step.token.astype(jnp.int32)
    kl = jnp.sum(jnp.where(q > 0, q * (q_logp - model_logp[0]), 0.0), axis=-1)

    live = ~state.ended
    token = jnp.where(live, token, config.pad_id)
    take = lambda lp: jnp.take_along_axis(lp, token[:, None], axis=-1)[:, 0]
    add = lambda acc, x: acc + jnp.where(live, x, 0.0)
    return SamplingState(
        step=state.step + 1,
        last_token=token,
        tokens=jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], state.step, 1),
        ended=state.ended | (token == config.eos_id),
        caches=caches,
        logq=add(state.logq, take(q_logp)),
        logp=state.logp + jnp.where(live[:, None], jax.vmap(take)(model_logp).T, 0.0),
        log_weight=None if step.log_z is None else add(state.log_weight, step.log_z),
        kl_ref=add(state.kl_ref, kl),
        lengths=state.lengths + live.astype(jnp.int32),
    )

  zeros = jnp.zeros((batch,), f32)
  state = SamplingState(
      step=jnp.array(0, jnp.int32),
      last_token=jnp.zeros((batch,), jnp.int32),  # T5's start token
      tokens=jnp.full((batch, config.max_decode_len), config.pad_id, jnp.int32),
      ended=jnp.zeros((batch,), bool),
      caches=caches,
      logq=zeros, logp=jnp.zeros((batch, num_models), f32),
      log_weight=zeros if has_log_z else None, kl_ref=zeros,
      lengths=jnp.zeros((batch,), jnp.int32))
  state = jax.lax.while_loop(cond, body, state)
  return MixtureSamples(tokens=state.tokens, lengths=state.lengths, logq=state.logq,
                        logp=state.logp, log_weight=state.log_weight, kl_ref=state.kl_ref)


# ----------------------------------------------------------------------------- models


def models_tokens_to_logits(models, params, vocab: Optional[int] = None) -> TokensToLogits:
  """The callback for deranj models: each decodes one step from its own cache. With
  `vocab`, each model's logits are cut to the first `vocab` ids (vocabularies that differ
  only by padding rows). Each model's `step_params` are made here, once, outside the
  sampler's loop."""
  params = [m.step_params(p) for m, p in zip(models, params)]

  def fn(tokens: Array, caches):
    outs = [m.decode_step(p, c, tokens) for m, p, c in zip(models, params, caches)]
    return jnp.stack([o[0][..., :vocab] for o in outs]), tuple(o[1] for o in outs)

  return fn


def init_caches(models, params, prompts: Array, max_decode_len: int, num_decodes: int = 1):
  """Each model encodes prompts [B, S] once; caches are for B * num_decodes rows
  (row-major)."""
  return tuple(m.init_cache(p, prompts, max_decode_len, num_decodes)
               for m, p in zip(models, params))


@functools.partial(jax.jit, static_argnames=("model", "config", "num_decodes"))
def _sample_jit(model, params, prompts, rng, config, num_decodes):
  caches = init_caches((model,), (params,), prompts, config.max_decode_len, num_decodes)
  batch = prompts.shape[0] * num_decodes
  weights = jnp.ones((batch, 1), jnp.float32)
  return mixture_sample(models_tokens_to_logits((model,), (params,)), caches, weights, rng, config)


def sample(model: models_base.EncoderDecoderModel, params, prompts: Array,
           rng: Array, *, max_decode_len: int, eos_id: int = 1, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, num_decodes: int = 1) -> MixtureSamples:
  """Samples from a single model (never its `pad_id`) with the same compiled loop as DeRa.

  Returns `MixtureSamples` with M = 1 (`logp[:, 0]` is the model's log-probability).
  """
  config = SamplingConfig(max_decode_len, eos_id, float(temperature), int(top_k), float(top_p),
                          pad_id=model.pad_id)
  return _sample_jit(model, params, jnp.asarray(prompts, jnp.int32), rng,
                     config=config, num_decodes=int(num_decodes))
