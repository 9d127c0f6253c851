"""Several processes (``jax.distributed``): start-up, and what the others do when one is lost.

Start-up (``initialize``): ``jax.distributed.initialize`` from the config's ``distributed``
section. A coordinator that cannot be reached is reported after ``distributed.timeout_s`` with a
message (JAX would abort the process with a stack trace), and process 0 checks that it can
listen on its port before it starts.

A lost process (killed, out of memory, its host gone) must not leave the others waiting in a
collective: on CPU (gloo) and GPU (NCCL) a collective with a dead peer usually just waits.
- Every process runs a ``Heartbeat`` thread: it bumps its counter in JAX's key-value store each
  second and reads the others'. A counter that stood still for ``distributed.heartbeat_s`` / 2
  names its process as lost, and each survivor prints one paragraph (which process, the last
  checkpoint that every process committed, how to resume) and exits with ``LOST_PROCESS_EXIT``
  (75, ``EX_TEMPFAIL``: a scheduler may re-launch), skipping the exit-time barrier that would
  wait for the dead process. A process that ends its run (done, stopped, preempted, failed)
  marks itself done first, so it is never taken for lost.
- A collective that does fail because its peer is gone (a closed connection) waits for that
  verdict, so the paragraph, not the collective's error, is what the user reads.
- The backstop is JAX's own: its coordination service (hosted by process 0) ends every process
  when one sent no heartbeat for ``heartbeat_s`` (its message, a fatal log line). A survivor
  that loses process 0 itself, and with it the key-value store, is ended by JAX at once with
  that message. (JAX's client offers a callback for this, but in jaxlib 0.10 calling it from
  Python aborts with ``std::bad_cast``.)
No survivor waits longer than ``heartbeat_s`` (default 30 s; JAX's own default is 100 s).

A checkpoint is committed by every process or by none: orbax writes a step into a temporary
folder from all processes and renames it into place on process 0 after all of them have
finished, so a checkpoint the lost process (or the survivors, exiting) left unfinished is never
restored; the next start removes it (``checkpoint.Checkpointer``). Re-launching every process
with the same command resumes from the last committed step, exactly as an uninterrupted run.
"""
import os
import shlex
import socket
import sys
import threading
import time

import jax

LOST_PROCESS_EXIT = 75  # EX_TEMPFAIL: the run can be resumed; re-launch every process


class ClusterError(RuntimeError):
  pass


class _Watch:
  """What the lost-process message needs to know, set by the training loop."""

  def __init__(self):
    self.process_id, self.num_processes = 0, 1
    self.checkpoint_dir: str | None = None
    self.heartbeat_s = 0.0
    self.heartbeat: Heartbeat | None = None


WATCH = _Watch()


def initialize(d, workdir: str) -> None:
  """``jax.distributed.initialize`` from the ``distributed`` section ``d``, with the lost-process
  handling of the module docstring (checkpoints of ``workdir``)."""
  if d.heartbeat_s <= 0:
    raise ValueError(f"distributed.heartbeat_s={d.heartbeat_s:g} must be > 0: the seconds without a heartbeat "
                     "after which a process counts as lost (e.g. 30)")
  WATCH.checkpoint_dir = os.path.join(workdir, "checkpoints")
  WATCH.heartbeat_s = float(d.heartbeat_s)
  timeouts = dict(initialization_timeout=int(d.timeout_s), heartbeat_timeout_seconds=max(1, round(d.heartbeat_s)))
  if not d.coordinator_address:  # the cluster tells JAX (TPU pods, Slurm, ...)
    jax.distributed.initialize(**timeouts)
  else:
    _check_coordinator(d)
    jax.distributed.initialize(coordinator_address=d.coordinator_address, num_processes=int(d.num_processes),
                               process_id=int(d.process_id), **timeouts)
  WATCH.process_id, WATCH.num_processes = jax.process_index(), jax.process_count()
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = getattr(jax_distributed.global_state, "client", None)
  if client is not None and WATCH.num_processes > 1:  # half JAX's timeout: this report comes before JAX's abort
    silent_s = WATCH.heartbeat_s / 2
    WATCH.heartbeat = Heartbeat(client, WATCH.process_id, WATCH.num_processes, silent_s,
                                lambda lost: report_lost(lost, f"no heartbeat for {silent_s:g} s"),
                                interval_s=min(1.0, silent_s / 5))


def _check_coordinator(d) -> None:
  if d.num_processes < 1 or not 0 <= d.process_id < d.num_processes:
    raise ValueError(f"distributed.coordinator_address is set: distributed.num_processes (>= 1) and "
                     f"distributed.process_id (0 .. num_processes - 1) must be too, got {d.num_processes} and "
                     f"{d.process_id}")
  host, _, port = d.coordinator_address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"distributed.coordinator_address={d.coordinator_address!r} must be HOST:PORT, e.g. localhost:12355")
  if d.process_id == 0:
    with socket.socket() as probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        probe.bind(("", int(port)))  # JAX's coordinator listens on every interface
      except OSError as e:
        raise ClusterError(f"process 0 coordinates the run at {d.coordinator_address}, but cannot listen "
                           f"there ({e.strerror}): another run may hold the port; choose another port") from None
    return
  deadline = time.monotonic() + float(d.timeout_s)
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=5).close()
      return
    except OSError as e:
      if time.monotonic() > deadline:
        raise ClusterError(f"process {d.process_id} could not reach the coordinator at {d.coordinator_address} "
                           f"within distributed.timeout_s={d.timeout_s:g} s ({e.strerror or e}): start process 0 "
                           "with the same address, check the host name and that the port is open") from None
      time.sleep(0.5)


