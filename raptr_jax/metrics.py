"""Metric writers (``metrics.jsonl`` and TensorBoard) and the progress bar."""
import json
import math
import os
import socket
import struct
import time

import jax
import numpy as np
import tqdm


class EventFile:
  """A TensorBoard event file written synchronously, one logged step per write (tensorboardX's
  ``SummaryWriter`` queues events for a thread that flushes every two minutes, so a ``kill -9``
  lost the last steps, and a write error there was never seen). ``purge_step`` (a restart)
  makes TensorBoard hide the events of earlier files at that step and after. A failed write is
  cut back off the file (``append`` raises ``OSError``), so the file never holds a torn record."""

  def __init__(self, logdir: str, purge_step: int | None):
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._event_pb2 = event_pb2
    os.makedirs(logdir, exist_ok=True)
    # tensorboardX's names: restarts sort in order (seconds, host, then nanoseconds).
    self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
                                     f".{time.time_ns()}")
    header = [event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")]
    if purge_step is not None:
      header += [event_pb2.Event(step=purge_step, wall_time=time.time(), file_version="brain.Event:2"),
                 event_pb2.Event(step=purge_step, wall_time=time.time(),
                                 session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))]
    self._pending = b"".join(  # the header, until a write succeeds
        _record(e.SerializeToString()) for e in header)

  def scalars(self, step: int, values: dict) -> bytes:
    """The records of ``values`` ({tag: float}) at ``step``."""
    from tensorboardX.summary import scalar  # pylint: disable=g-import-not-at-top
    now = time.time()
    return b"".join(_record(self._event_pb2.Event(wall_time=now, step=int(step), summary=scalar(k, v))
                            .SerializeToString()) for k, v in values.items())

  def append(self, data: bytes) -> None:
    """Appends ``data`` (after the header, the first time) in one write; on failure the file
    is cut back to its size before, and ``OSError`` is raised."""
    _append(self.path, self._pending + data, "ab")
    self._pending = b""

  def sync(self) -> None:
    _fsync(self.path)


