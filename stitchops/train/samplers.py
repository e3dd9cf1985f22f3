"""Stitch samplers for training: which stitch a step trains.

* ``UniformSampler``: every stitch with probability 1/E (SN-Net).
* ``ROSSampler``: resource-constrained sampling (SN-Netv2 Sec. 4.2). FLOPs are rounded to a
  step t, τ = round(FLOPs / t); a value τ₀ is drawn uniformly from the values that occur,
  then a stitch uniformly among those with τ = τ₀.
* ``ESTASampler``: task-specific sampling (ESTA, thesis Sec. 3.4.2). Each trained stitch's
  SNIP importance Q = Σ|g ⊙ w| over its trainable parameters updates a moving average
  Q̄ ← m·Q̄ + (1 − m)·Q (Eq. 3.3). During warm-up stitches are drawn uniformly; afterwards
  the FLOPs range is divided uniformly into intervals, an interval (holding stitches) is
  drawn uniformly, and a stitch inside it from softmax(Q̂ / temperature), with Q̂ the
  scores standardised inside the interval (our reading of "normalised"). ``deployed()``
  gives the top-scored stitch of each interval.

Every sampler draws from its own ``random.Random`` (seeded with seed + rank in training) and
has ``state_dict``/``load_state_dict`` so a resumed run draws the same stitches.
"""

from __future__ import annotations

import math
import random


class UniformSampler:
    def __init__(self, flops: list[float], seed: int = 0) -> None:
        if not flops:
            raise ValueError("a sampler needs at least one stitch")
        self.flops = [float(f) for f in flops]
        self.rng = random.Random(seed)

    def sample(self, step: int | None = None) -> int:
        return self.rng.randrange(len(self.flops))

    def probabilities(self, step: int | None = None) -> list[float]:
        """Exact probability of each stitch being drawn (at ``step``)."""
        return [1.0 / len(self.flops)] * len(self.flops)

    def update(self, stitch_id: int, score: float) -> None:
        """Report a trained stitch's importance (used by ESTA only)."""

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


def _groups(keys: list) -> list[list[int]]:
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return [groups[k] for k in sorted(groups)]


class ROSSampler(UniformSampler):
    def __init__(self, flops: list[float], step: float | None = None, seed: int = 0) -> None:
        super().__init__(flops, seed)
        if step is None:  # ~13 values over the range, as the paper's DeiT3-S/L setting
            span = max(self.flops) - min(self.flops)
            step = span / 12 if span > 0 else 1.0
        if not step > 0:
            raise ValueError(f"step must be > 0, got {step}")
        self.step = float(step)
        self.bins = _groups([round(f / self.step) for f in self.flops])

    def sample(self, step: int | None = None) -> int:
        return self.rng.choice(self.rng.choice(self.bins))

    def probabilities(self, step: int | None = None) -> list[float]:
        probs = [0.0] * len(self.flops)
        for members in self.bins:
            for i in members:
                probs[i] = 1.0 / (len(self.bins) * len(members))
        return probs


class ESTASampler(UniformSampler):
    def __init__(
        self,
        flops: list[float],
        num_intervals: int = 15,
        momentum: float = 0.9,
        warmup_steps: int = 0,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(flops, seed)
        if num_intervals < 1:
            raise ValueError(f"num_intervals must be >= 1, got {num_intervals}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.momentum, self.warmup_steps, self.temperature = momentum, warmup_steps, temperature
        low, high = min(self.flops), max(self.flops)
        width = (high - low) / num_intervals or 1.0
        self.intervals = _groups(
            [min(int((f - low) / width), num_intervals - 1) for f in self.flops]
        )
        self.scores = [0.0] * len(self.flops)
        self.seen = [False] * len(self.flops)

    def update(self, stitch_id: int, score: float) -> None:
        if not math.isfinite(score):
            return
        m = self.momentum
        old = self.scores[stitch_id] if self.seen[stitch_id] else score
        self.scores[stitch_id] = m * old + (1 - m) * score
        self.seen[stitch_id] = True

    def _softmax(self, members: list[int]) -> list[float]:
        values = [self.scores[i] for i in members]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        z = [((v - mean) / std if std > 0 else 0.0) / self.temperature for v in values]
        top = max(z)
        e = [math.exp(v - top) for v in z]
        total = sum(e)
        return [v / total for v in e]

    def sample(self, step: int | None = None) -> int:
        if step is not None and step < self.warmup_steps:
            return self.rng.randrange(len(self.flops))
        members = self.rng.choice(self.intervals)
        return self.rng.choices(members, weights=self._softmax(members))[0]

    def probabilities(self, step: int | None = None) -> list[float]:
        if step is not None and step < self.warmup_steps:
            return super().probabilities()
        probs = [0.0] * len(self.flops)
        for members in self.intervals:
            for i, p in zip(members, self._softmax(members), strict=False):
                probs[i] = p / len(self.intervals)
        return probs

    def deployed(self) -> list[int]:
        """The top-scored stitch of every FLOPs interval (ESTA's one-stage deployment)."""
        return [max(members, key=lambda i: self.scores[i]) for members in self.intervals]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "scores": list(self.scores), "seen": list(self.seen)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.scores, self.seen = list(state["scores"]), list(state["seen"])


SAMPLERS = {"uniform": UniformSampler, "ros": ROSSampler, "esta": ESTASampler}


def snip_score(parameters) -> float:
    """SNIP importance Σ|g ⊙ w| over parameters that have gradients."""
    total = 0.0
    for p in parameters:
        if p.grad is not None:
            total += float((p.grad.detach() * p.detach()).abs().sum())
    return total
