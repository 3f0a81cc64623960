"""Checkpoint assets: small trained substrate models that ship with mini, so labs skip retraining.

Several labs start from the same trained model (the WeLore fine-tuning lab compresses and
fine-tunes a pre-trained tiny Llama; Parts III-IV will start from a long-context LM, a draft and
a target model, an SFT policy, a reward model). Training them in every lab would spend the lab's
seconds on what it does not study. So each is trained once by ``make assets``
(``tools/make_assets.py``) with a recipe of this module (:data:`RECIPES`) and shipped in
``mini/checkpoints/<name>/``, where each asset keeps

- the model as Hugging Face files (``config.json``, ``model.safetensors``), loaded by the real
  loading path, ``transformers.AutoModelForCausalLM.from_pretrained`` (:func:`load_model`, which
  takes a local folder or a model name alike);
- ``asset.json``: the recipe (its settings and seed), the command that made it, the metrics it
  reached, the versions, and the sha256 of every file.

:func:`load_asset` checks the files' sha256 before loading, so an asset that changed on disk is
an error, not a silently different lab. The tests load every asset, check its hashes and
recompute its recorded validation loss; they also run the recipes at reduced size. Regenerating
on another machine is not bit-identical (float arithmetic differs in the last digits), only close:
:data:`REGENERATION_RTOL` is the tolerance on the recorded metric.

Explained in :doc:`/labs/welore/finetuning`.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = ["ASSET_ROOT", "RECIPES", "REGENERATION_RTOL", "Recipe", "asset_info", "list_assets",
           "verify_asset", "load_asset", "load_model", "make_asset", "recompute_metrics", "sha256_of"]

ASSET_ROOT = Path(__file__).resolve().parent / "checkpoints"
"""Where the shipped assets live, one folder each."""
REGENERATION_RTOL = 0.02
"""A regenerated asset's validation loss lies within this relative tolerance of the recorded one."""
MODEL_FILES = ("config.json", "model.safetensors")


@dataclass(frozen=True)
class Recipe:
    """How an asset is made: what it is, its settings, and the function that trains it.

    Explained in :doc:`/labs/welore/finetuning`.
    """

    description: str  #: what the asset is, in a sentence
    settings: dict[str, Any]  #: the keyword arguments ``train`` is called with
    #: trains the asset from ``settings`` and returns (model, metrics)
    train: Callable[..., tuple[torch.nn.Module, dict[str, float]]] = field(repr=False)
    #: recomputes the recorded metrics from (model, settings); None means the corpus val_loss
    metrics: Callable[..., dict[str, float]] | None = field(default=None, repr=False)


