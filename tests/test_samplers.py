"""Samplers: empirical frequencies match each sampler's definition; state round trip."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from stitchops.train.samplers import ESTASampler, ROSSampler, UniformSampler, snip_score

# FLOPs with an uneven distribution: many stitches around 10, few elsewhere (as two-way).
FLOPS = [1.0, 2.0, 9.6, 9.8, 10.0, 10.1, 10.3, 10.4, 10.2, 19.0, 20.0]
DRAWS = 60_000


def frequencies(sampler, step=None) -> list[float]:
    counts = Counter(sampler.sample(step) for _ in range(DRAWS))
    return [counts[i] / DRAWS for i in range(len(FLOPS))]


def assert_close(freq, probs):
    for i, (f, p) in enumerate(zip(freq, probs, strict=True)):
        sigma = math.sqrt(p * (1 - p) / DRAWS)
        assert abs(f - p) <= 5 * sigma + 1e-9, (i, f, p)


def test_uniform():
    sampler = UniformSampler(FLOPS, seed=1)
    assert_close(frequencies(sampler), [1 / len(FLOPS)] * len(FLOPS))


def test_ros_bins_uniform_then_stitch_uniform():
    sampler = ROSSampler(FLOPS, step=1.0, seed=2)
    # τ = round(FLOPs / 1): {1}, {2}, {10: 9.6 .. 10.4}, {19}, {20}: 5 bins
    assert sorted(len(b) for b in sampler.bins) == [1, 1, 1, 1, 7]
    probs = sampler.probabilities()
    assert probs[0] == pytest.approx(1 / 5) and probs[4] == pytest.approx(1 / 35)
    assert sum(probs) == pytest.approx(1.0)
    freq = frequencies(sampler)
    assert_close(freq, probs)
    bin_freq = [sum(freq[i] for i in b) for b in sampler.bins]
    assert_close(bin_freq, [0.2] * 5)


def test_esta_warmup_uniform_then_interval_softmax():
    sampler = ESTASampler(FLOPS, num_intervals=4, momentum=0.5, warmup_steps=10, seed=3)
    assert_close(frequencies(sampler, step=0), [1 / len(FLOPS)] * len(FLOPS))
    for i, f in enumerate(FLOPS):
        sampler.update(i, f % 3)  # some scores
    sampler.update(4, 10.0)  # moving average: 0.5·(10 % 3) + 0.5·10
    assert sampler.scores[4] == pytest.approx(0.5 * (10.0 % 3) + 0.5 * 10.0)
    probs = sampler.probabilities(step=10)
    assert sum(probs) == pytest.approx(1.0)
    freq = frequencies(sampler, step=10)
    assert_close(freq, probs)
    # each non-empty interval is drawn with probability 1 / (number of intervals)
    for members in sampler.intervals:
        assert sum(probs[i] for i in members) == pytest.approx(1 / len(sampler.intervals))
    # inside an interval: softmax of standardised scores
    members = max(sampler.intervals, key=len)
    values = [sampler.scores[i] for i in members]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    expo = [math.exp((v - mean) / std) for v in values]
    for i, e in zip(members, expo, strict=True):
        assert probs[i] * len(sampler.intervals) == pytest.approx(e / sum(expo))
    assert sampler.deployed() == [
        max(m, key=lambda i: sampler.scores[i]) for m in sampler.intervals
    ]


@pytest.mark.parametrize("cls", [UniformSampler, ROSSampler, ESTASampler])
def test_state_round_trip_repeats_draws(cls):
    a = cls(FLOPS, seed=5)
    for _ in range(7):
        a.sample(100)
    a.update(3, 2.0)
    state = a.state_dict()
    b = cls(FLOPS, seed=99)
    b.load_state_dict(state)
    assert [a.sample(100) for _ in range(50)] == [b.sample(100) for _ in range(50)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one stitch"):
        UniformSampler([])
    with pytest.raises(ValueError, match="step must be > 0"):
        ROSSampler(FLOPS, step=0.0)
    with pytest.raises(ValueError, match="momentum"):
        ESTASampler(FLOPS, momentum=1.0)
    with pytest.raises(ValueError, match="num_intervals"):
        ESTASampler(FLOPS, num_intervals=0)


def test_snip_score():
    import torch

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    (w * torch.tensor([3.0, 1.0])).sum().backward()
    assert snip_score([w, torch.nn.Parameter(torch.ones(2))]) == pytest.approx(3.0 + 2.0)
