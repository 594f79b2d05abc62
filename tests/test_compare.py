"""The comparison scores every run on the held-out split its run.json records, and nothing else."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignkit.cli import main
from alignkit.compare import Evaluator, Split, _unload, compare, read_run_record
from alignkit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _train(kind, model_dir, data, out, seed, *extra):
    flags = ["--model", str(model_dir), "--dataset", str(data), "--save-path", str(out), "--no-timestamp",
             "--max-steps", "1", "--batch-size", "4", "--max-length", "64", "--test-size", "6", "--no-plot",
             "--eval-interval", "0", "--seed", str(seed), *extra]
    assert main([kind, *flags]) == 0
    return str(out)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, rows_file, tmp_path_factory):
    """An SFT run and a DPO run with seed 42, and an SFT run with seed 7, on the tiny model."""
    root = tmp_path_factory.mktemp("runs")
    return {"sft": _train("sft", tiny_model_dir, rows_file, root / "sft", 42),
            "dpo": _train("dpo", tiny_model_dir, rows_file, root / "dpo", 42, "--beta", "0.5"),
            "sft7": _train("sft", tiny_model_dir, rows_file, root / "sft7", 7)}


def test_runs_on_one_split_are_scored_on_it_and_results_say_which(runs, tiny_model_dir, rows_file, tmp_path):
    report = compare({"base": None, "sft": runs["sft"], "dpo": runs["dpo"]}, tmp_path / "report",
                     prompts=["Hi?"], max_new_tokens=3, progress=lambda _: None)
    results = json.loads((report.parent / "results.json").read_text())
    splits = [c["split"] for c in results["configs"]]
    assert splits == [{"dataset": str(rows_file), "seed": 42, "test_size": 6.0, "format": "auto", "column_map": {},
                       "eval_dataset": None, "eval_format": None, "eval_column_map": None, "pairs": 6}] * 3


def test_runs_trained_against_other_splits_are_refused(runs, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="different held-out splits"):
        compare({"sft": runs["sft"], "sft7": runs["sft7"]}, tmp_path / "report", prompts=["Hi?"])
    script = ROOT / "benchmarking" / "evaluate_models.py"
    proc = subprocess.run([sys.executable, str(script), "--sft", runs["sft"], "--dpo", runs["sft7"],
                           "--configs", "sft", "dpo", "--out", str(tmp_path / "five")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the runs were trained against different held-out splits")
    assert "seed 42" in lines[0] and "seed 7" in lines[0] and "--seed" in lines[0]
    assert not (tmp_path / "five" / "report").exists()


def test_an_explicit_split_must_not_overlap_any_training_split(runs, rows_file, tmp_path):
    # seed 42's held-out rows are training rows of the seed-7 run
    with pytest.raises(UserError, match=r"shares \d+ row\(s\) with the training split of sft7"):
        compare({"sft": runs["sft"], "sft7": runs["sft7"]}, tmp_path / "r", prompts=["Hi?"], seed=42)
    fresh = tmp_path / "fresh.jsonl"   # rows neither run has seen
    fresh.write_text("".join(json.dumps({"prompt": f"Unseen question {i}?", "chosen": "Sure thing!",
                                         "rejected": "Affirmative."}) + "\n" for i in range(8)))
    report = compare({"sft": runs["sft"], "sft7": runs["sft7"]}, tmp_path / "r", prompts=["Hi?"],
                     max_new_tokens=3, dataset=str(fresh), test_size=4, progress=lambda _: None)
    results = json.loads((report.parent / "results.json").read_text())
    assert {json.dumps(c["split"]) for c in results["configs"]} == {
        json.dumps({"dataset": str(fresh), "seed": 42, "test_size": 4, "format": "auto", "column_map": {}, "eval_dataset": None,
                    "eval_format": None, "eval_column_map": None, "pairs": 4})}


def test_scoring_builds_no_optimizer_and_trains_nothing(runs, tiny_model_dir, rows_file, monkeypatch):
    def no_optimizer(*args, **kwargs):
        raise AssertionError("scoring built an optimizer")

    monkeypatch.setattr(torch.optim.AdamW, "__init__", no_optimizer)
    evaluator = Evaluator(str(tiny_model_dir), Split(str(rows_file), 42, 6))
    seen = []
    real = evaluator.tokenizer.__class__.__call__

    def watch(tok, *args, **kwargs):   # generation runs after scoring: record what is trainable then
        seen.append([n for n, p in evaluator.base.named_parameters() if p.requires_grad])
        return real(tok, *args, **kwargs)

    monkeypatch.setattr(evaluator.tokenizer.__class__, "__call__", watch)
    from alignkit.compare import Decoding

    scored = evaluator.score(runs["dpo"], ["Hi?"], Decoding(max_new_tokens=2, eval_prompts=2), max_length=64,
                             beta=0.5)
    assert seen and all(names == [] for names in seen), [n for n in seen if n][:1]
    assert 0.0 <= scored["metrics"]["preference_accuracy"] <= 1.0
    assert not any(n for n, _ in evaluator.base.named_parameters() if "lora_" in n)   # unloaded afterwards


def _loud_copy(run_dir, to, seed: int) -> str:
    """A copy of the run folder ``run_dir`` whose adapter's B matrices are large random ones."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(run_dir, to)
    weights = to / "actor" / "adapter_model.safetensors"
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=generator) * 2.0 if "lora_B" in k else v
               for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    return str(to)


