"""Test a kernel against its reference: fresh random inputs, odd sizes, poisoned outputs.

:func:`check_against_reference` is what every kernel test of the book calls. For each size it
builds fresh random inputs (refusing all-zero ones: a kernel that forgets a term still matches
on zeros), runs the reference, fills output buffers with a poison value (NaN for floating
outputs, a sentinel for integer ones) and hands them to the kernel through its ``out=`` argument,
so an element the kernel never writes stays poisoned and fails the comparison. Choose sizes that
are and are not multiples of the kernel's block (1, BLOCK-1, BLOCK, a few thousand).

Kernel wrappers therefore take ``out=`` (a tensor, or a tuple of tensors for several outputs),
write into it and return it; see :mod:`mini.kernels.dispatch` for the op convention.

See the book's :doc:`introduction </book/intro>`.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = ["check_against_reference", "poisoned_like", "SENTINEL_INT"]

SENTINEL_INT = -0x5EED  # poison for integer outputs


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def poisoned_like(t: torch.Tensor, poison: float = float("nan")) -> torch.Tensor:
    """A fresh buffer like ``t`` filled with ``poison`` (NaN) or, for integer dtypes, a sentinel.

    See the book's :doc:`introduction </book/intro>`.
    """
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return torch.full_like(t, poison)
    if t.dtype == torch.bool:
        return torch.zeros_like(t)  # no spare value; rely on the reference holding some True
    info = torch.iinfo(t.dtype)
    if info.min <= SENTINEL_INT <= info.max:
        return torch.full_like(t, SENTINEL_INT)
    return torch.full_like(t, info.max)  # uint8 and friends: the largest value is the sentinel


def _accepts_out(fn: Any) -> bool:
    target = getattr(fn, "launch", fn)  # a KernelOp's launcher holds the real signature
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return "out" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _split_inputs(made: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[1], dict) and isinstance(made[0], (tuple, list)):
        return tuple(made[0]), dict(made[1])
    if isinstance(made, dict):
        return (), dict(made)
    return _as_tuple(made), {}


def _refuse_zeros(args: Sequence[Any], kwargs: dict[str, Any], size: Any) -> None:
    named = [(f"positional argument {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    for name, value in named:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 1:
            if not bool(value.ne(0).any()):
                raise ValueError(
                    f"make_inputs gave an all-zero {name} at size {size!r}: use random inputs, "
                    "a kernel that drops a term still matches on zeros"
                )


def check_against_reference(
    op_or_fn: Callable[..., Any],
    reference: Callable[..., Any],
    make_inputs: Callable[[Any, torch.Generator], Any],
    sizes: Iterable[Any],
    atol: float = 1e-5,
    rtol: float = 1e-5,
    poison: float | None = float("nan"),
    backend: str = "interpret",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run ``op_or_fn`` on ``backend`` against ``reference`` for each size; raise on a mismatch.

    See the book's :doc:`introduction </book/intro>`.

    Args:
        op_or_fn: a :class:`~mini.kernels.dispatch.KernelOp` or a function taking ``backend=``
            (and ideally ``out=``).
        reference: the PyTorch reference, called with the same inputs.
        make_inputs: ``make_inputs(size, generator)`` returns the positional arguments (a tuple),
            or ``(args, kwargs)``. Use the generator, so every size gets fresh random values.
        sizes: the sizes to try; include ones that are not multiples of the block size.
        atol, rtol: tolerances of :func:`torch.testing.assert_close`.
        poison: the value written into the output buffers before the kernel runs (NaN by
            default; ``None`` to skip poisoning, for an op without ``out=``).
        backend: ``"interpret"`` on a CPU machine; ``"triton"`` for the compiled kernel on a GPU.
        seed: seeds the generator handed to ``make_inputs``.

    Returns one record per size with the largest absolute error of each output.
    """
    gen = torch.Generator().manual_seed(seed)
    use_out = poison is not None and _accepts_out(op_or_fn)
    report: list[dict[str, Any]] = []
    for size in sizes:
        args, kwargs = _split_inputs(make_inputs(size, gen))
        _refuse_zeros(args, kwargs, size)
        expected = _as_tuple(reference(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args], **kwargs))
        call_kwargs = dict(kwargs)
        buffers: tuple[Any, ...] | None = None
        if use_out:
            buffers = tuple(poisoned_like(e, poison) if isinstance(e, torch.Tensor) else e for e in expected)
            call_kwargs["out"] = buffers if len(buffers) > 1 else buffers[0]
        got = _as_tuple(op_or_fn(*args, backend=backend, **call_kwargs))
        if len(got) != len(expected):
            raise AssertionError(f"size {size!r}: the kernel returned {len(got)} outputs, the reference {len(expected)}")
        errors = []
        for i, (g, e) in enumerate(zip(got, expected)):
            if buffers is not None and isinstance(g, torch.Tensor) and g.data_ptr() != buffers[i].data_ptr():
                raise AssertionError(f"size {size!r}: output {i} was not written into the out= buffer it was given")
            if isinstance(g, torch.Tensor):
                g_cpu, e_cpu = g.detach().cpu(), e.detach().cpu()
                unwritten = torch.isnan(g_cpu) & ~torch.isnan(e_cpu) if g_cpu.is_floating_point() else g_cpu.eq(SENTINEL_INT) & e_cpu.ne(SENTINEL_INT)
                if bool(unwritten.any()):
                    idx = unwritten.nonzero()[0].tolist()
                    raise AssertionError(
                        f"size {size!r}: output {i} has {int(unwritten.sum())} element(s) the kernel did not "
                        f"write (still poisoned), first at index {idx}"
                    )
                try:
                    torch.testing.assert_close(g_cpu, e_cpu, atol=atol, rtol=rtol)
                except AssertionError as err:
                    raise AssertionError(f"size {size!r}, output {i}: {err}") from None
                errors.append(float((g_cpu.double() - e_cpu.double()).abs().max()) if g_cpu.numel() else 0.0)
            else:
                if g != e:
                    raise AssertionError(f"size {size!r}, output {i}: {g!r} != {e!r}")
                errors.append(0.0)
        report.append({"size": size, "max_abs_err": errors})
    return report
