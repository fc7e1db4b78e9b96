r"""The exact world: trainers checked against the closed-form optimum, DeRa's error exactly.

    python experiments/exact_world.py --preset tiny --workdir /tmp/deranj/exact

The world (deranj/exact.py, configs/presets/exact_{smoke,tiny}.gin): a T5 whose
vocabulary is PAD, EOS and 6 content ids, WORLD_PROMPTS prompts and every response the
sampler can emit (at most WORLD_MAX_LEN tokens, cut ones included), so every policy is
a [prompts, responses] table and pi*(beta) = pi_ref exp(r / beta) / Z is exact.

Stages (each training run through the project's gin files, skipped when finished, so
the driver resumes):
  1. data: SFT samples of a known prompt-dependent distribution (exact.random_policy);
  2. SFT from scratch (configs/runs/sft.gin): the reference; its own table (the
     distribution the sampler draws from, PAD excluded) is pi_ref from here on;
  3. Bradley-Terry pairs from pi_ref, labels ~ Bernoulli(sigmoid(gold_a - gold_b));
  4. PPO on the length reward (eq. 10), policy gradient on the gold reward and DPO on
     the pairs, at BETA and at BETA / lam for lam in RETRAIN_LAMS, each logging
     exact/kl_to_optimum through the trainer's eval hook (exact.KLToOptimum);
  5. per objective and lam in LAMS: KL(. || pi*(BETA / lam)) of
       exact DeRa    DeRa on the token conditionals of pi*(BETA) and pi_ref (its
                     approximation error alone; 0 at lam = 1);
       trained DeRa  DeRa on the conditionals of the trained BETA model's table and
                     pi_ref's. In this closed world that is exactly what the sampler
                     draws (every next id but PAD is a child in the response tree);
       SIR           importance resampling of trained DeRa with N candidates towards
                     the sequence-level mixture of the two trained tables (its exact
                     output distribution, exact.sir_distribution);
       retrained     the model trained at BETA / lam;
     and the expected reward of pi*(BETA / lam), DeRa and the retrained model;
  6. with PROXY_RM_STEPS > 0, Figure 3's proxy path: a reward model trained on the
     pairs, its exact table over the world, and policy gradient on it at BETA, measured
     against the proxy's optimum and the gold one (`proxy` in the JSON);
  7. W/exact_world.json and W/exact_world.png: per objective (rows) (i) KL to
     pi*(BETA / lam) against lam, (ii) expected reward against lam, (iii) the
     KL-to-optimum training curves.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402  pylint: disable=g-import-not-at-top

common.setup_path()

import numpy as np  # noqa: E402

from deranj import exact  # noqa: E402
from deranj.data import exact_world  # noqa: E402

PRESETS = {"smoke": "configs/presets/exact_smoke.gin", "tiny": "configs/presets/exact_tiny.gin"}
common.PRESET_FILES.update({f"exact_{k}": v for k, v in PRESETS.items()})

# kind: (run gin file, reward the optimum is of, extra bindings)
OBJECTIVES = {
    "pg": ("configs/runs/pg_reward.gin", "gold", ("PolicyGradient.reward = @GoldReward()",)),
    "ppo": ("configs/runs/ppo_length.gin", "length", ()),
    "dpo": ("configs/runs/dpo.gin", "gold", ()),
}
MACROS = ("WORLD_PROMPTS", "WORLD_CONTENT_IDS", "WORLD_MAX_LEN", "WORLD_SEED", "REF_SCALE",
          "SFT_EXAMPLES_PER_PROMPT", "PAIRS_PER_PROMPT", "GOLD_SEED", "GOLD_SCALE", "L_MIN",
          "L_MAX", "BETA", "LAMS", "RETRAIN_LAMS", "SIR_CANDIDATES", "SIR_DRAWS",
          "PROXY_RM_STEPS")
COLORS = {"exact": "tab:blue", "trained": "tab:orange", "sir": "tab:green",
          "retrained": "tab:red"}
TARGET_KL = 0.02  # nats per prompt, the bar for a converged run
CURVE_FILE = "exact_kl.jsonl"


def make_world(m: dict) -> exact.World:
  return exact.make_world(m["WORLD_PROMPTS"], m["WORLD_CONTENT_IDS"], m["WORLD_MAX_LEN"],
                          seed=m["WORLD_SEED"], allow_truncated=True)


def write_sft_data(data_dir: str, world: exact.World, m: dict) -> np.ndarray:
  """SFT examples from the known distribution; returns its table [P, N]."""
  source = exact.random_policy(world.responses, len(world.prompts), seed=m["WORLD_SEED"],
                               scale=m["REF_SCALE"])
  if not os.path.exists(os.path.join(data_dir, "validation.jsonl")):
    for split, n, seed in (("train", m["SFT_EXAMPLES_PER_PROMPT"], 1), ("validation", 1, 2)):
      index = exact.sample_responses(source, n, seed=m["WORLD_SEED"] + seed)  # [P, n]
      prompts = np.repeat(world.prompts, n, axis=0)
      exact_world.write_examples(data_dir, split, prompts, world.responses[index.reshape(-1)])
  return source


def rewards_of(world: exact.World, m: dict) -> dict[str, np.ndarray]:
  return {"length": exact.length_reward(world.responses, m["L_MIN"], m["L_MAX"]),
          "gold": exact.gold_reward(world.responses, world.content_ids, m["GOLD_SEED"],
                                    m["GOLD_SCALE"])}


def model_table(model_dir: str, world: exact.World) -> tuple[np.ndarray, np.ndarray]:
  """(renormalised sampler table, missing mass [P]) of a finished run's model."""
  model, params = common.load_policy(model_dir)
  return exact.renormalize(exact.sequence_logprobs(model, params, world.prompts,
                                                   world.responses, exclude_pad=True))


