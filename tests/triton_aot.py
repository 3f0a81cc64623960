"""Lower a Triton kernel to PTX for a CUDA target without a GPU, for the kernel tests.

One place for what every "compiles for CUDA" test needs: skip where triton was imported in
interpreter mode, where this triton lacks the ahead-of-time API (``ASTSource`` with
``constexprs``, triton >= 3.3), or where it has no CUDA toolchain (nvidia backend, ptxas).
"""
from __future__ import annotations

import inspect
import os
from typing import Any

import pytest


def compile_ptx(kernel: Any, signature: dict[str, str], constexprs: dict[str, Any], num_warps: int,
                cache_dir: Any, monkeypatch: Any, arch: int = 90) -> str:
    """PTX of ``kernel`` (a ``@triton.jit`` function) for sm_``arch``; ``pytest.skip`` if impossible."""
    import triton

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("triton was imported in interpreter mode: its helpers cannot be compiled")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import ASTSource
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget")
    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip("this triton's ASTSource takes another signature")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache_dir))
    jit_fn = triton.runtime.jit.JITFunction(getattr(kernel, "fn", kernel))
    try:
        compiled = triton.compile(ASTSource(jit_fn, signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    except (ImportError, FileNotFoundError, RuntimeError) as err:  # no nvidia backend / ptxas
        if "ptxas" in str(err) or "backend" in str(err).lower():
            pytest.skip(f"no CUDA toolchain in this triton: {err}")
        raise
    return compiled.asm["ptx"]
