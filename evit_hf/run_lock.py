"""One run at a time per output folder: an advisory lock that the operating system releases when its process ends.

The lock is `fcntl.flock` on a file in the folder, holding the holder's pid and host. A process that dies, even by
`kill -9`, drops the lock with its file descriptors, so a lock is never stale: the file a killed run leaves behind is
taken over by the next run at once.

Some file systems refuse `flock` (NFS without a lock daemon answers `ENOLCK`, some FUSE and network mounts
`EOPNOTSUPP`). There the lock is the file itself: a run creates it exclusively (`O_CREAT | O_EXCL`) with its pid and
host, and removes it when it ends. A file left by a run that was killed names a process that no longer runs on this
host: the next run takes it over. A file naming another host cannot be checked from here: the run is refused with the
holder's name and the path to delete once that run is gone.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
import time


LOCK_FILE = ".evit-run.lock"


class OutputDirInUse(ValueError):
    """Another process holds the lock on the output folder."""


def check_output_dir(output_dir: str, flag: str = "--output_dir") -> None:
    """Raises a one-line `ValueError` naming `flag` unless `output_dir` is, or can be created as, a writable folder.

    Nothing is created: the nearest existing folder on the path gets a temporary file, removed at once, which answers
    for permissions and read-only file systems alike (root passes permission bits, not a read-only mount)."""
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {output_dir} is a file, not a folder: pass a folder path.")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag} {output_dir} cannot be created: {existing} is a file. Pass a folder path.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(
            f"{flag} {output_dir} is not writable ({existing}: {error.strerror}): choose a folder you can write to."
        ) from None


# errno values of a file system that has no `flock`, as opposed to a lock held by another process.
FLOCK_UNSUPPORTED = frozenset(
    code for code in (errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", None), errno.ENOSYS) if code
)
# On a file system without `flock`, a lock file without a readable holder is one that its creator has not written yet,
# unless it is older than this (its creator was killed between creating and writing it).
UNWRITTEN_LOCK_GRACE_SECONDS = 10.0


def _read_holder(lock_path: str) -> dict | None:
    """The holder's `{"pid", "host"}` as its lock file tells, or None while (or if) it names nobody."""
    try:
        with open(lock_path) as handle:
            holder = json.load(handle)
        return {"pid": int(holder["pid"]), "host": str(holder["host"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _holder(lock_path: str) -> str:
    """Who holds the lock, as its file tells."""
    holder = _read_holder(lock_path)
    if holder is None:
        return "a process that has not written its pid yet"
    return f"pid {holder['pid']} on {holder['host']}"


def _runs_here(pid: int) -> bool:
    """Whether process `pid` runs on this host (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# Lock files this process holds without flock, by real path: a file naming this process that is not among them was
# left by an earlier process that had the same pid (a container restarted with the same host name).
_HELD_WITHOUT_FLOCK: set[str] = set()


def _holder_record() -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()


class OutputDirLock:
    """An exclusive lock on `output_dir`, taken at once or refused with `OutputDirInUse`.

    `acquire()` creates the folder if needed; `release()` (or the end of the process) gives the lock back, and removes
    the folder again if it created it and nothing was written there. Only the
    processes that write into the folder take it: in a job of several processes, the one that saves. On a file system
    without `flock` the lock file itself is the lock (see the module's documentation); `uses_flock` says which.
    """

    def __init__(self, output_dir: str, flag: str = "--output_dir"):
        self.output_dir = output_dir
        self.flag = flag
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._descriptor = None
        self._created_folder = False
        self.uses_flock = True

    def _in_use(self, holder: str) -> OutputDirInUse:
        return OutputDirInUse(
            f"{self.flag} {self.output_dir} is in use by another run ({holder}, lock {self.path}): wait for it to "
            f"end, or choose another {self.flag}."
        )

    def acquire(self) -> "OutputDirLock":
        if self._descriptor is not None:
            return self
        self._created_folder = not os.path.isdir(self.output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        while True:
            descriptor, created = self._open_lock_file()
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in FLOCK_UNSUPPORTED:
                    return self._acquire_without_flock(descriptor, created)
                os.close(descriptor)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise self._in_use(_holder(self.path)) from None
            # A holder that was releasing may have removed the file between our open and our lock: then we hold a
            # lock on a file nobody else will open. Start again on the file that the path names now.
            if self._names(descriptor):
                break
            os.close(descriptor)
        self._write_holder(descriptor)
        return self

    def _names(self, descriptor: int) -> bool:
        """Whether the lock path still names the file open as `descriptor`."""
        try:
            return os.stat(self.path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            return False

    def _write_holder(self, descriptor: int) -> None:
        # Truncated first: an earlier holder's record may be longer than this one, and the rest of it would make the
        # file name nobody.
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, _holder_record(), 0)
        self._descriptor = descriptor

    def _acquire_without_flock(self, descriptor: int, created: bool) -> "OutputDirLock":
        """The lock on a file system without `flock`: the file this run created exclusively is the lock."""
        self.uses_flock = False
        while not created:
            self._take_over_if_stale(descriptor)  # closes it; raises while its holder runs
            descriptor, created = self._open_lock_file()
        self._write_holder(descriptor)
        _HELD_WITHOUT_FLOCK.add(os.path.realpath(self.path))
        return self

    def _open_lock_file(self) -> tuple[int, bool]:
        """The lock file, open for reading and writing, and whether this call created it."""
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    return os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:  # removed by a holder that was releasing: create it again
                    continue

    def _take_over_if_stale(self, descriptor: int) -> None:
        """Removes the lock file open as `descriptor` when its holder is gone (a process of this host that no longer
        runs, or no record long after its creation); raises `OutputDirInUse` otherwise. The file is closed."""
        try:
            holder = _read_holder(self.path)
            if holder is None:
                if time.time() - os.fstat(descriptor).st_mtime < UNWRITTEN_LOCK_GRACE_SECONDS:
                    raise self._in_use(_holder(self.path))
            elif holder["host"] != socket.gethostname():
                raise OutputDirInUse(
                    f"{self.flag} {self.output_dir} is in use by another run (pid {holder['pid']} on "
                    f"{holder['host']}, lock {self.path}; this file system has no flock, so a run on another host "
                    f"cannot be checked from here): wait for it to end, or delete {self.path} if it is gone, or "
                    f"choose another {self.flag}."
                )
            elif holder["pid"] == os.getpid():
                if os.path.realpath(self.path) in _HELD_WITHOUT_FLOCK:
                    raise self._in_use(_holder(self.path))
            elif _runs_here(holder["pid"]):
                raise self._in_use(_holder(self.path))
            # Stale: removed only if the path still names the file read, not one a faster run has just created.
            if self._names(descriptor):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
        finally:
            os.close(descriptor)

    def release(self) -> None:
        if self._descriptor is None:
            return
        # Removed while still locked, so no other run can lock this file and then find it gone. Without flock, only
        # the file this run created: never one that another run has put at the path since (nor is that run's hold
        # forgotten: in this process, it would be taken for a stale one).
        if self.uses_flock or self._names(self._descriptor):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            if not self.uses_flock:
                _HELD_WITHOUT_FLOCK.discard(os.path.realpath(self.path))
        os.close(self._descriptor)
        self._descriptor = None
        if self._created_folder:
            # A run that stopped before writing anything leaves no empty folder behind (rmdir fails on a full one).
            with contextlib.suppress(OSError):
                os.rmdir(self.output_dir)

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


__all__ = ["LOCK_FILE", "OutputDirInUse", "OutputDirLock", "check_output_dir"]
