"""Decoding-time realignment: sample, score and resample from realigned models.

The model aligned with KL strength beta/lam is the geometric mixture
pi_ref^(1-lam) * pi_aligned^lam, normalised over sequences (paper eq. 5). DeRa samples
its per-token approximation q_t = softmax(lam h_aligned + (1-lam) h_ref) (eq. 9);
`Realigner.resample` corrects the approximation by sampling-importance-resampling.

    realigner = Realigner(ref_model, ref_params, aligned_model, aligned_params,
                          max_decode_len=64)
    out = realigner.sample(prompts, lam=jnp.array([0., .5, 1., 2.]), rng=key)

`lam` is traced: any number of values, scalar or one per row, share one compilation.
Several aligned models (paper App. B): pass lists of models and params; `lam` is then
[K] or [B, K] and the reference gets 1 - sum(lam).
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from deranj import decoding
from deranj.models import base as models_base
from deranj.models import t5

Array = jax.Array
ModelLike = Union[models_base.EncoderDecoderModel, t5.Transformer]


@flax.struct.dataclass
class RealignedSamples:
  """Samples with per-sequence log-probabilities and weights ([B*N] each unless noted).

  tokens: [B*N, T], 0 after EOS; rows of one prompt are adjacent (b * N + n).
  lengths: tokens emitted, EOS included.
  logq: log-probability under the distribution actually sampled from.
  logp_ref, logp_aligned: each model's own log-probability ([B*N, K] for K > 1 aligned
    models). None when sampling from weight-mixed parameters.
  log_weight: sum_t log Z_t; exp(log_weight) ∝ (exact mixture) / q at temperature 1.
  kl_ref: sum_t KL(q_t || p_ref,t).
  """
  tokens: Array
  lengths: Array
  logq: Array
  logp_ref: Optional[Array]
  logp_aligned: Optional[Array]
  log_weight: Array
  kl_ref: Array


@flax.struct.dataclass
class Resampled:
  """One importance-resampled sequence per prompt ([B] each)."""
  samples: RealignedSamples  # the chosen rows
  index: Array  # chosen candidate per prompt, in [0, N)
  ess: Array  # effective sample size of the N candidates' weights, in [1, N]


def _as_model(model: ModelLike) -> models_base.EncoderDecoderModel:
  if isinstance(model, models_base.EncoderDecoderModel):
    return model
  if isinstance(model, t5.Transformer):
    return models_base.EncoderDecoderModel(model)
  raise TypeError(f"expected a deranj model (EncoderDecoderModel or t5.Transformer), "
                  f"got {type(model).__name__}.")


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


def _check_finite(lam) -> np.ndarray:
  lam = np.asarray(lam, np.float32)
  if not np.all(np.isfinite(lam)):
    raise ValueError(f"lam must be finite, got {lam}.")
  return lam


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
  """

  def __init__(self, ref_model: ModelLike, ref_params, aligned_model, aligned_params, *,
               max_decode_len: int, eos_id: int = 1, combine: str = "logits"):
    many = isinstance(aligned_model, (list, tuple))
    aligned_models = tuple(aligned_model) if many else (aligned_model,)
    aligned_params = tuple(aligned_params) if many else (aligned_params,)
    if len(aligned_models) != len(aligned_params) or not aligned_models:
      raise ValueError(f"got {len(aligned_models)} aligned models and {len(aligned_params)} "
                       "parameter sets; give one set per model.")
    self.models = (_as_model(ref_model),) + tuple(_as_model(m) for m in aligned_models)
    self.params = (ref_params,) + aligned_params
    self.num_aligned = len(aligned_models)
    self.many = many
    self.max_decode_len = int(max_decode_len)
    self.eos_id = int(eos_id)
    vocab = [m.config.vocab_size for m in self.models]
    if len(set(vocab)) != 1:
      raise ValueError(f"the models must share a vocabulary: reference vocab_size={vocab[0]}, "
                       f"aligned vocab_size={', '.join(map(str, vocab[1:]))}.")
    if combine not in ("logits", "weights"):
      raise ValueError(f"combine must be 'logits' or 'weights', got {combine!r}.")
    self.combine = combine
    if combine == "weights":
      self._check_same_shapes()

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
    given = _check_finite(lam)
    k, rows = self.num_aligned, batch * num_decodes
    lam = given if self.many else given[..., None]  # [..., K]
    lead = lam.shape[:-1]
    if lam.ndim < 1 or lam.shape[-1] != k or lead not in {(), (batch,), (rows,)}:
      per = [f"[{batch}" ] + ([f"[{rows}"] if num_decodes > 1 else [])
      shapes = ([f"[{k}]"] + [p + f", {k}]" for p in per]) if self.many else (
          ["[] (a scalar)"] + [p + "]" for p in per])
      raise ValueError(f"lam must have shape {' or '.join(shapes)} "
                       f"({k} aligned model{'s' if k > 1 else ''}, {batch} prompts, "
                       f"{num_decodes} decodes each), got {given.shape}.")
    if lead == (batch,) and num_decodes > 1:
      lam = np.repeat(lam, num_decodes, axis=0)
    lam = jnp.asarray(np.broadcast_to(lam, (rows, k)), jnp.float32)
    return jnp.concatenate([1 - jnp.sum(lam, axis=1, keepdims=True), lam], axis=1)

  # --------------------------------------------------------------------------- sample

  def sample(self, encoder_input_tokens, lam, rng: Array, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, num_decodes: int = 1) -> RealignedSamples:
    """Samples `num_decodes` sequences per prompt from the realigned model at `lam`.

    Args:
      encoder_input_tokens: [B, S] prompt ids, 0 = PAD.
      lam: scalar, [B] (per prompt) or [B*N] (per output row) for one aligned model;
        [K], [B, K] or [B*N, K] for K aligned models. A lam sweep over one batch is
        `num_decodes=len(lams)` with `lam=np.tile(lams, B)`: each prompt is encoded once.
      rng: PRNG key.
      temperature: 0 is greedy. top_k: 0 keeps the full vocabulary. top_p: nucleus mass.
      num_decodes: N samples per prompt; outputs have B * N rows.
    """
    tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
    if tokens.ndim != 2:
      raise ValueError(f"encoder_input_tokens must be [batch, length], got {tokens.shape}.")
    config = decoding.SamplingConfig(self.max_decode_len, self.eos_id, float(temperature),
                                     int(top_k), float(top_p))
    weights = self._mix_weights(lam, tokens.shape[0], int(num_decodes))
    if self.combine == "weights":
      if not np.all(np.asarray(weights[:, 1]) == np.asarray(weights[0, 1])):
        raise ValueError("combine='weights' takes one lam for the whole batch.")
      return self._sample_weight_mixed(self.params, tokens, weights[0, 1], rng, config=config,
                                       num_decodes=int(num_decodes))
    return self._sample_logit_mixed(self.params, tokens, weights, rng, config=config,
                                    num_decodes=int(num_decodes))

  @functools.partial(jax.jit, static_argnums=(0,), static_argnames=("config", "num_decodes"))
  def _sample_logit_mixed(self, params, tokens, weights, rng, config, num_decodes):
    caches = decoding.init_caches(self.models, params, tokens, config.max_decode_len,
                                  num_decodes)
    out = decoding.mixture_sample(decoding.models_tokens_to_logits(self.models, params),
                                  caches, weights, rng, config)
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
    out = decoding.mixture_sample(decoding.models_tokens_to_logits((model,), (mixed,)),
                                  caches, weights, rng, config)
    return RealignedSamples(tokens=out.tokens, lengths=out.lengths, logq=out.logq,
                            logp_ref=None, logp_aligned=None, log_weight=out.log_weight,
                            kl_ref=out.kl_ref)

  # --------------------------------------------------------------------------- score

  def score(self, encoder_input_tokens, decoder_target_tokens, lam) -> Array:
    """Teacher-forced log q(y|x) per sequence under DeRa at `lam` (temperature 1): [B].

    `decoder_target_tokens` [B, T] are the responses, PAD (0) masked; each token's
    distribution excludes PAD, as the sampler's does. This is the
    log-likelihood used for pairwise accuracy (paper eq. 14).
    """
    if self.combine == "weights":
      raise ValueError("score is defined for combine='logits'.")
    enc = jnp.asarray(encoder_input_tokens, jnp.int32)
    targets = jnp.asarray(decoder_target_tokens, jnp.int32)
    if enc.shape[0] != targets.shape[0]:
      raise ValueError(f"{enc.shape[0]} prompts but {targets.shape[0]} responses.")
    return self._score(self.params, enc, targets, self._mix_weights(lam, enc.shape[0]))

  @functools.partial(jax.jit, static_argnums=(0,))
  def _score(self, params, enc, targets, weights):
    # The models' teacher-forced logits, mixed per token, then the shared masked sum.
    batch = models_base.response_batch(enc, targets)
    logits = jnp.stack([m.logits(p, batch) for m, p in zip(self.models, params)])
    mixed = decoding.mixture_logits(logits.reshape(logits.shape[0], -1, logits.shape[-1]),
                                    jnp.repeat(weights, targets.shape[1], axis=0))
    mixed = decoding.mask_pad(mixed, decoding.SamplingConfig.pad_id)  # as sampled
    token_ll = models_base.masked_log_likelihood(mixed.reshape(targets.shape + (-1,)), targets)
    return jnp.sum(token_ll, axis=-1)

  # --------------------------------------------------------------------------- resample

  def resample(self, encoder_input_tokens, lam, rng: Array, *, num_candidates: int
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
    out = self.sample(encoder_input_tokens, lam, sample_rng, num_decodes=num_candidates)
    return _pick(out, pick_rng, num_candidates)


@functools.partial(jax.jit, static_argnums=(2,))
def _pick(out: RealignedSamples, rng: Array, num_candidates: int) -> Resampled:
  log_w = out.log_weight.reshape(-1, num_candidates)  # [B, N]
  index = jax.random.categorical(rng, log_w, axis=-1)  # [B]
  w = jax.nn.softmax(log_w, axis=-1)
  ess = 1.0 / jnp.sum(w**2, axis=-1)
  rows = jnp.arange(log_w.shape[0]) * num_candidates + index
  chosen = jax.tree_util.tree_map(lambda x: x[rows], out)
  return Resampled(samples=chosen, index=index, ess=ess)
