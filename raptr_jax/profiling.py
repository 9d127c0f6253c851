"""A ``jax.profiler`` trace of chosen training steps (``log.profile_steps = (first, last)``).

The trace goes to ``WORKDIR/profile`` (or ``log.profile_dir``), one folder per host; open it
with TensorBoard's profile plugin (``tensorboard --logdir WORKDIR/profile``) or Perfetto
(``ui.perfetto.dev``, the ``*.trace.json.gz`` file). Each step is annotated with its number
(``StepTraceAnnotation``), and the last traced step is waited for before the trace stops, so
its device work is in the trace. Tracing the first steps also traces their compilation.
"""
import contextlib
import os

import jax


class StepProfiler:

  def __init__(self, steps, directory: str):
    self.first, self.last = (tuple(steps) or (0, -1))
    self.directory = os.path.join(directory, f"host_{jax.process_index()}") if jax.process_count() > 1 else directory
    self.active = False

  def step(self, step: int):
    """Context of training step ``step`` (1-based): starts the trace at ``first``."""
    if step == self.first and not self.active:
      os.makedirs(self.directory, exist_ok=True)
      jax.profiler.start_trace(self.directory)
      self.active = True
    if not self.active:
      return contextlib.nullcontext()
    return jax.profiler.StepTraceAnnotation("train", step_num=step)

  def after(self, step: int, outputs) -> None:
    """After step ``step``: stops the trace at ``last`` (once its outputs are computed)."""
    if self.active and step >= self.last:
      jax.block_until_ready(outputs)
      self.close()
      if jax.process_index() == 0:
        print(f"profile of steps {self.first}..{self.last} in {self.directory} "
              f"(tensorboard --logdir {os.path.dirname(self.directory) if jax.process_count() > 1 else self.directory})")

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
