"""What a workdir keeps about the runs that own it: a lock and the config of every (re)start.

* ``WorkdirLock``: a run holds an exclusive ``flock`` on ``WORKDIR/.lock`` while it trains; a
  second run on the same workdir is refused with the owner's pid, host and start time. The
  kernel drops the lock when its process dies (``kill -9`` included), so a killed run never
  blocks its own resume; the owner details in the file are only read to word the message.
* ``starts.jsonl`` holds one line per (re)start: the step it started from, when, the command
  line and the full resolved config; ``config.json`` is the config of the latest start, for
  people to read; every checkpoint's meta holds the config that wrote it. ``check_resume``
  compares a resumed run's config with that of the checkpoint it restores:
  fields that change what the run computes (model, data, objective, optimizer, schedule, seed,
  method, budget, ...) are refused with the list of differences, unless
  ``train.allow_config_changes=True``, which records them with the step in ``starts.jsonl``.
  Fields that only change how it is run or watched (logging, checkpoint and eval cadence and
  size, extra validation sets, downstream tasks, where data and caches live, rematerialisation
  and the attention kernel, the mesh and hosts, unless the budget is in RST, whose charges depend
  on the mesh) may change freely.
"""
import datetime
import errno
import json
import os
import socket
import sys

# Fields (or sections, ending in ".") that do not change what a run computes.
HOW_NOT_WHAT = ("log.", "checkpoint.", "eval.every", "eval.at_start", "eval.sets", "eval.batches", "train.stop_at_step",
                "train.peak_flops", "train.allow_config_changes", "distributed.", "data.tfds_data_dir",
                "data.token_cache", "downstream.", "mesh.", "model.remat", "model.attention_impl",
                "train.microbatches",
                "data.shards")  # a changed effective shard count is refused by the stream's own state


class WorkdirBusy(RuntimeError):
  pass


class ConfigChanged(ValueError):
  pass


