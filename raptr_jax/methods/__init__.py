"""Training methods behind one interface (``methods/base.py``): a registry keyed by
``method.name``. Adding a method is one module here and one line in ``REGISTRY``."""
from raptr_jax.methods.base import Method
from raptr_jax.methods.growth import Growth
from raptr_jax.methods.pld import ProgressiveLayerDropping
from raptr_jax.methods.random_ltd import RandomLTD
from raptr_jax.methods.raptr import Raptr
from raptr_jax.methods.stacking import Stacking

REGISTRY: dict[str, type[Method]] = {
    "baseline": Method,
    "raptr": Raptr,
    "pld": ProgressiveLayerDropping,
    "stacking": Stacking,
    "growth": Growth,
    "random_ltd": RandomLTD,
}


def get_method(name: str, cfg=None) -> Method:
  """The method called ``name`` (``method.name``) for the run config ``cfg``; a clear error for
  unknown names and for combinations (``"a+b"``) the methods do not declare they compose."""
  parts = [p.strip() for p in str(name).split("+")]
  unknown = [p for p in parts if p not in REGISTRY]
  if unknown:
    raise ValueError(f"unknown method.name {unknown[0]!r}; available: {sorted(REGISTRY)}")
  if len(parts) > 1:
    first, *rest = (REGISTRY[p]() for p in parts)
    bad = [m.name for m in rest if m.name not in first.composes_with]
    if bad:
      allowed = ", ".join(f"{first.name}+{n}" for n in first.composes_with) or "none"
      raise ValueError(f"method.name={name!r}: {first.name} does not compose with {bad[0]} "
                       f"(compositions of {first.name}: {allowed}); run one method, e.g. "
                       f"method.name={first.name!r}")
    raise ValueError(f"method.name={name!r}: composition is declared but not implemented")
  return REGISTRY[parts[0]](cfg)


__all__ = ["REGISTRY", "Method", "get_method"]
