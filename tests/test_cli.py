"""The command line on a tiny local model: files written, warm start, chat, export, user errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.cli import main
from alignkit.config import DPOConfig, SFTConfig, build_config
from alignkit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demos" / "llm" / "demo_llm_finetuning.py"


def _train_flags(model_dir, data, out, *extra):
    return [*extra, "--model", str(model_dir), "--dataset", str(data), "--save-path", str(out), "--no-timestamp",
            "--max-steps", "3", "--batch-size", "4", "--max-length", "64", "--lr", "1e-2", "--eval-interval", "2",
            "--test-size", "6"]


def _read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sft_then_dpo_warm_start_then_chat_and_export(tiny_model_dir, rows_file, tmp_path, capsys):
    sft = tmp_path / "sft"
    assert main(["sft", *_train_flags(tiny_model_dir, rows_file, sft)]) == 0
    for name in ("actor/adapter_model.safetensors", "actor/adapter_config.json", "training_state.json",
                 "optimizer.safetensors", "run.json", "metrics.jsonl", "sft_training_loss.png", "eval_metrics.png"):
        assert (sft / name).is_file(), name
    records = _read_metrics(sft)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 2, 3]
    assert all({"loss", "perplexity", "lr", "grad_norm", "tokens_per_s", "epoch"} <= set(r)
               for r in records if r["split"] == "train")
    adapter_cfg = json.loads((sft / "actor" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_model_dir)

    dpo = tmp_path / "sft_dpo"
    flags = _train_flags(tiny_model_dir, rows_file, dpo, "--load-path", str(sft / "actor"), "--nll-alpha", "1.0")
    flags.remove("--model")
    flags.remove(str(tiny_model_dir))   # the base comes from the adapter
    assert main(["dpo", *flags]) == 0
    records = _read_metrics(dpo)
    start = records[0]
    assert start["split"] == "eval" and start["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "nll_loss", "dpo_loss"):
        assert key in records[-1]
    assert (dpo / "dpo_plus_nll_reward_margins.png").is_file()

    # chat, with prompts piped on standard input: one answer line per prompt
    proc = subprocess.run([sys.executable, str(DEMO), "dpo", "--eval", "--load-path", str(dpo / "actor"),
                           "--max-new-tokens", "5"], input="Hello there\nHow are you?\nquit\nignored\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 2   # one (possibly empty) answer line per prompt, none after quit

    # export: a plain model folder that answers like the adapter on its base
    out = tmp_path / "merged"
    assert main(["export", "--load-path", str(dpo / "actor"), "--out", str(out)]) == 0
    from alignkit.evaluate import generate_answers, load_for_generation

    adapted, tok = load_for_generation(str(tiny_model_dir), dpo / "actor", device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(out)
    prompt = ["Do you like rainy days?"]
    assert generate_answers(merged, tok, prompt, max_new_tokens=8) == generate_answers(adapted, tok, prompt, 8)
    assert (out / "tokenizer_config.json").is_file() and list(out.glob("*.safetensors"))
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3, 4]])
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("argv, needle", [
    (["sft", "--lr", "-1"], "--lr must be > 0"),
    (["sft", "--lr", "abc"], "invalid float value"),
    (["sft", "--batch-size", "8", "--micro-batch-size", "3"], "multiple of --micro-batch-size"),
    (["sft", "--dataset", "no/such/file.jsonl"], "no/such/file.jsonl"),
    (["sft", "--model", "./not-a-model-dir"], "not-a-model-dir"),
    (["dpo", "--loss-type", "nope"], "--loss-type must be one of"),
    (["dpo", "--eval"], "--eval needs --load-path"),
    (["sft", "--frobnicate"], "unrecognized arguments"),
    (["dpo", "--load-path", "/nonexistent/actor"], "/nonexistent/actor: no such adapter folder"),
    (["plot", "/nonexistent/run"], "/nonexistent/run"),
])
def test_user_mistakes_print_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_wrong_columns_name_the_columns(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "hi", "answer": "yo"}\n')
    assert main(["sft", "--dataset", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "question" in err and "prompt" in err


def test_load_path_on_another_base_is_an_error(tmp_path, capsys):
    actor = tmp_path / "actor"
    actor.mkdir()
    (actor / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen2.5-0.5B"}))
    assert main(["dpo", "--load-path", str(actor), "--model", "smollm2-135m-instruct"]) == 2
    assert "trained on 'Qwen/Qwen2.5-0.5B'" in capsys.readouterr().err


def test_yaml_config_is_overridden_by_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.001\nbatch_size: 4\nnll_alpha: 0\n")
    cfg = build_config("dpo", {"config": str(cfg_file), "batch_size": 2})
    assert isinstance(cfg, DPOConfig) and (cfg.lr, cfg.batch_size, cfg.nll_alpha) == (0.001, 2, 0.0)
    cfg_file.write_text("lr: 0.001\nbatchsize: 4\n")
    with pytest.raises(UserError, match="unknown option.*batchsize"):
        build_config("sft", {"config": str(cfg_file)})


def test_relative_paths_in_a_config_file_are_found_next_to_it_first(tmp_path, monkeypatch):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "data").mkdir(parents=True)
    elsewhere.mkdir()
    (project / "data" / "pairs.jsonl").write_text("{}\n")
    (elsewhere / "local.jsonl").write_text("{}\n")
    cfg_file = project / "run.yaml"
    cfg_file.write_text("dataset: data/pairs.jsonl\neval_dataset: local.jsonl\nmodel: org/hub-model\n")
    monkeypatch.chdir(elsewhere)
    cfg = build_config("dpo", {"config": "../project/run.yaml"})
    assert cfg.dataset == str(project / "data" / "pairs.jsonl")      # beside the file
    assert cfg.eval_dataset == str(elsewhere / "local.jsonl")         # not there: the working directory's
    assert cfg.model == "org/hub-model"                               # a hub id stays one
    (project / "local.jsonl").write_text("{}\n")
    assert build_config("dpo", {"config": "../project/run.yaml"}).eval_dataset == str(project / "local.jsonl")
    # a flag is read from the working directory, as always
    assert build_config("dpo", {"config": "../project/run.yaml", "dataset": "local.jsonl"}).dataset == \
        str(elsewhere / "local.jsonl")


def test_every_problem_is_reported_at_once():
    with pytest.raises(UserError) as info:
        SFTConfig(lr=0, batch_size=0, lora_dropout=1.5).validate()
    assert all(s in str(info.value) for s in ("--lr", "--batch-size", "--lora-dropout"))


def test_shipped_configs_are_valid():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        algo = "dpo" if "dpo" in path.stem else "sft"
        build_config(algo, {"config": str(path)})


def test_help_explains_every_flag():
    proc = subprocess.run([sys.executable, str(DEMO), "dpo", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--model", "--dataset", "--config", "--max-steps", "--epochs", "--batch-size", "--lr",
                 "--max-length", "--seed", "--eval-interval", "--lora-r", "--lora-alpha", "--save-path",
                 "--no-timestamp", "--load-path", "--eval", "--beta", "--nll-alpha", "--loss-type",
                 "--max-new-tokens"):
        assert flag in proc.stdout, flag


def test_reference_logps_are_reused_across_runs(tiny_model_dir, rows_file, tmp_path, monkeypatch):
    from alignkit.train import setup, train

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    flags = dict(model=str(tiny_model_dir), dataset=str(rows_file), max_steps=2, batch_size=4, max_length=64,
                 test_size=6, eval_interval=0, plot=False, no_timestamp=True)
    first = setup(build_config("dpo", flags, save_path=str(tmp_path / "a")))
    assert first.agent.reference.cache == {}
    train(first)
    cached = dict(first.agent.reference.cache)
    store = first.agent.reference.store
    assert store.load() == cached and len(cached) >= 6 + 8   # test split + two batches of 4
    second = setup(build_config("dpo", flags, save_path=str(tmp_path / "b")))
    assert second.agent.reference.store.folder == store.folder and second.agent.reference.cache == cached
    # another reference: another dtype, or the same dtype asked for as "auto" resolves to the same one
    third = setup(build_config("dpo", flags, save_path=str(tmp_path / "c"), dtype="bfloat16"))
    assert third.agent.reference.store.folder != store.folder and third.agent.reference.cache == {}
    same = setup(build_config("dpo", flags, save_path=str(tmp_path / "d"), dtype="float32", device="cpu"))
    assert same.agent.reference.store.folder == store.folder   # auto|auto resolved to cpu float32 here
    warm = setup(build_config("dpo", flags, save_path=str(tmp_path / "e"), load_path=str(tmp_path / "a" / "actor")))
    assert warm.agent.reference.store.folder != store.folder   # the warm-start adapter is the reference


def test_report_to_tensorboard_writes_event_files(tiny_model_dir, rows_file, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional logger")
    run = tmp_path / "tb"
    flags = _train_flags(tiny_model_dir, rows_file, run, "--report-to", "tensorboard", "--no-plot")
    assert main(["sft", *flags]) == 0
    assert list(run.glob("events.out.tfevents.*"))


def test_report_to_wandb_offline_writes_a_finished_run(tiny_model_dir, rows_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional logger")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "wb"
    assert main(["sft", *_train_flags(tiny_model_dir, rows_file, run, "--report-to", "wandb", "--no-plot")]) == 0
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    import wandb

    assert wandb.run is None   # finished, so a second run in the same process starts cleanly


def test_diverging_loss_is_one_line_and_saves_nothing(tiny_model_dir, rows_file, tmp_path, capsys):
    run = tmp_path / "nan"
    flags = _train_flags(tiny_model_dir, rows_file, run, "--no-plot")
    flags[flags.index("--lr") + 1] = "1e30"
    assert main(["sft", *flags]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: the loss became") and "lower --lr" in err
    assert not (run / "actor").exists()


def test_pipeline_with_an_eval_dataset_trains_and_scores_on_it(tiny_model_dir, rows_file, tmp_path, capsys, caplog):
    lines = rows_file.read_text().splitlines(keepends=True)
    train, held, leaky = tmp_path / "train.jsonl", tmp_path / "held.jsonl", tmp_path / "leaky.jsonl"
    train.write_text("".join(lines[:18]))
    held.write_text("".join(lines[18:]))
    leaky.write_text("".join(lines[15:]))
    argv = ["pipeline", "--model", str(tiny_model_dir), "--dataset", str(train), "--max-steps", "1",
            "--max-new-tokens", "2", "--eval-prompts", "2", "--out", str(tmp_path / "pipe")]
    assert main([*argv, "--eval-dataset", str(leaky)]) == 2   # refused before any training
    assert capsys.readouterr().err.strip() == (f"error: --eval-dataset {leaky} shares 3 row(s) with the training "
                                               "data; the comparison scores only on rows no configuration trained on")
    assert not (tmp_path / "pipe" / "runs").exists()
    assert not [r for r in caplog.records if "also in the training data" in r.getMessage()]   # the error says it
    assert main([*argv, "--eval-dataset", str(held)]) == 0
    assert "SFT: 18 train / 6 test rows" in capsys.readouterr().out
    results = json.loads((tmp_path / "pipe" / "report" / "results.json").read_text())
    assert {(c["split"]["eval_dataset"], c["split"]["pairs"]) for c in results["configs"]} == {(str(held), 6)}


def test_pipeline_trains_and_writes_the_report(tiny_model_dir, rows_file, tmp_path, capsys):
    out = tmp_path / "pipe"
    data = tmp_path / "rows.jsonl"   # edited at the end
    shutil.copy(rows_file, data)
    argv = ["pipeline", "--model", str(tiny_model_dir), "--dataset", str(data), "--max-steps", "2",
            "--max-new-tokens", "4", "--out", str(out)]
    assert main(argv) == 0
    assert (out / "runs" / "sft" / "actor" / "adapter_model.safetensors").is_file()
    warm = json.loads((out / "runs" / "sft_dpo_nll" / "run.json").read_text())
    assert warm["config"]["load_path"].endswith("sft/actor") and warm["config"]["nll_alpha"] == 1.0
    results = json.loads((out / "report" / "results.json").read_text())
    text = json.dumps(results)
    for name in ("Base model", "SFT", "SFT \\u2192 DPO + NLL"):
        assert name in text
    html = (out / "report" / "index.html").read_text()
    assert "Do you have any favorite memories?" in html and "data:image/png;base64," in html

    # a second pipeline into the same folder: refused, unless finished runs are reused
    assert main(argv) == 2
    adapter = out / "runs" / "sft" / "actor" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    # the warm-started run was cut after its last checkpoint, before its finished adapter
    cut = out / "runs" / "sft_dpo_nll"
    (cut / "training_state.json").unlink()
    shutil.rmtree(cut / "actor")
    assert main([*argv, "--reuse"]) == 0
    assert adapter.stat().st_mtime_ns == before   # kept, not retrained
    assert (cut / "actor" / "adapter_model.safetensors").is_file() and (cut / "training_state.json").is_file()
    evals = [r["step"] for r in _read_metrics(cut) if r["split"] == "eval"]
    assert evals == sorted(set(evals))   # the final evaluation is not logged twice
    # runs trained with another recipe are not kept as this one's
    capsys.readouterr()
    longer = [*argv, "--reuse", "--max-steps", "3"]
    assert main(longer) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --reuse would keep {out / 'runs' / 'sft'}, trained with other options than asked for now: "
        "--max-steps 3 (recorded: 2); pass --overwrite to train it again, or ask for what it was trained with")
    assert adapter.stat().st_mtime_ns == before

    # evaluate_models.py reuses given runs and trains only what is missing
    script = ROOT / "benchmarking" / "evaluate_models.py"
    proc = subprocess.run([sys.executable, str(script), "--model", str(tiny_model_dir), "--dataset", str(rows_file),
                           "--sft", str(out / "runs" / "sft"), "--configs", "base", "sft", "--max-new-tokens", "4",
                           "--out", str(tmp_path / "five")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "five" / "runs").exists()   # nothing trained
    assert (tmp_path / "five" / "report" / "index.html").is_file()

    # nor runs trained on the data file as it was before an edit
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[0] = {**rows[0], "chosen": rows[0]["chosen"] + " Edited."}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main([*argv, "--reuse"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: --reuse would keep {out / 'runs' / 'sft'}, trained on other data than its "
                            "dataset holds now (") and error.endswith("as tokenized); pass --overwrite to train it again")
    assert adapter.stat().st_mtime_ns == before


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "simpo"])
def test_every_loss_type_trains_from_the_command_line_cold_and_warm(loss_type, tiny_model_dir, rows_file, tmp_path,
                                                                     monkeypatch):
    from alignkit.losses import PREFERENCE_LOSSES

    assert loss_type in PREFERENCE_LOSSES
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    sft = tmp_path / "sft"
    assert main(["sft", *_train_flags(tiny_model_dir, rows_file, sft, "--max-steps", "1", "--no-plot")]) == 0
    for name, extra in (("cold", []), ("warm", ["--load-path", str(sft / "actor")])):
        run = tmp_path / name
        flags = _train_flags(tiny_model_dir, rows_file, run, "--loss-type", loss_type, "--no-plot", *extra)
        assert main(["dpo", *flags]) == 0, name
        evals = [r for r in _read_metrics(run) if r["split"] == "eval"]
        assert [r["step"] for r in evals] == [0, 2, 3]
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in evals)
        assert (run / "actor" / "adapter_model.safetensors").is_file()


def test_every_loss_type_is_covered_by_the_command_line_test():
    from alignkit.losses import PREFERENCE_LOSSES

    marks = test_every_loss_type_trains_from_the_command_line_cold_and_warm.pytestmark
    assert set(marks[0].args[1]) == set(PREFERENCE_LOSSES)


def test_label_smoothing_with_a_loss_other_than_sigmoid_is_refused_up_front(capsys):
    assert main(["dpo", "--loss-type", "ipo", "--label-smoothing", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: invalid options: --label-smoothing applies to the sigmoid loss only "
                   "(got loss type 'ipo')")
    from alignkit import DPO

    with pytest.raises(ValueError, match="label_smoothing applies to the sigmoid loss only"):
        DPO(torch.nn.Linear(1, 1), 0, "<pad>", loss_type="hinge", label_smoothing=0.2)


def test_eval_with_resume_and_a_prompts_folder_are_refused_in_one_line(tmp_path, capsys):
    assert main(["sft", "--eval", "--resume", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("error: --eval chats with the adapter at --load-path; --resume "
                                               "continues training: give one of them")
    assert main(["pipeline", "--prompts", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --prompts {tmp_path} is a folder; give a text file with one "
                                               "prompt per line")


@pytest.mark.parametrize("argv, message", [
    (["sft", "--eval-columns", "prompt=q"], "--eval-columns describes --eval-dataset: give that dataset too"),
    (["sft", "--eval-format", "alpaca"], "--eval-format describes --eval-dataset: give that dataset too"),
    (["sft", "--eval-dataset", "x.jsonl", "--eval-format", "csv"], "--eval-format must be one of auto, standard"),
    (["dpo", "--eval-dataset", "x.jsonl", "--eval-columns", "response=a"],
     "--eval-columns response= and messages= are for SFT data"),
    (["dpo", "--eval-dataset", "x.jsonl", "--eval-columns", "question"], "(got 'question')"),
])
def test_eval_dataset_shape_options_are_checked(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid options: ") and message in err and err.count("\n") == 1


def test_resume_and_config_are_command_line_options_only(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    for key in ("resume", "config"):
        config.write_text(f"{key}: somewhere\n")
        assert main(["sft", "--config", str(config)]) == 2
        assert capsys.readouterr().err.strip() == (f"error: {config}: {key} is not set in a config file; give "
                                                   f"--{key} on the command line")


def test_a_config_file_eval_dataset_dropped_by_a_test_size_flag_takes_its_shape_options_along(tmp_path):
    from alignkit.config import build_config

    config = tmp_path / "c.yaml"
    config.write_text("eval_dataset: held.jsonl\neval_format: alpaca\neval_columns: [prompt=q]\n")
    cfg = build_config("sft", {"config": str(config), "test_size": 0.2})
    assert (cfg.eval_dataset, cfg.eval_format, cfg.eval_columns, cfg.test_size) == (None, None, None, 0.2)
    cfg = build_config("sft", {"config": str(config)})
    assert (cfg.eval_format, cfg.eval_column_map().given()) == ("alpaca", {"prompt": "q"})
    config.write_text("eval_dataset: held.jsonl\neval_columns: {prompt: q, chosen: good}\n")   # a YAML mapping
    assert build_config("dpo", {"config": str(config)}).eval_column_map().given() == {"prompt": "q", "chosen": "good"}


def test_an_eval_dataset_run_records_it_and_test_size_with_it_is_refused(tiny_model_dir, rows_file, tmp_path, capsys):
    assert main(["sft", "--eval-dataset", str(rows_file), "--test-size", "0.2"]) == 2
    assert capsys.readouterr().err.strip() == ("error: invalid options: --test-size cuts the held-out rows from "
                                               "--dataset; with --eval-dataset they are that dataset's rows: drop "
                                               "one of them")
    held = tmp_path / "held.jsonl"
    held.write_text("".join(line for line in rows_file.read_text().splitlines(keepends=True)[:3]))
    run = tmp_path / "run"
    assert main(["sft", "--max-steps", "1", "--batch-size", "4", "--max-length", "64", "--no-plot", "--model",
                 str(tiny_model_dir), "--dataset", str(rows_file), "--eval-dataset", str(held), "--save-path", str(run),
                 "--no-timestamp"]) == 0
    out = capsys.readouterr().out
    assert "SFT: 24 train / 3 test rows" in out
    assert json.loads((run / "run.json").read_text())["config"]["eval_dataset"] == str(held)
    # safetensors writes owner-only files; what a run saves is readable by all, like its other files
    for saved in (run / "actor" / "adapter_model.safetensors", run / "optimizer.safetensors", run / "run.json"):
        assert saved.stat().st_mode & 0o777 == 0o644, saved


def test_share_prompts_without_packing_is_refused_but_either_alone_runs(capsys):
    from alignkit.config import build_config

    assert main(["dpo", "--no-packing", "--share-prompts"]) == 2
    assert capsys.readouterr().err.strip() == ("error: invalid options: --share-prompts works through packing; "
                                               "drop --no-packing or --share-prompts")
    assert build_config("dpo", {"packing": False}).share_prompts   # the default, unused without packing
    assert not build_config("dpo", {"share_prompts": False}).share_prompts


def test_pipeline_refuses_before_training_what_a_later_stage_would_refuse(tiny_model_dir, tmp_path, capsys):
    sft_only = tmp_path / "sft.jsonl"
    sft_only.write_text("".join(json.dumps({"prompt": f"q{i}?", "completion": f"a {i}."}) + "\n" for i in range(8)))
    out = tmp_path / "pipe"
    base = ["pipeline", "--model", str(tiny_model_dir), "--max-steps", "1", "--max-new-tokens", "2", "--out", str(out)]
    assert main([*base, "--dataset", str(sft_only)]) == 2
    assert "SFT data cannot train DPO" in capsys.readouterr().err
    assert not (out / "runs" / "sft").exists()   # the SFT stage did not train first
    assert main([*base, "--reuse", "--overwrite"]) == 2
    assert capsys.readouterr().err.startswith("error: --reuse keeps trained configurations and --overwrite")
    (out / "report").mkdir(parents=True)
    (out / "report" / "index.html").write_text("<h1>mine</h1>")   # the user's own page, where the report would go
    assert main(base) == 2
    assert "holds an index.html or results.json that no earlier report wrote" in capsys.readouterr().err
    assert not (out / "runs").exists() and (out / "report" / "index.html").read_text() == "<h1>mine</h1>"


def test_the_pipelines_data_check_leaves_the_warnings_to_the_stages_that_read_the_data(rows_file, tmp_path, caplog):
    import logging

    from alignkit.data import make_dataset
    from alignkit.pipeline import check_data

    lines = rows_file.read_text().splitlines()
    data = tmp_path / "dupes.jsonl"
    data.write_text("\n".join(lines + lines[:3]) + "\n")   # 3 exact duplicates: a warning, said once per read
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        check_data(["base", "sft", "sft_dpo_nll"], str(data), 42, 6)
        assert "duplicate" not in caplog.text and logging.getLogger("alignkit.data").level == logging.WARNING
        make_dataset(str(data), test_size=6, seed=42)
    assert caplog.text.count("dropped 3 exact duplicate rows") == 1


# -- the chat's commands, and a message that starts with "/" --------------------------------------


def _piped_chat(make_model, tokenizer, monkeypatch, lines: str) -> tuple[list[str], str, str]:
    """What a piped chat on ``lines`` sends to the model (the model's answers stubbed: "ok"), its output and
    its notices."""
    import io

    from alignkit import evaluate

    sent = []

    def answer(chat, text, on_text=None):
        sent.append(text)
        return "ok", 0

    monkeypatch.setattr(evaluate.Chat, "answer", answer)
    out, err = io.StringIO(), io.StringIO()
    assert evaluate.interactive(make_model(), tokenizer, 4, io.StringIO(lines), out, stderr=err) == 0
    return sent, out.getvalue(), err.getvalue()


def test_a_chat_line_starting_with_two_slashes_sends_the_rest_with_one_slash_removed(make_model, tokenizer,
                                                                                      monkeypatch):
    sent, out, err = _piped_chat(make_model, tokenizer, monkeypatch, "//etc/hosts is what?\n//\n/help\n")
    assert sent == ["/etc/hosts is what?", "/"] and out == "ok\nok\n"   # messages: one answer line each
    assert err == ("(commands: /reset forgets the conversation, /system TEXT sets the system message (/system "
                   "alone removes it), /help shows this, quit or exit (or Ctrl-D) leaves; a message that starts "
                   "with / is sent with // in front of it (//etc/hosts sends /etc/hosts))\n")


def test_an_unknown_chat_command_sends_nothing_and_names_the_escape(make_model, tokenizer, monkeypatch):
    sent, out, err = _piped_chat(make_model, tokenizer, monkeypatch, "/etc/Hosts is what?\n")
    assert sent == [] and out == ""   # a command: no answer line
    assert err == ("(unknown command /etc/Hosts, nothing sent; to send a message that starts with /, start the "
                   "line with // (as in //etc/Hosts); /help lists the commands)\n")


# -- the pipeline's prompts must fit the model's context, with their answers ----------------------


@pytest.mark.parametrize("words, new_tokens", [(10_000, None), (8_000, None), (3, "9000")])
def test_pipeline_refuses_a_prompt_beyond_the_context_before_training(words, new_tokens, tokenizer, tmp_path,
                                                                      capsys, monkeypatch):
    """Against the embedded model (8192 positions): a prompt too long by itself, one that fits only without
    its answer's 200 new tokens, and answers longer than the context."""
    import alignkit.train
    from alignkit.generation import chat_prompt_ids

    def no_training(cfg):
        raise AssertionError(f"training started: {cfg.save_path}")

    monkeypatch.setattr(alignkit.train, "run", no_training)
    long = " ".join(["hello"] * words)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"Hi there?\n\n{long}\nBye?\n")
    out = tmp_path / "pipe"
    flags = ["--max-new-tokens", new_tokens] if new_tokens else []
    assert main(["pipeline", "--prompts", str(prompts), "--out", str(out), "--max-steps", "1", *flags]) == 2
    err = capsys.readouterr().err
    needed = len(chat_prompt_ids(tokenizer, long))
    if new_tokens:
        assert err == ("error: --max-new-tokens 9000 leaves no room for a prompt: the model's context holds 8192 "
                       "tokens, prompt and answer together\n")
    else:
        assert needed + 200 > 8192 and (needed > 8192) == (words == 10_000)
        assert err == (f"error: --prompts {prompts} line 3: the prompt takes {needed} tokens and its answer up to "
                       "200 more (--max-new-tokens), beyond the model's context of 8192 tokens; shorten it to at "
                       "most 7992 tokens or lower --max-new-tokens\n")
    assert not out.exists()   # nothing trained, no folder made
