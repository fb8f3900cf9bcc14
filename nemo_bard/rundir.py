"""Run directories and artifacts that are never half-written.

* :class:`RunLock`: one run per run directory. An exclusive ``flock`` on ``<run_dir>/.nemo_bard.lock``
  held for the life of the run (the kernel drops it when the process dies, even by SIGKILL); the file
  records pid, host, start time and command, so a second run fails at once naming the holder, and a
  lock left by a dead process on this host is taken over. A lock written from another host cannot be
  checked from here and is reported with how to clear it, unless it belongs to a SLURM job that is over
  (an earlier run of this requeued job, or a job ``squeue`` no longer lists). The holder exports ``NEMO_BARD_RUN_LOCK``
  so its torchrun workers share its lock instead of taking it again.
* :func:`atomic_directory`: write a directory under a temporary sibling name, add a completion marker,
  rename it into place; :func:`is_complete` is what resume logic checks.
* :func:`disk_full_message`: recognise a write that failed because the file system is full.

Standard library only (no torch): the front end takes the lock before any heavy import.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from nemo_bard.errors import DiskFullError, UserError

LOCK_FILE = ".nemo_bard.lock"
LOCK_ENV = "NEMO_BARD_RUN_LOCK"
COMPLETE_MARKER = ".nemo_bard_complete"
TMP_INFIX = ".tmp-"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_CHUNK = 8 * 2**20

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


class RunDirBusy(UserError):
    """Another live run holds the run directory."""


class RunDirReadOnly(UserError):
    """The run directory cannot be created or written (a read-only file system, no permission)."""


_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


# ------------------------------------------------------------------------------------------ the lock
def _proc_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _proc_start(pid)
    return start is None or now is None or now == start


def _slurm_job() -> str | None:
    """``<job id>.<restart count>`` inside a SLURM job (a requeued job keeps its id, its restart count grows)."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else None


