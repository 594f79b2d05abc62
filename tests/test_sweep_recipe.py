"""benchmarking/sweep_recipe.py: its choice rules, and a whole sweep on the tiny model."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep_recipe", ROOT / "benchmarking" / "sweep_recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _point(name, nll, looping, ended, accuracy=None, steps=20):
    return {"name": name, "options": {"max_steps": steps},
            "metrics": {"sft_loss": nll, "preference_accuracy": accuracy},
            "quality": {"looping_share": {"value": looping}, "ended_share": {"value": ended}}}


def test_goals_compare_each_measure_with_the_base(sweep):
    base = _point("base", 2.0, 0.30, 0.25)
    assert sweep.goals_met(_point("a", 1.9, 0.30, 0.25), base, None) == {
        "NLL lower": True, "looping not higher": True, "ending not lower": True}
    met = sweep.goals_met(_point("b", 2.1, 0.31, 0.20, accuracy=0.94), base, 0.95)
    assert met == {"NLL lower": False, "looping not higher": False, "ending not lower": False,
                   "accuracy >= 95%": False}
    assert sweep.goals_met(_point("c", 1.0, 0.0, 1.0, accuracy=0.95), base, 0.95)["accuracy >= 95%"]


def test_sft_choice_is_the_lowest_nll_meeting_the_goals_and_cheaper_within_the_tie(sweep):
    base = _point("base", 2.0, 0.3, 0.3)
    points = [_point("loops", 1.0, 0.5, 0.9), _point("long", 1.50, 0.1, 0.9, steps=40),
              _point("short", 1.505, 0.1, 0.9, steps=20), _point("worse", 1.6, 0.1, 0.9)]
    for p in points:
        p["goals"] = sweep.goals_met(p, base, None)
    assert sweep.choose_sft(points)["name"] == "short"          # "loops" misses a goal; 0.005 < NLL_TIE
    points[2]["metrics"]["sft_loss"] = 1.52
    assert sweep.choose_sft(points)["name"] == "long"


def test_dpo_choice_is_the_most_accurate_meeting_the_goals_then_the_lowest_nll(sweep):
    base = _point("base", 2.0, 0.3, 0.3)
    points = [_point("a", 1.8, 0.2, 0.5, accuracy=0.97), _point("b", 1.7, 0.2, 0.5, accuracy=0.97),
              _point("c", 2.5, 0.2, 0.5, accuracy=1.0)]   # c: the best accuracy but its NLL rose
    for p in points:
        p["goals"] = sweep.goals_met(p, base, 0.95)
    assert sweep.choose_dpo(points)["name"] == "b"
    for p in points:   # no point meets every goal: the same order over all of them
        p["goals"]["NLL lower"] = False
    assert sweep.choose_dpo(points)["name"] == "c"


def test_bad_lists_are_refused_in_one_line(sweep, capsys):
    assert sweep.main(["--sft-lrs", "0.1,x"]) == 2
    assert "comma-separated numbers" in capsys.readouterr().err
    assert sweep.main(["--sft-steps", "2.5"]) == 2
    assert sweep.main(["--option", "nokey"]) == 2


@pytest.mark.parametrize("option, needle", [
    ("foo=bar", "--option foo: no such training option"),
    ("lr=0.1", "--option lr: the sweep sets it itself"),
    ("pop_size=2", "--option pop_size: does not apply to a sweep point"),
    ("loss_type=ipo", "--option loss_type: a DPO option; every --option applies to both"),
    ("batch_size=abc", "batch_size must be a whole number, got 'abc'"),
    ("batch_size=-3", "--batch-size must be >= 1 (got -3)"),
])
def test_options_are_checked_before_the_out_folder_is_made(sweep, capsys, tmp_path, option, needle):
    assert sweep.main(["--option", option, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: sweep_recipe.py: ") and needle in err[0]
    assert not (tmp_path / "out").exists()


def test_a_whole_sweep_on_the_tiny_model(sweep, tiny_model_dir, rows_file, tmp_path):
    out = tmp_path / "sweep"
    argv = ["--model", str(tiny_model_dir), "--dataset", str(rows_file), "--out", str(out),
            "--sft-lrs", "1e-3", "--sft-steps", "1,2", "--dpo-betas", "0.5", "--dpo-lrs", "1e-3,2e-3",
            "--dpo-steps", "1", "--max-new-tokens", "4", "--option", "batch_size=4", "--option", "max_length=64",
            "--option", "test_size=6", "--option", "eval_interval=0"]
    assert sweep.main(argv) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [p["options"]["max_steps"] for p in result["sft"]] == [1, 2]
    assert [p["options"]["lr"] for p in result["dpo_nll"]] == [1e-3, 2e-3]
    chosen = next(p for p in result["sft"] if p["name"] == result["chosen_sft"])
    for p in result["dpo_nll"]:   # stage 2 starts from the SFT point stage 1 chose
        assert p["options"]["load_path"] == str(Path(chosen["folder"]) / "actor")
        assert p["metrics"]["preference_accuracy"] is not None and set(p["goals"]) >= {"NLL lower"}
        steps = [json.loads(line)["step"] for line in (Path(p["folder"]) / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == 1
    assert result["base"]["metrics"]["preference_accuracy"] is None
    assert len(result["base"]["answers"]) == result["held_out_prompts"] == 6
    text = (out / "sweep.md").read_text()
    assert f"chosen: {result['chosen_sft']}" in text and "**(chosen)**" in text
    assert result["chosen_dpo_nll"] in [p["name"] for p in result["dpo_nll"]]
    # --reuse keeps the finished runs: nothing is trained again
    before = {p["folder"]: (Path(p["folder"]) / "metrics.jsonl").stat().st_mtime for p in result["sft"]}
    assert sweep.main(argv + ["--reuse"]) == 0
    assert {f: (Path(f) / "metrics.jsonl").stat().st_mtime for f in before} == before
    again = json.loads((out / "sweep.json").read_text())
    assert again["sft"][0]["metrics"] == result["sft"][0]["metrics"]   # scores read back from the cache
    # a finished run trained with other options is trained again, not reused
    assert sweep.main(argv + ["--reuse", "--option", "max_length=48"]) == 0
    assert all((Path(f) / "metrics.jsonl").stat().st_mtime > before[f] for f in before)


@pytest.mark.parametrize("script, argv, needle", [
    ("bench_population.py", ["--sizes", "1,-2"], "argument --sizes: must be >= 1 (got -2)"),
    ("bench_population.py", ["--sizes", "a"], "argument --sizes: not a whole number: 'a'"),
    ("bench_population.py", ["--generations", "0"], "argument --generations: must be >= 1 (got 0)"),
    ("bench_processes.py", ["--processes", ""], "argument --processes: expected comma-separated whole numbers"),
    ("bench_processes.py", ["--steps", "0"], "argument --steps: must be >= 1 (got 0)"),
])
def test_process_benchmarks_refuse_bad_counts_before_starting_a_worker(monkeypatch, capsys, script, argv, needle):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarking"))
    spec = importlib.util.spec_from_file_location(script[:-3], ROOT / "benchmarking" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "run_worker", lambda *a, **k: pytest.fail("a worker started"))
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    assert stop.value.code == 2 and needle in capsys.readouterr().err
