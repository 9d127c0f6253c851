"""random-LTD: random and layerwise token dropping (Yao et al. 2022, "Random-LTD: Random and
Layerwise Token Dropping Brings Efficient Training for Large-scale Transformers"), with its
monotonic sequence-length growth (MSLG, Section 3.2) and LayerToken LR (Section 3.3, Appendix C).

Algorithm (Section 3.1, Figure 2). In every step, each wrapped layer independently keeps r of
the S positions of each example, drawn uniformly without replacement (all wrapped layers' draws
come from the step's key at once) and sorted; the layer runs on the kept tokens only, with their
original positions (rotary), segment ids, prefix flags and row indices (T5's relative buckets),
its outputs are scattered back, and the dropped positions pass through unchanged
(``models.selection.TokenSelection``, ``StackedLayers._scan_dropped``). Wrapped layers default
to all but the first and the last (Section 3.2, 5.3); ``layers`` names others by id. On T5,
``stacks`` picks the encoder, the decoder or both; the decoder keeps ceil(r T / S) of its T
targets (r counts encoder tokens) and its cross-attention always reads the whole encoder output.

MSLG with DeepSpeed's keys: at budget fraction t (the run's clock: steps, tokens, layer-tokens
or RST) r(t) = floor(t / require * (max - min) + min) rounded down to a multiple of
``seq_per_step``, never below the smallest such multiple >= ``min_value`` and never above
``max_value``; from ``require`` on every layer sees the whole sequence. ``require`` is
``require_steps`` / the budget (a budget in steps, as in DeepSpeed) or ``require_fraction``.
``schedule="constant"`` keeps ``min_value`` the whole run (the Section 5.4 ablation). Each
distinct r is one plan stage (one compile); more than ``max_compiles`` is refused with the
``seq_per_step`` that fits.

LayerToken LR (``lr="layer_tokens"``, Appendix C): the run's schedule is followed in consumed
layer-tokens instead of steps. Warmup ends when the run has consumed the layer-tokens the full
model would use in the warmup steps (Eq. 1, s l T_warmup); the decay runs over the remaining
layer-tokens of the run (Eq. 2). Without dropping it is the run's schedule exactly. The clock
map is piecewise linear over the stages (within a stage every step costs the same), computed on
the host from the plan. ``lr="budget"`` uses the run's schedule on its clock (Figure 6's
"standard" LR when the budget is in steps).

Gather and sort: ``lax.top_k`` of i.i.d. uniform keys per (layer, example) gives a uniform
r-subset in O(S log r); ``jnp.sort`` orders it so causal masks stay valid. The layer gathers
with ``jnp.take`` along the row and scatters back with ``.at[].set`` (vmapped over the batch).

Defaults: min_value = S / 16 (the paper's GPT 128 of 2048), max_value = S, seq_per_step 16,
require_fraction 0.7 (GPT: full length after 210B of 300B tokens), LayerToken LR.
"""
import functools
import math

import jax
import jax.numpy as jnp

from raptr_jax.data.corruption import target_length
from raptr_jax.methods.base import Method
from raptr_jax.models.selection import EncoderDecoderSelection, Selection, TokenSelection
from raptr_jax.plan import Stage

SCHEDULES = ("mslg", "constant")
LR_MODES = ("layer_tokens", "budget")
STACKS = ("encoder", "decoder", "both")


def kept_length(fraction: float, min_value: int, max_value: int, seq_per_step: int,
                require: float, seq_len: int) -> int:
  """MSLG's kept length r at budget ``fraction`` (DeepSpeed's keys; ``seq_len`` once done)."""
  if fraction >= require:
    return seq_len
  value = math.floor(fraction / require * (max_value - min_value) + min_value)
  r = value // seq_per_step * seq_per_step
  return min(max(r, first_length(min_value, seq_per_step)), max_value)


