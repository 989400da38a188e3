"""The agent's settings: one frozen object, from flags with ``EDGEKIT_AGENT_*`` environment fallbacks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from device_agents.profiler import ProfileSettings

__all__ = ["AgentSettings", "parse_trusted_keys", "trusted_keys_from_env"]


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"EDGEKIT_AGENT_{name}", default)


def parse_trusted_keys(values: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Publisher keys as given (base64, or paths of PEM key files), as base64; InputError for one that is neither."""
    from edgekit.signing import parse_public_key

    keys: list[str] = []
    for v in values:
        key = parse_public_key(v)
        if key not in keys:
            keys.append(key)
    return tuple(keys)


def trusted_keys_from_env() -> tuple[str, ...]:
    """``EDGEKIT_AGENT_TRUSTED_KEYS``: publisher keys separated by commas or whitespace."""
    text = _env("TRUSTED_KEYS") or ""
    return parse_trusted_keys([v for v in text.replace(",", " ").split() if v])


@dataclass(frozen=True)
class AgentSettings:
    """Everything tunable about the agent (tests and e2e use small values)."""

    profile: str | None = None
    formats: tuple[str, ...] | None = None
    """Formats this device runs (from its hardware profile); None: not checked."""
    profiling: ProfileSettings = field(default_factory=ProfileSettings)
    poll_interval_s: float | None = None
    """Overrides the server's interval when set."""
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    max_attempts: int = 3
    """Loop guard: entries into one state that did not finish before it is given up (crash_loop)."""
    keep_slots: int = 3
    trusted_keys: tuple[str, ...] = ()
    """Publisher keys pinned on the device (``--trusted-key``, ``EDGEKIT_AGENT_TRUSTED_KEYS``): a local install needs
    one of them; for fleet installs they narrow the server's signed allow-list (docs/security.md)."""
    insecure_any_publisher: bool = False
    """``--insecure-any-publisher`` / ``EDGEKIT_AGENT_INSECURE_ANY_PUBLISHER=1``: a local install accepts a bundle
    signed by any key (the signature must still verify). Never for production devices."""
    http_timeout_s: float = 30.0
    server_ca: str | None = None
    """``--server-ca`` / ``EDGEKIT_AGENT_SERVER_CA``: a PEM file with the CA (or the certificate) of an https server;
    copied into the data dir at enrollment and from then on the only trust anchor for the server (pinned)."""
    max_download_stalls: int = 5
    """Answered-but-cut-short downloads in a row with no new byte before giving up (download_failed)."""

    def for_profile(self, profile_id: str | None) -> AgentSettings:
        """These settings with the profile (and the formats it runs) of an enrolled device filled in."""
        if profile_id is None or (self.profile == profile_id and self.formats is not None):
            return self
        from edgekit.errors import ProfileError
        from edgekit.profiles import find_profile

        try:
            formats: tuple[str, ...] | None = find_profile(profile_id).formats.supported()
        except ProfileError:  # e.g. a 'detected-<host>' profile the server knows and this install does not ship
            formats = self.formats
        return replace(self, profile=profile_id, formats=formats)

    @classmethod
    def from_env(cls, **overrides: object) -> AgentSettings:
        """Defaults, then ``EDGEKIT_AGENT_*`` variables, then explicit (non-None) overrides from flags."""
        prof = ProfileSettings(
            runs=int(_env("PROFILE_RUNS", "200")), budget_s=float(_env("PROFILE_BUDGET_S", "10")),
            warmup=int(_env("PROFILE_WARMUP", "10")), threads=int(t) if (t := _env("PROFILE_THREADS")) else None)
        poll = _env("POLL_INTERVAL_S")
        values: dict[str, object] = {
            "profiling": prof,
            "poll_interval_s": float(poll) if poll else None,
            "backoff_base_s": float(_env("BACKOFF_BASE_S", "1")),
            "backoff_max_s": float(_env("BACKOFF_MAX_S", "300")),
            "max_attempts": int(_env("MAX_ATTEMPTS", "3")),
            "keep_slots": int(_env("KEEP_SLOTS", "3")),
            "http_timeout_s": float(_env("HTTP_TIMEOUT_S", "30")),
            "max_download_stalls": int(_env("MAX_DOWNLOAD_STALLS", "5")),
            "server_ca": _env("SERVER_CA") or None,
            "trusted_keys": trusted_keys_from_env(),
            "insecure_any_publisher": (_env("INSECURE_ANY_PUBLISHER") or "").strip().lower() in ("1", "true", "yes"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
