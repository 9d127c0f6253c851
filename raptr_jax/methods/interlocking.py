"""Interlocking backprop (Gomez, Key, Perlin, Gou, Frosst, Dean, Gal 2022, "Interlocking
Backpropagation: Improving depthwise model-parallelism", Sections 3, 3.1 and Appendix B.3), for
Transformer language models.

The stacked layers are cut into K contiguous components c_1 .. c_K (``sizes``, or equal ones).
Components 1 .. K-1 each own an auxiliary head h_k (``aux_head_layers`` transformer blocks, the
paper's 2, then an RMSNorm and the model's output projection; 0 blocks: a linear head), which
predicts the targets from the component's output; c_K uses the model's own head. Each head has
its loss, L_k = L(h_k(c_k o ... o c_1 (x)), y), the objective the family trains with (masked
tokens for BERT, targets for the decoders). In n-wise training (``n``) the parameters of
component k are updated with the gradient of

    L_{t(k)},  t(k) = min(k + n - 1, K),

back-propagated through c_{t(k)}, ..., c_{k+1} (the paper: "the parameters in component k are
updated using gradients from L_{c_{k+(N-1)}}, which have been propagated backwards through the
intermediate components"; the final loss when k + n - 1 > K), and by no other loss, so in an
n-wise mode a component never learns from its own auxiliary loss (n >= 2). n = 1 is local
learning (each component from its own head), n = 2 pairwise, n = K end-to-end: every component
from the final loss, the heads trained beside it as probes; ``aux_heads=False`` (n = K only)
drops them, which is exactly the baseline's gradient. Which loss reaches which parameters:

* the layers of c_k: L_{t(k)}; the token (and learned position) embedding, c_1's input: L_{t(1)};
* auxiliary head h_k (its blocks and norm): L_k only;
* the final norm: L_K; the output projection W (untied head, or the tied embedding transposed):
  L_K plus, with ``aux_output="shared"`` (default), every L_k, because the paper's auxiliary
  networks project with the embedding matrix and learn from their own loss; ``"detached"``
  lets the heads read W without training it. With tied embeddings the embedding's gradient is
  the sum of its input use (L_{t(1)}) and its output use.

The loss logged as ``train/loss`` is L_K, the model's objective; evaluation and generation use
the final component's prediction only (the model without its heads), as the paper does.

Gradients are computed exactly, not by ``stop_gradient`` over a summed loss: the forward pass
keeps each component's VJP, and each loss's cotangent is pulled back through the components it
passes (input gradients only) to the component(s) it trains (parameter gradients), as the
components would do on K devices. A component pulls back at most n cotangents; XLA drops what a
pull-back does not use (the parameter half of a pass-through, the input half where no earlier
component learns from the loss; c_1's input gradient is kept: it trains the embeddings).

Each component has its own optimizer settings: its gradient is clipped to norm ``grad_clip`` on
its own (its layers and head, plus the embeddings for c_1, the final norm and untied head for
c_K; a tied embedding is one matrix and goes with c_1, its output uses included),
``optimizer.grad_clip`` by default, which this method turns off globally (a global norm would
couple components that never exchange gradients); ``lr_scales`` multiplies each component's
(and its head's) learning rate, with the same grouping. Moments and weight decay are per
parameter already. The logged ``grad_norm`` is after that clipping; ``interlocking/grad_norm_k``
are the components' norms before it.

A reading of the paper: Figure 1's caption and Section 3.1 ("the first component optimises for
both its local loss, and the loss of the second") can be read as component k also learning from
its own loss in n-wise modes; we follow Section 3's rule as stated (gradients from
L_{c_{k+(N-1)}} only), so an n-wise component never sees its own head's loss.

Pipelined: with ``mesh.stage = K`` (equal components) component k lives on device k of the
mesh's stage axis and the step runs as a pipeline (``interlocking_pipeline``: one
``shard_map`` over that axis, activations and cotangents passed between neighbours by
``ppermute``; a component waits only for the n losses the mode routes through it); the
gradients are the same as on one device, and the optimizer updates each component where it
lives. Data parallelism runs on the data axis beside it (FSDP and tensor parallelism are
refused with a stage axis for now: XLA's partitioner fails inside the stage map).

Time: on an RST budget a step is charged what it would take with one component per device
(``time_model="devices"``, the paper's fixed-time perspective; a pipelined run is on K devices
and is charged its measured step): ``interlocking_time`` models the
critical path of each mode (Figure 2) from per-component times measured at calibration;
``"single"`` charges the compiled step as it runs (on one device, or pipelined over
``mesh.stage = K`` devices).

Families: the decoder (UL2, GPT) and BERT. T5 has two stacks joined by cross-attention (every
decoder layer reads the encoder output), so contiguous components of one stack do not describe
it; it is refused at config time.

Options (``method.interlocking``): ``components`` (K, 4 as the paper's Figure 6 midpoint),
``sizes`` (() = equal), ``n`` (2), ``aux_heads`` (True), ``aux_head_layers`` (2),
``aux_output`` (shared), ``grad_clip`` (-1 = optimizer.grad_clip), ``lr_scales`` (() = 1),
``time_model`` (devices).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from raptr_jax.methods import interlocking_pipeline
from raptr_jax.methods.base import Method
from raptr_jax.models import aux_heads as aux_lib
from raptr_jax.models import embeddings, get_family
from raptr_jax.plan import Stage
from raptr_jax.sharding import PIPELINE_AXIS

AUX_OUTPUTS = ("shared", "detached")
TIME_MODELS = ("devices", "single")


@dataclasses.dataclass(frozen=True)
class Split:
  """K components of an L-layer stack and the n-wise routing between them (0-based)."""
  sizes: tuple[int, ...]
  n: int

  @property
  def count(self) -> int:
    return len(self.sizes)

  @property
  def bounds(self) -> tuple[tuple[int, int], ...]:
    ends = [sum(self.sizes[:k + 1]) for k in range(self.count)]
    return tuple(zip([0] + ends[:-1], ends))

  def target(self, k: int) -> int:
    """The loss component k learns from: min(k + n - 1, K - 1)."""
    return min(k + self.n - 1, self.count - 1)

  def learners(self, t: int) -> tuple[int, ...]:
    """The components whose parameters learn from loss t."""
    return tuple(k for k in range(self.count) if self.target(k) == t)

  def layer_component(self) -> list[int]:
    """The component of each layer."""
    return [k for k, size in enumerate(self.sizes) for _ in range(size)]


def split_of(c, num_layers: int) -> Split:
  """The ``method.interlocking`` split of ``num_layers`` layers, checked (errors name the key)."""
  K = int(c.components)
  if not 2 <= K <= num_layers:
    raise ValueError(f"method.interlocking.components={K}: cut the {num_layers} layers into 2 to {num_layers} "
                     f"components (the paper's Transformers: 3 to 6 of 6 layers each), e.g. components="
                     f"{max(2, min(4, num_layers))}")
  if c.sizes:
    sizes = tuple(int(s) for s in c.sizes)
    if len(sizes) != K or min(sizes) < 1 or sum(sizes) != num_layers:
      raise ValueError(f"method.interlocking.sizes={sizes} must give {K} positive layer counts (one per "
                       f"component) summing to model.num_layers={num_layers}; () splits equally")
  else:
    if num_layers % K:
      raise ValueError(f"method.interlocking.components={K} does not divide model.num_layers={num_layers} "
                       f"equally; give method.interlocking.sizes (e.g. {_uneven(num_layers, K)}) or a "
                       f"divisor of {num_layers}")
    sizes = (num_layers // K,) * K
  n = int(c.n)
  if not 1 <= n <= K:
    raise ValueError(f"method.interlocking.n={n} must be in [1, {K}] (1 local, 2 pairwise, {K} end-to-end)")
  return Split(sizes, n)


def layer_passes(split: Split) -> float:
  """Forward-equivalent passes of a layer per step under the routing (for FLOPs): its
  component's forward; for each loss that reaches the component, a parameter-gradient pass if it
  learns from the loss and an input-gradient pass if the loss goes on to an earlier component
  (or, at c_1, to the embeddings). The baseline's 3 end-to-end; local learning skips the input
  gradients (2 but c_1's 3); n-wise adds the pass-throughs (K = 4: 3 pairwise, 3.25 3-wise)."""
  total = 0
  for j, size in enumerate(split.sizes):
    passes = 1
    for t in range(j, split.count):
      learners = split.learners(t)
      if learners and learners[0] <= j:
        passes += (j in learners) + (learners[0] < j or j == 0)
    total += size * passes
  return total / sum(split.sizes)


def _uneven(num_layers: int, K: int) -> tuple[int, ...]:
  return tuple(num_layers // K + (1 if k < num_layers % K else 0) for k in range(K))


def per_component(values, K: int, key: str, default: float) -> tuple[float, ...]:
  if not values:
    return (float(default),) * K
  values = tuple(float(v) for v in values)
  if len(values) == 1:
    return values * K
  if len(values) != K:
    raise ValueError(f"method.interlocking.{key} has {len(values)} entries for {K} components; give one "
                     f"per component or a single value")
  return values


class Interlocking(Method):
  name = "interlocking"
  pipelines = True

  @property
  def section(self):
    return self.cfg.method.interlocking

  def validate(self, cfg) -> None:
    c = cfg.method.interlocking
    m = cfg.model
    if m.norm_position != "pre" or m.head_transform or m.output_bias or m.tied_output_scale or m.norm != "rms":
      raise ValueError("method.name=interlocking gives each component an auxiliary head of pre-norm RMSNorm blocks "
                       "and the model's plain output projection; this model's output side (model.norm, "
                       "norm_position, head_transform, output_bias, tied_output_scale) is not that: train it "
                       "with another method")
    if cfg.model.family not in ("decoder", "bert"):
      raise ValueError(f"method.name=interlocking cuts one stack of layers into components; model.family="
                       f"{cfg.model.family!r} has an encoder and a decoder joined by cross-attention, which "
                       "contiguous components of one stack do not describe; use model.family='decoder' or 'bert'")
    split = split_of(c, int(cfg.model.num_layers))
    if not c.aux_heads and split.n != split.count:
      raise ValueError(f"method.interlocking.aux_heads=False leaves components 1..{split.count - 1} without a "
                       f"loss; it is end-to-end training only: set method.interlocking.n={split.count}")
    if int(c.aux_head_layers) < 0:
      raise ValueError(f"method.interlocking.aux_head_layers={c.aux_head_layers}: transformer blocks per "
                       "auxiliary head, >= 0 (the paper: 2; 0 = a linear head)")
    if c.aux_output not in AUX_OUTPUTS:
      raise ValueError(f"method.interlocking.aux_output must be one of {AUX_OUTPUTS}, got {c.aux_output!r}")
    if any(v <= 0 for v in per_component(c.lr_scales, split.count, "lr_scales", 1.0)):
      raise ValueError(f"method.interlocking.lr_scales={tuple(c.lr_scales)}: LR multipliers must be > 0")
    if c.grad_clip < 0 and c.grad_clip != -1.0:
      raise ValueError(f"method.interlocking.grad_clip={c.grad_clip}: each component's gradient-norm clip; "
                       "0 = off, -1 = optimizer.grad_clip")
    stages = int(cfg.mesh.get("stage", 1))
    if stages != 1 and stages != split.count:
      raise ValueError(f"mesh.stage={stages} must equal method.interlocking.components={split.count} (one "
                       f"component per stage device: mesh.stage={split.count}), or be 1 (unpipelined)")
    if stages != 1 and (int(cfg.mesh.fsdp) != 1 or int(cfg.mesh.tensor) != 1):
      raise ValueError(f"mesh.stage={stages} with mesh.fsdp={cfg.mesh.fsdp}, mesh.tensor={cfg.mesh.tensor}: a "
                       "pipelined run shards over stage and data only (XLA 0.10's partitioner fails on the "
                       "embedding gather inside the stage map otherwise); set mesh.fsdp=1 mesh.tensor=1")
    if stages != 1 and len(set(split.sizes)) != 1:
      raise ValueError(f"method.interlocking.sizes={split.sizes}: a pipelined run (mesh.stage={stages}) splits "
                       "the stacked layers equally over the stage devices; use sizes=() with components "
                       "dividing model.num_layers, or mesh.stage=1")
    if c.time_model not in TIME_MODELS:
      raise ValueError(f"method.interlocking.time_model must be one of {TIME_MODELS}, got {c.time_model!r}")
    if cfg.optimizer.name in ("sophia_g", "sophia_h"):
      raise ValueError(f"optimizer.name={cfg.optimizer.name!r} estimates the curvature of one objective; "
                       "interlocking backprop trains each component on its own loss: use adamw, lion or adafactor")

  def stages(self, cfg, model_cfg):
    """One full-model stage whose shape names the mode: its compiled step and its RST charge
    (a modelled K-device time) differ from the baseline's and between modes."""
    split, c = split_of(cfg.method.interlocking, int(model_cfg.num_layers)), cfg.method.interlocking
    return (Stage("full", 1.0, shape=("interlocking", split.sizes, split.n, bool(c.aux_heads),
                                      int(c.aux_head_layers), str(c.aux_output), str(c.time_model)),
                  layer_passes=layer_passes(split)),)

  def model_fields(self, cfg) -> dict:
    c = cfg.method.interlocking
    if not c.aux_heads:
      return {}
    return {"aux_heads": int(c.components) - 1, "aux_head_layers": int(c.aux_head_layers)}

  def optimizer_config(self, opt_cfg):
    """Clipping moves into the method, per component (``clip_norms``)."""
    opt_cfg = opt_cfg.copy_and_resolve_references()
    opt_cfg.grad_clip = 0.0
    return opt_cfg

  def split(self) -> Split:
    return split_of(self.section, int(self.cfg.model.num_layers))

  def clip_norm(self) -> float:
    """Each component's gradient-norm clip (0: none)."""
    clip = float(self.section.grad_clip)
    return float(self.cfg.optimizer.grad_clip or 0.0) if clip == -1.0 else clip

  def value_and_grad(self, ctx, model_of):
    """``(params, batch, selection) -> ((L_K, aux), routed gradients)``, aux carrying the
    ``interlocking/*`` metrics; ``selection`` must be None (the method runs the full model).
    On a mesh with ``stage = K`` the components run pipelined, one per stage device
    (``interlocking_pipeline``); elsewhere on the devices the step runs on."""
    split, family, mcfg = self.split(), get_family(self.cfg.model.family), ctx.model_cfg
    shared = self.section.aux_output == "shared"
    heads = bool(self.section.aux_heads)
    blocks = mcfg.aux_head_layers
    clip = self.clip_norm()
    pipelined = ctx.mesh.shape.get(PIPELINE_AXIS, 1) > 1

    def value_and_grad(params, batch, selection=None):
      if selection is not None:
        raise ValueError("interlocking backprop runs the full model; it takes no selection")
      model = model_of(params)
      stack = getattr(model.aux_heads, "layers", None) if heads else None

      def functions(batch):
        positions, segments, prefix = family.layer_inputs(batch, ctx.packed)

        def run(theta, h):
          return model.layers.run_layers(theta, h, positions, segments, prefix)

        def final_head(norm, w, h):
          return family.head_loss(mcfg, h, norm, w, batch, ctx.packed)

        def aux_head(head, w, h):
          y = aux_lib.head_hidden(stack, head, h, positions, segments, prefix)
          return family.head_loss(mcfg, y, head["norm"], w if shared else jax.lax.stop_gradient(w), batch,
                                  ctx.packed)

        return run, final_head, aux_head

      positions = family.layer_inputs(batch, ctx.packed)[0]
      emb = {k: params[k] for k in embeddings.EMBEDDING_PARAMS if k in params}
      x, embed_vjp = jax.vjp(lambda e: embeddings.embed_tokens(mcfg, e, batch["inputs"], positions), emb)
      rest = {"final_norm": params["final_norm"], "w": embeddings.output_matrix(params, mcfg)}
      if heads:
        rest["aux_heads"] = params["aux_heads"]
      if pipelined:
        route = interlocking_pipeline.routed_gradients(split, ctx.mesh, functions, heads=heads, blocks=blocks)
      else:
        route = functools.partial(_routed_on_one_device, split, functions, heads=heads, blocks=blocks)
      loss, aux, losses, g_layers, g_x, g_final_norm, g_w, g_heads = route(params["layers"], rest, x, batch)

      grads, = embed_vjp(g_x)
      grads["layers"] = g_layers
      grads["final_norm"] = g_final_norm
      if mcfg.tied_embeddings:  # one matrix: its input use (c_1) and its output uses
        grads["embedding"] = grads["embedding"] + g_w.T
      else:
        grads["head"] = g_w
      if heads:
        grads["aux_heads"] = g_heads
      if jax.tree.structure(grads) != jax.tree.structure(params):
        raise ValueError(f"interlocking backprop routed gradients to {sorted(grads)}, the model has "
                         f"{sorted(params)}: a parameter is missing from its routing table")
      grads, norms = _clip_per_component(grads, split, clip)
      metrics = {f"interlocking/aux_loss_{k + 1}": losses[k] for k in range(split.count - 1)} if heads else {}
      metrics |= {f"interlocking/grad_norm_{k + 1}": norms[k] for k in range(split.count)}
      return (loss, aux | {"method_metrics": metrics}), grads

    return value_and_grad

  def modelled_step(self, run, stage, state, batch, steps: int, warmup: int):
    """RST: a step charged what it takes with one component per device (``interlocking_time``),
    unless ``time_model="single"`` (this device's time of the whole step) or the run is
    pipelined (``mesh.stage = K``: the K devices are there, and the step is timed as it runs)."""
    if self.section.time_model != "devices" or run.mesh.shape.get(PIPELINE_AXIS, 1) > 1:
      return None
    from raptr_jax.methods import interlocking_time  # pylint: disable=g-import-not-at-top
    split = self.split()
    times = interlocking_time.measure(run, state, batch, steps, warmup)
    return {"seconds": interlocking_time.step_time(split, times), "devices": split.count, "n": split.n,
            "components": times.to_dict()}

  def transform_updates(self, updates, progress):
    scales = per_component(self.section.lr_scales, int(self.section.components), "lr_scales", 1.0)
    if all(s == 1.0 for s in scales):
      return updates
    return _scale_components(updates, self.split(), scales)

def _routed_on_one_device(split: Split, functions, layers, rest, x, batch, *, heads: bool, blocks: int):
  """Every component, head and routed pull-back on this device, in order: the same outputs as
  ``interlocking_pipeline.routed_gradients`` (``(loss, aux, losses, g_layers, g_x, g_final_norm,
  g_w, g_heads)``; ``losses`` [K]: each head's loss, then L_K; 0 for components without a head)."""
  run, final_head, aux_head = functions(batch)
  one = jnp.ones((), jnp.float32)
  outputs, component_vjps, h = [], [], x
  for a, b in split.bounds:
    h, pull = jax.vjp(run, jax.tree.map(lambda p: p[a:b], layers), h)
    outputs.append(h)
    component_vjps.append(pull)
  w = rest["w"]
  losses, cotangents, g_towers, g_w = [], [], [], jnp.zeros_like(w)
  for k in range(split.count - 1 if heads else 0):  # head k: its gradients and its cotangent
    loss_k, pull, _ = jax.vjp(aux_head, aux_lib.tower(rest["aux_heads"], k, blocks), w, outputs[k], has_aux=True)
    g_tower, g_wk, g_h = pull(one)
    losses.append(loss_k)
    g_towers.append(g_tower)
    g_w = g_w + g_wk
    cotangents.append(g_h)
  loss, pull, aux = jax.vjp(final_head, rest["final_norm"], w, outputs[-1], has_aux=True)
  g_final_norm, g_wk, g_h = pull(one)
  g_w = g_w + g_wk
  cotangents = (cotangents if heads else [None] * (split.count - 1)) + [g_h]

  # Each loss pulled back to the components that learn from it (parameter gradients), through
  # the components in between (input gradients only).
  g_layers, g_x = [None] * split.count, None
  for t in range(split.count):
    learners = split.learners(t)
    if not learners:
      continue
    g = cotangents[t]
    for j in range(t, learners[0] - 1, -1):
      g_theta, g = component_vjps[j](g)
      if j in learners:
        g_layers[j] = g_theta
    if learners[0] == 0:
      g_x = g
  g_layers = jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=0), *g_layers)
  g_heads = _stack_towers(g_towers, blocks) if heads else None
  losses = losses or [jnp.zeros_like(loss)] * (split.count - 1)
  return loss, aux, jnp.stack(losses + [loss]), g_layers, g_x, g_final_norm, g_w, g_heads