def first_length(min_value: int, seq_per_step: int) -> int:
  """The smallest multiple of ``seq_per_step`` >= ``min_value``: MSLG's kept length at the start."""
  return -(-min_value // seq_per_step) * seq_per_step


def mslg_stages(min_value: int, max_value: int, seq_per_step: int, require: float,
                seq_len: int) -> list[tuple[int, float, float]]:
  """[(r, start, end)]: the kept length of each stretch of the budget; r == seq_len: no drop."""
  lo = first_length(min_value, seq_per_step)
  values = [lo] + [m for m in range(lo + seq_per_step, max_value + 1, seq_per_step)]
  starts = [0.0] + [require * (r - min_value) / (max_value - min_value) for r in values[1:]]
  out = []
  for r, start, end in zip(values, starts, starts[1:] + [require]):
    if r < seq_len and end > start:
      out.append((r, start, end))
  if require < 1.0 or not out:
    out.append((seq_len, require if out else 0.0, 1.0))
  return out


def parse_layers(spec, num_layers: int, key: str) -> tuple[int, ...]:
  """Wrapped layer ids: "" = all but the first and the last; else ids like "1,2,3"."""
  if spec in ("", None, ()):
    if num_layers < 3:
      raise ValueError(f"{key}='' wraps all but the first and the last layer, and a {num_layers}-"
                       f"layer stack has none; name layers to wrap, e.g. {key}='{num_layers - 1}'")
    return tuple(range(1, num_layers - 1))
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  try:
    ids = sorted({int(str(i).strip()) for i in items})
  except ValueError:
    raise ValueError(f"{key} takes layer ids like '1,2,3', got {spec!r}") from None
  bad = [i for i in ids if not 0 <= i < num_layers]
  if bad:
    raise ValueError(f"{key}={spec!r}: layer {bad[0]} is outside the {num_layers}-layer stack; "
                     f"ids are 0..{num_layers - 1}, e.g. {key}='1,{num_layers - 2}'")
  return tuple(ids)


def draw_kept(key, num_layers: int, batch: int, seq_len: int, kept: int):
  """[num_layers, batch, kept] int32: per layer and example, a uniform sorted kept subset."""
  scores = jax.random.uniform(key, (num_layers, batch, seq_len))
  return jnp.sort(jax.lax.top_k(scores, kept)[1], axis=-1).astype(jnp.int32)


class RandomLTD(Method):
  """random-LTD on the method interface (``method.name=random_ltd``, options in
  ``method.random_ltd``)."""
  name = "random_ltd"
  composes_with = ("raptr", "pld")   # width RaPTr or PLD: every layer keeps its position

  def check_partner(self, cfg, model_cfg, stages) -> None:
    """Wrapped layer ids are positions in the stack a step runs, so a partner must run all L
    layers in every stage (RaPTr's width axes, PLD); depth subnetworks and stacking are refused."""
    L = model_cfg.num_layers
    for st in stages:
      k = st.active_layers if st.active_layers is not None else (st.view or {}).get("num_layers", L)
      if k != L:
        raise ValueError(f"method.name={cfg.method.name!r}: stage {st.name!r} runs {k:g} of {L} layers, "
                         "and random-LTD's wrapped layers are positions in the full stack; compose "
                         "random-LTD with method.raptr.axis=heads or mlp, or with pld")

  def settings(self, cfg, model_cfg=None):
    """The resolved options: {min, max, step, require, stacks: {stack: (wrapped, length)}}."""
    c, S = cfg.method.random_ltd, cfg.data.seq_len
    num_layers = (model_cfg or cfg.model).num_layers
    step = int(c.seq_per_step)
    min_value = int(c.min_value) or max(1, S // 16)
    max_value = int(c.max_value) or S
    if step < 1:
      raise ValueError(f"method.random_ltd.seq_per_step must be >= 1 (DeepSpeed and the paper: 16), got {step}")
    if not 0 < min_value <= max_value:
      raise ValueError(f"method.random_ltd.min_value ({min_value}) must be in (0, max_value = "
                       f"{max_value}]; e.g. min_value={max(1, max_value // 16)}")
    if max_value > S:
      raise ValueError(f"method.random_ltd.max_value={max_value} exceeds data.seq_len={S}; "
                       f"use max_value={S} (or 0: the sequence length)")
    if first_length(min_value, step) > max_value:
      raise ValueError(f"method.random_ltd.seq_per_step={step} has no multiple in [min_value, "
                       f"max_value] = [{min_value}, {max_value}]; use a seq_per_step that divides "
                       f"max_value, e.g. {math.gcd(max_value, step) or 1}")
    if c.schedule not in SCHEDULES:
      raise ValueError(f"method.random_ltd.schedule must be one of {SCHEDULES}, got {c.schedule!r}")
    if c.require_steps:
      if cfg.budget.unit != "steps":
        raise ValueError(f"method.random_ltd.require_steps counts steps, but budget.unit="
                         f"{cfg.budget.unit!r}; give the share of the budget instead, e.g. "
                         "method.random_ltd.require_fraction=0.7 and require_steps=0")
      require = c.require_steps / float(cfg.budget.value)
    else:
      require = float(c.require_fraction)
    if not 0.0 < require <= 1.0:
      raise ValueError(f"method.random_ltd: full length is reached at budget fraction {require:g}; "
                       "it must lie in (0, 1], e.g. require_fraction=0.7 (or require_steps within "
                       "the budget)")
    if c.lr not in LR_MODES:
      raise ValueError(f"method.random_ltd.lr must be one of {LR_MODES}, got {c.lr!r}")
    if c.lr == "layer_tokens" and cfg.budget.unit in ("rst_seconds", "rst_hours"):
      raise ValueError("method.random_ltd.lr='layer_tokens' maps the budget to layer-tokens through "
                       "the steps the plan takes, which an RST budget only knows after calibration; "
                       "use method.random_ltd.lr='budget' (the schedule on the RST clock)")
    stacks = {}
    if cfg.model.family == "t5":
      if c.stacks not in STACKS:
        raise ValueError(f"method.random_ltd.stacks must be one of {STACKS}, got {c.stacks!r}")
      decoder_layers = cfg.model.num_decoder_layers or num_layers
      targets = target_length(cfg.data) or max(1, S // 4)
      if c.stacks in ("encoder", "both"):
        stacks["encoder"] = (parse_layers(c.layers, num_layers, "method.random_ltd.layers"), S)
      if c.stacks in ("decoder", "both"):
        stacks["decoder"] = (parse_layers(c.layers, decoder_layers, "method.random_ltd.layers"), targets)
    else:
      stacks["layers"] = (parse_layers(c.layers, num_layers, "method.random_ltd.layers"), S)
    return dict(min=min_value, max=max_value, step=step, require=require, stacks=stacks)

  def validate(self, cfg) -> None:
    self.stages(cfg, cfg.model)

  @staticmethod
  def lengths(cfg, s) -> list[tuple[int, float, float]]:
    """[(r, start, end)] over the budget (r in tokens of ``data.seq_len``) for the resolved
    options ``s`` (``settings``)."""
    S = cfg.data.seq_len
    if cfg.method.random_ltd.schedule == "constant":
      return [(first_length(s["min"], s["step"]), 0.0, 1.0)] if s["min"] < S else [(S, 0.0, 1.0)]
    return mslg_stages(s["min"], s["max"], s["step"], s["require"], S)

  def stages(self, cfg, model_cfg):
    s, S = self.settings(cfg, model_cfg), cfg.data.seq_len
    lengths = self.lengths(cfg, s)
    limit = int(cfg.method.random_ltd.max_compiles)
    if len(lengths) > limit:
      span = s["max"] - first_length(s["min"], s["step"])
      fit = max(s["step"], -(-span // max(1, limit - 2)))
      raise ValueError(f"method.random_ltd: this schedule has {len(lengths)} kept lengths, each a "
                       f"compile, over method.random_ltd.max_compiles={limit}; use seq_per_step="
                       f"{fit} or raise max_compiles")
    family_t5 = cfg.model.family == "t5"
    out = []
    for r, _, end in lengths:
      if r >= S:
        out.append(Stage("full", end))
        continue
      drop = {name: (self._kept(r, S, length), len(wrapped))
              for name, (wrapped, length) in s["stacks"].items()}
      select = self._make_select(s["stacks"], drop, family_t5)
      shape = ("random_ltd", tuple(sorted((n, drop[n][0], s["stacks"][n][0]) for n in drop)))
      out.append(Stage(f"random_ltd:r={r}", end, shape, select, token_drop=drop))
    return tuple(out)

  @staticmethod
  def _kept(r: int, seq_len: int, length: int) -> int:
    """Kept tokens of a stack of ``length`` tokens per row when r of ``seq_len`` are kept."""
    return r if length == seq_len else min(length, max(1, -(-r * length // seq_len)))

  @staticmethod
  def _make_select(stacks, drop, family_t5: bool):
    names = sorted(drop)

    def select(key, batch, progress):
      del progress
      keys = dict(zip(names, jax.random.split(key, len(names))))
      rows = next(iter(batch.values())).shape[0]
      sel = {}
      for name in names:
        wrapped, length = stacks[name]
        indices = draw_kept(keys[name], len(wrapped), rows, length, drop[name][0])
        sel[name] = Selection(tokens=TokenSelection(indices, layers=wrapped))
      if family_t5:
        return EncoderDecoderSelection(encoder=sel.get("encoder"), decoder=sel.get("decoder"))
      return sel["layers"]

    return select

  def lr_schedule(self, cfg, plan, lr_fn):
    if cfg.method.random_ltd.lr != "layer_tokens" or all(st.token_drop is None for st in plan.stages):
      return lr_fn
    fractions, clock = layer_token_clock(plan, cfg.schedule.warmup)
    xs, ys = jnp.asarray(fractions, jnp.float32), jnp.asarray(clock, jnp.float32)
    return lambda fraction: lr_fn(jnp.interp(fraction, xs, ys))

  @functools.cached_property
  def _stack_lengths(self) -> dict[str, int]:
    """{wrapped stack: tokens per row} of this run (resolved once, for the per-step metrics)."""
    return {name: length for name, (_, length) in self.settings(self.cfg)["stacks"].items()}

  def metrics(self, stage, fraction):
    """Kept tokens per row of each wrapped stack now (the whole length once MSLG is done)."""
    drop = stage.token_drop or {}
    out = {}
    for name, length in self._stack_lengths.items():
      key = "random_ltd/kept" + ("" if name == "layers" else "_" + name)
      out[key] = drop[name][0] if name in drop else length
    return out


def layer_token_clock(plan, warmup: float) -> tuple[list[float], list[float]]:
  """The LayerToken LR's time (Appendix C) at each stage boundary of ``plan``: the budget
  fraction where the run's schedule evaluated at that time gives the LR that follows consumed
  layer-tokens. u = consumed layer-tokens / (the run's steps x a full step's layer-tokens);
  warmup ends at u = ``warmup`` (Eq. 1) and the decay maps u in [warmup, U] onto [warmup, 1]
  (Eq. 2), U the run's total. Within a stage each step costs the same, so the map is linear
  there."""
  full = plan.layer_tokens(None, 0.0)
  edges = [0.0] + [st.end for st in plan.stages]
  steps, tokens = [0.0], [0.0]
  for stage, a, b in zip(plan.stages, edges, edges[1:]):
    n = (b - a) * plan.budget / plan.charge(stage, False, a)   # steps the stage takes
    steps.append(steps[-1] + n)
    tokens.append(tokens[-1] + n * plan.layer_tokens(stage, a))
  u = [t / (steps[-1] * full) for t in tokens]
  total = u[-1]
  # Boundaries plus the point where warmup ends (the map has a kink there).
  points = sorted(set(edges) | ({_inverse(edges, u, warmup)} if 0 < warmup < total else set()))
  clock = []
  for f in points:
    uf = _interp(f, edges, u)
    if uf <= warmup or total <= warmup:
      clock.append(uf)
    else:
      clock.append(warmup + (uf - warmup) * (1.0 - warmup) / (total - warmup))
  return points, clock


def _interp(x, xs, ys):
  for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
    if x <= x1:
      return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
  return ys[-1]


def _inverse(xs, ys, y):
  """x where the increasing piecewise-linear (xs, ys) reaches y."""
  return _interp(y, ys, xs)
