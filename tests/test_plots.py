"""Tests for alignkit.plots on fake run folders with synthetic metrics."""

import json
import logging
import math
import struct
from pathlib import Path

import pytest

from alignkit.errors import UserError
from alignkit.plots import (
    ema,
    plot_dpo_comparison,
    plot_run,
    plot_runs,
    read_metrics,
    read_run_info,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, algo: str, nll_alpha: float = 0.0, steps: int = 50, eval_every: int = 10,
              run_json: bool = True) -> Path:
    """A run folder whose loss decays over ``steps`` steps, with an eval line every ``eval_every``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if run_json:
        config = {"nll_alpha": nll_alpha, "beta": 0.1, "loss_type": "sigmoid", "lr": 5e-5, "lora_r": 16,
                  "model": "tiny-test-model", "dataset": "bundled"}
        (run_dir / "run.json").write_text(json.dumps({"algo": algo, "run_name": run_dir.name, "config": config}))
    lines = []
    for step in range(1, steps + 1):
        loss = 2.0 * math.exp(-step / 15) + 0.5 + 0.05 * math.sin(step)
        record = {"step": step, "epoch": step / steps, "split": "train", "time": step * 0.1, "loss": loss}
        if algo == "sft":
            record.update(perplexity=math.exp(loss), lr=5e-5, grad_norm=1.0, tokens=100, tokens_per_s=50.0)
        else:
            chosen, rejected = -0.01 * step, -0.05 * step
            record.update({"dpo_loss": loss, "nll_loss": 1.2, "rewards/chosen": chosen,
                           "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                           "rewards/accuracies": 0.5 + step / (2 * steps), "logps/chosen": -50.0,
                           "logps/rejected": -60.0})
        lines.append(json.dumps(record))
        if eval_every and step % eval_every == 0:
            held_out = {"step": step, "epoch": step / steps, "split": "eval", "loss": loss + 0.1}
            if algo == "sft":
                held_out["perplexity"] = math.exp(loss + 0.1)
            else:
                held_out.update({"rewards/accuracies": 0.6, "rewards/margins": 0.04 * step})
            lines.append(json.dumps(held_out))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def assert_png(path: Path) -> tuple[int, int]:
    """Check ``path`` is a non-empty PNG and return its (width, height) from the IHDR chunk."""
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC, path
    return struct.unpack(">II", data[16:24])


def test_ema_hand_worked():
    # smoothing 0.5: m1 = 0.5*1 = 0.5 -> 0.5/(1-0.5) = 1; m2 = 0.25 + 0.5*2 = 1.25 -> 1.25/0.75
    assert ema([1.0, 2.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75])
    assert ema([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0])  # debiased: no pull to 0
    assert ema([1.0, 5.0, 2.0], 0.0) == [1.0, 5.0, 2.0]
    assert ema([], 0.9) == []


def test_ema_passes_non_finite_through_without_poisoning():
    out = ema([1.0, float("nan"), 1.0, float("inf")], 0.9)
    assert out[0] == pytest.approx(1.0) and out[2] == pytest.approx(1.0)
    assert math.isnan(out[1]) and math.isinf(out[3])


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, True, "0.9", None])
def test_ema_rejects_bad_smoothing(bad):
    with pytest.raises(ValueError, match="smoothing"):
        ema([1.0], bad)


def test_read_metrics_tolerates_crash_nan_and_missing_keys(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "split": "train", "loss": 2.0}\n'
        "\n"
        '{"step": 2, "split": "train", "loss": NaN}\n'
        '{"step": 3, "loss": Infinity}\n'
        '[1, 2]\n'
        '{"step": 4, "split": "train", "lo'
    )
    with caplog.at_level(logging.WARNING, logger="alignkit.plots"):
        records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert math.isnan(records[1]["loss"])
    assert "last line" in caplog.text and "not a JSON object" in caplog.text


def test_missing_metrics_is_a_user_error_naming_the_path(tmp_path):
    with pytest.raises(UserError, match="metrics.jsonl"):
        read_metrics(tmp_path)
    with pytest.raises(UserError, match=str(tmp_path)):
        plot_run(tmp_path)


def test_read_run_info_guesses_without_run_json(tmp_path):
    dpo = write_run(tmp_path / "dpo_run", "dpo", run_json=False)
    sft = write_run(tmp_path / "sft_run", "sft", run_json=False)
    assert read_run_info(dpo)["algo"] == "dpo" and read_run_info(dpo)["run_name"] == "dpo_run"
    assert read_run_info(sft) == {"algo": "sft", "run_name": "sft_run", "config": {}}
    (sft / "run.json").write_text("[1]")
    with pytest.raises(UserError, match="JSON object"):
        read_run_info(sft)


def test_plot_run_sft(tmp_path):
    run = write_run(tmp_path / "sft", "sft")
    paths = plot_run(run)
    assert [p.name for p in paths] == ["sft_training_loss.png", "eval_metrics.png"]
    for path in paths:
        assert path.parent == run
        assert_png(path)
    assert not list(run.glob(".*")), "temporary files left behind"


def test_a_run_named_in_characters_the_font_lacks_is_drawn_without_a_warning_per_character(tmp_path):
    import warnings

    run = write_run(tmp_path / "ünï 日本", "sft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = plot_run(run)
    assert [str(w.message) for w in caught] == []
    assert [assert_png(p) and p.name for p in paths] == ["sft_training_loss.png", "eval_metrics.png"]

@pytest.mark.parametrize("alpha, prefix", [(0.0, "dpo"), (1.0, "dpo_plus_nll")])
def test_plot_run_dpo_names_follow_nll_alpha(tmp_path, alpha, prefix):
    run = write_run(tmp_path / "run", "dpo", nll_alpha=alpha)
    out = tmp_path / "figures"
    paths = plot_run(run, out_dir=out)
    assert [p.name for p in paths] == [f"{prefix}_training_loss.png", f"{prefix}_reward_margins.png",
                                       "eval_metrics.png"]
    assert all(p.parent == out for p in paths)
    for path in paths:
        assert_png(path)


def test_plot_run_skips_eval_figure_without_eval_lines(tmp_path):
    run = write_run(tmp_path / "run", "sft", eval_every=0)
    assert [p.name for p in plot_run(run)] == ["sft_training_loss.png"]


def test_plot_run_survives_non_finite_and_missing_values(tmp_path):
    run = write_run(tmp_path / "run", "dpo", nll_alpha=1.0)
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 51, "split": "train", "loss": NaN, "rewards/chosen": Infinity}\n')
        handle.write('{"split": "train", "loss": 1.0}\n')  # no step: cannot be placed, skipped
        handle.write('{"step": 52, "split": "eval"}\n')
        handle.write('{"step": 53, "split": "train", "loss": "oops", "rewards/margins": null}\n')
    assert len(plot_run(run)) == 3


def test_plot_run_with_no_finite_loss_writes_nothing_and_does_not_crash(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"algo": "sft", "run_name": "x", "config": {}}))
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": NaN}\n')
    with caplog.at_level(logging.WARNING, logger="alignkit.plots"):
        assert plot_run(run) == []
    assert "no finite training loss" in caplog.text


def test_plot_run_validates_smoothing_first(tmp_path):
    run = write_run(tmp_path / "run", "sft")
    with pytest.raises(ValueError):
        plot_run(run, smoothing=1.0)
    assert not list(run.glob("*.png"))


def test_plot_dpo_comparison_side_by_side(tmp_path):
    runs = [write_run(tmp_path / "dpo", "dpo", 0.0), write_run(tmp_path / "dpo_nll", "dpo", 1.0)]
    path = plot_dpo_comparison(runs, tmp_path / "cmp" / "comparison.png")
    width, height = assert_png(path)
    assert width > 1.5 * height  # two panels next to each other
    with pytest.raises(UserError, match="DPO runs only"):
        plot_dpo_comparison([runs[0], write_run(tmp_path / "sft", "sft")], tmp_path / "x.png")
    with pytest.raises(UserError):
        plot_dpo_comparison([], tmp_path / "x.png")


def test_plot_runs_into_run_folders(tmp_path):
    sft = write_run(tmp_path / "sft", "sft")
    dpo = write_run(tmp_path / "dpo", "dpo", 0.0)
    dpo_nll = write_run(tmp_path / "dpo_nll", "dpo", 1.0)
    paths = plot_runs([sft, dpo, dpo_nll])
    assert paths[-1] == sft / "dpo_nll_comparison.png"
    assert (dpo_nll / "dpo_plus_nll_reward_margins.png") in paths and (dpo / "dpo_training_loss.png") in paths
    assert len(paths) == 2 + 3 + 3 + 1
    for path in paths:
        assert_png(path)


def test_plot_runs_into_out_dir_keeps_runs_apart(tmp_path):
    # Two DPO + NLL runs share figure names, so each run gets its own sub-folder.
    a = write_run(tmp_path / "a" / "run", "dpo", 1.0)
    b = write_run(tmp_path / "b" / "run", "dpo", 1.0)
    out = tmp_path / "out"
    paths = plot_runs([a, b], out_dir=out)
    assert {p.parent for p in paths} == {out / "run", out / "run_2", out}
    assert (out / "dpo_nll_comparison.png") in paths


def test_plot_runs_single_dpo_run_gets_no_comparison(tmp_path):
    paths = plot_runs([write_run(tmp_path / "sft", "sft"), write_run(tmp_path / "dpo", "dpo")])
    assert not any(p.name == "dpo_nll_comparison.png" for p in paths)


def test_plot_runs_draws_a_folder_given_twice_once(tmp_path):
    dpo = write_run(tmp_path / "dpo", "dpo")
    paths = plot_runs([dpo, tmp_path / "x" / ".." / "dpo", dpo])
    assert paths == [dpo / "dpo_training_loss.png", dpo / "dpo_reward_margins.png", dpo / "eval_metrics.png"]


def test_plot_runs_warns_once_per_bad_metrics_line(tmp_path, caplog):
    dpo, nll = write_run(tmp_path / "dpo", "dpo"), write_run(tmp_path / "nll", "dpo", 1.0)
    with (dpo / "metrics.jsonl").open("a") as f:
        f.write("[1, 2]\n")
    with caplog.at_level(logging.WARNING, logger="alignkit"):
        plot_runs([dpo, nll])
    assert [r.getMessage() for r in caplog.records] == [f"{dpo / 'metrics.jsonl'}: skipping line 56, not a JSON object"]


@pytest.mark.parametrize("alphas, title", [((0.0, 1.0), "DPO training loss with and without the NLL term"),
                                           ((1.0, 0.5), "DPO training loss of 2 runs with the NLL term"),
                                           ((0.0, 0.0, 0.0), "DPO training loss of 3 runs")])
def test_the_comparison_title_says_what_the_runs_are(tmp_path, monkeypatch, alphas, title):
    import alignkit.plots as plots

    titles = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: titles.append(fig._suptitle.get_text()) or save(fig, path))
    plot_dpo_comparison([write_run(tmp_path / f"r{i}", "dpo", a) for i, a in enumerate(alphas)], tmp_path / "c.png")
    assert titles == [title]


def test_plotting_leaves_the_pyplot_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    plot_run(write_run(tmp_path / "run", "sft"))
    assert matplotlib.get_backend() == before
