"""Logical axis names of parameters, shared by every architecture (T5 and decoder-only);
the partitioning rules map them onto mesh axes."""

VOCAB, EMBED, MLP, HEADS, KV, RELPOS = "vocab", "embed", "mlp", "heads", "kv", "relpos_buckets"
