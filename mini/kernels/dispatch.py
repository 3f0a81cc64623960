"""One kernel, three backends: compiled Triton, the Triton interpreter, and a PyTorch reference.

Every kernel of the book is a :class:`KernelOp`: a *launcher* (host code that checks its inputs,
picks a grid and launches one or more ``@triton.jit`` kernels) and a *reference* with the same
signature, written in plain PyTorch. Calling the op picks one backend:

========== ===================================================================================
backend    what runs
========== ===================================================================================
triton     the compiled kernel; CUDA tensors only
interpret  the same kernel under Triton's interpreter (numpy on the host; CPU tensors work), to
           test a kernel on a machine without a GPU
reference  the PyTorch reference
auto       the default: ``use_backend(...)`` if one is active, else the environment variable
           ``MINI_BACKEND``, else ``triton`` for CUDA tensors when triton is installed and
           ``reference`` otherwise
========== ===================================================================================

An explicit ``backend="triton" | "interpret" | "reference"`` argument wins over the context
manager and the environment variable; ``"auto"`` defers to them.

Defining an op::

    @triton.jit
    def _add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        ...

    def add_reference(x, y, out=None): ...

    @kernel_op(reference=add_reference)
    def add(jit, x, y, out=None):   # jit(f) makes a @triton.jit f launchable
        ...                         # check inputs, allocate `out`
        jit(_add_kernel)[grid](x, y, out, n, BLOCK=128)
        return out

    add(x, y)                      # auto
    add(x, y, backend="interpret") # the interpreter, on CPU tensors

How the interpreter is reached, on triton 3.0 through 3.9
---------------------------------------------------------
Triton decides between compiling and interpreting when ``@triton.jit`` *decorates* a function,
from ``TRITON_INTERPRET`` (``triton.knobs`` in new versions), and it decorates its own library
helpers (``tl.zeros``, ``tl.sum``, ``tl.max``, ...) once, when ``triton`` is imported. A process
that imported triton without that variable holds compiled ``JITFunction`` objects everywhere. To
interpret one of them anyway, :func:`interpreted` builds (once, cached) a
``triton.runtime.interpreter.InterpretedFunction`` from the jit function's Python source
``kernel.fn``, and the launch runs inside ``_interpreter_scope()``, which for its duration sets
``TRITON_INTERPRET=1`` and replaces every ``JITFunction`` attribute of the ``triton.language``
modules by an interpreted twin; everything under ``triton.language`` is snapshotted before and
restored after (the interpreter's own patches of ``tl`` builtins included), so compiled kernels
launched later in the same process are unaffected. ``JITFunction``, ``InterpretedFunction(fn)``
and the ``fn`` attribute exist from triton 3.0 to 3.9 (run here on 3.9; 3.0 read from its
source); nothing here uses ``triton.knobs``. Where triton was imported
with ``TRITON_INTERPRET=1`` already, kernels are ``InterpretedFunction`` from the start and are
used as they are. Rules for kernels this entails: call library helpers as ``tl.sum(x, axis=0)``,
not as tensor methods (``x.sum(0)`` is bound at import and is not swapped), and do not call your
own ``@triton.jit`` helpers from a kernel (inline them: only ``triton.language``'s are swapped).

See the book's :doc:`introduction </book/intro>`.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import sys
import types
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

__all__ = [
    "HAS_TRITON",
    "BACKENDS",
    "ENV_VAR",
    "KernelOp",
    "kernel_op",
    "use_backend",
    "current_backend",
    "resolve_backend",
    "interpreted",
    "check_same_device",
    "check_dtype",
    "check_contiguous",
    "check_shape",
    "check_tensor",
]

try:  # `import mini` must work where triton is not installed (macOS, some user environments)
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON: bool = True
except Exception:  # ImportError, or a broken install that fails at import
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

BACKENDS: tuple[str, ...] = ("auto", "triton", "interpret", "reference")
ENV_VAR = "MINI_BACKEND"

_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mini_backend", default=None
)


def _check_name(backend: Any, where: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r} ({where}); allowed: {', '.join(repr(b) for b in BACKENDS)}"
        )
    return backend


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run every op called inside the ``with`` block on ``backend`` unless a call names its own.

    ``with use_backend("interpret"): op(x)`` is how the tests run kernels on CPU tensors.

    See the book's :doc:`introduction </book/intro>`.
    """
    _check_name(backend, "use_backend")
    token = _context_backend.set(backend)
    try:
        yield
    finally:
        _context_backend.reset(token)


