"""Orbax checkpoints of the train state plus the run's host-side position (progress, data).

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it on
success; the temporary directories of a killed run are removed when the next run opens the
folder, which it owns: ``workdir.WorkdirLock``), the last ``keep`` are kept, and a run re-started with the same workdir resumes from the
newest checkpoint that restores.

Integrity: every save records a fingerprint of each array of the train state in its meta (a
weighted sum of the array's bits mod 2^32, computed on the device, independent of the
sharding), and a restore recomputes and compares them, so a data file overwritten in place is
caught even where the storage format would read it back without complaint (orbax stores
incompressible float data as raw zstd blocks, with no checksum). A checkpoint that cannot be
read, or reads back different arrays, is *corrupt*: ``restore_latest`` reports its step and
what failed (the file or the array), moves it aside to ``<workdir>/corrupt_checkpoints/``
(never deleted) and falls back to the next newest (every host agreeing on which); with none left
it stops and changes nothing. A read that fails for a transient reason (storage unavailable, out
of memory) is not taken for corruption: the run stops and sets nothing aside.
A checkpoint that reads fine but was written by another config is *foreign*: that is refused
with the differences, never skipped (``CheckpointError``).

Failed writes: a checkpoint that cannot be written (disk full, permission lost, I/O error; seen
when its write ends, at once for a synchronous save, at the next save or ``wait`` for an
asynchronous one) leaves nothing a resume could take for complete: orbax renames a step's folder
into place only once every file is written, and the unfinished folder is removed at once (which
frees its space). The checkpoints before it are untouched. ``on_write_error="stop"`` raises
``CheckpointWriteError`` naming the step, the file and the reason, with the resume command;
``"retry"`` prints that as a warning and lets the run go on to try again at its next checkpoint
(``wait`` still raises: a checkpoint the run is about to stop on must exist).

Orbax logs such failures (and corrupt reads) with tracebacks of its own, asyncio reports its
abandoned tasks, and tensorstore leaves coroutines and callbacks whose errors Python prints when
they are collected or arrive; the Checkpointer reports each failure once, so from its creation it
drops those, and only those (``_quiet_orbax_noise``).
"""
import gc
import json
import logging
import os
import re
import shutil
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


LOOSE = "_loose"  # expected-meta key: {key: sub-fields a restore does not compare}
TMP_MARK = ".orbax-checkpoint-tmp"  # orbax writes a step to <step>.orbax-checkpoint-tmp-<n>, then renames it


class CheckpointError(RuntimeError):
  pass


class CheckpointWriteError(CheckpointError):
  """A checkpoint could not be written (``step``, ``what``); nothing of it is kept, and the
  checkpoints before it are intact (``latest``: the newest, or None)."""

  def __init__(self, directory: str, step: int, what: str, latest: int | None, advice: str = ""):
    self.step, self.what, self.latest = step, what, latest
    kept = (f"the checkpoints before it are intact (latest: step {latest})" if latest is not None
            else "no checkpoint was written before it")
    self.brief = (f"checkpoint {directory}/{step} could not be written: {what}. Nothing of it was kept (its "
                  f"unfinished folder was removed, so no resume can take it for complete); {kept}.")
    super().__init__(self.brief + advice)


class CorruptCheckpoint(CheckpointError):
  """One step's checkpoint cannot be read back as it was written (``step``, ``what``)."""

  def __init__(self, directory: str, step: int, what: str):
    self.step, self.what = step, what
    super().__init__(f"checkpoint {directory}/{step} is corrupt: {what}")


def _leaf_fingerprint(x):
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    size = x.dtype.itemsize
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size])
    bits = bits.astype(jnp.uint32)
  # The row-major index of every element, from per-axis iotas: no flattening, so an array
  # sharded over any axis is summed where it lies (a reshape would gather it).
  index, stride = jnp.zeros(bits.shape, jnp.uint32), 1
  for axis in reversed(range(bits.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % (1 << 32))
    stride *= bits.shape[axis]
  return jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _fingerprints(tree):
  return [_leaf_fingerprint(x) for x in jax.tree.leaves(tree)]


def fingerprints(tree) -> dict[str, int]:
  """{array path: sum_i bits_i (2 i + 1) mod 2^32} over the leaves of ``tree``: any change of
  one element, or a swap of two, changes it; integer sums make it the same on any mesh."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  return dict(zip(paths, (int(v) for v in jax.device_get(_fingerprints(tree)))))


def feed_fingerprint(feed: dict) -> int:
  """crc32 over a batch-selection feed's host arrays (a nested dict), path by path."""
  crc = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(feed)[0]:
    crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes(), zlib.crc32(_path_name(path).encode(), crc))
  return crc


