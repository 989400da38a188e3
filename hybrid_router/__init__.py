"""Device-first prediction with calibrated escalation to a cloud model.

It lands with the hybrid-router work (docs/roadmap.md); its policy will travel in the
bundle manifest's ``router_policy`` field, which exists today.
"""
