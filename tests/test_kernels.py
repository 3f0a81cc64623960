"""Tests of mini.kernels: dispatch, its errors, the reference checker, the bench harness."""
from __future__ import annotations

import json

import pytest
import torch

from mini.kernels import (
    HAS_TRITON,
    check_against_reference,
    check_same_device,
    check_tensor,
    kernel_op,
    resolve_backend,
    use_backend,
)
from mini.kernels import bench

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) + tl.load(y_ptr + offs, mask=m), mask=m)

    @triton.jit
    def _buggy_add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n - 1  # the bug: the last element is never written
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) + tl.load(y_ptr + offs, mask=m), mask=m)

    @triton.jit
    def _sum_rows_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):  # uses the library's tl.sum
        offs = tl.arange(0, BLOCK)
        row = tl.program_id(0)
        x = tl.load(x_ptr + row * n + offs, mask=offs < n, other=0.0)
        tl.store(out_ptr + row, tl.sum(x, axis=0))


def add_reference(x, y, out=None):
    if out is None:
        return x + y
    return torch.add(x, y, out=out)


def _make_add(kernel_name):
    @kernel_op(reference=add_reference, name=kernel_name)
    def op(jit, x, y, out=None):
        check_tensor("x", x, dtypes=(torch.float32,), ndim=1)
        check_tensor("y", y, dtypes=(torch.float32,), shape=x.shape)
        check_same_device(x=x, y=y)
        out = torch.empty_like(x) if out is None else out
        BLOCK = 128
        kernel = globals()[kernel_name]
        jit(kernel)[(triton.cdiv(x.numel(), BLOCK),)](x, y, out, x.numel(), BLOCK=BLOCK)
        return out

    return op


add = _make_add("_add_kernel")
buggy_add = _make_add("_buggy_add_kernel")


def _add_inputs(n, gen):
    return torch.randn(n, generator=gen), torch.randn(n, generator=gen)


