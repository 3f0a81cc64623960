"""The memory-traffic model (mini.triforce.traffic): parameter and byte counts against hand
arithmetic at Llama2-7B-128K and llama-68m sizes, the speedup formula on the digest's counts."""
from __future__ import annotations

import pytest

from mini.triforce import LLAMA2_7B_128K, TrafficModel, modelled_speedup
from mini.triforce.traffic import LLAMA_68M, TransformerSizes


def test_parameter_and_kv_counts_by_hand():
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert LLAMA2_7B_128K.n_params() == 2 * 32000 * 4096 + 32 * per_layer + 4096 == 6_738_415_616
    assert LLAMA2_7B_128K.kv_bytes_per_token() == 2 * 32 * 32 * 128 * 2 == 524_288  # 0.5 MiB
    assert LLAMA_68M.n_params() == 2 * 32000 * 768 + 2 * (4 * 768 ** 2 + 3 * 768 * 3072 + 2 * 768) + 768
    gqa = TransformerSizes(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                           vocab=10, tied=True)
    assert gqa.n_params() == 10 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 128) + 64
    assert gqa.pass_bytes(5, 4) == 4 * gqa.n_params() + 5 * 2 * 2 * 2 * 16 * 4


def test_bytes_per_pass_match_the_paper_sizes():
    m = TrafficModel()
    w = 6_738_415_616 * 2
    assert m.target_full_bytes() == w + 122_880 * 524_288
    assert m.target_retrieval_bytes() == w + 4096 * 524_288
    assert m.draft_bytes() == 68_030_208 * 2 + 256 * 2 * 2 * 12 * 64 * 2
    t = m.table()
    assert t["target_full"] == pytest.approx(78, abs=0.2)
    assert t["target_retrieval"] == pytest.approx(16, abs=0.5)
    assert t["draft"] == pytest.approx(0.14, abs=0.005)
    assert TrafficModel(context=131_072).table()["target_full"] == pytest.approx(82.2, abs=0.05)


def test_modelled_speedup_on_the_digest_counts():
    m = TrafficModel()
    full, mid, dr = m.target_full_bytes(), m.target_retrieval_bytes(), m.draft_bytes()
    assert modelled_speedup({"tokens": 128, "target": 128}) == 1.0
    s_draft = modelled_speedup({"tokens": 128, "target": 34, "draft": 136})
    assert s_draft == pytest.approx(128 * full / (34 * full + 136 * dr))
    assert s_draft == pytest.approx(3.74, abs=0.005)  # the digest's figure
    s_ret = modelled_speedup({"tokens": 128, "target": 29, "middle": 116})
    assert s_ret == pytest.approx(128 * full / (29 * full + 116 * mid))
    assert s_ret == pytest.approx(2.45, abs=0.005)  # digest: 2.50 (its middle count is not given)
    s_tri = modelled_speedup({"tokens": 128, "target_passes": 20, "middle_passes": 70,
                              "draft_passes": 70})
    assert s_tri == pytest.approx(128 * full / (20 * full + 70 * mid + 70 * dr))
    assert s_tri == pytest.approx(3.75, abs=0.005)  # digest: 3.86


def test_errors():
    with pytest.raises(ValueError, match=r"counts must give tokens > 0"):
        modelled_speedup({"target": 3})
    with pytest.raises(ValueError, match=r"counts\['middle'\] must be a number >= 0, got -1"):
        modelled_speedup({"tokens": 3, "target": 1, "middle": -1})
    with pytest.raises(ValueError, match=r"at least one forward pass"):
        modelled_speedup({"tokens": 3})
    with pytest.raises(TypeError, match=r"model must be a TrafficModel"):
        modelled_speedup({"tokens": 3, "target": 3}, model=3)
    with pytest.raises(ValueError, match=r"cached_tokens must be an int >= 0, got -2"):
        LLAMA2_7B_128K.pass_bytes(-2)
