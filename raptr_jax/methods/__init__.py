"""Training methods behind one interface (``methods/base.py``): a registry keyed by
``method.name``. Adding a method is one module here and one line in ``REGISTRY``."""
from raptr_jax.methods.base import Method
from raptr_jax.methods.compose import Composite
from raptr_jax.methods.growth import Growth
from raptr_jax.methods.interlocking import Interlocking
from raptr_jax.methods.pld import ProgressiveLayerDropping
from raptr_jax.methods.random_ltd import RandomLTD
from raptr_jax.methods.raptr import Raptr
from raptr_jax.methods.rho_loss import RhoLoss
from raptr_jax.methods.selective_backprop import SelectiveBackprop
from raptr_jax.methods.stacking import Stacking

REGISTRY: dict[str, type[Method]] = {
    "baseline": Method,
    "raptr": Raptr,
    "pld": ProgressiveLayerDropping,
    "stacking": Stacking,
    "growth": Growth,
    "random_ltd": RandomLTD,
    "selective_backprop": SelectiveBackprop,
    "rho_loss": RhoLoss,
    "interlocking": Interlocking,
}


def get_method(name: str, cfg=None) -> Method:
  """The method called ``name`` (``method.name``) for the run config ``cfg``; a clear error for
  unknown names and for combinations (``"a+b"``) the methods do not declare they compose."""
  parts = [p.strip() for p in str(name).split("+")]
  unknown = [p for p in parts if p not in REGISTRY]
  if unknown:
    raise ValueError(f"unknown method.name {unknown[0]!r}; available: {sorted(REGISTRY)}")
  if len(parts) > 2:
    raise ValueError(f"method.name={name!r}: compose two methods at most, e.g. {parts[0]}+{parts[1]}")
  if len(parts) == 2:
    first, second = (REGISTRY[p](cfg) for p in parts)
    if second.name not in first.composes_with and first.name not in second.composes_with:
      allowed = sorted({f"{first.name}+{n}" for n in first.composes_with}
                       | {f"{n}+{first.name}" for n in REGISTRY if first.name in REGISTRY[n].composes_with})
      raise ValueError(f"method.name={name!r}: {first.name} does not compose with {second.name} "
                       f"(compositions of {first.name}: {', '.join(allowed) or 'none'}); run one "
                       f"method, e.g. method.name={first.name!r}")
    return Composite([first, second], cfg)
  return REGISTRY[parts[0]](cfg)


__all__ = ["REGISTRY", "Method", "get_method"]