def write_pairs(data_dir: str, world: exact.World, logp_ref: np.ndarray, gold: np.ndarray,
                m: dict) -> None:
  if os.path.exists(os.path.join(data_dir, exact_world.PREFERENCE_SUBDIR, "validation.jsonl")):
    return
  for split, n, seed in (("train", m["PAIRS_PER_PROMPT"], 3), ("validation", 1, 4)):
    chosen, rejected = exact.preference_pairs(logp_ref, gold, n, seed=m["GOLD_SEED"] + seed)
    prompts = np.repeat(world.prompts, n, axis=0)
    exact_world.write_pairs(data_dir, split, prompts, world.responses[chosen.reshape(-1)],
                            world.responses[rejected.reshape(-1)])


def run_bindings(workdir: str, kind: str, beta: float, *, reward: str = "",
                 tables: str = "tables.npz", extra: tuple[str, ...] = ()) -> list[str]:
  """A run's gin bindings: BETA, the SFT model, the world's data and the KL hook
  (against the optimum of `reward`, default the objective's, in `tables`)."""
  _, default_reward, default_extra = OBJECTIVES.get(kind, ("", "", ()))
  model_dir = common.run_dir(workdir, kind, beta)
  return [f"BETA = {beta!r}", f"INIT_CHECKPOINT = '{os.path.join(workdir, 'sft')}'",
          f"exact_world_dir.path = '{os.path.join(workdir, 'data')}'",
          "train.eval_every = %EVAL_EVERY", "train.eval_hook = @KLToOptimum()",
          "KLToOptimum.model = @build_model()",
          f"KLToOptimum.tables = '{os.path.join(workdir, tables)}'",
          f"KLToOptimum.reward = '{reward or default_reward}'", "KLToOptimum.beta = %BETA",
          f"KLToOptimum.log_file = '{os.path.join(model_dir, CURVE_FILE)}'",
          *(extra or default_extra)]


