"""The float ONNX graph every ONNX recipe starts from: exported once per run, with the source's I/O names."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from converters.memory import release_freed_memory
from converters.source import SourceModel, import_tensorflow
from edgekit.errors import ConversionError
from edgekit.manifest import Preprocessing
from edgekit.nativelog import captured_output

__all__ = ["compact_names", "embed_preprocessing", "export_float_onnx"]


def export_float_onnx(source: SourceModel, opset: int, out: Path) -> Path:
    """The float source as an ONNX file with a static batch-1 input named like the source's."""
    path = out / f"float-opset{opset}.onnx"
    if path.exists():
        return path
    if source.kind in ("onnx", "torch"):
        shutil.copyfile(source.onnx_path if source.kind == "onnx" else source.cache["torch_onnx"](), path)
        compact_names(path)
        return path
    # tf2onnx runs in a child process: its graph freezing needs 1-1.5 GB on EfficientNetB0 that the
    # conversion process would otherwise keep for the rest of the run (its heap does not shrink).
    # This process stays alive meanwhile, so hand its freed pages back first (the two add up).
    # A small model runs the same command line in this process: a child would start Python and import
    # TensorFlow again (4-5 s here) to free a few MB.
    release_freed_memory()
    try:
        if source.param_count <= IN_PROCESS_MAX_PARAMS:
            _export_saved_model_cli_here(source, opset, path)
        else:
            _export_saved_model_cli(source, opset, path)
    except ConversionError:
        _export_in_process(source, opset, path)  # the in-process route reports tf2onnx's own error text
    _fold_constant_inputs(path)
    compact_names(path)
    _check_inputs(path, source)
    return path


IN_PROCESS_MAX_PARAMS = 1_000_000
"""Models with at most this many weights run tf2onnx's command line in the conversion process (4 MB of float weights;
its peak scales with them, about 25x on ResNet50 with the memory fixes, so about 100 MB here at most)."""


def _export_in_process(source: SourceModel, opset: int, path: Path) -> None:
    """``tf2onnx.convert.from_function`` over the static SavedModel's signature, in this process."""
    tf = import_tensorflow()
    import tf2onnx

    _patch_tf2onnx_memory()
    loaded = tf.saved_model.load(str(source.saved_model_dir))
    sig = loaded.signatures["serving_default"]
    names = source.input_names
    specs = [tf.TensorSpec(s.shape, getattr(tf, s.dtype), name=s.name) for s in source.inputs]
    # A dict out keeps the signature's output names (output_0, ...) as the ONNX graph's output names.
    fn = tf.function(lambda *a: dict(sig(**dict(zip(names, a)))))
    with captured_output() as log:
        try:
            tf2onnx.convert.from_function(fn, input_signature=specs, opset=opset, output_path=str(path))
        except Exception as e:  # tf2onnx raises bare Exceptions for unsupported ops
            err = e
        else:
            err = None
    if err is not None:
        raise ConversionError(f"tf2onnx could not export the model at opset {opset}: {str(err)[:300]}",
                              "Try a profile with a newer opset, or export ONNX yourself and pass the .onnx file.") from err
    del log


def _export_saved_model_cli(source: SourceModel, opset: int, path: Path) -> None:
    """tf2onnx's ``--saved-model`` command line (with :func:`tf2onnx_main`'s memory fixes) in a child process (variables frozen by tf2onnx's loader, which also
    folds constants that ``from_function`` leaves as inputs, e.g. Keras 3 EfficientNet's Normalization), I/O renamed to the
    source's names."""
    import subprocess
    import sys

    from edgekit.childproc import child_env

    proc = subprocess.run([sys.executable, "-m", "converters.onnx_export", *_cli_args(source, opset, path)], capture_output=True, text=True,
                          env=child_env({**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}))
    if proc.returncode != 0:
        raise ConversionError(f"tf2onnx could not export the SavedModel at opset {opset}: {proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else proc.returncode}",
                              "Export ONNX yourself and pass the .onnx file.")
    _source_io_names(path)


def _cli_args(source: SourceModel, opset: int, path: Path) -> list[str]:
    return ["--saved-model", str(source.saved_model_dir), "--output", str(path), "--opset", str(opset), "--signature_def", "serving_default"]


