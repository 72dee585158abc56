"""Files on disk: the one atomic write and the one cache root of ternbench.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> p = Path(tempfile.mkdtemp()) / "sub" / "a.txt"
    >>> atomic_write(p, b"hello")
    >>> p.read_bytes()
    b'hello'
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "cache_root"]


def atomic_write(path: str | os.PathLike[str], data: bytes | Callable[[Path], object], *,
                 mode: int = 0o644) -> None:
    """Write ``path`` so that readers never see half a file: a temp file in the same folder,
    fsync, ``os.replace``.

    ``data`` is the content, or a function that writes the temp path it is given (a
    safetensors ``save_file``, ``torch.save``, a compiler's ``-o``, ``shutil.copyfile``).
    The file gets ``mode`` (mkstemp's 0600 would hide results from other users; executables
    pass 0o755). On failure (a full disk, a writer that raises) the previous file, if any, is
    left as it was and no temp file remains. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if callable(data):
            os.close(fd)
            fd = -1
            data(Path(tmp))
            fd = os.open(tmp, os.O_RDONLY)  # fsync what the writer left there
        else:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def cache_root() -> Path:
    """The ternbench cache folder: ``$TERNBENCH_CACHE``, else ``$XDG_CACHE_HOME/ternbench``,
    else ``~/.cache/ternbench`` (FP32 baselines at the top, ``tuning/``, ``arm/`` below)."""
    env = os.environ.get("TERNBENCH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ternbench"
