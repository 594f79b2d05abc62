"""The generation benchmark's schedule of rows: which rows a batch decodes at each step as answers end."""

import importlib.util
from pathlib import Path


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarking" / "bench_generation.py"
    spec = importlib.util.spec_from_file_location("bench_generation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_leave_the_schedule_as_their_answers_end():
    rows_per_step = _bench().rows_per_step
    # Stopped after 3 tokens: the prompts' pass chose the first, steps 1-3 the rest and the stop token.
    # Capped at 5: steps 1-4 chose tokens 2-5. Stopped at once (empty answer): no step.
    assert rows_per_step([[1, 2, 3], [1, 2, 3, 4, 5], []], max_new_tokens=5) == [2, 2, 2, 1]
    assert rows_per_step([[7]], max_new_tokens=1) == []     # capped at its first token: the prompts' pass only
    assert rows_per_step([[7]], max_new_tokens=4) == [1]    # one step chose its stop token
    assert rows_per_step([], max_new_tokens=4) == []
