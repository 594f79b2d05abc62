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


def test_answer_quality_equals_the_bootstrap_of_each_measure():
    # answer_quality measures each answer once and resamples sums; its numbers must be those of the
    # generic bootstrap of each list measure over the same draws, also with unequal sample counts.
    import random

    rng = random.Random(7)
    words = "a b c d e f sleep well rest tea".split()

    def answer():
        return Answer(" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))), ended=rng.random() < 0.5)

    answers = [[answer() for _ in range(rng.randint(1, 3))] for _ in range(13)]
    base = [[answer() for _ in range(rng.randint(1, 3))] for _ in range(13)]
    q = answer_quality(answers, base, seed=5, resamples=300)
    for name, flat in MEASURES.items():
        def measure(groups, flat=flat):
            return flat([a for group in groups for a in group])

        low, high = bootstrap_interval(answers, measure, resamples=300, seed=5)
        diff, d_low, d_high = paired_difference(answers, base, measure, resamples=300, seed=5)
        assert q[name]["value"] == pytest.approx(measure(answers), abs=1e-12)
        assert (q[name]["low"], q[name]["high"]) == pytest.approx((low, high), abs=1e-12)
        assert q[name]["vs_base"] == pytest.approx([diff, d_low, d_high], abs=1e-12)
        assert q[name]["outside_noise"] == (d_low > 0 or d_high < 0)
    with pytest.raises(ValueError, match="differ in length"):
        answer_quality(answers, base[:-1])
