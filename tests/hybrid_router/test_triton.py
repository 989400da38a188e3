"""Triton model repository export: config.pbtxt parsed structurally and checked against the ONNX model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgekit.bundle import sha256_file


def parse_pbtxt(text: str) -> dict:
    """A small protobuf text-format parser: messages become dicts, repeated fields lists (enough for Triton configs)."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+', text)
    pos = 0

    def value():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "{":
            return message("}")
        if tok == "[":
            items = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        if tok.startswith('"'):
            return tok[1:-1]
        return int(tok) if re.fullmatch(r"-?\d+", tok) else tok

    def message(end: str | None) -> dict:
        nonlocal pos
        out: dict = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            v = value()
            if key in out:
                out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [v]
            else:
                out[key] = v
        if end is not None:
            assert tokens[pos] == end, f"unbalanced: expected {end}"
            pos += 1
        return out

    result = message(None)
    assert pos == len(tokens), "trailing tokens"
    return result


def test_export_writes_a_valid_repository(run_cli, digits_cloud, tmp_path: Path) -> None:
    code, out, err = run_cli("cloud", "export-triton", digits_cloud["onnx"], "--name", "digits", "--out", tmp_path / "repo",
                             "--max-batch", "16", "--max-delay-us", "500", "--json")
    assert code == 0, err
    model_dir = tmp_path / "repo" / "digits"
    cfg = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert cfg["name"] == "digits" and cfg["platform"] == "onnxruntime_onnx" and cfg["max_batch_size"] == 16
    (inp,) = cfg["input"]
    (outp,) = cfg["output"]
    assert (inp["name"], inp["data_type"], inp["dims"]) == ("input", "TYPE_FP32", [8, 8, 1])
    assert (outp["data_type"], outp["dims"]) == ("TYPE_FP32", [10])
    db = cfg["dynamic_batching"]
    assert db["max_queue_delay_microseconds"] == 500
    assert max(db["preferred_batch_size"]) == 16
    assert db["default_queue_policy"]["max_queue_size"] == 1024
    assert sha256_file(model_dir / "1" / "model.onnx") == sha256_file(digits_cloud["onnx"])
    # names in the config are the ones the KServe client sends and reads
    from hybrid_router.cloud_model import OnnxCloudModel

    m = OnnxCloudModel(model_dir / "1" / "model.onnx")
    assert inp["name"] == m.inputs[0].name and outp["name"] == m.outputs[0].name


def test_parser_rejects_broken_text() -> None:
    with pytest.raises((AssertionError, IndexError)):
        parse_pbtxt('name: "x"\ninput [ { name: "a" ')


def test_a_model_without_a_batch_axis_is_refused(run_cli, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "static.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    code, _, err = run_cli("cloud", "export-triton", path, "--name", "static", "--out", tmp_path / "repo")
    assert code == 4
    assert "no free batch axis" in err and "Hint:" in err


def test_config_pbtxt_parses_with_tritons_own_model_config_proto(run_cli, digits_cloud, tmp_path: Path) -> None:
    """Triton's model_config.proto (tritonclient.grpc.model_config_pb2), text format: what tritonserver itself reads."""
    pytest.importorskip("tritonclient.grpc")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    code, _, err = run_cli("cloud", "export-triton", digits_cloud["onnx"], "--name", "digits", "--out", tmp_path / "repo",
                           "--max-batch", "16", "--max-delay-us", "500")
    assert code == 0, err
    cfg = text_format.Parse((tmp_path / "repo" / "digits" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("digits", "onnxruntime_onnx", 16)
    assert cfg.input[0].data_type == model_config_pb2.TYPE_FP32 and list(cfg.input[0].dims) == [8, 8, 1]
    assert list(cfg.output[0].dims) == [10]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500 and max(cfg.dynamic_batching.preferred_batch_size) == 16
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 1024
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
