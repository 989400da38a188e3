"""The precision label of a quantization recipe, as reports and manifests show it.

``int16x8`` (int16 activations, int8 weights) is never called INT8: its kernels, speed and
accelerator support differ (LiteRT's XNNPACK has none for it; most NPUs neither).
"""

from __future__ import annotations

__all__ = ["precision_label"]


def precision_label(weights: str, activations: str, kept_in_float: int = 0) -> str:
    """'INT8', 'INT16x8 (int16 activations, int8 weights; not INT8)', 'INT8 weights, float activations', ..."""
    if activations == "int16" and weights == "int8":
        label = "INT16x8 (int16 activations, int8 weights; not INT8)"
    elif weights == "int8" and activations in ("int8", "uint8"):
        label = "INT8" if activations == "int8" else "INT8 (uint8 activations)"
    else:
        label = f"{weights} weights, {activations} activations"
    if kept_in_float:
        label += f", {kept_in_float} node(s) kept in float (mixed)"
    return label
