"""Cross-layer equalization and bias correction on a clone of a Keras model, before TensorFlow's
converter quantizes it (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and
Bias Correction"; the empirical bias correction as NNCF and AIMET apply it).

Both work on the layers TFLite turns into int8 kernels: Conv2D, DepthwiseConv2D and Dense, each with
the BatchNormalization that follows it (TFLite folds it into the kernel, so the folded kernel is what
gets quantized and what these transforms measure). The math is in converters/quant_math.py.

* ``equalize`` rescales the output channels of one layer and the matching input channels of the next
  when only positive-homogeneous ops lie between (ReLU, LeakyReLU, PReLU, linear, pooling, padding,
  dropout, flatten): the float model computes the same function, and per-channel ranges even out.
  ReLU6 and hard-swish are not homogeneous; pairs across them are left alone.
* ``correct_bias`` runs the calibration data through the float model and through a copy whose
  kernels are int8 fake-quantized the way TFLite quantizes them (and whose layer inputs are int8
  fake-quantized per tensor on the float model's calibrated min/max), layer by layer in graph order,
  and moves each layer's bias (or its BatchNormalization's beta) by the mean output error per channel,
  so the error does not accumulate downstream. Kernels are restored to float afterwards: TFLite
  quantizes them itself, to the same integers.

Only single-graph Functional / Sequential models are transformed; a nested model is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from converters import quant_math as qm

__all__ = ["BiasCorrection", "Equalization", "correct_bias", "equalize", "transform_clone"]

_MAX_BC_BYTES = 768 * 2**20  # every activation of the bias-correction pass, held at once (see _bc_samples)


@dataclass
class Equalization:
    """What ``equalize`` did."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    sweeps: int = 0
    max_log_change: float = 0.0


@dataclass
class BiasCorrection:
    """What ``correct_bias`` did: layers corrected and the mean |shift| per layer, samples used."""

    layers: list[str] = field(default_factory=list)
    mean_abs_shift: list[float] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    samples: int = 0


def _keras():
    import keras

    return keras


def _graph(model):
    keras = _keras()
    if isinstance(model, keras.Sequential):
        if getattr(model, "_functional", None) is None:
            raise ValueError("the Sequential model is not built")
        return model._functional
    return model


def _nodes(graph) -> list:
    """The graph's op nodes in execution order (deepest first, as Functional runs them)."""
    out = []
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if node.operation is not None and not node.is_input:
                out.append(node)
    return out


def _consumers(graph) -> dict[int, list]:
    cons: dict[int, list] = {}
    for node in _nodes(graph):
        for t in node.input_tensors:
            cons.setdefault(id(t), []).append(node)
    for t in graph.outputs:
        cons.setdefault(id(t), []).append(None)  # a model output: seen outside
    return cons


def _act_name(act) -> str:
    return getattr(act, "__name__", type(act).__name__).lower() if act is not None else "linear"


@dataclass
class _Unit:
    layer: object
    node: object
    kind: str  # "conv", "depthwise", "dense"
    bn: object | None = None
    bn_node: object | None = None

    @property
    def out_node(self):
        return self.bn_node if self.bn is not None else self.node

    def activation(self) -> str:
        return _act_name(self.layer.activation) if self.bn is None else "linear"

    # kernels in the grouped layout [..., in_per_group, out] (out_axis=-1, in_axis=-2)
    def raw_kernel(self) -> np.ndarray:
        k = np.asarray(self.layer.kernel.numpy(), dtype=np.float64)
        return qm.depthwise_as_grouped(k) if self.kind == "depthwise" else k

    def set_raw_kernel(self, k: np.ndarray) -> None:
        if self.kind == "depthwise":
            k = qm.grouped_as_depthwise(k, self.layer.kernel.shape[-1])
        self.layer.kernel.assign(np.asarray(k, dtype=np.float32).reshape(self.layer.kernel.shape))

    def fold(self) -> np.ndarray:
        """Per-output-channel factor TFLite multiplies into the kernel when it folds the BatchNormalization (1 without)."""
        out = self.raw_kernel().shape[-1]
        if self.bn is None:
            return np.ones(out)
        bn = self.bn
        gamma = bn.gamma.numpy() if bn.scale else np.ones(out)
        return np.asarray(gamma, dtype=np.float64) / np.sqrt(np.asarray(bn.moving_variance.numpy(), dtype=np.float64) + bn.epsilon)

    def kernel(self) -> np.ndarray:
        return self.raw_kernel() * self.fold()

    def groups(self) -> int:
        if self.kind == "depthwise":
            return int(self.layer.kernel.shape[-2])
        return int(getattr(self.layer, "groups", 1) or 1)

    def can_shift(self) -> bool:
        return (self.bn is not None and self.bn.center) or (self.bn is None and getattr(self.layer, "use_bias", False))

    def shift_bias(self, delta: np.ndarray) -> None:
        """Subtract ``delta`` (per output channel) from the effective bias."""
        var = self.bn.beta if self.bn is not None else self.layer.bias
        var.assign((var.numpy() - delta).astype(np.float32))


