"""Helpers for one-line error messages, shared by the command line and the benchmark (no torch, no transformers)."""

import os
import tempfile


def one_line(error: BaseException) -> str:
    """An exception's message on one line (transformers and huggingface_hub messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def writable_folder_problem(folder: str) -> str | None:
    """Why files cannot be written into `folder` (created if missing), or None if they can.

    The nearest existing folder on the way is tried with a file created and removed at once: permissions alone miss
    read-only file systems and the folders even root cannot write in (/proc)."""
    folder = os.path.abspath(folder or ".")
    existing = folder
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {existing}"
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".evit-hf-write-test-")
    except OSError as error:
        return f"cannot create files in {existing} ({error.strerror or type(error).__name__})"
    os.close(handle)
    os.remove(probe)
    return None


__all__ = ["one_line", "writable_folder_problem"]
