"""Our TensorRT plugin registrations through TensorRT's own `tensorrt.plugin` code, on CPU.

`tensorrt-cu13-bindings` (PyPI) ships TensorRT's Python plugin layer (`tensorrt_bindings/plugin/`:
`_validate.py`, `_lib.py`, `_tensor.py`) but its compiled module cannot load without TensorRT's
libraries. The stand-in below replaces only that compiled module: a permissive `tensorrt` module with
the few base classes the plugin layer subclasses. Everything that checks our code (signature
validation, `ShapeExpr`, `KernelLaunchParams`, `SymIntExprs`) is TensorRT's real code.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import re
import sys
import types
from pathlib import Path

import pytest


class _Anything:
    """Whatever the plugin layer asks the compiled module for: callable, any attribute, comparable."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name: str) -> _Anything:
        return _Anything()

    def __call__(self, *args, **kwargs) -> _Anything:
        return _Anything()


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


class _Dim:
    """A build-time-constant dimension, as TensorRT's IDimensionExpr presents one."""

    def __init__(self, value: int):
        self.value = value

    def is_constant(self) -> bool:
        return True

    def get_constant_value(self) -> int:
        return self.value


def _bindings_folder() -> Path:
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("tensorrt-cu13-bindings is not installed: pip install tensorrt-cu13-bindings")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture
def trtp(monkeypatch: pytest.MonkeyPatch):
    """`tensorrt.plugin` from tensorrt-cu13-bindings over a stand-in for TensorRT's compiled module."""
    folder = _bindings_folder()
    for name in [m for m in sys.modules if m == "tensorrt" or m.startswith(("tensorrt.", "tensorrt_bindings"))]:
        monkeypatch.delitem(sys.modules, name)
    package = types.ModuleType("tensorrt_bindings")  # its real __init__ loads TensorRT's libraries
    package.__path__ = [str(folder)]
    trt = _StandInModule("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # so find_spec("tensorrt") sees it
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, *a: None,
                                     "log": lambda self, *a: None})
    for base in ("IPluginV3", "IPluginV3OneCore", "IPluginV3OneBuild", "IPluginV3OneRuntime",
                 "IPluginV3QuickCore", "IPluginV3QuickBuild", "IPluginV3QuickAOTBuild", "IPluginV3QuickRuntime",
                 "IPluginCreatorV3Quick", "ISymExpr", "DynamicPluginTensorDesc",
                 "PluginTensorDesc"):
        setattr(trt, base, type(base, (), {"__init__": lambda self, *a, **k: None}))
    trt.IDimensionExpr = _Dim
    trt.Dims = type("Dims", (), {"MAX_DIMS": 8})
    trt.float32, trt.int32, trt.bfloat16, trt.float16 = "fp32", "i32", "bf16", "fp16"
    monkeypatch.setitem(sys.modules, "tensorrt_bindings", package)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    plugin = importlib.import_module("tensorrt_bindings.plugin")
    trt.plugin = plugin
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", plugin)
    yield plugin
    for name in [m for m in sys.modules if m.startswith("tensorrt_bindings.")]:  # built over the stand-in
        del sys.modules[name]


def _fresh_register():
    """plugins.trt.register() without its once-per-process cache (each test has a fresh registry)."""
    from dspark_trt.plugins import trt as dspark_trt_plugins

    return dspark_trt_plugins.register.__wrapped__


def test_registrations_pass_tensorrts_signature_validation(trtp):
    _fresh_register()()
    from tensorrt_bindings.plugin._lib import QDP_REGISTRY

    for name, tensors, attrs, outputs in (
        ("MarkovSample", 9, {"kind": str, "noise_source": str}, 4),
        ("DSparkConfidence", 5, {"with_markov": int}, 3),
        ("DSparkSchedule", 6, {"mode": str}, 1),
    ):
        plugin = QDP_REGISTRY[f"dspark::{name}"]
        assert len(plugin.input_tensor_names) == tensors
        assert plugin.input_attrs == attrs
        assert plugin.num_outputs == outputs
        assert plugin.impl_func is not None and plugin.aot_impl_func is not None
        assert plugin.aot_impl_attr_names == list(attrs)


def test_string_annotations_are_what_tensorrt_rejects(trtp):
    """The class of bug this file guards against: `from __future__ import annotations` in plugins/trt.py."""
    namespace: dict = {}
    exec("from __future__ import annotations\n"
         "def desc(x: trtp.TensorDesc, kind: str) -> trtp.TensorDesc:\n    return x.like()\n", namespace)
    namespace["trtp"] = trtp
    with pytest.raises(ValueError, match="TensorDescs args should come first"):
        trtp.register("dspark_test::StringAnnotated")(namespace["desc"])


