"""Time one training step of Part I's network (mini.cogo): batched closed form vs the paper's loop.

(a) CPU (always): the trainer's step (closed-form gradients of S seeds at once,
    ``loss_and_grads_reference``, + one Adam step) vs the paper-style loop (one seed at a time,
    nn.Linear on one-hot inputs, autograd, Adam), at d = 23, q = 512, for S = 1 and S = 5.
(b) GPU (when CUDA is available): ``fused_loss_and_grads`` on the compiled Triton kernel vs the
    PyTorch reference vs ``torch.compile`` of the reference, with GB/s and TFLOP/s from
    ``mini.cogo.kernel.work_counts`` next to the measured ceiling.

Writes bench/results/cogo_step.json through mini.kernels.bench. ``--quick`` runs the smallest
case only, for checking the script.

    python bench/cogo_step.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from mini.cogo.kernel import fused_loss_and_grads, loss_and_grads_reference, work_counts
from mini.cogo.trainer import TrainConfig, init_weights, make_masks
from mini.kernels import bench


def _state(S: int, q: int, d: int, device: str):
    cfg = TrainConfig(d=d, q=q, seeds=S, steps=1, device=device, progress=False)
    Wa, Wb, Wc = init_weights(cfg)
    mask = make_masks(cfg).to(device=device, dtype=torch.float32)
    return cfg, Wa, Wb, Wc, mask


def batched_step_fn(S: int, q: int, d: int, device: str = "cpu", backend: str = "reference"):
    cfg, Wa, Wb, Wc, mask = _state(S, q, d, device)
    params = [torch.nn.Parameter(w) for w in (Wa, Wb, Wc)]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step():
        _, *grads = fused_loss_and_grads(*(p.detach() for p in params), mask, backend=backend, validate=False)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    return step


def autograd_step_fn(S: int, q: int, d: int, device: str = "cpu"):
    cfg, Wa, Wb, Wc, mask = _state(S, q, d, device)
    nets = []
    for s in range(S):
        layers = [torch.nn.Linear(d, q, bias=False), torch.nn.Linear(d, q, bias=False), torch.nn.Linear(q, d, bias=False)]
        with torch.no_grad():
            for layer, w in zip(layers, (Wa[s], Wb[s], Wc[s])):
                layer.weight.copy_(w)
        pairs = mask[s].flatten().nonzero().flatten()
        a, b = pairs // d, pairs % d
        xa = torch.nn.functional.one_hot(a, d).float()
        xb = torch.nn.functional.one_hot(b, d).float()
        y = (a + b) % d
        opt = torch.optim.Adam([l.weight for l in layers], lr=cfg.lr, weight_decay=cfg.weight_decay)
        nets.append((layers, xa, xb, y, opt))

    def step():
        for (la, lb, lc), xa, xb, y, opt in nets:
            o = lc((la(xa) + lb(xb)) ** 2)
            ob = o.mean(1, keepdim=True)
            loss = (((o - ob) ** 2).sum(1) - 2 * (o.gather(1, y[:, None]) - ob).squeeze(1) + 1 - 1 / d).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step


def cpu_part(quick: bool) -> list[dict]:
    rows = []
    d, q = 23, 512
    for S in ([1] if quick else [1, 5]):
        kw = dict(warmup=1 if quick else 3, rep=3 if quick else 20, min_time_s=0.0 if quick else 1.0)
        t_batched = bench.time_op(batched_step_fn(S, q, d), device="cpu", **kw)
        t_auto = bench.time_op(autograd_step_fn(S, q, d), device="cpu", **kw)
        rows.append({"S": S, "q": q, "d": d, "batched_closed_form_ms": t_batched,
                     "per_seed_autograd_ms": t_auto, "speedup": t_auto / t_batched})
        print(f"[cpu] S={S} q={q} d={d}: batched closed form {t_batched:.2f} ms/step, "
              f"per-seed autograd {t_auto:.2f} ms/step ({t_auto / t_batched:.1f}x)", flush=True)
    return rows


def gpu_part(quick: bool) -> tuple[dict, list[dict]]:
    dev = "cuda"
    ceiling = bench.measured_ceiling(dev)
    print(f"[gpu] ceiling: {ceiling}", flush=True)
    sizes = [(5, 512, 23)] if quick else [(5, 512, 23), (10, 512, 23), (5, 1024, 71), (5, 2048, 127)]
    rows = []
    compiled = torch.compile(loss_and_grads_reference)
    for S, q, d in sizes:
        _, Wa, Wb, Wc, mask = _state(S, q, d, dev)
        work = work_counts(S, q, d)
        row = {"S": S, "q": q, "d": d, **work}
        ref = loss_and_grads_reference(Wa, Wb, Wc, mask)
        got = fused_loss_and_grads(Wa, Wb, Wc, mask, backend="triton")
        row["max_abs_err_vs_reference"] = max(float((x - y).abs().max()) for x, y in zip(got, ref))
        cands = {
            "triton": lambda: fused_loss_and_grads(Wa, Wb, Wc, mask, backend="triton", validate=False),
            "reference": lambda: loss_and_grads_reference(Wa, Wb, Wc, mask, validate=False),
            "torch_compile": lambda: compiled(Wa, Wb, Wc, mask, validate=False),
        }
        for name, fn in cands.items():
            try:
                ms = bench.time_op(fn, device=dev)
            except Exception as err:  # torch.compile can fail on an old stack: record it
                row[f"{name}_error"] = repr(err)[:300]
                continue
            row[f"{name}_ms"] = ms
            row[f"{name}_gbps"] = work["bytes"] / (ms * 1e-3) / 1e9
            row[f"{name}_tflops"] = work["flops"] / (ms * 1e-3) / 1e12
        row["triton_fraction_of_fp32_matmul"] = row.get("triton_tflops", 0.0) / ceiling["matmul_fp32_tflops"]
        rows.append(row)
        print(f"[gpu] {row}", flush=True)
    return ceiling, rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smallest case only (checks the script)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    record: dict = {"quick": args.quick, "cpu_rows": cpu_part(args.quick)}
    device = "cpu"
    if torch.cuda.is_available():
        device = "cuda"
        ceiling, rows = gpu_part(args.quick)
        record.update(ceiling=ceiling, gpu_rows=rows)
    record["total_s"] = time.perf_counter() - t0
    path = bench.write_result("cogo_step", record, device=device)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