@pytest.mark.parametrize("sampled", [False, True])
def test_configurations_answering_in_one_batch_answer_as_each_alone(sampled, runs, tiny_model_dir, rows_file,
                                                                     tmp_path):
    """Greedy and sampled (each prompt drawing from its own seeded generator): the same answers either way."""
    from alignkit.compare import Decoding

    evaluator = Evaluator(str(tiny_model_dir), Split(str(rows_file), 42, 6))
    decoding = Decoding(max_new_tokens=8, eval_prompts=4,
                        **({"temperature": 1.0, "samples": 2, "seed": 5} if sampled else {}))
    # one training step barely moves the tiny model: adapters with large random B matrices answer visibly apart
    loud = [_loud_copy(runs[key], tmp_path / key, seed) for seed, key in enumerate(("sft", "dpo"))]
    configs = [(None, 64, 0.1), (loud[0], 64, 0.1), (loud[1], 64, 0.5)]
    alone = [evaluator.score(run_dir, ["Hi?", "Why?"], decoding, max_length=length, beta=beta)
             for run_dir, length, beta in configs]
    said = []
    together = evaluator.score_all(configs, ["Hi?", "Why?"], decoding, progress=said.append)
    assert said[-1] == "answering 6 prompts x 3 configurations in shared batches (18 rows)"
    assert together == alone
    texts = [[[a.text for a in answers] for answers in config["held_out_answers"]] for config in alone]
    first = [[answers[0] for answers in config] for config in texts]
    assert first[0] != first[1] != first[2] != first[0], texts   # three configurations answering differently
    if sampled:
        assert all(one != two for config in texts for one, two in config), texts   # 2 draws differ
    assert not any(n for n, _ in evaluator.base.named_parameters() if "lora_" in n)   # unloaded afterwards


def test_freed_scoring_memory_goes_back_before_the_shared_batches_decode(runs, tiny_model_dir, rows_file, monkeypatch):
    """The scoring's freed activations are returned to the kernel before the decoding's cache is allocated,
    so resident memory does not stack the two stages (traced in the demo: 1.74 -> 1.27 GB before decoding)."""
    import alignkit.compare as compare_module
    from alignkit.compare import Decoding

    events = []
    for name, event in (("score_preferences", "score"), ("release_freed_memory", "release"),
                        ("generate_replies", "decode")):
        real = getattr(compare_module, name)
        monkeypatch.setattr(compare_module, name,
                            lambda *a, _real=real, _event=event, **k: events.append(_event) or _real(*a, **k))
    evaluator = Evaluator(str(tiny_model_dir), Split(str(rows_file), 42, 6))
    evaluator.score_all([(None, 64, 0.1), (runs["sft"], 64, 0.1)], ["Hi?"], Decoding(max_new_tokens=4, eval_prompts=2))
    assert events == ["score", "score", "release", "decode"]


