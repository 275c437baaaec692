"""One run per workdir: `WorkdirLock(workdir)` is held by a run's process 0 for its whole life.

Two runs in one workdir (the same command started twice, a requeued job overlapping the old
one) would both train, append the same steps to metrics.jsonl, race on the tokenizer file and
on checkpoints. The second one refuses at once instead, naming the holder:

    WorkdirLockedError: workdir runs/x is in use by pid 4242 on host vm-3 since
    2025-01-02T03:04:05+00:00 (runs/x/.lock) ...

How, in `{workdir}/.lock`:
  - an OS lock (`fcntl.flock`) on the open file: on one host it is exact, and the kernel drops
    it when the process ends in any way, SIGKILL included;
  - a holder record in the file (JSON: pid, host, since), for the message and for filesystems
    where flock does not span hosts (or fails): there a record is stale when its host is this
    one and its pid is dead, or its host is another one and its heartbeat (the file's mtime,
    touched every `HEARTBEAT_S` by a daemon thread) is older than `STALE_AFTER_S`;
  - released: the record is emptied, then the OS lock dropped. The file stays (removing it
    would let a waiting opener lock an unlinked file while a newcomer locks a fresh one).

A stale record is taken over with a warning. Processes other than 0 of a multi-host run pass
`enabled=False`: their process 0 holds the lock for the run.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
from typing import Any

from absl import logging

from configs.run_layout import LOCK_FILE

# The holder touches its lock file this often; another host's record older than
# STALE_AFTER_S is a run that died without releasing (SIGKILL, a lost host).
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir's lock; the message names it on one line."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _describe(holder: dict[str, Any]) -> str:
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since "
          f"{holder.get('since', '?')}")


class WorkdirLock:
  """Context manager: holds `{workdir}/.lock` (see the module docstring) while open.

  Raises (on entry):
    WorkdirLockedError: a live run holds it.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self.enabled = enabled
    self._fd: int | None = None
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  def _read_holder(self) -> dict[str, Any]:
    try:
      with open(self.path, encoding="utf-8") as f:
        text = f.read().strip()
      return json.loads(text) if text else {}
    except (OSError, ValueError):
      return {}  # gone or half-written: no usable record

  def _refuse(self, holder: dict[str, Any]) -> WorkdirLockedError:
    who = _describe(holder) if holder else "another process (no record written yet)"
    return WorkdirLockedError(
        f"workdir {self.workdir} is in use by {who} ({self.path}); wait for that run to end or "
        "stop it, or use another --workdir")

  def _stale(self, holder: dict[str, Any], os_locked: bool) -> bool:
    """Whether an existing holder record belongs to a run that no longer holds the workdir."""
    if holder.get("host") == socket.gethostname():
      # On one host the OS lock is exact; without it, a dead pid is the evidence.
      return os_locked or not _pid_alive(int(holder.get("pid", -1)))
    try:
      age = time.time() - os.stat(self.path).st_mtime
    except OSError:
      return True
    return age > STALE_AFTER_S

  def acquire(self) -> None:
    if not self.enabled or self._fd is not None:
      return
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os_locked = True
      except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise self._refuse(self._read_holder()) from None
        # ENOLCK / EOPNOTSUPP: a filesystem without flock; the record alone decides.
        logging.warning("%s: no OS file lock here (%s); relying on the holder record",
                        self.path, e)
        os_locked = False
      holder = self._read_holder()
      if holder:
        if not self._stale(holder, os_locked):
          raise self._refuse(holder)
        logging.warning("took over the stale lock of %s (%s)", _describe(holder), self.path)
      record = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds")}
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
      os.fsync(fd)
    except BaseException:
      os.close(fd)  # closing drops the OS lock too
      raise
    self._fd = fd
    self._stop.clear()
    self._heartbeat = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                       daemon=True)
    self._heartbeat.start()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError as e:  # a flaky shared filesystem must not end the run
        logging.warning("could not touch %s: %s", self.path, e)

  def release(self) -> None:
    if self._fd is None:
      return
    self._stop.set()
    if self._heartbeat is not None:
      self._heartbeat.join()
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)  # an empty record: free
    finally:
      os.close(fd)

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()