def _record(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC32C, the data, its masked CRC32C."""
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top
  header = struct.pack("<Q", len(data))
  return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def _append(path: str, data, mode: str) -> None:
  """Appends ``data`` (str, ``mode`` "a"; bytes, "ab") to ``path``; if the write fails the file
  is cut back to its size before (no torn line or record), and the ``OSError`` is raised."""
  size = os.path.getsize(path) if os.path.exists(path) else 0
  try:
    with open(path, mode) as f:
      f.write(data)
  except OSError:
    try:
      os.truncate(path, size)
    except OSError:
      pass
    raise


def _fsync(path: str) -> None:
  if os.path.exists(path):
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


class MetricWriter:
  """One JSON object per logged step in WORKDIR/metrics.jsonl, mirrored to TensorBoard.

  Every step is logged exactly once, however often the run is killed and resumed: ``start(step)``
  (before the first write of a start) keeps only the rows of steps up to the checkpoint the run
  resumed from (none on a fresh start), drops a torn last line left by a kill with a warning,
  and opens a TensorBoard event file with ``purge_step`` = step + 1, so TensorBoard hides the
  events a killed run logged after that checkpoint. Both files are written at each logged step
  (TensorBoard synchronously, ``EventFile``) and synced with each checkpoint (``flush``), so
  they hold every step up to any checkpoint a resume can start from. ``rows`` counts the rows
  in the file; checkpoints record it, and a resume that finds fewer says so (a deleted or
  replaced metrics.jsonl).

  A write that fails (disk full, permission, I/O error) never stops the run nor leaves a torn
  line: the file is cut back, a warning names the file and the reason once, the rows are held
  in memory and written with the next row that can be (then that is said too); rows still held
  when the run ends are reported as lost."""

  HOLD = 100_000  # rows held in memory while a file cannot be written (the oldest go beyond)

  def __init__(self, workdir: str, tensorboard: bool, enabled: bool = True):
    self.workdir = workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self.tensorboard = tensorboard
    self.rows = 0
    self._tb = None
    self._held = {"jsonl": [], "tensorboard": []}  # (step, data) not yet written
    self._failing = {}  # file kind -> the first error of the current failure
    self._dropped = {"jsonl": 0, "tensorboard": 0}

  def start(self, step: int | None, expected_rows: int | None = None) -> None:
    """Before the first write: keep the rows of steps <= ``step`` (None: a fresh start keeps
    none); warn when fewer than ``expected_rows`` (the checkpoint's count) are left."""
    if not self.enabled:
      return
    kept = [] if step is None else self._kept_rows(step)
    if step is not None and expected_rows and len(kept) < expected_rows:
      what = "is missing" if not os.path.exists(self.path) else f"holds {len(kept)} rows up to step {step}"
      print(f"warning: {self.path} {what}, but it held {expected_rows} when the checkpoint at step {step} "
            f"was written: logged rows were lost (the file was deleted or replaced); the curve "
            f"continues from step {step + 1}{' (TensorBoard keeps the earlier events)' if self.tensorboard else ''}")
    if kept or os.path.exists(self.path):
      tmp = self.path + ".tmp"
      try:
        with open(tmp, "w") as f:
          f.writelines(kept)
        os.replace(tmp, self.path)
      except OSError as e:
        if os.path.exists(tmp):
          os.remove(tmp)
        raise OSError(f"cannot rewrite {self.path} (through {tmp}) before resuming: {e.strerror or e}; it is "
                      "unchanged. Free space or restore write access to the workdir, then re-run the same "
                      "command") from None
    self.rows = len(kept)
    if self.tensorboard:
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top,unused-import
      except ImportError:
        print("tensorboardX is not installed: TensorBoard logging is off (pip install tensorboardX)")
        return
      try:
        self._tb = EventFile(os.path.join(self.workdir, "tensorboard"), 0 if step is None else step + 1)
      except OSError as e:
        print(f"warning: cannot create {os.path.join(self.workdir, 'tensorboard')}: {e.strerror or e}; "
              "TensorBoard logging is off for this run (metrics.jsonl goes on)", flush=True)
        return
      self._hold("tensorboard", 0 if step is None else step, b"")  # the header (the purge) now
      self._write_held()

  def _kept_rows(self, step: int) -> list[str]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    kept = []
    for i, line in enumerate(lines):
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        where = "its last line" if i == len(lines) - 1 else f"line {i + 1}"
        print(f"warning: {self.path}: {where} is not complete JSON (a run killed while writing it); dropped")
        continue
      if row["step"] <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
    return kept

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else str(v)
    self._hold("jsonl", step, json.dumps(row) + "\n")
    if self._tb is not None:
      self._hold("tensorboard", step, self._tb.scalars(step, {k: v for k, v in row.items()
                                                               if k != "step" and isinstance(v, float)}))
    self._write_held()

  def _hold(self, kind: str, step: int, data) -> None:
    held = self._held[kind]
    held.append((step, data))
    if len(held) > self.HOLD:
      held.pop(0)
      self._dropped[kind] += 1

  def _write_held(self) -> None:
    for kind, held in self._held.items():
      if not held:
        continue
      name = self.path if kind == "jsonl" else self._tb.path
      try:
        if kind == "jsonl":
          _append(self.path, "".join(data for _, data in held), "a")
        else:
          self._tb.append(b"".join(data for _, data in held))
      except OSError as e:
        if kind not in self._failing:
          self._failing[kind] = e
          print(f"warning: cannot write {name}: {e.strerror or e} (at step {held[-1][0]}). Training goes on; "
                "the rows are kept in memory and written as soon as the file can be written again (nothing is "
                "lost unless the run ends first)", flush=True)
        continue
      if kind == "jsonl":
        self.rows += len(held)
      if kind in self._failing:
        del self._failing[kind]
        rows = [step for step, data in held if data]
        print(f"{name} can be written again: the {len(rows)} rows held since then"
              f"{f' (steps {rows[0]}-{rows[-1]})' if rows else ''} are in it", flush=True)
      held.clear()

  def flush(self) -> None:
    """Makes every logged step durable (with each checkpoint): writes held rows if it can and
    syncs both files to disk."""
    if not self.enabled:
      return
    self._write_held()
    for path in (self.path, self._tb.path if self._tb is not None else None):
      try:
        if path is not None:
          _fsync(path)
      except OSError:
        pass  # a sync that fails says nothing new: the write errors were reported

  def close(self) -> None:
    if not self.enabled:
      return
    self._write_held()
    for kind, held in self._held.items():
      lost = len(held) + self._dropped[kind]
      if lost:
        name = self.path if kind == "jsonl" else "TensorBoard"
        first = f" (steps {held[0][0]}-{held[-1][0]})" if held else ""
        print(f"warning: {lost} logged rows{first} could not be written to {name} before the run ended "
              f"({self._failing.get(kind, 'memory limit')}); they are lost", flush=True)


def read_metrics(workdir: str) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl (a torn last line, from a run killed while writing it,
  is left out)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [line for line in f if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise ValueError(f"{workdir}/metrics.jsonl: line {i + 1} is not valid JSON") from None
  return rows


class ProgressBar:
  """tqdm over the budget's unit: shows steps, loss, tokens/s and the ETA."""

  def __init__(self, budget: float, unit: str, initial: float, enabled: bool):
    self._bar = tqdm.tqdm(total=budget, initial=initial, unit=unit[:-1] if unit.endswith("s") else unit,
                          disable=not enabled, dynamic_ncols=True, unit_scale=unit != "steps",
                          bar_format="{l_bar}{bar}| {n:.4g}/{total:.4g} [{elapsed}<{remaining}{postfix}]")

  def update(self, amount: float, step: int, loss: float | None, tokens_per_s: float | None):
    post = {"step": step}
    if loss is not None:
      post["loss"] = f"{loss:.3f}"
    if tokens_per_s:
      post["tok/s"] = f"{tokens_per_s:,.0f}"
    self._bar.set_postfix(post, refresh=False)
    self._bar.update(amount)

  def write(self, text: str) -> None:
    self._bar.write(text)

  def close(self) -> None:
    self._bar.close()


class StepTimer:
  """Train-loss mean, step time, tokens/s and MFU over the steps since the last report.

  Steps that compiled are left out (``skip``), so timings are steady-state. Metrics stay on
  device until ``report`` fetches them, which keeps the loop free of per-step host syncs.
  """

  def __init__(self, peak_flops_per_s: float | None, devices: int):
    self.peak = peak_flops_per_s
    self.devices = devices
    self.reset()

  def reset(self) -> None:
    self._metrics, self._tokens, self._flops = [], 0.0, 0.0
    self._t0 = time.perf_counter()

  skip = reset  # after a compiling step: start timing afresh

  def add(self, metrics, tokens: float, flops: float) -> None:
    self._metrics.append(metrics)
    self._tokens += tokens
    self._flops += flops

  def report(self, last_loss: float) -> dict:
    dt = time.perf_counter() - self._t0
    losses = [float(m["loss"]) for m in jax.device_get(self._metrics)] or [float(last_loss)]
    row = {"train/loss": float(np.mean(losses))}
    if self._metrics:
      row |= {"step_time": dt / len(self._metrics), "tokens_per_s": self._tokens / dt}
      if self.peak:
        row["mfu"] = self._flops / dt / (self.peak * self.devices)
    self.reset()
    return row
