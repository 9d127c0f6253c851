"""The K-device step time of interlocking backprop (the paper's Figure 2), from measured times.

The paper counts time in units of one component's forward (= backward) pass on its own
accelerator: for ``a`` accelerators and ``b`` steps, end-to-end takes 2ab units, local 2b + a - 1,
n-wise 2bn + a - n, i.e. per step 2a, 2 and 2n once the pipeline is full. We keep that
critical-path reasoning and replace its units by times measured on this device, so that uneven
components, the auxiliary heads and the pass-through gradients count:

* ``forward[k]``: component k's forward (c_1's includes the embedding lookup);
* ``backward[k]``: its backward pass with parameter and input gradients;
* ``backward_input[k]``: its backward pass with input gradients only (a loss passing through
  it to an earlier component);
* ``head[t]``: loss t's head, forward and backward (auxiliary head t, or the model's head);
* ``update[k]``: the optimizer update of component k's parameters (the measured update of the
  whole model, split by parameter count; c_1 holds the embeddings, c_K the output layer).

Component k learns from loss t = min(k + n - 1, K) (``Split.target``); it cannot start the
next step's forward before its own update (no stale weights, as the paper's schedules), so its
cycle is the forward through c_k .. c_t, head t, the backward from c_t down to c_{k+1} (full
where those components learn from the same loss, input-only otherwise), its own backward and
its update. A device is also busy with every other piece of work its component does each step
(its head, each pass-through). The modelled step time is the longest cycle or device load:

    T = max( max_k [sum_{j=k..t} forward_j + head_t + sum_{j=k+1..t} back_j + backward_k + update_k],
             max_j [forward_j + head_j + backward_j + passes_j * backward_input_j + update_j] )

Assumptions: one component per device; the pipeline full (the a - n fill steps of Figure 2 are
ignored, negligible for b >> a); activation and gradient transfers between neighbouring devices
free (an ICI / NVLink hop of [B, T, d] is small against a component's compute at the paper's
sizes; not so across hosts); the tied output layer's gradients summed across devices off the
critical path. With f = backward = backward_input and heads and updates free this is exactly
the paper's 2n units (2K end-to-end, 2 local).
"""
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from raptr_jax.models import aux_heads as aux_lib
from raptr_jax.models import embeddings, get_family


@dataclasses.dataclass(frozen=True)
class ComponentTimes:
  forward: tuple[float, ...]
  backward: tuple[float, ...]
  backward_input: tuple[float, ...]
  head: tuple[float, ...]
  update: tuple[float, ...]

  def to_dict(self) -> dict:
    return {k: list(v) for k, v in dataclasses.asdict(self).items()}


def pass_throughs(split, j: int) -> int:
  """How many losses pass through component j on their way to an earlier one (input gradients
  only): losses t >= j routed to a component below j that j itself does not learn from."""
  return sum(1 for t in range(j, split.count)
             if split.learners(t) and split.learners(t)[0] < j and j not in split.learners(t))


def cycle(split, times: ComponentTimes, k: int) -> float:
  """Component k's critical path per step: forward to its loss, back down to itself, update."""
  t = split.target(k)
  learners = split.learners(t)
  back = sum(times.backward[j] if j in learners else times.backward_input[j] for j in range(k + 1, t + 1))
  return sum(times.forward[k:t + 1]) + times.head[t] + back + times.backward[k] + times.update[k]


def device_load(split, times: ComponentTimes, j: int) -> float:
  """Everything component j's device computes per step (its head, if it has one)."""
  return (times.forward[j] + times.head[j] + times.backward[j]
          + pass_throughs(split, j) * times.backward_input[j] + times.update[j])


def step_time(split, times: ComponentTimes) -> float:
  """The modelled K-device step time (module docstring)."""
  return max(max(cycle(split, times, k) for k in range(split.count)),
             max(device_load(split, times, j) for j in range(split.count)))


def _median_time(fn, args, steps: int, warmup: int) -> float:
  out = None
  times = []
  for i in range(1 + warmup + steps):
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    if i > warmup:
      times.append(time.perf_counter() - t)
  return statistics.median(times)


