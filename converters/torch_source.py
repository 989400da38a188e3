"""PyTorch sources: a ``torch.export`` ExportedProgram (``model.pt2``) or an ``nn.Module`` with example inputs.

The float reference is the ExportedProgram itself, run by PyTorch. ONNX comes from
``torch.onnx.export(program, dynamo=True)`` (needs ``onnxscript``), normalised like any ONNX
source; Core ML converts the ExportedProgram directly with coremltools. TFLite needs Google's
``litert-torch`` converter (see :func:`litert_torch_available`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from converters.source import Feeds, SourceModel
from edgekit.bundle import sha256_file
from edgekit.errors import IncompatibleError, ModelLoadError, UsageError
from edgekit.manifest import TensorSpec
from edgekit.nativelog import captured_output

__all__ = ["import_torch", "litert_torch_available", "load_torch_source", "module_source", "program_source"]

_TORCH_HINT = "Install it with: pip install 'edgekit[torch]' (pins the CPU build torch==2.13.0; plain 'pip install torch' pulls GBs of CUDA)."


def import_torch() -> Any:
    """Import torch, or say which extra provides it."""
    try:
        import torch
    except ImportError:
        raise ModelLoadError("PyTorch is not installed, so PyTorch models (.pt2, nn.Module) cannot be converted", _TORCH_HINT) from None
    return torch


def litert_torch_available() -> bool:
    """Whether Google's PyTorch-to-LiteRT converter is importable here."""
    import importlib.util

    return importlib.util.find_spec("litert_torch") is not None


def load_torch_source(path: Path, workdir: Path, input_shapes: dict[str, tuple[int, ...]] | None = None) -> SourceModel:
    """A ``.pt2`` file saved with ``torch.export.save``."""
    torch = import_torch()
    try:
        with captured_output():
            program = torch.export.load(str(path))
    except Exception as e:  # zipfile errors, version mismatches, pickled code...
        raise ModelLoadError(f"{path}: torch.export cannot load this file ({type(e).__name__}: {str(e).strip()[:200]})",
                             "Save it with torch.export.save(torch.export.export(model.eval(), example_inputs), 'model.pt2').") from None
    if input_shapes:
        raise UsageError("--input-shape cannot re-shape an ExportedProgram: its shapes were fixed by torch.export",
                         "Export again with example inputs of the shape you want (batch 1).")
    return program_source(program, path, workdir, sha256_file(path))


def module_source(module: Any, example_inputs: tuple[Any, ...], workdir: Path, name: str = "model") -> SourceModel:
    """An ``nn.Module`` (Python API): exported with ``torch.export.export(module.eval(), example_inputs)``."""
    torch = import_torch()
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"expected a torch.nn.Module, got {type(module).__name__}", "Pass the model object and example_inputs=(tensor, ...).")
    if not example_inputs:
        raise UsageError("a PyTorch module needs example_inputs", "Pass example_inputs=(torch.randn(1, 3, 224, 224),): batch 1, the shape to deploy.")
    args = tuple(torch.as_tensor(a) for a in example_inputs)
    try:
        with captured_output():
            program = torch.export.export(module.eval(), args)
    except Exception as e:  # graph breaks, data-dependent control flow...
        raise ModelLoadError(f"torch.export could not export the module ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})",
                             "Make the forward pass exportable (see torch.export's docs), or export ONNX yourself and pass the .onnx file.") from None
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in module.state_dict().values()
                                     if hasattr(p, "detach"))).hexdigest()
    return program_source(program, workdir / f"{name}.pt2", workdir, digest)


def _val(node: Any) -> Any:
    return node.meta.get("val")


def program_source(program: Any, path: Path, workdir: Path, sha256: str) -> SourceModel:
    """A SourceModel over an ExportedProgram: inputs from its user inputs, outputs named output_0, output_1, ..."""
    torch = import_torch()
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = []
    for name in program.graph_signature.user_inputs:
        val = _val(placeholders[name])
        if val is None or not hasattr(val, "shape"):
            raise IncompatibleError(f"{path.name}: input '{name}' is not a tensor", "edgekit converts models whose inputs are tensors.")
        shape = []
        for d in val.shape:
            if not isinstance(d, int):
                raise IncompatibleError(f"{path.name}: input '{name}' has a dynamic dimension ({d})",
                                        "Export with static example inputs (no dynamic_shapes), batch 1.")
            shape.append(int(d))
        if not shape or shape[0] != 1:
            raise IncompatibleError(f"{path.name}: input '{name}' has shape {tuple(shape)}; edge models take batch 1",
                                    "Export with example inputs of batch 1, e.g. torch.randn(1, 3, 224, 224).")
        inputs.append(TensorSpec(name=name, shape=tuple(shape), dtype=str(val.dtype).removeprefix("torch.")))
    out_node = next(n for n in program.graph.nodes if n.op == "output")
    out_vals = [_val(a) for a in out_node.args[0]][: len(program.graph_signature.user_outputs)]
    outputs = tuple(TensorSpec(name=f"output_{i}", shape=tuple(int(d) for d in v.shape), dtype=str(v.dtype).removeprefix("torch."))
                    for i, v in enumerate(out_vals))
    inputs_t = tuple(inputs)
    params = int(sum(int(np.prod(p.shape)) for p in program.state_dict.values()))
    graph = program.module()

    def run(feeds: Feeds) -> list[np.ndarray]:
        n = len(feeds[inputs_t[0].name])
        parts: list[list[np.ndarray]] = [[] for _ in outputs]
        with torch.no_grad():
            for i in range(n):  # the program is static batch 1
                outs = graph(*[torch.from_numpy(np.ascontiguousarray(feeds[s.name][i : i + 1])) for s in inputs_t])
                outs = outs if isinstance(outs, (list, tuple)) else [outs]
                for j, o in enumerate(outs):
                    parts[j].append(o.detach().cpu().numpy())
        return [np.concatenate(p) for p in parts]

    src = SourceModel(path=path, kind="torch", sha256=sha256, inputs=inputs_t, outputs=outputs, param_count=params, workdir=workdir,
                      torch_program=program, _run=run)
    src.cache["torch_onnx"] = lambda: _export_onnx(src)
    return src


def _export_onnx(source: SourceModel) -> Path:
    """The ExportedProgram as a normalised static ONNX file (exported once per run)."""
    if "torch_onnx_path" in source.cache:
        return source.cache["torch_onnx_path"]
    torch = import_torch()
    d = source.workdir / "torch-onnx"
    d.mkdir(exist_ok=True)
    raw = d / "export.onnx"
    args = tuple(torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in source.inputs)
    try:
        with captured_output():
            torch.onnx.export(source.torch_program, args, str(raw), dynamo=True, opset_version=17,
                              input_names=list(source.input_names), output_names=list(source.output_names))
    except ModuleNotFoundError as e:
        from edgekit.errors import ConversionError

        raise ConversionError(f"torch.onnx.export needs {e.name}, which is not installed", "Install it with: pip install 'edgekit[torch]'.") from None
    except Exception as e:  # the exporter raises its own types for unsupported ops
        from edgekit.errors import ConversionError

        raise ConversionError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}",
                              "Check the model exports with torch.onnx.export(program, dynamo=True).") from None
    from converters.onnx_source import load_onnx_source

    pinned = load_onnx_source(raw, d)
    source.cache["source_notes"] = [*source.cache.get("source_notes", ()), "ONNX exported from the ExportedProgram with torch.onnx.export (dynamo)",
                                    *pinned.cache.get("source_notes", ())]
    source.cache["torch_onnx_path"] = pinned.onnx_path
    return pinned.onnx_path