def _is_unit(op) -> str | None:
    keras = _keras()
    if getattr(op, "dtype_policy", None) is not None and getattr(op.dtype_policy, "quantization_mode", None):
        return None  # already quantized by Keras
    if isinstance(op, keras.layers.DepthwiseConv2D) and op.data_format == "channels_last":
        return "depthwise"
    if isinstance(op, keras.layers.Conv2D) and not isinstance(op, (keras.layers.Conv2DTranspose, keras.layers.SeparableConv2D)) \
            and op.data_format == "channels_last":
        return "conv"
    if isinstance(op, keras.layers.Dense) and len(op.kernel.shape) == 2:
        return "dense"
    return None


def _units(graph) -> tuple[list[_Unit], dict[int, list]]:
    keras = _keras()
    cons = _consumers(graph)
    units = []
    for node in _nodes(graph):
        kind = _is_unit(node.operation)
        if kind is None or len(node.outputs) != 1 or len(node.input_tensors) != 1:
            continue
        u = _Unit(node.operation, node, kind)
        nxt = cons.get(id(node.outputs[0]), [])
        if _act_name(u.layer.activation) == "linear" and len(nxt) == 1 and nxt[0] is not None:
            op = nxt[0].operation
            if isinstance(op, keras.layers.BatchNormalization) and op.axis in (-1, len(node.outputs[0].shape) - 1):
                u.bn, u.bn_node = op, nxt[0]
        units.append(u)
    return units, cons


_HOMOGENEOUS_ACTS = {"linear", "relu", "leaky_relu"}


def _transparent(op) -> str | None:
    """'same' when op commutes with a positive per-channel scale, 'flatten' for Flatten, None otherwise."""
    keras = _keras()
    L = keras.layers
    if isinstance(op, L.ReLU):
        return "same" if op.max_value is None and float(op.threshold) == 0.0 else None
    if isinstance(op, (L.LeakyReLU, L.PReLU, L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D, L.Identity,
                       L.ZeroPadding2D, L.MaxPooling2D, L.AveragePooling2D, L.GlobalAveragePooling2D, L.GlobalMaxPooling2D)):
        if isinstance(op, L.PReLU) and op.shared_axes is not None and (len(op.alpha.shape) and op.alpha.shape[-1] == 1):
            return "same"
        return "same" if getattr(op, "data_format", "channels_last") in (None, "channels_last") else None
    if isinstance(op, L.Activation):
        return "same" if _act_name(op.activation) in _HOMOGENEOUS_ACTS else None
    if isinstance(op, L.Flatten):
        return "flatten" if getattr(op, "data_format", "channels_last") == "channels_last" else None
    return None


@dataclass
class _Pair:
    a: _Unit
    b: _Unit
    flatten: bool


def _pairs(units: list[_Unit], cons: dict[int, list]) -> list[_Pair]:
    by_node = {id(u.node): u for u in units}
    pairs = []
    for a in units:
        if a.activation() not in _HOMOGENEOUS_ACTS or a.groups() != 1 and a.kind != "depthwise":
            continue
        if a.bn is not None and not (a.bn.scale and a.bn.center):
            continue  # an output scale goes into gamma and beta
        t, flatten = a.out_node.outputs[0], False
        while True:
            nxt = cons.get(id(t), [])
            if len(nxt) != 1 or nxt[0] is None or len(nxt[0].input_tensors) != 1:
                break
            node = nxt[0]
            b = by_node.get(id(node))
            if b is not None:
                if b.kind == "depthwise" or (b.kind in ("conv", "dense") and b.groups() == 1):
                    pairs.append(_Pair(a, b, flatten))
                break
            how = _transparent(node.operation)
            if how is None or (how == "flatten" and flatten):
                break
            flatten = flatten or how == "flatten"
            t = node.outputs[0]
    return pairs