def _stack_towers(towers, blocks: int) -> dict:
  out = {"norms": jnp.stack([t["norm"] for t in towers])}
  if blocks:
    out["layers"] = jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=0), *[t["layers"] for t in towers])
  return out


def _group_sq_norms(grads, split: Split):
  """Squared gradient norm of each component: its layers, its head, c_1's embeddings, c_K's
  final norm and output projection."""
  K = split.count
  layer_of = jnp.asarray(split.layer_component(), jnp.int32)
  sq = jnp.zeros((K,), jnp.float32)
  for leaf in jax.tree.leaves(grads["layers"]):
    per_layer = jnp.sum(jnp.square(leaf.astype(jnp.float32)), axis=tuple(range(1, leaf.ndim)))
    sq = sq + jax.ops.segment_sum(per_layer, layer_of, K)
  if "aux_heads" in grads:
    sq = sq.at[:K - 1].add(_tower_sq_norms(grads["aux_heads"], K - 1))
  first = sum(jnp.sum(jnp.square(grads[k].astype(jnp.float32))) for k in embeddings.EMBEDDING_PARAMS if k in grads)
  last = sum(jnp.sum(jnp.square(grads[k].astype(jnp.float32))) for k in ("final_norm", "head") if k in grads)
  return sq.at[0].add(first).at[K - 1].add(last)


