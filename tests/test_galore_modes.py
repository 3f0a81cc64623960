"""Q-GaLore and 8-bit GaLore across the distributed modes: what is refused, with which message.

The table is in :mod:`mini.galore.distributed`'s docstring; the supported cells are tested in
tests/test_galore_distributed.py (8-bit under subspace DDP) and tests/test_galore_accumulate.py
(QGaLoreAdamW with per-layer accumulation).
"""
from __future__ import annotations

import pytest
from torch import nn

from mini.galore.accumulate import attach_accumulating_updates

qgalore = pytest.importorskip("mini.qgalore.optimizer")


def test_accumulation_refuses_qgalore_8bit():
    model = nn.Sequential(nn.Linear(8, 6))
    with pytest.raises(TypeError, match="QGaLoreAdamW8bit overrides GaLoreAdamW.step"):
        attach_accumulating_updates(model, 2, optimizer_class=qgalore.QGaLoreAdamW8bit)
