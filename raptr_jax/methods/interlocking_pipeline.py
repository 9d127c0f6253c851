"""Interlocking backprop pipelined over the mesh's ``stage`` axis: component k on stage device k.

With ``mesh.stage = K`` the stacked layers split over the stage axis (``sharding.RULES``), so
device k of the axis holds exactly component k's layers (equal components). One
``jax.shard_map`` over that axis (the data axis stays automatic: data parallelism works inside
each stage as elsewhere; FSDP and tensor axes are refused at config time, XLA's partitioner
fails on them inside the map) runs a step in three parts;
``ppermute`` moves activations one device up and cotangents one device down:

* forward, K ticks: at tick t device t runs its component on the activations it received at
  tick t - 1 (c_1: the embedded tokens) and sends its output to device t + 1; the others pass
  (a ``lax.cond`` on the stage index). Each device then takes its component's VJP on its input
  (the forward recomputed once, as activation checkpointing would: the earlier ticks keep no
  residuals), so its last tick is the VJP's forward, in parallel on every device;
* heads, one tick: device k < K - 1 runs auxiliary head k on its output (its loss, the head's
  gradients, the cotangent of its output), device K - 1 the model's head;
* backward, n ticks: at tick s device j holds the cotangent of loss j + s (tick 0: its own
  head's). It pulls it back through its component; where it learns from that loss
  (``Split.target(j) == j + s``) it keeps the parameter gradient, and where an earlier
  component learns from it, it sends the input gradient to device j - 1. A component so waits
  only for the losses the mode routes to it: n ticks, not K (local: 1, pairwise: 2,
  end-to-end: K).

The routed gradients are those of ``Interlocking.value_and_grad`` on one device (same VJPs, the
same cotangents), summed over stages where several devices contribute (the output projection's
uses, tied or not); the embedding's input gradient leaves the map as c_1's input cotangent and
is applied outside it; the optimizer then updates each stage's layers where they live.

Per step this is K forward + 1 head + n backward ticks on the critical path: end-to-end 2K
units of the paper's Figure 2, n-wise K + n. The paper's steady-state 2n (its b >> a) needs
consecutive steps in flight at once, with a component starting the next batch's forward while
later ones still work on this one; that is not done here (each step fills and drains the
pipe, and the RST clock's K-device model, ``interlocking_time``, charges the steady state).
A device idles (``lax.cond``) in the forward ticks that are not its own and in the backward
ticks where it holds no routed loss, as in any pipeline bubble; a backward tick it works in is
a full pull-back (parameter and input halves, whichever it needs); the recomputed forward
costs one component forward per device per step. Every collective over the stage axis sits
outside the conditionals (shared-parameter gradients are summed after them), so the automatic
collectives of the other axes inside a branch always run on a whole stage group.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from raptr_jax.models import aux_heads as aux_lib
from raptr_jax.sharding import PIPELINE_AXIS, on_mesh


def routing_tables(split) -> tuple[np.ndarray, np.ndarray]:
  """``learn[j, s]``: device j learns from the cotangent it holds at backward tick s (that of
  loss j + s); ``send[j, s]``: it passes that loss's input gradient on to device j - 1."""
  K, n = split.count, split.n
  learn, send = np.zeros((K, n), bool), np.zeros((K, n), bool)
  for j in range(K):
    for s in range(min(n, K - j)):
      learners = split.learners(j + s)
      learn[j, s] = j in learners
      send[j, s] = bool(learners) and learners[0] < j
  return learn, send


def _shift(x, up: bool, K: int):
  """Each stage device's ``x`` to its neighbour above (up) or below; the edge device gets zeros."""
  perm = [(i, i + 1) for i in range(K - 1)] if up else [(i, i - 1) for i in range(1, K)]
  return jax.lax.ppermute(x, PIPELINE_AXIS, perm)


def _varying(tree):
  """Marks values as differing between stage devices (``shard_map``'s types), where not yet."""
  def cast(x):
    return x if PIPELINE_AXIS in jax.typeof(x).manual_axis_type.varying else jax.lax.pcast(x, PIPELINE_AXIS, to="varying")
  return jax.tree.map(cast, tree)


