"""Hyper-parameter sweeps for the comparison runner (No Train No Gain, Appendix C: every method
is tuned at the budget before it is compared).

A method of a comparison config is either a list of overrides (one setting, as before) or a
dict::

    "lion": dict(overrides=["optimizer.name=lion"],                  # every setting's base
                 grid={"schedule.peak": [1e-4, 3e-4, 7e-4],          # the product of the values
                       "optimizer.weight_decay": [0.03, 0.1]},
                 search={"optimizer.b2": ("uniform", 0.95, 0.99),    # plus ``draws`` random
                         "schedule.warmup": ("log_uniform", 0.01, 0.1)},  # settings
                 draws=4, search_seed=0)

``grid`` and ``search`` may be used alone or together (each draw is added to each grid point).
``search`` ranges: ``("uniform", lo, hi)``, ``("log_uniform", lo, hi)`` (decades, as the paper
searches LRs), ``("int", lo, hi)`` or ``("choice", [values])``; draws come from ``search_seed``
and are rounded to 3 significant digits, so a re-run names and finds the same settings.

A setting is named by its values (``peak=0.0003,weight_decay=0.1``; a key's last part unless
two keys share it) and trains under ``<workdir>/budget_<b>/<method>/<name>/seed_<s>``; a method
with one setting keeps ``<workdir>/budget_<b>/<method>/seed_<s>``. ``select_best`` picks, per
method and budget, the setting with the lowest final validation loss (mean over the tuning
seeds; ties go to the first in expansion order); ``selection.final_seeds`` re-runs the chosen
ones with fresh seeds (a seed may not be both a tuning and a final seed), and the results table
reports a tuned method on those fresh seeds only, with how many settings it tried: the best of
several settings on the tuning seeds is favoured there (``compare_seeds.py``).
"""
import dataclasses
import itertools
import math
import re

import numpy as np

SEARCH_KINDS = ("uniform", "log_uniform", "int", "choice")
SPEC_KEYS = ("overrides", "grid", "search", "draws", "search_seed")


@dataclasses.dataclass(frozen=True)
class Setting:
  method: str
  name: str                           # "" when the method has one setting
  values: tuple                       # ((key, value), ...) of this setting
  overrides: tuple[str, ...]          # the method's base overrides, then key=value of the values

  @property
  def label(self) -> str:
    return f"{self.method} ({self.name})" if self.name else self.method


def _round(value: float) -> float:
  return float(f"{value:.3g}")


def _format(value) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (tuple, list)):
    return "-".join(_format(v) for v in value)
  return str(value)


def _literal(value) -> str:
  """``value`` as the text of a ``section.field=value`` override (a Python literal)."""
  return repr(tuple(value) if isinstance(value, list) else value)


def setting_name(values) -> str:
  """'peak=0.0003,weight_decay=0.1': each key by its last part, the full key where two share it."""
  last = [k.split(".")[-1] for k, _ in values]
  parts = [f"{(k if last.count(k.split('.')[-1]) > 1 else k.split('.')[-1])}={_format(v)}" for k, v in values]
  return re.sub(r"[^\w.=,+\-]", "_", ",".join(parts))


def _draw(rng, spec, key: str):
  kind = spec[0] if isinstance(spec, (tuple, list)) and spec else None
  if kind not in SEARCH_KINDS:
    raise ValueError(f"search range for {key!r} must be (kind, ...) with kind in {SEARCH_KINDS}, got {spec!r}")
  if kind == "choice":
    if len(spec) != 2 or not spec[1]:
      raise ValueError(f"search {key!r}: ('choice', [values]) needs a non-empty list, got {spec!r}")
    return spec[1][int(rng.integers(len(spec[1])))]
  lo, hi = spec[1], spec[2]
  if not lo < hi or (kind == "log_uniform" and lo <= 0):
    raise ValueError(f"search {key!r}: {kind} needs lo < hi{' and lo > 0' if kind == 'log_uniform' else ''}, "
                     f"got {spec!r}")
  if kind == "int":
    return int(rng.integers(lo, hi + 1))
  if kind == "log_uniform":
    return _round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
  return _round(rng.uniform(lo, hi))


