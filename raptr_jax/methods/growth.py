"""Function-preserving model growth in depth and width: MSG, bert2BERT and LEMON.

* **MSG** (Yao et al. 2024, "Masked Structural Growth for 2x Faster Language Model
  Pre-training"): new units keep random (initial) weights and their outputs are multiplied by a
  mask that ramps linearly 0 -> 1 over ``ramp`` (a budget fraction; MSG's ``grow_time``) after the
  growth. Layers: a new block's residual branches are scaled by the mask (block = x + m f(x));
  heads: each new head's attention output; MLP: each new hidden unit's activation; hidden size:
  embeddings and every residual branch on the new dimensions, with RMSNorm statistics weighted by
  the mask (sum_i m_i x_i^2 / sum_i m_i, MSG's LayerNorm correction for RMSNorm), so at mask 0
  the grown model computes exactly the old function whatever the new weights. New layers copy
  the top layers (gradual stacking, as RaPTr Appendix D.2 describes MSG's depth operator). One
  growth at a time: a ramp must end before the next growth.
* **bert2BERT** (Chen et al. 2022; Net2Net's function-preserving initialization): a new head,
  MLP unit or hidden dimension copies an existing one (circularly: new unit j copies j mod old);
  every weight that reads the copied units (fan-in: ``o`` for heads, ``wo`` for MLP units, the
  q/k/v/wi/wg and the untied head for hidden dimensions) is divided by the copy count, so
  outputs are unchanged. Depth by stacking (``stack``: new layer i copies layer i - k), which,
  as in the paper, does not preserve the function.
* **LEMON** (Wang et al. 2024, "LEMON: Lossless model expansion"): width as bert2BERT, but the
  fan-in weights of a unit's copies are random and sum to the original (W_k = R_k - (sum_j R_j -
  W) / n, R ~ N(0, (``lemon_noise`` std(W))^2)), so the function is kept and the copies are not
  symmetric; depth by consecutive copies (each of the top n layers followed by its copy) whose
  attention and MLP output projections are zero, so a new block adds exactly 0 at insertion
  (LEMON's ``allzero`` setting for BERT). Our blocks are pre-norm (RMSNorm before each branch):
  a zero-output block is the identity through the residual; a post-norm block would also need
  its norm made the identity, which LEMON handles separately for post-LN models.

Hidden-size growth by copying (bert2BERT, LEMON) needs every dimension copied the same number
of times (d_new a multiple of d_old), which keeps RMSNorm's statistics exact; with a tied
embedding the final norm's scale takes the fan-in division instead of the head.

Options (``method.growth``): ``operator``; per-stage sizes ``num_layers``, ``num_heads``,
``mlp_dim``, ``d_model`` (empty: the model's throughout; the last entry must be the model's),
``grow_at`` (a budget fraction per growth), ``ramp`` (MSG), ``depth_mode`` (default per operator:
msg ``top``, bert2bert ``stack``, lemon ``consecutive``), ``lemon_noise`` and
``optimizer_state`` (as for stacking: ``fresh``, ``copy`` or ``reset``). Width growth changes
parameter shapes: the train state holds the final shapes and a stage runs the leading slices
(``Stage.view``), exactly as stacking does.

LEMON recommends a faster-decaying LR after growth; we keep the run's schedule (RaPTr's
comparisons also used one schedule for every method, its Appendix D.2).
"""
import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from raptr_jax.methods import growth_ops
from raptr_jax.methods.base import Method
from raptr_jax.methods.stacking import depths_of
from raptr_jax.models.selection import LayerSelection, Selection, WidthSelection
from raptr_jax.plan import Stage

OPERATORS = ("msg", "bert2bert", "lemon")
DEPTH_MODES = {"msg": "top", "bert2bert": "stack", "lemon": "consecutive"}
FIELDS = ("num_layers", "d_model", "num_heads", "mlp_dim")
AXIS_OF_FIELD = {"d_model": "embed", "num_heads": "heads", "mlp_dim": "mlp"}
# The grown axis each parameter reads from (its fan-in), by parameter name.
FAN_IN = {"q": "embed", "k": "embed", "v": "embed", "cross_q": "embed", "cross_k": "embed",
          "cross_v": "embed", "wi": "embed", "wg": "embed", "head": "embed", "head_dense": "embed",
          "o": "heads", "cross_o": "heads", "wo": "mlp"}
