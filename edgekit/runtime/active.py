"""The device's active model: the pointer the agent writes (device_agents/slots.py) and the model apps follow."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.errors import BundleError, RuntimeUnavailableError
from edgekit.manifest import Manifest
from edgekit.runtime.base import LocalModel
from edgekit.runtime.loader import load

__all__ = ["ACTIVE_POINTER", "ActiveModel", "ActivePointer", "load_active", "read_active_pointer"]


ACTIVE_POINTER = "active.json"
"""Inside an agent data dir: ``{"sha256", "name", "version", "bundle": "models/<sha256>/bundle", "previous", ...}``,
replaced only by an atomic rename, so a reader sees the old or the new pointer, never a mix."""


@dataclass(frozen=True)
class ActivePointer:
    """Which bundle is active in an agent data dir."""

    sha256: str
    name: str
    version: str
    bundle: Path
    stamp: tuple[int, int]
    """(inode, mtime_ns) of the pointer file: changes with every switch."""


def read_active_pointer(data_dir: str | os.PathLike[str]) -> ActivePointer | None:
    """The active model of an agent data dir, or None when no model is active."""
    path = Path(data_dir) / ACTIVE_POINTER
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())  # the stamp of the very file read, even if a switch renames over it now
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError:
        raise BundleError(f"{path}: unreadable active-model pointer", "Run 'edgekit agent status'; the agent rewrites it.") from None
    if not data.get("sha256"):
        return None
    return ActivePointer(data["sha256"], data.get("name", ""), data.get("version", ""), Path(data_dir) / data["bundle"], (st.st_ino, st.st_mtime_ns))


def _pointer_stamp(data_dir: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(data_dir / ACTIVE_POINTER)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


class ActiveModel(LocalModel):
    """The model active in an agent data dir; follows the agent's switches without a restart.

    Every ``check_interval_s`` a ``predict`` stats the pointer file (a few microseconds); when the
    agent has switched models, the new one is loaded before that prediction. ``sha256`` and
    ``version`` name the model that answered the last call.
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, num_threads: int | None = None, check_interval_s: float = 1.0) -> None:
        self.data_dir = Path(data_dir)
        self.check_interval_s = check_interval_s
        self._threads = num_threads
        self._lock = threading.Lock()
        self._model: LocalModel | None = None
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self.sha256: str | None = None
        self.version: str | None = None
        self._reload()

    def _reload(self) -> None:
        ptr = read_active_pointer(self.data_dir)
        if ptr is None:
            self._model, self.sha256, self.version, self.manifest = None, None, None, None
            self._stamp = _pointer_stamp(self.data_dir)
            raise RuntimeUnavailableError(f"{self.data_dir}: no model is active on this device",
                                          "Install one with 'edgekit agent install' or wait for the fleet to assign one.")
        model = load(ptr.bundle, num_threads=self._threads)
        self._model, self._stamp = model, ptr.stamp
        self.sha256, self.version, self.manifest = ptr.sha256, ptr.version, model.manifest
        self.runtime, self.delegate, self.inputs, self.outputs = model.runtime, model.delegate, model.inputs, model.outputs

    def refresh(self) -> bool:
        """Load the newly active model if the agent switched; True when it did."""
        self._checked = time.monotonic()
        if _pointer_stamp(self.data_dir) == self._stamp and self._model is not None:
            return False
        with self._lock:
            if _pointer_stamp(self.data_dir) != self._stamp or self._model is None:
                self._reload()
                return True
        return False

    def snapshot(self) -> tuple[LocalModel | None, Manifest | None, str | None, str | None]:
        """The loaded model with its manifest, sha256 and version, read together (never a mix across a switch)."""
        with self._lock:
            return self._model, self.manifest, self.sha256, self.version

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if time.monotonic() - self._checked >= self.check_interval_s:
            self.refresh()
        model = self._model
        if model is None:
            raise RuntimeUnavailableError(f"{self.data_dir}: no model is active on this device", "Wait for the agent to activate one.")
        return model.run(feeds)

    def predict(self, x: np.ndarray) -> np.ndarray:
        if time.monotonic() - self._checked >= self.check_interval_s:
            self.refresh()
        model = self._model
        if model is None:
            raise RuntimeUnavailableError(f"{self.data_dir}: no model is active on this device", "Wait for the agent to activate one.")
        return model.predict(x)

    def predict_raw(self, raw: np.ndarray) -> np.ndarray:
        if time.monotonic() - self._checked >= self.check_interval_s:
            self.refresh()
        if self._model is None:
            raise RuntimeUnavailableError(f"{self.data_dir}: no model is active on this device", "Wait for the agent to activate one.")
        return self._model.predict_raw(raw)


def load_active(data_dir: str | os.PathLike[str], *, num_threads: int | None = None, check_interval_s: float = 1.0) -> ActiveModel:
    """Load the model the device agent made active in ``data_dir``; it follows later switches by itself."""
    return ActiveModel(data_dir, num_threads=num_threads, check_interval_s=check_interval_s)
