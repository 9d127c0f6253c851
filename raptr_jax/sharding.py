"""Device mesh and logical-axis sharding rules (data, stage, fsdp, tensor).

Parameters carry logical axis names (``logical_axes`` metadata, e.g. ('layers', 'embed', 'mlp'));
``RULES`` maps each name to mesh axes. A dimension that a mesh axis does not divide is
replicated instead of failing, so tiny test models shard on any mesh.

``stage`` is the pipeline axis: the stacked layers split over it, contiguous blocks of layers
per device (a method that pipelines places one component per stage device, interlocking
backprop; every other method runs with ``mesh.stage=1``, where it changes nothing). Auxiliary
heads stack on their own axis (``aux_layers``), replicated over stages.

Activations carry logical axes too (``constrain``; ``ACTIVATION_RULES``): inside a step
(``activation_sharding(mesh)``) every activation keeps its batch dimension over (data, fsdp)
and its heads / MLP / vocabulary dimension over tensor, so FSDP shards the activations like
data parallelism does and gathers the weights instead (without the constraints XLA may follow
the fsdp-sharded embedding dimension and keep full-batch activations, logits included, on
every device).
"""
import contextlib
import contextvars
import functools
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "stage", "fsdp", "tensor")
PIPELINE_AXIS = "stage"
BATCH_AXES = ("data", "fsdp")
RULES = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",     # grouped-query attention's key/value heads
    "mlp": "tensor",
    "head_dim": None,
    "token_types": None,
    "layers": "stage",
    "aux_layers": None,
    "norm": None,
    "length": None,
    "relpos_buckets": None,
}
# Activations: batch over every data-parallel axis, the model dimension whole (the weights'
# fsdp shards are gathered), heads / MLP units / vocabulary over tensor.
ACTIVATION_RULES = {
    "batch": BATCH_AXES,
    "length": None,
    "embed": None,
    "heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "token_types": None,
}
_ACTIVATION_MESH = contextvars.ContextVar("activation_mesh", default=None)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int, int]:
  """Resolves sizes (-1 = the remaining devices) and checks they cover every device (an axis
  ``mesh_cfg`` leaves out has size 1)."""
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not "
                       f"divisible by the fixed axes' product {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} has {int(np.prod(sizes))} devices but "
                     f"{num_devices} are available; set mesh.data/stage/fsdp/tensor so their product is "
                     f"{num_devices}, or one of them to -1")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The mesh over ``devices`` (default all). On TPU the device order follows the chips'
  torus (``mesh_utils``); over several slices only ``data`` crosses them (DCN), so
  ``mesh.data`` must be a multiple of the slice count."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  slices = len({getattr(d, "slice_index", None) for d in devices})
  if slices > 1:
    if shape[0] % slices:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} over {slices} slices: only the data axis crosses "
                       f"slices, so mesh.data must be a multiple of {slices} (e.g. mesh.data={slices} and the "
                       "other axes within a slice)")
    ici = (shape[0] // slices, *shape[1:])
    order = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1, 1), devices, allow_split_physical_axes=True)
  elif devices[0].platform == "tpu":
    order = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  else:
    order = np.asarray(devices).reshape(shape)
  return Mesh(order, MESH_AXES)


def spec_for(axes, shape, mesh: Mesh, rules=RULES) -> P:
  """PartitionSpec of an array with these logical axes; undivisible dims are replicated."""
  out, used = [], set()
  for name, dim in zip(axes, shape):
    target = rules.get(name)
    if target is None:
      out.append(None)
      continue
    names = (target,) if isinstance(target, str) else tuple(target)
    names = tuple(n for n in names if mesh.shape.get(n, 1) > 1 and n not in used)
    size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    if not names or dim % size:
      out.append(None)
      continue
    used.update(names)
    out.append(names[0] if len(names) == 1 else names)
  return P(*out)


def logical_axes_tree(state):
  """Nested dict (same structure as ``nnx.to_pure_dict(state)``) of each param's logical axes."""
  out = {}
  for key, value in state.items():
    if isinstance(value, nnx.Variable):
      axes = value.get_metadata().get("logical_axes")
      out[key] = tuple(axes) if axes is not None else (None,) * value.value.ndim
    elif isinstance(value, Mapping):
      out[key] = logical_axes_tree(value)
  return out


def param_shardings(params, axes_tree, mesh: Mesh):
  return jax.tree.map(lambda p, a: NamedSharding(mesh, spec_for(a, p.shape, mesh)), params, axes_tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None):
  """Within this context (the trace of a step), ``constrain`` pins activations to ``mesh``;
  ``None`` switches it off (inside ``shard_map``, whose bodies see per-device shapes)."""
  token = _ACTIVATION_MESH.set(mesh)
  try:
    yield
  finally:
    _ACTIVATION_MESH.reset(token)


def on_mesh(fn, mesh: Mesh | None):
  """``fn`` traced inside ``activation_sharding(mesh)`` (a step's body; ``None``: a
  ``shard_map`` body)."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with activation_sharding(mesh):
      return fn(*args, **kwargs)
  return traced


def constrain(x, axes):
  """``x`` with the sharding its logical ``axes`` (``ACTIVATION_RULES``) give on the active
  mesh (``activation_sharding``); unchanged outside a step or on one device."""
  mesh = _ACTIVATION_MESH.get()
  if mesh is None:
    return x
  if len(axes) != x.ndim:
    raise ValueError(f"constrain: {len(axes)} logical axes {axes} for an array of shape {x.shape}")
  if mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(axes, x.shape, mesh, ACTIVATION_RULES)))
