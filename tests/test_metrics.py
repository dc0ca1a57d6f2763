"""Membership-inference, memorization and privacy metrics against brute force and hand computation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from npo_sim import metrics as M


def test_auc_equals_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)  # many ties
    pairs = [(1.0 if x > y else 0.5 if x == y else 0.0) for x in a for y in b]
    assert M.auc(a, b) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert M.auc([1, 2], [0, 0]) == 1.0 and M.auc([0], [0]) == 0.5


def test_average_ranks_equal_scipy_rankdata():
    rng = np.random.default_rng(1)
    for _ in range(50):
        x = rng.integers(0, 6, rng.integers(1, 40)) * rng.choice([1.0, 0.25, -3.0])   # ties, negatives
        assert np.array_equal(M.average_ranks(x), stats.rankdata(x))
    assert M.average_ranks([2.0, 2.0, 1.0]).tolist() == [2.5, 2.5, 1.0]


def test_loss_and_min_k_by_hand():
    lp = torch.tensor([[-1.0, -5.0, -3.0, -2.0, -4.0], [-1.0, -5.0, -3.0, -2.0, -4.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert M.mia_loss(lp, mask).tolist() == pytest.approx([-3.0, -2.75])
    # k=0.4: ⌊0.4·5⌋ = 2 lowest of row 0 (−5, −4); ⌊0.4·4⌋ = 1 lowest of row 1's answer (−5)
    assert M.mia_min_k(lp, mask, k=0.4).tolist() == pytest.approx([-4.5, -5.0])
    assert M.mia_min_k(lp, mask, k=0.01).tolist() == pytest.approx([-5.0, -5.0])   # at least one token
    assert M.mia_min_k(lp, mask, k=1.0).tolist() == pytest.approx([-3.0, -2.75])
    mu, sigma = torch.full_like(lp, -3.0), torch.full_like(lp, 2.0)   # z = (lp + 3)/2
    assert M.mia_min_k_plus_plus(lp, mu, sigma, mask, k=0.4).tolist() == pytest.approx([-0.75, -1.0])
    ref = lp - 1.0
    assert M.mia_reference(lp, ref, mask).tolist() == pytest.approx([1.0, 1.0])


def test_zlib_score_on_known_strings():
    lp = torch.tensor([[-2.0, -4.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    # zlib.compress(b"hello") is 13 bytes at the default level (2-byte header, deflate block, 4-byte Adler-32)
    assert M.mia_zlib(lp, mask, ["hello"]).item() == pytest.approx(-6.0 / 13)
    with pytest.raises(ValueError):
        M.mia_zlib(lp, mask, ["a", "b"])


def test_exact_memorization_and_extraction_strength_by_hand():
    hits = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]])
    mask = torch.ones_like(hits)
    assert M.exact_memorization(hits, mask).tolist() == pytest.approx([1.0, 0.75, 0.75, 0.75, 0.0])
    assert M.extraction_strength(hits, mask).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.0, 0.0])
    # a prompt position (mask 0) that misses does not count
    h, m = torch.tensor([[0, 0, 1, 1, 1]]), torch.tensor([[0, 1, 1, 1, 1]])
    assert M.extraction_strength(h, m).item() == pytest.approx(0.75)
    assert M.exact_memorization(h, m).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="answer token"):
        M.exact_memorization(h, torch.zeros_like(h))


def test_privleak_as_muse_reports_it():
    assert M.privleak(0.6, 0.5) == pytest.approx(20.0)
    assert M.privleak(0.5, 0.5) == 0.0 and M.privleak(0.25, 0.5) == pytest.approx(-50.0)
    with pytest.raises(ValueError):
        M.privleak(0.5, 0.0)


def test_ks_lattice_for_three_and_three_by_enumerating_orderings():
    pvals = set()
    for xs in itertools.combinations(range(6), 3):
        ys = [i for i in range(6) if i not in xs]
        pvals.add(round(stats.ks_2samp(np.array(xs, float), np.array(ys, float)).pvalue, 12))
    got = M.ks_attainable_pvalues(3, 3)
    assert sorted(pvals) == pytest.approx(sorted(got.tolist()), abs=1e-12)
    assert len(got) == 3 and got[-1] == pytest.approx(1.0)   # D ∈ {1/3, 2/3, 1}
    assert len(M.ks_attainable_pvalues(40, 40)) == 40
    unequal = M.ks_attainable_pvalues(2, 3)
    assert np.all(np.diff(unequal) > 0) and unequal.max() <= 1.0


def test_bootstrap_ci_covers_the_mean_about_95_percent():
    rng = np.random.default_rng(1)
    cover = 0
    for rep in range(200):
        x = rng.normal(0.0, 1.0, 60)
        ci = M.bootstrap_ci(np.mean, x, n_boot=400, seed=rep)
        assert ci.lo <= ci.estimate <= ci.hi
        cover += ci.lo <= 0.0 <= ci.hi
    assert 0.88 <= cover / 200 <= 0.99


def test_bootstrap_ci_resamples_paired_arrays_together():
    a = np.arange(30.0)
    ci = M.bootstrap_ci(lambda x, y: float(np.max(np.abs(x - y))), (a, a.copy()), n_boot=50)
    assert ci.lo == ci.hi == ci.estimate == 0.0   # the same indices for both, so x − y stays 0
    with pytest.raises(ValueError):
        M.bootstrap_ci(np.mean, (a, a[:5]))


def test_fluency_by_hand():
    # bigrams of a b a b a: ab ba ab ba -> 2 distinct of 4
    assert M.repetition(list("ababa"), n=2) == pytest.approx(0.5)
    assert M.repetition("the cat sat on the mat".split(), n=3) == 0.0   # no 3-gram repeats
    assert M.repetition(["x"] * 6, n=3) == pytest.approx(1 - 1 / 4)     # a loop: xxx four times
    assert M.repetition(["a", "b"], n=3) == 0.0                         # shorter than n
    # pooled over answers: ab bc | ab -> 2 distinct of 3; the same answer twice halves distinct-2
    assert M.distinct_n([list("abc"), list("ab")], n=2) == pytest.approx(2 / 3)
    assert M.distinct_n([list("abc")] * 2, n=2) == pytest.approx(0.5)
    assert M.distinct_n([[], ["a"]], n=2) == 0.0
    with pytest.raises(ValueError):
        M.repetition(["a"], n=0)


def test_bootstrap_strata_one_group_is_bootstrap_ci_and_two_groups_cover():
    x = np.random.default_rng(1).normal(size=30)
    assert M.bootstrap_ci_strata(np.mean, (x,), n_boot=200, seed=3) == M.bootstrap_ci(np.mean, x, n_boot=200, seed=3)
    # difference of two means of N(0,1) samples of sizes 40 and 25: the 95% CI covers 0 in about 95% of draws
    rng = np.random.default_rng(0)
    hits = []
    for s in range(100):
        a, b = rng.normal(size=40), rng.normal(size=25)
        c = M.bootstrap_ci_strata(lambda u, v: u.mean() - v.mean(), (a, b), n_boot=200, seed=s)
        assert c.lo <= c.estimate <= c.hi and c.estimate == pytest.approx(a.mean() - b.mean())
        hits.append(c.lo <= 0 <= c.hi)
    assert 0.85 <= np.mean(hits) <= 1.0
    with pytest.raises(ValueError):
        M.bootstrap_ci_strata(np.mean, (np.array([]),))
