"""Checks that mean something for the task: --metric hooks, fidelity figures, budgets refused before work, clean interruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from converters.evaluate import class_axis, fidelity, infer_task
from converters.pipeline import ConvertOptions, run_convert
from edgekit.errors import InputError
from edgekit.manifest import TensorSpec

ROOT = Path(__file__).resolve().parents[2]


def test_fidelity_figures() -> None:
    f = np.linspace(-1, 1, 1000).astype(np.float32)
    same = fidelity(f, f)
    assert same.sqnr_db == 200.0 and same.cosine == pytest.approx(1.0) and same.max_rel_error == 0.0
    noisy = fidelity(f + 0.01, f)  # noise power 1e-4 against a signal power of about 1/3: ~35 dB
    assert 34 < noisy.sqnr_db < 36 and noisy.max_rel_error == pytest.approx(0.01, rel=1e-3)
    assert fidelity(-f, f).cosine == pytest.approx(-1.0)


def test_class_axis_comes_from_the_shape() -> None:
    assert class_axis((1, 10)) == 1 and class_axis((1, 1000, 1, 1)) == 1
    assert class_axis((1, 22, 2100)) is None and class_axis((1, 1)) is None
    spec = lambda *shape: TensorSpec(name="y", shape=shape, dtype="float32")  # noqa: E731
    assert infer_task((spec(1, 1000, 1, 1),))[0] == "classification"
    assert infer_task((spec(1, 22, 2100),))[0] == "generic"
    assert infer_task((spec(1, 10), spec(1, 4)))[0] == "generic"


@pytest.fixture()
def metric_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "ekmetrics.py").write_text(textwrap.dedent('''
        import numpy as np

        CALLS = []

        def mean_box_error(outputs, data):
            CALLS.append(sorted(outputs))
            return -float(np.abs(outputs["output_0"]).mean())  # higher is better

        def broken(outputs, data):
            raise KeyError("boxes")

        def nan(outputs, data):
            return float("nan")
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("ekmetrics", None)
    return "ekmetrics"


def test_metric_hook_drives_the_budget(detector_model, metric_module: str, tmp_path: Path) -> None:
    report = run_convert(ConvertOptions(model=detector_model["model"], profiles=("raspberry-pi-5",), formats=("onnx",),
                                        calibration=detector_model["calib"], out=tmp_path / "o", latency_runs=2,
                                        metric=f"{metric_module}:mean_box_error", max_accuracy_drop=0.05))
    import ekmetrics  # type: ignore[import-not-found]

    assert ekmetrics.CALLS and ekmetrics.CALLS[0] == ["output_0", "output_1"]  # every output, by name
    (r,) = report.results
    m = r.manifest.metrics
    assert m["metric"].status == "measured" and m["float_metric"].value is not None
    assert m["metric_drop"].value <= 0.05
    chosen = next(a for a in r.attempts if a.chosen)
    assert chosen.metric == pytest.approx(m["metric"].value)


def test_metric_hook_in_the_python_api(detector_model, tmp_path: Path) -> None:
    seen = []

    def score(outputs, data):
        seen.append(set(data))
        return float(np.mean(outputs["output_1"]))

    report = run_convert(ConvertOptions(model=detector_model["model"], profiles=("raspberry-pi-5",), formats=("tflite",),
                                        calibration=detector_model["calib"], out=tmp_path / "o", latency_runs=2, metric=score))
    assert report.results and "image" in seen[0]


@pytest.mark.parametrize(("fn", "needle"), [("broken", "KeyError"), ("nan", "returned nan")])
def test_metric_hook_that_fails(detector_model, metric_module: str, tmp_path: Path, run_cli, fn: str, needle: str) -> None:
    out = tmp_path / "o"
    code, _, err = run_cli("convert", detector_model["model"], "--profile", "raspberry-pi-5", "--calibration", detector_model["calib"],
                           "--out", out, "--metric", f"{metric_module}:{fn}")
    assert code == 3 and needle in err and "Hint:" in err and "Traceback" not in err
    assert not out.exists()


def test_metric_hook_that_cannot_be_imported(detector_model, tmp_path: Path, run_cli) -> None:
    code, _, err = run_cli("convert", detector_model["model"], "--profile", "raspberry-pi-5", "--calibration", detector_model["calib"],
                           "--out", tmp_path / "o", "--metric", "no_such_module_ek:f")
    assert code == 2 and "cannot import" in err and "Hint:" in err


def test_score_metric_refuses_non_numbers() -> None:
    from converters.evaluate import score_metric

    with pytest.raises(InputError, match="TypeError|ValueError"):
        score_metric(lambda o, d: "high", {}, {}, "x")


@pytest.mark.parametrize("args", [("--max-accuracy-drop", "nan"), ("--max-accuracy-drop", "inf"), ("--min-sqnr-db", "nan"),
                                  ("--max-memory", "inf"), ("--max-memory", "0"), ("--preprocessing", "scale=abc"),
                                  ("--preprocessing", "mean=0:x"), ("--preprocessing", "std=0")])
def test_bad_numbers_are_refused_before_any_work(digits, tmp_path: Path, run_cli, args: tuple[str, str]) -> None:
    out = tmp_path / "o"
    code, _, err = run_cli("convert", digits["model"], "--profile", "raspberry-pi-5", "--calibration", digits["calib"], "--out", out, *args)
    assert code == 2 and err.startswith("Error: ") and "Hint:" in err and "Traceback" not in err and "internal error" not in err
    assert not out.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_convert_removes_its_staging_dir(detector_model, tmp_path: Path, sig: int) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("kept")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", "convert", str(detector_model["model"]), "--profile", "raspberry-pi-5",
                             "--calibration", str(detector_model["calib"]), "--out", str(out), "--latency-runs", "100000"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not any(p.name.startswith(".edgekit-tmp-") for p in out.iterdir()):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    assert any(p.name.startswith(".edgekit-tmp-") for p in out.iterdir()), "the run never started staging"
    time.sleep(1.0)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode != 0 and b"Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]


def test_recipes_over_max_memory_are_skipped_with_the_reason(detector_model, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "o"
    code, _, err = run_cli("convert", detector_model["model"], "--profile", "raspberry-pi-5", "--format", "onnx", "--calibration",
                           detector_model["calib"], "--out", out, "--max-memory", "1")
    assert code == 5 and "skipped" in err and "over --max-memory 1 MB" in err and "Traceback" not in err
    assert not out.exists()


def test_model_budget_is_checked_from_the_runtime_arena_before_the_search(detector_model, tmp_path: Path, run_cli,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    data = yaml.safe_load((ROOT / "hardware_profiles" / "raspberry-pi-5.yaml").read_text())
    # 1,511 weights (0.0015 MB as int8) fit; weights plus the activations (about 3 KB as int8) do not.
    data["id"], data["memory"]["model_budget_mb"] = "tiny-board", 0.002
    d = tmp_path / "profiles"
    d.mkdir()
    (d / "tiny.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("EDGEKIT_PROFILE_PATH", str(d))
    out = tmp_path / "o"
    code, _, err = run_cli("convert", detector_model["model"], "--profile", "tiny-board", "--format", "tflite", "--calibration",
                           detector_model["calib"], "--out", out)
    assert code == 4 and "float model's arena" in err and "model budget" in err and "Traceback" not in err
    assert "int8-per-channel" not in err  # refused before any recipe ran
    assert not out.exists()