class Heartbeat:
  """A thread that bumps this process's counter in JAX's key-value store every ``interval_s`` and
  reads every other process's (one directory read). A process whose counter stood still for
  ``silent_s`` is lost: ``on_lost(ids)`` is called once. ``close()`` marks this process done
  first, so a process that ended its run normally is never taken for lost."""

  PREFIX = "raptr_jax/alive/"
  DONE = "done"

  def __init__(self, client, process_id: int, num_processes: int, silent_s: float, on_lost,
               interval_s: float = 1.0):
    self.client, self.process_id, self.num_processes = client, process_id, num_processes
    self.silent_s, self.on_lost, self.interval_s = silent_s, on_lost, interval_s
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name="raptr_jax-heartbeat", daemon=True)
    self._thread.start()

  def _beat(self):
    count, changed = 0, {}  # process id -> (its counter, when it last moved)
    while not self._stop.is_set():
      count += 1
      try:
        self.client.key_value_set(f"{self.PREFIX}{self.process_id}", str(count), allow_overwrite=True)
        entries = self.client.key_value_dir_get(self.PREFIX)
      except Exception:  # pylint: disable=broad-except  (the service is gone: JAX ends the process)
        return
      now = time.monotonic()
      for key, value in entries:
        pid = int(key.rsplit("/", 1)[-1])
        if pid != self.process_id and changed.get(pid, (None,))[0] != value:
          changed[pid] = (value, now)
      lost = sorted(pid for pid, (value, since) in changed.items()
                    if value != self.DONE and now - since > self.silent_s)
      if lost and not self._stop.is_set():
        self.on_lost(lost)
        return
      self._stop.wait(self.interval_s)

  def close(self):
    """This process ends its run: stop beating and tell the others it is done, not lost."""
    self._stop.set()
    self._thread.join(timeout=5 * self.interval_s)
    try:
      self.client.key_value_set(f"{self.PREFIX}{self.process_id}", self.DONE, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  (the service is gone)
      pass


def committed_step() -> int | None:
  """The newest checkpoint every process committed: the newest step folder that orbax renamed
  into place (it does so only after every process wrote its part); None when there is none."""
  if WATCH.checkpoint_dir is None:
    return None
  try:
    if "://" in WATCH.checkpoint_dir:  # a bucket (gs://...): orbax's own path library lists it
      from etils import epath  # pylint: disable=g-import-not-at-top
      names = [p.name for p in epath.Path(WATCH.checkpoint_dir).iterdir()]
    else:
      names = os.listdir(WATCH.checkpoint_dir)
  except Exception:  # pylint: disable=broad-except  (no folder yet, storage unreachable)
    return None
  steps = [int(n) for n in names if n.isdigit()]
  return max(steps) if steps else None


def lost_message(lost: list[int] | None, reason: str) -> str:
  """The paragraph a surviving process prints (see the module docstring)."""
  own, count = WATCH.process_id, WATCH.num_processes
  if not lost:
    who = "another process of this run was lost"
  else:
    names = ", ".join(str(i) for i in lost)
    who = (f"process {names} of {count} was lost" if len(lost) == 1 else f"processes {names} of {count} were lost")
    if lost == [0]:
      who += " (it hosts JAX's coordination service)"
  step = committed_step()
  if step is None:
    where = "No checkpoint was committed yet, so the run starts afresh when re-launched."
  else:
    where = (f"The last checkpoint every process committed is {WATCH.checkpoint_dir}/{step} (step {step}); "
             "the run resumes from it exactly, and a checkpoint left unfinished is never restored.")
  return (f"\nerror: {who} ({reason}), so process {own} stops here instead of waiting for it in a collective. "
          f"{where} To resume, re-launch all {count} processes, each with the command that started it (this one: "
          f"{resume_command()}).\n")


def resume_command() -> str:
  """This process's own command line, as a user would type it again."""
  argv = list(sys.argv)
  main = os.path.join("raptr_jax", "main.py")
  head = ["python", "-m", "raptr_jax.main"] if argv and argv[0].endswith(main) else ["python", argv[0] if argv else "?"]
  return shlex.join(head + argv[1:])


def report_lost(lost: list[int] | None, reason: str) -> None:
  """The lost-process paragraph on stderr, then ``os._exit(LOST_PROCESS_EXIT)``: no barrier and
  no atexit handler waits for the dead process."""
  try:
    message = lost_message(lost, reason)
    sys.stdout.flush()
    os.write(2, message.encode())
  finally:
    os._exit(LOST_PROCESS_EXIT)


def stop_heartbeat() -> None:
  """The run ended here (done, stopped, preempted or failed): the others must not count this
  process as lost while it leaves."""
  if WATCH.heartbeat is not None:
    WATCH.heartbeat.close()
    WATCH.heartbeat = None


PEER_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Gloo ", "NCCL",
                 "UNAVAILABLE")


def exit_if_peer_lost(error: BaseException) -> None:
  """After ``error`` in a run of several processes: when a collective failed because a peer is
  gone, the heartbeat names it within ``heartbeat_s`` / 2 (and ends this process); failing that,
  the report without a name. Any other error returns, to be raised as it is."""
  if WATCH.num_processes < 2 or not isinstance(error, jax.errors.JaxRuntimeError):
    return
  text = str(error)
  if not any(mark in text for mark in PEER_FAILURES):
    return
  if WATCH.heartbeat is not None:
    time.sleep(WATCH.heartbeat.silent_s + 3 * WATCH.heartbeat.interval_s)  # its verdict ends the process
  report_lost(None, f"a collective failed: {text.strip().splitlines()[0][:300] if text.strip() else ''}")