def current_backend() -> str:
    """The backend an ``"auto"`` call defers to: the context manager's, else ``$MINI_BACKEND``,
    else ``"auto"``.

    See the book's :doc:`introduction </book/intro>`.
    """
    ctx = _context_backend.get()
    if ctx is not None and ctx != "auto":
        return ctx
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check_name(env, f"environment variable {ENV_VAR}")
    return "auto"


def resolve_backend(backend: str | None, device: torch.device | str | None) -> str:
    """The concrete backend (``triton``, ``interpret`` or ``reference``) for tensors on ``device``.

    Raises ``ValueError`` for an unknown name or for ``triton`` with CPU tensors, and
    ``RuntimeError`` for ``triton``/``interpret`` where triton is not installed.

    See the book's :doc:`introduction </book/intro>`.
    """
    backend = "auto" if backend is None else _check_name(backend, "backend argument")
    if backend == "auto":
        backend = current_backend()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "auto":
        return "triton" if (dev.type == "cuda" and HAS_TRITON) else "reference"
    if backend in ("triton", "interpret") and not HAS_TRITON:
        raise RuntimeError(
            f"backend {backend!r} needs triton, which is not installed here; "
            "use backend='reference' (or 'auto'), or `pip install triton`"
        )
    if backend == "triton" and dev.type != "cuda":
        raise ValueError(
            f"backend 'triton' runs compiled kernels on CUDA tensors, but a {dev.type.upper()} tensor "
            f"(device {dev}) was handed to a CUDA-only path; use backend='interpret' (the Triton "
            "interpreter, slow) or backend='reference' (PyTorch), or move the tensors to a GPU"
        )
    return backend


# ---------------------------------------------------------------------------------------------
# The interpreter, reached from a compiled-mode process
# ---------------------------------------------------------------------------------------------
def _jit_classes() -> tuple[type, type | None]:
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover - very old triton
        InterpretedFunction = None  # type: ignore[assignment]
    return JITFunction, InterpretedFunction


_interpreted_cache: dict[int, Any] = {}
_compiled_cache: dict[int, Any] = {}


def interpreted(kernel: Any) -> Any:
    """An interpreted twin of a ``@triton.jit`` function (cached), launchable as ``f[grid](...)``.

    See the book's :doc:`introduction </book/intro>`.
    """
    if not HAS_TRITON:
        raise RuntimeError("the Triton interpreter needs triton, which is not installed")
    JITFunction, InterpretedFunction = _jit_classes()
    if InterpretedFunction is None:  # pragma: no cover
        raise RuntimeError(f"this triton ({triton.__version__}) has no interpreter")
    if isinstance(kernel, InterpretedFunction):  # triton imported with TRITON_INTERPRET=1
        return kernel
    fn = getattr(kernel, "fn", None)
    if fn is None:
        raise TypeError(f"expected a @triton.jit function, got {type(kernel).__name__}")
    key = id(kernel)
    if key not in _interpreted_cache:
        _interpreted_cache[key] = InterpretedFunction(fn)  # the 3.0 signature: fn only
    return _interpreted_cache[key]


def _compiled(kernel: Any) -> Any:
    """The compiled form of a kernel, also where triton was imported in interpreter mode."""
    JITFunction, InterpretedFunction = _jit_classes()
    if InterpretedFunction is not None and isinstance(kernel, InterpretedFunction):
        key = id(kernel)
        if key not in _compiled_cache:
            _compiled_cache[key] = JITFunction(kernel.fn)
        return _compiled_cache[key]
    return kernel


def _language_objects() -> list[Any]:
    """The ``triton.language`` modules and the classes defined in them (what the interpreter patches)."""
    objs: list[Any] = []
    seen: set[int] = set()
    for name, mod in list(sys.modules.items()):
        if not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        if not isinstance(mod, types.ModuleType) or id(mod) in seen:
            continue
        seen.add(id(mod))
        objs.append(mod)
        for value in list(vars(mod).values()):
            if isinstance(value, type) and getattr(value, "__module__", "").startswith("triton.language") \
                    and id(value) not in seen:
                seen.add(id(value))
                objs.append(value)
    return objs


