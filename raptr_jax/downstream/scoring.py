"""Log-likelihood of continuations given contexts, batched and jitted on the run's mesh.

``Scorer(run, params).score(pairs)`` -> per pair: the summed log-probability of the
continuation's tokens, their count, and whether every one of them is the model's greedy
(argmax) choice. Tokenization follows lm-evaluation-harness: the pair is encoded whole and the
continuation is what follows the context's own tokens (a space at the end of the context moves
to the continuation), so a word split across the boundary is scored as the model would see it.

* decoder (``causal_lm``): one row ``context + continuation``, causal, the loss positions on
  the continuation;
* decoder trained with UL2: the S-denoiser's prefix-LM form it learned, ``[S2S] context`` as the
  bidirectional prefix and the continuation as targets;
* T5: the context (plus the vocabulary's eos) into the encoder, the continuation as decoder
  targets;
* BERT scores nothing (an encoder predicts masked tokens, not continuations): a clear error.

Rows are one pair each, sorted by length and cut into batches of ``rows`` (a multiple of the
mesh's data-parallel size), padded to a bucket length (powers of two up to the model's training
length, ``data.seq_len``), so each bucket compiles once whatever the number of examples. A
context longer than the window is cut from the left, and a continuation longer than the whole
window keeps its last tokens (T5: its first ``target_len``), as lm-evaluation-harness does; both
are counted in ``truncated``. A decoder row with an empty context conditions on the vocabulary's
bos, or its eos where it has none (lm-evaluation-harness's ``prefix_token_id``).
"""
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from raptr_jax import sharding as shd
from raptr_jax.data.corruption import target_length
from raptr_jax.data.objectives import PARADIGM
from raptr_jax.data.vocab import load_vocabulary

MIN_BUCKET = 32


def buckets(window: int) -> list[int]:
  out, b = [], MIN_BUCKET
  while b < window:
    out.append(b)
    b *= 2
  return out + [window]


def bucket_of(length: int, window: int) -> int:
  return next(b for b in buckets(window) if b >= length)


def encode_pair(vocab, context: str, continuation: str, separately: bool = False) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids), exactly as lm-evaluation-harness (0.4) splits a pair:
  trailing whitespace of the context moves to the continuation; a decoder's pair is encoded
  whole and the continuation is what follows the context's own token count (``separately``:
  an encoder-decoder's parts are encoded apart). An empty context conditions on the prefix
  token (bos, else eos), or on the continuation's first token when that is the prefix token."""
  if not context:
    cont = vocab.encode(continuation)
    prefix = prefix_token_id(vocab)
    return (cont[:1], cont[1:]) if cont and cont[0] == prefix else ([prefix], cont)
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  ctx = vocab.encode(context)
  if separately:
    return ctx, vocab.encode(continuation)
  return ctx, vocab.encode(context + continuation)[len(ctx):]


def prefix_token_id(vocab) -> int:
  """What a decoder conditions an empty context on: the vocabulary's bos, else its eos
  (lm-evaluation-harness's ``prefix_token_id``)."""
  return vocab.bos_id if vocab.bos_id is not None else vocab.eos_id


def _host(arrays):
  """Row-sharded outputs as numpy on every host (all rows: each host built the whole batch)."""
  if jax.process_count() == 1:
    return jax.device_get(arrays)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(arrays, tiled=True)


