"""File output: atomic writes, and output paths checked before any work starts.

A reader never sees a half-written file and a crash loses nothing: every writer goes through
:func:`atomic_path`, which writes ``.NAME.mitotype-tmp-PID-XXXX.SUFFIX`` beside the target and renames
it into place. A process killed with SIGKILL leaves that temporary behind; the next write of the
same target removes the ones whose process is gone. A failed write (full disk, read-only or
unwritable folder) becomes a one-line :class:`MitotypeError` and leaves the previous file as it was.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from mitotype.errors import MitotypeError

if TYPE_CHECKING:
    import pandas

TMP_MARK = ".mitotype-tmp-"


@functools.lru_cache(maxsize=1)
def process_umask() -> int:
    """The process umask, read on first use (importing mitotype changes no process state).

    Linux reports it in /proc/self/status; elsewhere it is read by setting and restoring it once.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_name(path: Path) -> str:
    return f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{path.suffix}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's live process
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete temporaries of ``path`` left by writers that no longer run (killed mid-write)."""
    path = Path(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{_glob_escape(path.name)}{TMP_MARK}*"):
        pid_text = tmp.name[len(path.name) + 1 + len(TMP_MARK):].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _write_error(path: Path, err: OSError) -> MitotypeError:
    reason = err.strerror or str(err) or type(err).__name__
    return MitotypeError(f"could not write {path} ({reason}); nothing was replaced")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    An ``OSError`` while writing (ENOSPC, EACCES, EROFS...) becomes a one-line MitotypeError naming
    ``path``; the temporary is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    tmp = path.parent / _tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~process_umask())
        os.close(fd)
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def write_csv(path: str | os.PathLike, df: "pandas.DataFrame") -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """Refuse, before any work, a file output that could not be written: an existing folder, a
    parent that is a file or cannot be created, a folder we may not write in. ``option`` names the
    parameter (the CLI shows its flag)."""
    path = Path(path)
    if path.is_dir():
        raise MitotypeError(f"{{{option}}} {path}: is a folder; expected a file path", options=(option,))
    _check_writable_ancestor(path.parent, path, option)
    return path


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """Like :func:`check_output_file` for an output folder: it must be a folder or creatable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MitotypeError(f"{{{option}}} {path}: is a file; expected a folder", options=(option,))
    _check_writable_ancestor(path, path, option)
    return path


def _check_writable_ancestor(folder: Path, target: Path, option: str) -> None:
    """The nearest existing ancestor of ``folder`` must be a folder we can create files in (probed)."""
    existing = folder.absolute()
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise MitotypeError(f"{{{option}}} {target}: {existing} is a file, not a folder", options=(option,))
    reason = "" if os.access(existing, os.W_OK | os.X_OK) else os.strerror(errno.EACCES)
    if not reason:
        probe = existing / f".probe{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            probe.unlink()
        except OSError as err:
            reason = err.strerror or type(err).__name__
    if reason:
        raise MitotypeError(f"{{{option}}} {target}: cannot write in {existing} ({reason})", options=(option,))


def code_revision() -> dict[str, str | None]:
    """What code made an artifact: the package version (raised when behaviour changes) and, when
    mitotype runs from a git checkout (an editable install), its commit, marked ``-dirty`` when
    tracked files differ from it. No git, or an installed wheel: ``git_commit`` is None."""
    import subprocess

    import mitotype

    root = Path(mitotype.__file__).resolve().parents[2]
    commit: str | None = None
    if (root / ".git").exists():
        try:
            run = lambda *args: subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)  # noqa: E731
            head = run("rev-parse", "HEAD")
            if head.returncode == 0:
                commit = head.stdout.strip() + ("-dirty" if run("diff", "--quiet", "HEAD", "--", "src").returncode else "")
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"mitotype_version": mitotype.__version__, "git_commit": commit}

