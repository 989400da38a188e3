"""A device model with a float logits output beside the app's softmax: calibration and the classifier read the logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hybrid_router import EscalationPolicy, HybridClassifier


def _two_outputs(src: Path, dst: Path) -> str:
    """The cloud ONNX model with the Softmax's input (the logits) exposed as a second graph output; its name."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(src)
    soft = next(n for n in m.graph.node if n.op_type == "Softmax")
    m.graph.output.append(helper.make_tensor_value_info(soft.input[0], TensorProto.FLOAT, ["N", 10]))
    onnx.save(m, dst)
    return soft.input[0]


def test_the_logits_output_is_found_and_scored(digits_cloud, tmp_path: Path) -> None:
    from edgekit.runtime import load_model_file
    from hybrid_router.calibrate import _score_output
    from hybrid_router.policy import calibrated_probs

    logits_name = _two_outputs(digits_cloud["onnx"], tmp_path / "two.onnx")
    model = load_model_file(tmp_path / "two.onnx", "onnx")
    assert [o.name for o in model.outputs][1] == logits_name
    assert _score_output(model) == logits_name
    x = np.load(digits_cloud["test"])["x"][:20]
    clf = HybridClassifier(model, None, EscalationPolicy(1.7, 0.9, "logits", method="margin", score_output=logits_name))
    preds = clf.predict_batch(x)
    z = model.run({model.inputs[0].name: x})[logits_name]
    p = calibrated_probs(z, 1.7, "logits")
    top2 = np.sort(p, axis=1)[:, -2:]
    np.testing.assert_allclose([q.confidence for q in preds], top2[:, 1] - top2[:, 0], rtol=1e-6)
    assert [q.label for q in preds] == list(p.argmax(axis=1))
    assert [q.escalated for q in preds] == list(top2[:, 1] - top2[:, 0] < 0.9)
