"""Tests of mini.cogo.kernel (closed form, Triton under the interpreter) and mini.cogo.trainer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mini.cogo.kernel import fused_loss_and_grads, loss_and_grads_reference
from mini.cogo.trainer import TrainConfig, init_weights, make_masks, train, train_per_seed_autograd
from mini.kernels import HAS_TRITON, check_against_reference

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    """The trainer's "auto" must mean the closed form on CPU here, whatever $MINI_BACKEND says."""
    monkeypatch.delenv("MINI_BACKEND", raising=False)


def _weights(S, q, d, gen, dtype=torch.float32):
    Wa = (torch.rand(S, q, d, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
    Wb = (torch.rand(S, q, d, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
    Wc = (torch.rand(S, d, q, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
    mask = (torch.rand(S, d, d, generator=gen) < 0.8).to(dtype)
    mask[:, 0, 0] = 1.0  # every seed has a training pair
    return Wa, Wb, Wc, mask


def _autograd(Wa, Wb, Wc, mask):
    """Σ_s L_s through autograd on the plain convention, float64, one-hot inputs."""
    S, q, d = Wa.shape
    Wa, Wb, Wc = (w.detach().double().requires_grad_() for w in (Wa, Wb, Wc))
    E = torch.eye(d, dtype=torch.float64)
    P = E - 1.0 / d
    a, b = torch.meshgrid(torch.arange(d), torch.arange(d), indexing="ij")
    a, b = a.flatten(), b.flatten()
    losses = []
    for s in range(S):
        o = ((E[a] @ Wa[s].T + E[b] @ Wb[s].T) ** 2) @ Wc[s].T  # (d², d)
        per = ((o - E[(a + b) % d]) @ P).pow(2).sum(1)
        m = mask[s].flatten().double()
        losses.append((per * m).sum() / m.sum())
    total = torch.stack(losses).sum()
    total.backward()
    return torch.stack(losses).detach(), Wa.grad, Wb.grad, Wc.grad


@pytest.mark.parametrize("q,d", [(8, 5), (13, 7)])
def test_reference_matches_autograd(q, d):
    gen = torch.Generator().manual_seed(q * d)
    args = _weights(3, q, d, gen, torch.float64)
    for got, want in zip(loss_and_grads_reference(*args), _autograd(*args)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@needs_triton
@pytest.mark.parametrize("q,d", [(8, 5), (13, 7), (40, 3)])
def test_kernel_under_interpreter_matches_autograd(q, d):
    gen = torch.Generator().manual_seed(100 + q * d)
    args = _weights(2, q, d, gen)
    got = fused_loss_and_grads(*args, backend="interpret")
    for g, w in zip(got, _autograd(*args)):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-4)


@needs_triton
def test_kernel_against_reference_poisoned():
    def make(size, gen):
        S, q, d = size
        return _weights(S, q, d, gen)

    check_against_reference(fused_loss_and_grads, loss_and_grads_reference, make,
                            sizes=[(2, 8, 5), (1, 13, 7), (2, 70, 2), (1, 16, 17)], atol=2e-5, rtol=1e-4)


def test_kernel_input_errors():
    gen = torch.Generator().manual_seed(0)
    Wa, Wb, Wc, mask = _weights(2, 8, 5, gen)
    if HAS_TRITON:  # the kernel is float32-only
        with pytest.raises(TypeError, match="Wb must have dtype torch.float32, got torch.float64"):
            fused_loss_and_grads(Wa, Wb.double(), Wc, mask, backend="interpret")
    with pytest.raises(TypeError, match="Wb must have dtype torch.float32 or torch.float64, got torch.float16"):
        fused_loss_and_grads(Wa, Wb.half(), Wc, mask, backend="reference")
    with pytest.raises(TypeError, match="must share one dtype"):
        fused_loss_and_grads(Wa, Wb.double(), Wc, mask, backend="reference")
    with pytest.raises(ValueError, match=r"Wc must have shape \(2, 5, 8\)"):
        fused_loss_and_grads(Wa, Wb, Wc.transpose(1, 2).contiguous(), mask)
    with pytest.raises(ValueError, match="Wa on cpu, Wb on cpu, Wc on cpu, mask on meta"):
        fused_loss_and_grads(Wa, Wb, Wc, mask.to("meta"))
    with pytest.raises(ValueError, match="only 0 .* and 1"):
        fused_loss_and_grads(Wa, Wb, Wc, mask * 0.5)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"seed\(s\) \[1\] has no training pair"):
        fused_loss_and_grads(Wa, Wb, Wc, empty)
    if HAS_TRITON:
        with pytest.raises(ValueError, match="CUDA-only path"):
            fused_loss_and_grads(Wa, Wb, Wc, mask, backend="triton")


def test_seed_gradient_independent_of_batch_size():
    """Summing the seeds' losses: seed 0's gradient is the same alone and in a batch of 3."""
    gen = torch.Generator().manual_seed(5)
    Wa, Wb, Wc, mask = _weights(3, 12, 7, gen, torch.float64)
    alone = loss_and_grads_reference(Wa[:1], Wb[:1], Wc[:1], mask[:1])
    batch = loss_and_grads_reference(Wa, Wb, Wc, mask)
    for x, y in zip(alone, batch):
        torch.testing.assert_close(x[0], y[0], atol=0, rtol=0)


# ------------------------------------------------------------------------------- trainer
def test_trainer_matches_per_seed_autograd():
    cfg = TrainConfig(d=7, q=16, seeds=2, steps=20, dtype=torch.float64, progress=False, log_every=5,
                      weight_decay=1e-3)
    fast, slow = train(cfg), train_per_seed_autograd(cfg)
    for x, y in zip((fast.Wa, fast.Wb, fast.Wc), (slow.Wa, slow.Wb, slow.Wc)):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-8)
    np.testing.assert_allclose(fast.history["train_loss"], slow.history["train_loss"], rtol=1e-8, atol=1e-12)
    assert list(fast.history["step"]) == [0, 5, 10, 15, 20]


def test_trainer_reduces_loss_and_shapes():
    res = train(TrainConfig(d=7, q=64, seeds=2, steps=300, progress=False, log_every=100))
    loss = res.history["train_loss"]  # (T, S)
    assert loss.shape == (4, 2)
    assert np.all(loss[-1] < 0.05 * loss[0]), loss
    assert np.all(res.history["train_acc"][-1] == 1.0)
    assert res.Wa.shape == (2, 64, 7) and res.Wc.shape == (2, 7, 64) and res.Wa.dtype == torch.float64
    assert res.mask.shape == (2, 7, 7) and int((~res.mask[0]).sum()) == int(0.1 * 49)
    assert res.elapsed_s > 0


def test_single_seed_equals_seed_in_batch():
    """Init, split and trajectory of seed base+1 do not depend on the batch around it."""
    kw = dict(d=7, q=16, steps=30, progress=False, log_every=10, weight_decay=1e-2)
    batch = train(TrainConfig(seeds=3, seed=4, **kw))
    single = train(TrainConfig(seeds=1, seed=5, **kw))
    torch.testing.assert_close(single.Wa[0], batch.Wa[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(single.Wc[0], batch.Wc[1], atol=1e-6, rtol=1e-5)
    assert torch.equal(single.mask[0], batch.mask[1])
    assert not torch.equal(batch.mask[0], batch.mask[1])  # each seed its own split


def test_init_and_split_reproducible():
    cfg = TrainConfig(d=5, q=8, seeds=2, progress=False)
    a, b = init_weights(cfg), init_weights(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert float(a[0].abs().max()) <= 1 / 5**0.5 and float(a[2].abs().max()) <= 1 / 8**0.5
    assert torch.equal(make_masks(cfg), make_masks(cfg))


@pytest.mark.parametrize(
    "field,value,exc,msg",
    [
        ("d", 1, ValueError, "TrainConfig.d must be an integer >= 2"),
        ("d", 7.0, TypeError, "TrainConfig.d must be an integer"),
        ("q", 0, ValueError, "TrainConfig.q"),
        ("seeds", 0, ValueError, "TrainConfig.seeds"),
        ("steps", -1, ValueError, "TrainConfig.steps"),
        ("lr", 0.0, ValueError, "TrainConfig.lr must be > 0"),
        ("weight_decay", -1e-5, ValueError, "TrainConfig.weight_decay must be >= 0"),
        ("test_fraction", 1.0, ValueError, "0 <= test_fraction < 1"),
        ("test_fraction", -0.1, ValueError, "0 <= test_fraction < 1"),
        ("dtype", torch.float16, TypeError, "TrainConfig.dtype"),
        ("backend", "gpu", ValueError, "TrainConfig.backend"),
    ],
)
def test_config_errors(field, value, exc, msg):
    with pytest.raises(exc, match=msg):
        TrainConfig(**{field: value})


def test_zero_steps_and_no_test_pairs():
    res = train(d=5, q=8, seeds=1, steps=0, test_fraction=0.0, progress=False)
    assert list(res.history["step"]) == [0]
    assert np.isnan(res.history["test_acc"][0, 0])


@needs_triton
def test_kernels_compile_for_cuda_without_a_gpu(tmp_path, monkeypatch):
    """The compiled path type-checks: lower both kernels to a cubin for sm_90 (no GPU needed),
    after an interpreted run in the same process (which must leave triton.language untouched).

    Best effort: skipped where this triton lacks the ahead-of-time API used here (< 3.3).
    """
    import os

    import triton

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("triton was imported in interpreter mode: its helpers cannot be compiled")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import ASTSource
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget")
    import inspect

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip("this triton's ASTSource takes another signature")
    import mini.cogo.kernel as K

    gen = torch.Generator().manual_seed(3)
    fused_loss_and_grads(*_weights(1, 8, 5, gen), backend="interpret")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile for real, not from the cache
    ptr, i32 = "*fp32", "i32"
    names = {
        K._cogo_residual_kernel: ["Wa_ptr", "Wb_ptr", "Wc_ptr", "mask_ptr", "inv_n_ptr", "G_ptr", "loss_part_ptr"],
        K._cogo_grad_kernel: ["Wa_ptr", "Wb_ptr", "Wc_ptr", "G_ptr", "dWa_ptr", "dWb_ptr", "dWc_ptr"],
    }
    bd, bq1, bq2, nw = K._blocks(512, 23)
    for kern, ptrs in names.items():
        kern = getattr(kern, "fn", kern)  # the Python function, whatever mode triton was imported in
        jit_fn = triton.runtime.jit.JITFunction(kern)
        sig = {**{p: ptr for p in ptrs}, "q": i32, "d": i32, "BLOCK_D": "constexpr", "BLOCK_Q": "constexpr"}
        bq = bq1 if "residual" in kern.__name__ else bq2
        try:
            compiled = triton.compile(ASTSource(jit_fn, sig, constexprs={"BLOCK_D": bd, "BLOCK_Q": bq}),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": nw, "num_stages": 2})
        except (ImportError, FileNotFoundError, RuntimeError) as err:  # no nvidia backend / ptxas
            if "ptxas" in str(err) or "backend" in str(err).lower():
                pytest.skip(f"no CUDA toolchain in this triton: {err}")
            raise
        assert compiled.asm["ptx"].count(".local") == 0  # no register spills