# A block's output projections (and their biases): LEMON zeroes them in new blocks.
OUTPUT_PROJECTIONS = ("o", "cross_o", "wo", "o_bias", "cross_o_bias", "wo_bias")
# What a tied head reads (the fan-in division of a tied head goes here): BERT's MLM transform norm,
# else the final norm; scales and LayerNorm biases alike.
FINAL_NORMS = ("final_norm", "decoder_norm", "final_norm_bias", "decoder_norm_bias")
HEAD_NORMS = ("head_norm", "head_norm_bias")


def stage_sizes(c, model) -> list[dict]:
  """{field: size} of each stage (grown fields only), checked; errors name the key."""
  n = len(c.grow_at) + 1
  given = {f: tuple(int(x) for x in c[f]) for f in FIELDS if c[f]}
  if not given:
    raise ValueError("method.growth needs at least one grown dimension, e.g. "
                     f"method.growth.num_layers=({model.num_layers // 2}, {model.num_layers})")
  tied_heads = model.d_model == model.num_heads * model.head_dim
  if "d_model" in given and "num_heads" not in given and tied_heads:  # attention width follows d_model
    bad = [d for d in given["d_model"] if d % model.head_dim]
    if bad:
      raise ValueError(f"method.growth.d_model={given['d_model']}: {bad[0]} is not a multiple of "
                       f"model.head_dim={model.head_dim}, so it gives no whole number of heads; use "
                       f"multiples of {model.head_dim}, e.g. ({model.d_model // 2}, {model.d_model})")
    given["num_heads"] = tuple(d // model.head_dim for d in given["d_model"])
  for field, sizes in given.items():
    if len(sizes) != n:
      raise ValueError(f"method.growth.{field}={sizes} needs one size per stage ({n} for "
                       f"grow_at={tuple(c.grow_at)})")
    if any(s < 1 for s in sizes) or any(b < a for a, b in zip(sizes, sizes[1:])):
      raise ValueError(f"method.growth.{field}={sizes} must be positive and not decreasing, e.g. "
                       f"({getattr(model, field) // 2}, {getattr(model, field)})")
    if sizes[-1] != getattr(model, field):
      raise ValueError(f"method.growth.{field}={sizes} must end at the model's size "
                       f"model.{field}={getattr(model, field)}")
  grow_at = [float(f) for f in c.grow_at]
  if any(not 0.0 < f < 1.0 for f in grow_at[1:]) or (grow_at and not 0.0 <= grow_at[0] < 1.0) or any(b <= a for a, b in zip(grow_at, grow_at[1:])):
    raise ValueError(f"method.growth.grow_at={tuple(grow_at)} must be increasing budget fractions in "
                     "(0, 1), e.g. (0.25, 0.5); the first may be 0.0, a growth before the first step (of a "
                     "pretrained model, init.source)")
  stages = [{f: s[i] for f, s in given.items()} for i in range(n)]
  for i, (a, b) in enumerate(zip(stages, stages[1:])):
    if a == b:
      raise ValueError(f"method.growth: nothing grows at grow_at[{i}]={grow_at[i]} (sizes {a}); "
                       "drop that growth")
  return stages


class Growth(Method):
  """MSG / bert2BERT / LEMON on the method interface (``method.name=growth``)."""
  name = "growth"

  def validate(self, cfg) -> None:
    c = cfg.method.growth
    if c.operator not in OPERATORS:
      raise ValueError(f"method.growth.operator must be one of {OPERATORS}, got {c.operator!r}")
    stages = stage_sizes(c, cfg.model)
    mode = self.depth_mode(cfg)
    if mode not in ("stack", "interleave", "top", "middle", "consecutive"):
      raise ValueError(f"method.growth.depth_mode={c.depth_mode!r} is not one of stack, interleave, "
                       "top, middle, consecutive")
    for a, b in zip(stages, stages[1:]):
      old, new = a.get("num_layers"), b.get("num_layers")
      if old and new > old and mode in ("top", "middle", "consecutive") and new - old > old:
        raise ValueError(f"method.growth: depth_mode={mode!r} copies {new - old} of {old} layers; grow "
                         f"by at most {old} at a time")
      if old and new > old and mode == "interleave" and new % old:
        raise ValueError(f"method.growth: depth_mode='interleave' needs {new} to be a multiple of {old}")
      if c.operator != "msg" and "d_model" in a and b["d_model"] % a["d_model"]:
        raise ValueError(f"method.growth.d_model: {c.operator} copies every hidden dimension equally "
                         f"(RMSNorm statistics), so {a['d_model']} -> {b['d_model']} must be a whole "
                         f"multiple, e.g. ({b['d_model'] // 2}, {b['d_model']})")
    if c.operator == "msg":
      ends = list(c.grow_at) + [1.0]
      if not 0.0 < c.ramp <= 1.0:
        raise ValueError(f"method.growth.ramp is a budget fraction in (0, 1], got {c.ramp}")
      for i, g in enumerate(c.grow_at):
        if g + c.ramp > ends[i + 1] + 1e-9:
          raise ValueError(f"method.growth: MSG grows one structure at a time, but the growth at "
                           f"{g} ramps until {g + c.ramp:g}, past the next stage boundary "
                           f"{ends[i + 1]:g}; shorten method.growth.ramp or space grow_at")
      if cfg.model.family == "t5":
        raise ValueError("method.growth.operator='msg' masks are implemented for the decoder and bert "
                         "families; use bert2bert or lemon for t5")
    if cfg.model.family == "t5" and cfg.model.num_decoder_layers not in (0, cfg.model.num_layers):
      raise ValueError("method.name=growth on t5 grows both stacks together: set model.num_decoder_layers=0")
    grows = {f for a, b in zip(stages, stages[1:]) for f in b if b[f] != a.get(f)}
    if cfg.model.num_kv_heads and grows & {"num_heads", "d_model"}:
      raise ValueError("method.growth: grouped-query attention (model.num_kv_heads) shares key/value heads between "
                       "query heads, which head growth does not copy; grow num_layers / mlp_dim only")
    if cfg.model.norm_position == "post" and "num_layers" in grows and c.operator in ("msg", "lemon"):
      raise ValueError(f"method.growth.operator={c.operator!r} adds layers that preserve the function through the "
                       "residual (x + 0), which a post-norm block (model.norm_position='post', BERT) does not: "
                       "norm(x + 0) is not x. Grow the depth of a post-norm model with operator='bert2bert' (stacking, "
                       "as bert2BERT did) or grow its width only")
    if c.optimizer_state not in growth_ops.OPTIMIZER_STATE_POLICIES:
      raise ValueError(f"method.growth.optimizer_state must be one of "
                       f"{growth_ops.OPTIMIZER_STATE_POLICIES}, got {c.optimizer_state!r}")
    if cfg.optimizer.name == "adafactor" and c.optimizer_state != "reset":
      raise ValueError("optimizer.name='adafactor' keeps factored second moments that cannot follow "
                       "grown units; set method.growth.optimizer_state='reset'")

  def depth_mode(self, cfg) -> str:
    c = cfg.method.growth
    return c.depth_mode or DEPTH_MODES.get(c.operator, "stack")

  def stages(self, cfg, model_cfg):
    c = cfg.method.growth
    sizes = stage_sizes(c, cfg.model)
    ends = [float(f) for f in c.grow_at] + [1.0]
    out = []
    for i, (view, end) in enumerate(zip(sizes, ends)):
      view = dict(view)
      if cfg.model.family == "t5" and "num_layers" in view:
        view["num_decoder_layers"] = view["num_layers"]
      full = all(view[f] == getattr(model_cfg, f) for f in sizes[-1])
      select = None
      if c.operator == "msg" and i > 0:
        select = msg_select(sizes[i - 1], sizes[i], view.get("num_layers", model_cfg.num_layers),
                            float(c.grow_at[i - 1]), float(c.ramp))
      name = f"growth{i + 1}:" + ",".join(f"{k}={v}" for k, v in sorted(view.items()) if k in FIELDS)
      shape = ("growth", c.operator, tuple(sorted(view.items())), select is not None)
      out.append(Stage(name, end, ("full",) if full and select is None else shape,
                       select=select, view=None if full else view, width=None,
                       eval_select=(lambda progress, s=select: s(None, None, progress)) if select else None))
    return tuple(out)

  def metrics(self, stage, fraction):
    c = self.cfg.method.growth
    if c.operator != "msg":
      return {}
    ramps = [min(max((fraction - g) / c.ramp, 0.0), 1.0) for g in c.grow_at if g < fraction]
    return {"growth/mask": ramps[-1] if ramps else 1.0}

  def transition(self, state, old, new, ctx):
    key = (old.shape, new.shape)
    cache = self.__dict__.setdefault("_grow_steps", {})
    if key not in cache:
      grow = functools.partial(self.grow, old=sizes_of(old, ctx), new=sizes_of(new, ctx), ctx=ctx,
                               seed=zlib.crc32(repr(key).encode()) + self.cfg.seed)  # stable across resumes
      cache[key] = jax.jit(grow, out_shardings=ctx.state_shardings, donate_argnums=0)
    return cache[key](state)

  def grow(self, state, old: dict, new: dict, ctx, seed: int = 0):
    """The train state grown from sizes ``old`` to ``new`` (model fields), traced under jit."""
    c = self.cfg.method.growth
    m = ctx.model_cfg
    mode = self.depth_mode(self.cfg)
    stack_maps = {}
    for key in growth_ops.STACK_KEYS:
      field = "num_decoder_layers" if key == "decoder_layers" else "num_layers"
      total = m.decoder_layers if key == "decoder_layers" else m.num_layers
      o, n = old[field], new[field]
      stack_maps[key] = growth_ops.depth_order(mode, o, n, total) if n > o else None
    axis_maps = {}
    if c.operator != "msg":  # MSG's new units keep their random initial weights
      for field, axis in AXIS_OF_FIELD.items():
        if new[field] > old[field]:
          axis_maps[axis] = circular_map(old[field], new[field], getattr(m, field))
    maps = growth_ops.leaf_maps(state.params, ctx.axes, stack_maps, axis_maps)
    params = growth_ops.grow_params(state.params, maps)
    params = self._preserve_function(params, ctx.axes, maps, stack_maps, axis_maps, new, jax.random.key(seed))
    opt_state = growth_ops.grow_opt_state(ctx.optimizer.tx, state.opt_state, params, maps, c.optimizer_state)
    return dataclasses.replace(state, params=params, opt_state=opt_state)

  def _preserve_function(self, params, axes, maps, stack_maps, axis_maps, new, key):
    """bert2BERT's fan-in division / LEMON's random split of the copies' fan-in weights, and
    LEMON's zero-output new blocks."""
    c = self.cfg.method.growth
    if c.operator == "msg":
      return params
    tied = self.cfg.model.tied_embeddings
    keys = iter(jax.random.split(key, 4096))

    def fix(path, leaf, leaf_axes, leaf_maps):
      name = path[-1]
      leaf_axes = tuple(growth_ops.hidden_axis(a) for a in leaf_axes)
      fan_in = FAN_IN.get(name)
      if tied and name == "head":
        fan_in = None
      if tied and name in (HEAD_NORMS if self.cfg.model.head_transform else FINAL_NORMS):
        fan_in = "embed"
      if fan_in in axis_maps:
        axis = leaf_axes.index(fan_in)
        amap = leaf_maps[axis]
        counts = jnp.asarray(count_copies(amap, new[field_of(fan_in)])).reshape(
            [-1 if a == axis else 1 for a in range(leaf.ndim)]).astype(leaf.dtype)
        if c.operator == "bert2bert":
          leaf = leaf / counts
        else:
          noise = c.lemon_noise * jnp.std(leaf) * jax.random.normal(next(keys), leaf.shape, leaf.dtype)
          order = jnp.asarray(amap.order)
          sums = jax.ops.segment_sum(jnp.moveaxis(noise, axis, 0), order, num_segments=len(amap.order))
          sums = jnp.moveaxis(jnp.take(sums, order, axis=0), 0, axis)
          split = noise - (sums - leaf) / counts
          leaf = jnp.where(counts > 1, split, leaf)
      if c.operator == "lemon" and name in OUTPUT_PROJECTIONS and "layers" in leaf_axes:
        stack = next((k for k in path if k in growth_ops.STACK_KEYS), None)
        smap = stack_maps.get(stack)
        if smap is not None:  # new blocks add exactly 0 at insertion
          new_layers = jnp.asarray(smap.new).reshape([-1] + [1] * (leaf.ndim - 1))
          leaf = jnp.where(new_layers, jnp.zeros_like(leaf), leaf)
      return leaf

    def walk(tree, ax, mp, path):
      if isinstance(tree, dict):
        return {k: walk(tree[k], ax[k], mp[k], path + (k,)) for k in tree}
      return fix(path, tree, ax, mp)

    return walk(params, axes, maps, ())


def field_of(axis: str) -> str:
  return {v: k for k, v in AXIS_OF_FIELD.items()}[axis]


def circular_map(old: int, new: int, total: int) -> growth_ops.AxisMap:
  """Width growth by copies: new unit j (old <= j < new) copies unit j mod old."""
  order = np.concatenate([np.arange(old), np.arange(old, new) % old, np.arange(new, total)]).astype(np.int32)
  is_new = np.zeros(total, bool)
  is_new[old:new] = True
  return growth_ops.AxisMap(order, is_new)


def count_copies(amap: growth_ops.AxisMap, new_size: int) -> np.ndarray:
  """For each position, how many positions of the grown range [0, new_size) share its source
  (1 beyond the grown range)."""
  counts = np.bincount(amap.order[:new_size], minlength=len(amap.order))[amap.order]
  counts[new_size:] = 1
  return counts


def sizes_of(stage, ctx) -> dict:
  """The model fields a stage runs (its view over the full model's)."""
  m = ctx.model_cfg
  depths = depths_of(stage, ctx)
  view = stage.view or {}
  return {"num_layers": depths["layers"], "num_decoder_layers": depths["decoder_layers"],
          **{f: view.get(f, getattr(m, f)) for f in ("d_model", "num_heads", "mlp_dim")}}


def msg_select(old: dict, new: dict, depth: int, grow_at: float, ramp: float):
  """MSG's masks for the stage after a growth from ``old`` to ``new`` sizes (``depth`` layers):
  1 on old units, the ramp m(t) = clip((t - grow_at) / ramp, 0, 1) on new ones."""
  grows = lambda field: field in new and new[field] > old[field]

  def select(key, batch, progress):
    m = jnp.clip((jnp.asarray(progress, jnp.float32) - grow_at) / ramp, 0.0, 1.0)
    ramped = lambda field: jnp.where(jnp.arange(new[field]) < old[field], 1.0, m)
    sel, width = {}, {}
    if grows("num_layers"):
      sel["layers"] = LayerSelection(None, ramped("num_layers"))
    if grows("num_heads"):
      width["head_mask"] = jnp.broadcast_to(ramped("num_heads"), (depth, new["num_heads"]))
    if grows("mlp_dim"):
      width["mlp_mask"] = jnp.broadcast_to(ramped("mlp_dim"), (depth, new["mlp_dim"]))
    if width:
      sel["width"] = WidthSelection(**width)
    if grows("d_model"):
      sel["hidden"] = ramped("d_model")
    return Selection(**sel)
  return select
