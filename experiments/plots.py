"""Every figure's plotting, from the result dict a driver writes to figN.json."""
from __future__ import annotations

from experiments import common
from experiments.judging import JUDGES
from experiments.stages import METHODS
STYLES = {"dera": ("s-", "DeRa", "C0"), "retrained": ("^--", "retrained", "C1"),
          "dera_resampled": ("o:", "DeRa + SIR (exact mixture)", "C2")}
Z95 = 1.959964  # normal quantile of a two-sided 95% interval
OPTIMUM_LABEL = "optimum, β/λ (SNIS of SFT samples; ESS < {min_ess:g} omitted)"


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _optimum_values(rows, key) -> list[float]:
  """The optimum's `key` per λ, NaN (a gap in the line) where the point is left out."""
  return [float("nan") if r["optimum"]["left_out"] else r["optimum"][key] for r in rows]


def _plot_optimum(ax, x, rows, key, min_ess) -> None:
  ax.plot(x, _optimum_values(rows, key), "k.-", linewidth=1.5, zorder=5,
          label=OPTIMUM_LABEL.format(min_ess=min_ess))


def _mark_unconverged(ax, x, y, plateau) -> None:
  """A red ring around each retrained point whose run failed its plateau test."""
  bad = [i for i, ok in enumerate(plateau) if not ok]
  if bad:
    ax.scatter([x[i] for i in bad], [y[i] for i in bad], s=160, facecolors="none",
               edgecolors="red", linewidths=1.5, zorder=6, label="retrained: not at a plateau")


def _log_lam_axis(ax, lams) -> None:
  ax.set_xscale("log")
  ax.set_xticks(lams, [f"{x:.2g}" for x in lams], fontsize=8)
  ax.minorticks_off()
  ax.set_xlabel("λ (retrained at β/λ)")