def test_constant_reads_constant_value_as_a_method(trtp):
    from dspark_trt.plugins.trt import _constant

    assert _constant(trtp.ShapeExpr(_Dim(32))) == 32


def _compile_in_child(tmp_path: Path):
    """aot.compile_spec for a process running Triton's interpreter (other test files turn it on)."""
    from dspark_trt.plugins import aot

    def compile_spec(spec: aot.KernelSpec, arch: str, ptx_version: int | None = None) -> aot.Compiled:
        out = tmp_path / spec.variant
        entry = aot.compile_plugins(out, [arch], [spec], ptx_version=ptx_version)["kernels"][0]
        return aot.Compiled(spec, arch, entry["kernel_name"], (out / entry["ptx"]).read_text(),
                            (out / entry["cubin"]).read_bytes(), entry["num_warps"], entry["shared_mem"],
                            entry["ptx_version"], 0.0, (out / entry["tensorrt_ptx"]).read_text())

    return compile_spec


# plugin -> (input shapes, attributes, output shapes, expected int32 scalars); B 4, γ 7, V 64, R 32, D 16
AOT_CASES = {
    "MarkovSample": ([(4, 7, 64), (4, 7, 16), (4,), (4,), (4, 7), (64, 32), (64, 32), (32, 32), (32,)],
                     ("vanilla", "philox"), [(4, 7), (4, 7, 64), (4, 7, 32), (4, 32)], [7, 64, 32, 16]),
    "DSparkConfidence": ([(4, 7, 16), (4, 7, 32), (1, 48), (1,), (7,)], (1,), [(4, 7)] * 3, [7, 16, 32]),
    "DSparkSchedule": ([(4, 7), (8,), (8,), (5,), (5,), (2,)], ("production",), [(4,)], [4, 7, 8, 5]),
}


@pytest.mark.parametrize("plugin_name", list(AOT_CASES))
def test_aot_impl_returns_what_tensorrt_launches(trtp, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 plugin_name: str):
    """The AOT implementation, called as TensorRT's `get_launch_params` calls it, reads constant dimensions
    and returns PTX whose entry declares exactly the arguments TensorRT passes: input pointers, the
    SymIntExprs, output pointers."""
    from dspark_trt.plugins import trt as dspark_trt_plugins
    from dspark_trt.plugins.interpret import interpreter_active

    if interpreter_active():
        monkeypatch.setattr(dspark_trt_plugins.aot, "compile_spec", _compile_in_child(tmp_path))
    monkeypatch.setattr(dspark_trt_plugins, "_device_arch", lambda: "sm_90")
    monkeypatch.setattr(dspark_trt_plugins, "_driver_ptx_version", lambda: None)
    _fresh_register()()
    from tensorrt_bindings.plugin._lib import QDP_REGISTRY

    def desc(dims: tuple[int, ...]):
        return trtp.from_shape_expr(trtp.ShapeExprs.from_tuple([trtp.ShapeExpr(_Dim(d)) for d in dims]), dtype="fp32")

    shapes, attrs, output_shapes, scalars = AOT_CASES[plugin_name]
    inputs, outputs = [desc(s) for s in shapes], tuple(desc(s) for s in output_shapes)
    # get_launch_params enters a shape context (an expression builder) before calling aot_impl
    monkeypatch.setattr(trtp._tensor.SymIntExpr, "_exprBuilder", types.SimpleNamespace(constant=_Dim))
    name, ptx, params, extra = QDP_REGISTRY[f"dspark::{plugin_name}"].aot_impl_func(*inputs, *attrs, outputs, 0)
    assert isinstance(params, trtp.KernelLaunchParams) and isinstance(extra, trtp.SymIntExprs)
    # (SymInt32.constant_value() itself fails outside TensorRT's shape context; read the dimension.)
    assert [e._expr.get_constant_value() for e in extra] == scalars
    entry = re.search(rb"\.entry (\w+)\((.*?)\)", ptx, re.DOTALL)
    assert entry.group(1) == name
    declared = re.findall(rb"\.param (\.u64|\.u32)", entry.group(2))
    assert declared == [b".u64"] * len(inputs) + [b".u32"] * len(extra) + [b".u64"] * len(outputs)
