"""Layer stacking (Gong et al. 2019, "Efficient Training of BERT by Progressively Stacking";
Algorithm 1 and Section 4.1 of No Train No Gain), gradual and middle stacking.

Algorithm 1: train a model of L / 2^k layers; at each stacking operation copy its layers to make
a model twice as deep, and go on training. No Train No Gain doubles BERT 4 -> 8 -> 16 and T5
3 -> 6 -> 12 (encoder and decoder together) at 3 and 7.2 hours of a 24-hour RST budget, i.e. at
12.5% and 30% of the budget (Appendix C.1: the ratio of Gong et al.), the defaults here. The
grow points are budget fractions on the run's own clock, so under an RST budget a run grows when
the paper's did.

Options (``method.stacking``): ``depths`` (e.g. ``(4, 8, 16)``; empty: L/4, L/2, L), ``grow_at``
(one budget fraction per growth), ``mode``: ``stack`` (new layer i copies layer i - k, the whole
stack on top; default), ``interleave`` (each layer repeated in place, A A B B), ``top`` (the top
n layers copied onto the top: gradual stacking, Reddi et al. 2023, with any list of depths) or
``middle`` (the middle block repeated: MIDAS, Saunshi et al. 2024), and ``optimizer_state``:
``fresh`` (default: new layers start with zero moments, the others keep theirs, which is what
the reference code does; its ``reset_optim`` switch was never wired), ``copy`` (new layers start
with their source layer's state) or ``reset`` (all state restarts).

Implementation: the train state always holds the final L layers; a depth-k stage runs a *view*,
the model of k layers whose parameters are the first k stacked layers (``Stage.view``). Its loss
reads only those slices, so a step does the compute of a depth-k model (FLOPs, MFU and RST
charges are those of depth k, and each depth compiles once), and the layers not yet grown are
frozen: no gradient, no weight decay, no moment updates, bit-identical to their initial values
until the growth that overwrites them. We chose this over stage-sized parameter trees because
the state keeps one shape and sharding for the whole run: checkpoints, resume, sharding and
optimizer code stay exactly those of every other method, at the cost of holding the final
model's (untouched) parameters and optimizer state in memory from the start.
"""
import dataclasses
import functools

import jax

from raptr_jax.methods import growth_ops
from raptr_jax.methods.base import Method
from raptr_jax.plan import Stage

MODES = ("stack", "interleave", "top", "middle")


def decoder_depth(cfg_model, depth: int) -> int:
  """T5: the decoder stack's depth when the encoder has ``depth`` (both grow together)."""
  total_dec = cfg_model.num_decoder_layers or cfg_model.num_layers
  return depth * total_dec // cfg_model.num_layers