class WorkdirLock:
  """An exclusive lock on ``WORKDIR/.lock`` for the life of a run (a context manager)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, ".lock")
    self.enabled = enabled
    self._file = None

  def __enter__(self):
    if not self.enabled:
      return self
    try:
      import fcntl  # pylint: disable=g-import-not-at-top
    except ImportError:  # not POSIX: no lock (say so once)
      print(f"warning: no file locking on this platform; do not start two runs on {os.path.dirname(self.path)}")
      return self
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no flock here (some FUSE / Lustre)
        f.close()
        print(f"warning: cannot lock {self.path} ({e.strerror}); do not start two runs on this workdir")
        return self
      f.seek(0)
      owner = f.read().strip()
      f.close()
      try:
        who = json.loads(owner)
        who = f"pid {who['pid']} on host {who['host']}, started {who['started']}: {who['command']}"
      except (ValueError, KeyError, TypeError):
        who = "another process"
      raise WorkdirBusy(
          f"workdir {os.path.dirname(os.path.abspath(self.path))} is in use by a running run ({who}). "
          "Wait for it to finish, stop it (it checkpoints on SIGTERM), or use another --workdir.") from None
    f.seek(0)
    f.truncate()
    try:  # who holds it, for the message of a refused second run (the flock is the lock)
      f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                          "command": " ".join(sys.argv)}) + "\n")
      f.flush()
    except OSError:  # a full disk: the lock holds all the same; record_start says what is wrong
      f.truncate(0)
    self._file = f
    return self

  def __exit__(self, *exc):
    if self._file is not None:
      self._file.close()  # closing releases the flock
      self._file = None
    return False


def make_workdir(workdir: str) -> None:
  """Creates ``workdir`` (and its parents) if missing; a path that is a file, or lies under one,
  or cannot be created is refused with what to change (``NotADirectoryError`` / ``OSError``)."""
  path = os.path.abspath(workdir)
  if os.path.isfile(path):
    raise NotADirectoryError(f"--workdir {path} is a file, not a folder: give the path of a folder (it is "
                             "created when missing), e.g. a new name beside it")
  try:
    os.makedirs(path, exist_ok=True)
  except FileExistsError:  # something that is neither a file nor a folder (a broken link, ...)
    raise NotADirectoryError(f"--workdir {path} exists and is not a folder: give the path of a folder") from None
  except NotADirectoryError:
    parent = next(p for p in _parents(path) if os.path.exists(p) and not os.path.isdir(p))
    raise NotADirectoryError(f"--workdir {path} lies under {parent}, which is a file, not a folder: give a "
                             "path whose parents are folders") from None
  except OSError as e:
    raise OSError(f"cannot create --workdir {path}: {e.strerror}; choose a folder you can write to") from None


def _parents(path: str) -> list[str]:
  parents = []
  while os.path.dirname(path) != path:
    path = os.path.dirname(path)
    parents.append(path)
  return parents[::-1]


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def flat_config(cfg) -> dict:
  """{"section.field": value} of a config, JSON-normalised (tuples become lists)."""
  tree = json.loads(json.dumps(cfg.to_dict(), default=str))
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key}.")
      else:
        out[f"{prefix}{key}"] = value
  walk(tree, "")
  return out


def config_from_workdir(workdir: str):
  """The config a workdir's latest start recorded (``config.json``), as a validated ConfigDict
  over ``base_config`` (fields it lacks keep their defaults)."""
  from raptr_jax.config import base_config, validate  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{workdir} has no config.json: it is not a workdir of a run or an import")
  with open(path) as f:
    recorded = json.load(f)
  cfg = base_config()

  def overlay(node, values, where):
    for key, value in values.items():
      if key not in node:
        continue  # a field of another version of the code
      if isinstance(value, dict) and hasattr(node[key], "keys"):
        overlay(node[key], value, f"{where}{key}.")
      else:
        default = node[key]
        node[key] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
  overlay(cfg, recorded, "")
  validate(cfg)
  return cfg


def latest_start(workdir: str) -> dict | None:
  """The last complete line of ``starts.jsonl``, or None."""
  path = os.path.join(workdir, "starts.jsonl")
  if not os.path.exists(path):
    return None
  last = None
  with open(path) as f:
    for line in f:
      try:
        last = json.loads(line)
      except json.JSONDecodeError:  # a torn line from a kill while it was written
        continue
  return last


def config_changes(before: dict, now: dict, rst_budget: bool) -> dict:
  """{field: (before, now)} of the fields whose change changes what the run computes; a field
  one side lacks (a config of another version of the code) counts as its default."""
  from raptr_jax.config import base_config  # pylint: disable=g-import-not-at-top  (config imports methods)
  defaults = flat_config(base_config())
  neutral = tuple(f for f in HOW_NOT_WHAT if not (rst_budget and f in ("mesh.", "train.microbatches")))
  changes = {}
  for key in sorted(set(before) | set(now)):
    if key.startswith(neutral) or key in neutral:
      continue
    was, now_value = before.get(key, defaults.get(key, "<absent>")), now.get(key, defaults.get(key, "<absent>"))
    if was != now_value:
      changes[key] = (was, now_value)
  return changes


def check_resume(workdir: str, cfg, step: int, recorded: dict | None = None) -> dict:
  """The computation-changing differences between ``cfg`` and the config that wrote the
  checkpoint of ``step`` (``recorded``, from its meta; else the latest start in
  ``starts.jsonl``; {} when neither exists); raises ``ConfigChanged`` unless
  ``train.allow_config_changes``."""
  if recorded is None:
    previous = latest_start(workdir)
    if previous is None:
      return {}
    recorded = previous["config"]
  changes = config_changes(recorded, flat_config(cfg), str(cfg.budget.unit).startswith("rst"))
  if changes and not cfg.train.allow_config_changes:
    listed = "\n".join(f"  {k}: {a!r} there, {b!r} here" for k, (a, b) in changes.items())
    raise ConfigChanged(
        f"workdir {workdir} holds a run started with another config (its checkpoint is at step {step}); "
        f"resuming would change what it computes:\n{listed}\nRe-run with the config that started it "
        f"({os.path.join(workdir, 'config.json')}), use a fresh --workdir, or pass "
        "--config.train.allow_config_changes=True to continue with the change (recorded with the step "
        "in starts.jsonl).")
  return changes


def record_start(workdir: str, cfg, step: int, changes: dict) -> None:
  """Appends this (re)start to ``starts.jsonl`` and writes ``config.json``."""
  flat = flat_config(cfg)
  entry = {"step": step, "time": _now(), "host": socket.gethostname(), "command": " ".join(sys.argv),
           "changes": {k: list(v) for k, v in changes.items()}, "config": flat}
  starts = os.path.join(workdir, "starts.jsonl")
  size = os.path.getsize(starts) if os.path.exists(starts) else 0
  tmp = os.path.join(workdir, "config.json.tmp")
  writing = starts
  try:
    with open(starts, "a") as f:
      f.write(json.dumps(entry) + "\n")
    writing = tmp
    with open(tmp, "w") as f:
      json.dump(cfg.to_dict(), f, indent=2, sort_keys=True, default=str)
      f.write("\n")
    os.replace(tmp, os.path.join(workdir, "config.json"))
  except OSError as e:
    _undo(starts, size, tmp)
    raise OSError(f"cannot write {writing} at the start of the run: {e.strerror or e}; nothing was changed in "
                  f"{workdir}. Free space or restore write access there, then re-run the same command") from None


def _undo(starts: str, size: int, tmp: str) -> None:
  """Cuts ``starts.jsonl`` back to ``size`` bytes and removes ``tmp`` (a failed record_start)."""
  for action in (lambda: os.truncate(starts, size) if os.path.exists(starts) else None,
                 lambda: os.remove(tmp) if os.path.exists(tmp) else None):
    try:
      action()
    except OSError:
      pass