class Scorer:
  """Continuation log-likelihoods under the full model of a run (``run.setup``) with ``params``."""

  def __init__(self, run, params, rows: int = 0, progress: bool = True):
    cfg = run.cfg
    self.family = cfg.model.family
    if self.family == "bert":
      raise ValueError("model.family='bert' is an encoder: it scores no continuation, so ranking and LAMBADA "
                       "are for decoder, UL2 and T5 checkpoints; evaluate BERT by fine-tuning "
                       "(python -m raptr_jax.evaluate ... --tasks=finetune_rt)")
    self.run, self.params, self.progress = run, params, progress
    self.vocab = load_vocabulary(cfg.data.vocab_path, cfg.data.extra_ids)
    self.paradigm = [self.vocab.piece_id(PARADIGM["S"])] if cfg.data.objective == "ul2" else []
    self.prefix_token = prefix_token_id(self.vocab)
    self.window = cfg.data.seq_len
    self.target_window = max(target_length(cfg.data), MIN_BUCKET) if self.family == "t5" else 0
    dp = shd.data_parallel_size(run.mesh)
    self.rows = max(dp, (rows or cfg.data.batch_size) // dp * dp)
    self._jit = None

  def _fn(self):
    """The jitted scoring pass (one compile per bucket shape)."""
    if self._jit is None:
      ctx = self.run.steps.ctx
      logits_fn, graphdef = ctx.logits_fn, ctx.graphdef

      def score(params, batch):
        logits = logits_fn(nnx.merge(graphdef, params), batch, None, True)
        logp = jax.nn.log_softmax(logits, axis=-1)
        gold = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        w = batch["weights"]
        greedy = jnp.all((jnp.argmax(logits, axis=-1) == batch["targets"]) | (w == 0), axis=-1)
        return jnp.sum(gold * w, axis=-1), greedy

      rows = shd.batch_sharding(self.run.mesh)
      fields = {k: rows for k in ctx.batch_fields}
      self._jit = jax.jit(score, in_shardings=(ctx.state_shardings.params, fields), out_shardings=(rows, rows))
    return self._jit

  def decoder_row(self, ctx_ids, cont_ids):
    """(sequence, prefix length, continuation tokens scored, truncated) of one decoder row of at
    most window + 1 tokens."""
    keep = self.window - len(self.paradigm)  # at least one context token before the continuation
    truncated = len(cont_ids) > keep
    if truncated:  # longer than the window: its last tokens are scored (lm-evaluation-harness does so)
      cont_ids = cont_ids[-keep:]
    room = self.window + 1 - len(self.paradigm) - len(cont_ids)
    truncated = truncated or len(ctx_ids) > room
    ctx_ids = ctx_ids[-room:] if truncated else ctx_ids
    seq = self.paradigm + list(ctx_ids) + list(cont_ids)
    return seq, (len(self.paradigm) + len(ctx_ids)) if self.paradigm else 0, len(cont_ids), truncated

  def decoder_batch(self, items, length):
    b = self.rows
    batch = {k: np.zeros((b, length), np.int32) for k in ("inputs", "targets", "prefix", "segment_ids", "positions")}
    batch["weights"] = np.zeros((b, length), np.float32)
    batch["example_ids"] = np.zeros((b, 1), np.int64)
    for r, (seq, prefix_len, n_cont) in enumerate(items):
      n = len(seq) - 1
      batch["inputs"][r, :n], batch["targets"][r, :n] = seq[:-1], seq[1:]
      batch["weights"][r, n - n_cont:n] = 1.0
      batch["prefix"][r, :prefix_len] = 1  # UL2's bidirectional [S2S] + context (0: causal)
      batch["segment_ids"][r, :n] = 1
      batch["positions"][r, :n] = np.arange(n)
    return batch

  def t5_batch(self, items, enc_len, dec_len):
    b = self.rows
    batch = {k: np.zeros((b, enc_len), np.int32) for k in ("encoder_inputs", "encoder_segment_ids", "encoder_positions")}
    batch |= {k: np.zeros((b, dec_len), np.int32) for k in ("decoder_inputs", "targets", "decoder_segment_ids",
                                                            "decoder_positions")}
    batch["weights"] = np.zeros((b, dec_len), np.float32)
    batch["example_ids"] = np.zeros((b, 1), np.int64)
    for r, (enc, cont) in enumerate(items):
      batch["encoder_inputs"][r, :len(enc)] = enc
      batch["encoder_segment_ids"][r, :len(enc)] = 1
      batch["encoder_positions"][r, :len(enc)] = np.arange(len(enc))
      batch["decoder_inputs"][r, 0] = self.vocab.pad_id  # T5's decoder start (0)
      batch["decoder_inputs"][r, 1:len(cont)] = cont[:-1]
      batch["targets"][r, :len(cont)] = cont
      batch["weights"][r, :len(cont)] = 1.0
      batch["decoder_segment_ids"][r, :len(cont)] = 1
      batch["decoder_positions"][r, :len(cont)] = np.arange(len(cont))
    return batch

  def score(self, pairs, desc: str = "scoring") -> dict[str, np.ndarray]:
    """{"logprob", "tokens", "greedy", "truncated"} per (context, continuation) of ``pairs``."""
    n = len(pairs)
    encoded = [encode_pair(self.vocab, c, x, separately=self.family == "t5") if c or not self.paradigm
               else ([], self.vocab.encode(x)) for c, x in pairs]  # UL2: [S2S] alone is the prefix
    out = {"logprob": np.zeros(n, np.float64), "tokens": np.asarray([len(x) for _, x in encoded], np.int64),
           "greedy": np.zeros(n, bool), "truncated": np.zeros(n, bool)}
    if np.any(out["tokens"] == 0):
      raise ValueError(f"{int((out['tokens'] == 0).sum())} continuation(s) encode to no token; nothing to score")
    if self.family == "t5":
      rows = []
      for i, ((ctx_ids, cont_ids), (context, _)) in enumerate(zip(encoded, pairs)):
        room = self.window - 1
        out["truncated"][i] = len(ctx_ids) > room or len(cont_ids) > self.target_window
        eos = [self.vocab.eos_id] if context else []  # T5's tokenizer ends a text with eos; the prefix token is alone
        rows.append((list(ctx_ids[-room:]) + eos, list(cont_ids[:self.target_window])))
      shape_of = lambda items: (bucket_of(max(len(e) for e, _ in items), self.window),
                                bucket_of(max(len(c) for _, c in items), self.target_window))
      make = lambda items, shape: self.t5_batch(items, *shape)
      order = np.argsort([len(e) + len(c) for e, c in rows], kind="stable")
    else:
      rows = []
      for i, (ctx_ids, cont_ids) in enumerate(encoded):
        seq, prefix_len, n_cont, out["truncated"][i] = self.decoder_row(ctx_ids, cont_ids)
        rows.append((seq, prefix_len, n_cont))
      shape_of = lambda items: (bucket_of(max(len(s) - 1 for s, _, _ in items), self.window),)
      make = lambda items, shape: self.decoder_batch(items, *shape)
      order = np.argsort([len(s) for s, _, _ in rows], kind="stable")
    chunks = [order[i:i + self.rows] for i in range(0, n, self.rows)]
    for idx in tqdm.tqdm(chunks, desc=desc, unit="batch", disable=not self.progress, leave=False):
      items = [rows[i] for i in idx]
      shape = shape_of(items)
      batch = self.run.device_batch(make(items, shape))
      logprob, greedy = _host(self._fn()(self.params, batch))
      out["logprob"][idx], out["greedy"][idx] = logprob[:len(idx)], greedy[:len(idx)]
    return out
