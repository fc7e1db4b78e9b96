"""Offline stand-ins for the paper's PaLM 2 judge, win rates, pairwise accuracy and the
optimum.

judges: pairwise judges (ROUGE-L against a reference, a learned reward model) and the
  random position swap the paper applies to its judge (App. D.3).
win_rates: win rates with confidence intervals, pairwise accuracy (paper eq. 14) of
  DeRa models, and small statistics the figures report.
optimum: expectations under the KL-regularised optimum pi*(beta) by self-normalised
  importance sampling of the SFT model's samples, with their effective sample size.
"""