def routed_gradients(split, mesh, functions, *, heads: bool, blocks: int):
  """The pipelined map ``(layers, rest, x, batch) -> (loss, aux, losses [K], g_layers, g_x,
  g_final_norm, g_w, g_towers)``.

  ``functions(batch)`` gives ``(run, final_head, aux_head)`` for a batch: ``run(theta, h)`` a
  component's layers on h; ``final_head(norm, w, h)`` and ``aux_head(tower, w, h)`` a head's
  ``(loss, aux)``. ``layers``: the stacked layers (split over the stage axis); ``rest``: the
  other parameters a stage reads (``final_norm``, ``w`` the output matrix, ``aux_heads``);
  ``x``: the embedded tokens. ``g_x`` is the cotangent of ``x`` (c_1's input), ``g_towers`` the
  heads' gradients stacked as the ``aux_heads`` parameters are (None without heads).
  """
  K, n = split.count, split.n
  if mesh.shape.get(PIPELINE_AXIS, 1) != K or len(set(split.sizes)) != 1:
    raise ValueError(f"a pipelined run puts {K} equal components on the mesh's {PIPELINE_AXIS!r} axis; "
                     f"got mesh {dict(mesh.shape)} and components of {split.sizes} layers: set "
                     f"mesh.stage={K} and method.interlocking.sizes=() with components dividing the layers")
  learn_table, send_table = (jnp.asarray(t) for t in routing_tables(split))

  def per_stage(layers, rest, x, batch):
    k = jax.lax.axis_index(PIPELINE_AXIS)
    one = _varying(jnp.ones((), jnp.float32))  # d(loss)/d(loss) of this stage's own head
    run, final_head, aux_head = functions(batch)
    # Every stage differentiates its own copy of the shared parameters: their gradients stay
    # per stage inside the branches below (no collective where only some stages run) and are
    # summed once, after them.
    rest = _varying(rest)
    w = rest["w"]

    # Forward: activations up the pipe, one component per tick.
    h = _varying(x)
    for t in range(K - 1):
      out = jax.lax.cond(k == t, run, lambda theta, h: h, layers, h)
      h = jnp.where(k == t + 1, _shift(out, True, K), h)
    out, pull = jax.vjp(run, layers, h)

    # Heads: each stage's own loss, its head's gradients and its output's cotangent.
    def last(out):
      loss, pull_head, aux = jax.vjp(final_head, rest["final_norm"], w, out, has_aux=True)
      g_norm, g_w, g_h = pull_head(one)
      return _varying((loss, aux, g_norm, g_w, g_h))

    zero_tower = None
    if heads:
      zero_tower = jax.tree.map(jnp.zeros_like, aux_lib.tower(rest["aux_heads"], 0, blocks))

      def head(out):
        tower = aux_lib.tower(rest["aux_heads"], jnp.minimum(k, K - 2), blocks)
        loss, pull_head, aux = jax.vjp(aux_head, tower, w, out, has_aux=True)
        g_tower, g_w, g_h = pull_head(one)
        return _varying(((loss, aux, jnp.zeros_like(rest["final_norm"]), g_w, g_h), g_tower))

      (loss, aux, g_norm, g_w, g_h), g_tower = jax.lax.cond(
          k == K - 1, lambda out: (last(out), _varying(zero_tower)), head, out)
    else:  # end-to-end without heads: components 1..K-1 have no loss of their own
      shapes = jax.eval_shape(last, out)
      zeros = lambda out: _varying(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
      loss, aux, g_norm, g_w, g_h = jax.lax.cond(k == K - 1, last, zeros, out)

    # Backward: at tick s this stage holds loss (k + s)'s cotangent; it pulls it back only when
    # it learns from that loss or passes it on.
    g, g_layers, g_x = g_h, jax.tree.map(jnp.zeros_like, layers), jnp.zeros_like(h)
    no_pull = _varying((g_layers, g_x))
    for s in range(n):
      learn, send = learn_table[k, s], send_table[k, s]
      g_theta, g_in = jax.lax.cond(learn | send, pull, lambda g: no_pull, g)
      g_layers = jax.tree.map(lambda acc, d: jnp.where(learn, d, acc), g_layers, g_theta)
      g_x = jnp.where(learn & (k == 0), g_in, g_x)
      if s < n - 1:
        g = _shift(jnp.where(send, g_in, jnp.zeros_like(g_in)), False, K)

    psum = lambda v: jax.lax.psum(v, PIPELINE_AXIS)
    final = lambda v: psum(jnp.where(k == K - 1, v, jnp.zeros_like(v)))
    outputs = (final(loss), jax.tree.map(final, aux), loss[None], g_layers, psum(g_x), psum(g_norm), psum(g_w))
    if heads:
      outputs += ({"norm": g_tower["norm"][None]} | ({"layers": g_tower["layers"]} if blocks else {}),)
    return outputs

  stage = P(PIPELINE_AXIS)

  def pipelined(layers, rest, x, batch):
    layer_specs = jax.tree.map(lambda _: stage, layers)
    out_specs = (P(), P(), stage, layer_specs, P(), P(), P()) + ((stage,) if heads else ())
    outputs = jax.shard_map(on_mesh(per_stage, None), mesh=mesh,  # per-device shapes inside
                            in_specs=(layer_specs, P(), P(), P()), out_specs=out_specs,
                            axis_names={PIPELINE_AXIS})(layers, rest, x, batch)
    if not heads:
      return outputs + (None,)
    *outputs, g_towers = outputs  # one tower per stage; the last stage's is zeros (it has none)
    g_heads = {"norms": g_towers["norm"][:K - 1]}
    if blocks:
      g_heads["layers"] = jax.tree.map(lambda v: v[:(K - 1) * blocks], g_towers["layers"])
    return (*outputs, g_heads)

  return pipelined
