"""The training loop every objective plugs into (T5X's trainer/train), driven by gin."""
