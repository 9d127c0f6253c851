"""Methods run together: ``method.name="a+b"`` (a pair that one of them declares in
``composes_with``).

The composite's plan is the product of the parts' plans: its boundaries are the union of
theirs, and each of its stages runs both parts' stages at once. Selections merge field by field
(one part's layers or width, the other's tokens; per stack on T5); two parts selecting the same
field, or both changing the architecture (``view``), the layer count or the width, is an error
naming the stage. FLOPs, layer-tokens and RST charges follow from the merged stage. A stage
change calls the transition of the part whose stage changed; per-step transforms and LR
modifiers apply in the order the parts are named; metrics are the union of the parts'.
"""
import dataclasses

import jax

from raptr_jax.methods.base import Method
from raptr_jax.models.selection import EncoderDecoderSelection, Selection
from raptr_jax.plan import Stage

_EXCLUSIVE = ("active_layers", "layer_fraction", "tokens_per_step", "token_drop")


def merge_selections(a, b):
  """One selection from two parts' (None: that part selects nothing this step)."""
  if a is None or b is None:
    return b if a is None else a
  if isinstance(a, EncoderDecoderSelection) or isinstance(b, EncoderDecoderSelection):
    if not (isinstance(a, EncoderDecoderSelection) and isinstance(b, EncoderDecoderSelection)):
      raise ValueError("composed methods on an encoder-decoder model must both select per stack")
    return EncoderDecoderSelection(merge_selections(a.encoder, b.encoder),
                                   merge_selections(a.decoder, b.decoder))
  fields = {}
  for field in dataclasses.fields(Selection):
    x, y = getattr(a, field.name), getattr(b, field.name)
    if x is not None and y is not None:
      raise ValueError(f"both composed methods select {field.name} in the same step")
    fields[field.name] = y if x is None else x
  return Selection(**fields)


def _merge_callables(f, g):
  if f is None or g is None:
    return g if f is None else f

  def both(key, batch, progress):
    ka, kb = jax.random.split(key)
    return merge_selections(f(ka, batch, progress), g(kb, batch, progress))

  return both


def merge_stages(a: Stage, b: Stage, end: float) -> Stage:
  """The stage running ``a`` and ``b`` together until budget fraction ``end``."""
  for name in _EXCLUSIVE:
    if getattr(a, name) is not None and getattr(b, name) is not None:
      raise ValueError(f"stages {a.name!r} and {b.name!r} both set {name}: these methods cannot "
                       "run in the same step")
  for name in ("view", "width"):
    x, y = getattr(a, name) or {}, getattr(b, name) or {}
    if set(x) & set(y):
      raise ValueError(f"stages {a.name!r} and {b.name!r} both change {sorted(set(x) & set(y))}")
  pick = lambda name: getattr(b, name) if getattr(a, name) is None else getattr(a, name)
  eval_select = None
  if a.eval_select is not None or b.eval_select is not None:
    ev = lambda s, p: None if s.eval_select is None else s.eval_select(p)
    eval_select = lambda progress: merge_selections(ev(a, progress), ev(b, progress))
  return Stage(f"{a.name}+{b.name}", end, (a.shape, b.shape), _merge_callables(a.select, b.select),
               view={**(a.view or {}), **(b.view or {})} or None,
               width={**(a.width or {}), **(b.width or {})} or None,
               eval_select=eval_select, **{name: pick(name) for name in _EXCLUSIVE})


# Hooks a composition cannot merge field by field (interlocking backprop's routed gradients).
WHOLE_STEP_HOOKS = ("value_and_grad", "transform_updates", "modelled_step", "model_fields", "optimizer_config")


class Composite(Method):
  """``parts[0]`` and ``parts[1]`` on one plan."""

  def __init__(self, parts: list[Method], cfg=None):
    super().__init__(cfg)
    self.parts = parts
    self.name = "+".join(p.name for p in parts)
    self._part_stages = {}   # id of a composite stage -> the parts' stages it runs
    a, b = parts
    whole_step = [f"{p.name}.{hook}" for p in parts for hook in WHOLE_STEP_HOOKS
                  if getattr(type(p), hook) is not getattr(Method, hook)]
    if whole_step:
      raise ValueError(f"method.name={self.name!r}: {', '.join(whole_step)} owns the whole gradient, step time, "
                       "model or optimizer, which a composition cannot merge; run the method alone")

  def validate(self, cfg) -> None:
    for part in self.parts:
      part.validate(cfg)
    self.stages(cfg, cfg.model)

  def stages(self, cfg, model_cfg):
    plans = [p.stages(cfg, model_cfg) for p in self.parts]
    for part, plan in zip(self.parts, plans):
      check = getattr(part, "check_partner", None)
      if check is not None:
        for other in (q for q in plans if q is not plan):
          check(cfg, model_cfg, other)
    ends = sorted({s.end for plan in plans for s in plan})
    out = []
    for end in ends:
      here = [next(s for s in plan if end <= s.end + 1e-12) for plan in plans]
      try:
        stage = merge_stages(*here, end)
      except ValueError as e:
        raise ValueError(f"method.name={self.name!r}: {e}") from None
      self._part_stages[stage.shape, stage.end] = here
      out.append(stage)
    return tuple(out)

  def _parts_of(self, stage):
    """The parts' stages a composite stage runs (this instance may not have built the plan)."""
    if (stage.shape, stage.end) not in self._part_stages:
      self.stages(self.cfg, self.cfg.model)
    return self._part_stages[stage.shape, stage.end]

  def transition(self, state, old, new, ctx):
    for part, a, b in zip(self.parts, self._parts_of(old), self._parts_of(new)):
      if a is not b:
        state = part.transition(state, a, b, ctx)
    return state

  def lr_schedule(self, cfg, plan, lr_fn):
    for part in self.parts:
      lr_fn = part.lr_schedule(cfg, plan, lr_fn)
    return lr_fn

  def metrics(self, stage, fraction):
    out = {}
    for part, s in zip(self.parts, self._parts_of(stage)):
      out |= part.metrics(s, fraction)
    return out

  def meta(self, cfg):
    out = {"name": self.name}
    for part in self.parts:
      out |= {k: v for k, v in part.meta(cfg).items() if k != "name"}
    return out
