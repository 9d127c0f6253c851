"""Device mesh and logical-axis sharding rules (data, stage, fsdp, tensor).

Parameters carry logical axis names (``logical_axes`` metadata, e.g. ('layers', 'embed', 'mlp'));
``RULES`` maps each name to mesh axes. A dimension that a mesh axis does not divide is
replicated instead of failing, so tiny test models shard on any mesh.

``stage`` is the pipeline axis: the stacked layers split over it, contiguous blocks of layers
per device (a method that pipelines places one component per stage device, interlocking
backprop; every other method runs with ``mesh.stage=1``, where it changes nothing). Auxiliary
heads stack on their own axis (``aux_layers``), replicated over stages.
"""
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "stage", "fsdp", "tensor")
PIPELINE_AXIS = "stage"
BATCH_AXES = ("data", "fsdp")
RULES = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": "stage",
    "aux_layers": None,
    "norm": None,
    "length": None,
    "relpos_buckets": None,
}


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
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


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