def proxy_stage(workdir: str, world: exact.World, logp_ref: np.ndarray,
                rewards: dict[str, np.ndarray], m: dict, preset: str) -> dict:
  """Figure 3's proxy path: a reward model trained on the DPO pairs, policy gradient on
  it at BETA, against the exact optimum of the learned reward (its table over the
  world) and the gold one."""
  from deranj.training import rollouts  # pylint: disable=g-import-not-at-top
  rm_dir = os.path.join(workdir, "rm")
  common.train("configs/runs/reward_model.gin", preset, rm_dir,
               [f"INIT_CHECKPOINT = '{os.path.join(workdir, 'sft')}'",
                f"exact_world_dir.path = '{os.path.join(workdir, 'data')}'",
                f"RM_STEPS = {m['PROXY_RM_STEPS']}"])
  proxy = exact.reward_table(rollouts.LearnedReward(rm_dir), world.prompts, world.responses)
  proxy = proxy - proxy.mean(axis=1, keepdims=True)  # a per-prompt constant changes no optimum
  exact.save_tables(os.path.join(workdir, "tables_proxy.npz"), world, logp_ref,
                    {"proxy": proxy, "gold": rewards["gold"]})
  beta = m["BETA"]
  run = common.run_dir(workdir, "pg_proxy", beta)
  common.train(OBJECTIVES["pg"][0], preset, run, run_bindings(
      workdir, "pg_proxy", beta, reward="proxy", tables="tables_proxy.npz",
      extra=("PolicyGradient.reward = @LearnedReward()", f"LearnedReward.checkpoint = '{rm_dir}'")))
  table, missing = model_table(run, world)
  opt_proxy = exact.optimal_policy(logp_ref, proxy, beta)
  opt_gold = exact.optimal_policy(logp_ref, rewards["gold"], beta)
  gold_centered = rewards["gold"] - rewards["gold"].mean()
  return {
      "beta": beta, "missing_mass_max": float(missing.max()),
      "final_kl_to_proxy_optimum": exact.kl(table, opt_proxy).mean,
      "final_kl_to_gold_optimum": exact.kl(table, opt_gold).mean,
      "kl_proxy_optimum_to_gold_optimum": exact.kl(opt_proxy, opt_gold).mean,
      "proxy_gold_correlation": float(np.mean([np.corrcoef(p, gold_centered)[0, 1]
                                               for p in proxy])),
      "gold_reward": {"pg_on_proxy": exact.expected(table, rewards["gold"]).mean,
                      "proxy_optimum": exact.expected(opt_proxy, rewards["gold"]).mean,
                      "gold_optimum": exact.expected(opt_gold, rewards["gold"]).mean,
                      "reference": exact.expected(logp_ref, rewards["gold"]).mean},
      "curve": read_curve(run)}


def read_curve(model_dir: str) -> list[list[float]]:
  """[[step, KL to the optimum], ...], the last line per step (a resumed run repeats)."""
  by_step = {}
  path = os.path.join(model_dir, CURVE_FILE)
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        by_step[row["step"]] = row["exact/kl_to_optimum"]
  return [[s, by_step[s]] for s in sorted(by_step)]


def betas(m: dict) -> list[float]:
  """BETA first, then BETA / lam for each retrained lam."""
  return [m["BETA"]] + [m["BETA"] / lam for lam in m["RETRAIN_LAMS"] if lam != 1]


def measure(workdir: str, world: exact.World, logp_ref: np.ndarray,
            rewards: dict[str, np.ndarray], m: dict) -> dict:
  tree = exact.PrefixTree.build(world.responses)
  c_ref = exact.token_conditionals(logp_ref, tree)
  runs, per_objective = {}, {}
  for kind, (_, reward_name, _) in OBJECTIVES.items():
    r = rewards[reward_name]
    tables = {}
    for beta in betas(m):
      model_dir = common.run_dir(workdir, kind, beta)
      table, missing = model_table(model_dir, world)
      tables[beta] = table
      to_opt = exact.kl(table, exact.optimal_policy(logp_ref, r, beta))
      runs[os.path.basename(model_dir)] = {
          "kind": kind, "beta": beta, "reward": reward_name, "final_kl": to_opt.mean,
          "final_kl_per_prompt": to_opt.per_prompt, "missing_mass_max": float(missing.max()),
          "curve": read_curve(model_dir)}
    aligned = tables[m["BETA"]]
    c_aligned = exact.token_conditionals(aligned, tree)
    exact_rows = exact.realignment_errors(logp_ref, r, m["BETA"], m["LAMS"], tree,
                                          num_candidates=m["SIR_CANDIDATES"],
                                          num_draws=m["SIR_DRAWS"])
    rows = []
    for row in exact_rows:
      lam, beta_lam = row["lam"], row["beta_over_lam"]
      optimum = exact.optimal_policy(logp_ref, r, beta_lam)
      dera_q = exact.dera_from_conditionals(c_ref, c_aligned, lam)
      mixture = exact.geometric_mixture(logp_ref, aligned, lam)
      retrained = next((tables[b] for b in tables if np.isclose(b, beta_lam, rtol=1e-9)),
                       None)
      rows.append({
          "lam": lam, "beta_over_lam": beta_lam,
          "kl_exact_dera": row["kl_dera"], "kl_sir_exact": row["kl_sir"],
          "kl_trained_dera": exact.kl(dera_q, optimum).mean,
          "kl_trained_mixture": exact.kl(mixture, optimum).mean,
          "kl_sir_trained": {int(n): exact.kl(exact.sir_distribution(
              dera_q, mixture, int(n), num_draws=m["SIR_DRAWS"]), optimum).mean
                             for n in m["SIR_CANDIDATES"]},
          "kl_retrained": None if retrained is None else exact.kl(retrained, optimum).mean,
          "reward_optimum": row["reward_optimum"], "reward_exact_dera": row["reward_dera"],
          "reward_trained_dera": exact.expected(dera_q, r).mean,
          "reward_retrained": None if retrained is None else exact.expected(retrained, r).mean,
          "kl_optimum_ref": row["kl_optimum_ref"],
      })
    per_objective[kind] = {"reward": reward_name, "per_lam": rows}
  return {"runs": runs, "objectives": per_objective}