# Reading failures that say nothing about the checkpoint itself (storage or memory, now).
TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "Connection", "Timeout",
             "timed out", "Stale file handle", "Out of memory", "out of memory")


def _unreadable(directory: str, step: int, where: str, e: BaseException) -> CheckpointError:
  """A corrupt checkpoint, or (for a transient error) an error that sets nothing aside."""
  what = _first_line_of_cause(e)
  if any(t in what for t in TRANSIENT):
    return CheckpointError(f"checkpoint {directory}/{step} could not be read just now ({where}{what}); that looks "
                           "transient (storage or memory), so nothing was set aside: re-run the same command")
  return CorruptCheckpoint(directory, step, f"{where}{what}")


def _first_line_of_cause(e: BaseException) -> str:
  """The innermost cause's message (tensorstore names the array and the file there)."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:400] if text else ''}"


def _write_failure(e: BaseException) -> str:
  """'No space left on device (writing FILE)': the reason and the file of a failed write, from
  an OSError or tensorstore's message (which carries the path and os_error_code)."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  if isinstance(e, OSError) and e.errno:
    reason, path = os.strerror(e.errno), e.filename
  else:
    text = str(e)
    code = re.search(r"os_error_code\W*(\d+)", text)
    path = re.search(r'Failed (?:writing|to write|to open|to create)[^"]*"([^"]+)"', text) or re.search(r'file "([^"]+)"', text)
    path = path.group(1) if path else None
    reason = os.strerror(int(code.group(1))) if code else _first_line_of_cause(e)
  return f"{reason} (writing {path})" if path else reason


def _folder_bytes(path: str) -> int:
  total = 0
  for folder, _, names in os.walk(path):
    for name in names:
      try:
        total += os.path.getsize(os.path.join(folder, name))
      except OSError:
        pass
  return total


class _OrbaxNoise(logging.Filter):
  """Drops orbax's error log records (with their tracebacks) about a failed save or read: the
  Checkpointer raises or reports each of those itself, once."""

  def filter(self, record):
    if record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    return not (record.exc_info or re.search(r"raised an exception|[Ff]ailed", str(record.msg)))


class _OrbaxTasks(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for orbax's abandoned write tasks
  (the failure they share is raised by the save)."""

  def filter(self, record):
    text = str(record.msg)
    return not ("exception was never retrieved" in text and f"{os.sep}orbax{os.sep}" in text)


def _quiet_orbax_noise() -> None:
  """Installs the filters of what orbax, tensorstore and asyncio print about a failed read or
  write: the Checkpointer raises or reports those failures itself, once."""
  for name, kind in (("absl", _OrbaxNoise), ("asyncio", _OrbaxTasks)):
    logger = logging.getLogger(name)
    if not any(isinstance(f, kind) for f in logger.filters):
      logger.addFilter(kind())
  if not isinstance(sys.unraisablehook, _QuietLeftovers):
    sys.unraisablehook = _QuietLeftovers(sys.unraisablehook)


class _QuietLeftovers:
  """sys.unraisablehook that drops what a failed read or write leaves behind: the errors of
  orbax's abandoned coroutines (``Exception ignored in: <coroutine object
  _read_array_index_and_device_put ...>``, printed when they are collected, possibly at exit),
  and tensorstore's completion callbacks arriving after orbax closed its event loop ("Event
  loop is closed"). Everything else goes to the previous hook."""

  def __init__(self, previous, sep=os.sep):
    self.previous, self._marker = previous, f"{sep}orbax{sep}"

  def __call__(self, unraisable):
    code = getattr(unraisable.object, "cr_code", None) or getattr(unraisable.object, "gi_code", None)
    if code is not None and self._marker in code.co_filename:
      return
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
      return  # a callback of the abandoned write arriving after orbax closed its event loop
    self.previous(unraisable)


def _quiet_orbax_leftovers() -> None:
  """After a failed read or write has been handled: what orbax / tensorstore left of it is
  collected now, silently (the hook is installed again if something replaced it)."""
  _quiet_orbax_noise()
  gc.collect()


