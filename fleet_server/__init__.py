"""The fleet server (FastAPI): model registry, devices, signed staged rollouts, telemetry.

``create_app(settings)`` builds the app; ``edgekit server start`` runs it. The wire contract
is docs/protocol.md; operations are in docs/server.md.
"""

from __future__ import annotations

__all__ = ["Settings", "create_app"]


def __getattr__(name: str):  # noqa: ANN202 - lazy, so importing the package stays cheap
    if name == "create_app":
        from fleet_server.app import create_app

        return create_app
    if name == "Settings":
        from fleet_server.settings import Settings

        return Settings
    raise AttributeError(name)
