"""LoCoCo's full grid on the long-context LM: cache policies at equal size, seeds, a longer context, LoRA.

Part III (``mini.lococo``; the LoCoCo lab, ``labs/lococo/compression.ipynb``, reads the result). On
the shipped ``longctx-lm`` (2-layer RoPE Llama, GQA, trained at context 512), prefilled in chunks of
64 with the cache compressed to ``M`` slots per layer and KV head before each chunk, the accuracy of
the answer on 256 examples per cell for

- the policies full cache (the ceiling), StreamingLLM (4 sinks + recent), H2O (accumulated
  attention), TopLatest (top-M by the previous chunk's attention), LoCoCo untrained, LoCoCo trained
  (150 steps, batch 16, lr 0.05, LM frozen) and uniform mixing (η trained, A uniform);
- M ∈ {32, 64}, tasks needle retrieval and majority vote, seeds 0, 1, 2 (a seed sets the
  compressor's initial weights, its training batches and the evaluation examples);
- context 1024 (twice the LM's training length) at M = 64: full attention against the fixed-size
  caches, LoCoCo trained at 512 (the grid's compressor) and trained at 1024;
- LoRA (r 8, α 16, lr 1e-3) trained jointly with LoCoCo at M = 32 on a copy of the LM: LoCoCo's
  accuracy with the tuned LM, and the tuned LM's own full-cache accuracy.

Each compressor is trained on the task it is evaluated on (needle with 8 queries per example for
more signal, majority as evaluated). Writes ``bench/results/lococo_grid.json`` (per-seed values,
mean/min/max, settings, wall time, versions); about 15 minutes on one core.

    MINI_THREADS=1 OMP_NUM_THREADS=1 python bench/lococo_grid.py            # the full grid
    MINI_THREADS=1 OMP_NUM_THREADS=1 python bench/lococo_grid.py --quick    # seconds, checks the script
    MINI_THREADS=1 OMP_NUM_THREADS=1 python bench/lococo_grid.py --default-setting  # about 2 minutes

``--default-setting`` checks the lab's own default run (M = 32, 150 training steps, 128 needle
examples) over seeds 0, 1, 2 through :func:`mini.lococo.compare_policies`, the call the lab
makes, and writes ``bench/results/lococo_default_seeds.json``: the range the lab's default claim
is asserted against.
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import numpy as np

import mini
from mini.assets import load_asset
from mini.kernels import bench
from mini.lm.kvcache import H2O, ExplicitLM, StreamingLLM, TopLatest
from mini.lm.longctx import MajorityTask, NeedleTask
from mini.lococo import LoCoCo, compare_policies, evaluate_policy, train_compressor

POLICIES = ("full", "StreamingLLM", "H2O", "TopLatest", "LoCoCo untrained", "LoCoCo trained",
            "uniform trained")
CHUNK = 64


def tasks(context_len: int) -> dict[str, tuple[Any, Any]]:
    """``{task: (evaluation task, training task)}`` at ``context_len``."""
    return {"needle": (NeedleTask(context_len), NeedleTask(context_len, n_queries=8)),
            "majority": (MajorityTask(context_len), MajorityTask(context_len))}


def summary(values: list[float]) -> dict[str, Any]:
    """Per-seed values with their mean, min and max."""
    return {"values": values, "mean": float(np.mean(values)), "min": float(min(values)),
            "max": float(max(values))}


def trained(lm: ExplicitLM, budget: int, task: Any, *, seed: int, steps: int, mixing: str = "conv",
            lr: float = 5e-2, lora_rank: int = 0) -> tuple[LoCoCo, dict[str, Any]]:
    """A LoCoCo policy initialised with ``seed`` and trained on ``task`` (batches seeded by ``seed``)."""
    policy = LoCoCo.for_model(lm, budget, seed=seed, mixing=mixing)
    out = train_compressor(lm, policy, task, steps=steps, chunk_size=CHUNK, batch_size=16, lr=lr,
                           lora_rank=lora_rank, seed=seed)
    return policy, out


def default_setting() -> None:
    """The lab's default run on needle (M = 32, 150 steps, 128 examples) over seeds 0, 1, 2."""
    t0 = time.perf_counter()
    lm = ExplicitLM.from_hf(load_asset("longctx-lm").eval())
    settings = {"budget": 32, "steps": 150, "n_examples": 128, "seeds": [0, 1, 2]}
    rows = {"TopLatest": [], "LoCoCo trained": []}
    for s in settings["seeds"]:
        acc, _ = compare_policies(lm, NeedleTask(512), settings["budget"],
                                  train_task=NeedleTask(512, n_queries=8), steps=settings["steps"],
                                  seed=s, n_examples=settings["n_examples"], policies=tuple(rows))
        for p, values in rows.items():
            values.append(acc[p])
        print(f"seed {s}: " + ", ".join(f"{p} {acc[p]:.3f}" for p in rows), flush=True)
    gap = [a - b for a, b in zip(rows["LoCoCo trained"], rows["TopLatest"])]
    record = {"settings": settings, "needle": {p: summary(v) for p, v in rows.items()},
              "needle_gap": summary(gap), "seconds": time.perf_counter() - t0,
              "versions": mini.versions()}
    path = bench.write_result("lococo_default_seeds", record, device="cpu")
    print(f"wrote {path}: LoCoCo − TopLatest {min(gap):.3f} to {max(gap):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny setting (checks the script; writes lococo_grid_quick)")
    ap.add_argument("--default-setting", action="store_true",
                    help="only the lab's default run over seeds 0-2 (writes lococo_default_seeds)")
    args = ap.parse_args()
    mini.setup(seed=0, verbose=False)  # one thread
    if args.default_setting:
        default_setting()
        return
    t_start = time.perf_counter()
    seeds = (0,) if args.quick else (0, 1, 2)
    steps, n_eval = (3, 32) if args.quick else (150, 256)
    budgets = (32,) if args.quick else (32, 64)
    long_len, long_budget = 1024, 64
    model = load_asset("longctx-lm").eval()
    lm = ExplicitLM.from_hf(model)
    cfg = {"asset": "longctx-lm", "context_len": 512, "chunk_size": CHUNK, "n_eval": n_eval,
           "eval_seed": "100 + seed", "train_steps": steps, "train_batch": 16, "lr": 5e-2,
           "hh_keep_rate": 0.5, "kernel_size": 21, "eta_init": 0.5, "streaming_sinks": 4, "h2o_recent": 0,
           "seeds": list(seeds), "budgets": list(budgets), "long_context_len": long_len,
           "long_budget": long_budget, "lora": {"rank": 8, "alpha": 16, "lr": 1e-3, "budget": 32}}
    grid: dict[str, dict[str, dict[str, list[float]]]] = {}  # task -> M -> policy -> per-seed
    etas: dict[str, dict[str, list[list[float]]]] = {}
    train_s: list[float] = []
    keep: dict[tuple[str, int, int], LoCoCo] = {}  # (task, M, seed) -> trained policy (for 1024)
    for name, (task, train_task) in tasks(512).items():
        full = [evaluate_policy(lm, None, task, chunk_size=CHUNK, n_examples=n_eval, seed=100 + s)
                for s in seeds]
        for M in budgets:
            cell: dict[str, list[float]] = {p: [] for p in POLICIES}
            cell["full"] = full
            for s in seeds:
                def ev(policy: Any, s: int = s, task: Any = task) -> float:
                    return evaluate_policy(lm, policy, task, chunk_size=CHUNK, n_examples=n_eval, seed=100 + s)

                cell["StreamingLLM"].append(ev(StreamingLLM(M, sinks=4)))
                cell["H2O"].append(ev(H2O(M)))
                cell["TopLatest"].append(ev(TopLatest(M)))
                cell["LoCoCo untrained"].append(ev(LoCoCo.for_model(lm, M, seed=s)))
                pol, out = trained(lm, M, train_task, seed=s, steps=steps)
                train_s.append(out["seconds"])
                keep[(name, M, s)] = pol
                etas.setdefault(name, {}).setdefault(str(M), []).append(out["etas"])
                cell["LoCoCo trained"].append(ev(pol))
                uni, out = trained(lm, M, train_task, seed=s, steps=steps, mixing="uniform")
                train_s.append(out["seconds"])
                cell["uniform trained"].append(ev(uni))
                print(f"{name} M={M} seed {s}: " + ", ".join(f"{p} {v[-1]:.3f}" for p, v in cell.items()),
                      flush=True)
            grid.setdefault(name, {})[str(M)] = {p: summary(v) for p, v in cell.items()}
    print(f"grid done in {time.perf_counter() - t_start:.0f} s", flush=True)

    # longer context: 1024 tokens (the LM was trained at 512), M = 64
    t_long = time.perf_counter()
    M = long_budget if not args.quick else budgets[0]
    long: dict[str, dict[str, list[float]]] = {}
    for name, (task, train_task) in tasks(long_len).items():
        cell = {p: [] for p in ("full", "StreamingLLM", "H2O", "TopLatest", "LoCoCo trained at 512",
                                "LoCoCo trained at 1024")}
        for s in seeds:
            def ev(policy: Any, s: int = s, task: Any = task) -> float:
                return evaluate_policy(lm, policy, task, chunk_size=CHUNK, n_examples=n_eval, seed=100 + s,
                                       batch_size=16)

            cell["full"].append(ev(None))
            cell["StreamingLLM"].append(ev(StreamingLLM(M, sinks=4)))
            cell["H2O"].append(ev(H2O(M)))
            cell["TopLatest"].append(ev(TopLatest(M)))
            cell["LoCoCo trained at 512"].append(ev(keep[(name, M, s)]))
            pol, out = trained(lm, M, train_task, seed=s, steps=steps)
            train_s.append(out["seconds"])
            cell["LoCoCo trained at 1024"].append(ev(pol))
            print(f"{name} context {long_len} M={M} seed {s}: "
                  + ", ".join(f"{p} {v[-1]:.3f}" for p, v in cell.items()), flush=True)
        long[name] = {p: summary(v) for p, v in cell.items()}
    long_s = time.perf_counter() - t_long

    # LoRA on q, k, v, o trained jointly with LoCoCo at M = 32, on a copy of the LM
    t_lora = time.perf_counter()
    M = 32
    lora: dict[str, dict[str, Any]] = {}
    for name, (task, train_task) in tasks(512).items():
        cell = {p: [] for p in ("LoCoCo + LoRA", "tuned LM, full cache", "tuned LM, TopLatest")}
        for s in seeds:
            lm_t = ExplicitLM.from_hf(copy.deepcopy(model))
            pol, out = trained(lm_t, M, train_task, seed=s, steps=steps, lora_rank=8)

            def ev(policy: Any, s: int = s, task: Any = task, lm_t: ExplicitLM = lm_t) -> float:
                return evaluate_policy(lm_t, policy, task, chunk_size=CHUNK, n_examples=n_eval, seed=100 + s)

            cell["LoCoCo + LoRA"].append(ev(pol))
            cell["tuned LM, full cache"].append(ev(None))
            cell["tuned LM, TopLatest"].append(ev(TopLatest(M)))
            print(f"{name} LoRA M={M} seed {s}: " + ", ".join(f"{p} {v[-1]:.3f}" for p, v in cell.items())
                  + f" ({out['lora_params']} LoRA parameters, {out['seconds']:.0f} s)", flush=True)
        lora[name] = {p: summary(v) for p, v in cell.items()}
        lora[name]["lora_params"] = out["lora_params"]
    lora_s = time.perf_counter() - t_lora

    total = time.perf_counter() - t_start
    record = {"config": cfg, "grid": grid, "etas": etas, "long_context": long, "lora": lora,
              "seconds": {"total": total, "long_context": long_s, "lora": lora_s,
                          "train_per_run_mean": float(np.mean(train_s))},
              "versions": mini.versions()}
    path = bench.write_result("lococo_grid_quick" if args.quick else "lococo_grid", record, device="cpu")
    print(f"wrote {path} in {total:.0f} s")


if __name__ == "__main__":
    main()
