"""Runs that survive: exact resume after SIGKILL, graceful stop on signals, outputs never destroyed."""

import errno
import json
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.config import build_config
from alignkit.runs import claim_run_dir

# The command line, with every optimizer step slowed down so a test can signal or kill it mid-run.
SLOW_CLI = """
import sys, time
import alignkit.agents as agents
learn = agents.LLMAgent.learn
def slow(self, batch):
    out = learn(self, batch)
    time.sleep(float(sys.argv[1]))
    return out
agents.LLMAgent.learn = slow
from alignkit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _flags(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--dataset", str(data), "--save-path", str(out), "--no-timestamp",
            "--max-steps", "7", "--batch-size", "4", "--max-length", "64", "--test-size", "6", "--lr", "1e-2",
            "--eval-interval", "3", "--no-plot", *extra]


def _slow(delay, argv, **kw):
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, str(delay), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(path: Path, proc, timeout=180):
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.02)


def _records(run):
    """The metrics lines written so far (a line still being written, without its newline, is left for the next
    read)."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().split("\n")[:-1]]


def _train_losses(run):
    return {r["step"]: r["loss"] for r in _records(run) if r["split"] == "train"}


def _errors(capsys) -> list[str]:
    """The error lines of what the command printed on stderr (progress bars aside); no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def _assert_same_run(whole, resumed):
    a = load_file(str(whole / "actor" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "actor" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    la, lb = _train_losses(whole), _train_losses(resumed)
    assert sorted(la) == sorted(lb) == list(range(1, 8))
    assert all(abs(la[s] - lb[s]) < 1e-5 for s in la), (la, lb)


@pytest.mark.parametrize("algo", ["sft", "dpo"])
def test_a_killed_run_resumes_to_the_same_adapter_and_losses(algo, tiny_model_dir, rows_file, tmp_path, monkeypatch,
                                                              capsys):
    # one reference cache for both runs: the resumed DPO run reads entries the whole run wrote
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([algo, *_flags(tiny_model_dir, rows_file, whole)]) == 0
    proc = _slow(0.3, [algo, *_flags(tiny_model_dir, rows_file, cut, "--save-interval", "2")])
    _wait_for(cut / "checkpoint-4" / "training_state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (cut / "actor").exists() and max(_train_losses(cut)) < 7
    capsys.readouterr()
    assert main([algo, "--resume", str(cut)]) == 0
    assert "resuming at step 4 of 7" in capsys.readouterr().out
    _assert_same_run(whole, cut)
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-7"]   # keep 2


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_saves_and_says_how_to_resume(sig, code, tiny_model_dir, rows_file, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["sft", *_flags(tiny_model_dir, rows_file, whole)]) == 0
    proc = _slow(0.5, ["sft", *_flags(tiny_model_dir, rows_file, cut)])   # no --save-interval
    _wait_for(cut / "metrics.jsonl", proc)
    while 1 not in _train_losses(cut):
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code
    last = err.strip().splitlines()[-1]
    step = int(last.split("stopped at step ")[1].split()[0])
    assert last == (f"stopped at step {step} of 7; checkpoint written to {cut / f'checkpoint-{step}'}; "
                    f"resume with: alignkit sft --resume {cut}")
    assert not (cut / "actor").exists()
    assert main(["sft", "--resume", str(cut)]) == 0
    _assert_same_run(whole, cut)


def test_a_signal_during_the_last_step_finishes_the_run_and_still_exits_with_the_signal(tiny_model_dir, rows_file,
                                                                                         tmp_path):
    cut = tmp_path / "cut"
    proc = _slow(1.5, ["sft", *_flags(tiny_model_dir, rows_file, cut)])
    _wait_for(cut / "metrics.jsonl", proc)
    while (6, "eval") not in {(r["step"], r["split"]) for r in _records(cut)}:
        assert proc.poll() is None
        time.sleep(0.02)
    time.sleep(0.5)   # past step 6's eval and stop check: step 7, the last, is under way (and sleeps 1.5 s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130   # a script that runs a next command after this one stops here
    assert err.strip().splitlines()[-1] == (f"SIGINT came during the last step; the run finished "
                                            f"(adapter saved to {cut / 'actor'})")
    assert 7 in _train_losses(cut) and (cut / "actor" / "adapter_config.json").exists()


def test_a_pipeline_stage_stopped_by_a_signal_says_to_rerun_the_pipeline_and_trains_nothing_after(monkeypatch,
                                                                                                tmp_path):
    import alignkit.train
    from alignkit import pipeline
    from alignkit.errors import RunInterrupted

    started = []

    def stopped(cfg):
        started.append(Path(cfg.save_path).name)
        raise RunInterrupted(f"stopped at step 2 of 7; checkpoint written to {cfg.save_path}/checkpoint-2", 143,
                             f"alignkit sft --resume {cfg.save_path}")

    monkeypatch.setattr(alignkit.train, "run", stopped)
    with pytest.raises(RunInterrupted) as caught:
        pipeline.train_configurations(["sft_dpo_nll"], tmp_path / "runs")
    assert started == ["sft"] and caught.value.exit_code == 143
    assert str(caught.value) == (f"SFT: stopped at step 2 of 7; checkpoint written to {tmp_path}/runs/sft/checkpoint-2; "
                                 "resume with: the same alignkit pipeline command with --reuse")


def test_a_second_interrupt_stops_at_once_and_leaves_no_partial_files(tiny_model_dir, rows_file, tmp_path):
    cut = tmp_path / "cut"
    proc = _slow(3.0, ["sft", *_flags(tiny_model_dir, rows_file, cut)])
    _wait_for(cut / "metrics.jsonl", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted"
    assert not [p for p in cut.iterdir() if p.name.startswith(".")]
    assert not (cut / "actor").exists()


def test_a_diverging_loss_keeps_the_last_good_checkpoint_and_resume_meets_it_again(tiny_model_dir, rows_file,
                                                                                    tmp_path, capsys):
    run = tmp_path / "nan"
    flags = _flags(tiny_model_dir, rows_file, run, "--save-interval", "1")
    flags[flags.index("--lr") + 1] = "1e30"
    assert main(["sft", *flags]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and err[0].startswith("error: the loss became nan at step 2; lower --lr")
    assert err[0].endswith(f"last good checkpoint: {run / 'checkpoint-1'})")
    assert not (run / "actor").exists() and not (run / "training_state.json").exists()
    assert main(["sft", "--resume", str(run)]) == 2
    assert _errors(capsys) == err


def test_a_finished_run_is_never_overwritten(tiny_model_dir, rows_file, tmp_path, capsys):
    run = tmp_path / "run"
    flags = _flags(tiny_model_dir, rows_file, run, "--max-steps", "1")
    assert main(["sft", *flags]) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["sft", *flags]) == 2
    assert _errors(capsys) == [f"error: --save-path {run} already holds a run; pass --resume {run} "
                               "to continue it, --overwrite to replace it, or choose another folder"]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # nor the folder a warm start reads its adapter from, even with --overwrite
    warm = ["dpo", *flags, "--load-path", str(run / "actor"), "--overwrite"]
    warm.remove("--model")
    warm.remove(str(tiny_model_dir))
    assert main(warm) == 2
    assert "--overwrite would delete the adapter --load-path" in capsys.readouterr().err
    assert main(["sft", *flags, "--overwrite"]) == 0
    # --overwrite replaces runs only: a folder of someone's own files is never emptied
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("important")
    (mine / "sub" / "data.csv").write_text("a,b")
    theirs = _flags(tiny_model_dir, rows_file, mine, "--max-steps", "1")
    for extra in ([], ["--overwrite"]):
        assert main(["sft", *theirs, *extra]) == 2
        assert _errors(capsys) == [f"error: --save-path {mine} already holds files that are not an alignkit run (no "
                                   "run.json); choose another folder or an empty one"]
    assert (mine / "notes.txt").read_text() == "important" and (mine / "sub" / "data.csv").is_file()
    # a length below the step the run has reached is refused, not taken as a mixed-up end
    capsys.readouterr()
    extended = _flags(tiny_model_dir, rows_file, tmp_path / "three", "--max-steps", "3", "--save-interval", "1")
    assert main(["sft", *extended]) == 0
    capsys.readouterr()
    assert main(["sft", "--resume", str(tmp_path / "three"), "--max-steps", "2"]) == 2
    assert _errors(capsys) == [f"error: {tmp_path / 'three'} has already reached step 3, past the 2 steps now asked "
                               "for; give more steps (--max-steps / --epochs) to extend it, or none to keep its "
                               "recorded length"]
    # extending a finished run: only --max-steps / --epochs may change
    assert main(["sft", "--resume", str(run), "--lr", "0.5"]) == 2
    assert "would change its result: --lr 0.5 (recorded: 0.01)" in capsys.readouterr().err
    other = tmp_path / "other"
    assert main(["sft", "--resume", str(run), "--save-path", str(other), "--max-steps", "2"]) == 2
    assert _errors(capsys) == [f"error: --resume continues {run} in place; it cannot write to --save-path {other}: "
                               "drop --save-path (or copy the run folder there first and resume the copy)"]
    assert not other.exists()
    assert main(["sft", "--resume", str(run), "--max-steps", "2"]) == 0
    assert sorted(_train_losses(run)) == [1, 2]


def test_an_extended_run_follows_the_new_schedule_and_is_unfinished_until_its_new_end(tiny_model_dir, rows_file,
                                                                                    tmp_path, monkeypatch, capsys):
    from alignkit import checkpoints, train

    whole, short = tmp_path / "whole", tmp_path / "short"
    assert main(["sft", *_flags(tiny_model_dir, rows_file, whole)]) == 0   # 7 steps from the start
    assert main(["sft", *_flags(tiny_model_dir, rows_file, short, "--max-steps", "4")]) == 0
    seen = []
    real = train.start_records
    monkeypatch.setattr(train, "start_records", lambda s, start, **kw: (
        seen.append((short / checkpoints.STATE_FILE).exists()), real(s, start, **kw))[1])
    assert main(["sft", "--resume", str(short), "--max-steps", "7"]) == 0
    assert seen == [False]   # while it trains on, the folder does not pass for a finished run
    rates = {n: {r["step"]: r["lr"] for r in _records(run) if r["split"] == "train"} for n, run in
             (("whole", whole), ("short", short))}
    # steps 5-7 take the 7-step schedule's rates (step 5 took the 4-step schedule's last rate before)
    assert [rates["short"][k] for k in (5, 6, 7)] == [rates["whole"][k] for k in (5, 6, 7)]
    assert (short / checkpoints.STATE_FILE).exists()


def test_run_folders_are_claimed_once(tmp_path):
    cfg = build_config("sft", {"save_path": str(tmp_path)})
    now = datetime(2026, 1, 2, 3, 4, 5)
    first, second = claim_run_dir(cfg, now), claim_run_dir(cfg, now)
    assert (first.name, second.name) == ("20260102_030405_SFT", "20260102_030405_SFT_2")


def test_paths_are_checked_before_anything_loads(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    # the model does not exist: the message must still be about the path, checked first
    for path, message in ((a_file, f"--save-path {a_file} is a file; give a folder"),
                          (a_file / "sub", f"--save-path {a_file / 'sub'} cannot be written")):
        assert main(["sft", "--model", "no/such-model", "--save-path", str(path)]) == 2
        assert capsys.readouterr().err.startswith(f"error: {message}")
    assert main(["export", "--load-path", str(tmp_path), "--out", str(a_file)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {a_file} is a file; give a folder to create"


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tiny_model_dir, rows_file, tmp_path,
                                                                        monkeypatch, capsys):
    import alignkit.checkpoints as checkpoints

    real, calls = checkpoints.save_file, []

    def full_disk(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(checkpoints, "save_file", full_disk)
    run = tmp_path / "run"
    assert main(["sft", *_flags(tiny_model_dir, rows_file, run, "--save-interval", "2")]) == 2
    assert _errors(capsys) == [f"error: could not write {run}/checkpoint-4: No space left on device; "
                               f"{run / 'checkpoint-2'} is intact"]
    assert [p.name for p in run.iterdir() if p.name.startswith(("checkpoint", "."))] == ["checkpoint-2"]
    monkeypatch.setattr(checkpoints, "save_file", real)
    assert main(["sft", "--resume", str(run)]) == 0


def test_resume_refuses_data_that_changed_and_works_from_another_folder(tiny_model_dir, rows_file, tmp_path, capsys,
                                                                        monkeypatch):
    data = tmp_path / "data" / "rows.jsonl"
    data.parent.mkdir()
    data.write_text(rows_file.read_text())
    monkeypatch.chdir(data.parent)
    run = tmp_path / "run"
    flags = _flags(tiny_model_dir, "rows.jsonl", run, "--max-steps", "1")   # a relative path, as typed
    assert main(["sft", *flags]) == 0
    assert json.loads((run / "run.json").read_text())["config"]["dataset"] == str(data)   # recorded absolute
    monkeypatch.chdir(tmp_path)   # elsewhere: the record still finds the data
    assert main(["sft", "--resume", str(run), "--max-steps", "2"]) == 0
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[1:] + [lines[0].replace("?", "??")]))   # one row edited
    capsys.readouterr()
    assert main(["sft", "--resume", str(run), "--max-steps", "3"]) == 2
    assert _errors(capsys) == [f"error: --resume {run}: its data changed since the run started (18 train / 6 test "
                               "rows then, 18 / 6 now, as tokenized); resuming would mix two datasets in one run: "
                               "restore the data or start a new run"]
    assert sorted(_train_losses(run)) == [1, 2]


@pytest.mark.parametrize("damaged", ["training_state.json", "optimizer.safetensors", "actor/adapter_model.safetensors"])
def test_a_damaged_checkpoint_is_one_line_naming_it(damaged, tiny_model_dir, rows_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["sft", *_flags(tiny_model_dir, rows_file, run, "--max-steps", "1")]) == 0
    checkpoint = run / "checkpoint-1"
    (checkpoint / damaged).write_text("junk")
    capsys.readouterr()
    assert main(["sft", "--resume", str(run), "--max-steps", "2"]) == 2
    [error] = _errors(capsys)
    assert error.startswith(f"error: the checkpoint {checkpoint} is damaged and cannot be resumed from (")


def test_resuming_without_the_metrics_log_says_the_curves_start_late(tiny_model_dir, rows_file, tmp_path, caplog):
    run = tmp_path / "run"
    assert main(["sft", *_flags(tiny_model_dir, rows_file, run, "--max-steps", "3")]) == 0
    (run / "metrics.jsonl").unlink()
    with caplog.at_level("WARNING", logger="alignkit.runs"):
        assert main(["sft", "--resume", str(run), "--max-steps", "4"]) == 0
    assert f"{run / 'metrics.jsonl'} is missing: the records of steps 1-3 are gone, so the run's curves start at " \
           "step 4" in caplog.text
    assert [r["step"] for r in _records(run) if r["split"] == "train"] == [4]
    caplog.clear()
    with caplog.at_level("WARNING", logger="alignkit.runs"):   # a whole log: nothing to say
        assert main(["sft", "--resume", str(run), "--max-steps", "5"]) == 0
    assert "curves start" not in caplog.text


def test_resume_takes_options_that_resolve_to_what_the_run_recorded(tmp_path):
    """--device cpu where the run recorded auto on a machine without CUDA (what an accelerate launch of CPU
    processes needs), --dtype float32 for auto there, the embedded model named where the default was
    recorded: the same run, so resuming takes them; what resolves otherwise is refused."""
    import torch

    from alignkit.config import SFTConfig
    from alignkit.errors import UserError
    from alignkit.models import DEFAULT_MODEL
    from alignkit.runs import resumed_config

    if torch.cuda.is_available():
        pytest.skip("auto means cuda on this machine")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"algo": "sft", "config": SFTConfig().to_dict()}))
    assert SFTConfig().device == "auto" and SFTConfig().dtype == "auto" and SFTConfig().model is None
    cfg = resumed_config("sft", {"resume": str(run), "device": "cpu", "dtype": "float32", "model": DEFAULT_MODEL})
    assert (cfg.device, cfg.dtype, cfg.model) == ("cpu", "float32", DEFAULT_MODEL)
    for flag, value, recorded in (("dtype", "bfloat16", "auto"), ("model", "other/model", None), ("lr", 0.5, 1e-3)):
        if flag == "lr":
            recorded = SFTConfig().lr
        with pytest.raises(UserError) as err:
            resumed_config("sft", {"resume": str(run), flag: value})
        assert str(err.value) == ("--resume continues with the run's recorded options; these would change its "
                                  f"result: --{flag} {value} (recorded: {recorded})")
    with pytest.raises(UserError, match=r"would change its result: --device cuda \(recorded: auto\)$"):
        resumed_config("sft", {"resume": str(run), "device": "cuda"})   # not here: not the same device
    with pytest.raises(UserError) as err:
        resumed_config("sft", {"resume": str(tmp_path / "nowhere")})
    assert str(err.value) == f"no such run folder: {tmp_path / 'nowhere'}"


SLOW_EVAL_CLI = """
import sys, time
import alignkit.agents as agents
test = agents.LLMAgent.test
def slow(self, env, batch_size=None):
    time.sleep(float(sys.argv[1]))
    return test(self, env, batch_size)