def test_timing_summary_names_each_stage_and_the_total():
    from alignkit.pipeline import timing_summary

    line = timing_summary({"SFT": 86.4, "SFT -> DPO + NLL": 173.6, "comparison": 61.0}, 349.2)
    assert line == "time: SFT 86 s, SFT -> DPO + NLL 174 s, comparison 61 s, total 5m49s"
    assert timing_summary({}, 59.6) == "time: total 1m00s"
    assert timing_summary({"SFT": 10.0}, 10.0, {"SFT": 2.14, "comparison": 3.0}) == \
        "time: SFT 10 s, total 0m10s; peak memory by the end of SFT 2.1 GB, comparison 3.0 GB"


def test_peak_memory_is_this_process_high_water_mark():
    from alignkit.pipeline import peak_memory_gb

    status = Path("/proc/self/status").read_text()
    hwm_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    assert peak_memory_gb() == pytest.approx(hwm_kb * 1024 / 1e9, rel=0.02)


def test_every_configuration_answers_the_held_out_prompts_with_intervals(runs, tmp_path):
    from alignkit.compare import Decoding

    report = compare({"base": None, "sft": runs["sft"]}, tmp_path / "report", prompts=["Hi?"],
                     progress=lambda _: None, decoding=Decoding(max_new_tokens=4, eval_prompts=5))
    results = json.loads((report.parent / "results.json").read_text())
    assert results["quality_prompts"] == 5
    base, sft = results["configs"]
    for config in (base, sft):
        assert len(config["held_out"]) == 5 and all(len(samples) == 1 for samples in config["held_out"])
        words = [len(s[0]["text"].split()) for s in config["held_out"]]
        assert config["quality"]["mean_words"]["value"] == pytest.approx(sum(words) / 5)
        assert config["quality"]["ended_share"]["value"] == pytest.approx(
            sum(s[0]["ended"] for s in config["held_out"]) / 5)
        q = config["quality"]["repetition"]
        assert q["low"] <= q["value"] <= q["high"]
    assert "vs_base" not in base["quality"]["repetition"] and "vs_base" in sft["quality"]["repetition"]
    assert 'id="quality"' in report.read_text()


def test_sampled_comparison_is_seeded(runs, tmp_path):
    from alignkit.compare import Decoding

    def sampled(seed, out):
        decoding = Decoding(max_new_tokens=5, temperature=1.0, samples=2, seed=seed, eval_prompts=2)
        report = compare({"sft": runs["sft"]}, tmp_path / out, prompts=["Hi?"], progress=lambda _: None,
                         decoding=decoding)
        return json.loads((report.parent / "results.json").read_text())

    first, again, other = sampled(3, "a"), sampled(3, "b"), sampled(4, "c")
    assert first["configs"][0]["held_out"] == again["configs"][0]["held_out"]
    assert first["configs"][0]["held_out"] != other["configs"][0]["held_out"]
    assert all(len(s) == 2 for s in first["configs"][0]["held_out"])
    assert first["generation"]["do_sample"] is True and first["generation"]["samples_per_held_out_prompt"] == 2
    with pytest.raises(UserError, match="--samples > 1 needs --temperature > 0"):
        Decoding(samples=3)
    with pytest.raises(UserError, match="--repetition-penalty"):
        Decoding(repetition_penalty=0)
    assert Decoding(repetition_penalty=1.2).settings() == {"do_sample": False, "repetition_penalty": 1.2,
                                                           "max_new_tokens": 200}


def test_pipeline_stages_take_their_recipe_unless_max_steps_is_given(monkeypatch, tmp_path):
    import alignkit.train
    from alignkit import pipeline

    seen = {}
    monkeypatch.setattr(alignkit.train, "run", lambda cfg: seen.__setitem__(Path(cfg.save_path).name, cfg))
    pipeline.train_configurations(["sft_dpo_nll"], tmp_path / "a")
    sft, dpo = seen["sft"], seen["sft_dpo_nll"]
    assert (sft.lr, sft.max_steps) == (pipeline.SFT_LR, pipeline.SFT_STEPS)
    assert (dpo.beta, dpo.lr, dpo.max_steps, dpo.nll_alpha) == (pipeline.DPO_BETA, pipeline.DPO_LR,
                                                                 pipeline.DPO_STEPS, 1.0)
    assert dpo.load_path == str(tmp_path / "a" / "sft" / "actor")
    # both stages split their batch of 8 into micro-batches (peak memory)
    assert (sft.micro_batch_size, sft.batch_size, dpo.micro_batch_size, dpo.batch_size) == (4, 8, 2, 8)
    seen.clear()
    pipeline.train_configurations(["sft_dpo_nll"], tmp_path / "b", max_steps=3)
    assert seen["sft"].max_steps == seen["sft_dpo_nll"].max_steps == 3
    assert seen["sft_dpo_nll"].beta == pipeline.DPO_BETA   # only the step count is replaced


