"""The device agent: download, verify, profile on the real hardware, activate atomically, report.

The agent's state machine and daemon land with the device-agent work (docs/roadmap.md);
today a device runs bundles with :mod:`edgekit.runtime` and ``edgekit bench``.
"""