agents.LLMAgent.test = slow
from alignkit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_signal_before_the_first_step_stops_after_the_evaluation_and_the_folder_can_start_again(
        tiny_model_dir, rows_file, tmp_path, capsys):
    cut = tmp_path / "cut"
    flags = _flags(tiny_model_dir, rows_file, cut, "--max-steps", "2")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EVAL_CLI, "2.0", "sft", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(cut / "metrics.jsonl", proc)   # written before the step-0 evaluation, which sleeps 2 s first
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == ("stopped before the first step: nothing was trained or saved; resume with: "
                                            "the same command with --overwrite (it starts again)")
    assert not _train_losses(cut) and not list(cut.glob("checkpoint-*"))
    capsys.readouterr()
    assert main(["sft", *flags]) == 2
    assert _errors(capsys) == [f"error: --save-path {cut} holds a run stopped before its first checkpoint (nothing to "
                               "resume); pass --overwrite to start it again, or choose another folder"]
    assert main(["sft", "--resume", str(cut)]) == 2
    assert _errors(capsys) == [f"error: --resume {cut}: no complete checkpoint-<step>/ folder to continue from (it "
                               "stopped before its first one); start it again: the same command without --resume, "
                               "with --overwrite"]
    assert main(["sft", *flags, "--overwrite"]) == 0 and sorted(_train_losses(cut)) == [1, 2]


def test_a_run_being_trained_is_not_resumed_or_overwritten_by_another_process(tiny_model_dir, rows_file, tmp_path,
                                                                               capsys):
    cut = tmp_path / "cut"
    flags = _flags(tiny_model_dir, rows_file, cut, "--save-interval", "1")
    proc = _slow(1.0, ["sft", *flags])
    _wait_for(cut / "checkpoint-1" / "training_state.json", proc)
    capsys.readouterr()
    assert main(["sft", "--resume", str(cut)]) == 2
    assert _errors(capsys) == [f"error: {cut} is being trained by another process right now; let it end (or stop "
                               "it) first"]
    assert main(["sft", *flags, "--overwrite"]) == 2
    assert _errors(capsys) == [f"error: {cut} is being trained by another process right now; let it end (or stop "
                               "it) first"]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "resume with: alignkit sft --resume" in err
    steps = sorted(_train_losses(cut))
    assert steps == list(range(1, steps[-1] + 1))   # one writer: no step twice
    assert main(["sft", "--resume", str(cut)]) == 0   # free again once it has ended
    assert sorted(_train_losses(cut)) == list(range(1, 8))
