"""The one output policy of every tool that writes: nothing an input or a user's file is ever overwritten or deleted.

Three rules, each refused before any work with one line that names the paths and the flags concerned:

1. **One run per output folder.** A run holds the lock on its output folder for its whole life
   (`evit_hf.run_lock.OutputDirLock`, released by the system when the process ends, even killed); a second run into
   it is refused at once (`OutputDirInUse`).
2. **Outputs apart from inputs.** No output may be, lie inside, or contain an input of the same run (the starting
   model folder, a teacher, an image or data folder, a checkpoint file being converted, an image being visualized):
   `check_outputs_apart_from_inputs`. Paths are compared as the file system resolves them (relative paths, symbolic
   links); an input that names no local path (a Hub id) is no input path.
3. **Only this project's files.** A manifest, `.evit-outputs.json` beside the lock, lists the top-level entries of the
   folder that runs of this project wrote. A run overwrites or deletes only those. A folder holding other entries (a
   user's `README.md`, a `config.json` with no weights) is refused, naming them; the lock, the manifest and an empty
   folder are fine. `OutputFolder.clear()` (`--overwrite_output_dir`) deletes only the listed entries.

How a run records what it writes: before any work, `acquire()` adds the names the run may write (`claims`: exact
names or `fnmatch` patterns such as `checkpoint-[0-9]*`) to the manifest, so that a run killed midway (even by
`kill -9`) leaves a folder that its rerun accepts; `release()` then lists the folder and records every entry present
that a claim matches or that appeared during the run (Trainer's `runs/`, remote-code files, cards, results). The
claims stay in the manifest: they are the names this project's runs write there. Claim exact names and narrow
patterns only (`checkpoint-[0-9]*`, never `*.json`): a user's file that a claim matches counts as the project's. A
rerun into a folder of its own earlier output is therefore allowed, and a user's other files never become "ours".

Usage, by a tool that writes into a folder of its own::

    from evit_hf.outputs import OutputFolder, check_outputs_apart_from_inputs

    check_outputs_apart_from_inputs(
        outputs=[("--output_dir", args.output_dir)],
        inputs=[("--model_name_or_path", args.model_name_or_path), ("--train_dir", args.train_dir)],
    )  # ValueError (OutputOverlapsInput), one line
    with OutputFolder(args.output_dir, "--output_dir", claims=["model.safetensors", "checkpoint-[0-9]*"]) as folder:
        # lock held; ForeignFilesError (a ValueError) raised if the folder holds files no run of this project wrote
        if args.overwrite_output_dir:
            folder.clear()  # deletes only what earlier runs recorded
        ...  # the run writes; release() at the end records what it wrote and gives the lock back

A tool that writes named files into a folder of the user's (an image beside other images) passes `shared=True`: the
folder may hold other files, and only the claimed names must be new or the project's own. Nothing here imports torch
or transformers, so that command lines check their arguments at once.
"""

import contextlib
import fnmatch
import json
import os
import shutil
from collections.abc import Iterable, Sequence

from .run_lock import LOCK_FILE, OutputDirInUse, OutputDirLock, check_output_dir


MANIFEST_FILE = ".evit-outputs.json"
# Entries of an output folder that belong to the policy itself, never to a run nor to the user.
POLICY_FILES = (LOCK_FILE, MANIFEST_FILE)
# Temporary manifest written before it replaces the real one (an interrupted write leaves the old manifest whole).
_MANIFEST_TEMPORARY = MANIFEST_FILE + ".tmp"


class OutputOverlapsInput(ValueError):
    """An output path is, lies inside, or contains an input path of the same run."""


class ForeignFilesError(ValueError):
    """The output folder holds files that no run of this project wrote there."""


def _local_path(path: str | None) -> str | None:
    """The real path of `path` when it names something on this machine, else None (a Hub id, a missing path)."""
    if not path or not os.path.lexists(path):
        return None
    return os.path.realpath(path)


def overlap(output_path: str, input_path: str) -> str | None:
    """How `output_path` and `input_path` overlap ('is', 'lies inside', 'contains'), or None when they are apart.

    The input must exist (a Hub id or a missing path is no input path); the output need not exist yet. Both are
    compared as real paths."""
    real_input = _local_path(input_path)
    if real_input is None or not output_path:
        return None
    real_output = os.path.realpath(output_path)
    if real_output == real_input:
        return "is"
    common = os.path.commonpath([real_output, real_input])
    if common == real_input:
        return "lies inside"
    if common == real_output:
        return "contains"
    return None


