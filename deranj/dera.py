"""Decoding-time realignment: sample, score and resample from realigned models.

The model aligned with KL strength beta/lam is the geometric mixture
pi_ref^(1-lam) * pi_aligned^lam, normalised over sequences (paper eq. 5). DeRa samples
its per-token approximation q_t = softmax(lam h_aligned + (1-lam) h_ref) (eq. 9);
`Realigner.resample` corrects the approximation by sampling-importance-resampling.

    realigner = Realigner(ref_model, ref_params, aligned_model, aligned_params,
                          max_decode_len=64)
    out = realigner.sample(prompts, lam=jnp.array([0., .5, 1., 2.]), rng=key)

`lam` is traced: any number of values, scalar or one per row, share one compilation.
Checkpoints whose vocabularies differ only by padding rows realign over the ids they share
with `shared_vocab=N` (each model's logits cut to [..., :N]).
Several aligned models (paper App. B): pass lists of models and params; `lam` is then
[K] or [B, K] and the reference gets 1 - sum(lam).

Alignment-aware decoding (AAD, Berdoz et al. 2025) uses the same two models: at each
step the token maximising log pi_aligned - log pi_ref among the tokens with
pi_aligned >= alpha * max pi_aligned (`decoding.aad_select`); greedy at temperature 0,
else sampled from the tempered log-ratio restricted to those tokens. `alpha` is traced
like `lam`:

    out = realigner.sample(prompts, rule="aad", alpha=jnp.array([.05, .1, .2]),
                           temperature=0.0)

Best-of-N draws N candidates per prompt in one call and keeps the best by a scorer
((prompts, samples) -> [B*N] scores), e.g. the DPO implicit reward of the whole
sequence or the exact-mixture weight:

    best = realigner.best_of_n(prompts, 8, implicit_reward_scorer(beta=0.1), key, lam=1.0)

EFT (Mitchell et al. 2024) / proxy tuning (A. Liu et al. 2024) is the K-model mixture with a
small tuned pair steering a large base model. Reference = the small SFT model, aligned
models = [small DPO model, large base model], lam = (1, 1): the reference gets weight
1 - 2 = -1, so per token

    h = h_large + h_small_dpo - h_small_ref,  q_t ∝ p_large * p_small_dpo / p_small_ref

(log-softmaxes differ from logits by a per-model constant, so the two forms agree after
normalisation):

    eft = Realigner(small_ref, small_ref_params, [small_dpo, large_base],
                    [small_dpo_params, large_params], max_decode_len=64)
    out = eft.sample(prompts, jnp.array([1.0, 1.0]), key)
    logq = eft.score(prompts, out.tokens, jnp.array([1.0, 1.0]))
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from deranj import decoding
from deranj.models import base as models_base

Array = jax.Array
ModelLike = Any  # a models_base wrapper, or a bare t5 / decoder Transformer (base.as_model)


@flax.struct.dataclass
class RealignedSamples:
  """Samples with per-sequence log-probabilities and weights ([B*N] each unless noted).

  tokens: [B*N, T], the models' pad_id after EOS; rows of one prompt are adjacent
    (b * N + n).
  lengths: tokens emitted, EOS included.
  logq: log-probability under the distribution actually sampled from.
  logp_ref, logp_aligned: each model's own log-probability ([B*N, K] for K > 1 aligned
    models), over ids < shared_vocab when the Realigner has one. None when sampling from
    weight-mixed parameters.
  log_weight: sum_t log Z_t; exp(log_weight) ∝ (exact mixture) / q at temperature 1.
    None for rule="aad" (it samples no geometric mixture).
  kl_ref: sum_t KL(q_t || p_ref,t).
  """
  tokens: Array
  lengths: Array
  logq: Array
  logp_ref: Optional[Array]
  logp_aligned: Optional[Array]
  log_weight: Optional[Array]
  kl_ref: Array


@flax.struct.dataclass
class Resampled:
  """One importance-resampled sequence per prompt ([B] each)."""
  samples: RealignedSamples  # the chosen rows
  index: Array  # chosen candidate per prompt, in [0, N)
  ess: Array  # effective sample size of the N candidates' weights, in [1, N]


@flax.struct.dataclass
class BestOfN:
  """The best-scoring of N candidates per prompt."""
  samples: RealignedSamples  # the chosen rows ([B] each)
  index: Array  # [B] chosen candidate per prompt, in [0, N)
  scores: Array  # [B, N] every candidate's score


RULES = ("dera", "aad")
DEFAULT_ALPHA = 0.1  # the AAD paper's setting throughout

# (prompts [B*N, S], samples with B*N rows) -> [B*N] scores; higher is better.
Scorer = Callable[[Array, RealignedSamples], Array]


def parse_lams(text: str, *, positive: bool = False, flag: str = "--lam") -> list[float]:
  """'0,0.5,1' -> [0.0, 0.5, 1.0], in the order given.

  Values must be finite and distinct; with `positive`, also > 0 (a retrained model at
  beta / lam needs lam > 0). Raises ValueError with a one-line message naming `flag`.
  """
  try:
    lams = [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"{flag}={text!r}: expected comma-separated numbers, e.g. "
                     f"{flag}=0.5,1,2.") from None
  if not lams:
    raise ValueError(f"{flag} is empty: give at least one value, e.g. {flag}=0.5,1,2.")
  bad = [x for x in lams if not np.isfinite(x) or (positive and x <= 0)]
  if bad:
    need = "positive and finite (retraining uses beta / lam)" if positive else "finite"
    raise ValueError(f"{flag}={text!r}: every value must be {need}, got {bad}.")
  twice = sorted({x for x in lams if lams.count(x) > 1})
  if twice:
    raise ValueError(f"{flag}={text!r}: {twice} given more than once.")
  return lams


def parse_alphas(text: str, *, flag: str = "--alpha") -> list[float]:
  """'0.05,0.1' -> [0.05, 0.1]: distinct values in (0, 1], in the order given.

  Raises ValueError with a one-line message naming `flag`.
  """
  alphas = parse_lams(text, flag=flag)
  bad = [x for x in alphas if not 0 < x <= 1]
  if bad:
    raise ValueError(f"{flag}={text!r}: every value must be in (0, 1], got {bad}.")
  return alphas


def _check_finite(lam) -> np.ndarray:
  lam = np.asarray(lam, np.float32)
  if not np.all(np.isfinite(lam)):
    raise ValueError(f"lam must be finite, got {np.unique(lam[~np.isfinite(lam)]).tolist()}.")
  return lam


def _check_alpha(alpha) -> np.ndarray:
  alpha = np.asarray(alpha, np.float32)
  bad = ~((alpha > 0) & (alpha <= 1))  # NaN fails both
  if np.any(bad):
    raise ValueError(f"alpha must be in (0, 1] (the share of the aligned model's top "
                     f"probability a candidate needs), got {np.unique(alpha[bad]).tolist()}.")
  return alpha


def _rows(value: np.ndarray, name: str, batch: int, num_decodes: int, trailing: tuple,
          note: str = "") -> np.ndarray:
  """`value` given once ([*trailing]), per prompt ([B, *trailing]) or per output row
  ([B*N, *trailing]) -> [B*N, *trailing]."""
  rows = batch * num_decodes
  lead = value.shape[:value.ndim - len(trailing)]
  if value.ndim < len(trailing) or value.shape[len(lead):] != trailing or lead not in {
      (), (batch,), (rows,)}:
    inner = [", ".join(map(str, trailing))] if trailing else []
    form = lambda first: "[" + ", ".join(first + inner) + "]"
    per = [str(batch)] + ([str(rows)] if num_decodes > 1 else [])
    shapes = [form([]) if trailing else "[] (a scalar)"] + [form([p]) for p in per]
    raise ValueError(f"{name} must have shape {' or '.join(shapes)} ({note}{batch} prompts, "
                     f"{num_decodes} decodes each), got {value.shape}.")
  if lead == (batch,) and num_decodes > 1:
    value = np.repeat(value, num_decodes, axis=0)
  return np.broadcast_to(value, (rows,) + trailing)


class Realigner:
  """A reference model and one or more aligned models, realigned at decoding time.

  Args:
    ref_model, ref_params: the reference (SFT) model.
    aligned_model, aligned_params: the aligned model, or sequences of K aligned models.
    max_decode_len: decoding steps at most.
    eos_id: end-of-sequence id.
    combine: "logits" (DeRa, eq. 9) or "weights": sample from the single model with
      parameters lam * theta + (1 - lam) * theta_ref (paper App. D.5), which needs
      identical shapes, one aligned model and a scalar lam.
    shared_vocab: N for models whose vocabularies differ only by padding rows (e.g. a
      fine-tune resized 151936 -> 151665): every model's logits are cut to ids < N
      before mixing, so samples, scores and each model's log-probabilities are over those
      N ids. N <= every model's vocab_size. None: the vocabularies must be equal.
  """

  def __init__(self, ref_model: ModelLike, ref_params, aligned_model, aligned_params, *,
               max_decode_len: int, eos_id: int = 1, combine: str = "logits",
               shared_vocab: Optional[int] = None):
    many = isinstance(aligned_model, (list, tuple))
    aligned_models = tuple(aligned_model) if many else (aligned_model,)
    aligned_params = tuple(aligned_params) if many else (aligned_params,)
    if len(aligned_models) != len(aligned_params) or not aligned_models:
      raise ValueError(f"got {len(aligned_models)} aligned models and {len(aligned_params)} "
                       "parameter sets; give one set per model.")
    self.models = (models_base.as_model(ref_model),) + tuple(
        models_base.as_model(m) for m in aligned_models)
    self.params = (ref_params,) + aligned_params
    self.num_aligned = len(aligned_models)
    self.many = many
    self.max_decode_len = int(max_decode_len)
    self.eos_id = int(eos_id)
    pads = [m.pad_id for m in self.models]
    if len(set(pads)) != 1:
      raise ValueError(f"the models must share a PAD id: reference pad_id={pads[0]}, aligned "
                       f"pad_id={', '.join(map(str, pads[1:]))}.")
    self.pad_id = pads[0]
    self.shared_vocab = self._check_shared_vocab(shared_vocab)
    if combine not in ("logits", "weights"):
      raise ValueError(f"combine must be 'logits' or 'weights', got {combine!r}.")
    self.combine = combine
    if combine == "weights":
      self._check_same_shapes()

  def _check_shared_vocab(self, shared_vocab: Optional[int]) -> Optional[int]:
    """`shared_vocab` checked against the models' vocabularies, EOS and PAD."""
    vocab = [m.config.vocab_size for m in self.models]
    sizes = (f"reference vocab_size={vocab[0]}, aligned vocab_size="
             f"{', '.join(map(str, vocab[1:]))}")
    if shared_vocab is None:
      if len(set(vocab)) != 1:
        raise ValueError(f"the models must share a vocabulary: {sizes}; if they differ only "
                         f"by padding rows, pass shared_vocab=N (at most {min(vocab)}) to "
                         "realign over ids 0..N-1.")
      return None
    if isinstance(shared_vocab, bool) or not isinstance(shared_vocab, (int, np.integer)):
      raise ValueError(f"shared_vocab must be an integer, got {shared_vocab!r}.")
    n = int(shared_vocab)
    if not 0 < n <= min(vocab):
      raise ValueError(f"shared_vocab={n} must be in 1..{min(vocab)}, the smallest vocabulary "
                       f"({sizes}).")
    for name, token in (("eos_id", self.eos_id), ("pad_id", self.pad_id)):
      if token >= n:
        raise ValueError(f"shared_vocab={n} cuts off {name}={token}: the realigned "
                         f"vocabulary must hold it.")
    return n

  def _check_same_shapes(self):
    if self.num_aligned != 1:
      raise ValueError("combine='weights' mixes one aligned model with the reference.")
    ref, al = self.models[0].config, self.models[1].config
    shapes = lambda p: jax.tree_util.tree_map(jnp.shape, p)
    if ref != al or shapes(self.params[0]) != shapes(self.params[1]):
      raise ValueError("combine='weights' needs two models of identical architecture and "
                       f"parameter shapes; got reference {ref} and aligned {al}.")

  # --------------------------------------------------------------------------- weights

  def _mix_weights(self, lam, batch: int, num_decodes: int = 1) -> Array:
    """User lam -> [batch * num_decodes, 1 + K] weights (reference first).

    lam is given per prompt ([B], or [B, K]), per output row ([B*N], or [B*N, K]), or
    once for all ([] or [K]).
    """
    k = self.num_aligned
    note = f"{k} aligned model{'s' if k > 1 else ''}, "
    lam = _rows(_check_finite(lam), "lam", batch, num_decodes, (k,) if self.many else (),
                note)
    lam = jnp.asarray(lam.reshape(-1, k), jnp.float32)
    return jnp.concatenate([1 - jnp.sum(lam, axis=1, keepdims=True), lam], axis=1)

  def _rule(self, rule: str, lam, alpha, batch: int, num_decodes: int):
    """(the decoding rule, its per-row parameters) for `sample`'s arguments."""
    if rule == "dera":
      if alpha is not None:
        raise ValueError("alpha applies to rule='aad'; rule='dera' takes lam.")
      if lam is None:
        raise ValueError("lam is required for rule='dera' (e.g. lam=1.0 samples the aligned "
                         "model).")
      return decoding.MIXTURE, self._mix_weights(lam, batch, num_decodes)
    if rule == "aad":
      if lam is not None:
        raise ValueError("lam does not apply to rule='aad'; its setting is alpha.")
      if self.num_aligned != 1 or self.combine != "logits":
        raise ValueError("rule='aad' needs exactly one aligned model, combined by logits "
                         f"(got {self.num_aligned} with combine={self.combine!r}).")
      alpha = DEFAULT_ALPHA if alpha is None else alpha
      return decoding.AAD, jnp.asarray(_rows(_check_alpha(alpha), "alpha", batch,
                                             num_decodes, ()), jnp.float32)
    raise ValueError(f"rule must be one of {', '.join(map(repr, RULES))}, got {rule!r}.")

  # --------------------------------------------------------------------------- sample

  def sample(self, prompts, lam=None, rng: Optional[Array] = None, *,
             rule: str = "dera", alpha=None, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, num_decodes: int = 1) -> RealignedSamples:
    """Samples `num_decodes` sequences per prompt from the realigned model.

    Args:
      prompts: [B, S] prompt ids, PAD = the models' pad_id.
      lam: rule="dera" only (required there): scalar, [B] (per prompt) or [B*N] (per
        output row) for one aligned model; [K], [B, K] or [B*N, K] for K aligned models.
        A lam sweep over one batch is `num_decodes=len(lams)` with
        `lam=np.tile(lams, B)`: each prompt is encoded once.
      rng: PRNG key; may be omitted at temperature 0.
      rule: "dera" (the geometric mixture at lam) or "aad" (alignment-aware decoding,
        one aligned model).
      alpha: rule="aad" only: in (0, 1], scalar, [B] or [B*N] like lam (default 0.1).
      temperature: 0 is greedy; for "aad", tau of the tempered log-ratio.
      top_k: 0 keeps the full vocabulary. top_p: nucleus mass. Both filter the
        distribution sampled from (for "aad", after the restriction to V_alpha).
      num_decodes: N samples per prompt; outputs have B * N rows.
    """
    tokens = jnp.asarray(prompts, jnp.int32)
    if tokens.ndim != 2:
      raise ValueError(f"prompts must be [batch, length], got {tokens.shape}.")
    num_decodes = int(num_decodes)
    if num_decodes < 1:
      raise ValueError(f"num_decodes must be >= 1, got {num_decodes}.")
    config = decoding.SamplingConfig(self.max_decode_len, self.eos_id, float(temperature),
                                     int(top_k), float(top_p), pad_id=self.pad_id)
    step_rule, rule_params = self._rule(rule, lam, alpha, tokens.shape[0], num_decodes)
    if rng is None:
      if config.temperature != 0:
        raise ValueError("rng is required unless temperature=0 (greedy decoding).")
      rng = jax.random.PRNGKey(0)  # not consumed by greedy rules
    if self.combine == "weights":
      if not np.all(np.asarray(rule_params[:, 1]) == np.asarray(rule_params[0, 1])):
        raise ValueError("combine='weights' takes one lam for the whole batch.")
      return self._sample_weight_mixed(self.params, tokens, rule_params[0, 1], rng,
                                       config=config, num_decodes=num_decodes)
    return self._sample_logit_mixed(self.params, tokens, rule_params, rng, config=config,
                                    num_decodes=num_decodes, rule=step_rule)

  @functools.partial(jax.jit, static_argnums=(0,),
                     static_argnames=("config", "num_decodes", "rule"))
  def _sample_logit_mixed(self, params, tokens, rule_params, rng, config, num_decodes, rule):
    caches = decoding.init_caches(self.models, params, tokens, config.max_decode_len,
                                  num_decodes)
    out = decoding.mixture_sample(
        decoding.models_tokens_to_logits(self.models, params, self.shared_vocab), caches,
        rule_params, rng, config, rule)
    logp_aligned = out.logp[:, 1:] if self.many else out.logp[:, 1]
    return RealignedSamples(tokens=out.tokens, lengths=out.lengths, logq=out.logq,
                            logp_ref=out.logp[:, 0], logp_aligned=logp_aligned,
                            log_weight=out.log_weight, kl_ref=out.kl_ref)

  @functools.partial(jax.jit, static_argnums=(0,), static_argnames=("config", "num_decodes"))
  def _sample_weight_mixed(self, params, tokens, lam, rng, config, num_decodes):
    mixed = jax.tree_util.tree_map(lambda r, a: lam * a + (1 - lam) * r, params[0], params[1])
    model = self.models[0]
    caches = decoding.init_caches((model,), (mixed,), tokens, config.max_decode_len, num_decodes)
    weights = jnp.ones((tokens.shape[0] * num_decodes, 1), jnp.float32)
    out = decoding.mixture_sample(
        decoding.models_tokens_to_logits((model,), (mixed,), self.shared_vocab), caches,
        weights, rng, config)
    return RealignedSamples(tokens=out.tokens, lengths=out.lengths, logq=out.logq,
                            logp_ref=None, logp_aligned=None, log_weight=out.log_weight,
                            kl_ref=out.kl_ref)

  # --------------------------------------------------------------------------- score

  def score(self, prompts, responses, lam) -> Array:
    """Teacher-forced log q(y|x) per sequence under DeRa at `lam` (temperature 1): [B].

    `responses` [B, T] are PAD (`pad_id`) masked; each token's
    distribution excludes PAD and ids >= `shared_vocab`, as the sampler's does. This is the
    log-likelihood used for pairwise accuracy (paper eq. 14).
    """
    prompts, responses = self._check_pairs(prompts, responses)
    return self._score(self.params, prompts, responses,
                       self._mix_weights(lam, prompts.shape[0]))

  def logits(self, prompts, responses, lam) -> Array:
    """Teacher-forced DeRa logits sum_m w_m h_m [B, T, V] at `lam` (as `score`), V =
    `shared_vocab` when given; PAD is not masked here (`score` and the sampler mask it)."""
    prompts, responses = self._check_pairs(prompts, responses)
    return self._logits(self.params, prompts, responses,
                        self._mix_weights(lam, prompts.shape[0]))

  def _check_pairs(self, prompts, responses) -> tuple[Array, Array]:
    if self.combine == "weights":
      raise ValueError("score and logits are defined for combine='logits'.")
    prompts = jnp.asarray(prompts, jnp.int32)
    responses = jnp.asarray(responses, jnp.int32)
    if prompts.shape[0] != responses.shape[0]:
      raise ValueError(f"{prompts.shape[0]} prompts but {responses.shape[0]} responses.")
    return prompts, responses

  @functools.partial(jax.jit, static_argnums=(0,))
  def _logits(self, params, prompts, responses, weights):
    # Each model's teacher-forced logits over the shared ids, mixed per token.
    batch = models_base.response_batch(prompts, responses)
    logits = jnp.stack([m.logits(p, batch)[..., :self.shared_vocab]
                        for m, p in zip(self.models, params)])
    mixed = decoding.mixture_logits(logits.reshape(logits.shape[0], -1, logits.shape[-1]),
                                    jnp.repeat(weights, responses.shape[1], axis=0))
    return mixed.reshape(responses.shape + (-1,))

  @functools.partial(jax.jit, static_argnums=(0,))
  def _score(self, params, prompts, responses, weights):
    mixed = decoding.mask_pad(self._logits(params, prompts, responses, weights), self.pad_id)
    token_ll = models_base.masked_log_likelihood(mixed, responses, pad_id=self.pad_id)
    return jnp.sum(token_ll, axis=-1)

  # --------------------------------------------------------------------------- resample

  def resample(self, prompts, lam, rng: Array, *, num_candidates: int
               ) -> Resampled:
    """Sampling-importance-resampling towards the exact sequence-level mixture.

    Draws N = `num_candidates` DeRa samples per prompt (temperature 1, full
    vocabulary), then keeps one per prompt with probability ∝ exp(log_weight), the
    ratio of the normalised geometric mixture pi_ref^(1-lam) pi_aligned^lam to q. The
    result is distributed as the exact mixture as N -> infinity (only at temperature 1
    with no top-k/top-p; other settings change q and break the weights).
    Also returns the effective sample size (sum w)^2 / sum w^2 per prompt.
    """
    if self.combine == "weights":
      raise ValueError("resample is defined for combine='logits'.")
    sample_rng, pick_rng = jax.random.split(rng)
    out = self.sample(prompts, lam, sample_rng, num_decodes=num_candidates)
    return _pick(out, pick_rng, num_candidates)

  # --------------------------------------------------------------------------- best-of-N

  def best_of_n(self, prompts, n: int, scorer: Scorer, rng: Optional[Array] = None,
                *, lam=None, rule: str = "dera", alpha=None, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0) -> BestOfN:
    """Draws `n` candidates per prompt in one call and keeps the highest-scoring one.

    Args:
      prompts: [B, S] prompt ids.
      n: candidates per prompt, >= 1.
      scorer: (prompts [B*n, S], candidates) -> [B*n] scores, e.g.
        `implicit_reward_scorer(beta)` or `mixture_weight_scorer()`; a reward model
        lives at a higher layer (`deranj.sample` builds one).
      rng, lam, rule, alpha, temperature, top_k, top_p: as in `sample` (lam per prompt
        or per candidate row).

    Returns `BestOfN`: the chosen rows, their index in [0, n) (the first of tied best
    scores) and every candidate's score [B, n].
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f"best-of-N needs n >= 1 candidates per prompt, got {n!r}.")
    n = int(n)
    prompts = jnp.asarray(prompts, jnp.int32)
    out = self.sample(prompts, lam, rng, rule=rule, alpha=alpha, temperature=temperature,
                      top_k=top_k, top_p=top_p, num_decodes=n)
    rows = out.tokens.shape[0]
    scores = jnp.asarray(scorer(jnp.repeat(prompts, n, axis=0), out), jnp.float32)
    if scores.shape != (rows,):
      raise ValueError(f"the scorer returned shape {scores.shape}; expected ({rows},): one "
                       f"score per candidate ({prompts.shape[0]} prompts x {n}).")
    if np.any(np.isnan(np.asarray(scores))):
      raise ValueError(f"the scorer returned NaN for {int(np.isnan(scores).sum())} of "
                       f"{rows} candidates.")
    return _pick_best(out, scores, n)


def implicit_reward_scorer(beta: float = 1.0) -> Scorer:
  """DPO's implicit reward of each whole candidate: beta * (log p_aligned - log p_ref).

  Each log-probability is the model's own (PAD excluded), as the sampler reports it.
  beta only rescales the scores, so it does not change which candidate is best.
  """
  if not beta > 0:
    raise ValueError(f"implicit_reward_scorer: beta must be > 0, got {beta}.")

  def score(prompts: Array, samples: RealignedSamples) -> Array:
    del prompts
    if samples.logp_aligned is None or samples.logp_aligned.ndim != 1:
      raise ValueError("the implicit-reward scorer needs one aligned model combined by "
                       "logits (each model's log-probability of the candidates).")
    return beta * (samples.logp_aligned - samples.logp_ref)

  return score


def mixture_weight_scorer() -> Scorer:
  """The exact-mixture importance weight log_weight: log (mixture / q) up to a constant.

  Keeps the candidate the per-token approximation q under-samples most relative to the
  exact geometric mixture (meaningful at temperature 1 with no top-k/top-p).
  """

  def score(prompts: Array, samples: RealignedSamples) -> Array:
    del prompts
    if samples.log_weight is None:
      raise ValueError("the mixture-weight scorer needs rule='dera' candidates "
                       "(rule='aad' samples no geometric mixture, so has no log_weight).")
    return samples.log_weight

  return score


def _take(out: RealignedSamples, index: Array, n: int) -> RealignedSamples:
  """Row b * n + index[b] of every field: [B*n, ...] -> [B, ...]."""
  rows = jnp.arange(index.shape[0]) * n + index
  return jax.tree_util.tree_map(lambda x: x[rows], out)


@functools.partial(jax.jit, static_argnums=(2,))
def _pick(out: RealignedSamples, rng: Array, num_candidates: int) -> Resampled:
  log_w = out.log_weight.reshape(-1, num_candidates)  # [B, N]
  index = jax.random.categorical(rng, log_w, axis=-1)  # [B]
  w = jax.nn.softmax(log_w, axis=-1)
  ess = 1.0 / jnp.sum(w**2, axis=-1)
  return Resampled(samples=_take(out, index, num_candidates), index=index, ess=ess)


@functools.partial(jax.jit, static_argnums=(2,))
def _pick_best(out: RealignedSamples, scores: Array, n: int) -> BestOfN:
  scores = scores.reshape(-1, n)  # [B, n]
  index = jnp.argmax(scores, axis=-1)  # the first of tied maxima
  return BestOfN(samples=_take(out, index, n), index=index, scores=scores)