# ------------------------------------------------------------------------------- dispatch
def test_unknown_backend_lists_allowed():
    x = torch.ones(3)
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*'auto', 'triton', 'interpret', 'reference'"):
        add(x, x, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        with use_backend("fast"):
            pass


def test_env_var_unknown_backend(monkeypatch):
    monkeypatch.setenv("MINI_BACKEND", "gpu")
    with pytest.raises(ValueError, match="MINI_BACKEND"):
        resolve_backend("auto", "cpu")


def test_auto_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv("MINI_BACKEND", raising=False)
    assert resolve_backend("auto", "cpu") == "reference"
    assert resolve_backend("reference", "cpu") == "reference"


@needs_triton
def test_triton_on_cpu_tensor_is_a_clear_error():
    x = torch.ones(3)
    with pytest.raises(ValueError, match="CPU tensor .* CUDA-only path.*backend='interpret'.*'reference'"):
        add(x, x, backend="triton")


@needs_triton
def test_precedence_argument_context_env(monkeypatch):
    monkeypatch.setenv("MINI_BACKEND", "reference")
    assert resolve_backend("auto", "cpu") == "reference"
    with use_backend("interpret"):
        assert resolve_backend("auto", "cpu") == "interpret"  # context beats env
        assert resolve_backend("reference", "cpu") == "reference"  # argument beats context
    monkeypatch.setenv("MINI_BACKEND", "interpret")
    assert resolve_backend("auto", "cpu") == "interpret"


def test_triton_missing_is_a_clear_error(monkeypatch):
    import mini.kernels.dispatch as dispatch

    monkeypatch.delenv("MINI_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="needs triton, which is not installed"):
        dispatch.resolve_backend("interpret", "cpu")
    assert dispatch.resolve_backend("auto", "cpu") == "reference"


def test_device_mismatch_names_arguments():
    a = torch.ones(2)
    b = torch.ones(2, device="meta")
    with pytest.raises(ValueError, match="x on cpu, y on meta"):
        check_same_device(x=a, y=b)


def test_wrong_dtype_names_argument():
    x = torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="x must have dtype torch.float32, got torch.float64"):
        check_tensor("x", x, dtypes=(torch.float32,))
    if HAS_TRITON:
        with pytest.raises(TypeError, match="x must have dtype torch.float32, got torch.float64"):
            add(x, x, backend="interpret")


def test_shape_and_contiguity_messages():
    x = torch.ones(4, 6)
    with pytest.raises(ValueError, match=r"Wc must have shape \(4, \*, 5\), got \(4, 6\)"):
        check_tensor("Wc", x, shape=(4, None, 5))
    with pytest.raises(ValueError, match="Wt must be contiguous"):
        check_tensor("Wt", x.t())
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        check_tensor("mask", [1, 2])


# ------------------------------------------------------------------------------- checker
@needs_triton
def test_correct_kernel_passes_at_odd_sizes():
    report = check_against_reference(add, add_reference, _add_inputs, sizes=[1, 127, 128, 1000], atol=0, rtol=0)
    assert [r["size"] for r in report] == [1, 127, 128, 1000]


@needs_triton
def test_checker_catches_an_unwritten_element():
    with pytest.raises(AssertionError, match="did not write"):
        check_against_reference(buggy_add, add_reference, _add_inputs, sizes=[127])


@needs_triton
def test_checker_refuses_zero_inputs():
    with pytest.raises(ValueError, match="all-zero"):
        check_against_reference(add, add_reference, lambda n, g: (torch.zeros(n), torch.zeros(n)), sizes=[8])


@needs_triton
def test_interpreter_runs_library_helpers_and_restores_them():
    from triton.runtime.jit import JITFunction

    from mini.kernels.dispatch import KernelOp

    def ref(x, out=None):
        return x.sum(1) if out is None else torch.sum(x, 1, out=out)

    def launch(jit, x, out=None):
        out = torch.empty(x.shape[0]) if out is None else out
        jit(_sum_rows_kernel)[(x.shape[0],)](x, out, x.shape[1], BLOCK=64)
        return out

    op = KernelOp(launch, ref)
    check_against_reference(op, ref, lambda n, g: torch.randn(3, n, generator=g), sizes=[1, 33, 64])
    assert isinstance(tl.sum, JITFunction) or not isinstance(_sum_rows_kernel, JITFunction)


# ------------------------------------------------------------------------------- bench
def test_bench_time_op_and_write_result(tmp_path):
    ms = bench.time_op(torch.add, torch.ones(10), torch.ones(10), warmup=1, rep=3, min_time_s=0.0)
    assert ms > 0
    info = bench.device_info("cpu")
    assert info["gpu"] is None and info["torch"] == torch.__version__
    path = bench.write_result("unit_test", {"sizes": [10], "ms": [ms]}, device="cpu", directory=tmp_path)
    data = json.loads(path.read_text())
    assert data["gpu"] is None and data["smoke"] is True and data["ms"] == [ms]
    with pytest.raises(ValueError, match="plain file stem"):
        bench.write_result("../x", {}, directory=tmp_path)
    with pytest.raises(ValueError, match="CUDA device"):
        bench.measured_ceiling("cpu")


def test_find_result_looks_up_from_the_working_directory(tmp_path, monkeypatch):
    from mini.kernels.bench import find_result

    monkeypatch.setenv("MINI_BENCH_RESULTS", str(tmp_path / "none"))
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "x.json").write_text("{}")
    (tmp_path / "labs" / "cogo").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "labs" / "cogo")
    assert find_result("x.json") == tmp_path / "bench" / "results" / "x.json"
    assert find_result("missing.json") is None
    monkeypatch.setenv("MINI_BENCH_RESULTS", str(tmp_path / "bench" / "results"))
    monkeypatch.chdir("/")
    assert find_result("x.json") == tmp_path / "bench" / "results" / "x.json"  # results_dir()
    with pytest.raises(ValueError, match="filename must be a plain file name"):
        find_result("../x.json")
