"""goleash's caches on disk (compiled BPF images, `goleash check`'s probe sites):
where they live and the rules every one of them follows.

They are read as root, and what they hold decides where probes go: only a directory
and files we own and nobody else can write are trusted (a file another user could
plant would be loaded as root). Writes are atomic, so a concurrent run never sees
half a file, and each cache is bounded by its caller."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """$XDG_CACHE_HOME/goleash/KIND, else /var/cache/goleash/KIND for root (the node's
    cache), else ~/.cache/goleash/KIND."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "goleash" / kind
    if os.geteuid() == 0:
        return Path("/var/cache/goleash") / kind
    return Path.home() / ".cache" / "goleash" / kind


def trusted_dir(path: Path) -> bool:
    """A directory (not a link) only we can write."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def read_trusted(path: Path, max_bytes: int) -> bytes:
    """PATH's bytes when only we could have written it; OSError saying why not
    (FileNotFoundError when it is not there)."""
    if not trusted_dir(path.parent):
        raise PermissionError(f"{path.parent} is writable by others (or not ours): not trusted")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise PermissionError(f"{path} is not a regular file only we can write")
        if st.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"{st.st_size} bytes, more than a cache file holds")
        return f.read(max_bytes)


def write_atomic(path: Path, text: str, keep: int, family: str) -> None:
    """Write TEXT to PATH (a temporary file renamed over it), then keep only the
    newest KEEP files of the directory matching the glob FAMILY. OSError when the
    directory cannot be made ours or written."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not trusted_dir(path.parent):
        raise OSError(f"{path.parent} is writable by others")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    mtimes: list[tuple[float, Path]] = []
    for p in path.parent.glob(family):
        try:
            mtimes.append((p.stat().st_mtime, p))
        except OSError:
            continue  # removed by a concurrent run
    for _, old in sorted(mtimes)[: max(0, len(mtimes) - keep)]:
        old.unlink(missing_ok=True)