def method_settings(method: str, spec) -> list[Setting]:
  """The settings of one method entry (a list of overrides, or a dict with a grid / search)."""
  if isinstance(spec, (list, tuple)):
    return [Setting(method, "", (), tuple(spec))]
  if not isinstance(spec, dict):
    raise ValueError(f"method {method!r}: give a list of overrides or a dict with {SPEC_KEYS}, got {spec!r}")
  unknown = set(spec) - set(SPEC_KEYS)
  if unknown:
    raise ValueError(f"method {method!r}: unknown keys {sorted(unknown)}; a method dict takes {SPEC_KEYS}")
  base = tuple(spec.get("overrides", ()))
  grid, search = dict(spec.get("grid", {})), dict(spec.get("search", {}))
  for key, values in grid.items():
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not len(values):
      raise ValueError(f"method {method!r}: grid {key!r} has no values ({values!r}); give a non-empty list")
  points = [tuple(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else [()]
  draws = int(spec.get("draws", 0 if not search else 1))
  if search and draws < 1:
    raise ValueError(f"method {method!r}: a search needs draws >= 1, got {draws}")
  if draws and not search:
    raise ValueError(f"method {method!r}: draws={draws} without a search range")
  if set(grid) & set(search):
    raise ValueError(f"method {method!r}: {sorted(set(grid) & set(search))} both in grid and search")
  rng = np.random.default_rng(int(spec.get("search_seed", 0)))
  samples = [tuple((k, _draw(rng, r, k)) for k, r in search.items()) for _ in range(draws)] if search else [()]
  out, seen = [], set()
  for point in points:
    for sample in samples:
      values = point + sample
      name = setting_name(values)
      if name in seen:  # two draws that round to the same values: one setting
        continue
      seen.add(name)
      out.append(Setting(method, name, values, base + tuple(f"{k}={_literal(v)}" for k, v in values)))
  return out


def expand(methods: dict) -> list[Setting]:
  """Every setting of every method, in order."""
  return [s for method, spec in methods.items() for s in method_settings(method, spec)]


def mean_val(finals) -> float:
  """The mean final validation loss of {seed: (train, val, sets)} (or a list of those)."""
  return float(np.mean([f[1] for f in (finals.values() if isinstance(finals, dict) else finals)]))


def select_best(results: dict, settings: list[Setting]) -> dict:
  """{(budget, method): the Setting whose final validation loss, mean over its seeds in
  ``results`` ({(budget, Setting): {seed: (train, val, sets)}}), is lowest}."""
  best = {}
  for setting in settings:  # expansion order: the first of equals wins
    for (budget, s), finals in results.items():
      if s != setting or not finals:
        continue
      key = (budget, s.method)
      if key not in best or mean_val(finals) < mean_val(results[(budget, best[key])]):
        best[key] = s
  return best


def worker_env(platform: str, worker: int, devices: int, base: dict) -> dict:
  """The environment of local worker ``worker``, which gets ``devices`` devices of its own:
  CPU processes (``devices`` fake host devices each), one or more GPUs (``CUDA_VISIBLE_DEVICES``)
  or TPU chips of this host (``TPU_VISIBLE_CHIPS`` with one-process bounds)."""
  env = dict(base)
  ids = ",".join(str(worker * devices + i) for i in range(devices))
  if platform == "cpu":
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env |= {"JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])}
  elif platform == "gpu":
    env |= {"CUDA_VISIBLE_DEVICES": ids}
  elif platform == "tpu":
    bounds = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1"}
    if devices not in bounds:
      raise ValueError(f"--worker_devices={devices}: a TPU worker takes 1, 2 or 4 chips of this host")
    env |= {"TPU_VISIBLE_CHIPS": ids, "TPU_CHIPS_PER_PROCESS_BOUNDS": bounds[devices],
            "TPU_PROCESS_BOUNDS": "1,1,1", "TPU_PROCESS_PORT": str(8476 + worker),
            "TPU_MESH_CONTROLLER_PORT": str(8476 + worker),
            "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{8476 + worker}"}
  else:
    raise ValueError(f"--platform must be cpu, gpu or tpu, got {platform!r}")
  return env