def figure2(result: dict, path: str) -> None:
  """(a) mean length reward against λ, 95% intervals clustered by prompt; (b) DeRa's and
  (c) the retrained models' length distributions, the rewarded range shaded."""
  plt = _pyplot()
  rows = result["per_lam"]
  lams = [r["lam"] for r in rows]
  lo, hi = result["length_range"]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
  ax = axes[0]
  for method in METHODS:
    fmt, label, color = STYLES[method]
    ax.errorbar(lams, [r[method]["length_reward"] for r in rows],
                yerr=[Z95 * r[method]["length_reward_se"] for r in rows], fmt=fmt,
                capsize=3, color=color, label=label,
                alpha=0.7 if method == "dera_resampled" else 1.0)
  seeds_note = ""
  if "per_seed" in result:  # behind the first seed's points: the range over seeds
    spread = result["across_seeds"]
    seeds = ",".join(map(str, spread["seeds"]))
    for method in ("dera", "retrained"):
      _, label, color = STYLES[method]
      ax.fill_between(lams, [r[method]["min"] for r in spread["per_lam"]],
                      [r[method]["max"] for r in spread["per_lam"]], color=color, alpha=0.18,
                      linewidth=0, zorder=0, label=f"{label}: range over seeds {seeds}")
    seeds_note = (f"\nPanel (a): points and error bars of seed {result['seed']}; shaded: "
                  f"min to max over seeds {seeds}.")
  min_ess = result["optimum"]["min_ess"]
  _plot_optimum(ax, lams, rows, "length_reward", min_ess)
  _mark_unconverged(ax, lams, [r["retrained"]["length_reward"] for r in rows],
                    [r["retrained"]["plateau"] for r in rows])
  _log_lam_axis(ax, lams)
  ax.set_ylabel(f"mean length reward (0: every length in [{lo}, {hi}])")
  ax.set_title(f"(a) length reward, β = {result['beta']:g}", fontsize=10)
  ax.legend(fontsize=8)
  for ax, key, title in ((axes[1], "dera", "(b) DeRa"), (axes[2], "retrained",
                                                         "(c) retrained")):
    ax.boxplot([r[key]["lengths"] for r in rows], showfliers=False)
    ax.set_xticks(range(1, len(lams) + 1), [f"{x:g}" for x in lams])
    ax.axhspan(lo, hi, color="red", alpha=0.12, label=f"rewarded range [{lo}, {hi}]")
    ax.plot(range(1, len(lams) + 1), _optimum_values(rows, "mean_length"), "k.-",
            label="optimum's mean length")
    ax.set_xlabel("λ")
    ax.set_ylabel("response length (tokens)")
    ax.set_title(f"{title}: length distributions", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
  fig.suptitle(f"Figure 2 ({result['preset']} preset). Length reward (eq. 10): 0 for a "
               f"response of {lo} to {hi} tokens, -1 otherwise, so the mean is minus the "
               "share outside the range.\nError bars: 95% intervals from the standard error "
               f"of the {result['num_prompts']} per-prompt means "
               f"({result['samples_per_prompt']} samples each). Optimum π*(β/λ): "
               f"{result['optimum']['sft_samples_per_prompt']} SFT samples per prompt "
               f"reweighted by exp(r / (β/λ)).{seeds_note}", fontsize=10)
  fig.tight_layout()
  common.save_figure(fig, path)
  plt.close(fig)


def summarization_figure(result: dict, path: str) -> None:
  """Row per judge: (a) vs SFT, (b) vs the β model, (c) vs the retrained model at the same
  λ; (d) eq. 14 pairwise accuracy, (e) mean gold reward. DeRa ■, retrained ▲, red line
  at the β model; the optimum π*(β/λ) in black on (a, gold judge) and (e), red rings on
  retrained runs not at a plateau."""
  plt = _pyplot()
  rows = result["per_lam"]
  lams = [r["lam"] for r in rows]
  beta_row = next(r for r in rows if r["lam"] == 1)
  fig, axes = plt.subplots(2, 4, figsize=(20, 9.2), gridspec_kw={"wspace": 0.3, "hspace": 0.3})
  min_ess = result["optimum"]["min_ess"]
  plateau = [r["retrained"]["plateau"] for r in rows]

  def curve(ax, method, get, **kwargs):
    values = [get(r[method]) for r in rows]
    if isinstance(values[0], dict):  # a WinRate: error bars from its interval
      y = [v["rate"] for v in values]
      err = [[v["rate"] - v["low"] for v in values], [v["high"] - v["rate"] for v in values]]
      ax.errorbar(lams, y, yerr=err, fmt=STYLES[method][0], capsize=3,
                  label=STYLES[method][1], color=STYLES[method][2], **kwargs)
    else:
      ax.plot(lams, values, STYLES[method][0], label=STYLES[method][1],
              color=STYLES[method][2], **kwargs)

  for row, judge in enumerate(JUDGES):
    name = "gold reward model" if judge == "gold" else "ROUGE-L"
    panels = (("vs_sft", "(a) vs SFT", beta_row["retrained"][judge]["vs_sft"]["rate"]),
              ("vs_beta", "(b) vs π(β)", 0.5),
              ("vs_retrained", "(c) DeRa vs retrained π(β/λ)", 0.5))
    for col, (key, title, red) in enumerate(panels):
      ax = axes[row, col]
      for method in METHODS:
        if key == "vs_retrained" and method == "retrained":
          continue
        curve(ax, method, lambda m, key=key, judge=judge: m[judge][key],
              alpha=0.6 if method == "dera_resampled" else 1.0)
      ax.axhline(red, color="red", linewidth=1)
      ax.set_title(f"{title}; judge: {name}", fontsize=10)
      ax.set_ylabel("win rate (95% CI)")
      if (judge, key) == ("gold", "vs_sft"):
        if "per_seed" in result:  # behind the first seed's points: the range over seeds
          spread = result["across_seeds"]
          seeds = ",".join(map(str, spread["seeds"]))
          for method in ("dera", "retrained"):
            ax.fill_between(lams, [r[method]["min"] for r in spread["per_lam"]],
                            [r[method]["max"] for r in spread["per_lam"]],
                            color=STYLES[method][2], alpha=0.18, linewidth=0, zorder=0,
                            label=f"{STYLES[method][1]}: range over seeds {seeds}")
        _plot_optimum(ax, lams, rows, "gold_vs_sft", min_ess)
        _mark_unconverged(ax, lams, [r["retrained"]["gold"]["vs_sft"]["rate"] for r in rows],
                          plateau)
  ax = axes[0, 3]
  for method in ("dera", "retrained"):
    curve(ax, method, lambda m: m["pairwise_accuracy"])
  ax.axhline(beta_row["retrained"]["pairwise_accuracy"], color="red", linewidth=1)
  ax.set_title("(d) eq. 14 pairwise accuracy, held-out pairs", fontsize=10)
  ax.set_ylabel("pairwise accuracy")
  ax = axes[1, 3]
  for method in METHODS:
    curve(ax, method, lambda m: m["mean_gold_reward"])
  _plot_optimum(ax, lams, rows, "mean_gold_reward", min_ess)
  _mark_unconverged(ax, lams, [r["retrained"]["mean_gold_reward"] for r in rows], plateau)
  ax.axhline(result["sft"]["mean_gold_reward"], color="grey", linewidth=1, linestyle=":")
  ax.set_title("(e) mean gold reward (grey: SFT)", fontsize=10)
  ax.set_ylabel("gold reward")
  for ax in axes.flat:
    if ax.has_data():
      _log_lam_axis(ax, lams)
      ax.legend(fontsize=8)
  fig.suptitle(f"Figure {result['figure']}: DeRa vs retrained, {result['aligner']}, "
               f"β = {result['beta']:g} ({result['preset']} preset). Optimum π*(β/λ) of the "
               f"{result['optimum']['reward'].split(',')[0].split(':')[0]}: "
               f"{result['optimum']['sft_samples_per_prompt']} SFT samples per prompt "
               "reweighted" + (f"; points: seed {result['seed']}, shaded on (a): min to max "
                               f"over seeds {','.join(map(str, result['seeds']))}"
                               if "per_seed" in result else ""))
  common.save_figure(fig, path)
  plt.close(fig)
