"""The device agent: download, verify, profile on the real hardware, activate atomically, report.

``edgekit agent run`` (device_agents.daemon) speaks the fleet protocol (docs/protocol.md);
``edgekit agent install`` (device_agents.install) takes one local bundle through the same
state machine (device_agents.machine, handlers in device_agents.steps); apps record telemetry
with device_agents.telemetry.Recorder and load the active model with
edgekit.runtime.load_active. Imports nothing heavier than LiteRT / ONNX Runtime: no TensorFlow,
no coremltools. See docs/agent.md.
"""

import logging

logging.getLogger("edgekit.agent").addHandler(logging.NullHandler())
