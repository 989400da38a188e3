"""TFLite conversions of large models run in a child process (converters.tflite_child): the same model, its errors
raised in the parent, an interrupted child ended, a child whose parent is killed ended too, and the in-process route where the child cannot rebuild the source.

The threshold is lowered so the suite's small models take the child route."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import converters.tflite_child as tflite_child
from converters.dataset import load_dataset
from converters.source import load_source
from converters.tflite import TFLiteConverter
from edgekit.errors import ConversionError
from edgekit.profiles import find_profile


@pytest.fixture()
def isolate_all(monkeypatch):
    monkeypatch.setattr(tflite_child, "ISOLATE_MIN_PARAMS", 0)
    monkeypatch.delenv("EDGEKIT_TFLITE_IN_PROCESS", raising=False)


def _setup(files: dict[str, Path], tmp_path: Path):
    source = load_source(files["model"], tmp_path)
    data = load_dataset(files["calib"], role="calibration", inputs=source.inputs)
    return source, data, TFLiteConverter(), find_profile("raspberry-pi-5")


def _recipe(conv, prof, data, name):
    return next(r for r in conv.recipes(prof, len(data), 500) if r.name == name)


@pytest.mark.parametrize("recipe_name", ["int8-per-channel", "int8-cle-bias-corrected"])  # SavedModel export; the Keras copy
def test_child_conversion_is_the_in_process_one(stateful_model, recipe_name: str, isolate_all, tmp_path: Path) -> None:
    source, data, conv, prof = _setup(stateful_model, tmp_path)
    assert tflite_child.isolated(source)
    recipe = _recipe(conv, prof, data, recipe_name)
    (tmp_path / "child").mkdir()
    (tmp_path / "here").mkdir()
    child = conv.convert(source, prof, recipe, data.x, tmp_path / "child")
    here = conv.convert_here(source, prof, recipe, data.x, tmp_path / "here")
    assert child.read_bytes() == here.read_bytes()
    assert not (tmp_path / "child" / ".tflite-child").exists()  # the job's files are gone once it succeeded
    assert ("tflite_child_keras" in source.cache) == ("cle" in recipe_name)  # only transform recipes need the Keras copy


def test_child_float_conversion(detector_model, isolate_all, tmp_path: Path) -> None:
    source, _, conv, _ = _setup(detector_model, tmp_path)
    (tmp_path / "child").mkdir()
    (tmp_path / "here").mkdir()
    assert conv.convert_float(source, tmp_path / "child").read_bytes() == conv.convert_float_here(source, tmp_path / "here").read_bytes()


def test_child_error_is_the_parents_conversion_error(stateful_model, isolate_all, tmp_path: Path) -> None:
    """The signature check fails in the child (a source whose output names the export does not have): the same error here."""
    import copy

    source, data, conv, prof = _setup(stateful_model, tmp_path)
    renamed = copy.copy(source)
    renamed.outputs = tuple(s.model_copy(update={"name": f"renamed_{i}"}) for i, s in enumerate(source.outputs))
    recipe = _recipe(conv, prof, data, "int8-per-channel")
    with pytest.raises(ConversionError, match="the TFLite signature names") as child_err:
        conv.convert(renamed, prof, recipe, data.x, tmp_path)
    with pytest.raises(ConversionError, match="the TFLite signature names") as here_err:
        conv.convert_here(renamed, prof, recipe, data.x, tmp_path)
    assert child_err.value.message == here_err.value.message


def test_interrupt_ends_the_child(stateful_model, isolate_all, tmp_path: Path, monkeypatch) -> None:
    import subprocess

    from converters.pipeline import INTERRUPTED

    source, data, conv, prof = _setup(stateful_model, tmp_path)
    source.saved_model_dir  # noqa: B018  # exported before the clock starts
    started: list[subprocess.Popen] = []
    real = subprocess.Popen

    def popen(*a, **k):
        p = real(*a, **k)
        started.append(p)
        threading.Timer(0.5, INTERRUPTED.set).start()  # while the child imports TensorFlow
        return p

    monkeypatch.setattr(subprocess, "Popen", popen)
    try:
        with pytest.raises(KeyboardInterrupt):
            conv.convert(source, prof, _recipe(conv, prof, data, "int8-per-channel"), data.x, tmp_path)
    finally:
        INTERRUPTED.clear()
    assert len(started) == 1 and started[0].returncode is not None  # ended and reaped, not left running


def test_killed_child_is_a_conversion_error(stateful_model, isolate_all, tmp_path: Path, monkeypatch) -> None:
    """A child the kernel kills (out of memory) fails that recipe with the signal named, not the run with a traceback."""
    import os
    import signal
    import subprocess

    source, data, conv, prof = _setup(stateful_model, tmp_path)
    real = subprocess.Popen

    def popen(*a, **k):
        p = real(*a, **k)
        os.kill(p.pid, signal.SIGKILL)
        return p

    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(ConversionError, match="signal 9"):
        conv.convert(source, prof, _recipe(conv, prof, data, "int8-per-channel"), data.x, tmp_path)


def test_unsaveable_keras_model_converts_in_process(stateful_model, isolate_all, tmp_path: Path, monkeypatch) -> None:
    source, data, conv, prof = _setup(stateful_model, tmp_path)

    def fail(*_a, **_k):
        raise TypeError("cannot serialize this layer")

    monkeypatch.setattr(source.keras_model, "save", fail)
    path = conv.convert(source, prof, _recipe(conv, prof, data, "int8-cle-bias-corrected"), data.x, tmp_path)
    assert source.cache["tflite_child_keras"] is None
    assert path.is_file() and not (tmp_path / ".tflite-child").exists()  # converted here, no child started


def test_small_models_convert_in_process(stateful_model, tmp_path: Path) -> None:
    source, *_ = _setup(stateful_model, tmp_path)
    assert source.param_count <= tflite_child.ISOLATE_MIN_PARAMS and not tflite_child.isolated(source)


def test_max_memory_counts_the_child_beside_this_process(stateful_model, isolate_all, tmp_path: Path, monkeypatch) -> None:
    """A budget this process alone fits, but not with a TensorFlow child beside it: skipped, the child's share named."""
    from types import SimpleNamespace

    from converters.memory import MemoryPlan, current_rss_bytes, source_activation_bytes

    source, data, conv, prof = _setup(stateful_model, tmp_path)
    recipe = _recipe(conv, prof, data, "int8-per-channel")
    assert source_activation_bytes(source) > 0
    plan = MemoryPlan((current_rss_bytes() + 200e6) / 1e6)  # 200 MB of headroom: under the child's 700 MB
    ctx = SimpleNamespace(source=source)
    reason = plan.skip_reason(ctx, conv, recipe)
    assert reason is not None and "its conversion process" in reason
    monkeypatch.setenv("EDGEKIT_TFLITE_IN_PROCESS", "1")
    assert conv.child_process_bytes(source, recipe) == 0 and plan.skip_reason(ctx, conv, recipe) is None