def _gone_slurm_job(holder: dict[str, Any]) -> bool:
    """True when a lock written on another host belongs to a SLURM job that is over: an earlier run of this very
    (requeued) job, or a job ``squeue`` no longer lists."""
    theirs, ours = holder.get("slurm_job"), _slurm_job()
    if not theirs:
        return False
    if ours and theirs.split(".")[0] == ours.split(".")[0] and theirs != ours:
        return True
    try:
        out = subprocess.run(["squeue", "-h", "-j", theirs.split(".")[0], "-o", "%T"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return (out.returncode == 0 and not out.stdout.strip()) or "Invalid job id" in out.stderr


def _describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
            + (f": {holder['command']}" if holder.get("command") else ""))


class RunLock:
    """Exclusive lock on a run directory (see the module docstring). Re-entrant within a process."""

    _held: dict[str, "RunLock"] = {}

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).absolute()
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._depth = 0
        self.inherited = False

    # ------------------------------------------------------------------ helpers
    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _busy(self, holder: dict[str, Any]) -> RunDirBusy:
        hint = ""
        if holder.get("host") not in (None, socket.gethostname()):
            hint = f"; if that run is gone (its machine crashed), delete {self.path}"
        return RunDirBusy(
            f"run directory {self.run_dir} is in use by another run ({_describe(holder)}); wait for it to finish or "
            f"stop it, or give this run its own directory (paths.run_root / checkpoint.checkpoint_dir){hint}"
        )

    def _inherited_from_launcher(self) -> bool:
        """A torchrun worker of a launcher that holds this lock (``NEMO_BARD_RUN_LOCK=<path>:<pid>``)."""
        value = os.environ.get(LOCK_ENV, "")
        path, _, pid = value.rpartition(":")
        if path != str(self.path) or not pid.isdigit():
            return False
        holder = self._read()
        return holder.get("pid") == int(pid) and holder.get("host") == socket.gethostname()

    def _open(self) -> int:
        """Create the run directory and open the lock file; a read-only or unwritable place is a :class:`UserError`,
        a full disk a :class:`DiskFullError`."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            full = disk_full_message(exc, self.run_dir)
            if full is not None:
                raise DiskFullError(f"{full}: the run cannot start; free space or point paths.run_root "
                                    "(checkpoint.checkpoint_dir) elsewhere") from None
            if exc.errno not in _READ_ONLY_ERRNOS:
                raise
            where = self.run_dir
            while not where.exists() and where != where.parent:
                where = where.parent
            kind = "read-only" if exc.errno == errno.EROFS else "not writable"
            raise RunDirReadOnly(
                f"run root {where} is {kind} ({exc.strerror}), so run directory {self.run_dir} cannot be written; "
                "point paths.run_root (checkpoint.checkpoint_dir) at a writable directory"
            ) from None

    # ------------------------------------------------------------------ api
    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunDirBusy` naming the holder."""
        key = str(self.path)
        held = RunLock._held.get(key)
        if held is not None:
            held._depth += 1
            return held
        if self._inherited_from_launcher():
            self.inherited, self._depth = True, 1
            RunLock._held[key] = self
            return self
        while True:
            fd = self._open()
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy(self._read()) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the previous holder removed the file between our open and flock: retry
                os.close(fd)
                continue
            break
        holder = self._read()
        here = socket.gethostname()
        if holder.get("pid") and holder.get("host") != here and not _gone_slurm_job(holder):
            # flock does not reach across hosts on every shared file system: trust the record
            os.close(fd)
            raise self._busy(holder)
        if (holder.get("pid") and holder.get("host") == here and holder.get("pid") != os.getpid()
                and _alive(int(holder["pid"]), holder.get("start"))):
            os.close(fd)  # a live process on this host wrote it but holds no flock (a file system without flock)
            raise self._busy(holder)
        record = {"pid": os.getpid(), "host": here, "start": _proc_start(os.getpid()),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
                  "slurm_job": _slurm_job()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd, self._depth = fd, 1
        RunLock._held[key] = self
        os.environ[LOCK_ENV] = f"{self.path}:{os.getpid()}"
        return self

    def release(self) -> None:
        """Drop one level of a re-entrant hold; the outermost release removes the lock file."""
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth:
            return
        RunLock._held.pop(str(self.path), None)
        if self._fd is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
            if os.environ.get(LOCK_ENV, "").startswith(f"{self.path}:"):
                os.environ.pop(LOCK_ENV, None)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_run_dir_free(run_dir: str | Path) -> None:
    """Raise :class:`RunDirBusy` if a live run holds ``run_dir`` (takes and drops the lock)."""
    RunLock(run_dir).acquire().release()


# -------------------------------------------------------------------------------- atomic artifacts
def is_complete(path: str | Path) -> bool:
    """True when ``path`` is a directory finished by :func:`atomic_directory` (it holds the marker)."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def remove_stale_temporaries(dst: str | Path) -> None:
    """Remove ``<dst>.tmp-*`` siblings left by an interrupted write (call while holding the run lock)."""
    dst = Path(dst)
    if dst.parent.is_dir():
        for p in dst.parent.glob(f"{dst.name}{TMP_INFIX}*"):
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def atomic_directory(dst: str | Path, *, replace: bool = False, marker: dict[str, Any] | None = None,
                     checksums: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``dst`` to write into; on success add the completion marker and
    rename it to ``dst``. On error the temporary is removed and ``dst`` is untouched.

    ``dst`` must not exist or be an empty directory, unless ``replace`` (then an existing ``dst`` is
    replaced once the new one is complete). ``checksums``: the marker records the size and sha256 of every
    weight file written (``files``; :func:`nemo_bard.models.verify.verify_model_dir` checks them on load).
    """
    dst = Path(dst).absolute()
    if dst.exists() and not replace and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}{TMP_INFIX}{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        record = {"completed": time.strftime("%Y-%m-%d %H:%M:%S"), **(marker or {})}
        if checksums:
            record["files"] = weight_checksums(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(record) + "\n")
        if dst.exists() and (replace or not any(dst.iterdir())):
            old = dst.with_name(f"{dst.name}{TMP_INFIX}old-{uuid.uuid4().hex[:8]}")
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------- disk full
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded")
# torch's zip writer reports a failed write only as a position mismatch
_WRITE_FAILED_TEXT = ("unexpected pos",)
LOW_SPACE_BYTES = 64 * 2**20


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (~1 GB/s on a 2-core CPU, see :mod:`nemo_bard.models.verify`)."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def weight_checksums(model_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{file name: {"size", "sha256"}}`` of the weight files (safetensors and their index) of a directory being
    written; recorded in its completion marker."""
    d = Path(model_dir)
    names = sorted(p.name for p in d.glob("*.safetensors"))
    if (d / SAFETENSORS_INDEX).is_file():
        names.append(SAFETENSORS_INDEX)
    return {name: {"size": (d / name).stat().st_size, "sha256": file_sha256(d / name)} for name in names}


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system holding ``path`` (its nearest existing parent), or None."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_full_message(exc: BaseException, path: str | Path) -> str | None:
    """``"no space left on <path> ..."`` when ``exc`` (or its cause chain, or the per-rank failures of torch's
    ``CheckpointException``) is a write that failed because the file system is full, else None."""
    chain, seen, todo = [], set(), [exc]
    while todo:
        exc = todo.pop()
        while exc is not None and id(exc) not in seen:
            chain.append(exc)
            seen.add(id(exc))
            failures = getattr(exc, "failures", None)  # torch.distributed.checkpoint: {rank: (exception, trace)}
            if isinstance(failures, dict):
                todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
            exc = exc.__cause__ or exc.__context__
    full = any(isinstance(e, OSError) and e.errno in _FULL_ERRNOS for e in chain)
    full = full or any(t in str(e) for e in chain for t in _FULL_TEXT)
    free = free_bytes(path)
    write_failed = any(t in str(e) for e in chain for t in _WRITE_FAILED_TEXT)
    if not full and not (write_failed and free is not None and free < LOW_SPACE_BYTES):
        return None
    shown = f" ({free / 2**20:.0f} MiB free)" if free is not None else ""
    return f"no space left on {path}{shown}"


__all__ = [
    "COMPLETE_MARKER",
    "LOCK_ENV",
    "LOCK_FILE",
    "RunDirBusy",
    "RunDirReadOnly",
    "RunLock",
    "atomic_directory",
    "check_run_dir_free",
    "disk_full_message",
    "file_sha256",
    "free_bytes",
    "is_complete",
    "remove_stale_temporaries",
    "weight_checksums",
]
