"""Text generation from a prompt: greedy, or temperature / top-k sampling; a KV cache for decoders.

``generate(run, params, prompts, max_new_tokens, temperature, top_k, seed)`` continues each
prompt. Decoder models run a prefill over the prompt that fills a key/value cache of every layer
(``[layers, batch, window, heads, head_dim]``), then one token per step attending to the cache;
a UL2 decoder sees ``[S2S] prompt`` as its bidirectional prefix, as in pretraining. Without the
cache (``use_cache=False``, and for T5, whose decoder re-reads the encoder output) every step
runs the whole model on everything so far and takes the last position: the reference the cached
path is tested against. Generation stops at the vocabulary's eos or after ``max_new_tokens``; a prompt plus the
new tokens must fit the model's window (``data.seq_len``), else a clear error.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from raptr_jax.data.objectives import PARADIGM
from raptr_jax.data.vocab import load_vocabulary
from raptr_jax.models import embeddings, layers


def _sample(logits, key, temperature: float, top_k: int, vocab_size: int):
  """[B, V] fp32 logits -> [B] token ids (greedy at temperature 0); the rows past the
  tokenizer's ``vocab_size`` (the embedding's padding to a multiple of 128) are never drawn."""
  logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _layer(cfg, p, x, positions, cache_k, cache_v, write, mask):
  """One block on x [B, T, d] (pre- or post-norm, as ``layers.block``) whose keys / values are
  written into the layer's cache at rows ``write`` [B, T] (window positions); attention over the
  whole cache under ``mask`` (grouped-query models cache their key/value heads only)."""
  pre = cfg.norm_position == "pre"

  def branch(x, name, f):
    y = x + f(layers.norm(x, p, name, cfg) if pre else x)
    return y if pre else layers.norm(y, p, name, cfg)

  def attend(h):
    nonlocal cache_k, cache_v
    q, k, v = layers.project_qkv(p, h, h, positions, cfg)
    rows = jnp.arange(x.shape[0])[:, None]
    cache_k = cache_k.at[rows, write].set(k.astype(cache_k.dtype))
    cache_v = cache_v.at[rows, write].set(v.astype(cache_v.dtype))
    out = layers.attend(q, cache_k.astype(cfg.dtype), cache_v.astype(cfg.dtype), cfg, mask=mask, implementation="xla")
    return layers.attention_output(p, out, cfg)

  x = branch(x, "attn_norm", attend)
  x = branch(x, "mlp_norm", lambda h: layers.mlp(p, h, cfg))
  return x, cache_k, cache_v


def _forward(cfg, params, tokens, positions, cache, write, mask):
  """tokens [B, T] at ``positions`` through every layer, updating ``cache`` = (k, v)
  [L, B, W, K, H] at rows ``write``; returns fp32 logits [B, T, V] and the cache."""
  x = embeddings.embed_tokens(cfg, params, tokens, positions)

  def body(x, layer):
    p, ck, cv = layer
    x, ck, cv = _layer(cfg, p, x, positions, ck, cv, write, mask)
    return x, (ck, cv)

  x, cache = jax.lax.scan(body, x, (params["layers"], *cache))
  extras = {k: v for k, v in params.items() if k in embeddings.HEAD_EXTRAS}
  if "final_norm_bias" in params:
    extras["final_norm_bias"] = params["final_norm_bias"]
  logits = embeddings.project(cfg, x, params.get("final_norm"), embeddings.output_matrix(params, cfg), None, extras)
  return logits, cache


class Generator:
  """Generation for the model of ``run`` (``run.setup``) with ``params``."""

  def __init__(self, run, params):
    cfg = run.cfg
    self.family = cfg.model.family
    if self.family == "bert":
      raise ValueError("model.family='bert' is an encoder and generates no text; generation is for decoder, "
                       "UL2 and T5 checkpoints")
    self.run, self.params, self.mcfg = run, params, run.model_cfg
    self.vocab = load_vocabulary(cfg.data.vocab_path, cfg.data.extra_ids)
    self.paradigm = [self.vocab.piece_id(PARADIGM["S"])] if cfg.data.objective == "ul2" else []
    self.window = cfg.data.seq_len
    self.cached = self.family == "decoder" and cfg.model.position in ("rotary", "learned")
    self._jit = {}

  def _check(self, ids, max_new_tokens: int):
    need = len(self.paradigm) + len(ids) + max_new_tokens
    if not ids:
      raise ValueError("the prompt is empty (it encodes to no token)")
    if need > self.window:
      raise ValueError(f"the prompt ({len(ids)} tokens{' + [S2S]' if self.paradigm else ''}) and {max_new_tokens} new "
                       f"tokens need {need} positions, more than the model's {self.window}-token window "
                       "(data.seq_len, its training length); shorten the prompt or ask for fewer tokens")

  def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
               use_cache: bool = True) -> list[str]:
    """The continuation (text) of each prompt."""
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    ids = [self.vocab.encode(p) for p in prompts]
    for i in ids:
      self._check(i, max_new_tokens)
    tokens = self.generate_ids(ids, max_new_tokens, temperature, top_k, seed, use_cache)
    texts = [self.vocab.decode(t) for t in tokens]
    return texts[0] if single else texts

  def generate_ids(self, ids, max_new_tokens, temperature=0.0, top_k=0, seed=0, use_cache=True) -> list[list[int]]:
    key = jax.random.key(seed)
    if self.family == "t5":
      return self._t5(ids, max_new_tokens, temperature, top_k, key)
    seqs = [self.paradigm + list(i) for i in ids]
    if use_cache and self.cached:
      out = self._cached(seqs, max_new_tokens, temperature, top_k, key)
    else:
      out = self._uncached(seqs, max_new_tokens, temperature, top_k, key)
    return [_until_eos(o, self.vocab.eos_id) for o in out]

  def _uncached(self, seqs, n, temperature, top_k, key):
    """Every step runs the full model (the family's own module) on the whole row."""
    ctx = self.run.steps.ctx
    b, w = len(seqs), self.window
    tokens = np.zeros((b, w), np.int32)
    lengths = np.asarray([len(s) for s in seqs])
    for r, s in enumerate(seqs):
      tokens[r, :len(s)] = s
    prefix_len = lengths if self.paradigm else np.zeros(b, np.int64)

    @jax.jit
    def logits_at(params, tokens, lengths, prefix_len):
      positions = jnp.broadcast_to(jnp.arange(w), (b, w))
      segment = (positions < (lengths[:, None] + n)).astype(jnp.int32)
      prefix = (positions < prefix_len[:, None]).astype(jnp.int32)
      batch = {"inputs": tokens, "positions": positions, "segment_ids": segment, "prefix": prefix}
      logits = ctx.logits_fn(nnx.merge(ctx.graphdef, params), batch, None, True)
      return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

    out = [[] for _ in seqs]
    for t in range(n):
      nxt = jax.device_get(_sample(logits_at(self.params, tokens, lengths, prefix_len), jax.random.fold_in(key, t),
                                   temperature, top_k, self.vocab.vocab_size))
      for r in range(b):
        tokens[r, lengths[r]] = nxt[r]
        out[r].append(int(nxt[r]))
      lengths = lengths + 1
    return out

  def _cached(self, seqs, n, temperature, top_k, key):
    w, b = self.window, len(seqs)
    if "decode" not in self._jit:
      self._jit["decode"] = jax.jit(self._decode_all, static_argnums=(4, 5, 6))
    tokens = np.zeros((b, w), np.int32)
    lengths = np.asarray([len(s) for s in seqs], np.int32)
    for r, s in enumerate(seqs):
      tokens[r, :len(s)] = s
    prefix_len = lengths if self.paradigm else np.zeros(b, np.int32)
    out = self._jit["decode"](self.params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(prefix_len),
                              n, float(temperature), int(top_k), key)
    return [list(map(int, row)) for row in jax.device_get(out)]

  def _decode_all(self, params, tokens, lengths, prefix_len, n, temperature, top_k, key):
    """Prefill the prompts (padded to the window) into the cache, then ``n`` cached steps."""
    cfg, w = self.mcfg, self.window
    b = tokens.shape[0]
    shape = (cfg.num_layers, b, w, cfg.kv_heads, cfg.head_dim)
    cache = (jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
    pos = jnp.broadcast_to(jnp.arange(w), (b, w))
    valid = pos < lengths[:, None]
    causal = pos[:, :, None] >= pos[:, None, :]
    bidir = (pos[:, :, None] < prefix_len[:, None, None]) & (pos[:, None, :] < prefix_len[:, None, None])
    mask = ((causal | bidir) & valid[:, None, :])[:, None]
    logits, cache = _forward(cfg, params, tokens, pos, cache, pos, mask)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    first = _sample(last, jax.random.fold_in(key, 0), temperature, top_k, self.vocab.vocab_size)

    def step(carry, t):
      token, length, cache = carry  # ``token`` sits at position ``length``
      keys = jnp.arange(w)[None, :] <= length[:, None]
      logits, cache = _forward(cfg, params, token[:, None], length[:, None], cache, length[:, None],
                               keys[:, None, None, :])
      nxt = _sample(logits[:, 0], jax.random.fold_in(key, t), temperature, top_k, self.vocab.vocab_size)
      return (nxt, length + 1, cache), nxt

    _, rest = jax.lax.scan(step, (first, lengths, cache), jnp.arange(1, n))
    return jnp.concatenate([first[:, None], rest.T], axis=1) if n > 1 else first[:, None]

  def _t5(self, ids, n, temperature, top_k, key):
    """T5: the prompt into the encoder, the decoder re-run on the tokens so far each step."""
    ctx = self.run.steps.ctx
    b, w = len(ids), self.window
    enc, enc_seg = np.zeros((b, w), np.int32), np.zeros((b, w), np.int32)
    for r, i in enumerate(ids):
      enc[r, :len(i) + 1] = list(i) + [self.vocab.eos_id]
      enc_seg[r, :len(i) + 1] = 1
    dec = np.zeros((b, n + 1), np.int32)
    dec[:, 0] = self.vocab.pad_id  # T5's decoder start (0)

    @jax.jit
    def next_logits(params, dec, t):
      pos = jnp.broadcast_to(jnp.arange(dec.shape[1]), dec.shape)
      batch = {"encoder_inputs": enc, "encoder_positions": jnp.broadcast_to(jnp.arange(w), enc.shape),
               "encoder_segment_ids": enc_seg, "decoder_inputs": dec, "decoder_positions": pos,
               "decoder_segment_ids": (pos <= t).astype(jnp.int32)}
      return ctx.logits_fn(nnx.merge(ctx.graphdef, params), batch, None, True)[:, t]

    out = [[] for _ in ids]
    for t in range(n):
      nxt = jax.device_get(_sample(next_logits(self.params, dec, t), jax.random.fold_in(key, t), temperature, top_k,
                                   self.vocab.vocab_size))
      dec[:, t + 1] = nxt
      for r in range(b):
        out[r].append(int(nxt[r]))
    return [_until_eos(o, self.vocab.eos_id) for o in out]


def _until_eos(tokens, eos: int):
  return tokens[:tokens.index(eos)] if eos in tokens else tokens


def generate(run, params, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
             seed: int = 0, use_cache: bool = True):
  """``Generator(run, params).generate(...)``: the continuation of a prompt (or of each)."""
  return Generator(run, params).generate(prompts, max_new_tokens, temperature, top_k, seed, use_cache)