def schedule(c, model) -> tuple[list[int], list[float]]:
  """(depths, grow fractions) of a ``method.stacking`` section, checked; errors name the key."""
  L = model.num_layers
  if c.depths:
    depths = [int(d) for d in c.depths]
  else:
    if L % 4:
      raise ValueError(f"progressive doubling L/4 -> L/2 -> L needs model.num_layers divisible by 4, "
                       f"got {L}; give the depths, e.g. method.stacking.depths=({L // 2}, {L})"
                       if L % 2 == 0 else f"progressive doubling needs an even model.num_layers, got {L}; "
                       f"give the depths, e.g. method.stacking.depths=({L - 1}, {L})")
    depths = [L // 4, L // 2, L]
  example = f"method.stacking.depths=({L // 4}, {L // 2}, {L})" if L % 4 == 0 else f"({L // 2}, {L})"
  if any(d < 1 for d in depths) or any(b <= a for a, b in zip(depths, depths[1:])):
    raise ValueError(f"method.stacking.depths={tuple(depths)} must be positive and increasing, e.g. {example}")
  if depths[-1] != L:
    raise ValueError(f"method.stacking.depths={tuple(depths)} must end at the model's depth "
                     f"model.num_layers={L}, e.g. {example}")
  grow_at = [float(f) for f in c.grow_at]
  if len(grow_at) != len(depths) - 1:
    raise ValueError(f"method.stacking.grow_at={tuple(grow_at)} needs one budget fraction per growth "
                     f"({len(depths) - 1} for depths {tuple(depths)}), e.g. "
                     f"{tuple(round((i + 1) / len(depths), 3) for i in range(len(depths) - 1))}")
  if any(not 0.0 < f < 1.0 for f in grow_at[1:]) or (grow_at and not 0.0 <= grow_at[0] < 1.0) or any(b <= a for a, b in zip(grow_at, grow_at[1:])):
    raise ValueError(f"method.stacking.grow_at={tuple(grow_at)} must be increasing budget fractions "
                     "in (0, 1), e.g. (0.125, 0.3); the first may be 0.0, a growth before the first step (of a "
                     "pretrained model, init.source)")
  if c.mode not in MODES:
    raise ValueError(f"method.stacking.mode must be one of {MODES}, got {c.mode!r}")
  for old, new in zip(depths, depths[1:]):
    if c.mode == "interleave" and new % old:
      raise ValueError(f"method.stacking.mode='interleave' repeats every layer in place: depth {new} "
                       f"is not a multiple of {old}; use depths that double, e.g. {example}")
    if c.mode in ("top", "middle") and new - old > old:
      raise ValueError(f"method.stacking.mode={c.mode!r} copies {new - old} of the {old} layers: it "
                       f"cannot grow {old} -> {new}; grow by at most {old} layers at a time")
  if model.get("family") == "t5":
    for d in depths:
      if d * (model.num_decoder_layers or L) % L:
        raise ValueError(f"t5 grows both stacks together: encoder depth {d} of {L} gives a non-integral "
                         f"decoder depth of {model.num_decoder_layers}; choose depths that divide evenly")
  return depths, grow_at


class Stacking(Method):
  """Layer stacking on the method interface (``method.name=stacking``)."""
  name = "stacking"

  def section(self, cfg):
    return cfg.method.stacking

  def validate(self, cfg) -> None:
    c = self.section(cfg)
    schedule(c, cfg.model)
    if c.optimizer_state not in growth_ops.OPTIMIZER_STATE_POLICIES:
      raise ValueError(f"method.{self.name}.optimizer_state must be one of "
                       f"{growth_ops.OPTIMIZER_STATE_POLICIES}, got {c.optimizer_state!r}")
    if cfg.optimizer.name == "adafactor" and c.optimizer_state != "reset":
      raise ValueError(f"optimizer.name='adafactor' keeps factored second moments that cannot follow "
                       f"grown layers; set method.{self.name}.optimizer_state='reset'")

  def stages(self, cfg, model_cfg):
    depths, grow_at = schedule(self.section(cfg), cfg.model)
    L = model_cfg.num_layers
    out = []
    for i, (depth, end) in enumerate(zip(depths, grow_at + [1.0])):
      view = {"num_layers": depth}
      if cfg.model.family == "t5":
        view["num_decoder_layers"] = decoder_depth(cfg.model, depth)
      full = depth == L
      out.append(Stage(f"{self.name}{i + 1}:{depth}/{L}", end,
                       ("full",) if full else (self.name, tuple(sorted(view.items()))),
                       view=None if full else view))
    return tuple(out)

  def transition(self, state, old, new, ctx):
    key = (old.shape, new.shape)
    cache = self.__dict__.setdefault("_grow_steps", {})
    if key not in cache:
      grow = functools.partial(self.grow, old=depths_of(old, ctx), new=depths_of(new, ctx), ctx=ctx)
      cache[key] = jax.jit(grow, out_shardings=ctx.state_shardings, donate_argnums=0)
    return cache[key](state)

  def stack_maps(self, old: dict, new: dict, ctx) -> dict:
    """AxisMap of each stack's layer axis for a growth between two depths."""
    mode = self.section(self.cfg).mode
    return {key: growth_ops.depth_order(mode, old[key], new[key], ctx.model_cfg.num_layers
                                        if key != "decoder_layers" else ctx.model_cfg.decoder_layers)
            for key in growth_ops.STACK_KEYS}

  def grow(self, state, old: dict, new: dict, ctx):
    """The train state grown from depths ``old`` to ``new`` ({stack key: depth}), under jit."""
    maps = growth_ops.leaf_maps(state.params, ctx.axes, self.stack_maps(old, new, ctx))
    params = growth_ops.grow_params(state.params, maps)
    policy = self.section(self.cfg).optimizer_state
    opt_state = growth_ops.grow_opt_state(ctx.optimizer.tx, state.opt_state, params, maps, policy)
    return dataclasses.replace(state, params=params, opt_state=opt_state)


def depths_of(stage, ctx) -> dict:
  """{stack key: depth} a stage runs (its view, or the full model)."""
  view, m = stage.view or {}, ctx.model_cfg
  enc = view.get("num_layers", m.num_layers)
  dec = view.get("num_decoder_layers", m.decoder_layers if not stage.view else enc)
  return {"layers": enc, "encoder_layers": enc, "decoder_layers": dec}
