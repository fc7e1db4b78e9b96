r"""Figure 7: DeRa at λ against DPO models retrained at β/λ, on summarization judged by a
gold reward model (paper App. D.3).

    python experiments/fig7_dpo.py --preset tiny --workdir /tmp/deranj/figs [--seeds 0,1,2]

Offline stand-in for human labels: the paper's DPO learns from human comparisons
(Stiennon et al. 2020) and PaLM 2 judges the samples. Here a *gold* reward model, trained
on GOLD_PREFERENCE_TASK, plays the humans: it labels pairs of SFT samples (DIR/pairs,
the `preference_pairs` task), on which DPO trains, and judges the samples. ROUGE-L
against the reference summaries is a second judge.

Stages (each training run skipped when already finished; see experiments/summarization.py):
  1. `sft`, 2. `gold_rm`, 3. `pairs/` (shared with Figure 3 in the same --workdir);
  4. `dpo_beta<β>`: DPO (configs/runs/dpo.gin) at β on the pairs from SFT, and
     `dpo_beta<β/λ>` for every λ ≠ 1 of the grid;
  5. one DeRa sweep, retrained-model samples, importance-resampled DeRa, both judges,
     eq. 14 pairwise accuracy; the optimum π*(β/λ) of the gold reward (DPO's implied
     one); fig7.json and fig7.png (panels a, b as the paper's Figure 7, c DeRa against
     retrained, d pairwise accuracy; the optimum in black; mean gold rewards bottom right).

`--seeds 0,1,2` trains stage 4 once per seed (SEED = s, in scripts/sweep.py's directories
`dpo_beta<β>_seed<s>`, seed 0 without the suffix) and repeats stage 5 per seed; fig7.json
adds `per_seed` and `across_seeds` and panel (a) shades the range over seeds
(experiments/summarization.py).
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402  pylint: disable=g-import-not-at-top
from experiments import stages  # noqa: E402
from experiments import summarization  # noqa: E402

KIND = "dpo"
RUN = "configs/runs/dpo.gin"


def train_aligned(ctx: stages.Context, beta: float, seed: Optional[int] = None) -> bool:
  return ctx.train(RUN, common.run_dir(ctx.workdir, KIND, beta, seed or 0), [
      f"INIT_CHECKPOINT = '{ctx.sft_dir}'", *ctx.pair_bindings(),
      *stages.beta_bindings(ctx.preset, KIND, beta),
      *([f"SEED = {seed}"] if seed is not None else []),
      *stages.eval_bindings(ctx.preset, KIND)])


def implied_reward(ctx: stages.Context, gold, batch_size: int):
  """DPO's pairs are labelled by the gold reward's Bradley-Terry model, so the reward
  DPO implicitly fits, and its optimum, is the gold one."""
  del ctx, batch_size
  return ("gold reward model (gold_rm): it labels DPO's pairs by Bradley-Terry, so it is "
          "the reward DPO implicitly fits", gold)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  return summarization.run("7", "DPO", KIND, argv, __doc__.split("\n")[0], train_aligned,
                           optimum_reward=implied_reward)


if __name__ == "__main__":
  main()
