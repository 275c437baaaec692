"""training/workdir_lock.py and outer_loop.open_run / open_writer: one run per workdir, and
resumes that may change only what a running run can change."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from configs import pretrain
from configs.run_layout import CONFIG_FILE, LOCK_FILE, read_config_history, read_run_config
from training import workdir_lock
from training.outer_loop import ConfigChangeError, open_run, open_writer
from training.workdir_lock import WorkdirLock, WorkdirLockedError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Takes the lock, says so, then holds it until killed or until stdin closes.
HOLDER = """
import sys
from training.workdir_lock import WorkdirLock
with WorkdirLock(sys.argv[1]):
  print("locked", flush=True)
  sys.stdin.read()
"""
TAKER = """
import sys
from training.workdir_lock import WorkdirLock
with WorkdirLock(sys.argv[1]):
  print("took it", flush=True)
"""


def _python(code, workdir, **kwargs):
  return subprocess.Popen([sys.executable, "-c", code, workdir], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _start_holder(workdir):
  holder = _python(HOLDER, workdir, stdin=subprocess.PIPE)
  assert holder.stdout.readline() == "locked\n", holder.stderr.read()
  return holder


def _take(workdir):
  taker = _python(TAKER, workdir)
  out, err = taker.communicate(timeout=60)
  return taker.returncode, out, err


def test_a_second_process_refuses_naming_the_holder_until_it_exits(tmp_path):
  workdir = str(tmp_path / "run")
  holder = _start_holder(workdir)
  try:
    code, out, err = _take(workdir)
    assert code != 0 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"training.workdir_lock.WorkdirLockedError: workdir {workdir} is in "
                           f"use by pid {holder.pid} on host {socket.gethostname()} since 20")
    record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert record["pid"] == holder.pid and record["since"] in last
  finally:
    holder.stdin.close()  # a normal exit: the `with` releases
    holder.wait(timeout=60)
  assert holder.returncode == 0
  assert (tmp_path / "run" / LOCK_FILE).read_text() == ""  # released: an empty record
  assert _take(workdir)[:2] == (0, "took it\n")


def test_sigkill_releases_the_lock_and_the_dead_holders_record_is_taken_over(tmp_path):
  workdir = str(tmp_path / "run")
  holder = _start_holder(workdir)
  holder.kill()
  holder.wait(timeout=60)
  assert holder.returncode == -signal.SIGKILL
  assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == holder.pid
  code, out, err = _take(workdir)
  assert (code, out) == (0, "took it\n"), err
  assert f"took over the stale lock of pid {holder.pid}" in err


def _dead_pid():
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def _no_flock(monkeypatch):
  """A filesystem whose flock fails (e.g. some network filesystems): the record decides."""
  def flock(fd, op):
    del fd, op
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(workdir_lock.fcntl, "flock", flock)


def _write_record(path, **record):
  path.mkdir(exist_ok=True)
  (path / LOCK_FILE).write_text(json.dumps(record))


def test_records_decide_where_flock_does_not_work(tmp_path, monkeypatch):
  _no_flock(monkeypatch)
  host = socket.gethostname()
  # This host, dead pid: stale, taken over.
  _write_record(tmp_path, pid=_dead_pid(), host=host, since="2020-01-01T00:00:00+00:00")
  with WorkdirLock(str(tmp_path)):
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
  # This host, live pid (the test's parent): held.
  _write_record(tmp_path, pid=os.getppid(), host=host, since="2020-01-01T00:00:00+00:00")
  with pytest.raises(WorkdirLockedError, match=f"in use by pid {os.getppid()} on host {host}"):
    WorkdirLock(str(tmp_path)).acquire()
  # Another host: held while its heartbeat (the file's mtime) is recent, stale after.
  _write_record(tmp_path, pid=1, host="elsewhere", since="2020-01-01T00:00:00+00:00")
  with pytest.raises(WorkdirLockedError, match="pid 1 on host elsewhere since 2020-01-01"):
    WorkdirLock(str(tmp_path)).acquire()
  old = time.time() - workdir_lock.STALE_AFTER_S - 60
  os.utime(tmp_path / LOCK_FILE, (old, old))
  with WorkdirLock(str(tmp_path)) as lock:
    assert lock._fd is not None  # pylint: disable=protected-access


def test_another_hosts_record_refuses_even_when_flock_succeeds(tmp_path):
  # flock may be host-local on a shared filesystem: another host's fresh record still counts.
  _write_record(tmp_path, pid=1, host="elsewhere", since="2020-01-01T00:00:00+00:00")
  with pytest.raises(WorkdirLockedError, match="on host elsewhere"):
    WorkdirLock(str(tmp_path)).acquire()
  # The refusal closed its descriptor: the OS lock is free again in this process.
  (tmp_path / LOCK_FILE).write_text("")
  with WorkdirLock(str(tmp_path)), pytest.raises(WorkdirLockedError, match=f"{os.getpid()}"):
    WorkdirLock(str(tmp_path)).acquire()  # held: even by this process's other lock
  assert not WorkdirLock(str(tmp_path), enabled=False).acquire()  # other processes: no-op


def _resume(workdir, config, start, kind="decoder"):
  with open_run(config, workdir, kind):
    open_writer(config, workdir, start, kind).close()


def test_resume_with_a_changed_lr_records_history_and_config_json_holds_the_latest(tmp_path):
  workdir = str(tmp_path)
  config = pretrain.get_config("tiny")
  _resume(workdir, config, 0)
  _resume(workdir, config, 20)  # unchanged: no history
  assert read_config_history(workdir) == []
  config.optimizer.lr, config.train.steps = 1e-4, 400
  _resume(workdir, config, 20)
  history = read_config_history(workdir)
  assert len(history) == 1 and history[0]["step"] == 20
  assert history[0]["changes"] == {
      "optimizer.lr": {"old": pretrain.get_config("tiny").optimizer.lr, "new": 1e-4},
      "train.steps": {"old": pretrain.get_config("tiny").train.steps, "new": 400}}
  assert read_run_config(workdir).optimizer.lr == 1e-4
  assert (tmp_path / LOCK_FILE).read_text() == ""  # released after the run


def test_resume_with_a_changed_model_is_refused_on_one_line_before_anything_is_written(
    tmp_path):
  workdir = str(tmp_path)
  config = pretrain.get_config("tiny")
  _resume(workdir, config, 0)
  saved = (tmp_path / CONFIG_FILE).read_text()
  d_model = config.model.d_model
  config.model.d_model = 2 * d_model
  config.data.global_batch_size = 32
  with pytest.raises(ConfigChangeError) as error:
    _resume(workdir, config, 20)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(
      f"cannot resume {workdir}: changed fields fixed for a run's life: "
      f"data.global_batch_size 16 -> 32, model.d_model {d_model} -> {2 * d_model} (")
  with pytest.raises(ConfigChangeError, match='model_kind "decoder" -> "reward"'):
    _resume(workdir, pretrain.get_config("tiny"), 20, kind="reward")
  assert (tmp_path / CONFIG_FILE).read_text() == saved
  assert read_config_history(workdir) == []
  assert (tmp_path / LOCK_FILE).read_text() == ""  # the refusal released the lock
