"""Offline stand-ins for the paper's PaLM 2 judge, win rates and pairwise accuracy.

judges: pairwise judges (ROUGE-L against a reference, a learned reward model) and the
  random position swap the paper applies to its judge (App. D.3).
win_rates: win rates with confidence intervals, pairwise accuracy (paper eq. 14) of
  DeRa models, and small statistics the figures report.
"""
