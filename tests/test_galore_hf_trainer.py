"""GaLoreAdamW under the Hugging Face Trainer: it trains, saves its state with each checkpoint, and
a run resumed from a checkpoint ends at bitwise the same weights as the uninterrupted run (the
GaLore chapter's "Using GaLore" section shows the same)."""
from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from mini.galore import GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups  # noqa: E402
from mini.lm import build_model, synthetic_lm_data, tiny_llama_config  # noqa: E402


def _trainer(out, model, dataset, make_opt):
    args = transformers.TrainingArguments(
        out, max_steps=6, per_device_train_batch_size=4, save_steps=3, lr_scheduler_type="cosine",
        warmup_steps=1, report_to="none", use_cpu=True, seed=0, logging_strategy="no", disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                optimizers=(make_opt(model), None))


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
def test_trainer_resumes_bitwise(tmp_path, cls):
    data = synthetic_lm_data(n_documents=120, seed=0)
    cfg = tiny_llama_config(vocab_size=data.tokenizer.vocab_size, num_hidden_layers=1)  # hidden 128, MLP 352
    ids = data.train_ids[: 24 * 17].view(24, 17)
    dataset = [{"input_ids": x, "labels": x} for x in ids]

    def make_opt(model):  # rank 32: the MLP's 352 x 32 moments are 8-bit codes in GaLoreAdamW8bit
        return cls(galore_param_groups(model, rank=32, update_proj_gap=2, scale=0.25), lr=1e-2,
                   weight_decay=0.0)

    a = build_model(cfg, seed=0)
    before = [p.detach().clone() for p in a.parameters()]
    _trainer(str(tmp_path / "a"), a, dataset, make_opt).train()
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), before))  # it trained
    assert os.path.exists(tmp_path / "a" / "checkpoint-3" / "optimizer.pt")
    b = build_model(cfg, seed=1)
    _trainer(str(tmp_path / "b"), b, dataset, make_opt).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    saved = torch.load(tmp_path / "a" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert any("projector" in s for s in saved["state"].values())
    if cls is GaLoreAdamW8bit:
        assert any(s["exp_avg"].dtype == torch.uint8 for s in saved["state"].values())
