"""deranj: decoding-time realignment (DeRa) of language models in JAX/Flax.

Layers, each importing only those before it:
  data -> models -> decoding -> dera -> training -> evaluation -> experiments
"""
__version__ = "0.1.0"
