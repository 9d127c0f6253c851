"""A plain-JAX train step of the project's default decoder, written out with ``jax.numpy`` and
optax only (no project code): the reference ``framework_tax.py`` times the project's step against.

The model is the default decoder of ``configs/gpt.py`` / ``configs/ul2.py``: token embedding,
L pre-norm blocks (RMSNorm, rotary self-attention with causal masking, tanh-GELU gated MLP)
scanned over stacked parameters, a final RMSNorm and an untied output matrix; the loss is the
mean token cross-entropy. The optimizer is what the project's default builds: global-norm
clipping at 1, AdamW (b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1 on everything but the norm
scales) at a learning rate given per step. One ``jax.jit`` with the parameters and optimizer
state donated.

Two subnetwork steps, written out as directly:

* ``raptr``: the step of a random k-of-L subnetwork (RaPTr with the first and last layer fixed):
  the stacked parameters of the k drawn layers gathered (``a[idx]``) and scanned.
* ``random_ltd``: every layer but the first and last runs on r of the S tokens of each row
  (``lax.top_k`` of uniform keys, sorted, so causal attention over the kept tokens is the full
  layer's restricted to them): gathered, run, scattered back.

Parameters are a dict ``{"embedding" [V, d], "layers": {"attn_norm" [L, d], "q" / "k" / "v"
[L, d, N, H], "o" [L, N, H, d], "mlp_norm" [L, d], "wi" / "wg" [L, d, F], "wo" [L, F, d]},
"final_norm" [d], "head" [d, V]}``.
"""
import functools

import jax
import jax.numpy as jnp
import optax

NORM_EPS = 1e-6
ROTARY_BASE = 10000.0


def rms_norm(x, scale):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + NORM_EPS)
  return (y * scale).astype(x.dtype)


def rope(x, positions):
  """x [B, T, N, H] rotated at positions [B, T] (half-split rotation)."""
  half = x.shape[-1] // 2
  freq = ROTARY_BASE ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[:, :, None, None] * freq
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def block(x, p, positions):
  """One pre-norm block on x [B, T, d] at positions [B, T] (causal over the T tokens given)."""
  h = rms_norm(x, p["attn_norm"])
  q = rope(jnp.einsum("btd,dnh->btnh", h, p["q"]), positions)
  k = rope(jnp.einsum("btd,dnh->btnh", h, p["k"]), positions)
  v = jnp.einsum("btd,dnh->btnh", h, p["v"])
  attended = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  x = x + jnp.einsum("btnh,nhd->btd", attended, p["o"])
  h = rms_norm(x, p["mlp_norm"])
  gated = jax.nn.gelu(h @ p["wi"]) * (h @ p["wg"])
  return x + gated @ p["wo"]


def run_layers(x, stacked, positions):
  return jax.lax.scan(lambda x, p: (block(x, p, positions), None), x, stacked)[0]


def loss_from_hidden(params, x, targets):
  logits = jnp.einsum("btd,dv->btv", rms_norm(x, params["final_norm"]), params["head"])
  logits = logits.astype(jnp.float32)
  gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - gold)


def positions_of(inputs):
  return jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)


def full_loss(params, batch, key=None):
  x = params["embedding"][batch["inputs"]]
  x = run_layers(x, params["layers"], positions_of(batch["inputs"]))
  return loss_from_hidden(params, x, batch["targets"])


def raptr_layers(key, num_layers: int, k: int):
  """The first and last layer and k - 2 of the others, drawn uniformly, ascending."""
  middle = 1 + jnp.sort(jax.random.permutation(key, num_layers - 2)[:k - 2])
  return jnp.concatenate([jnp.array([0]), middle, jnp.array([num_layers - 1])]).astype(jnp.int32)


def raptr_loss(k: int):
  def loss(params, batch, key):
    num_layers = params["layers"]["q"].shape[0]
    idx = raptr_layers(key, num_layers, k)
    x = params["embedding"][batch["inputs"]]
    x = run_layers(x, jax.tree.map(lambda a: a[idx], params["layers"]), positions_of(batch["inputs"]))
    return loss_from_hidden(params, x, batch["targets"])
  return loss


def kept_tokens(key, layers: int, batch: int, seq_len: int, kept: int):
  """[layers, B, r]: each row's r kept positions per layer, uniform without replacement, ascending."""
  scores = jax.random.uniform(key, (layers, batch, seq_len))
  return jnp.sort(jax.lax.top_k(scores, kept)[1], axis=-1).astype(jnp.int32)


def random_ltd_loss(kept: int):
  def loss(params, batch, key):
    inputs = batch["inputs"]
    stacked = params["layers"]
    num_layers = stacked["q"].shape[0]
    positions = positions_of(inputs)
    first = jax.tree.map(lambda a: a[0], stacked)
    middle = jax.tree.map(lambda a: a[1:-1], stacked)
    last = jax.tree.map(lambda a: a[-1], stacked)
    x = block(params["embedding"][inputs], first, positions)
    idx = kept_tokens(key, num_layers - 2, inputs.shape[0], inputs.shape[1], kept)

    def dropped(x, layer):
      p, rows = layer
      take = lambda a: jnp.take_along_axis(a, rows[..., None] if a.ndim == 3 else rows, axis=1)
      out = block(take(x), p, take(positions))
      return jax.vmap(lambda a, i, u: a.at[i].set(u))(x, rows, out), None

    x = jax.lax.scan(dropped, x, (middle, idx))[0]
    x = block(x, last, positions)
    return loss_from_hidden(params, x, batch["targets"])
  return loss


def adamw(params, learning_rate):
  """The project's default optimizer, as optax spells it; ``learning_rate``: step -> LR."""
  decay = jax.tree_util.tree_map_with_path(lambda path, _: "norm" not in jax.tree_util.keystr(path), params)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(learning_rate, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=decay))


def make_step(loss_fn, tx):
  """``step(params, opt_state, batch, key) -> (params, opt_state, loss)``, params and state donated."""

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step