def test_a_run_with_an_eval_dataset_is_scored_on_that_dataset(tiny_model_dir, rows_file, tmp_path):
    held = tmp_path / "held.jsonl"
    held.write_text("".join(rows_file.read_text().splitlines(keepends=True)[:4]))
    flags = ["--model", str(tiny_model_dir), "--dataset", str(rows_file), "--eval-dataset", str(held),
             "--save-path", str(tmp_path / "sft"), "--no-timestamp", "--max-steps", "1", "--batch-size", "4",
             "--max-length", "64", "--no-plot", "--eval-interval", "0"]
    assert main(["sft", *flags]) == 0
    report = compare({"base": None, "sft": str(tmp_path / "sft")}, tmp_path / "report", prompts=["Hi?"],
                     max_new_tokens=2, progress=lambda _: None)
    results = json.loads((report.parent / "results.json").read_text())
    assert [(c["split"]["eval_dataset"], c["split"]["pairs"]) for c in results["configs"]] == [(str(held), 4)] * 2
    assert "held out: dataset" in str(Split(str(rows_file), 42, 0.1, eval_dataset=str(held)))


def test_unloading_an_adapter_with_a_saved_module_gives_back_the_base_as_it_was(tiny_model):
    import copy

    from peft import LoraConfig

    from alignkit.compare import _unload
    from alignkit.models import add_lora

    base = copy.deepcopy(tiny_model)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = add_lora(base, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)   # the adapter's trained copy
    after = _unload(model).state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_relative_model_folder_is_the_absolute_one_the_runs_record(tmp_path, monkeypatch):
    from alignkit.compare import check_same_base

    (tmp_path / "model").mkdir()
    actor = tmp_path / "run" / "actor"
    actor.mkdir(parents=True)
    (actor / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "model")}))
    monkeypatch.chdir(tmp_path)
    assert check_same_base({"sft": str(tmp_path / "run")}, "model") == "model"
    with pytest.raises(UserError, match="all runs must share the base model 'other'"):
        check_same_base({"sft": str(tmp_path / "run")}, "other")


def _count_forwards(monkeypatch) -> dict[str, int]:
    """Counts of the policy's and the reference's held-out forwards from here on."""
    import alignkit.agents
    import alignkit.reference

    calls = {"policy": 0, "reference": 0}
    for module, key in ((alignkit.agents, "policy"), (alignkit.reference, "reference")):
        def counted(*args, _real=module.sequence_logps, _key=key, **kwargs):
            calls[_key] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, "sequence_logps", counted)
    return calls


def test_held_out_logps_are_filed_by_adapter_and_not_run_again(runs, tiny_model_dir, rows_file, tmp_path,
                                                               monkeypatch):
    split = Split(str(rows_file), 42, 6)
    calls = _count_forwards(monkeypatch)
    # The DPO run's final eval filed its policy's log-probs of the held-out pairs under its adapter.
    evaluator = Evaluator(str(tiny_model_dir), split)
    with torch.no_grad():
        scored = evaluator._held_out_metrics(evaluator._with_adapter(runs["dpo"]), runs["dpo"], 64, 0.5)
    assert calls["policy"] == 0
    # An empty cache computes everything, to the same numbers (the run's eval batched them otherwise).
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "empty"))
    fresh = Evaluator(str(tiny_model_dir), split)
    with torch.no_grad():
        computed = fresh._held_out_metrics(fresh._with_adapter(runs["dpo"]), runs["dpo"], 64, 0.5)
    assert calls["policy"] > 0 and calls["reference"] > 0
    assert computed.keys() == scored.keys()
    assert all(abs(computed[k] - scored[k]) < 1e-5 for k in computed), (computed, scored)
    # ... which a second comparison looks up: no forward of either model, the very same numbers.
    calls.update(policy=0, reference=0)
    again = Evaluator(str(tiny_model_dir), split)
    with torch.no_grad():
        for run_dir in (None, runs["dpo"]):
            model = again._with_adapter(run_dir)
            repeated = again._held_out_metrics(model, run_dir, 64, 0.5)
            again.base = _unload(model)
    assert calls == {"policy": 0, "reference": 0}
    assert repeated == computed


