"""Parameters for tiny test models, drawn with NumPy (flax's random init is slow on a busy
CPU)."""
import jax
import numpy as np


def random_params(model, seed):
  """A params tree shaped like `model.param_shapes()`: RMS-norm gains near 1, other
  leaves N(0, 1/fan_in), float32."""
  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    if jax.tree_util.keystr(path).endswith("['scale']"):  # RMS-norm gains
      return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (rng.standard_normal(shape) * shape[0] ** -0.5).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, model.param_shapes(),
                                          is_leaf=lambda x: isinstance(x, tuple))
