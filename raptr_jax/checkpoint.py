"""Orbax checkpoints of the train state plus the run's host-side position (progress, data).

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it on
success), the last ``keep`` are kept, and a run re-started with the same workdir resumes from the
newest complete one. A checkpoint whose structure or shapes do not match the current config is
refused with a message, never silently half-loaded.
"""
import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  pass


class Checkpointer:

  def __init__(self, directory: str, keep: int, async_save: bool):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None, create=True, enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta", "feed"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state, meta: dict, feed: dict | None = None) -> None:
    """``feed``: host-side numpy arrays of a batch-selection feed (carry, loss history)."""
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if feed is not None:
      items["feed"] = ocp.args.StandardSave(feed)
    self._mngr.save(step, args=ocp.args.Composite(**items))

  def restore_feed(self, step: int) -> dict:
    """The batch-selection feed arrays saved at ``step`` (numpy)."""
    try:
      return self._mngr.restore(step, args=ocp.args.Composite(feed=ocp.args.StandardRestore()))["feed"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"checkpoint {self.directory}/{step} has no readable batch-selection state "
                            f"({type(e).__name__}: {str(e)[:300]}); it was written by a run of another "
                            "method. Use a fresh --workdir, or the config that wrote it.") from e

  def restore(self, step: int, abstract_state, expected_meta: dict):
    """Restores (state, meta) at ``step`` with the shardings of ``abstract_state``."""
    try:
      meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable ({type(e).__name__}: "
                            f"{e}). Delete that step's folder to fall back to an older one, or "
                            "use a fresh --workdir.") from e
    for key, want in expected_meta.items():
      have = meta.get(key)
      if have != want:
        if isinstance(have, dict) and isinstance(want, dict):
          diff = {k: (have.get(k), want.get(k)) for k in set(have) | set(want) if have.get(k) != want.get(k)}
          what = ", ".join(f"{key}.{k}: {a!r} there, {b!r} here" for k, (a, b) in sorted(diff.items()))
        else:
          what = f"{key}: {have!r} there, {want!r} here"
        raise CheckpointError(
            f"checkpoint {self.directory}/{step} was written by a different run ({what}). Use a "
            "fresh --workdir, or the config that wrote the checkpoint.")
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          abstract_state)
    try:
      state = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"checkpoint {self.directory}/{step} does not match this config's model "
                            f"and optimizer ({type(e).__name__}: {str(e)[:500]}). Use a fresh "
                            "--workdir, or the config that wrote it.") from e
    return state, meta

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