def _export_saved_model_cli_here(source: SourceModel, opset: int, path: Path) -> None:
    """:func:`_export_saved_model_cli`'s command line run in this process (the same code, so the same file)."""
    import logging
    import sys

    root = logging.getLogger()
    handlers, level, argv = list(root.handlers), root.level, sys.argv
    import_tensorflow()
    with captured_output() as log:
        try:
            tf2onnx_main(_cli_args(source, opset, path))
        except BaseException as e:  # noqa: BLE001 - tf2onnx exits through SystemExit or raises bare Exceptions
            if isinstance(e, KeyboardInterrupt):
                raise
            err: BaseException | None = e
        else:
            err = None
        finally:
            sys.argv = argv
            for h in [h for h in root.handlers if h not in handlers]:  # tf2onnx's logging.basicConfig
                root.removeHandler(h)
            root.setLevel(level)
    if err is not None or not path.exists():
        raise ConversionError(f"tf2onnx could not export the SavedModel at opset {opset}: {str(err)[:300] if err else 'no file written'}",
                              "Export ONNX yourself and pass the .onnx file.") from err
    del log
    _source_io_names(path)


def _source_io_names(path: Path) -> None:
    """The exported graph's inputs and outputs without tf2onnx's ``:0`` tensor suffixes."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    rename = {v.name: v.name.split(":")[0] for v in [*g.input, *g.output] if ":" in v.name}
    if rename:
        for v in [*g.input, *g.output]:
            v.name = rename.get(v.name, v.name)
        for n in g.node:
            n.input[:] = [rename.get(i, i) for i in n.input]
            n.output[:] = [rename.get(o, o) for o in n.output]
        onnx.save(model, str(path))


def _fold_constant_inputs(path: Path) -> None:
    """Drop graph inputs that have initializers (tf2onnx leaves some constants, e.g. Normalization's, as inputs)."""
    import onnx

    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    keep = [v for v in model.graph.input if v.name not in inits]
    if len(keep) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(keep)
        onnx.save(model, str(path))


def _check_inputs(path: Path, source: SourceModel) -> None:
    """The export must take exactly the source's inputs."""
    import onnx

    got = sorted(v.name for v in onnx.load(str(path), load_external_data=False).graph.input)
    want = sorted(source.input_names)
    if got != want:
        raise ConversionError(f"the ONNX export takes inputs {got}, but the source takes {want}",
                              "The exporter turned constants into inputs or renamed them; export ONNX yourself and pass the .onnx file.")


def embed_preprocessing(path: Path, pre: Preprocessing) -> None:
    """Rewrite the model in place to take raw input: Cast -> Mul(scale) -> Sub(mean) -> Div(std) in plain ONNX ops."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    old = g.input[0]
    dims = [d.dim_value for d in old.type.tensor_type.shape.dim]
    raw_type = helper.np_dtype_to_tensor_dtype(np.dtype(pre.raw_dtype))
    raw = helper.make_tensor_value_info("raw", raw_type, dims)
    ndim = len(dims)
    consts = {
        "pre_scale": np.asarray(pre.scale, np.float32),
        "pre_mean": pre._broadcast(pre.mean, ndim).astype(np.float32),
        "pre_std": pre._broadcast(pre.std, ndim).astype(np.float32),
    }
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    nodes = [
        helper.make_node("Cast", ["raw"], ["pre_raw_f"], to=TensorProto.FLOAT, name="pre_cast"),
        helper.make_node("Mul", ["pre_raw_f", "pre_scale"], ["pre_scaled"], name="pre_mul"),
        helper.make_node("Sub", ["pre_scaled", "pre_mean"], ["pre_centered"], name="pre_sub"),
        helper.make_node("Div", ["pre_centered", "pre_std"], [old.name], name="pre_div"),
    ]
    for i, n in enumerate(nodes):
        g.node.insert(i, n)
    g.input.remove(old)
    g.input.insert(0, raw)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def compact_names(path: Path) -> None:
    """Rename nodes and intermediate tensors to short ids, in place.

    tf2onnx keeps TensorFlow's scoped names ('StatefulPartitionedCall/.../BiasAdd__8:0'); every QDQ
    node and scale repeats them, which on small models makes the INT8 file larger than the float one.
    Graph inputs and outputs keep their names.
    """
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    keep = {v.name for v in [*g.input, *g.output]}
    mapping: dict[str, str] = {}

    def short(name: str, prefix: str) -> str:
        if not name or name in keep:
            return name
        if name not in mapping:
            mapping[name] = f"{prefix}{len(mapping)}"
        return mapping[name]

    for init in g.initializer:
        init.name = short(init.name, "w")
    for vi in g.value_info:
        vi.name = short(vi.name, "t")
    for i, node in enumerate(g.node):
        node.name = f"{node.op_type.lower()}_{i}"
        node.input[:] = [short(n, "t") for n in node.input]
        node.output[:] = [short(n, "t") for n in node.output]
    onnx.save(model, str(path))


def _patch_tf2onnx_memory() -> None:
    """Memory fixes to tf2onnx 1.17, which otherwise peaks at 7.3 GiB on Keras ResNet50 (98 MB of weights; 2.4 GiB with them).

    - Each of its ~24 optimizer passes ends in ``Node.update_proto``, which deletes a node's attributes and
      appends them again. Under protobuf's upb backend a deleted sub-message stays in the parent message's
      arena until the parent is freed, so every pass kept one more copy of every weight tensor (+97 MB per
      pass on ResNet50). Rebuilding each node's proto from its live fields lets the old arena go.
    - With ``catch_errors`` (its default), each pass works on ``copy.deepcopy(graph)``; the previous graph is a
      reference cycle, so without a collection several copies were alive at once.
    - Its freezing (``tf_loader.from_function``) keeps the frozen function and a session graph alive through
      grappler: see :func:`_lean_from_function`.

    None changes tf2onnx's output (the ONNX file is byte-identical; tests/converters/test_export_memory.py).
    """
    import copy
    import gc
    import types

    from tf2onnx import graph, optimizer, tf_loader

    if not all(hasattr(*a) for a in ((graph.Node, "update_proto"), (optimizer, "copy"), (tf_loader, "from_function"))):
        return  # not tf2onnx 1.17's layout: run it as it is
    if getattr(graph.Node.update_proto, "_edgekit", False):
        return
    update_proto = graph.Node.update_proto

    def fresh_update_proto(self, external_tensor_storage=None):
        self._op.ClearField("attribute")
        fresh = type(self._op)()
        fresh.CopyFrom(self._op)
        self._op = fresh
        return update_proto(self, external_tensor_storage)

    fresh_update_proto._edgekit = True  # type: ignore[attr-defined]
    graph.Node.update_proto = fresh_update_proto

    def deepcopy(x, memo=None):
        if isinstance(x, graph.Graph):
            gc.collect()  # the graph the previous pass replaced, before copying the next one
        return copy.deepcopy(x, memo)

    optimizer.copy = types.SimpleNamespace(deepcopy=deepcopy)
    tf_loader.from_function = _lean_from_function(tf_loader.from_function)


def _lean_from_function(from_function):
    """tf2onnx's ``tf_loader.from_function`` (freeze, then grappler), without the frozen ConcreteFunction and the session graph
    it keeps alive during grappler (two more copies of every weight: about 0.7 GB on ResNet50)."""
    import gc

    import tensorflow as tf
    from tf2onnx import tf_loader

    def lean(func, input_names, output_names, large_model=False):
        if large_model:
            return from_function(func, input_names, output_names, large_model)
        try:
            frozen = tf_loader.convert_variables_to_constants_v2(func, lower_control_flow=False, aggressive_inlining=True)
        except ValueError:  # tf2onnx's own fallback for freezing errors
            return from_function(func, input_names, output_names, large_model)
        graph_def = frozen.graph.as_graph_def(add_shapes=True)
        del frozen
        graph_def = tf_loader.fix_freezing_errors_part2(graph_def)
        with tf.Graph().as_default() as tf_graph, tf_loader.tf_session(graph=tf_graph) as sess:
            tf.import_graph_def(graph_def, name="")
            input_names = tf_loader.inputs_without_resource(sess, input_names)
        del tf_graph, sess
        gc.collect()
        with tf.Graph().as_default():
            return tf_loader.tf_optimize(input_names, output_names, graph_def)

    return lean


def tf2onnx_main(argv: list[str]) -> int:
    """``python -m tf2onnx.convert ARGS`` with :func:`_patch_tf2onnx_memory` applied (the child process's entry point)."""
    import sys

    from tf2onnx import convert

    _patch_tf2onnx_memory()
    sys.argv = ["tf2onnx.convert", *argv]
    convert.main()
    return 0


if __name__ == "__main__":  # python -m converters.onnx_export ARGS: tf2onnx's command line, memory-fixed
    import sys

    from edgekit.childproc import end_with_parent

    end_with_parent()

    sys.exit(tf2onnx_main(sys.argv[1:]))
