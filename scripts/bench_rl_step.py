"""Where one PPO step and one policy-gradient step spend their time.

Each piece of a step is jitted on its own and timed on the same prompts (the embedded
news validation split) with the same policy (default: the shipped tiny T5; pass an SFT
run with --init for its response lengths):

  rollout   sampling the responses (deranj's sampler, temperature 1, early exit when
            every row has ended)
  score     teacher-forced log-probabilities of the responses under the policy and the
            reference (PPO: plus the value model's forward pass)
  reward    the reward on the responses (length reward; a learned reward model's forward
            with --reward_model)
  update    the optimizer updates (PPO: epochs x minibatches clipped-loss updates of policy
            and value; PG: one gradient step of the leave-one-out loss)
  step      the whole train step as the trainer jits it (the pieces fused by XLA)
  score, unshared   (policy gradient) the score piece with every sample encoding its own
            copy of the prompt, as before the samples shared their prompt's encoding

Medians of --rounds interleaved rounds (pieces alternate order within a round) with min
and max. The share column is each piece's median over the sum of the four pieces' medians
(other rows: their median over that sum).

    PYTHONPATH=. python scripts/bench_rl_step.py [--init runs/sft] [--ppo_batch 16 \
        --pg_batch 8 --pg_samples 4 --rounds 5 --json out.json]
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deranj import profiling  # noqa: E402
from deranj.data import pipeline  # noqa: E402
from deranj.models import loading  # noqa: E402
from deranj.training import objectives  # noqa: E402
from deranj.training import optimizers  # noqa: E402
from deranj.training import policy_gradient  # noqa: E402
from deranj.training import ppo as ppo_lib  # noqa: E402
from deranj.training import rollouts  # noqa: E402

PIECES = ("rollout", "score", "reward", "update")


def _block(tree):
  return jax.block_until_ready(tree)


def _state(objective, base_params, optimizer):
  params = objective.init_params(jax.random.PRNGKey(0), base_params)
  return objectives.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=optimizer.init(params))


def ppo_arms(model, base_params, prompts, args):
  reward = rollouts.LengthReward(args.l_min, args.l_max)
  obj = ppo_lib.PPO(model, reward, beta=0.1, max_decode_len=args.targets_length,
                    num_epochs=args.ppo_epochs, num_minibatches=args.ppo_minibatches)
  optimizer = optimizers.make_optimizer(
      optimizers.per_train_step(lambda _: 1e-5, obj.updates_per_step))
  state = _state(obj, base_params, optimizer)
  frozen = obj.frozen_params(base_params)
  rng = jax.random.PRNGKey(1)

  rollout_fn = jax.jit(lambda p, x, r: rollouts.sample_rollout(
      model, p["policy"], x, r, max_decode_len=obj.max_decode_len))
  rollout = _block(rollout_fn(state.params, prompts, rng))

  def score(p, f, ro):
    logp, _ = rollouts.token_logprobs(model, p["policy"], ro)
    ref, _ = rollouts.token_logprobs(model, f["ref"], ro)
    return logp, ref, obj.values(p["value"], ro)
  score_fn = jax.jit(score)
  reward_fn = jax.jit(lambda f, ro: reward(f["reward"], ro.prompts, ro.responses))
  full_step = jax.jit(lambda s, f, b, r: obj.train_step(s, f, b, r, optimizer=optimizer))

  # The update alone: the same scan over minibatches, fed a fixed scored rollout.
  logp, _, values = _block(score_fn(state.params, frozen, rollout))
  mask = rollout.mask
  buffer = {"rollout": rollout, "old_logp": logp, "old_values": values,
            "advantages": jnp.where(mask > 0, 0.1, 0.0), "returns": values}

  def update(s, buf, r):
    rows = mask.shape[0]
    orders = jax.vmap(lambda k: jax.random.permutation(k, rows))(
        jax.random.split(r, obj.num_epochs))
    minibatches = orders.reshape(obj.updates_per_step, -1)

    def body(carry, index):
      params, opt_state = carry
      mb = jax.tree_util.tree_map(lambda x: x[index], buf)
      grads, _ = jax.grad(obj._minibatch_loss, has_aux=True)(params, mb)  # pylint: disable=protected-access
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (jax.tree_util.tree_map(jnp.add, params, updates), opt_state), None
    (params, _), _ = jax.lax.scan(body, (s.params, s.opt_state), minibatches)
    return params
  update_fn = jax.jit(update)

  batch = {"prompts": prompts}
  arms = {
      "rollout": lambda: _block(rollout_fn(state.params, prompts, rng)),
      "score": lambda: _block(score_fn(state.params, frozen, rollout)),
      "reward": lambda: _block(reward_fn(frozen, rollout)),
      "update": lambda: _block(update_fn(state, buffer, rng)),
      "step": lambda: _block(full_step(state, frozen, batch, rng)),
  }
  return arms, rollout


def pg_arms(model, base_params, prompts, args, reward):
  obj = policy_gradient.PolicyGradient(model, reward, beta=0.1, num_samples=args.pg_samples,
                                       max_decode_len=args.targets_length)
  optimizer = optimizers.make_optimizer(lambda _: 1e-5)
  state = _state(obj, base_params, optimizer)
  frozen = obj.frozen_params(base_params)
  rng = jax.random.PRNGKey(2)
  n = obj.num_samples

  rollout_fn = jax.jit(lambda p, x, r: rollouts.sample_rollout(
      model, p, x, r, max_decode_len=obj.max_decode_len, num_samples=n))
  rollout = _block(rollout_fn(state.params, prompts, rng))
  score_fn = jax.jit(lambda f, ro: rollouts.token_logprobs(model, f["ref"], ro)[0].sum(-1))
  reward_fn = jax.jit(lambda f, ro: reward(f["reward"], ro.prompts, ro.responses))
  ref_logp = _block(score_fn(frozen, rollout))
  scores = _block(reward_fn(frozen, rollout))
  scored = {**rollout.batch(), "ref_logp": ref_logp, "scores": scores}

  def update(s, b, r):
    grads, _ = objectives.accumulate_gradients(
        lambda p, mb, k: obj.loss(p, frozen, mb, k), s.params, b, r, 1)
    return objectives.apply_gradients(s, grads, optimizer)[0]
  update_fn = jax.jit(update)
  full_step = jax.jit(lambda s, f, b, r: obj.train_step(s, f, b, r, optimizer=optimizer))

  batch = {"prompts": prompts}
  arms = {
      "rollout": lambda: _block(rollout_fn(state.params, prompts, rng)),
      "score": lambda: _block(score_fn(frozen, rollout)),
      "reward": lambda: _block(reward_fn(frozen, rollout)),
      "update": lambda: _block(update_fn(state, scored, rng)),
      "step": lambda: _block(full_step(state, frozen, batch, rng)),
      "score, unshared": lambda: _block(score_fn(frozen, rollout.replace(num_samples=1))),
  }
  return arms, rollout


def measure(name, arms, rollout, rounds):
  for fn in arms.values():  # compile
    fn()
  times = profiling.interleaved_rounds(arms, rounds)
  stats = {k: profiling.spread(v) for k, v in times.items()}
  total = sum(stats[k]["median"] for k in PIECES)
  lengths = np.asarray(jax.device_get(rollout.mask.sum(-1)))
  print(f"\n{name}: {rollout.mask.shape[0]} responses, mean length {lengths.mean():.1f} "
        f"(max {int(lengths.max())} of {rollout.mask.shape[1]})")
  print(f"  {'piece':16s} {'median s':>9s} {'min':>7s} {'max':>7s} {'share':>6s}")
  for k in (*PIECES, *(k for k in stats if k not in PIECES)):
    s = stats[k]
    share = f"{s['median'] / total:6.0%}" if k in PIECES else f"{s['median'] / total:5.2f}x"
    print(f"  {k:16s} {s['median']:9.3f} {s['min']:7.3f} {s['max']:7.3f} {share}")
  return {"responses": int(rollout.mask.shape[0]), "mean_length": float(lengths.mean()),
          "pieces": stats, "sum_of_pieces": total}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--init", default="tiny", help="the policy: 'tiny' or a run directory")
  parser.add_argument("--reward_model", default=None,
                      help="a reward_model run for the PG arm (default: the length reward)")
  parser.add_argument("--ppo_batch", type=int, default=16)
  parser.add_argument("--ppo_epochs", type=int, default=2)
  parser.add_argument("--ppo_minibatches", type=int, default=2)
  parser.add_argument("--pg_batch", type=int, default=8)
  parser.add_argument("--pg_samples", type=int, default=4)
  parser.add_argument("--inputs_length", type=int, default=128)
  parser.add_argument("--targets_length", type=int, default=48)
  parser.add_argument("--l_min", type=int, default=30)
  parser.add_argument("--l_max", type=int, default=40)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--json", default=None, help="also write the numbers here")
  args = parser.parse_args()

  spec = args.init
  if os.path.isdir(os.path.join(spec, "model")):
    spec = os.path.join(spec, "model")
  model, base_params = loading.load_model(spec)
  split = pipeline.load("embedded_news", "validation",
                        {"inputs": args.inputs_length, "targets": args.targets_length},
                        keep_texts=False)
  prompts = split.features["prompts"]
  need = max(args.ppo_batch, args.pg_batch)
  prompts = np.resize(prompts, (need, prompts.shape[1]))  # repeats when the split is short
  reward = (rollouts.LearnedReward(args.reward_model) if args.reward_model
            else rollouts.LengthReward(args.l_min, args.l_max))
  print(f"policy {args.init}; prompts {args.inputs_length} tokens; responses <= "
        f"{args.targets_length}; {jax.device_count()} {jax.default_backend()} device(s)")

  out = {"args": vars(args)}
  arms, ro = ppo_arms(model, base_params, jnp.asarray(prompts[:args.ppo_batch]), args)
  out["ppo"] = measure(f"PPO step (batch {args.ppo_batch}, {args.ppo_epochs} epochs x "
                       f"{args.ppo_minibatches} minibatches)", arms, ro, args.rounds)
  arms, ro = pg_arms(model, base_params, jnp.asarray(prompts[:args.pg_batch]), args, reward)
  out["pg"] = measure(f"policy-gradient step (batch {args.pg_batch} x {args.pg_samples} "
                      f"samples, {'reward model' if args.reward_model else 'length reward'})",
                      arms, ro, args.rounds)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
