"""Files written whole or not at all, readable as a plain write would leave them."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomic(path: str | Path, data: bytes) -> Path:
    """`path` holds all of `data` or is left as it was: the bytes go to a hidden file beside it, which
    is then renamed over it, so that a reader in another process (an engine cache, the random-weights
    tokenizer several processes share) never sees a cut file. A failed write (disk full) removes the
    temporary file, which for an engine is gigabytes. The file gets the umask's permissions, as a plain
    write would: mkstemp's are 0600, which made a file written by one user unreadable to another."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
