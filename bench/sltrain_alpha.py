"""SLTrain's scale α at the labs' rank: the labs' α = 32 (α/r = 1) against the 60M recipe's ratio.

Part II (``mini.sltrain``; the SLTrain pretraining lab, ``labs/sltrain/pretraining.ipynb``). The
labs run the tiny Llama at r = 32 with the 60M recipe's α = 32, so α/r = 1 where the recipe has
32/128 = 0.25. With Adam the low-rank part's step scales with α/r at a fixed learning rate, so
the two choices differ in speed, not only in scale. This trains SLTrain (δ = 0.03, the lab's
schedule, 160 steps, batches of 8 x 32) at

- α = 32, lr 3e-3 (the labs' setting);
- α = 8 (α/r = 0.25, the recipe's ratio), the same lr 3e-3;
- α = 8 with lr 1.2e-2 (four times: the same α·lr as the labs' setting);

at seeds 0, 1 and 2, one thread, and writes the final validation perplexities to
``bench/results/sltrain_alpha.json`` (about a minute on one core), which the lab reads.

    python bench/sltrain_alpha.py
"""
from __future__ import annotations

import time

import mini
from mini.kernels import bench
from mini.lm import TrainerConfig, build_model, synthetic_lm_data, tiny_llama_config, train_lm
from mini.pretraining import setup_method

SETTINGS = ((32.0, 3e-3), (8.0, 3e-3), (8.0, 1.2e-2))  # (α, lr)
SEEDS = (0, 1, 2)
RANK, DENSITY, STEPS = 32, 0.03, 160


def main() -> None:
    mini.setup(seed=0, verbose=False)  # one thread
    t0 = time.perf_counter()
    data = synthetic_lm_data(2000, seed=0)
    cfg = tiny_llama_config(vocab_size=data.tokenizer.vocab_size)
    rows = []
    for alpha, lr in SETTINGS:
        for seed in SEEDS:
            s = setup_method(build_model(cfg, seed=seed), "sltrain", STEPS, seed=seed, lr=lr, rank=RANK,
                             density=DENSITY, sltrain_alpha=alpha)
            tc = TrainerConfig(steps=STEPS, batch_size=8, seq_len=32, eval_every=20, eval_batches=6,
                               grad_clip=None, progress=False, seed=seed)
            h = train_lm(s.model, s.optimizer, data, tc, scheduler=s.scheduler)
            rows.append({"alpha": alpha, "alpha_over_r": alpha / RANK, "lr": lr, "seed": seed,
                         "final_val_ppl": h.val_ppl[-1]})
            print(f"alpha {alpha:4g} (alpha/r {alpha / RANK:.2f}) lr {lr:.1e} seed {seed}: "
                  f"{h.val_ppl[-1]:.3f}", flush=True)
    path = bench.write_result("sltrain_alpha", {"rank": RANK, "density": DENSITY, "steps": STEPS,
                                                "rows": rows, "total_s": time.perf_counter() - t0},
                              device="cpu")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