def _snapshot(objs: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
    return [(obj, dict(vars(obj))) for obj in objs]


def _restore(snap: list[tuple[Any, dict[str, Any]]]) -> None:
    for obj, saved in snap:
        current = vars(obj)
        # Names the interpreter adds to a module (its AST rewriter injects helpers such as
        # `interpreter_semantic` into the globals of the functions it rewrites and caches) stay;
        # attributes added to classes (tensor.__index__, __bool__, ...) are removed.
        added = [] if isinstance(obj, types.ModuleType) else [k for k in current if k not in saved]
        for key in added:
            try:
                delattr(obj, key)
            except (AttributeError, TypeError):
                pass
        for key, value in saved.items():
            if current.get(key, _MISSING) is not value:
                try:
                    setattr(obj, key, value)
                except (AttributeError, TypeError):
                    pass


_MISSING = object()


@contextlib.contextmanager
def _interpreter_scope() -> Iterator[None]:
    """Make the ``triton.language`` helpers interpretable for the duration of a launch.

    The interpreter patches ``tl`` builtins with numpy versions while it runs, and a nested
    interpreted helper (``tl.sum``, ``tl.zeros``) does not undo its patches, nor did triton < 3.2
    at all; so everything under ``triton.language`` (module attributes and the attributes of its
    classes) is snapshotted before and restored after, and compiled kernels launched later in the
    same process see the language untouched.
    """
    JITFunction, InterpretedFunction = _jit_classes()
    snap = _snapshot(_language_objects())
    old_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for obj, saved in snap:
            if not isinstance(obj, types.ModuleType):
                continue
            for attr, value in saved.items():
                if isinstance(value, JITFunction):
                    setattr(obj, attr, interpreted(value))
        yield
    finally:
        _restore(snap)
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------
def _first_device(args: Sequence[Any], kwargs: dict[str, Any]) -> torch.device | None:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
        if isinstance(value, (tuple, list)):
            for v in value:
                if isinstance(v, torch.Tensor):
                    return v.device
    return None


class KernelOp:
    """A kernel with a Triton launcher and a PyTorch reference of the same signature.

    ``launch(jit, *args, **kwargs)`` receives ``jit``, a function that maps a ``@triton.jit``
    kernel to what should be launched on the chosen backend (compiled or interpreted), so one
    launcher serves both. ``op(*args, backend="auto", **kwargs)`` resolves the backend from the
    first tensor argument's device (see :func:`resolve_backend`) and runs it.

    See the book's :doc:`introduction </book/intro>`.
    """

    def __init__(self, launch: Callable[..., Any], reference: Callable[..., Any], name: str | None = None):
        self.launch = launch
        self.reference = reference
        self.name = name or getattr(launch, "__name__", "kernel_op")
        functools.update_wrapper(self, launch)

    def __call__(self, *args: Any, backend: str | None = "auto", **kwargs: Any) -> Any:
        concrete = resolve_backend(backend, _first_device(args, kwargs))
        if concrete == "reference":
            return self.reference(*args, **kwargs)
        if concrete == "interpret":
            with _interpreter_scope():
                return self.launch(interpreted, *args, **kwargs)
        return self.launch(_compiled, *args, **kwargs)

    def __repr__(self) -> str:
        return f"KernelOp({self.name})"


def kernel_op(reference: Callable[..., Any], name: str | None = None) -> Callable[[Callable[..., Any]], KernelOp]:
    """Decorator: turn a launcher ``launch(jit, *args, **kwargs)`` into a :class:`KernelOp`.

    See the book's :doc:`introduction </book/intro>`.
    """

    def wrap(launch: Callable[..., Any]) -> KernelOp:
        return KernelOp(launch, reference, name=name)

    return wrap


# ---------------------------------------------------------------------------------------------
# Checks at a wrapper's boundary: each message names the argument
# ---------------------------------------------------------------------------------------------
def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; returns it. ``check_same_device(Wa=Wa, mask=mask)``.

    See the book's :doc:`introduction </book/intro>`.
    """
    devices = {name: t.device for name, t in tensors.items()}
    unique = set(devices.values())
    if len(unique) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return next(iter(unique))


def check_dtype(name: str, t: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``t``'s dtype is one of ``allowed``.

    See the book's :doc:`introduction </book/intro>`.
    """
    allowed = tuple(allowed)
    if t.dtype not in allowed:
        raise TypeError(
            f"{name} must have dtype {' or '.join(str(a) for a in allowed)}, got {t.dtype}"
        )


def check_contiguous(name: str, t: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``t`` is contiguous (kernels index it flat).

    See the book's :doc:`introduction </book/intro>`.
    """
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
            f"pass {name}.contiguous()"
        )


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int | None]) -> None:
    """``shape`` may hold ``None`` for a free dimension.

    See the book's :doc:`introduction </book/intro>`.
    """
    ok = t.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, t.shape))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def check_tensor(
    name: str,
    t: Any,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    ndim: int | None = None,
    contiguous: bool = True,
) -> None:
    """Type, dtype, rank, shape and contiguity of one argument, with messages naming it.

    See the book's :doc:`introduction </book/intro>`.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        check_dtype(name, t, dtypes)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {tuple(t.shape)}")
    if shape is not None:
        check_shape(name, t, shape)
    if contiguous:
        check_contiguous(name, t)