def plot(result: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  kinds = list(result["objectives"])
  fig, axes = plt.subplots(len(kinds), 3, figsize=(15, 4 * len(kinds)), squeeze=False)
  for row, kind in enumerate(kinds):
    obj = result["objectives"][kind]
    rows = obj["per_lam"]
    lams = [x["lam"] for x in rows]
    ax = axes[row, 0]
    floor = 1e-8  # log axis: exact zeros (lam = 1) drawn at the floor
    ax.plot(lams, [max(x["kl_exact_dera"], floor) for x in rows], "o-", color=COLORS["exact"],
            label="exact DeRa")
    ax.plot(lams, [max(x["kl_trained_dera"], floor) for x in rows], "s-",
            color=COLORS["trained"], label="trained DeRa")
    n = max(result["sir_candidates"])
    ax.plot(lams, [max(x["kl_sir_trained"][n], floor) for x in rows], "^--",
            color=COLORS["sir"], label=f"trained DeRa + SIR (N={n})")
    ret = [(x["lam"], max(x["kl_retrained"], floor)) for x in rows
           if x["kl_retrained"] is not None]
    ax.plot(*zip(*ret), "D", ms=8, color=COLORS["retrained"], label="retrained at β/λ")
    ax.set(xscale="log", yscale="log", xlabel="λ", ylabel="KL(· ‖ π*(β/λ)) nats/prompt",
           title=f"{kind}: distance to the optimum at β/λ (β = {result['beta']:g})")
    ax.axhline(TARGET_KL, color="gray", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    ax = axes[row, 1]
    ax.plot(lams, [x["reward_optimum"] for x in rows], "k-", lw=2, label="π*(β/λ)")
    ax.plot(lams, [x["reward_exact_dera"] for x in rows], "o--", color=COLORS["exact"],
            label="exact DeRa")
    ax.plot(lams, [x["reward_trained_dera"] for x in rows], "s-", color=COLORS["trained"],
            label="trained DeRa")
    ret = [(x["lam"], x["reward_retrained"]) for x in rows if x["reward_retrained"] is not None]
    ax.plot(*zip(*ret), "D", ms=8, color=COLORS["retrained"], label="retrained")
    ax.set(xscale="log", xlabel="λ", ylabel=f"E[{obj['reward']} reward]",
           title=f"{kind}: expected reward")
    ax.legend(fontsize=8)
    ax = axes[row, 2]
    for name, run in result["runs"].items():
      if run["kind"] == kind and run["curve"]:
        steps, kls = zip(*run["curve"])
        ax.plot(steps, np.maximum(kls, floor), label=f"β = {run['beta']:.3g}")
    ax.axhline(TARGET_KL, color="gray", lw=0.8, ls=":")
    ax.set(yscale="log", xlabel="step", ylabel="KL(π_θ ‖ π*(β))",
           title=f"{kind}: KL to the optimum during training")
    ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  common.save_figure(fig, path)
  plt.close(fig)


def report(result: dict) -> None:
  common.log(f"\nreference: missing mass {result['reference']['missing_mass_max']:.2e}, "
             f"KL(SFT || data) {result['reference']['kl_sft_to_data']:.4f}")
  common.log("\n| run | β | final KL to π*(β) | max over prompts |\n|---|---|---|---|")
  for name, run in result["runs"].items():
    common.log(f"| {name} | {run['beta']:.4g} | {run['final_kl']:.4f} | "
               f"{max(run['final_kl_per_prompt']):.4f} |")
  for kind, obj in result["objectives"].items():
    common.log(f"\n{kind} ({obj['reward']} reward): KL to π*(β/λ)\n"
               "| λ | exact DeRa | trained DeRa | SIR (trained) | retrained |\n|---|---|---|---|---|")
    n = max(result["sir_candidates"])
    for x in obj["per_lam"]:
      ret = "-" if x["kl_retrained"] is None else f"{x['kl_retrained']:.4f}"
      common.log(f"| {x['lam']:.4g} | {x['kl_exact_dera']:.2e} | {x['kl_trained_dera']:.4f} | "
                 f"{x['kl_sir_trained'][n]:.4f} | {ret} |")


def report_proxy(proxy: dict) -> None:
  common.log(f"\nproxy reward model (correlation with gold {proxy['proxy_gold_correlation']:.3f}): "
             f"PG at β = {proxy['beta']:g} ends at KL {proxy['final_kl_to_proxy_optimum']:.4f} "
             f"to the proxy's optimum, {proxy['final_kl_to_gold_optimum']:.4f} to the gold "
             f"one (the optima differ by {proxy['kl_proxy_optimum_to_gold_optimum']:.4f}); "
             "gold reward " + ", ".join(f"{k} {v:.3f}" for k, v in proxy["gold_reward"].items()))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args(argv)
  preset = f"exact_{args.preset}"
  m = common.preset_macros(preset, MACROS)
  workdir = os.path.abspath(args.workdir)
  data_dir = os.path.join(workdir, "data")
  os.makedirs(data_dir, exist_ok=True)
  timer = common.Timer()
  world = make_world(m)

  with timer("data"):
    source = write_sft_data(data_dir, world, m)
  with timer("sft"):
    common.train("configs/runs/sft.gin", preset, os.path.join(workdir, "sft"),
                 [f"exact_world_dir.path = '{data_dir}'"])
  with timer("reference"):
    logp_ref, missing = model_table(os.path.join(workdir, "sft"), world)
    rewards = rewards_of(world, m)
    exact.save_tables(os.path.join(workdir, "tables.npz"), world, logp_ref, rewards)
    write_pairs(data_dir, world, logp_ref, rewards["gold"], m)
  for kind, (run_gin, _, _) in OBJECTIVES.items():
    with timer(kind):
      for beta in betas(m):
        common.train(run_gin, preset, common.run_dir(workdir, kind, beta),
                     run_bindings(workdir, kind, beta))
  proxy = None
  if m["PROXY_RM_STEPS"] > 0:
    with timer("proxy"):
      proxy = proxy_stage(workdir, world, logp_ref, rewards, m, preset)
  with timer("measure"):
    result = {
        "preset": args.preset, "beta": m["BETA"], "lams": m["LAMS"],
        "retrain_lams": m["RETRAIN_LAMS"], "sir_candidates": m["SIR_CANDIDATES"],
        "target_kl": TARGET_KL,
        "world": {"prompts": len(world.prompts), "responses": len(world.responses),
                  "content_ids": world.content_ids, "max_len": m["WORLD_MAX_LEN"],
                  "length_range": [m["L_MIN"], m["L_MAX"]]},
        "reference": {"missing_mass_max": float(missing.max()),
                      "kl_sft_to_data": exact.kl(logp_ref, source).mean,
                      "kl_data_to_sft": exact.kl(source, logp_ref).mean},
        **measure(workdir, world, logp_ref, rewards, m),
        "proxy": proxy,
    }
    result["runs_meeting_target"] = sorted(
        k for k, v in result["runs"].items() if v["final_kl"] <= TARGET_KL)
  result["seconds"] = timer.seconds
  common.write_json(os.path.join(workdir, "exact_world.json"), result)
  plot(result, os.path.join(workdir, "exact_world.png"))
  report(result)
  if proxy:
    report_proxy(proxy)
  common.log(f"\nwrote {workdir}/exact_world.json and exact_world.png "
             f"({sum(timer.seconds.values()):.0f} s)")
  return result


if __name__ == "__main__":
  main()
