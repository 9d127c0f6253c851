"""Named accelerator topologies for ahead-of-time compilation on any machine (``aot.py``).

A TPU slice is named as Cloud TPU names it: ``v4-8``, ``v5p-128`` (TensorCores; one megacore
device per chip, 3-D torus), ``v5e-256`` / ``v5litepod-256`` and ``v6e-64`` (chips, 2-D), or
by its chip grid, ``v5p:4x4x4``. ``slices`` > 1 is a multislice job (the slices joined over
DCN). Their compile-only devices come from the ``libtpu`` wheel (``pip install -e .[tpu]``);
no TPU is needed. ``local`` is this machine's own devices (a GPU box compiles for its GPUs).

HBM per device is the chip's: v4 32 GiB, v5p 95 GiB, v5e 16 GiB, v6e 32 GiB.
"""
import dataclasses
import math
import os
import re

import jax

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Generation:
  dims: int             # the chip grid: 3-D torus (v4, v5p) or 2-D (v5e, v6e)
  cores_in_name: bool   # v4-N / v5p-N count TensorCores (2 per chip), the others chips
  chip_config: str      # 'megacore': one device per chip
  hbm_bytes: int        # per device


GENERATIONS = {
    "v4": Generation(3, True, "megacore", 32 * GiB),
    "v5p": Generation(3, True, "megacore", 95 * GiB),
    "v5e": Generation(2, False, "default", 16 * GiB),
    "v6e": Generation(2, False, "default", 32 * GiB),
}
ALIASES = {"v5litepod": "v5e"}
EXAMPLES = "v4-8, v5p-128, v5e-256, v6e-64, v5p:4x4x4 or local"


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str                     # as given
  devices: tuple                # compile-only devices (or this machine's)
  hbm_bytes: int | None         # per device; None: unknown (a local CPU)
  description: str              # "v5p 4x4x4, 64 chips, 1 slice"

  @property
  def hosts(self) -> int:
    return len({d.process_index for d in self.devices})


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
  """The slice's chip grid for a power-of-two chip count, grown as Cloud TPU shapes grow:
  double the smallest dimension (the last of equals): 3-D 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4,
  4x4x8, ...; 2-D 1x1, 1x2, 2x2, 2x4, 4x4, 4x8, ..."""
  grid = [2, 2, 1] if dims == 3 else [1, 1]
  if chips < math.prod(grid) or chips & (chips - 1):
    raise ValueError(f"{chips} chips: a {dims}-D slice has a power-of-two number of chips, at least "
                     f"{math.prod(grid)}")
  while math.prod(grid) < chips:
    smallest = min(grid)
    i = max(j for j, n in enumerate(grid) if n == smallest)
    grid[i] *= 2
  return tuple(grid)


def parse(name: str) -> tuple[str, tuple[int, ...]]:
  """'v5p-128' or 'v5p:4x4x4' -> ('v5p', (4, 4, 4)); a clear error for anything else."""
  m = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
  generation = ALIASES.get(m.group(1), m.group(1)) if m else None
  if generation not in GENERATIONS:
    raise ValueError(f"unknown topology {name!r}: use a Cloud TPU slice name ({EXAMPLES}); generations: "
                     f"{', '.join(sorted(GENERATIONS))}")
  gen = GENERATIONS[generation]
  if m.group(2):
    count = int(m.group(2))
    if gen.cores_in_name and count % 2:
      raise ValueError(f"topology {name!r}: {generation}-N counts TensorCores, two per chip; N must be even")
    grid = chip_grid(count // 2 if gen.cores_in_name else count, gen.dims)
  else:
    grid = tuple(int(n) for n in m.group(3).split("x"))
    if len(grid) != gen.dims:
      raise ValueError(f"topology {name!r}: a {generation} slice is a {gen.dims}-D chip grid, e.g. "
                       f"{'x'.join(['4'] * gen.dims)}")
  return generation, grid


def get_topology(name: str, slices: int = 1) -> Topology:
  """The devices of a named slice (``slices`` of them over DCN), or ``local``."""
  if slices < 1:
    raise ValueError(f"slices must be >= 1, got {slices}")
  if name == "local":
    if slices != 1:
      raise ValueError("topology 'local' is this machine's devices: slices must be 1")
    devices = tuple(jax.devices())
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    hbm = (stats or {}).get("bytes_limit")
    return Topology(name, devices, hbm, f"{len(devices)} local {devices[0].device_kind} device(s)")
  generation, grid = parse(name)
  gen = GENERATIONS[generation]
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if not xla_bridge.get_tpu_library_path() and not _tpu_plugin_loaded():
    raise RuntimeError("compiling for a TPU topology needs the libtpu wheel (no TPU needed): "
                       "pip install -e '.[tpu]'  (libtpu 0.0.42.* for jax 0.10.x)")
  _quiet_libtpu(f"{generation}-{math.prod(grid) * (2 if gen.cores_in_name else 1)}")
  bounds = host_bounds(grid)
  topo = topologies.get_topology_desc(
      platform="tpu", topology_name=f"{generation}:{'x'.join(map(str, grid))}", chip_config_name=gen.chip_config,
      chips_per_host_bounds=bounds, num_slices=slices)
  chips = math.prod(grid)
  return Topology(name, tuple(topo.devices), gen.hbm_bytes,
                  f"{generation} {'x'.join(map(str, grid))}, {chips} chips x {slices} slice(s), "
                  f"{len(topo.devices)} devices, {gen.hbm_bytes / GiB:.0f} GiB HBM each")


def host_bounds(grid: tuple[int, ...]) -> tuple[int, int, int]:
  """The chips of one host: 2x2x1 on v4 / v5p; on v5e / v6e the whole slice up to 8 chips (one
  host), else 2x2."""
  if len(grid) == 3 or math.prod(grid) > 8:
    return (2, 2, 1)
  return (*grid, 1)


def _quiet_libtpu(accelerator: str):
  """Off a TPU VM, libtpu looks for the VM's metadata and warns that it is missing, and takes a
  machine-wide lock that a second compiling process fails on: give it what it asks for, and
  let several processes compile at once (only where unset and this machine has no TPU chips)."""
  if os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"):
    return
  for name, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", accelerator),
                      ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                      ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(name, value)


def _tpu_plugin_loaded() -> bool:
  from jax._src.lib import xla_client  # pylint: disable=g-import-not-at-top
  return xla_client.pjrt_plugin_loaded("tpu")