def check_outputs_apart_from_inputs(
    outputs: Iterable[tuple[str, str | None]], inputs: Iterable[tuple[str, str | None]]
) -> None:
    """Raises `OutputOverlapsInput` (a one-line `ValueError` naming both flags and paths) when an output path is, lies
    inside, or contains an input path. `outputs` and `inputs` are `(flag, path)` pairs; None paths are skipped."""
    inputs = [(flag, path) for flag, path in inputs if path]
    for output_flag, output_path in outputs:
        if not output_path:
            continue
        for input_flag, input_path in inputs:
            relation = overlap(output_path, input_path)
            if relation is None:
                continue
            raise OutputOverlapsInput(
                f"{output_flag} {output_path} {relation} {input_flag} {input_path}: a run never writes where its "
                f"inputs are (its files, and an overwrite, would reach them); choose an {output_flag} "
                f"apart from {input_flag}."
            )


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _shown(names: Sequence[str], limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class OutputFolder:
    """An output folder under the policy: its lock held for the run's whole life, its manifest of the project's files.

    `claims`: the names (or `fnmatch` patterns) of the top-level entries this run may write. `shared=False` (a folder
    of the run's own): every entry must be the project's. `shared=True` (named files in a user's folder): only the
    claimed names that exist must be the project's. `acquire()` refuses before any work; `release()` records what the
    run wrote. Only the process that writes takes it (in a job of several processes, the one that saves)."""

    def __init__(
        self, path: str, flag: str = "--output_dir", claims: Sequence[str] = (), shared: bool = False
    ) -> None:
        self.path = path
        self.flag = flag
        self.claims = list(claims)
        self.shared = shared
        self.manifest_path = os.path.join(path, MANIFEST_FILE)
        self._lock = OutputDirLock(path, flag)
        self._entries_at_start: set[str] = set()

    # The manifest: {"written": [names], "claimed": [patterns of runs that have not ended], "files": {folder name:
    # [paths inside it]}}: "files" lists what a run left inside each folder it wrote, so that a file put there later
    # (a user's notes in checkpoint-2/) is not taken for the project's.
    def read_manifest(self) -> dict:
        """The manifest's `written` names and `claimed` patterns (both empty for a folder without one); a one-line
        `ValueError` when it does not read, since nothing in the folder could then be told apart from a user's."""
        try:
            with open(self.manifest_path) as handle:
                manifest = json.load(handle)
        except FileNotFoundError:
            return {"written": [], "claimed": [], "files": {}}
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ValueError(
                f"{self.flag} {self.path}: its list of this project's files, {self.manifest_path}, does not read "
                f"({' '.join(str(error).split())}): move the folder's files out, or choose another {self.flag}."
            ) from None
        lists = {key: manifest.get(key, []) if isinstance(manifest, dict) else None for key in ("written", "claimed")}
        if not all(isinstance(names, list) and all(isinstance(n, str) for n in names) for names in lists.values()):
            raise ValueError(
                f"{self.flag} {self.path}: {self.manifest_path} is not a list of this project's files: move the "
                f"folder's files out, or choose another {self.flag}."
            )
        files = manifest.get("files", {})
        if not isinstance(files, dict) or not all(
            isinstance(paths, list) and all(isinstance(p, str) for p in paths) for paths in files.values()
        ):
            raise ValueError(
                f"{self.flag} {self.path}: {self.manifest_path} is not a list of this project's files: move the "
                f"folder's files out, or choose another {self.flag}."
            )
        return {**lists, "files": files}

    def _write_manifest(self, written: Iterable[str], claimed: Iterable[str], files: dict) -> None:
        written = sorted(set(written))
        manifest = {
            "written": written,
            "claimed": sorted(set(claimed)),
            "files": {name: paths for name, paths in sorted(files.items()) if name in written},
        }
        temporary = os.path.join(self.path, _MANIFEST_TEMPORARY)
        with open(temporary, "w") as handle:
            json.dump(manifest, handle, indent=1)
        os.replace(temporary, self.manifest_path)

    def entries(self) -> list[str]:
        """The folder's top-level entries, without the policy's own files."""
        if not os.path.isdir(self.path):
            return []
        return sorted(
            name for name in os.listdir(self.path) if name not in POLICY_FILES and name != _MANIFEST_TEMPORARY
        )

    def is_projects(self, name: str, manifest: dict | None = None) -> bool:
        """Whether the top-level entry `name` was written by a run of this project (listed, or claimed by a run that
        did not end)."""
        manifest = self.read_manifest() if manifest is None else manifest
        return name in manifest["written"] or _matches(name, manifest["claimed"])

    def _files_inside(self, name: str) -> list[str]:
        """The paths of the files (and links) inside the top-level folder `name`, relative to it."""
        top = os.path.join(self.path, name)
        return sorted(
            os.path.relpath(os.path.join(folder, entry), top)
            for folder, folders, files in os.walk(top)
            for entry in files + [f for f in folders if os.path.islink(os.path.join(folder, f))]
        )

    def _is_folder(self, name: str) -> bool:
        path = os.path.join(self.path, name)
        return os.path.isdir(path) and not os.path.islink(path)

    def foreign_files(self) -> list[str]:
        """The entries that no run of this project wrote, and the files put inside a folder a run wrote after that
        run ended: with `shared`, only among the claimed names."""
        manifest = self.read_manifest()
        entries = self.entries()
        if self.shared:
            entries = [name for name in entries if _matches(name, self.claims)]
        foreign = []
        for name in entries:
            if not self.is_projects(name, manifest):
                foreign.append(name)
            elif name in manifest["files"] and self._is_folder(name):
                recorded = set(manifest["files"][name])
                foreign += [f"{name}/{path}" for path in self._files_inside(name) if path not in recorded]
        return foreign

    def check_no_foreign_files(self) -> None:
        """Raises `ForeignFilesError`, naming the files, when the folder holds entries that are not the project's."""
        foreign = self.foreign_files()
        if not foreign:
            return
        what = "would overwrite" if self.shared else "holds"
        raise ForeignFilesError(
            f"{self.flag} {self.path} {what} files that no run of this project wrote there ({_shown(foreign)}): "
            f"move them out, or choose another {self.flag} (an empty or new folder, or one of an earlier run's)."
        )

    def acquire(self) -> "OutputFolder":
        """Takes the lock (`OutputDirInUse` when another run holds it), refuses a folder holding other files, and
        records this run's claims. Raises before anything but the lock is written."""
        if self._lock.held:
            return self
        check_output_dir(self.path, self.flag)
        self._lock.acquire()
        try:
            self.check_no_foreign_files()
            self._entries_at_start = set(self.entries())
            manifest = self.read_manifest()
            if self.claims:
                self._write_manifest(manifest["written"], manifest["claimed"] + self.claims, manifest["files"])
        except BaseException:
            self._lock.release()
            raise
        return self

    def record(self, *names: str) -> None:
        """Adds top-level entries to the manifest as written by this project (a file a run writes outside `claims`)."""
        manifest = self.read_manifest()
        self._write_manifest(manifest["written"] + list(names), manifest["claimed"], manifest["files"])

    def clear(self) -> list[str]:
        """Deletes the entries that earlier runs of this project wrote (`--overwrite_output_dir`); returns their
        paths. Entries not in the manifest are never touched."""
        manifest = self.read_manifest()
        deleted = []
        for name in self.entries():
            if not self.is_projects(name, manifest):
                continue
            path = os.path.join(self.path, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            deleted.append(path)
        remaining = set(self.entries())
        self._write_manifest(
            [n for n in manifest["written"] if n in remaining], manifest["claimed"], manifest["files"]
        )
        self._entries_at_start &= remaining
        return deleted

    def release(self) -> None:
        """Records what the run wrote (claimed entries present now, and entries that appeared during the run) and
        gives the lock back. A run that wrote nothing into a folder it created leaves no folder."""
        if not self._lock.held:
            return
        try:
            manifest = self.read_manifest()
            claims = manifest["claimed"] + self.claims
            # In a folder of the run's own, whatever appeared during the run is the run's (Trainer's runs/, cards);
            # in a user's folder, only what the run claimed.
            written = [
                name
                for name in self.entries()
                if name in manifest["written"]
                or _matches(name, claims)
                or (not self.shared and name not in self._entries_at_start)
            ]
            if self.entries():
                files = {name: self._files_inside(name) for name in written if self._is_folder(name)}
                self._write_manifest(written, claims, files)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.manifest_path)
        finally:
            self._lock.release()

    @property
    def held(self) -> bool:
        return self._lock.held

    def __enter__(self) -> "OutputFolder":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


__all__ = [
    "MANIFEST_FILE",
    "POLICY_FILES",
    "ForeignFilesError",
    "OutputDirInUse",
    "OutputFolder",
    "OutputOverlapsInput",
    "check_output_dir",
    "check_outputs_apart_from_inputs",
    "overlap",
]
