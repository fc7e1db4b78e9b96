"""Reward-weighted maximum likelihood: trains towards pi*(beta) without a policy gradient.

The KL-regularised optimum is pi*(beta)(y|x) ∝ pi_ref(y|x) exp(r(x, y) / beta). Maximum
likelihood on samples of pi*(beta) minimises KL(pi*(beta) || pi_theta), whose minimiser is
pi*(beta) itself wherever the model can express it. Samples of pi*(beta) come from the
reference's own (reward-weighted regression, Peters & Schaal 2007, with self-normalised
weights):

  before the loop   y_1..y_M ~ pi_ref(.|x) for every training prompt x (the "pool"),
                    w_m = softmax_m(r(x, y_m) / beta)
  each step         a step on an estimate of the gradient of
                    -sum_m w_m log pi_theta(y_m | x) (log-probs summed over the response's
                    tokens), by `estimator`:

  'control_variate' (default): K = `num_resampled` of the M candidates drawn uniformly
    without replacement, and
      loss = sum_k [-(M w_k - 1) / K * log pi_theta(y_k | x)
                    + 1 / K * sum_t KL(pi_ref(.|x, y_k,<t) || pi_theta(.|x, y_k,<t))]
    -sum_m w_m log pi = -sum_m (w_m - 1/M) log pi - mean_m log pi, and the last term's
    expectation over the reference's tokens is the per-token KL from pi_ref (plus its
    entropy, a constant): the same expected gradient over the pool's draws (for one
    fixed pool it is unbiased for the pool with that term so replaced), but a sample
    enters only through how far its weight is from uniform, and the pull back towards
    pi_ref is exact. At the reference, a step over flat weights is zero, not a random
    walk.
  'resampled': K candidates drawn with probabilities w (importance resampling) and
      loss = -mean_k log pi_theta(y_k | x)
    every step fits whole samples, so at flat weights Adam random-walks the policy away
    from pi_ref (README, Figure 2: the KL grows without the reward).

The target is the M-sample self-normalised estimate of pi*(beta): exact as M grows, and
close while the weights' effective sample size (logged as `objective/target_ess`) is not
small. A prompt none of whose candidates the reward favours keeps the reference's
distribution. The pool is sampled once; no KL is spent on a policy gradient's noise.

`candidates_file` keeps the pool in an .npz (no pickles) for every run from the same
reference: the retrained runs of a beta sweep then share one pool (common random
numbers) and sample it once. A file written for other prompts, another reference,
seed, M or response length is refused.

Evaluation is the policy gradient's (`rollouts.RolloutObjective`): reward, KL to the
reference and KL to pi*(beta) of the policy's own samples on held-out prompts.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np

from deranj import decoding
from deranj.data import batching
from deranj.data import files
from deranj.models import base as models_base
from deranj.training import losses
from deranj.training import objectives
from deranj.training import rollouts

Array = jax.Array
Params = Any

CANDIDATES = "candidates"  # int32 [N, M, T]: the pool's responses per training prompt
LOG_WEIGHTS = "log_weights"  # float32 [N, M]: log w, normalised per prompt
TARGET_ESS = "target_ess"  # float32 [N]: 1 / sum w^2 per prompt
ESTIMATORS = ("control_variate", "resampled")


def reference_fingerprint(params: Params) -> float:
  """Sum of |x| over the reference's params in float64: tells a pool's reference apart."""
  return float(sum(np.abs(np.asarray(x, np.float64)).sum()
                   for x in jax.tree_util.tree_leaves(jax.device_get(params))))


def pool_weights(scores: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
  """(log w [N, M] normalised per prompt, ESS [N]) of w ∝ exp(scores / beta), in float64."""
  z = np.asarray(scores, np.float64) / beta
  log_w = z - z.max(axis=1, keepdims=True)
  log_w -= np.log(np.exp(log_w).sum(axis=1, keepdims=True))
  ess = 1.0 / np.square(np.exp(log_w)).sum(axis=1)
  return log_w, ess


@gin.configurable
class RewardWeightedLikelihood(rollouts.RolloutObjective):
  """Maximum likelihood on reference samples resampled by exp(r / beta) (module docstring)."""

  name = "reward_weighted_likelihood"

  def __init__(self, model: models_base.EncoderDecoderModel = gin.REQUIRED,
               reward: Any = gin.REQUIRED, *, beta: float = 0.1, num_candidates: int = 64,
               num_resampled: int = 1, max_decode_len: int = 64, eos_id: int = 1,
               eval_num_samples: int = 4, candidates_file: Optional[str] = None,
               candidates_seed: int = 0, sample_batch_size: int = 128,
               estimator: str = "control_variate"):
    super().__init__(model, reward, beta=beta, max_decode_len=max_decode_len,
                     temperature=1.0, eos_id=eos_id, eval_num_samples=eval_num_samples)
    owner = type(self).__name__
    if num_candidates < 2:
      raise objectives.ObjectiveError(
          f"{owner}.num_candidates={num_candidates}: the weights need >= 2 reference "
          "samples per prompt (64 or more recommended).")
    if estimator not in ESTIMATORS:
      raise objectives.ObjectiveError(
          f"{owner}.estimator={estimator!r}: expected one of {ESTIMATORS}.")
    without_replacement = estimator == "control_variate"
    if num_resampled < 1 or (without_replacement and num_resampled > num_candidates):
      raise objectives.ObjectiveError(
          f"{owner}.num_resampled={num_resampled}: must be >= 1 (and, for the "
          f"control_variate estimator, <= num_candidates={num_candidates}).")
    self.estimator = estimator
    self.num_candidates, self.num_resampled = num_candidates, num_resampled
    self.candidates_file, self.candidates_seed = candidates_file, candidates_seed
    self.sample_batch_size = sample_batch_size

  # ------------------------------------------------------------------ the pool

  def _pool_record(self, prompts: np.ndarray, frozen: Params) -> dict[str, np.ndarray]:
    return {"prompts": np.asarray(prompts, np.int32),
            "seed": np.asarray(self.candidates_seed),
            "max_decode_len": np.asarray(self.max_decode_len),
            "reference_fingerprint": np.asarray(reference_fingerprint(frozen["ref"]))}

  def _read_pool(self, record: Mapping[str, np.ndarray]) -> Optional[np.ndarray]:
    """The candidates of `candidates_file` when it exists; refused when it does not match."""
    path = self.candidates_file
    if not path or not os.path.exists(path):
      return None
    with np.load(path, allow_pickle=False) as f:
      stored = {k: f[k] for k in f.files}
    where = f"{type(self).__name__}.candidates_file {path}"
    missing = [k for k in (CANDIDATES, *record) if k not in stored]
    if missing:
      raise objectives.ObjectiveError(f"{where}: not a pool file (no {missing}).")
    wrong = [k for k in ("seed", "max_decode_len") if int(stored[k]) != int(record[k])]
    if not np.array_equal(stored["prompts"], record["prompts"]):
      wrong.append("prompts")
    if not np.isclose(float(stored["reference_fingerprint"]),
                      float(record["reference_fingerprint"]), rtol=1e-6, atol=0.0):
      wrong.append("reference model")
    if stored[CANDIDATES].shape[1] != self.num_candidates:
      wrong.append(f"num_candidates ({stored[CANDIDATES].shape[1]})")
    if wrong:
      raise objectives.ObjectiveError(
          f"{where} was written for other {', '.join(wrong)}; delete it or bind another "
          "file.")
    return stored[CANDIDATES]

  def _sample_pool(self, prompts: np.ndarray, frozen: Params) -> np.ndarray:
    m = self.num_candidates
    chunk = max(1, self.sample_batch_size // m)
    key = jax.random.PRNGKey(self.candidates_seed)
    sample = jax.jit(lambda i, p: decoding.sample(
        self.model, frozen["ref"], p, jax.random.fold_in(key, i),
        max_decode_len=self.max_decode_len, eos_id=self.eos_id,
        num_decodes=m).tokens.reshape(p.shape[0], m, self.max_decode_len))
    tokens = batching.map_in_fixed_batches(sample, (prompts,), chunk, pass_number=True)
    return np.asarray(tokens, np.int32)

  def prepare_features(self, features, frozen, batch_size):
    """Adds the pool: CANDIDATES [N, M, T], LOG_WEIGHTS [N, M], TARGET_ESS [N]."""
    prompts = np.asarray(features["prompts"])
    n, m = len(prompts), self.num_candidates
    record = self._pool_record(prompts, frozen)
    candidates = self._read_pool(record)
    if candidates is None:
      print(f"[setup] sampling {m} reference responses for each of {n} training prompts",
            flush=True)
      candidates = self._sample_pool(prompts, frozen)
      if self.candidates_file:
        with files.atomic_write(self.candidates_file, "wb") as f:
          np.savez(f, **{CANDIDATES: candidates}, **record)
    score = jax.jit(lambda p, r: self.reward(frozen["reward"], p, r))
    flat = candidates.reshape(n * m, -1)
    scores = batching.map_in_fixed_batches(score, (np.repeat(prompts, m, axis=0), flat),
                                           max(batch_size, self.sample_batch_size))
    scores = np.asarray(scores, np.float64).reshape(n, m)
    if not np.isfinite(scores).all():
      raise objectives.ObjectiveError(
          f"{type(self).__name__}: the reward gave {int((~np.isfinite(scores)).sum())} "
          "non-finite scores on the reference's samples.")
    log_w, ess = pool_weights(scores, self.beta)
    print(f"[setup] pool: mean score {scores.mean():.4f}, weights' ESS per prompt mean "
          f"{ess.mean():.1f} min {ess.min():.1f} of {m} at beta {self.beta:g}", flush=True)
    return {**features, CANDIDATES: candidates, LOG_WEIGHTS: log_w.astype(np.float32),
            TARGET_ESS: ess.astype(np.float32)}

  # ------------------------------------------------------------------ the step

  def resample(self, batch: Mapping[str, Array], rng: Array) -> rollouts.Rollout:
    """`num_resampled` candidates per prompt drawn by their weights: a Rollout of
    B * num_resampled rows, each prompt's draws adjacent."""
    log_w = batch[LOG_WEIGHTS]  # [B, M]
    b, k = log_w.shape[0], self.num_resampled
    picks = jax.random.categorical(rng, log_w[:, None, :], shape=(b, k))  # [B, K]
    return self._rollout(batch, picks)

  def subsample(self, batch: Mapping[str, Array], rng: Array
                ) -> tuple[rollouts.Rollout, Array]:
    """`num_resampled` distinct candidates per prompt, uniformly: (their Rollout, their
    weights w [B, K])."""
    log_w = batch[LOG_WEIGHTS]
    b, m = log_w.shape
    picks = jnp.argsort(jax.random.uniform(rng, (b, m)), axis=1)[:, :self.num_resampled]
    return self._rollout(batch, picks), jnp.exp(jnp.take_along_axis(log_w, picks, axis=1))

  def _rollout(self, batch: Mapping[str, Array], picks: Array) -> rollouts.Rollout:
    candidates = batch[CANDIDATES]  # [B, M, T]
    b, k = picks.shape
    responses = jnp.take_along_axis(candidates, picks[..., None], axis=1)
    responses = responses.reshape(b * k, candidates.shape[-1])
    return rollouts.Rollout(prompts=jnp.repeat(batch["prompts"], k, axis=0),
                            responses=responses,
                            mask=(responses != self.model.pad_id).astype(jnp.float32),
                            num_samples=k, pad_id=self.model.pad_id)

  def loss(self, params, frozen, batch, rng):
    metrics = {"objective/target_ess": jnp.mean(batch[TARGET_ESS])}
    if self.estimator == "resampled":
      rollout = self.resample(batch, rng)
      logp, _ = rollouts.token_logprobs(self.model, params, rollout)
      loss = -jnp.mean(logp.sum(-1))
    else:
      rollout, w = self.subsample(batch, rng)
      b, k = w.shape
      m = batch[LOG_WEIGHTS].shape[1]
      logp, logits = rollouts.token_logprobs(self.model, params, rollout)
      _, ref_logits = rollouts.token_logprobs(self.model, frozen["ref"], rollout)
      kl_from_ref = losses.token_kl(jax.lax.stop_gradient(ref_logits), logits,
                                    rollout.mask).sum(-1)  # [B * K]
      coefficient = ((m * w - 1.0) / k).reshape(b * k)
      loss = jnp.sum(-coefficient * logp.sum(-1) + kl_from_ref / k) / b
      metrics["objective/kl_ref_to_policy"] = jnp.mean(kl_from_ref)
    return loss, {"loss": loss, **metrics,
                  **rollouts.response_length_metrics(rollout, self.eos_id)}