def _tower_sq_norms(g_heads, count: int):
  sq = jnp.sum(jnp.square(g_heads["norms"].astype(jnp.float32)), axis=1)
  if "layers" in g_heads:
    blocks = jax.tree.leaves(g_heads["layers"])[0].shape[0] // count
    tower_of = jnp.repeat(jnp.arange(count), blocks)
    for leaf in jax.tree.leaves(g_heads["layers"]):
      per_layer = jnp.sum(jnp.square(leaf.astype(jnp.float32)), axis=tuple(range(1, leaf.ndim)))
      sq = sq + jax.ops.segment_sum(per_layer, tower_of, count)
  return sq


def _scale_components(tree, split: Split, scales) -> dict:
  """Multiplies each component's part of a gradient / update dict by its entry of ``scales`` [K]."""
  K = split.count
  scales = jnp.asarray(scales, jnp.float32)
  per_layer = scales[jnp.asarray(split.layer_component(), jnp.int32)]
  along = lambda v: (lambda x: (x * v.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)))
  out = dict(tree)
  out["layers"] = jax.tree.map(along(per_layer), tree["layers"])
  if "aux_heads" in tree:
    heads = tree["aux_heads"]
    out["aux_heads"] = {"norms": along(scales[:K - 1])(heads["norms"])}
    if "layers" in heads:
      blocks = jax.tree.leaves(heads["layers"])[0].shape[0] // (K - 1)
      out["aux_heads"]["layers"] = jax.tree.map(along(jnp.repeat(scales[:K - 1], blocks)), heads["layers"])
  for k in embeddings.EMBEDDING_PARAMS:
    if k in tree:
      out[k] = tree[k] * scales[0].astype(tree[k].dtype)
  for k in ("final_norm", "head"):
    if k in tree:
      out[k] = tree[k] * scales[K - 1].astype(tree[k].dtype)
  return out


def _clip_per_component(grads, split: Split, clip: float):
  """Each component's gradient scaled to norm <= ``clip`` (0: unclipped), as optax's
  ``clip_by_global_norm`` does per component; returns the unclipped norms too."""
  norms = jnp.sqrt(_group_sq_norms(grads, split))
  if not clip:
    return grads, norms
  factors = jnp.where(norms < clip, 1.0, clip / jnp.maximum(norms, 1e-30))
  return _scale_components(grads, split, factors), norms


