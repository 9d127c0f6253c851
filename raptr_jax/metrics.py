"""Metric writers (``metrics.jsonl`` and TensorBoard) and the progress bar."""
import json
import math
import os
import time

import jax
import numpy as np
import tqdm


class MetricWriter:
  """One JSON object per logged step in WORKDIR/metrics.jsonl, mirrored to TensorBoard.

  Every step is logged exactly once, however often the run is killed and resumed: ``start(step)``
  (before the first write of a start) keeps only the rows of steps up to the checkpoint the run
  resumed from (none on a fresh start), drops a torn last line left by a kill with a warning,
  and opens TensorBoard with ``purge_step`` = step + 1, so TensorBoard hides the events a killed
  run logged after that checkpoint. ``rows`` counts the rows in the file; checkpoints record it,
  and a resume that finds fewer says so (a deleted or replaced metrics.jsonl)."""

  def __init__(self, workdir: str, tensorboard: bool, enabled: bool = True):
    self.workdir = workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self.tensorboard = tensorboard
    self.rows = 0
    self._tb = None

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
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    self.rows = len(kept)
    if self.tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"), purge_step=0 if step is None else step + 1,
                                 filename_suffix=f".{time.time_ns()}")  # files of restarts sort in order
      except ImportError:
        print("tensorboardX is not installed: TensorBoard logging is off (pip install tensorboardX)")

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
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    self.rows += 1
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, float):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


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
