"""Answer-quality numbers with their uncertainty: per-answer measures, bootstrap intervals, and
paired differences against the base model on the same prompts.

Every measure is computed over a list of answers to one list of prompts. An interval is the 95%
percentile bootstrap over prompts (resampling answers with replacement, seeded). A difference
from the base is *outside the noise* when the paired bootstrap interval of (configuration - base),
resampling the same prompts for both, excludes zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .report import repetition_score

LOOPING = 0.3
"""An answer whose repetition score exceeds this counts as looping."""

_WORD = re.compile(r"\w+")


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct word n-grams over all n-grams of all ``texts`` (lower-cased ``\\w+`` words).

    Corpus-level, as usually reported: 1.0 when no n-gram repeats anywhere, near 0 for answers that
    all say the same thing or loop. 0.0 when the texts hold no n-gram at all.
    """
    grams = []
    for text in texts:
        words = _WORD.findall(text.lower())
        grams += [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@dataclass(frozen=True)
class Answer:
    """One generated answer and whether it ended on its own (a stop token before the token limit),
    as :func:`alignkit.generation.generate_replies` returns it."""

    text: str
    ended: bool


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else 0.0


PER_ANSWER: dict[str, Callable[[Answer], float]] = {
    "repetition": lambda x: repetition_score(x.text),
    "looping_share": lambda x: float(repetition_score(x.text) > LOOPING),
    "ended_share": lambda x: float(x.ended),
    "mean_words": lambda x: float(len(x.text.split())),
    # per answer, then averaged: a corpus-level ratio falls whenever a resample repeats an answer,
    # which would bias its bootstrap interval below the value itself
    "distinct_2": lambda x: distinct_n([x.text], 2),
}
"""Name -> the value of one answer; each measure of a list of answers is the mean of these."""

MEASURES: dict[str, Callable[[Sequence[Answer]], float]] = {
    name: (lambda answers, value=value: _mean([value(a) for a in answers])) for name, value in PER_ANSWER.items()
}
"""Name -> measure of a list of answers (all on the same prompts)."""


def _draws(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) indices drawn with replacement: row r is the r-th bootstrap resample."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, n, n) for _ in range(resamples)])


def _percentiles(values, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_interval(items: Sequence, statistic: Callable[[Sequence], float], resamples: int = 2000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(items)`` resampling ``items`` with replacement."""
    if not items:
        return (0.0, 0.0)
    draws = _draws(len(items), resamples, seed)
    return _percentiles([statistic([items[i] for i in idx]) for idx in draws], level)


def paired_difference(items: Sequence, base: Sequence, statistic: Callable[[Sequence], float],
                      resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``(difference, low, high)`` of ``statistic(items) - statistic(base)``, resampling prompts jointly.

    ``items[i]`` and ``base[i]`` answer the same prompt, so each resample draws the same prompts on
    both sides: the prompt-to-prompt spread, shared by both, cancels out of the interval.
    """
    if len(items) != len(base):
        raise ValueError(f"paired lists differ in length: {len(items)} vs {len(base)}")
    diff = statistic(items) - statistic(base)
    if not items:
        return (diff, diff, diff)
    draws = _draws(len(items), resamples, seed)
    values = [statistic([items[i] for i in idx]) - statistic([base[i] for i in idx]) for idx in draws]
    return (float(diff), *_percentiles(values, level))


def _per_prompt(answers) -> list[list[Answer]]:
    """Answers grouped by prompt: an ``Answer`` alone is its prompt's only sample."""
    return [[a] if hasattr(a, "ended") else list(a) for a in answers]


def answer_quality(answers: Sequence, base: Sequence | None = None, seed: int = 0,
                   resamples: int = 2000) -> dict[str, dict]:
    """Every measure of ``answers`` as ``{name: {"value", "low", "high"}}``.

    ``answers`` holds one ``Answer`` per prompt, or per prompt a list of sampled ``Answer``s; the
    bootstrap resamples prompts (all samples of a drawn prompt go together). With ``base`` (the base
    model's answers to the same prompts) each entry also holds ``"vs_base": [difference, low,
    high]`` and ``"outside_noise"``: whether that interval excludes 0.
    """
    answers = _per_prompt(answers)
    base = _per_prompt(base) if base is not None else None
    if base is not None and len(base) != len(answers):
        raise ValueError(f"paired lists differ in length: {len(answers)} vs {len(base)}")
    # Every measure is a mean over answers, so a resample's value is (sum of its prompts' sums) /
    # (sum of their counts): each answer is measured once and the resamples are array sums.
    # The draws are those of bootstrap_interval / paired_difference, so the numbers are theirs.
    draws = _draws(len(answers), resamples, seed) if answers else None

    def measured(groups, value) -> tuple[float, np.ndarray | None]:
        """The measure of ``groups`` and its value in each resample (None without prompts)."""
        sums = np.array([sum(value(a) for a in group) for group in groups], dtype=float)
        counts = np.array([len(group) for group in groups], dtype=float)
        point = float(sums.sum() / counts.sum()) if counts.sum() else 0.0
        if draws is None:
            return point, None
        total, n = sums[draws].sum(1), counts[draws].sum(1)
        return point, np.divide(total, n, out=np.zeros_like(total), where=n > 0)

    out = {}
    for name, value in PER_ANSWER.items():
        point, resampled = measured(answers, value)
        low, high = _percentiles(resampled, 0.95) if resampled is not None else (0.0, 0.0)
        entry = {"value": point, "low": low, "high": high}
        if base is not None:
            base_point, base_resampled = measured(base, value)
            diff = point - base_point
            d_low, d_high = (_percentiles(resampled - base_resampled, 0.95) if resampled is not None
                             else (diff, diff))
            entry["vs_base"] = [diff, d_low, d_high]
            entry["outside_noise"] = bool(d_low > 0 or d_high < 0)
        out[name] = entry
    return out


def format_measure(entry: dict, fmt: str = "{:.3g}") -> str:
    """One :func:`answer_quality` entry as text: ``value [low, high]``, with ``*`` when its difference
    from the base is outside the noise, e.g. ``0.26 [0.13, 0.41]*``."""
    mark = "*" if entry.get("outside_noise") else ""
    return f"{fmt.format(entry['value'])} [{fmt.format(entry['low'])}, {fmt.format(entry['high'])}]{mark}"
