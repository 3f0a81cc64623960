"""Time one optimizer step of GaLore on a Llama model: mini vs galore-torch vs torch AdamW (CPU).

Part II (``mini.galore``). For each model size the gradients are fixed random tensors (so only
the optimizer is timed) and each optimizer runs

- ``torch.optim.AdamW`` on all parameters (the full-rank baseline);
- ``galore_torch.GaLoreAdamW`` (the official package) and ``mini.galore.GaLoreAdamW`` with the
  same param groups (``mini.galore.groups.galore_param_groups``: attention and MLP matrices
  projected, the rest plain AdamW);
- ``mini.galore.GaLoreAdamW8bit`` (8-bit block-wise moments);

twice: with ``update_proj_gap`` larger than the run (steady steps, no SVD) and with
``update_proj_gap = 1`` (an SVD at every step, the cost the gap amortises). Writes
``bench/results/galore_step.json``. CPU timings only: no GPU figure is claimed from them.

    python bench/galore_step.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import time

import torch

from mini.galore import GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups
from mini.kernels import bench
from mini.lm import build_model, tiny_llama_config

SIZES = {  # name: LlamaConfig overrides (vocab 64, the book's char tokenizer)
    "tiny (0.8M)": {},
    "small (13M)": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
}


def _optimizers(model, rank: int, gap: int) -> dict:
    import galore_torch

    def groups():
        return galore_param_groups(model, rank=rank, update_proj_gap=gap, scale=0.25, proj_type="std")

    return {
        "torch AdamW": lambda: torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0),
        "galore-torch GaLoreAdamW": lambda: galore_torch.GaLoreAdamW(groups(), lr=1e-3),
        "mini GaLoreAdamW": lambda: GaLoreAdamW(groups(), lr=1e-3),
        "mini GaLoreAdamW8bit": lambda: GaLoreAdamW8bit(groups(), lr=1e-3, weight_decay=0.0),
    }


def run(quick: bool) -> list[dict]:
    rows = []
    for size, overrides in list(SIZES.items())[: 1 if quick else None]:
        model = build_model(tiny_llama_config(vocab_size=64, **overrides), seed=0)
        gen = torch.Generator().manual_seed(0)
        grads = [torch.randn(p.shape, generator=gen) * 1e-2 for p in model.parameters()]
        rank = 32 if size.startswith("tiny") else 128
        for gap, label in ((10**9, "steady (no SVD)"), (1, "SVD every step")):
            for name, make in _optimizers(model, rank, gap).items():
                if gap == 1 and name == "torch AdamW":
                    continue
                opt = make()

                def step():
                    for p, g in zip(model.parameters(), grads):
                        p.grad = g
                    opt.step()

                kw = dict(warmup=2, rep=5 if quick else 20, min_time_s=0.0 if quick else 1.0)
                ms = bench.time_op(step, device="cpu", **kw)
                n_params = sum(p.numel() for p in model.parameters())
                rows.append({"model": size, "params": n_params, "rank": rank, "mode": label,
                             "optimizer": name, "step_ms": ms})
                print(f"[cpu] {size:12s} r={rank:<4d} {label:16s} {name:26s} {ms:8.2f} ms/step", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny model only, few repetitions")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = run(args.quick)
    path = bench.write_result("galore_step", {"quick": args.quick, "cpu_rows": rows,
                                              "total_s": time.perf_counter() - t0}, device="cpu")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
