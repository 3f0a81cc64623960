"""Time one training step of Part I's network (mini.cogo): batched closed form vs the paper's loop.

(a) CPU (always): the trainer's step (closed-form gradients of S seeds at once,
    ``loss_and_grads_reference`` into reused buffers, + one fused Adam step) and the reference
    alone, vs the paper-style loop (one seed at a time, nn.Linear on one-hot inputs, autograd,
    Adam), at the labs' size (S = 10, d = 11, q = 128) and the paper's (d = 23, q = 512, S = 1
    and 5), on 1 and 2 torch threads. Times are medians on a machine others may share: a busy
    core slows the 2-thread cases several-fold (OpenMP threads wait on each other).
(b) GPU (when CUDA is available): ``fused_loss_and_grads`` on the compiled Triton kernel vs the
    PyTorch reference vs ``torch.compile`` of the reference, with GB/s and TFLOP/s from
    ``mini.cogo.kernel.work_counts`` next to the measured ceiling.

Writes bench/results/cogo_step.json through mini.kernels.bench. ``--quick`` runs the smallest
case only, for checking the script. ``--before FILE`` copies the CPU rows of an earlier record
(e.g. one written before a change) into this one as ``cpu_rows_before``.

    python bench/cogo_step.py [--quick] [--threads 1,2] [--before FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mini.cogo.kernel import fused_loss_and_grads, loss_and_grads_reference, work_counts
from mini.cogo.trainer import TrainConfig, init_weights, make_masks
from mini.kernels import bench


def _state(S: int, q: int, d: int, device: str):
    cfg = TrainConfig(d=d, q=q, seeds=S, steps=1, device=device, progress=False)
    Wa, Wb, Wc = init_weights(cfg)
    mask = make_masks(cfg).to(device=device, dtype=torch.float32)
    return cfg, Wa, Wb, Wc, mask


CPU_SIZES = [(10, 128, 11), (1, 512, 23), (5, 512, 23)]  # (S, q, d): the labs', the paper's


def batched_step_fn(S: int, q: int, d: int, device: str = "cpu", backend: str = "reference"):
    """One step as ``mini.cogo.train`` takes it (on a CPU: reused buffers, fused Adam)."""
    cfg, Wa, Wb, Wc, mask = _state(S, q, d, device)
    params = [torch.nn.Parameter(w) for w in (Wa, Wb, Wc)]
    cpu = torch.device(device).type == "cpu"
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True if cpu else None)
    weights = [p.detach() for p in params]
    if backend == "reference":
        grads = (torch.empty(S, device=device), *(torch.empty_like(w) for w in weights))
        for p, g in zip(params, grads[1:]):
            p.grad = g
        workspace: dict = {}

        def step():
            loss_and_grads_reference(*weights, mask, out=grads, validate=False, workspace=workspace)
            opt.step()

        return step

    def step():
        _, *grads = fused_loss_and_grads(*weights, mask, backend=backend, validate=False)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    return step


def reference_fn(S: int, q: int, d: int, device: str = "cpu"):
    """The closed-form gradients alone, as the trainer calls them on a CPU."""
    _, Wa, Wb, Wc, mask = _state(S, q, d, device)
    out = (torch.empty(S, device=device), torch.empty_like(Wa), torch.empty_like(Wb), torch.empty_like(Wc))
    workspace: dict = {}
    return lambda: loss_and_grads_reference(Wa, Wb, Wc, mask, out=out, validate=False, workspace=workspace)


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


def cpu_part(quick: bool, threads: list[int]) -> list[dict]:
    rows = []
    before = torch.get_num_threads()
    try:
        for th in threads:
            torch.set_num_threads(th)
            for S, q, d in ([(1, 512, 23)] if quick else CPU_SIZES):
                kw = dict(warmup=1 if quick else 5, rep=3 if quick else 30, min_time_s=0.0 if quick else 1.5)
                t_batched = bench.time_op(batched_step_fn(S, q, d), device="cpu", **kw)
                t_ref = bench.time_op(reference_fn(S, q, d), device="cpu", **kw)
                t_auto = bench.time_op(autograd_step_fn(S, q, d), device="cpu", **kw)
                rows.append({"threads": th, "S": S, "q": q, "d": d, "batched_closed_form_ms": t_batched,
                             "reference_ms": t_ref, "per_seed_autograd_ms": t_auto, "speedup": t_auto / t_batched})
                print(f"[cpu] threads={th} S={S} q={q} d={d}: batched closed form {t_batched:.2f} ms/step "
                      f"(gradients {t_ref:.2f}), per-seed autograd {t_auto:.2f} ms/step "
                      f"({t_auto / t_batched:.1f}x)", flush=True)
    finally:
        torch.set_num_threads(before)
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
    ap.add_argument("--threads", default="1,2", help="torch CPU thread counts of the CPU part (default 1,2)")
    ap.add_argument("--before", default=None, help="an earlier cogo_step.json whose cpu_rows to keep")
    args = ap.parse_args(argv)
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        ap.error(f"--threads must be positive integers separated by commas, got {args.threads!r}")
    t0 = time.perf_counter()
    record: dict = {"quick": args.quick, "cpu_rows": cpu_part(args.quick, threads)}
    if args.before:
        earlier = json.loads(Path(args.before).read_text())
        record["cpu_rows_before"] = {"written_utc": earlier.get("written_utc"), "rows": earlier.get("cpu_rows")}
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
