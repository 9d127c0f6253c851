"""The irreducible-loss (IL) store of RHO loss: every training example's loss under the IL model,
keyed by stable example id and by the version of the data that made it.

A store is a directory: ``losses.npz`` (``ids`` sorted int64, ``loss_sum`` and ``weight``: the
example's summed token loss and its loss weight, i.e. its number of masked tokens or targets)
and ``meta.json`` (the data version, what it hashes, the IL model's run and cost). It is built by
``python -m raptr_jax.il_losses build`` into ``<store>.partial/`` (parts with the stream position,
so an interrupted build resumes) and renamed into place when complete, so a store that exists
is whole.

The join is by id (``lookup``), never by position in a stream: shuffling, a second epoch or
another number of hosts read the same IL loss for an example. The masks must match too: the
store records the data version (``data_version``: corpus, vocabulary, objective, lengths, noise
seed, holdout split), and a run whose version differs is refused.
"""
import hashlib
import json
import os

import numpy as np

from raptr_jax.data import pipeline
from raptr_jax.data.files import content_digest
from raptr_jax.data.vocab import vocab_file

BUILD_COMMAND = "python -m raptr_jax.il_losses build --config=<this config>"
_DATA_FIELDS = ("source", "tfds_names", "extra_ids", "objective", "denoisers", "seq_len", "target_len",
                "noise_density", "mean_noise_span", "mlm_rate", "max_predictions", "resample_noise",
                "holdout_share")


def data_version(cfg) -> tuple[str, dict]:
  """(version hash, what it hashes): everything that decides which examples a run trains on and
  how each is tokenized and masked."""
  d = cfg.data
  what = {k: d[k] for k in _DATA_FIELDS}
  what["denoisers"] = [dict(x) for x in d.denoisers]
  what["tfds_names"] = list(d.tfds_names)
  if d.source == "tfds":
    what["tfds"] = [d.tfds_text_key, list(d.tfds_splits)]
  if d.source == "files":  # which files (name, size, modification time) and how they are read
    from raptr_jax.data import file_source, files  # pylint: disable=g-import-not-at-top
    what["files"] = d.files.to_dict()
    what["file_identities"] = [[os.path.basename(p), *files.file_identity(p)[1:]]
                               for p in files.expand(d.files.train, "data.files.train")]
    what["read"] = file_source.read_args(d.files)
  what["noise_seed"] = pipeline.noise_seed(d, cfg.seed)
  what["vocab"] = content_digest(vocab_file(d.vocab_path))  # the file read (a folder's tokenizer file)
  if d.source == "builtin":
    from raptr_jax.data import corpus  # pylint: disable=g-import-not-at-top
    what["corpus"] = content_digest(os.path.join(corpus.BUILTIN_DIR, "shakespeare_train.jsonl.gz"))
  digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
  return digest, what


def default_path(cfg) -> str:
  return cfg.method.rho_loss.store or os.path.join("il_store", data_version(cfg)[0])


