"""PyTorch in: an nn.Module through edgekit.convert, a .pt2 ExportedProgram through the CLI, and the refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekit import runtime
from edgekit.bundle import open_bundle
from edgekit.golden import check_golden

torch = pytest.importorskip("torch")


class SmallCNN(torch.nn.Module):
    """Two convolutions, global average pooling and a linear head: the shape of an edge classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.head(h.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def torch_model(tmp_path_factory) -> dict:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    d = tmp_path_factory.mktemp("torch")
    x = np.random.default_rng(0).normal(size=(40, 3, 16, 16)).astype(np.float32)
    np.savez(d / "calib.npz", x=x)
    pt2 = d / "cnn.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 16, 16),)), str(pt2))
    return {"module": model, "calib": d / "calib.npz", "pt2": pt2}


def test_module_converts_to_onnx_and_coreml(torch_model, tmp_path: Path) -> None:
    import edgekit

    report = edgekit.convert(torch_model["module"], (torch.randn(1, 3, 16, 16),), profiles=("raspberry-pi-5", "iphone-15-pro"),
                             calibration=torch_model["calib"], out=tmp_path / "o", latency_runs=2)
    made = {(r.profile, r.format) for r in report.results}
    assert made == {("raspberry-pi-5", "onnx"), ("iphone-15-pro", "onnx"), ("iphone-15-pro", "coreml")}
    assert any("no tflite bundle" in w and "--format onnx" in w for w in report.warnings)  # says why, and the route
    for r in report.results:
        assert [s.name for s in r.manifest.inputs] == ["x"] and r.manifest.provenance.tool_versions.get("torch")
        if r.format == "onnx":
            assert r.manifest.metrics["min_sqnr_db"].value > 20
            assert check_golden(runtime.load(r.bundle_dir), open_bundle(r.bundle_dir)).passed
        else:
            assert (r.bundle_dir / r.manifest.file).is_dir()  # the .mlpackage, built from the ExportedProgram


def test_pt2_through_the_cli(torch_model, tmp_path: Path, run_cli) -> None:
    code, out, err = run_cli("convert", torch_model["pt2"], "--profile", "pixel-8", "--format", "onnx", "--calibration", torch_model["calib"],
                             "--out", tmp_path / "o", "--latency-runs", "2", "--json")
    assert code == 0, err
    (r,) = json.loads(out)["results"]
    assert r["format"] == "onnx" and r["metrics"]["min_sqnr_db"]["value"] > 20


def test_pt2_asking_for_tflite_names_the_onnx_route(torch_model, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "o"
    code, _, err = run_cli("convert", torch_model["pt2"], "--profile", "pixel-8", "--format", "tflite", "--calibration", torch_model["calib"],
                           "--out", out)
    assert code == 4 and "litert-torch" in err and "--format onnx" in err and "Traceback" not in err
    assert not out.exists()


def test_pt2_without_torch(torch_model, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    out = tmp_path / "o"
    code, _, err = run_cli("convert", torch_model["pt2"], "--profile", "pixel-8", "--calibration", torch_model["calib"], "--out", out)
    assert code == 3 and "PyTorch is not installed" in err and "edgekit[torch]" in err and "torch==2.13.0" in err and "Traceback" not in err
    assert not out.exists()