def _path_name(path) -> str:
  """'opt_state.1.mu.embedding': a tree path as orbax names the array."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return ".".join(parts)


def _same_structure(saved, abstract) -> str | None:
  """None when the checkpoint's array metadata matches the abstract state, else the first
  difference (a checkpoint of another model or optimizer, not a corrupt one)."""
  have = {_path_name(p): tuple(getattr(a, "shape", ()) or ()) for p, a in jax.tree_util.tree_flatten_with_path(saved)[0]}
  want = {_path_name(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  for path in sorted(set(have) | set(want)):
    if path not in have:
      return f"{path} is missing from the checkpoint"
    if path not in want:
      return f"{path} is in the checkpoint but not in this config's state"
    if have[path] != want[path]:
      return f"{path} has shape {have[path]} there, {want[path]} here"
  return None


class Checkpointer:

  def __init__(self, directory: str, keep: int, async_save: bool, writer: bool = True,
               on_write_error: str = "stop"):
    """``writer``: the run that owns the folder (it cleans up temporary directories left by a
    killed run); tools that only read pass False. ``on_write_error``: "stop" (a failed write
    raises ``CheckpointWriteError``) or "retry" (``save`` warns and returns)."""
    self.directory = os.path.abspath(directory)
    self.writer = writer
    self.on_write_error = on_write_error
    self._async = async_save
    self._writing = None  # the step of an asynchronous write in flight
    self._failed = None  # the CheckpointWriteError of the newest attempt (on_write_error="retry")
    self._leftovers = set()  # steps whose failed writes left a temporary folder to remove later
    _quiet_orbax_noise()
    if writer and jax.process_index() == 0 and os.path.isdir(self.directory):
      self._remove_unfinished()  # unfinished writes of a killed run (never a checkpoint)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None, create=writer, enable_async_checkpointing=async_save)
    handlers = dict(state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler(),
                    feed=ocp.StandardCheckpointHandler())
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  @staticmethod
  def has_steps(directory: str) -> bool:
    """Whether ``directory`` holds a finished checkpoint (without opening a manager)."""
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state, meta: dict, feed: dict | None = None) -> bool:
    """``feed``: host-side numpy arrays of a batch-selection feed (carry, loss history). The
    state's fingerprints are taken on the device before the (asynchronous) write starts.
    Returns False when a write failed and ``on_write_error`` is "retry" (a warning is printed;
    a failed asynchronous write of an earlier step surfaces here, and this step is tried
    still); raises ``CheckpointWriteError`` when it is "stop"."""
    meta = meta | {"fingerprints": fingerprints(state)}
    items = dict(state=ocp.args.StandardSave(state))
    if feed is not None:
      items["feed"] = ocp.args.StandardSave(feed)
      meta["feed_fingerprint"] = feed_fingerprint(feed)
    items["meta"] = ocp.args.JsonSave(meta)
    written = self._finish_previous()
    self._remove_leftovers()
    try:
      self._mngr.save(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except  (orbax / tensorstore raise anything)
      return self._after_failure(self._write_failed(step, e))
    self._failed = None  # the newest attempt is written (or, asynchronously, being written)
    if self._async:
      self._writing = step
    return written

  def _finish_previous(self) -> bool:
    """Waits for the previous asynchronous write; False (retry) if it failed."""
    try:
      self._join()
      return True
    except CheckpointWriteError as e:
      return self._after_failure(e)

  def _join(self) -> None:
    step, self._writing = self._writing, None
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_failed(step if step is not None else -1, e) from None

  def _after_failure(self, error: CheckpointWriteError) -> bool:
    if self.on_write_error != "retry":
      raise error
    self._failed = error
    if jax.process_index() == 0:
      print(f"warning: {error.brief} Training goes on (checkpoint.on_write_error=retry) and tries again at the "
            "next checkpoint.", flush=True)
    return False

  def _write_failed(self, step: int, e: BaseException) -> CheckpointWriteError:
    """The error for a failed write of ``step``, after removing what it left (its unfinished
    folder) and re-reading the folder's steps (orbax's own list may be off after a failure)."""
    what = _write_failure(e)
    _quiet_orbax_leftovers()  # from here on, what the failed write leaves behind is not printed
    try:
      self._mngr.wait_until_finished()  # the rest of the failed write, if still going
    except Exception:  # pylint: disable=broad-except  (the same failure)
      pass
    if jax.process_index() == 0:
      self._remove_unfinished(step, settle_s=5.0)
    try:
      self._mngr.reload()
    except Exception:  # pylint: disable=broad-except  (the folder itself may be gone; latest_step says so)
      pass
    _quiet_orbax_leftovers()
    latest = self._latest_on_disk()
    size = ""
    if latest is not None:
      try:
        free = shutil.disk_usage(self.directory).free
        size = (f" (a checkpoint here takes {_folder_bytes(os.path.join(self.directory, str(latest))) / 2**20:.1f} "
                f"MiB; {free / 2**20:.1f} MiB are free on its disk)")
      except OSError:
        pass
    resume = f"resume from step {latest}" if latest is not None else "start the run afresh"
    return CheckpointWriteError(
        self.directory, step, what, latest,
        f" Free space{size} or restore write access to {self.directory}, then re-run the same command to "
        f"{resume}; or pass --config.checkpoint.on_write_error=retry to train on when a checkpoint fails and try "
        "again at the next one.")

  def _latest_on_disk(self) -> int | None:
    try:
      steps = [int(n) for n in os.listdir(self.directory) if n.isdigit()]
    except OSError:
      return None
    return max(steps) if steps else None

  def _remove_unfinished(self, step: int | None = None, settle_s: float = 0.0) -> None:
    """Removes orbax's temporary folders (of ``step``, or all): never a checkpoint. After a
    failed write, tensorstore may still be finishing writes into one: ``settle_s`` seconds are
    allowed for it to stop; what is left then goes at the next save, close or start."""
    deadline = time.monotonic() + settle_s
    while True:
      try:
        names = [n for n in os.listdir(self.directory)
                 if TMP_MARK in n and (step is None or n.split(".", 1)[0] == str(step))]
      except OSError:
        return
      for name in names:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
      if not names or time.monotonic() > deadline:
        if names:
          self._leftovers.add(step)
        return
      time.sleep(0.05)

  def restore_latest(self, abstract_state, expected_meta: dict, feed: bool = False, check_meta=None):
    """(step, state, meta, feed or None) of the newest checkpoint that restores, or None when
    there is none. Corrupt ones on the way are reported and moved aside; a foreign one (another
    config) or none restorable raises ``CheckpointError``. ``check_meta(step, meta)`` (optional)
    sees each candidate's meta before its arrays are read, and may refuse it by raising."""
    steps = sorted(self._mngr.all_steps(), reverse=True)
    corrupt = []
    for step in steps:
      failed = None
      try:
        state, meta = self.restore(step, abstract_state, expected_meta, check_meta)
        feed_arrays = self.restore_feed(step, meta) if feed else None
      except CorruptCheckpoint as e:
        failed = e
      if jax.process_count() > 1:  # every host takes the same checkpoint (a file one host misreads counts)
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        if not all(multihost_utils.process_allgather(np.int32(failed is None))) and failed is None:
          failed = CorruptCheckpoint(self.directory, step, "another host could not read it back as written")
      if failed is not None:
        corrupt.append(failed)
        _quiet_orbax_leftovers()  # the failed read's abandoned coroutines: reported above, not again
        continue
      if corrupt and self.writer:
        self._set_aside(corrupt, step)
      elif corrupt:  # a reader (evaluation, diagnostics) changes nothing in the folder
        print("\n".join(f"warning: {e}" for e in corrupt) + f"\nwarning: reading checkpoint {self.directory}/{step} instead")
      return step, state, meta, feed_arrays
    if corrupt:
      raise CheckpointError(
          f"no checkpoint in {self.directory} restores:\n" + "\n".join(f"  {e}" for e in corrupt)
          + "\nNothing was moved or deleted. Restore the folder from a backup, or start afresh in a "
            "new --workdir (this one keeps the corrupt checkpoints and metrics for inspection).")
    return None

  def _set_aside(self, corrupt: list[CorruptCheckpoint], restored: int) -> None:
    aside = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
    moved = []
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for e in corrupt:
        target = os.path.join(aside, str(e.step))
        n = 1
        while os.path.exists(target):
          target, n = os.path.join(aside, f"{e.step}.{n}"), n + 1
        shutil.move(os.path.join(self.directory, str(e.step)), target)
        moved.append(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("raptr_jax: corrupt checkpoints set aside")
    self._mngr.reload()
    print("\n".join(f"warning: {e}" for e in corrupt)
          + f"\nwarning: falling back to checkpoint {self.directory}/{restored}; the corrupt one(s) "
            f"were moved to {aside}/ (delete them once inspected); the steps after {restored} are run again")

  def restore_feed(self, step: int, meta: dict | None = None) -> dict:
    """The batch-selection feed arrays saved at ``step`` (numpy), checked against the
    fingerprint in ``meta`` when given."""
    try:
      feed = self._mngr.restore(step, args=ocp.args.Composite(feed=ocp.args.StandardRestore()))["feed"]
    except Exception as e:  # pylint: disable=broad-except
      if not os.path.isdir(os.path.join(self.directory, str(step), "feed")):
        raise CheckpointError(f"checkpoint {self.directory}/{step} has no batch-selection state; it was "
                              "written by a run of another method. Use a fresh --workdir, or the config "
                              "that wrote it.") from e
      raise _unreadable(self.directory, step, "feed/: ", e) from e
    want = (meta or {}).get("feed_fingerprint")
    if want is not None and feed_fingerprint(feed) != want:
      raise CorruptCheckpoint(self.directory, step, "feed/: the batch-selection arrays read back differ "
                              "from those written (a data file was overwritten)")
    return feed

  def restore(self, step: int, abstract_state, expected_meta: dict, check_meta=None):
    """Restores (state, meta) at ``step`` with the shardings of ``abstract_state``; raises
    ``CorruptCheckpoint`` when it cannot be read back as written, ``CheckpointError`` when it
    belongs to another config (``check_meta(step, meta)`` may refuse it first)."""
    meta = self._read_meta(step)
    if check_meta is not None:
      check_meta(step, meta)
    loose = expected_meta.get(LOOSE, {})  # {key: sub-fields that may differ (how a run computes, not what)}
    for key, want in expected_meta.items():
      have = meta.get(key)
      if key == LOOSE:
        continue
      if isinstance(have, dict) and isinstance(want, dict):
        have = {k: v for k, v in have.items() if k not in loose.get(key, ())}
        want = {k: v for k, v in want.items() if k not in loose.get(key, ())}
      if have != want:
        if isinstance(have, dict) and isinstance(want, dict):
          diff = {k: (have.get(k), want.get(k)) for k in set(have) | set(want) if have.get(k) != want.get(k)}
          what = ", ".join(f"{key}.{k}: {a!r} there, {b!r} here" for k, (a, b) in sorted(diff.items()))
        else:
          what = f"{key}: {have!r} there, {want!r} here"
        raise CheckpointError(
            f"checkpoint {self.directory}/{step} was written by a different run ({what}). Use a "
            "fresh --workdir, or the config that wrote the checkpoint.")
    try:
      saved = self._mngr.item_metadata(step)["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise _unreadable(self.directory, step, "state/_METADATA: ", e) from e
    mismatch = _same_structure(saved, abstract_state) if saved is not None else None
    if mismatch:
      raise CheckpointError(f"checkpoint {self.directory}/{step} does not match this config's model and "
                            f"optimizer ({mismatch}). Use a fresh --workdir, or the config that wrote it.")
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          abstract_state)
    try:
      state = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise _unreadable(self.directory, step, "state/: ", e) from e
    want = meta.get("fingerprints")
    if want is not None:
      have = fingerprints(state)
      bad = [path for path in want if have.get(path) != want[path]]
      if bad:
        raise CorruptCheckpoint(
            self.directory, step, f"state/: {len(bad)} array(s) read back differ from what was written "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}; a data file under state/ was "
            "overwritten or damaged)")
    return state, meta

  def _read_meta(self, step: int) -> dict:
    """The meta of ``step`` (a JSON object in ``<step>/meta/metadata``); a missing, empty or
    damaged file is a ``CorruptCheckpoint`` that names the file and what is wrong with it."""
    path = os.path.join(self.directory, str(step), "meta", "metadata")
    if not os.path.exists(path):  # another layout (orbax's own reader finds it), or truly missing
      try:
        meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:  # pylint: disable=broad-except
        raise _unreadable(self.directory, step, "meta/metadata: ", e) from e
    else:
      try:
        with open(path, "rb") as f:
          data = f.read()
      except OSError as e:
        raise _unreadable(self.directory, step, "meta/metadata: ", e) from e
      if not data.strip(b"\0 \n\t"):
        raise CorruptCheckpoint(self.directory, step, f"{path} is empty ({len(data)} bytes): the run's position "
                                "(step, data, progress) was not written completely")
      try:
        meta = json.loads(data.decode("utf-8"))
      except (UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpoint(self.directory, step, f"{path} is not valid JSON ({type(e).__name__}: "
                                f"{str(e)[:120]}): it was truncated or overwritten") from None
    if not isinstance(meta, dict):
      raise CorruptCheckpoint(self.directory, step, f"{path} holds a JSON {type(meta).__name__}, not the object "
                              "a checkpoint writes: it was overwritten")
    return meta

  def wait(self) -> None:
    """Waits for an asynchronous write. Raises ``CheckpointWriteError`` when the newest
    checkpoint asked for is not written, whatever ``on_write_error`` says: the caller (a stop,
    a preemption, the end of the run) is about to rely on it."""
    self._join()
    if self._failed is not None:
      raise self._failed

  def close(self) -> None:
    """Finishes an asynchronous write (raising if it fails) and closes the manager."""
    try:
      self._join()
    finally:
      self._mngr.close()
      self._remove_leftovers()

  def _remove_leftovers(self) -> None:
    if self._leftovers and jax.process_index() == 0:
      steps, self._leftovers = self._leftovers, set()
      for step in steps:
        self._remove_unfinished(step)

