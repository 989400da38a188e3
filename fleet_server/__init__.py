"""The fleet server (FastAPI): model registry, devices, signed staged rollouts, telemetry.

It lands with the fleet-server work (docs/roadmap.md); bundles it will store are the ones
``edgekit convert`` writes today.
"""
