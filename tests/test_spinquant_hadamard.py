"""Hadamard matrices (mini.spinquant.hadamard): orthogonality for every base K, every power of two
up to 8192 and real models' sizes; the Walsh closed form; errors; random initialisations."""
from __future__ import annotations

import math

import pytest
import torch

from mini.spinquant.hadamard import (
    OFFICIAL_K,
    hadamard,
    hadamard_base,
    hadamard_signs,
    nearest_supported,
    random_hadamard,
    random_orthogonal,
    supported,
)

BASE_K = [12, 20, 28, 36, 40, 44, 52, 60, 108, 140]  # the official K's these constructions give
MODEL_SIZES = [352, 576, 896, 1536, 4864]  # tiny Llama MLP width 44·8; real small models
POWERS = [2**m for m in range(14)]  # 1 ... 8192


def _is_prime_power(q: int) -> bool:
    p = next(d for d in range(2, q + 1) if q % d == 0)
    while q % p == 0:
        q //= p
    return q == 1


def _gram_error(n: int) -> float:
    """max |H Hᵀ - I| in float64, in full (n ≤ 1536)."""
    H = hadamard(n, torch.float64)  # (n, n)
    return float((H @ H.T - torch.eye(n, dtype=torch.float64)).abs().max())


def _probe_error(n: int) -> float:
    """max |Hᵀ(H X) - X| for a Gaussian X (n, 8): zero for all X iff H is orthogonal (a
    non-orthogonal H fails for Gaussian X with probability 1; Freivalds' check), in float64 and
    in row chunks of the int8 pattern so 8192 costs no 512 MB float64 matrix."""
    S = hadamard_signs(n)  # (n, n) int8
    X = torch.randn(n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    HX = torch.cat([S[i:i + 1024].double() @ X for i in range(0, n, 1024)]) / math.sqrt(n)  # (n, 8)
    back = sum(S[i:i + 1024].double().T @ HX[i:i + 1024] for i in range(0, n, 1024)) / math.sqrt(n)
    return float((back - X).abs().max())


@pytest.mark.parametrize("n", BASE_K + [n for n in POWERS if n <= 1024] + [352, 576, 896, 1536])
def test_hadamard_is_orthogonal_in_float64(n):
    assert _gram_error(n) < 1e-12


@pytest.mark.parametrize("n", [2048, 4096, 4864, 8192])
def test_large_hadamard_is_orthogonal_by_random_probe(n):
    assert _probe_error(n) < 1e-12


def test_integer_pattern_is_exactly_hadamard_for_every_base():
    """``S Sᵀ = n I`` in exact integers for each base K (and its doubling 2K)."""
    for K in BASE_K + [76, 152]:  # 76 = Paley II q = 37 (4864 = 76·64); 152 = Paley I q = 151
        for n in (K, 2 * K):
            S = hadamard_signs(n).long()
            assert torch.equal(S @ S.T, n * torch.eye(n, dtype=torch.long)), n


@pytest.mark.parametrize("n", POWERS + BASE_K + MODEL_SIZES)
def test_entries_are_plus_minus_one_over_sqrt_n(n):
    dtype = torch.float32 if n == 8192 else torch.float64  # float64 8192² is 512 MB
    H = hadamard(n, dtype)
    assert H.shape == (n, n) and H.dtype == dtype
    scale = torch.tensor(1.0 / math.sqrt(n), dtype=torch.float64).to(dtype)
    assert bool((H.abs() == scale).all())


def test_powers_of_two_are_the_walsh_matrix():
    """``H_ij = (-1)^popcount(i & j) / √n`` (scipy.linalg.hadamard's Sylvester order): every
    entry for n = 1024, 200,000 random entries for n = 8192."""
    def walsh(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        parity = torch.zeros(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.int64)
        for bit in range(13):
            parity ^= ((i & j) >> bit) & 1
        return (1 - 2 * parity).to(torch.int8)

    idx = torch.arange(1024)
    assert torch.equal(hadamard_signs(1024), walsh(idx[:, None], idx[None, :]))
    g = torch.Generator().manual_seed(0)
    i, j = torch.randint(0, 8192, (2, 200_000), generator=g)
    assert torch.equal(hadamard_signs(8192)[i, j], walsh(i, j))
    assert torch.equal(hadamard(16, torch.float64) * 4, walsh(idx[:16, None], idx[None, :16]).double())


def test_float32_is_the_float64_matrix_rounded_once():
    for n in (12, 352, 1024):
        assert torch.equal(hadamard(n, torch.float32), hadamard(n, torch.float64).float())
        assert torch.equal(hadamard(n, torch.bfloat16), hadamard(n, torch.float64).bfloat16())


def test_official_k_coverage_and_decompositions():
    """The official stored K's: all but 156 and 172 come from Paley I/II or doubling."""
    unsupported = [K for K in OFFICIAL_K if not supported(K)]
    assert unsupported == [156, 172]
    # why: no q + 1 (q ≡ 3 mod 4) or 2(q + 1) (q ≡ 1 mod 4) with q a prime power, no K/2 order
    for K in (156, 172):
        assert not _is_prime_power(K - 1) and not _is_prime_power(K // 2 - 1) and (K // 2) % 4 != 0
    assert hadamard_base(28).q == 27 and hadamard_base(28).construction == "paley1"  # GF(3³)
    assert hadamard_base(52).q == 25 and hadamard_base(52).construction == "paley2"  # GF(5²)
    assert hadamard_base(40).K == 20 and hadamard_base(40).m == 1
    expected = {352: (44, 3), 576: (36, 4), 896: (28, 5), 1536: (12, 7), 4864: (76, 6), 8192: (1, 13)}
    for n, (K, m) in expected.items():
        base = hadamard_base(n)
        assert (base.K, base.m) == (K, m) and base.K * 2**base.m == n


def test_supported_matches_a_brute_force_rule():
    """supported(n) iff n = K·2^m with K ∈ {1, 2}, q + 1 (q ≡ 3 mod 4) or 2(q + 1) (q ≡ 1 mod 4),
    q a prime power, checked against a direct enumeration for n ≤ 600."""
    bases = {1, 2}
    for q in range(2, 600):
        if _is_prime_power(q):
            bases.add(q + 1) if q % 4 == 3 else None
            bases.add(2 * (q + 1)) if q % 4 == 1 else None
    brute = {K << j for K in bases for j in range(11) if K << j <= 600}
    assert {n for n in range(1, 601) if supported(n)} == brute


@pytest.mark.parametrize("n, below, above", [(6, 4, 8), (156, 152, 160), (172, 168, 176), (3, 2, 4)])
def test_unsupported_size_names_n_and_the_nearest_sizes(n, below, above):
    assert nearest_supported(n) == (below, above)
    assert not supported(n)
    with pytest.raises(ValueError, match=rf"order n={n}\b.*{below} below and {above} above"):
        hadamard(n)
    with pytest.raises(ValueError, match=rf"n={n}\b"):
        random_hadamard(n)


@pytest.mark.parametrize("bad", [0, -4, 2.0, True, "8", None])
def test_n_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=r"n must be a positive integer, got"):
        hadamard(bad)
    with pytest.raises(ValueError, match=r"n must be a positive integer"):
        random_orthogonal(bad)
    with pytest.raises(ValueError, match=r"n must be a positive integer"):
        supported(bad)


def test_dtype_and_generator_are_checked():
    with pytest.raises(TypeError, match=r"dtype must be a floating torch.dtype.*torch.int32"):
        hadamard(8, torch.int32)
    with pytest.raises(TypeError, match=r"dtype must be a floating torch.dtype.*'float32'"):
        random_hadamard(8, dtype="float32")
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got int"):
        random_hadamard(8, generator=0)
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got int"):
        random_orthogonal(8, generator=0)


def test_the_cache_is_not_exposed():
    H = hadamard(12, torch.float64)
    H.zero_()
    hadamard_signs(12).zero_()
    assert _gram_error(12) < 1e-12


def test_random_hadamard_is_signed_rows_of_h_and_seeded():
    n = 352
    R = random_hadamard(n, torch.Generator().manual_seed(0), dtype=torch.float64)
    H = hadamard(n, torch.float64)
    signs = torch.sign((R * H).sum(1))  # row i of R is s_i · row i of H: their dot product is s_i
    assert torch.equal(signs.abs(), torch.ones(n, dtype=torch.float64))
    assert torch.equal(R, signs[:, None] * H)
    assert 0 < int((signs > 0).sum()) < n  # both signs occur
    assert float((R @ R.T - torch.eye(n, dtype=torch.float64)).abs().max()) < 1e-12
    assert torch.equal(R, random_hadamard(n, torch.Generator().manual_seed(0), dtype=torch.float64))
    assert not torch.equal(R, random_hadamard(n, torch.Generator().manual_seed(1), dtype=torch.float64))
    assert random_hadamard(n).dtype == torch.float32


def test_random_orthogonal_is_orthogonal_seeded_and_sign_fixed():
    n = 96
    g = torch.Generator().manual_seed(3)
    Q = random_orthogonal(n, g, dtype=torch.float64)
    assert float((Q.T @ Q - torch.eye(n, dtype=torch.float64)).abs().max()) < 1e-12
    # the same Gaussian: Qᵀ A is R with a positive diagonal (the sign fix)
    A = torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    R = Q.T @ A
    assert float(R.tril(-1).abs().max()) < 1e-10 and bool((torch.diagonal(R) > 0).all())
    assert torch.equal(Q, random_orthogonal(n, torch.Generator().manual_seed(3), dtype=torch.float64))
    assert random_orthogonal(n).dtype == torch.float32


def test_random_orthogonal_is_haar_on_a_cheap_statistic():
    """Haar: E[Q_00] = 0 and E[Q_00²] = 1/n. Without the sign fix LAPACK's QR gives Q_00 < 0
    always (its R_00 has the sign opposite to A_00), a mean of -E|g_1|/‖g‖ ≈ -0.42 for n = 4."""
    g = torch.Generator().manual_seed(0)
    n, draws = 4, 2000
    q00 = torch.tensor([float(random_orthogonal(n, g, dtype=torch.float64)[0, 0]) for _ in range(draws)])
    sigma = math.sqrt(1.0 / n / draws)
    assert abs(float(q00.mean())) < 5 * sigma
    assert abs(float((q00**2).mean()) - 1.0 / n) < 0.02
    A = torch.randn(draws, n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    unfixed = torch.linalg.qr(A)[0][:, 0, 0]  # (draws,) what the fix corrects
    assert bool((unfixed < 0).all()) and float(unfixed.mean()) < -0.3
