"""The generation benchmark's schedule of rows: which rows a batch decodes at each step as answers end."""

import importlib.util
from pathlib import Path

import pytest


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


def test_bad_adapter_or_json_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path):
    bench = _bench()
    monkeypatch.setattr(bench, "_model", lambda *a, **k: pytest.fail("the model loaded"))
    missing = tmp_path / "nonexistent"
    assert bench.main(["--adapter", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: bench_generation.py: argument --adapter: {missing}: no such adapter folder\n"
    json_path = tmp_path / "no" / "r.json"
    assert bench.main(["--json", str(json_path)]) == 2
    assert capsys.readouterr().err == (f"error: bench_generation.py: argument --json: {json_path}: "
                                       f"folder {json_path.parent} does not exist\n")
    assert bench.main(["--json", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: bench_generation.py: argument --json: {tmp_path} is a folder: "
                                       "give a file name inside it\n")
    assert list(tmp_path.iterdir()) == []
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("plain text")
    for path, why in ((tmp_path / "none.gguf", f"{tmp_path / 'none.gguf'}: no such file"),
                      (not_gguf, f"{not_gguf} is not a GGUF file (alignkit export --format gguf writes one)")):
        assert bench.main(["--gguf", str(path)]) == 2
        assert capsys.readouterr().err == f"error: bench_generation.py: argument --gguf: {why}\n"
