"""Checkpoint assets (mini.assets): each shipped asset loads, matches its sha256 and reproduces
its recorded metric; the recipes run at reduced size; the real loading path works on a tiny
model saved locally."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mini import assets
from mini.lm import build_model, tiny_llama_config
from tools import make_assets

SHIPPED = assets.list_assets()


def test_assets_are_shipped_and_small():
    assert set(SHIPPED) == set(assets.RECIPES), "every recipe has a shipped asset (make assets)"
    sizes = {n: sum(p.stat().st_size for p in (assets.ASSET_ROOT / n).iterdir()) for n in SHIPPED}
    assert all(s < 4 * 2**20 for s in sizes.values()), sizes  # under 4 MB each
    assert sum(sizes.values()) < 20 * 2**20  # 20 MB in all


@pytest.mark.parametrize("name", SHIPPED)
def test_asset_loads_matches_its_sha256_and_metric(name):
    info = assets.asset_info(name)
    assert {"settings", "command", "metrics", "sha256", "versions"} <= set(info)
    assets.verify_asset(name)
    got = assets.recompute_metrics(name)
    for key, recorded in info["metrics"].items():
        # the same machine gives the same bits; another one differs in the last digits only
        assert math.isclose(got[key], recorded, rel_tol=1e-4), (key, got[key], recorded)


@pytest.mark.parametrize("name", sorted(assets.RECIPES))
def test_recipe_runs_at_reduced_size(name, tmp_path):
    saved = torch.get_num_threads()
    try:
        assert make_assets.main([name, "--root", str(tmp_path), "--set", "steps=3"]) == 0
    finally:
        torch.set_num_threads(saved)
    info = assets.asset_info(name, tmp_path)
    assert info["settings"]["steps"] == 3 and "--set steps=3" in info["command"]
    assets.verify_asset(name, tmp_path)
    model = assets.load_asset(name, root=tmp_path)
    assert math.isfinite(assets.recompute_metrics(name, tmp_path)["val_loss"])
    assert not model.training


def test_asset_errors(tmp_path):
    with pytest.raises(ValueError, match="name must be one of the assets"):
        assets.load_asset("no-such-asset")
    with pytest.raises(ValueError, match="name must be one of"):
        assets.make_asset("no-such-recipe", root=tmp_path)
    with pytest.raises(ValueError, match=r"overrides \['stepz'\] are not settings"):
        assets.make_asset(sorted(assets.RECIPES)[0], root=tmp_path, stepz=3)
    # a file that changed on disk is an error, not a silently different lab
    name = "tampered"
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"abc")
    (folder / "asset.json").write_text(json.dumps({"sha256": {"model.safetensors": "0" * 64}}))
    with pytest.raises(ValueError, match="model.safetensors has sha256"):
        assets.verify_asset(name, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="file model.safetensors is missing"):
        assets.verify_asset(name, tmp_path)


def test_load_model_is_the_real_loading_path(tmp_path):
    model = build_model(tiny_llama_config(num_hidden_layers=1), seed=3)
    model.save_pretrained(tmp_path)
    loaded = assets.load_model(tmp_path)
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits, rtol=0, atol=0)
