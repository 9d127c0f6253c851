"""Freezing parameters a step marks inactive: no update, optimizer state untouched.

RaPTr, layer dropping and stacking leave some layers out of a step. Under plain optax those
layers still get their (zero) gradient pushed through the moments and weight decay; PyTorch
references instead skip them. ``freeze_inactive(inner)`` gives the second semantics: pass
``active=`` (a pytree like the params whose leaves are booleans broadcastable over the leading
axis of each leaf, e.g. shape [L] for stacked layers, the leaf's own shape, or a scalar) and
inactive slices keep their
parameters bitwise and every param-shaped state leaf of ``inner`` (moments, Hessian EMA, ...) as
it was. Step counters and other non-parameter state advance as usual.
"""
import jax
import jax.numpy as jnp
import optax


def _broadcast(mask, leaf):
  mask = jnp.asarray(mask, bool)
  if mask.ndim == 0 or mask.shape == leaf.shape:
    return mask
  if leaf.ndim == 0 or leaf.shape[0] != mask.shape[0]:
    raise ValueError(f"activity mask of shape {mask.shape} does not match the leading axis of a "
                     f"leaf of shape {leaf.shape}")
  return mask.reshape(mask.shape + (1,) * (leaf.ndim - 1))


def freeze_inactive(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return inner.init(params)

  def update_fn(updates, state, params=None, *, active=None, **extra):
    new_updates, new_state = inner.update(updates, state, params, **extra)
    if active is None:
      return new_updates, new_state
    new_updates = jax.tree.map(lambda u, a: jnp.where(_broadcast(a, u), u, jnp.zeros_like(u)),
                               new_updates, active)
    # The activity mask at every param-shaped position of the state, None elsewhere.
    marks = optax.tree_map_params(inner, lambda _, a: a, new_state, active,
                                  transform_non_params=lambda _: None)
    new_state = jax.tree.map(
        lambda a, new, old: new if a is None else jnp.where(_broadcast(a, new), new, old),
        marks, new_state, state, is_leaf=lambda x: x is None)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def layer_activity(params, layer_indices, num_layers: int | None = None, stacked_key: str = "layers"):
  """Activity pytree for layer selections: the leaves of each selected stack get a [L] mask
  (True at the selected layers), every other leaf True.

  ``layer_indices``: the indices into ``params[stacked_key]`` (or a bool [L] mask of them), or a
  mapping ``{stacked_key: indices or mask}`` for models with several stacks (encoder-decoder)."""
  if not isinstance(layer_indices, dict):
    layer_indices = {stacked_key: layer_indices}
  out = {}
  for key, value in params.items():
    if key in layer_indices:
      L = num_layers or jax.tree.leaves(value)[0].shape[0]
      given = jnp.asarray(layer_indices[key])
      mask = given if given.dtype == bool else jnp.zeros((L,), bool).at[given].set(True)
      out[key] = jax.tree.map(lambda _, m=mask: m, value)
    else:
      out[key] = jax.tree.map(lambda _: True, value)
  return out