class ILStore:
  """IL losses in memory: ``lookup(example_ids)`` for a batch's ``[rows, segments]`` ids."""

  def __init__(self, ids, loss_sum, weight, meta: dict, path: str = ""):
    order = np.argsort(ids, kind="stable")
    self.ids, self.loss_sum, self.weight = ids[order], loss_sum[order], weight[order]
    self.meta, self.path = meta, path

  @classmethod
  def load(cls, path: str, cfg=None) -> "ILStore":
    """The store at ``path``; with ``cfg``, refused unless it was built for ``cfg``'s data."""
    command = BUILD_COMMAND
    if not os.path.exists(os.path.join(path, "meta.json")):
      partial = " (a partial build is there: re-run the command to finish it)" if os.path.exists(path + ".partial") else ""
      raise ValueError(f"method.name='rho_loss' needs the irreducible-loss store {path!r}, which does not "
                       f"exist{partial}. Build it (trains the IL model on the held-out share, then scores "
                       f"every training example): `{command}`")
    with open(os.path.join(path, "meta.json")) as f:
      meta = json.load(f)
    if cfg is not None:
      version, what = data_version(cfg)
      if meta.get("version") != version:
        diff = {k: (meta.get("data", {}).get(k), v) for k, v in what.items() if meta.get("data", {}).get(k) != v}
        raise ValueError(f"the irreducible-loss store {path!r} was built for other data ("
                         + ", ".join(f"data.{k}: {a!r} there, {b!r} here" for k, (a, b) in sorted(diff.items()))
                         + f"); its IL losses would not match this run's examples or masks. Build one for "
                         f"this config (set method.rho_loss.store to a new path or leave it empty): `{command}`")
    with np.load(os.path.join(path, "losses.npz")) as z:
      return cls(z["ids"], z["loss_sum"], z["weight"], meta, path)

  def lookup(self, example_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(loss_sum, weight) of each id (``[rows, segments]``; -1 = no example: 0, 0). An id not in
    the store raises ValueError naming the build command."""
    example_ids = np.asarray(example_ids, np.int64)
    valid = example_ids >= 0
    pos = np.clip(np.searchsorted(self.ids, example_ids), 0, max(len(self.ids) - 1, 0))
    found = valid & (self.ids[pos] == example_ids) if len(self.ids) else np.zeros_like(valid)
    if np.any(valid & ~found):
      missing = example_ids[valid & ~found]
      raise ValueError(f"{len(missing)} training example(s) of this batch (ids {missing[:3].tolist()}...) are "
                       f"not in the irreducible-loss store {self.path!r} ({len(self.ids)} examples). The store "
                       f"must cover every example the run trains on; rebuild it: `{BUILD_COMMAND}`")
    return np.where(found, self.loss_sum[pos], 0.0), np.where(found, self.weight[pos], 0.0)


def write(path: str, ids, loss_sum, weight, meta: dict) -> None:
  """Writes a complete store atomically: into ``<path>.partial/``, then renamed to ``path``."""
  partial = path + ".partial"
  os.makedirs(partial, exist_ok=True)
  np.savez(os.path.join(partial, "losses.npz"), ids=np.asarray(ids, np.int64),
           loss_sum=np.asarray(loss_sum, np.float32), weight=np.asarray(weight, np.float32))
  with open(os.path.join(partial, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True, default=str)
  for name in os.listdir(partial):  # build leftovers (parts, progress)
    if name.startswith("part-") or name == "progress.json":
      os.remove(os.path.join(partial, name))
  os.replace(partial, path)


class PartialBuild:
  """Resumable scoring of a store: parts of (ids, loss_sum, weight) saved with the position of
  the stream after them, in ``<path>.partial/``."""

  def __init__(self, path: str, version: str):
    self.dir = path + ".partial"
    os.makedirs(self.dir, exist_ok=True)
    self.progress_path = os.path.join(self.dir, "progress.json")
    self.progress = {"version": version, "parts": 0, "data": None, "examples": 0}
    if os.path.exists(self.progress_path):
      with open(self.progress_path) as f:
        saved = json.load(f)
      if saved.get("version") == version:
        self.progress = saved

  def add(self, ids, loss_sum, weight, data_state: dict) -> None:
    part = os.path.join(self.dir, f"part-{self.progress['parts']:05d}.npz")
    np.savez(part + ".tmp.npz", ids=np.asarray(ids, np.int64), loss_sum=np.asarray(loss_sum, np.float32),
             weight=np.asarray(weight, np.float32))
    os.replace(part + ".tmp.npz", part)
    self.progress = self.progress | {"parts": self.progress["parts"] + 1, "data": data_state,
                                     "examples": self.progress["examples"] + len(ids)}
    with open(self.progress_path + ".tmp", "w") as f:
      json.dump(self.progress, f)
    os.replace(self.progress_path + ".tmp", self.progress_path)

  def arrays(self):
    parts = [np.load(os.path.join(self.dir, f"part-{i:05d}.npz")) for i in range(self.progress["parts"])]
    if not parts:
      return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)
    return tuple(np.concatenate([p[k] for p in parts]) for k in ("ids", "loss_sum", "weight"))
