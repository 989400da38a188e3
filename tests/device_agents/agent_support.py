"""Helpers for the device-agent tests: re-signed bundle variants, the agent command line, waiting."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit import signing
from fleet_support import wait_for as _wait_for
from edgekit.bundle import GOLDEN_FILE, MANIFEST_FILE, SIGNATURE_FILE, sha256_file

ROOT = Path(__file__).resolve().parents[2]
FAST_ENV = {
    "EDGEKIT_AGENT_PROFILE_RUNS": "20",
    "EDGEKIT_AGENT_PROFILE_BUDGET_S": "0.5",
    "EDGEKIT_AGENT_PROFILE_WARMUP": "2",
    "EDGEKIT_AGENT_BACKOFF_BASE_S": "0.05",
    "EDGEKIT_AGENT_BACKOFF_MAX_S": "0.4",
    "EDGEKIT_AGENT_POLL_INTERVAL_S": "0.2",
    "EDGEKIT_AGENT_HTTP_TIMEOUT_S": "5",
}


def resign(src: Path, dst: Path, key: Ed25519PrivateKey | None = None, *, golden: dict[str, np.ndarray] | None = None,
           **manifest_changes: object) -> Path:
    """Copy a bundle, change manifest fields (and optionally the golden set), sign it again (default: with the session's
    publisher key, which the tests' agents trust through EDGEKIT_AGENT_TRUSTED_KEYS)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST_FILE).read_text())
    if golden is not None:
        np.savez(dst / GOLDEN_FILE, **golden)
        manifest["golden"]["sha256"] = sha256_file(dst / GOLDEN_FILE)
    manifest.update(manifest_changes)
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    (dst / MANIFEST_FILE).write_bytes(data)
    key = key or signing.load_or_create_key()
    pub = signing.public_key_b64(key)
    (dst / SIGNATURE_FILE).write_text(json.dumps({"algorithm": "ed25519", "public_key": pub, "key_id": signing.fingerprint(pub),
                                                   "signature": signing.sign(key, data)}))
    return dst


def agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", "agent", *args]


def wait_for(cond: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> object:
    """fleet_support.wait_for with the agents' longer default (an agent installs and profiles before it answers)."""
    return _wait_for(cond, timeout, what)
