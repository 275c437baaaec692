"""Time left: the training progress line's ETA and the "stage k of n" / "run k of n" lines
of the pipeline and sweeps.

Both estimate from the mean time per unit done so far (steps since the first timed step;
finished stages or runs), which is what a user watching a long job wants: no model of the
remaining work, only its count.
"""

from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
  """`3725.0` -> `'1h02m'`, `125` -> `'2m05s'`, `9.4` -> `'9s'`."""
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def remaining(elapsed: float, done: int, total: int) -> float | None:
  """Seconds left at the mean rate of the `done` units so far (None before any is done)."""
  if done <= 0:
    return None
  return elapsed / done * max(total - done, 0)


class Countdown:
  """Counts units of a job (steps, stages, runs) and says how long the rest should take.

  `start` is when timing began; `first` the unit count at that moment (a resumed run starts
  timing at its checkpoint's step, not at 0).
  """

  def __init__(self, total: int, first: int = 0, clock=time.perf_counter):
    self.total, self.first, self.clock = total, first, clock
    self.start = clock()

  def restart(self, first: int) -> None:
    """Times from now, with `first` units already done (e.g. after the compiling step)."""
    self.first, self.start = first, self.clock()

  def eta(self, done: int) -> str:
    """'ETA 2m05s' after `done` units, or '' before any timed unit."""
    left = remaining(self.clock() - self.start, done - self.first, self.total - self.first)
    return "" if left is None else f"ETA {format_duration(left)}"

  def line(self, k: int, noun: str, name: str = "") -> str:
    """'stage 3 of 10 (sft) | elapsed 4m10s | remaining ~8m20s' as unit `k` (1-based)
    starts, `k - 1` having finished."""
    elapsed = self.clock() - self.start
    text = f"{noun} {k} of {self.total}" + (f" ({name})" if name else "")
    text += f" | elapsed {format_duration(elapsed)}"
    left = remaining(elapsed, k - 1 - self.first, self.total - self.first)
    return text + (f" | remaining ~{format_duration(left)}" if left is not None else "")
