"""One run at a time per output folder: an advisory lock that the operating system releases when its process ends.

The lock is `fcntl.flock` on a file in the folder, holding the holder's pid and host. A process that dies, even by
`kill -9`, drops the lock with its file descriptors, so a lock is never stale: the file a killed run leaves behind is
taken over by the next run at once.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile


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


def _holder(lock_path: str) -> str:
    """Who holds the lock, as its file tells."""
    try:
        with open(lock_path) as handle:
            holder = json.load(handle)
        return f"pid {holder['pid']} on {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its pid yet"


class OutputDirLock:
    """An exclusive lock on `output_dir`, taken at once or refused with `OutputDirInUse`.

    `acquire()` creates the folder if needed; `release()` (or the end of the process) gives the lock back, and removes
    the folder again if it created it and nothing was written there. Only the
    processes that write into the folder take it: in a job of several processes, the one that saves.
    """

    def __init__(self, output_dir: str, flag: str = "--output_dir"):
        self.output_dir = output_dir
        self.flag = flag
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._descriptor = None
        self._created_folder = False

    def acquire(self) -> "OutputDirLock":
        if self._descriptor is not None:
            return self
        self._created_folder = not os.path.isdir(self.output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(descriptor)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputDirInUse(
                    f"{self.flag} {self.output_dir} is in use by another run ({_holder(self.path)}, lock "
                    f"{self.path}): wait for it to end, or choose another {self.flag}."
                ) from None
            # A holder that was releasing may have removed the file between our open and our lock: then we hold a
            # lock on a file nobody else will open. Start again on the file that the path names now.
            try:
                if os.stat(self.path).st_ino == os.fstat(descriptor).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(descriptor)
        os.ftruncate(descriptor, 0)
        os.write(descriptor, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        if self._descriptor is None:
            return
        # Removed while still locked, so no other run can lock this file and then find it gone.
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
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
