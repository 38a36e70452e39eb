"""The delta folder a server serves from: one sub-folder per delta, as `save_pretrained` writes
it (adapter_config.json + adapter_model.safetensors), named by the folder.

A name from a request is checked before it comes near the file system: letters, digits, `_`,
`-` and `.` only, no `..`, and it must be a folder found by the last scan whose real path lies
inside the root (a symlink out of it is not served). Scans are cheap (one directory listing and
a stat per delta): an unknown name triggers one, so new folders are served without a restart."""
from __future__ import annotations

import re
import threading
from pathlib import Path

from ..core.io import CONFIG_NAME, WEIGHTS_NAME

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


class Unusable(Exception):
    """A request that names a delta which cannot be served; `status` is the HTTP status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise Unusable(f"{name!r} is not a delta name: names are folder names made of letters, digits, '_', '-' and "
                       "'.', without '..' or path separators.", 400)


class DeltaStore:
    """The deltas found under `root`: {name: signature of its files}, rescanned on demand."""

    def __init__(self, root):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"Delta folder {str(root)!r} does not exist; create it and put one folder per "
                                    "delta in it (as save_pretrained writes them).")
        self._found: dict[str, tuple] = {}
        self._lock = threading.Lock()
        self.scan()

    def scan(self) -> dict[str, tuple]:
        found = {}
        for child in sorted(self.root.iterdir()):
            if not NAME.fullmatch(child.name) or ".." in child.name:
                continue
            try:
                real = child.resolve()
                if real.parent != self.root and self.root not in real.parents:
                    continue  # a symlink pointing out of the folder
                if (real / CONFIG_NAME).is_file():
                    found[child.name] = _signature(real)
            except OSError:
                continue
        with self._lock:
            self._found = found
        return dict(found)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._found)

    def knows(self, name: str) -> bool:
        """Whether `name` is a delta here (checked, then rescanned once if not yet seen)."""
        check_name(name)
        with self._lock:
            if name in self._found:
                return True
        return name in self.scan()

    def path(self, name: str) -> Path:
        """The delta's folder; never one outside the root (a symlink swapped in is refused)."""
        check_name(name)
        real = (self.root / name).resolve()
        if self.root not in real.parents:
            raise Unusable(f"Delta {name!r} points outside the delta folder {self.root}; it is not served.", 400)
        return real

    def signature(self, name: str) -> tuple:
        """The delta's files as they are now (size and time of change); Unusable if it is gone."""
        check_name(name)
        try:
            return _signature(self.path(name))
        except OSError:
            raise Unusable(f"Delta {name!r} is no longer in {self.root}.", 404) from None


def _signature(folder: Path) -> tuple:
    out = []
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            st = (folder / f).stat()
            out.append((f, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append((f, None, None))
    (folder / CONFIG_NAME).stat()  # the config must exist: OSError otherwise
    return tuple(out)