def test_an_eval_dataset_with_its_own_column_names_is_scored_as_the_run_read_it(tiny_model_dir, rows_file, tmp_path):
    # Training rows use the usual names; the held-out file names its columns differently (--eval-columns).
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"q": f"Held-out question {i}?", "yes": "Sure!", "no": "Negative."}) + "\n"
                            for i in range(5)))
    flags = ["--model", str(tiny_model_dir), "--dataset", str(rows_file), "--eval-dataset", str(held),
             "--eval-columns", "prompt=q", "chosen=yes", "rejected=no", "--save-path", str(tmp_path / "dpo"),
             "--no-timestamp", "--max-steps", "1", "--batch-size", "4", "--max-length", "64", "--no-plot",
             "--eval-interval", "0"]
    assert main(["dpo", *flags]) == 0
    record = read_run_record(tmp_path / "dpo")
    assert record.split.eval_column_map.given() == {"prompt": "q", "chosen": "yes", "rejected": "no"}
    assert list(record.split.load()[1]["prompt"]) == [f"Held-out question {i}?" for i in range(5)]
    report = compare({"base": None, "dpo": str(tmp_path / "dpo")}, tmp_path / "report", prompts=["Hi?"],
                     max_new_tokens=2, progress=lambda _: None)
    results = json.loads((report.parent / "results.json").read_text())
    assert [(c["split"]["eval_column_map"], c["split"]["pairs"]) for c in results["configs"]] == [
        ({"prompt": "q", "chosen": "yes", "rejected": "no"}, 5)] * 2


def test_prompts_split_at_line_ends_only(tmp_path):
    from alignkit.compare import read_prompts

    pasted = tmp_path / "pasted.txt"   # text from web pages: separators that str.splitlines also breaks at
    pasted.write_text("One\u2028paragraph\u2029more\nform\x0cfeed \x85 and\x1crecord\x0bsep\n", encoding="utf-8")
    assert read_prompts(pasted) == ["One\u2028paragraph\u2029more", "form\x0cfeed \x85 and\x1crecord\x0bsep"]
    windows = tmp_path / "windows.txt"
    windows.write_bytes("First?\r\n\r\nSecond\u2028line?\r\nThird?\rFourth?".encode())
    assert read_prompts(windows) == ["First?", "Second\u2028line?", "Third?", "Fourth?"]
    from alignkit.compare import prompt_lines

    assert [n for n, _ in prompt_lines(windows)] == [1, 3, 4, 5]   # the line numbers messages name


def test_compare_refuses_a_prompt_that_leaves_no_room_for_its_answer(tiny_model_dir, rows_file, tmp_path):
    from alignkit.compare import Decoding

    long = " ".join(["hello"] * 500)   # the tiny model's context: 512 positions
    with pytest.raises(UserError) as caught:
        compare({"base": None}, tmp_path / "report", prompts=["Hi?", long], model=str(tiny_model_dir),
                dataset=str(rows_file), test_size=6, progress=lambda _: None,
                decoding=Decoding(max_new_tokens=100, eval_prompts=0))
    assert str(caught.value).startswith("prompt 2 of 2: the prompt takes ")
    assert str(caught.value).endswith("tokens and its answer up to 100 more (--max-new-tokens), beyond the model's "
                                      "context of 512 tokens; shorten it to at most 412 tokens or lower "
                                      "--max-new-tokens")
    assert not (tmp_path / "report").exists()


def test_a_population_run_is_scored_at_the_beta_its_best_member_trained_with(tmp_path):
    from alignkit.config import DPOConfig

    run = tmp_path / "pop"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"algo": "dpo", "config": {**DPOConfig(pop_size=3).to_dict(), "beta": 0.1}}))
    assert read_run_record(run).beta == 0.1   # no population record: the recorded --beta
    members = [{"member": i, "lr": 1e-4, "beta": b} for i, b in enumerate((0.3, 4.9, 0.05))]
    (run / "population.json").write_text(json.dumps({"best": 1, "generations": [
        {"generation": 0, "members": [{**m, "beta": 0.1} for m in members]}, {"generation": 1, "members": members}]}))
    assert read_run_record(run).beta == 4.9
