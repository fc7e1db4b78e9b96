"""Alignment training: objectives (PPO, policy gradient, DPO, reward model) and losses."""