def _in_ranges(b: _Unit, channels: int, flatten: bool) -> np.ndarray:
    k = b.kernel()  # [..., in_per_group, out]
    if b.kind == "depthwise":
        return qm.channel_ranges(k.reshape(-1, channels, k.shape[-1] // channels), 1)
    r = qm.channel_ranges(k, -2)
    if flatten:
        r = r.reshape(-1, channels).max(axis=0)
    return r


def _scale_in(b: _Unit, s: np.ndarray, flatten: bool) -> None:
    k = b.raw_kernel()
    if b.kind == "depthwise":
        c = s.size
        k = (k.reshape(*k.shape[:-1], c, -1) * s[:, None]).reshape(k.shape)
    elif flatten:
        k = (k.reshape(-1, s.size, k.shape[-1]) * s[None, :, None]).reshape(k.shape)
    else:
        k = k * s.reshape(*([1] * (k.ndim - 2)), -1, 1)
    b.set_raw_kernel(k)


def _scale_out(a: _Unit, s: np.ndarray) -> None:
    """Divide a's output channels by s (through its BatchNormalization's gamma and beta when it has one)."""
    if a.bn is not None:
        a.bn.gamma.assign((a.bn.gamma.numpy() / s).astype(np.float32))
        a.bn.beta.assign((a.bn.beta.numpy() / s).astype(np.float32))
        return
    a.set_raw_kernel(a.raw_kernel() / s)
    if getattr(a.layer, "use_bias", False):
        a.layer.bias.assign((a.layer.bias.numpy() / s).astype(np.float32))


def equalize(model, max_sweeps: int = 20, tol: float = 1e-3) -> Equalization:
    """Cross-layer equalization in place on ``model`` (a clone you own); the float outputs stay the same."""
    units, cons = _units(_graph(model))
    pairs = _pairs(units, cons)
    rep = Equalization(pairs=[(p.a.layer.name, p.b.layer.name) for p in pairs])
    for sweep in range(max_sweeps):
        worst = 0.0
        for p in pairs:
            ra = qm.channel_ranges(p.a.kernel(), -1)
            rb = _in_ranges(p.b, ra.size, p.flatten)
            if rb.size != ra.size:
                continue
            s = qm.equalization_scales(ra, rb)
            worst = max(worst, float(np.abs(np.log(s)).max(initial=0.0)))
            _scale_out(p.a, s)
            _scale_in(p.b, s, p.flatten)
        rep.sweeps, rep.max_log_change = sweep + 1, worst
        if worst < tol:
            break
    return rep


def _numpy(x) -> np.ndarray:
    return np.asarray(_keras().ops.convert_to_numpy(x))


def _bc_samples(graph, n: int) -> int:
    """Calibration samples for one bias-correction pass within _MAX_BC_BYTES.

    Keras's ``_run_through_graph`` keeps every intermediate tensor of the pass until it ends, and each
    layer's output exists twice (the framework's tensor and its NumPy copy), so the pass holds about
    ``samples x 2 x (all activations of one sample)``. Per-channel means over a convolution's positions
    need few images; at least 4 are used.
    """
    total = 0
    for node in _nodes(graph):
        for t in node.outputs:
            total += int(np.prod([d or 1 for d in t.shape[1:]]))
    return int(max(min(n, 4), min(n, _MAX_BC_BYTES // (4 * max(1, total) * 2))))


def correct_bias(model, inputs: list[np.ndarray], simulate_activations: bool = True, per_channel: bool = True,
                 float_narrow: int = 0) -> BiasCorrection:
    """Empirical bias correction in place on ``model`` (a clone you own) from calibration ``inputs`` (one array per model input).

    ``float_narrow``: convolutions on at most this many input channels stay float in the model TFLite will
    build (``TFLiteOptions.float_narrow_convs``): their kernels are not fake-quantized and their biases not moved.
    """
    keras = _keras()
    graph = _graph(model)
    units, _ = _units(graph)
    rep = BiasCorrection()
    if not units:
        return rep
    n = _bc_samples(graph, len(inputs[0]))
    inputs = [np.asarray(x[:n]) for x in inputs]
    rep.samples = n
    by_op = {id(u.layer): u for u in units}
    by_bn = {id(u.bn): u for u in units if u.bn is not None}
    in_range: dict[int, tuple[float, float]] = {}
    float_mean: dict[int, np.ndarray] = {}

    def linear_call(layer, *args, **kwargs):
        act = layer.activation
        layer.activation = keras.activations.linear
        try:
            return _numpy(layer(*args, **kwargs))
        finally:
            layer.activation = act

    def finish(layer, y):
        return _numpy(layer.activation(y)) if layer.activation is not None else y

    # 1. the float model: each unit's input range and its pre-activation output mean per channel
    def record(op):
        u, ub = by_op.get(id(op)), by_bn.get(id(op))
        if u is None and ub is None:
            return op

        def call(*args, **kwargs):
            if u is not None:
                x = _numpy(args[0])
                in_range[id(u.layer)] = (float(x.min()), float(x.max()))
                y = linear_call(op, *args, **kwargs)
                if u.bn is None:
                    float_mean[id(u.layer)] = y.reshape(-1, y.shape[-1]).mean(axis=0)
                return finish(op, y)
            y = _numpy(op(*args, **kwargs))
            float_mean[id(ub.layer)] = y.reshape(-1, y.shape[-1]).mean(axis=0)
            return y

        return call

    graph._run_through_graph(inputs, operation_fn=record)

    # 2. kernels fake-quantized as TFLite quantizes them (the folded kernel), then the corrected pass
    saved = {id(u.layer): u.raw_kernel() for u in units}
    kept_float = {id(u.layer) for u in units if u.kind != "dense" and 0 < (u.node.input_tensors[0].shape[-1] or 0) <= float_narrow}
    for u in units:
        if id(u.layer) in kept_float:
            continue
        fold = u.fold()
        k = u.kernel()
        fq = qm.fake_quant_weights(k, -1 if per_channel else None).astype(np.float64)
        safe = np.where(fold != 0, fold, 1.0)
        u.set_raw_kernel(np.where(fold != 0, fq / safe, u.raw_kernel()))

    def corrected(op):
        u, ub = by_op.get(id(op)), by_bn.get(id(op))
        if u is None and ub is None:
            return op

        def call(*args, **kwargs):
            if u is not None:
                args = list(args)
                if simulate_activations and id(u.layer) in in_range:
                    args[0] = qm.fake_quant_activation(_numpy(args[0]), *in_range[id(u.layer)])
                y = linear_call(op, *args, **kwargs)
                if u.bn is None:
                    return finish(op, _shift(u, y))
                return y
            return _shift(ub, _numpy(op(*args, **kwargs)))

        return call

    def _shift(u: _Unit, y: np.ndarray) -> np.ndarray:
        mean_f = float_mean.get(id(u.layer))
        if id(u.layer) in kept_float:
            return y
        if mean_f is None or not u.can_shift():
            rep.skipped.append(u.layer.name)
            return y
        delta = y.reshape(-1, y.shape[-1]).mean(axis=0) - mean_f
        u.shift_bias(delta)
        rep.layers.append(u.layer.name)
        rep.mean_abs_shift.append(float(np.abs(delta).mean()))
        return (y - delta).astype(np.float32)

    try:
        graph._run_through_graph(inputs, operation_fn=corrected)
    finally:
        for u in units:
            u.set_raw_kernel(saved[id(u.layer)])
    return rep


def transform_clone(model, *, cle: bool, bias_correction: bool, calibration: list[np.ndarray] | None,
                    per_channel: bool = True, float_narrow: int = 0) -> tuple[object, list[str]]:
    """A clone of ``model`` with the transforms applied (the source is never touched) and what was done, in words."""
    keras = _keras()
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    notes = []
    if cle:
        eq = equalize(clone)
        notes.append(f"cross-layer equalization: {len(eq.pairs)} layer pair(s), {eq.sweeps} sweep(s)")
    if bias_correction:
        if calibration is None:
            raise ValueError("bias correction needs calibration data")
        bc = correct_bias(clone, calibration, per_channel=per_channel, float_narrow=float_narrow)
        notes.append(f"bias correction: {len(bc.layers)} layer(s) on {bc.samples} calibration samples"
                     + (f", {len(bc.skipped)} without a bias left as they are" if bc.skipped else ""))
    return clone, notes



def count_hard_swish(model) -> int:
    """Activation('hard_swish') layers (Keras 3 names it hard_silu), MobileNetV3's, that TFLite turns into HARD_SWISH."""
    keras = _keras()
    return sum(isinstance(layer, keras.layers.Activation) and _act_name(layer.activation) in ("hard_swish", "hard_silu")
               for layer in getattr(model, "layers", ()))


def count_narrow_convs(model, channels: int) -> int:
    """Conv2D / DepthwiseConv2D layers (channels_last) whose input has at most ``channels`` channels: an image model's stem."""
    keras = _keras()
    n = 0
    for layer in getattr(model, "layers", ()):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) and getattr(layer, "data_format", "") == "channels_last":
            try:
                c = layer.input.shape[-1]
            except (AttributeError, ValueError):  # a layer called more than once has no single input
                continue
            n += int(c is not None and 0 < c <= channels)
    return n
