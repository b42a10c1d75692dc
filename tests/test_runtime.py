"""The runtime loader on real converted models (LiteRT), not mocks."""

import sys

import numpy as np
import pytest

from edgeq.bundle import read_bundle
from edgeq.errors import RuntimeLoadError
from edgeq.runtime import TensorInfo, load_runtime


def test_loads_preferred_runtime_and_reports_it():
    rt = load_runtime()
    assert rt.name == "ai-edge-litert" and rt.version[0].isdigit()
    with pytest.raises(RuntimeLoadError, match="unknown runtime"):
        load_runtime("onnx")


def test_tensorflow_fallback_runs_same_model(tiny_bundle):
    bundle = read_bundle(tiny_bundle)
    litert = bundle.load_model()
    tf_model = bundle.load_model(runtime=load_runtime("tensorflow"))
    assert tf_model.runtime.name == "tensorflow"
    x = np.random.default_rng(0).integers(-128, 128, litert.input.shape, dtype=np.int8)
    a, b = litert.run(x), tf_model.run(x)
    assert a.keys() == b.keys()
    for k in a:
        assert np.max(np.abs(a[k] - b[k])) <= litert.find_output(k).scale + 1e-9


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_quantize_dequantize_uses_tensor_parameters(dtype):
    t = TensorInfo("x", 0, (4,), np.dtype(dtype), scale=0.5, zero_point=10)
    x = np.array([-100.0, -1.25, 0.0, 3.0])
    q = t.quantize(x)
    info = np.iinfo(dtype)
    expected = np.clip(np.array([-200, -2.5, 0, 6]) + 10, info.min, info.max)
    expected[1] = -3 + 10  # round half away from zero, like TFLite's QUANTIZE
    np.testing.assert_array_equal(q, expected.astype(dtype))
    np.testing.assert_allclose(t.dequantize(q), 0.5 * (q.astype(np.float32) - 10))


def test_outputs_found_by_name_then_shape(tiny_bundle):
    model = read_bundle(tiny_bundle).load_model()
    out = next(t for t in model.outputs if list(t.shape) == [1, 3])  # the logits (the other: the projection)
    assert model.find_output(out.name) == out
    assert model.find_output("renamed:0", shape=[1, 3]) == out
    with pytest.raises(RuntimeLoadError, match="not in model"):
        model.find_output("renamed:0", shape=[1, 7])


def test_delegation_report_and_disabling_xnnpack(tiny_bundle):
    bundle = read_bundle(tiny_bundle)
    with_xnn = bundle.load_model()
    assert with_xnn.delegation.xnnpack_applied and with_xnn.delegation.whole_graph
    without = bundle.load_model(xnnpack=False)
    assert not without.delegation.xnnpack_applied
    assert set(without.delegation.cpu_ops) == {op.name for op in without.ops}
    x = np.zeros(with_xnn.input.shape, dtype=np.int8)
    assert with_xnn.describe()["runtime"] == "ai-edge-litert"
    # XNNPACK and the reference kernels agree to within one output step
    a, b = with_xnn.run(x), without.run(x)
    for k in a:
        assert np.max(np.abs(a[k] - b[k])) <= with_xnn.find_output(k).scale * 1.01


def test_threads_validated(tiny_bundle):
    with pytest.raises(RuntimeLoadError, match="num_threads"):
        read_bundle(tiny_bundle).load_model(num_threads=0)


def test_garbage_model_is_a_clean_error():
    from edgeq.runtime import Model

    with pytest.raises(RuntimeLoadError, match="could not load"):
        Model(b"not a flatbuffer" * 10)


def test_runtime_start_up_lines_only_with_verbose(tiny_bundle):
    """LiteRT's "INFO: Created ... XNNPACK delegate" line is kept off the terminal, in a real subprocess (it is
    written by C++ to descriptor 2); `edgeq -v`, anywhere on the line, shows it."""
    from conftest import run_edgeq

    quiet = run_edgeq("inspect", str(tiny_bundle))
    assert quiet.returncode == 0 and "XNNPACK delegate" not in quiet.stderr + quiet.stdout, quiet.stderr
    for argv in (("-v", "inspect", str(tiny_bundle)), ("inspect", str(tiny_bundle), "--verbose")):
        loud = run_edgeq(*argv)
        assert loud.returncode == 0 and "Created TensorFlow Lite XNNPACK delegate" in loud.stderr, loud.stderr


def test_a_runtime_error_line_still_shows_while_info_is_held(capfd):
    """What the runtime writes to descriptor 2 while an interpreter is made comes back, less the known info lines."""
    import os

    from edgeq.quiet import runtime_lines

    with runtime_lines():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\nERROR: something the user must see\n")
    err = capfd.readouterr().err
    assert "ERROR: something the user must see" in err and "XNNPACK delegate" not in err


def test_quiet_output_silences_python_prints_when_edgeq_runs_in_process():
    """TensorFlow's converter prints "Saved artifact at ..." with print(); in a process of its own quiet_output
    sinks it at the file descriptor, and in-process (sys.stdout a caller's capture) it must be sunk too, or a
    caller's `eval --json` is no longer JSON."""
    import contextlib
    import io

    from edgeq.converter.tf import quiet_output

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        with quiet_output():
            print("Saved artifact at '/tmp/x'. The following endpoints are available:")
            print("a warning", file=sys.stderr)
        print("kept")
    assert out.getvalue() == "kept\n" and err.getvalue() == ""
