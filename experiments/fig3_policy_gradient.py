r"""Figure 3: DeRa at λ against policy-gradient models retrained at β/λ, on summarization
judged by a gold reward model (paper Sec. 5.4, App. D.3).

    python experiments/fig3_policy_gradient.py --preset tiny --workdir /tmp/deranj/figs \
        [--seeds 0,1,2]

Offline stand-in for human labels: the paper's reward model learns from human
comparisons (Stiennon et al. 2020) and PaLM 2 judges the samples. Here a *gold* reward
model, trained on GOLD_PREFERENCE_TASK with more pairs and steps, plays the humans: it
labels pairs of SFT samples (DIR/pairs, the `preference_pairs` task) and judges the
samples. A *proxy* reward model trained only on those labelled pairs is what the policy
optimises, so the aligned models can over-optimise it, as against a learned human
reward (Gao et al. 2023). ROUGE-L against the reference summaries is a second judge.

Stages (each training run skipped when already finished; see experiments/summarization.py):
  1. `sft`, 2. `gold_rm`, 3. `pairs/` (shared with Figure 7 in the same --workdir);
  4. `proxy_rm`: configs/runs/reward_model.gin on the pairs for PROXY_RM_STEPS;
  5. `pg_beta<β>`: policy gradient (configs/runs/pg_reward.gin, REWARD_MODEL = proxy_rm)
     at β from SFT, and `pg_beta<β/λ>` for every λ ≠ 1 of the grid;
  6. one DeRa sweep, retrained-model samples, importance-resampled DeRa, both judges,
     eq. 14 pairwise accuracy; the optimum π*(β/λ) of the proxy reward, judged by gold;
     fig3.json and fig3.png (panels a, b, c as the paper's Figure 3, d as its Figure 6,
     the optimum in black; mean gold rewards bottom right).

`--seeds 0,1,2`: stage 5 once per seed (SEED = s, `pg_beta<β>_seed<s>`), stage 6 per seed,
the spread in fig3.json (`per_seed`, `across_seeds`) and panel (a).
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402  pylint: disable=g-import-not-at-top
from experiments import stages  # noqa: E402
from experiments import summarization  # noqa: E402

KIND = "pg"
RUN = "configs/runs/pg_reward.gin"


def proxy_dir(ctx: stages.Context) -> str:
  return common.run_dir(ctx.workdir, "proxy_rm")


def train_proxy(ctx: stages.Context) -> bool:
  """The proxy reward model: the SFT model's encoder fit to the gold-labelled pairs."""
  return ctx.train(stages.RM_RUN, proxy_dir(ctx), [
      f"INIT_CHECKPOINT = '{ctx.sft_dir}'", *ctx.pair_bindings(),
      "RM_STEPS = %PROXY_RM_STEPS"])


def train_aligned(ctx: stages.Context, beta: float, seed: Optional[int] = None) -> bool:
  return ctx.train(RUN, common.run_dir(ctx.workdir, KIND, beta, seed or 0), [
      f"INIT_CHECKPOINT = '{ctx.sft_dir}'", f"REWARD_MODEL = '{proxy_dir(ctx)}'",
      f"BETA = {beta}", *([f"SEED = {seed}"] if seed is not None else []),
      *stages.eval_bindings(ctx.preset, KIND)])


def proxy_reward(ctx: stages.Context, gold, batch_size: int):
  """The optimum of Figure 3 is the proxy reward's (what policy gradient maximises),
  judged by gold."""
  del gold
  from deranj.evaluation import judges  # pylint: disable=g-import-not-at-top
  from deranj.training import reward_model  # pylint: disable=g-import-not-at-top
  return ("proxy reward model (proxy_rm), the reward policy gradient maximises",
          judges.RewardModelJudge(*reward_model.load_reward_model(proxy_dir(ctx)),
                                  batch_size=batch_size))


def main(argv: Optional[Sequence[str]] = None) -> dict:
  return summarization.run("3", "policy gradient against a proxy reward model", KIND, argv,
                           __doc__.split("\n")[0], train_aligned,
                           prepare=("proxy_rm", train_proxy), optimum_reward=proxy_reward)


if __name__ == "__main__":
  main()
