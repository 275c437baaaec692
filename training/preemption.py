"""Preemption: on SIGTERM or SIGINT, stop at a step every host agrees on, with a checkpoint.

A TPU VM preemption, SLURM's time limit and `kubectl delete` all send SIGTERM first, then
SIGKILL after a grace period. The outer loop (training/outer_loop.py) asks `should_stop(step)`
after every step; once it says yes, the loop saves a checkpoint of that step, waits for it to
be committed, and raises `Preempted`. scripts/train.py turns that into one log line and exit
status `PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL: "try again"), which launchers can treat as
"requeue"; rerunning the same command resumes from that step.

One process: Python handlers for SIGTERM and SIGINT set a flag; the current step finishes and
the run stops after it. Several processes (`jax.distributed`): a host that got the signal must
not leave the others waiting in a collective, so the hosts agree on the stopping step through
JAX's preemption sync manager (`multihost_utils.reached_preemption_sync_point`): its notifier
catches SIGTERM on any host, the coordination service computes the step every host can still
reach, and each host stops there. SIGINT keeps Python's default (KeyboardInterrupt) on
multi-host runs, where it is an operator's interrupt rather than a scheduler's notice.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils

PREEMPTED_EXIT_CODE = 75
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run stopped early at `step` on a preemption notice, with a checkpoint of that step."""

  def __init__(self, step: int, signal_name: str):
    super().__init__(f"preempted ({signal_name}) at step {step}: checkpoint of step {step} "
                     "saved; rerun the same command to resume")
    self.step = step


class PreemptionWatch:
  """`with PreemptionWatch() as watch: ... if watch.should_stop(step): ...` (see the module
  docstring). Outside the main thread (no signal handlers can be set there) it only follows
  the multi-host sync manager."""

  def __init__(self):
    self.signal_name = ""
    self._previous = {}
    self._multihost = jax.process_count() > 1

  def __enter__(self) -> PreemptionWatch:
    if not self._multihost and threading.current_thread() is threading.main_thread():
      for sig in _SIGNALS:
        self._previous[sig] = signal.signal(sig, self._notice)
    return self

  def __exit__(self, *exc_info) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _notice(self, signum, frame) -> None:
    del frame
    if not self.signal_name:
      logging.warning("%s received: stopping after the current step with a checkpoint",
                      signal.Signals(signum).name)
    self.signal_name = signal.Signals(signum).name

  def should_stop(self, step: int) -> bool:
    """Whether the run stops after `step` (every process calls it at every step)."""
    if self._multihost:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or "SIGTERM"
        return True
      return False
    return bool(self.signal_name)