PARENT = """
import sys
from pathlib import Path

import converters.tflite_child as tflite_child
from converters.dataset import load_dataset
from converters.source import load_source
from converters.tflite import TFLiteConverter
from edgekit.profiles import find_profile

model, calib, work, out = map(Path, sys.argv[1:])
source = load_source(model, work)
data = load_dataset(calib, role="calibration", inputs=source.inputs)
conv, prof = TFLiteConverter(), find_profile("raspberry-pi-5")
recipe = next(r for r in conv.recipes(prof, len(data), 500) if r.name == "int8-per-channel")
tflite_child.run_in_child(source, prof, recipe, data.x, out, transforms=False)
"""


def _children_running(job: Path) -> list[int]:
    """Pids of live processes whose command line names ``job`` (zombies excluded)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(job).encode() in cmd and state != "Z":
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc to find the child")
def test_child_ends_when_its_parent_is_killed(stateful_model, tmp_path: Path) -> None:
    """A parent killed outright (SIGKILL: no handler runs) takes its TFLite child with it; the child writes no result."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    job = out / ".tflite-child" / "job.pickle"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(stateful_model["model"]), str(stateful_model["calib"]), str(work), str(out)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240  # the parent imports TensorFlow and exports the SavedModel first
        while not _children_running(job):
            assert parent.poll() is None, parent.stderr.read().decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        child = _children_running(job)[0]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 60
        while _children_running(job) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _children_running(job), f"child {child} still running after its parent was killed"
        assert not (job.parent / "result.json").exists()  # it died mid-job instead of converting into a dead run's directory
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in _children_running(job):
            os.kill(pid, signal.SIGKILL)
