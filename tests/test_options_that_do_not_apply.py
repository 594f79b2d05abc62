"""Options a run would ignore or that contradict each other are refused up front; so are folders and
files given where they cannot serve. Each case is one `error:` line and exit code 2 (see test_bad_input)."""

from __future__ import annotations

import shutil
import sys

import pytest
from test_bad_input import no_training, refused, run_flags, write  # noqa: F401 - no_training is a fixture

from alignkit.cli import main
from alignkit.config import build_config, unused_options


@pytest.mark.parametrize("algo, flags, needle", [
    ("dpo", ["--simpo-gamma", "1"], "--simpo-gamma does not apply to --loss-type sigmoid (only to simpo): drop it"),
    ("dpo", ["--loss-type", "simpo", "--reuse-reference"],
     "--reuse-reference does not apply to --loss-type simpo, which has no reference: drop it"),
    ("sft", ["--temperature", "0.7", "--max-new-tokens", "9"],
     "--max-new-tokens, --temperature do not apply to training, only to the chat of --eval: drop them"),
    ("sft", ["--mutate-lr-range", "1", "2"], "--mutate-lr-range does not apply without --pop-size > 1: drop it"),
    ("dpo", ["--evo-steps", "5", "--mutate-beta-range", "1", "3"], "--evo-steps, --mutate-beta-range do not apply"),
    ("sft", ["--pop-size", "2", "--tournament-size", "3"], "--tournament-size 3 draws more members than --pop-size 2"),
    ("dpo", ["--pop-size", "2", "--save-interval", "2", "--eval-interval", "1"],
     "--save-interval, --eval-interval do not apply to --pop-size > 1, whose members are evaluated and saved once "
     "per generation (--evo-steps): drop them"),
    ("sft", ["--threads", "100000"], "--threads 100000 is more than the"),
    ("sft", ["--eval", "--load-path", "somewhere", "--lr", "1", "--max-steps", "3"],
     "--lr, --max-steps do not apply to --eval, which chats with an adapter and trains nothing: drop them"),
    ("sft", ["--eval", "--load-path", "somewhere", "--top-p", "0.5"],
     "--top-p applies to sampled answers: give --temperature > 0 too (0 is greedy), or drop --top-p"),
])
def test_options_the_run_would_ignore_are_refused(no_training, capsys, tmp_path, algo, flags, needle):  # noqa: F811
    argv = [algo, "--model", "not-loaded", *flags] if "--eval" in flags else \
        run_flags(algo, tmp_path, "--model", "not-loaded", *flags)
    message = refused(capsys, *argv)
    assert message.startswith("error: invalid options:") and needle in message


def test_options_that_apply_are_accepted_and_a_config_file_may_hold_any(tmp_path):
    def unused(algo, **given):
        return unused_options(build_config(algo, given), given)

    assert unused("dpo", loss_type="simpo", simpo_gamma=1.0) == []
    assert unused("sft", pop_size=2, mutate_lr_range=[1.0, 3.0], evo_steps=4) == []
    assert unused("sft", eval=True, load_path="x", temperature=0.5, top_p=0.9, seed=3, threads=1) == []
    assert unused("sft", lr=1e-3, max_steps=3, threads=1) == []
    # one file for training and chatting: what the command does not use is left alone
    shared = write(tmp_path / "both.yaml", "lr: 0.001\nmax_new_tokens: 50\ntemperature: 0.7\nevo_steps: 3\n")
    assert unused("sft", config=str(shared)) == []
    assert unused("sft", config=str(shared), eval=True, load_path="x") == []


@pytest.mark.parametrize("content, needle", [
    ("lr: 0.1\nbatch_size: 2\nlr: 0.2\n", "is not valid YAML at line 3, column 1: lr is given twice"),
    ("eval_columns:\n  prompt: a\n  prompt: b\n", "at line 3, column 3: prompt is given twice"),
    ("mutate_lr_range: 5\n", "mutate_lr_range must be two numbers [MIN, MAX], got 5"),
])
def test_a_yaml_key_given_twice_and_a_range_that_is_not_one(no_training, capsys, tmp_path, content,  # noqa: F811
                                                             needle):
    assert needle in refused(capsys, "sft", "--config", write(tmp_path / "options.yaml", content))


def test_a_column_named_for_another_part_that_the_data_needs(tiny_model_dir, rows_file, tmp_path, capsys):
    def train(algo, *extra):
        return refused(capsys, *run_flags(algo, tmp_path / "run", "--model", tiny_model_dir, "--dataset", rows_file,
                                          *extra))

    assert train("sft", "--response-column", "prompt") == (
        "error: --response-column prompt names the column that holds the prompts; a column plays one part (if "
        "yours are in another column, name it with --prompt-column)")
    assert train("dpo", "--chosen-column", "rejected") == (
        "error: --chosen-column rejected names the column that holds the rejected answers; a column plays one "
        "part (if yours are in another column, name it with --rejected-column)")
    assert not (tmp_path / "run").exists()
    # SFT may learn the chosen answers, and a prompt moved to its own column frees the name
    assert main(run_flags("sft", tmp_path / "ok", "--model", tiny_model_dir, "--dataset", rows_file,
                          "--response-column", "chosen")) == 0


