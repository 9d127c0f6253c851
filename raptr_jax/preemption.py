"""Preemption-safe shutdown: on SIGTERM or SIGINT, finish the step, checkpoint it, exit.

TPU VMs, Slurm and Kubernetes preempt with SIGTERM (and a grace period); Ctrl-C sends SIGINT.
``Preemption`` (a context manager around the training loop) turns the first of either into a
request the loop reads after every step (``requested(step)``): the loop then writes a
checkpoint at that step, waits for it, prints how to resume and raises ``Preempted`` (a
``SystemExit``: code 0 for SIGTERM, 130 for SIGINT, so a command-line run exits with it and
library callers may catch it). The first SIGTERM also restores the default action, so a second
one ends the process at once, whatever it is doing (a checkpoint being written is then
discarded by orbax's atomic rename; the previous one stays); a second SIGINT meets the handler
that was there before (Python's KeyboardInterrupt; in a notebook, the kernel's interrupt).

Several processes (``jax.distributed``) must agree on the step: JAX's preemption service
catches SIGTERM in every process and ``multihost_utils.reached_preemption_sync_point(step)``
turns true on all of them at the same step; SIGINT is forwarded to it as a SIGTERM of this
process. A single process needs no agreement and uses its own handler.
"""
import os
import signal
import threading

import jax

EXIT_CODES = {"SIGTERM": 0, "SIGINT": 130}


class Preempted(SystemExit):
  """Raised by the loop after it checkpointed on a signal (``signal``, ``step``)."""

  def __init__(self, signal_name: str, step: int, message: str):
    super().__init__(EXIT_CODES.get(signal_name, 0))
    self.signal, self.step, self.message = signal_name, step, message


class Preemption:
  """Signal handling for one training loop (see the module docstring)."""

  def __init__(self):
    self.signal: str | None = None     # name of the first signal received
    self.step_at_signal: int | None = None
    self.current_step = 0              # the step being computed (set by the loop)
    self._previous = {}
    self._multihost = False

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self  # signals reach the main thread only: a loop in a thread is not preemptible
    self._multihost = jax.process_count() > 1 and _preemption_service()
    wanted = (signal.SIGINT,) if self._multihost else (signal.SIGTERM, signal.SIGINT)
    for sig in wanted:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
    return False

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    # A second signal: SIGTERM's default action (the process ends at once), SIGINT's previous
    # handler (KeyboardInterrupt, or a notebook kernel's interrupt).
    previous = self._previous.get(signum) if signum == signal.SIGINT else None
    signal.signal(signum, previous if callable(previous) else signal.SIG_DFL)
    if self._multihost:  # let JAX's preemption service agree on the step with the other hosts
      self.signal = self.signal or name
      os.kill(os.getpid(), signal.SIGTERM)
      return
    if self.signal is None:
      self.signal, self.step_at_signal = name, self.current_step
      print(f"\n{name} received during step {self.current_step}: finishing it and writing a checkpoint "
            f"there (send {name} again to exit at once, without it)", flush=True)

  def requested(self, step: int) -> bool:
    """True once the run should checkpoint ``step`` and stop (every host at the same step)."""
    if self._multihost:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal = self.signal or "SIGTERM"
        return True
      return False
    return self.signal is not None


def _preemption_service() -> bool:
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None
