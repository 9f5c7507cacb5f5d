"""The output-folder lock on file systems users have: with `flock`, and without it (simulated: `fcntl.flock` raises
the errno such a file system gives), where the lock file itself is the lock and a stale one is taken over."""

import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from evit_hf import run_lock
from evit_hf.run_lock import LOCK_FILE, OutputDirInUse, OutputDirLock


NO_FLOCK = [errno.ENOLCK, errno.EOPNOTSUPP]
NO_FLOCK_IDS = ["ENOLCK", "EOPNOTSUPP"]


def refuse_flock(monkeypatch, code):
    def flock(descriptor, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(run_lock.fcntl, "flock", flock)


def record(folder) -> dict:
    return json.loads((folder / LOCK_FILE).read_text())


def ours() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# Loads run_lock.py alone (not the package, which imports transformers), takes the lock (without flock when told) and
# holds it until killed.
HOLD_THE_LOCK = """
import errno, importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[2])
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
if sys.argv[3] != "flock":
    def flock(descriptor, operation):
        raise OSError(int(sys.argv[3]), os.strerror(int(sys.argv[3])))
    run_lock.fcntl.flock = flock
run_lock.OutputDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def holder_process(folder, mode):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(folder), run_lock.__file__, str(mode)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "locked\n"
    return holder


@pytest.mark.parametrize("code", NO_FLOCK, ids=NO_FLOCK_IDS)
def test_without_flock_the_lock_file_is_the_lock(tmp_path, monkeypatch, code):
    refuse_flock(monkeypatch, code)
    folder = tmp_path / "run"
    lock = OutputDirLock(str(folder)).acquire()
    assert lock.held and not lock.uses_flock
    assert record(folder) == ours()
    with pytest.raises(OutputDirInUse, match=f"in use by another run \\(pid {os.getpid()} on "):
        OutputDirLock(str(folder)).acquire()
    assert record(folder) == ours()  # the refused run left the holder's file alone
    lock.release()
    assert not folder.exists()  # nothing was written: the folder it created is gone with the lock
    with OutputDirLock(str(folder)):
        assert record(folder) == ours()
    assert not (folder / LOCK_FILE).exists()


@pytest.mark.parametrize("code", NO_FLOCK, ids=NO_FLOCK_IDS)
def test_without_flock_a_running_holder_refuses_and_a_killed_one_is_taken_over(tmp_path, monkeypatch, code):
    folder = tmp_path / "run"
    holder = holder_process(folder, code)
    try:
        refuse_flock(monkeypatch, code)
        with pytest.raises(OutputDirInUse, match=f"in use by another run \\(pid {holder.pid} on "):
            OutputDirLock(str(folder)).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert record(folder)["pid"] == holder.pid  # kill -9 left its file behind
    with OutputDirLock(str(folder)):
        assert record(folder) == ours()


@pytest.mark.parametrize(
    "left_behind, taken_over",
    [
        ("dead-process", True),
        ("this-pid-earlier", True),  # a restarted container: same pid, same host, not held by this process
        ("unwritten-old", True),
        ("unwritten-new", False),
        ("other-host", False),
    ],
)
def test_without_flock_a_stale_lock_file_is_taken_over_and_a_live_one_refused(
    tmp_path, monkeypatch, left_behind, taken_over
):
    refuse_flock(monkeypatch, errno.ENOLCK)
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / LOCK_FILE
    if left_behind == "dead-process":
        path.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    elif left_behind == "this-pid-earlier":
        path.write_text(json.dumps(ours()))
    elif left_behind == "other-host":
        path.write_text(json.dumps({"pid": os.getpid(), "host": "another-host.example"}))
    else:
        path.write_text("")
        if left_behind == "unwritten-old":
            old = time.time() - 2 * run_lock.UNWRITTEN_LOCK_GRACE_SECONDS
            os.utime(path, (old, old))
    before = path.read_text()
    if taken_over:
        with OutputDirLock(str(folder)):
            assert record(folder) == ours()
        assert not path.exists()
        return
    with pytest.raises(OutputDirInUse) as error:
        OutputDirLock(str(folder)).acquire()
    message = str(error.value)
    assert "\n" not in message and f"lock {path}" in message
    if left_behind == "other-host":
        assert f"pid {os.getpid()} on another-host.example" in message
        assert f"delete {path} if it is gone" in message
    else:
        assert "a process that has not written its pid yet" in message
    assert path.read_text() == before


def test_errors_other_than_a_missing_flock_are_not_taken_for_one(tmp_path, monkeypatch):
    refuse_flock(monkeypatch, errno.EIO)
    with pytest.raises(OSError) as error:
        OutputDirLock(str(tmp_path / "run")).acquire()
    assert error.value.errno == errno.EIO and not isinstance(error.value, OutputDirInUse)


@pytest.mark.parametrize("mode", ["flock", errno.ENOLCK], ids=["flock", "no-flock"])
def test_a_longer_stale_lock_file_is_replaced_by_the_holders_record(tmp_path, monkeypatch, mode):
    # A killed run's record, longer than the new holder's (another format, more fields): the refusal must still name
    # the holder, so the file holds the new record alone.
    folder = tmp_path / "run"
    folder.mkdir()
    stale = {"pid": dead_pid(), "host": socket.gethostname(), "command": "x" * 200}
    (folder / LOCK_FILE).write_text(json.dumps(stale))
    if mode != "flock":
        refuse_flock(monkeypatch, mode)
    with OutputDirLock(str(folder)):
        assert (folder / LOCK_FILE).read_text() == json.dumps(ours())
        with pytest.raises(OutputDirInUse, match=f"\\(pid {os.getpid()} on {socket.gethostname()}, lock "):
            OutputDirLock(str(folder)).acquire()


def test_a_flock_holder_in_another_process_is_named(tmp_path):
    folder = tmp_path / "run"
    holder = holder_process(folder, "flock")
    try:
        with pytest.raises(OutputDirInUse, match=f"in use by another run \\(pid {holder.pid} on "):
            OutputDirLock(str(folder)).acquire()
    finally:
        holder.kill()
        holder.wait()
    with OutputDirLock(str(folder)) as lock:  # the killed holder's lock went with it
        assert lock.uses_flock and record(folder) == ours()


@pytest.mark.parametrize("code", NO_FLOCK, ids=NO_FLOCK_IDS)
def test_without_flock_another_users_running_process_is_not_taken_for_gone(tmp_path, monkeypatch, code):
    # Signal 0 to another user's process is refused (EPERM): the process runs, so its lock is live.
    refuse_flock(monkeypatch, code)
    other_users_pid = dead_pid()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": other_users_pid, "host": socket.gethostname()}))
    real_kill = os.kill

    def kill(pid, signal):
        if pid == other_users_pid:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        return real_kill(pid, signal)

    monkeypatch.setattr(os, "kill", kill)
    with pytest.raises(OutputDirInUse, match=f"pid {other_users_pid} on {socket.gethostname()}"):
        OutputDirLock(str(tmp_path)).acquire()
    assert record(tmp_path)["pid"] == other_users_pid  # left in place


@pytest.mark.parametrize("code", NO_FLOCK, ids=NO_FLOCK_IDS)
def test_without_flock_a_release_leaves_the_lock_file_of_the_run_that_replaced_it(tmp_path, monkeypatch, code):
    # The first run's lock file was deleted by hand and a second run created its own: when the first run ends, the
    # second run's file stays (it is the second run's lock), until the second run ends.
    refuse_flock(monkeypatch, code)
    first = OutputDirLock(str(tmp_path)).acquire()
    os.remove(tmp_path / LOCK_FILE)
    second = OutputDirLock(str(tmp_path)).acquire()
    first.release()
    assert (tmp_path / LOCK_FILE).exists()
    with pytest.raises(OutputDirInUse):
        OutputDirLock(str(tmp_path)).acquire()
    second.release()
    assert not (tmp_path / LOCK_FILE).exists()