def test_resume_of_a_file_and_a_folder_that_takes_no_files(capsys, tmp_path, monkeypatch):
    import errno

    a_file = write(tmp_path / "run.txt", "x")
    assert refused(capsys, "sft", "--resume", a_file) == (
        f"error: {a_file} is a file; give the run's folder (the one holding run.json)")

    def read_only(*args, **kwargs):
        raise OSError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr("tempfile.mkstemp", read_only)   # what /proc answers
    assert refused(capsys, *run_flags("sft", tmp_path / "new" / "run")) == (
        f"error: --save-path {tmp_path / 'new' / 'run'} cannot be written: {tmp_path} does not take new files "
        "(No such file or directory)")


def test_the_pipeline_checks_every_stages_folder_before_training(no_training, capsys, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    later = out / "runs" / "sft_dpo_nll"
    later.mkdir(parents=True)
    write(later / "notes.txt", "mine")
    assert refused(capsys, "pipeline", "--out", out) == (
        f"error: {later} (under --out) holds files that are not an alignkit run (no run.json); empty it or give "
        "another --out")
    assert refused(capsys, "pipeline", "--out", out, "--overwrite").endswith("empty it or give another --out")
    (later / "notes.txt").unlink()
    write(later / "run.json", "{}")
    assert "already holds a run; pass --reuse" in refused(capsys, "pipeline", "--out", out)
    shutil.rmtree(out / "runs")
    write(out / "runs", "a file")
    assert refused(capsys, "pipeline", "--out", out) == (
        f"error: the run folder {out / 'runs' / 'sft'} (under --out) cannot be written: {out / 'runs'} is a file, "
        "not a folder")
    assert (out / "runs").read_text() == "a file" and not (out / "report").exists()


def test_version(capsys):
    import alignkit

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"alignkit {alignkit.__version__}\n"


def test_export_prints_its_result_alone_on_stdout(tiny_model_dir, rows_file, tmp_path, capsys, monkeypatch):
    """What a library prints while the model is saved (DeepSpeed's accelerator warning) goes to stderr."""
    run = tmp_path / "run"
    assert main(run_flags("sft", run, "--model", tiny_model_dir, "--dataset", rows_file)) == 0
    capsys.readouterr()
    from transformers import PreTrainedModel

    save = PreTrainedModel.save_pretrained

    def chatty(self, *args, **kwargs):
        print("[WARNING] Setting accelerator to CPU.")
        return save(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", chatty)
    assert main(["export", "--load-path", str(run / "actor"), "--out", str(tmp_path / "merged")]) == 0
    out, err = capsys.readouterr()
    assert out == f"merged model written to {tmp_path / 'merged'}\n" and "Setting accelerator" in err
    assert sys.stdout is not None and (tmp_path / "merged" / "config.json").is_file()


def test_a_damaged_cached_copy_of_a_gguf_model_names_the_copy(tiny_model_dir, tmp_path, monkeypatch):
    from alignkit import models
    from alignkit.errors import UserError

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setattr(models, "_gguf_folder", lambda location, convert=True: copy)
    with pytest.raises(UserError, match=rf"the float32 copy of smollm2-135m-instruct in the cache \({copy}\) cannot "
                                        r"be loaded \(.*\); delete that folder and alignkit makes it again"):
        models.load_model("smollm2-135m-instruct", device="cpu")


def test_flags_are_taken_only_as_written_in_full(no_training, capsys, tmp_path):  # noqa: F811
    # an abbreviation could come to mean another flag once one is added
    assert refused(capsys, *run_flags("sft", tmp_path, "--max-step", "1")) == (
        "error: alignkit: unrecognized arguments: --max-step 1")


def test_resume_refuses_overwrite_and_a_population_of_0_gets_one_line(no_training, capsys, tmp_path):  # noqa: F811
    assert refused(capsys, "sft", "--resume", str(tmp_path), "--overwrite") == (
        "error: --overwrite does not apply to --resume, which continues the run in its folder: drop it")
    assert refused(capsys, *run_flags("sft", tmp_path, "--pop-size", "0")) == (
        "error: invalid options: --pop-size must be >= 1 (got 0)")


def test_epochs_against_a_max_steps_not_given_now_is_refused(tmp_path):
    """--epochs is ignored while --max-steps > 0: refused when that --max-steps is not on the command line
    (recorded by the run --resume continues, or from --config), where its precedence goes unseen; beside
    an explicit --max-steps the documented precedence holds."""
    (tmp_path / "steps.yaml").write_text("max_steps: 5\n")
    cfg = build_config("sft", {"config": str(tmp_path / "steps.yaml"), "epochs": 2.0})
    assert unused_options(cfg, {"config": str(tmp_path / "steps.yaml"), "epochs": 2.0}) == [
        "--epochs does not apply while --max-steps 5 (recorded or from --config) sets the length; --max-steps 0 "
        "counts it in --epochs: drop it"]
    both = {"max_steps": 5, "epochs": 2.0}
    assert unused_options(build_config("sft", both), both) == []
    assert unused_options(build_config("sft", {"epochs": 2.0}), {"epochs": 2.0}) == []