def measure(run, state, batch, steps: int = 5, warmup: int = 1) -> ComponentTimes:
  """Times each component's pieces on this device (each a jitted function; backward times are
  forward + backward minus forward, since a backward pass cannot run without its forward)."""
  method, ctx, mcfg = run.method, run.steps.ctx, run.model_cfg
  split, family = method.split(), get_family(run.cfg.model.family)
  params = state.params
  model = nnx.merge(ctx.graphdef, params)
  positions, segments, prefix = family.layer_inputs(batch, ctx.packed)
  emb = {k: params[k] for k in embeddings.EMBEDDING_PARAMS if k in params}
  embed = lambda e: embeddings.embed_tokens(mcfg, e, batch["inputs"], positions)
  run_layers = lambda theta, h: model.layers.run_layers(theta, h, positions, segments, prefix)
  w = embeddings.output_matrix(params, mcfg)
  heads = bool(method.section.aux_heads)
  stack = getattr(getattr(model, "aux_heads", None), "layers", None)

  def head_loss(k, head, w, h):
    if k == split.count - 1:
      return family.head_loss(mcfg, h, head, w, batch, ctx.packed)[0]
    y = aux_lib.head_hidden(stack, head, h, positions, segments, prefix)
    return family.head_loss(mcfg, y, head["norm"], w, batch, ctx.packed)[0]

  forward, backward, backward_input, head = [], [], [], []
  h = jax.jit(embed)(emb)
  for k, (a, b) in enumerate(split.bounds):
    theta = jax.tree.map(lambda p, a=a, b=b: p[a:b], params["layers"])
    if k == 0:  # c_1 runs the embedding too, and never passes a loss through
      fwd = jax.jit(lambda e, theta: run_layers(theta, embed(e)))
      both = jax.jit(lambda e, theta: jax.vjp(lambda e, t: run_layers(t, embed(e)), e, theta)[1](
          jnp.ones_like(run_layers(theta, embed(e)))))
      args = (emb, theta)
    else:
      fwd = jax.jit(run_layers)
      both = jax.jit(lambda theta, h: jax.vjp(run_layers, theta, h)[1](jnp.ones_like(h)))
      inputs = jax.jit(lambda theta, h: jax.vjp(lambda x: run_layers(theta, x), h)[1](jnp.ones_like(h)))
      args = (theta, h)
    f = _median_time(fwd, args, steps, warmup)
    forward.append(f)
    backward.append(max(0.0, _median_time(both, args, steps, warmup) - f))
    backward_input.append(max(0.0, _median_time(inputs, args, steps, warmup) - f) if k else 0.0)
    h = fwd(*args)
    if k < split.count - 1 and heads:
      tower = aux_lib.tower(params["aux_heads"], k, mcfg.aux_head_layers)
    elif k == split.count - 1:
      tower = params["final_norm"]
    else:
      head.append(0.0)
      continue
    grad = jax.jit(jax.grad(lambda tw, w, h, k=k: head_loss(k, tw, w, h), argnums=(0, 1, 2)))
    head.append(_median_time(grad, (tower, w, h), steps, warmup))
  update = _update_times(run, state, split, steps, warmup)
  return ComponentTimes(tuple(forward), tuple(backward), tuple(backward_input), tuple(head), update)


def _update_times(run, state, split, steps, warmup) -> tuple[float, ...]:
  """The optimizer update of the whole model, timed, split by each component's parameters."""
  tx = run.steps.ctx.optimizer.tx
  grads = jax.tree.map(jnp.ones_like, state.params)
  apply = jax.jit(lambda g, s, p: tx.update(g, s, p))
  total = _median_time(apply, (grads, state.opt_state, state.params), steps, warmup)
  counts = np.zeros(split.count)
  layer_of = np.asarray(split.layer_component())
  for leaf in jax.tree.leaves(state.params["layers"]):
    np.add.at(counts, layer_of, leaf[0].size)
  if "aux_heads" in state.params:
    for leaf in jax.tree.leaves(state.params["aux_heads"]):
      counts[:split.count - 1] += leaf.size / (split.count - 1)
  rest = {k: v for k, v in state.params.items() if k not in ("layers", "aux_heads")}
  for name, leaf in rest.items():
    counts[0 if name in embeddings.EMBEDDING_PARAMS else split.count - 1] += sum(x.size for x in jax.tree.leaves(leaf))
  return tuple(float(total * c / counts.sum()) for c in counts)