def _tiny_llama_corpus(steps: int, seed: int, lr: float, weight_decay: float, warmup_fraction: float,
                       n_documents: int) -> tuple[torch.nn.Module, dict[str, float]]:
    """The tiny Llama pre-trained on the synthetic corpus: AdamW, linear warmup, cosine decay."""
    from mini.lm import TrainerConfig, build_model, synthetic_lm_data, tiny_llama_config, train_lm
    from mini.pretraining import CosineSchedule

    data = synthetic_lm_data(n_documents, seed=0)
    model = build_model(tiny_llama_config(vocab_size=data.tokenizer.vocab_size), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    train_lm(model, opt, data, TrainerConfig(steps=steps, eval_every=steps, seed=seed, progress=False),
             scheduler=CosineSchedule([opt], steps, int(steps * warmup_fraction)))
    return model.eval(), {"val_loss": _corpus_val_loss(model, n_documents)}


def _corpus_val_loss(model: torch.nn.Module, n_documents: int) -> float:
    """Validation loss on 8 fixed batches of 16 x 64 tokens of the synthetic corpus (the labs')."""
    from mini.lm import eval_batches, evaluate_lm, synthetic_lm_data

    data = synthetic_lm_data(n_documents, seed=0)
    return evaluate_lm(model, eval_batches(data.val_ids, 16, 64, 8))


def _longctx_settings(context_len: int) -> tuple[Any, Any]:
    """The needle and majority tasks of the ``longctx-lm`` asset at ``context_len`` (one query)."""
    from mini.lm.longctx import MajorityTask, NeedleTask

    return NeedleTask(context_len), MajorityTask(context_len)


def _longctx_metrics(model: torch.nn.Module, settings: dict[str, Any]) -> dict[str, float]:
    """Validation loss (answers only) on 4 fixed batches of 16 per task at the asset's context, and
    full-cache accuracy on 256 examples per task (eval seed 1)."""
    import numpy as np

    from mini.lm.longctx import evaluate, task_loss

    tasks = _longctx_settings(settings["context_len"])

    def fwd(x: torch.Tensor) -> torch.Tensor:
        return model(input_ids=x).logits  # (B, T, V)

    with torch.no_grad():
        losses = [task_loss(model, t.sample(16, np.random.default_rng([12345, i]))).item()
                  for t in tasks for i in range(4)]
    return {"val_loss": float(np.mean(losses)), "needle_acc": evaluate(fwd, tasks[0], 256, seed=1),
            "majority_acc": evaluate(fwd, tasks[1], 256, seed=1)}


def _longctx_lm(steps: int, seed: int, lr: float, batch_size: int, short_len: int, context_len: int,
                long_fraction: float, n_queries: int, hidden_size: int, num_hidden_layers: int,
                num_attention_heads: int, num_key_value_heads: int) -> tuple[torch.nn.Module, dict[str, float]]:
    """The LoCoCo substrate: a RoPE Llama (GQA) trained on needle + majority, first at ``short_len``
    (cheap: the one-hop lookups form there), then the last ``long_fraction`` of the steps at
    ``context_len`` (lr / 3)."""
    from mini.lm import build_model, tiny_llama_config
    from mini.lm.longctx import (
        LongContextVocab,
        MajorityTask,
        NeedleTask,
        train_task_lm,
    )

    vocab = LongContextVocab()
    model = build_model(tiny_llama_config(
        vocab.vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=4 * context_len), seed=seed)
    n_long = round(steps * long_fraction)
    short = [NeedleTask(short_len, n_queries=n_queries), MajorityTask(short_len, n_votes=12)]
    train_task_lm(model, short, steps - n_long, batch_size, lr, seed=seed)
    if n_long:
        long = [NeedleTask(context_len, n_queries=n_queries), MajorityTask(context_len)]
        train_task_lm(model, long, n_long, batch_size, lr / 3, warmup=5, seed=seed + 1)
    settings = {"context_len": context_len}
    return model.eval(), _longctx_metrics(model, settings)


def _topic_metrics(model: torch.nn.Module, settings: dict[str, Any]) -> dict[str, float]:
    """Validation loss on 4 fixed batches of 16 documents of the topic language, and the loss of the
    true chain with the topic known on the same tokens (the floor)."""
    import numpy as np

    from mini.lm.longctx import TopicTask, task_loss

    task = TopicTask(settings["context_len"], settings["vocab_size"], settings["n_topics"])
    losses, floors = [], []
    with torch.no_grad():
        for i in range(4):
            batch, topics = task.sample(16, np.random.default_rng([12345, i]), return_topics=True)
            losses.append(task_loss(model, batch).item())
            floors.append(task.oracle_loss(batch, topics))
    return {"val_loss": float(np.mean(losses)), "oracle_loss": float(np.mean(floors))}


def _topic_lm(steps: int, seed: int, lr: float, batch_size: int, context_len: int, vocab_size: int,
              n_topics: int, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
              num_key_value_heads: int) -> tuple[torch.nn.Module, dict[str, float]]:
    """A RoPE Llama trained on TriForce's per-document topic language (target or draft)."""
    from mini.lm import build_model, tiny_llama_config
    from mini.lm.longctx import TopicTask, train_task_lm

    model = build_model(tiny_llama_config(
        vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=4 * context_len), seed=seed)
    train_task_lm(model, [TopicTask(context_len, vocab_size, n_topics)], steps, batch_size, lr, seed=seed)
    return model.eval(), _topic_metrics(model, {"context_len": context_len, "vocab_size": vocab_size,
                                                "n_topics": n_topics})


_TOPIC = {"context_len": 256, "vocab_size": 16, "n_topics": 8}

RECIPES: dict[str, Recipe] = {
    "tiny-llama-corpus-300": Recipe(
        description="The book's tiny Llama (0.8M parameters) pre-trained for 300 steps on the "
                    "synthetic corpus; the base model of the WeLore fine-tuning lab.",
        settings={"steps": 300, "seed": 0, "lr": 3e-3, "weight_decay": 0.1, "warmup_fraction": 0.1,
                  "n_documents": 2000},
        train=_tiny_llama_corpus,
    ),
    "longctx-lm": Recipe(
        description="LoCoCo's substrate: a 2-layer RoPE Llama (GQA, 4 query / 2 KV heads, width 64) "
                    "trained on needle retrieval + majority vote (mini.lm.longctx) at context 512.",
        settings={"steps": 950, "seed": 0, "lr": 3e-3, "batch_size": 16, "short_len": 128,
                  "context_len": 512, "long_fraction": 0.16, "n_queries": 8, "hidden_size": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
        train=_longctx_lm, metrics=_longctx_metrics,
    ),
    "triforce-target": Recipe(
        description="TriForce's target: a 2-layer RoPE Llama (width 64, 4 heads) trained on the "
                    "per-document topic language (V = 16, 8 topics, documents of 256 tokens).",
        settings={"steps": 600, "seed": 0, "lr": 3e-3, "batch_size": 16, **_TOPIC, "hidden_size": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4},
        train=_topic_lm, metrics=_topic_metrics,
    ),
    "triforce-draft": Recipe(
        description="TriForce's draft: a 1-layer RoPE Llama (width 32, 2 heads) on the same topic "
                    "language and vocabulary as triforce-target.",
        settings={"steps": 600, "seed": 0, "lr": 3e-3, "batch_size": 16, **_TOPIC, "hidden_size": 32,
                  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2},
        train=_topic_lm, metrics=_topic_metrics,
    ),
}
"""Every asset :func:`make_asset` can make, by name."""


def sha256_of(path: str | Path) -> str:
    """The sha256 of a file, hex.

    Explained in :doc:`/labs/welore/finetuning`.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_name(name: str, root: Path) -> Path:
    if not isinstance(name, str) or name not in list_assets(root):
        raise ValueError(f"name must be one of the assets in {root} {list_assets(root)}, got {name!r}")
    return root / name


def list_assets(root: str | Path = ASSET_ROOT) -> list[str]:
    """The names of the assets under ``root`` (folders with an ``asset.json``).

    Explained in :doc:`/labs/welore/finetuning`.
    """
    root = Path(root)
    return sorted(p.name for p in root.iterdir() if (p / "asset.json").exists()) if root.exists() else []


def asset_info(name: str, root: str | Path = ASSET_ROOT) -> dict[str, Any]:
    """An asset's ``asset.json``: recipe, settings, command, metrics, versions, sha256 of each file.

    Explained in :doc:`/labs/welore/finetuning`.
    """
    return json.loads((_check_name(name, Path(root)) / "asset.json").read_text())


def verify_asset(name: str, root: str | Path = ASSET_ROOT) -> None:
    """Raise ``ValueError`` naming the file when a file's sha256 differs from the recorded one.

    Explained in :doc:`/labs/welore/finetuning`.
    """
    folder = _check_name(name, Path(root))
    for file, digest in asset_info(name, root)["sha256"].items():
        path = folder / file
        if not path.exists():
            raise ValueError(f"asset {name!r}: file {file} is missing (re-run `make assets`)")
        got = sha256_of(path)
        if got != digest:
            raise ValueError(f"asset {name!r}: {file} has sha256 {got}, the record says {digest} "
                             "(the file changed: re-run `make assets` and commit both)")


def load_model(name_or_path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained``: a local folder, or a model name of the Hub.

    The real loading path, used for the book's assets and for your own models alike (a name
    needs the network the first time; the labs pass local folders only).

    Explained in :doc:`/labs/welore/finetuning`.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), torch_dtype=torch.float32)
    return model.to(device).eval()


def load_asset(name: str, device: str | torch.device = "cpu", root: str | Path = ASSET_ROOT) -> torch.nn.Module:
    """A shipped asset, its sha256 checked first (see the module docstring).

    Explained in :doc:`/labs/welore/finetuning`.
    """
    verify_asset(name, root)
    return load_model(Path(root) / name, device)


def make_asset(name: str, root: str | Path = ASSET_ROOT, command: str = "make assets",
               **overrides: Any) -> dict[str, Any]:
    """Train the recipe ``name`` (``overrides`` change its settings, e.g. fewer steps in a test),
    save the model under ``root/name`` and write its ``asset.json``; returns the record.

    Explained in :doc:`/labs/welore/finetuning`.
    """
    if name not in RECIPES:
        raise ValueError(f"name must be one of {sorted(RECIPES)}, got {name!r}")
    recipe = RECIPES[name]
    unknown = sorted(set(overrides) - set(recipe.settings))
    if unknown:
        raise ValueError(f"overrides {unknown} are not settings of {name!r}: {sorted(recipe.settings)}")
    settings = {**recipe.settings, **overrides}
    t0 = time.perf_counter()
    model, metrics = recipe.train(**settings)
    train_seconds = time.perf_counter() - t0
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for extra in folder.iterdir():  # keep only the files the loader needs
        if extra.name not in MODEL_FILES:
            extra.unlink()
    import transformers

    record = {
        "name": name,
        "description": recipe.description,
        "settings": settings,
        "command": command,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "made_utc": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "sha256": {f: sha256_of(folder / f) for f in MODEL_FILES},
    }
    (folder / "asset.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def recompute_metrics(name: str, root: str | Path = ASSET_ROOT) -> dict[str, float]:
    """The recorded metrics recomputed from the loaded asset (the tests compare them).

    Explained in :doc:`/labs/welore/finetuning`.
    """
    info = asset_info(name, root)
    recipe = RECIPES.get(info.get("name", name))
    if recipe is not None and recipe.metrics is not None:
        return recipe.metrics(load_asset(name, root=root), info["settings"])
    return {"val_loss": _corpus_val_loss(load_asset(name, root=root), info["settings"]["n_documents"])}

