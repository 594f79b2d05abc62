"""Answer-quality measures and their intervals, against values worked out by hand."""

from __future__ import annotations

import pytest

from alignkit.quality import (
    LOOPING,
    MEASURES,
    Answer,
    answer_quality,
    bootstrap_interval,
    distinct_n,
    paired_difference,
)


def test_distinct_2_by_hand():
    # "a b a b": bigrams ab, ba, ab -> 2 distinct of 3; "c d": cd -> 1 of 1; together 3 of 4.
    assert distinct_n(["a b a b"]) == pytest.approx(2 / 3)
    assert distinct_n(["a b a b", "C d"]) == pytest.approx(3 / 4)
    assert distinct_n(["one"]) == 0.0


def test_measures_by_hand():
    answers = [Answer("a b c a b c a b c", ended=False),   # repetition 4/7, looping
               Answer("Hello there my friend", ended=True),  # repetition 0
               Answer("ok", ended=True)]
    assert MEASURES["repetition"](answers) == pytest.approx((4 / 7) / 3)
    assert 4 / 7 > LOOPING and MEASURES["looping_share"](answers) == pytest.approx(1 / 3)
    assert MEASURES["ended_share"](answers) == pytest.approx(2 / 3)
    assert MEASURES["mean_words"](answers) == pytest.approx((9 + 4 + 1) / 3)


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [0.0] * 10 + [1.0] * 10
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    low, high = bootstrap_interval(values, mean, seed=3)
    assert (low, high) == bootstrap_interval(values, mean, seed=3)
    assert low < 0.5 < high and 0.2 < low and high < 0.8   # sd of the mean is ~0.11
    assert bootstrap_interval([2.0] * 7, mean) == (2.0, 2.0)


def test_paired_difference_sees_a_shift_and_not_a_null():
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    base = [float(i) for i in range(30)]            # widely spread prompts ...
    shifted = [x + 1.0 for x in base]               # ... each answered exactly 1 better
    diff, low, high = paired_difference(shifted, base, mean)
    assert diff == pytest.approx(1.0) and low == pytest.approx(1.0) and high == pytest.approx(1.0)
    # unpaired intervals of the two lists overlap widely, so only pairing shows the effect
    assert bootstrap_interval(shifted, mean)[0] < bootstrap_interval(base, mean)[1]
    noise = [x + (0.5 if i % 2 else -0.5) for i, x in enumerate(base)]
    _, low, high = paired_difference(noise, base, mean)
    assert low < 0 < high
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0], mean)


def test_answer_quality_marks_only_real_differences():
    base = [Answer("the the the the the the the the", ended=False)] * 20
    better = [Answer(f"Sure thing {i}, here is a fresh idea.", ended=True) for i in range(20)]
    q = answer_quality(better, base)
    assert q["ended_share"]["value"] == 1.0 and q["ended_share"]["outside_noise"]
    assert q["looping_share"]["vs_base"][0] == -1.0 and q["looping_share"]["outside_noise"]
    same = answer_quality(base, base)
    assert not any(entry["outside_noise"] for entry in same.values())
    assert all(e["low"] <= e["value"] <= e["high"] for e in q.values())


def test_samples_of_one_prompt_are_resampled_together():
    # Two prompts, three samples each: prompt 0 always loops, prompt 1 never does.
    loops = [Answer("x y z x y z x y z", ended=False)] * 3
    fine = [Answer("a fine answer here", ended=True)] * 3
    q = answer_quality([loops, fine])
    assert q["looping_share"]["value"] == 0.5
    # resampling whole prompts can only give 0, 1/2 or 1: never the 1/3 or 2/3 of loose samples
    assert {q["looping_share"]["low"], q["looping_share"]["high"]} <= {0.0, 0.5, 1.0}
