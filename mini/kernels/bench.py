"""The bench harness: time an op, describe the machine, measure its ceilings, write a result.

- :func:`time_op` returns a median time in milliseconds: ``triton.testing.do_bench`` on CUDA
  (CUDA events, cache flushed between runs), a warm-up-then-median wall-clock timer on CPU.
- :func:`device_info` names the device and the torch / triton versions.
- :func:`measured_ceiling` measures, on a GPU, the memory bandwidth (a large device-to-device
  copy, read + write bytes over time) and a float32 matmul's TFLOP/s (TF32 off, the precision of
  the book's float32 kernels), the figures a kernel's GB/s and TFLOP/s are compared with.
- :func:`write_result` writes ``bench/results/<name>.json`` with all of that. On a CPU the record
  carries ``"gpu": null`` and ``"smoke": true``: a CPU run checks the script, its times are not
  the book's GPU figures.

See the book's :doc:`introduction </book/intro>`.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["time_op", "device_info", "measured_ceiling", "write_result", "results_dir"]


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def time_op(
    fn: Callable[..., Any],
    *args: Any,
    warmup: int = 3,
    rep: int = 10,
    min_time_s: float = 0.2,
    max_time_s: float = 20.0,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> float:
    """Median milliseconds of ``fn(*args, **kwargs)``.

    On CUDA: ``triton.testing.do_bench`` (``warmup``/``rep`` read there as milliseconds, its
    defaults 25/100 used when the values here are small), or CUDA events without triton. On CPU:
    ``warmup`` calls, then at least ``rep`` timed calls and at least ``min_time_s`` seconds (at
    most ``max_time_s``), median of the per-call wall-clock times.

    See the book's :doc:`introduction </book/intro>`.
    """
    dev = torch.device(device) if device is not None else _device_of(args, kwargs)
    call = lambda: fn(*args, **kwargs)  # noqa: E731
    if dev.type == "cuda":
        try:
            import triton.testing as tt

            try:
                return float(tt.do_bench(call, warmup=max(25, warmup), rep=max(100, rep), return_mode="median"))
            except TypeError:  # a triton without return_mode
                return float(tt.do_bench(call, warmup=max(25, warmup), rep=max(100, rep), quantiles=[0.5])[0])
        except ImportError:
            for _ in range(warmup):
                call()
            torch.cuda.synchronize(dev)
            times = []
            for _ in range(max(rep, 10)):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                torch.cuda.synchronize(dev)
                times.append(start.elapsed_time(end))
            return float(statistics.median(times))
    for _ in range(warmup):
        call()
    times: list[float] = []
    t_begin = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
        elapsed = time.perf_counter() - t_begin
        if (len(times) >= rep and elapsed >= min_time_s) or elapsed >= max_time_s:
            break
    return float(statistics.median(times))


def device_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """The device, the versions and the thread count, for a result's header.

    See the book's :doc:`introduction </book/intro>`.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cpu_name": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(
            device=torch.cuda.get_device_name(dev),
            gpu=torch.cuda.get_device_name(dev),
            cuda=torch.version.cuda,
            sm_count=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
        )
    else:
        info.update(device="cpu", gpu=None)
    return info


def measured_ceiling(device: torch.device | str = "cuda", copy_mib: int = 1024, matmul_n: int = 8192) -> dict[str, float]:
    """Measured memory bandwidth (GB/s) and float32 matmul throughput (TFLOP/s) on a GPU.

    Bandwidth: a ``copy_mib`` MiB device-to-device copy, counting the bytes read and written.
    Matmul: ``matmul_n``-square float32 with TF32 off (``"ieee"``, as the book's kernels use),
    and with TF32 on for reference.

    See the book's :doc:`introduction </book/intro>`.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"measured_ceiling needs a CUDA device, got {dev}")
    n = copy_mib * 2**20 // 4
    src = torch.empty(n, device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = time_op(lambda: dst.copy_(src), device=dev)
    gbps = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    del src, dst
    a = torch.randn(matmul_n, matmul_n, device=dev)
    b = torch.randn(matmul_n, matmul_n, device=dev)
    old = torch.backends.cuda.matmul.allow_tf32
    out: dict[str, float] = {"copy_gbps": gbps}
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            ms = time_op(torch.mm, a, b)
            out["matmul_tf32_tflops" if tf32 else "matmul_fp32_tflops"] = 2 * matmul_n**3 / (ms * 1e-3) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return out


def results_dir() -> Path:
    """``bench/results`` of the checkout (``$MINI_BENCH_RESULTS`` overrides).

    See the book's :doc:`introduction </book/intro>`.
    """
    env = os.environ.get("MINI_BENCH_RESULTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "bench" / "results"


def find_result(filename: str) -> Path | None:
    """The recorded ``bench/results/<filename>`` a notebook can read, or None.

    Looks in the working directory and its parents first (a notebook in a clone, or on Colab
    after ``git clone`` and ``%cd mini``), then in :func:`results_dir` (an editable install).

    See the book's :doc:`introduction </book/intro>`.
    """
    if not filename or any(c in filename for c in "/\\") or filename.startswith("."):
        raise ValueError(f"filename must be a plain file name, got {filename!r}")
    here = Path.cwd()
    for directory in [*(p / "bench" / "results" for p in [here, *here.parents]), results_dir()]:
        if (directory / filename).is_file():
            return directory / filename
    return None


def write_result(name: str, record: dict[str, Any], device: torch.device | str | None = None,
                 directory: str | Path | None = None) -> Path:
    """Write ``<directory or bench/results>/<name>.json``: ``record`` plus device and versions.

    On a GPU the record should carry times, sizes and GB/s / TFLOP/s next to
    :func:`measured_ceiling`; on a CPU ``"gpu": null`` and ``"smoke": true`` are set.

    See the book's :doc:`introduction </book/intro>`.
    """
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    info = device_info(device)
    full: dict[str, Any] = {"name": name, "written_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    full.update(info)
    if info.get("gpu") is None:
        full["gpu"] = None
        full["smoke"] = True
    else:
        full.setdefault("smoke", False)
    full.update(record)
    out_dir = Path(directory) if directory is not None else results_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(full, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)
