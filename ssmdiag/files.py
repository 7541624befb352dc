"""Writing output files safely: atomic renames, and OS errors (full disk, read-only, a file in the way) as one line."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import SsmdiagError


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on any failure delete it.

    An interrupt or a full disk therefore never leaves half a file; OS errors become one-line SsmdiagErrors.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=suffix, dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise output_error(exc, path) from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise output_error(exc, path) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def output_error(exc: OSError, path: Path | str | None) -> SsmdiagError:
    """One user-facing error for an OS error met while writing `path` (full disk, read-only, a file in the way)."""
    where = f"'{path}'" if path is not None else "the output"
    hint = "choose another --out (the parent folder of every run)"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SsmdiagError(f"no space left on the device writing {where}", hint="free some space, or " + hint)
    if exc.errno == errno.EROFS:
        return SsmdiagError(f"cannot write {where}: the file system is read-only", hint=hint)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return SsmdiagError(f"permission denied writing {where}", hint=hint)
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return SsmdiagError(f"cannot create {where}: a file is in the way (the output path must be a folder)",
                            hint=hint)
    return SsmdiagError(f"cannot write {where}: {exc.strerror or exc}", hint=hint)
