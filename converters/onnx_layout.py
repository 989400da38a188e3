"""Which quantized ONNX layout each execution provider can take, chosen from the profile's EP list.

An INT8 ONNX model is only as fast as the EP that runs its quantized nodes. Each EP takes a different
pattern: ONNX Runtime's CPU EP fuses DequantizeLinear -> op -> QuantizeLinear groups into its own int8
kernels (QLinearConv, QGemm, ...); XNNPACK, NNAPI and QNN claim QDQ node units themselves at load time,
so the ORT-format file must keep the QDQ groups ("Runtime" optimization style); the Core ML EP has no
quantized op builders at all, so its int8 nodes run on the CPU EP and the file is best stored fused
("Fixed" style) so Core ML claims no float islands between Q/DQ pairs. The rules cite the EP sources;
only the CPU EP runs here, so every other EP's rule is "not verified here".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgekit.profiles import HardwareProfile

__all__ = ["EPLayout", "ep_layout"]

_ORT = "https://github.com/microsoft/onnxruntime/blob/main/onnxruntime/core/"


@dataclass(frozen=True)
class EPLayout:
    """How to lay out the quantized graph for the EP that should run its quantized nodes."""

    ep: str  # the EP that takes the quantized nodes
    quant_format: Literal["qdq", "qoperator"]
    ort_style: Literal["fixed", "runtime"]  # ORT-format optimization style (when the profile ships .ort)
    target_platform: Literal["arm", "amd64"]  # convert_onnx_models_to_ort's target: 'arm' allows int8 QDQ fusions
    per_channel: bool  # the EP takes per-channel int8 weights with the profile's activation dtype
    weight_type: Literal["int8", "uint8"]
    activation_symmetric: bool
    mixed_precision: bool  # float nodes between int8 ones run fast (the keep-sensitive recipes)
    float_output: bool  # the head may leave the int32 accumulator as float (QGemm float output) instead of requantized logits
    verified_here: bool
    rule: str  # what the EP takes, in words
    source: str


def _arch(profile: HardwareProfile) -> Literal["arm", "amd64"]:
    return "amd64" if profile.cpu.arch == "x86_64" else "arm"


def ep_layout(profile: HardwareProfile) -> EPLayout:
    """The layout for the first EP in the profile's list that can take quantized nodes (the CPU EP otherwise)."""
    c = profile.formats.onnx
    assert c is not None
    act = c.activation_dtype
    plat = _arch(profile)
    eps = list(c.execution_providers)
    for ep in eps:
        if ep == "NnapiExecutionProvider":
            return EPLayout(ep, "qdq", "runtime", "arm", c.per_channel, "int8", False, mixed_precision=False, float_output=False, verified_here=False,
                            rule="NNAPI takes QDQ node units with uint8 activations and int8 weights, per-tensor (converted to uint8) or "
                                 "symmetric per-channel (TENSOR_QUANT8_SYMM_PER_CHANNEL); a full-integer accelerator: float nodes "
                                 "split the graph", source=_ORT + "providers/nnapi/nnapi_builtin/builders/impl/conv_op_builder.cc")
        if ep == "QNNExecutionProvider":
            return EPLayout(ep, "qdq", "runtime", "arm", c.per_channel, "int8", False, mixed_precision=False, float_output=False, verified_here=False,
                            rule="QNN (HTP) takes QDQ node units with uint8/uint16 activations and symmetric int8 weights; "
                                 "full-integer: float nodes split the graph",
                            source="https://onnxruntime.ai/docs/execution-providers/QNN-ExecutionProvider.html")
        if ep == "XnnpackExecutionProvider":
            # qs8 / qs8_qc8w (per-channel, zero point 0) need int8 activations; qu8 needs uint8 weights, per tensor.
            per_channel = c.per_channel and act == "int8"
            return EPLayout(ep, "qdq", "runtime", plat, per_channel, "int8" if act == "int8" else "uint8", False, mixed_precision=True,
                            float_output=True, verified_here=False,
                            rule="XNNPACK takes QDQ Conv/Gemm/pooling/Softmax units as qs8 (int8 activations and weights, per-tensor or "
                                 "symmetric per-channel) or qu8 (uint8 activations and uint8 weights, per-tensor only); the CPU EP "
                                 "runs what it leaves", source=_ORT + "providers/xnnpack/nn/conv_base.cc")
        if ep == "TensorrtExecutionProvider":
            return EPLayout(ep, "qdq", "runtime", plat, c.per_channel, "int8", True, mixed_precision=True, float_output=True, verified_here=False,
                            rule="TensorRT explicit quantization: int8 Q/DQ with zero point 0 (symmetric activations and weights); "
                                 "it fuses the QDQ graph itself and runs float layers in fp16/fp32",
                            source="https://docs.nvidia.com/deeplearning/tensorrt/developer-guide/index.html#work-with-qat-networks")
    # CPU EP (alone, or behind an EP that has no quantized kernels: Core ML, CUDA).
    behind = next((ep for ep in eps if ep in ("CoreMLExecutionProvider", "CUDAExecutionProvider")), None)
    rule = ("the CPU EP fuses DequantizeLinear -> op -> QuantizeLinear into QLinearConv / QGemm / QLinear* (MLAS int8); "
            "on x86-64 MLAS's fast path is uint8 activations x int8 weights (VNNI), int8 activations run slower kernels")
    if behind == "CoreMLExecutionProvider":
        rule = ("the Core ML EP has no QuantizeLinear/DequantizeLinear or QLinear* builders, so the int8 nodes run on the CPU EP; "
                "stored fused (Fixed style) so Core ML claims no float islands between Q/DQ pairs; " + rule)
        source = _ORT + "providers/coreml/builders/op_builder_factory.cc"
    else:
        source = _ORT + "optimizer/qdq_transformer/selectors_actions/qdq_selector_action_transformer.cc"
    return EPLayout("CPUExecutionProvider", "qdq", "fixed", plat, c.per_channel, "int8", False,
                    mixed_precision=behind is None, float_output=True, verified_here=plat == "amd64" and behind is None, rule=rule, source=source)
