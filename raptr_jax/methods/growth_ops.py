"""Growth of a train state between stages: index maps over parameter axes, and the optimizer
state policy. Shared by layer stacking (``stacking.py``) and the growth operators
(``growth.py``: MSG, bert2BERT, LEMON).

The train state always has the final model's shapes; a stage runs the leading slices (its
``view``). Growing from one view to a larger one is a gather along the grown axes: position j of
an axis takes source position ``order[j]`` (its own index for positions that keep their unit,
the copied unit's index for new ones; positions beyond the new size keep their initial values).
Which axis a parameter's dimension is follows from its logical axis names (``layers``, ``embed``,
``heads``, ``mlp``), so one function grows every family (decoder, BERT, both T5 stacks).

Optimizer state at growth (``optimizer_state``): ``copy``: every position takes the state of
its source (a new layer starts with its source layer's moments); ``fresh``: new positions start
from the optimizer's initial state (zero moments), kept ones keep theirs (what the reference
code of No Train No Gain effectively does: new PyTorch parameters get fresh Adam state); ``reset``:
the whole state restarts from ``tx.init``. optax keeps one step count for all parameters, so
under ``fresh`` the new units' bias correction continues from the run's count rather than
restarting as PyTorch's per-parameter step would.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZER_STATE_POLICIES = ("copy", "fresh", "reset")
STACK_KEYS = ("layers", "encoder_layers", "decoder_layers")  # pure-dict keys of StackedLayers


@dataclasses.dataclass(frozen=True)
class AxisMap:
  """Growth of one axis: ``order[j]`` is the source of position j, ``new[j]`` whether
  position j is a new unit (a copy), over the axis' full (final) size."""
  order: np.ndarray
  new: np.ndarray

  @staticmethod
  def identity(size: int) -> "AxisMap":
    return AxisMap(np.arange(size), np.zeros(size, bool))

  def copies(self, old_size: int) -> np.ndarray:
    """How many positions of the grown range [0, new size) share each position's source."""
    return np.bincount(self.order, minlength=len(self.order))[self.order]


def depth_order(mode: str, old: int, new: int, total: int) -> AxisMap:
  """Layer order after growing a stack from ``old`` to ``new`` layers (of ``total`` slots).

  ``stack``: the whole stack again on top, new layer i copies layer i - old (i mod old)
  (Gong et al. 2019; No Train No Gain). ``interleave``: each layer repeated in place, A A B B
  (``new`` a multiple of ``old``). ``top``: the top ``new - old`` layers copied onto the top
  (gradual stacking, Reddi et al. 2023; MSG's depth operator). ``middle``: the middle block of
  ``new - old`` layers repeated after itself (MIDAS). ``consecutive``: each of the top
  ``new - old`` layers followed by its copy (LEMON, "layer interpolation")."""
  n = new - old
  if mode == "stack":
    order = list(range(old)) + [i % old for i in range(old, new)]
    is_new = [False] * old + [True] * n
  elif mode == "interleave":
    r = new // old
    order = [i // r for i in range(new)]
    is_new = [i % r != 0 for i in range(new)]
  elif mode == "top":
    order = list(range(old)) + list(range(old - n, old))
    is_new = [False] * old + [True] * n
  elif mode == "middle":
    start = (old - n) // 2
    order = list(range(start + n)) + list(range(start, start + n)) + list(range(start + n, old))
    is_new = [False] * (start + n) + [True] * n + [False] * (old - start - n)
  elif mode == "consecutive":
    order = list(range(old - n))
    is_new = [False] * (old - n)
    for i in range(old - n, old):
      order += [i, i]
      is_new += [False, True]
  else:
    raise ValueError(f"unknown depth growth mode {mode!r}")
  order += list(range(new, total))
  is_new += [False] * (total - new)
  return AxisMap(np.asarray(order, np.int32), np.asarray(is_new, bool))


def hidden_axis(name: str) -> str:
  """Norm scales run along the hidden dimension: they grow with ``embed``."""
  return "embed" if name == "norm" else name


def leaf_maps(params, axes, stack_maps: dict, axis_maps: dict | None = None):
  """Per parameter, the AxisMap of each of its dimensions (None: unchanged): ``stack_maps``
  {stack key: AxisMap of its ``layers`` axis}; ``axis_maps`` {logical axis name: AxisMap} for
  width axes (``embed``, ``heads``, ``mlp``)."""
  axis_maps = axis_maps or {}

  def walk(tree, ax, stack):
    if isinstance(tree, dict):
      return {k: walk(v, ax[k], k if k in STACK_KEYS else stack) for k, v in tree.items()}
    return tuple(stack_maps.get(stack) if name == "layers" else axis_maps.get(hidden_axis(name)) for name in ax)

  return walk(params, axes, None)


def gather_leaf(leaf, maps):
  for axis, m in enumerate(maps):
    if m is not None:
      leaf = jnp.take(leaf, jnp.asarray(m.order), axis=axis)
  return leaf


def new_mask(leaf, maps):
  """bool mask of ``leaf``'s shape: True where any grown axis is at a new position."""
  mask = jnp.zeros(leaf.shape, bool)
  for axis, m in enumerate(maps):
    if m is not None:
      shape = [1] * leaf.ndim
      shape[axis] = leaf.shape[axis]
      mask = mask | jnp.asarray(m.new).reshape(shape)
  return mask


def _is_maps(x):
  return isinstance(x, tuple) and all(m is None or isinstance(m, AxisMap) for m in x)


def grow_params(params, maps):
  return jax.tree.map(gather_leaf, params, maps, is_leaf=_is_maps)


def grow_opt_state(tx, opt_state, new_params, maps, policy: str):
  """The optimizer state after growth under ``policy`` (see the module docstring)."""
  if policy not in OPTIMIZER_STATE_POLICIES:
    raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATE_POLICIES}, got {policy!r}")
  fresh = tx.init(new_params)
  if policy == "reset":
    return fresh
  flat_maps = jax.tree.leaves(maps, is_leaf=_is_maps)
  treedef = jax.tree.structure(new_params)
  map_tree = jax.tree.unflatten(treedef, list(range(len(flat_maps))))  # leaf index per param

  def move(leaf, index):
    return gather_leaf(leaf, flat_maps[index])

  moved = optax.tree_map_params(tx, move, opt_state, map_tree)
  if policy == "copy":
    return moved
  news = optax.tree_map_params(tx, lambda leaf, index: new_mask(leaf, flat_maps[index]), fresh, map_tree,
                               transform_non_params=lambda _: None)
  return jax.tree.map(lambda m, f, n: m if n is None else jnp.where(n, f, m), moved, fresh, news,
                      is_leaf=lambda x: x is None)


def has_unmapped_state(tx, params) -> bool:
  """True when the optimizer keeps array state that is not shaped like the parameters
  (Adafactor's factored moments), which growth cannot move with its parameters."""
  state = jax.eval_shape(tx.init, params)
  marks = optax.tree_map_params(tx, lambda _: None, state, transform_non_params=lambda x: x)
  return any(len(getattr(x, "shape", ())) > 0 for x in jax.tree.leaves(marks))
