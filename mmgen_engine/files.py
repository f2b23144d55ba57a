"""Opening files a user names: only regular files are read.

A FIFO or a device (``/dev/zero``) given where a checkpoint file, an image or a JSON file is expected
would block the open or be read forever; :func:`open_regular_file` opens non-blocking and checks the
open descriptor, so such a path is refused at once with one line.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import InputError, MMGenError


def open_regular_file(path: Path, what: str, error: type[MMGenError] = InputError) -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file; otherwise ``error`` naming it and
    ``what`` it should be (e.g. "image file")."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, ValueError) as e:  # permissions, a name too long, an embedded NUL, ...
        raise error(f"{path}: cannot open the {what} ({getattr(e, 'strerror', None) or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, socket or device"
        raise error(f"{path}: not a regular file ({kind}); expected the {what}")
    return os.fdopen(fd, "rb")
