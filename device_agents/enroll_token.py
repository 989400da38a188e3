"""Where the agent finds its enroll token without putting it on the command line (visible in ``ps``).

In order: ``--enroll-token-file PATH``; the ``EDGEKIT_AGENT_ENROLL_TOKEN`` environment variable;
systemd's credential ``enroll-token`` (``LoadCredential=enroll-token:/etc/edgekit/enroll-token``
puts it in ``$CREDENTIALS_DIRECTORY``); ``--enroll-token`` on argv stays for quick trials.
The token is needed only for the first start: afterwards the device token is pinned in the data dir.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgekit.errors import InputError

__all__ = ["CREDENTIAL_NAME", "ENV_VAR", "resolve_enroll_token"]

ENV_VAR = "EDGEKIT_AGENT_ENROLL_TOKEN"
CREDENTIAL_NAME = "enroll-token"


def _read_token(path: Path, what: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise InputError(f"cannot read the enroll token from {what} {path}: {e.strerror}",
                         "Check the path and that the agent's user may read it (mode 0600, owned by that user).") from None
    if not token:
        raise InputError(f"the enroll token file {path} is empty", "Write the token made by 'edgekit server token create --scope enroll'.")
    return token


def resolve_enroll_token(argv_token: str | None, token_file: Path | None, env: dict[str, str] | None = None) -> str | None:
    """The enroll token from argv, a file, the environment or a systemd credential; None when there is none."""
    env = os.environ if env is None else env
    if argv_token:
        return argv_token
    if token_file is not None:
        return _read_token(token_file, "--enroll-token-file")
    if env.get(ENV_VAR, "").strip():
        return env[ENV_VAR].strip()
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).is_file():
        return _read_token(Path(creds) / CREDENTIAL_NAME, "the systemd credential")
    return None
