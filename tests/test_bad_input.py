"""Bad input through the command line: one `error:` line, exit code 2, never a traceback.

Each case runs `alignkit.cli.main` on the tiny local model and data of conftest, with runs short
enough that a case that wrongly gets through still finishes in seconds.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from alignkit.cli import main
from alignkit.config import build_config

SHORT = ["--max-steps", "1", "--batch-size", "4", "--max-length", "64", "--test-size", "6", "--no-plot",
         "--eval-interval", "0"]


def refused(capsys, *argv) -> str:
    """Run the command line, check it failed the house way, and return its one error line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert err.rstrip().endswith(errors[0]), err   # no continuation lines after the message
    return errors[0]


def run_flags(algo, out, *extra) -> list[str]:
    """A short run into ``out``; ``extra`` comes last, so it overrides ``SHORT``."""
    return [str(a) for a in (algo, *SHORT, "--save-path", out, "--no-timestamp", *extra)]


def write(path: Path, content: str | bytes) -> Path:
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def rows_text(rows_file: Path) -> str:
    return rows_file.read_text(encoding="utf-8")


@pytest.fixture
def train(tiny_model_dir, tmp_path, capsys):
    """``train(algo, dataset, *extra)`` on the tiny model: the error line of a refused run."""
    return lambda algo, data, *extra: refused(
        capsys, *run_flags(algo, tmp_path / "run", "--model", tiny_model_dir, "--dataset", data, *extra))


# --- datasets ---------------------------------------------------------------------------------


def test_missing_dataset_file(train, tmp_path):
    assert "does not exist" in train("sft", tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name, content, needle", [
    ("empty.jsonl", "", "is empty"), ("empty.json", "", "is empty"), ("empty.csv", "", "is empty"),
    ("blank.jsonl", "\n  \n", "holds no rows"), ("list.json", "[]", "holds no rows"),
])
def test_empty_dataset_file(train, tmp_path, name, content, needle):
    assert needle in train("sft", write(tmp_path / name, content))


def test_invalid_json_line_names_the_line(train, tmp_path, rows_file):
    bad = write(tmp_path / "bad.jsonl", rows_text(rows_file) + '{"prompt": "unclosed\n')
    assert "line 25 is not valid JSON" in train("dpo", bad)


@pytest.mark.parametrize("suffix, line", [(".jsonl", 2), (".json", 2), (".csv", 3)])
def test_non_utf8_bytes_name_the_line(train, tmp_path, suffix, line):
    latin1 = "café".encode("latin-1")
    content = {
        ".jsonl": b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "' + latin1 + b'", "chosen": "b", '
                  b'"rejected": "c"}\n',
        ".json": b'[{"prompt": "a", "chosen": "b", "rejected": "c"},\n{"prompt": "' + latin1 + b'"}]',
        ".csv": b"prompt,chosen,rejected\na,b,c\n" + latin1 + b",b,c\n",
    }[suffix]
    message = train("sft", write(tmp_path / f"latin1{suffix}", content))
    assert "not UTF-8" in message and f"line {line} holds the byte 0xe9" in message


def test_utf8_byte_order_mark_is_accepted(tiny_model_dir, rows_file, tmp_path):
    data = write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + rows_file.read_bytes())
    assert main(run_flags("sft", tmp_path / "run", "--model", tiny_model_dir, "--dataset", data)) == 0


def test_lone_surrogate_row_is_dropped_with_a_counted_warning(tiny_model_dir, rows_file, tmp_path, caplog):
    """A lone surrogate is valid JSON but not text: that row goes, like any other bad value."""
    data = write(tmp_path / "surrogate.jsonl",
                 rows_text(rows_file) + '{"prompt": "broken \\ud800 emoji", "chosen": "a", "rejected": "b"}\n')
    assert main(run_flags("dpo", tmp_path / "run", "--model", tiny_model_dir, "--dataset", data)) == 0
    assert "dropped 1 of 25 rows (1 with text that is not valid Unicode" in caplog.text
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["train_rows"] + run["test_rows"] == 24


def test_only_surrogate_rows_is_an_error(train, tmp_path):
    data = write(tmp_path / "surrogates.jsonl",
                 "".join(f'{{"prompt": "q{i} \\udc80", "chosen": "a", "rejected": "b"}}\n' for i in range(4)))
    message = train("sft", data)
    assert "no usable rows" in message and "4 with text that is not valid Unicode" in message


@pytest.mark.parametrize("name, content, needle", [
    ("arrays.jsonl", '["q", "a", "b"]\n', "line 1 is a JSON array"),
    ("numbers.jsonl", '{"prompt": "q", "chosen": "a", "rejected": "b"}\n42\n', "line 2 is a JSON number"),
    ("strings.jsonl", '"just text"\n', "line 1 is a JSON string"),
    ("items.json", '[{"prompt": "q", "chosen": "a", "rejected": "b"}, [1, 2]]', "item 2 is a JSON array"),
    ("scalar.json", "42", "must hold a list of row objects"),
])
def test_rows_that_are_not_objects(train, tmp_path, name, content, needle):
    assert needle in train("sft", write(tmp_path / name, content))


def test_wrong_or_missing_columns_are_named(train, tmp_path):
    message = train("dpo", write(tmp_path / "cols.jsonl", '{"prompt": "q", "answer": "yo", "chosen": "a"}\n'))
    assert "lacks column(s) rejected" in message and "it has: prompt, answer, chosen" in message


def test_non_string_values_are_counted(train, tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": i % 2 == 0, "rejected": "b"} for i in range(5)]   # numbers would be text
    data = write(tmp_path / "types.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    message = train("sft", data)
    assert "no usable rows" in message and "all 5 rows were dropped (5 with a non-string value)" in message


def test_lists_that_are_not_messages_name_the_row(train, tmp_path):
    rows = [{"prompt": "hi", "chosen": "a", "rejected": "b"}] * 2 + [{"prompt": "q", "chosen": ["a"], "rejected": "b"}]
    data = write(tmp_path / "types.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert train("dpo", data) == "error: row 3 is written as conversational data but row 1 as standard; a dataset holds one shape"
    data = write(tmp_path / "lists.jsonl", json.dumps(rows[-1]) + "\n")
    assert train("dpo", data) == "error: row 1: chosen message 1 holds text where a {role, content} object is needed"


def test_too_small_to_split(train, tmp_path, rows_file):
    one = write(tmp_path / "one.jsonl", rows_text(rows_file).splitlines()[0] + "\n")
    assert "at least 2 are needed for a train/test split" in train("sft", one)
    five = write(tmp_path / "five.jsonl", "\n".join(rows_text(rows_file).splitlines()[:5]) + "\n")
    assert "--test-size 6 gives 6 test rows out of 5" in train("sft", five)


def _long_prompts(tmp_path) -> Path:
    rows = [{"prompt": "a very long question " * 40 + str(i), "chosen": "yes", "rejected": "no"} for i in range(18)]
    return write(tmp_path / "long.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("algo", ["sft", "dpo"])
def test_every_prompt_longer_than_max_length(train, tmp_path, algo):
    message = train(algo, _long_prompts(tmp_path))
    assert "no training rows left" in message and "64" in message


def test_every_prompt_too_long_says_how_many_and_names_the_flag(train, tmp_path):
    message = train("sft", _long_prompts(tmp_path))   # 18 rows, 6 held out: 12 training rows dropped
    assert "12" in message and "--max-length" in message


# --- models -----------------------------------------------------------------------------------


def test_unknown_model_name(rows_file, capsys, tmp_path):
    message = refused(capsys, *run_flags("sft", tmp_path, "--model", "no-such-model", "--dataset", rows_file))
    assert "'no-such-model'" in message and "accepted:" in message


def test_empty_model_folder(rows_file, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    message = refused(capsys, *run_flags("sft", tmp_path / "run", "--model", tmp_path / "empty",
                                         "--dataset", rows_file))
    assert "has no config.json" in message


def _copy_model(tiny_model_dir, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def test_pickled_model_weights_are_refused(tiny_model_dir, rows_file, capsys, tmp_path):
    folder = _copy_model(tiny_model_dir, tmp_path)
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    message = refused(capsys, *run_flags("sft", tmp_path / "run", "--model", folder, "--dataset", rows_file))
    assert "only pickled weights (pytorch_model.bin)" in message and "safetensors weights only" in message
    assert "weights_only" not in message   # never a hint to unpickle untrusted files


def test_damaged_model_weights(tiny_model_dir, rows_file, capsys, tmp_path):
    folder = _copy_model(tiny_model_dir, tmp_path)
    write(folder / "model.safetensors", b"\x00" * 64)
    message = refused(capsys, *run_flags("sft", tmp_path / "run", "--model", folder, "--dataset", rows_file))
    assert f"could not load model from '{folder}'" in message


def test_remote_code_is_off_unless_asked(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.models import load_model, load_tokenizer

    seen = []

    def record(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise OSError("stop here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", record)
    for trust in (None, True):
        extra = {} if trust is None else {"trust_remote_code": trust}
        for loader in (load_model, load_tokenizer):
            with pytest.raises(Exception, match="stop here"):
                loader(tiny_model_dir, **extra)
    assert seen == [False, False, True, True]


def test_every_torch_load_refuses_pickled_code():
    package = Path(__file__).resolve().parents[1] / "alignkit"
    for path in package.rglob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if re.search(r"\btorch\.load\(", line):
                assert "weights_only=True" in line, f"{path}:{number}: {line.strip()}"


# --- adapters ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def actor(tiny_model_dir, rows_file, tmp_path_factory) -> Path:
    """A real adapter folder from a one-step SFT run on the tiny model."""
    out = tmp_path_factory.mktemp("sft")
    assert main(run_flags("sft", out, "--model", tiny_model_dir, "--dataset", rows_file)) == 0
    return out / "actor"


@pytest.fixture
def adapter(actor, tmp_path):
    """A fresh copy of ``actor`` to damage."""
    copy = tmp_path / "adapter"
    shutil.copytree(actor, copy)
    return copy


@pytest.fixture
def warm_start(rows_file, tmp_path, capsys):
    """``warm_start(load_path, *extra)``: the error line of a DPO run warm-started from ``load_path``."""
    return lambda path, *extra: refused(capsys, *run_flags("dpo", tmp_path / "run", "--load-path", path,
                                                          "--dataset", rows_file, *extra))


def test_folder_that_is_not_an_adapter(warm_start, actor, tmp_path):
    assert "is not a LoRA adapter folder: no adapter_config.json" in warm_start(tmp_path)
    assert "did you mean its actor/ folder?" in warm_start(actor.parent)
    assert warm_start(tmp_path / "nothere") == f"error: {tmp_path / 'nothere'}: no such adapter folder"


def test_a_file_given_for_the_adapter_folder(warm_start, adapter, rows_file):
    config = adapter / "adapter_config.json"
    assert warm_start(config) == f"error: {config} is a file: give the adapter folder that holds it ({adapter})"
    assert warm_start(rows_file) == f"error: {rows_file} is a file, not a LoRA adapter folder"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_adapter_weights(warm_start, adapter, damage):
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    write(weights, {"truncated": data[: len(data) // 2], "garbage": b"not safetensors" * 8, "empty": b""}[damage])
    message = warm_start(adapter)
    assert "adapter_model.safetensors is damaged" in message and "truncated" in message


def test_adapter_without_weights_does_not_try_the_hub(warm_start, adapter, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (adapter / "adapter_model.safetensors").unlink()
    message = warm_start(adapter)
    assert "has no weights: adapter_model.safetensors is missing" in message and "repo" not in message.lower()


@pytest.mark.parametrize("text, needle", [("{not json", "adapter_config.json is damaged"),
                                          ("[1, 2]", "not a JSON object"),
                                          ('{"r": 4}', "no peft_type")])
def test_broken_adapter_config(warm_start, adapter, text, needle):
    write(adapter / "adapter_config.json", text)
    assert needle in warm_start(adapter)


def test_pickled_adapter_weights_are_refused(warm_start, adapter):
    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(weights), adapter / "adapter_model.bin")
    weights.unlink()
    message = warm_start(adapter)
    assert "only pickled weights (adapter_model.bin)" in message and "safetensors weights only" in message
    assert "weights_only" not in message


def test_adapter_recorded_on_another_base(warm_start, actor, tmp_path):
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    assert "was trained on" in warm_start(actor, "--model", other)


def test_adapter_whose_shapes_do_not_fit_the_base(warm_start, adapter, tiny_model_dir, tokenizer, tmp_path):
    """The recorded base names another folder (a wider model): the shape mismatch is named."""
    wider = tmp_path / "wider"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=True)).save_pretrained(wider)
    shutil.copy(tiny_model_dir / "tokenizer.json", wider)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", wider)
    config = json.loads((adapter / "adapter_config.json").read_text())
    write(adapter / "adapter_config.json", json.dumps({**config, "base_model_name_or_path": str(wider)}))
    message = warm_start(adapter)
    assert "does not fit this base model" in message
    # the first tensor that does not fit is named, with both shapes, and how many others there are
    assert "size mismatch for" in message and "torch.Size([16, 64])" in message and "more)" in message, message


def test_eval_needs_load_path_and_checks_the_adapter(capsys, adapter):
    assert "--eval needs --load-path" in refused(capsys, "sft", "--eval")
    write(adapter / "adapter_model.safetensors", b"")
    assert "adapter_model.safetensors is damaged" in refused(capsys, "dpo", "--eval", "--load-path", adapter)


# --- options ----------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Options must be refused before anything loads: reaching the run is a test failure."""
    def reached(cfg):
        raise AssertionError("the run started: the options were not refused up front")

    monkeypatch.setattr("alignkit.train.run", reached)
    monkeypatch.setattr("alignkit.train.setup", reached)


@pytest.mark.parametrize("algo, flags, needle", [
    ("sft", ["--lr", "-1"], "--lr must be > 0"),
    ("sft", ["--lr", "inf"], "--lr must be > 0 and finite (got inf)"),
    ("sft", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("dpo", ["--beta", "0"], "--beta must be > 0"),
    ("dpo", ["--beta", "nan"], "--beta must be > 0 and finite (got nan)"),
    ("sft", ["--epochs", "0"], "--epochs must be > 0"),
    ("sft", ["--epochs", "inf"], "--epochs must be > 0 and finite (got inf)"),
    ("sft", ["--epochs", "nan"], "--epochs must be > 0 and finite (got nan)"),
    ("sft", ["--max-length", "1"], "--max-length must be >= 2"),
    ("dpo", ["--nll-alpha", "-1"], "--nll-alpha must be >= 0"),
    ("dpo", ["--nll-alpha", "inf"], "--nll-alpha must be >= 0 and finite"),
    ("sft", ["--micro-batch-size", "3", "--batch-size", "8"], "multiple of --micro-batch-size (3)"),
    ("sft", ["--max-grad-norm", "inf"], "--max-grad-norm must be >= 0 and finite"),
    ("dpo", ["--simpo-gamma", "nan"], "--simpo-gamma must be a finite number"),
    ("dpo", ["--loss-type", "ipo", "--label-smoothing", "0.1"], "applies to the sigmoid loss only"),
    ("sft", ["--seed=-1"], "--seed must be a whole number from 0 to 9223372036854775807 (got -1)"),
    ("dpo", [f"--seed={2 ** 63}"], "--seed must be a whole number from 0 to 9223372036854775807"),
])
def test_invalid_option_values_are_refused_before_loading(no_training, capsys, tmp_path, algo, flags, needle):
    # --model names nothing that exists: a check that ran after model resolution would say so instead
    message = refused(capsys, *run_flags(algo, tmp_path, "--model", "not-loaded", *flags))
    assert message.startswith("error: invalid options:") and needle in message


# --- YAML configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("content, needle", [
    ("lr: [0.1\n", "is not valid YAML at line 2"),
    ("- lr\n- 0.1\n", "must hold a mapping of option names to values"),
    ("0.1\n", "must hold a mapping"),
    ("batchsize: 4\nlr: 0.1\n", "unknown option(s) batchsize (did you mean batch_size?) for sft"),
    ("nll_alpha: 1\nbeta: 0.1\nlr: 0.1\n", "beta, nll_alpha are DPO options: the file is for alignkit dpo --config"),
    (b"# caf\xe9\nlr: 0.1\n", "is not UTF-8 text (line 1)"),
    ("1: 2\n", "option names must be text, got 1"),
    ("? [a, b]\n: 1\n", "found unhashable key"),
    ("lr: abc\n", "lr must be a number, got 'abc'"),
    ("lr:\n", "lr must be a number, got nothing"),
    ("batch_size: 1e3\n", "batch_size must be a whole number, got '1e3'"),
    ("batch_size: true\n", "batch_size must be a whole number, got True"),
    ("packing: 1\n", "packing must be true or false, got 1"),
    ("lora_target_modules: [1, 2]\n", "lora_target_modules must be a list of names"),
    ("batch-size: 2\nbatch_size: 4\n", "option batch_size is set twice"),
    ("lr: !!python/object/apply:os.system [echo]\n", "is not valid YAML"),
    ("algo: dpo\nlr: 0.1\n", "options.yaml is for alignkit dpo (algo: dpo), not sft; drop its algo line to share it"),
    ("algo: ppo\nlr: 0.1\n", "options.yaml is for alignkit ppo (algo: ppo), not sft"),
])
def test_bad_yaml_config(no_training, capsys, tmp_path, content, needle):
    config = write(tmp_path / "options.yaml", content)
    message = refused(capsys, "sft", "--config", config)
    assert needle in message


def test_the_shipped_config_files_serve_their_own_command_only(no_training, capsys):
    root = Path(__file__).resolve().parents[1] / "configs"
    assert "is for alignkit sft (algo: sft), not dpo" in refused(capsys, "dpo", "--config", root / "sft.yaml")
    assert "is for alignkit dpo (algo: dpo), not sft" in refused(capsys, "sft", "--config", root / "dpo_nll.yaml")
    assert build_config("sft", {"config": str(root / "sft.yaml")}).lr == 2e-4   # its own command reads it


def test_config_file_missing_or_a_folder(no_training, capsys, tmp_path):
    assert "config file not found" in refused(capsys, "sft", "--config", tmp_path / "none.yaml")
    assert "is a folder" in refused(capsys, "sft", "--config", tmp_path)


def test_yaml_numbers_written_as_pyyaml_strings_are_accepted(tmp_path):
    """PyYAML reads 1e-4 (no dot) as a string; it is the number 0.0001 for a float option."""
    config = write(tmp_path / "options.yaml", "lr: 1e-4\nepochs: 2E0\nbatch_size: '4'\nwarmup_ratio: 0\n")
    cfg = build_config("dpo", {"config": str(config)})
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.warmup_ratio) == (0.0001, 2.0, 4, 0.0)
    assert type(cfg.lr) is float and type(cfg.batch_size) is int and type(cfg.warmup_ratio) is float
    assert build_config("sft", {"config": str(write(tmp_path / "empty.yaml", ""))}).lr == 2e-4


# --- options that contradict the model or the warm-start adapter ------------------------------------


def test_lora_targets_that_name_no_module_are_refused(train, rows_file):
    for targets in (["foo_proj"], ["q_proj", "v_projj"]):   # none match; one matches, a typo does not
        line = train("sft", rows_file, "--lora-target-modules", *targets)
        assert line.startswith(f"error: --lora-target-modules: no module named {targets[-1]} in the model")
        assert "q_proj" in line.split("its linear modules are:")[1]


@pytest.mark.parametrize("target, kind", [("mlp", "LlamaMLP"), ("input_layernorm", "LlamaRMSNorm"),
                                          ("embed_tokens", "Embedding")])
def test_lora_targets_that_are_not_linear_layers_are_refused(train, rows_file, target, kind):
    # PEFT fails with a traceback on a norm or a block, and the embedding's update would never train
    assert train("sft", rows_file, "--lora-target-modules", "q_proj", target) == (
        f"error: --lora-target-modules: {target} is not a linear layer (it is {kind}); LoRA adapters go on linear "
        "layers; the model's are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")


def test_a_lora_adapter_on_the_output_layer_is_refused(train, rows_file):
    # the response-only forward reads the LM head's weight directly: an adapter there would never train
    # (and under DDP its unused parameters stop the second step)
    for targets in (["lm_head"], ["q_proj", "lm_head"]):
        line = train("sft", rows_file, "--lora-target-modules", *targets)
        assert line == ("error: --lora-target-modules: lm_head is the output layer; training reads its weight "
                        "directly to score only the response tokens, so an adapter there would never train: "
                        "leave it out")


def test_a_warm_start_keeps_the_adapters_shape(tiny_model_dir, rows_file, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(run_flags("sft", first, "--model", tiny_model_dir, "--dataset", rows_file, "--lora-r", "4")) == 0
    line = refused(capsys, *run_flags("sft", tmp_path / "bad", "--dataset", rows_file, "--load-path",
                                      first / "actor", "--lora-r", "8"))
    assert line == ("error: --lora-r 8 contradicts the --load-path adapter (r=4); a warm start keeps the "
                    "adapter's shape: drop --lora-r")
    warm = tmp_path / "warm"
    assert main(run_flags("sft", warm, "--dataset", rows_file, "--load-path", first / "actor")) == 0
    recorded = json.loads((warm / "run.json").read_text())["config"]
    assert recorded["lora_r"] == 4   # the shape trained, not the default 16


def test_a_chat_template_that_leaves_out_the_messages_is_refused(train, rows_file, tmp_path):
    template = write(tmp_path / "const.jinja", "hello{% for m in messages %}{{ m['role'] }}{% endfor %}")
    line = train("sft", rows_file, "--chat-template", template)
    assert line == (f"error: --chat-template {template} does not write the messages' content (a user and assistant "
                    "message was left out of its rendering)")


# --- outputs that cannot be written ---------------------------------------------------------------


def test_plot_and_export_refuse_outputs_that_cannot_be_written(tiny_model_dir, rows_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(run_flags("sft", run, "--model", tiny_model_dir, "--dataset", rows_file)) == 0
    a_file = write(tmp_path / "a_file", "x")
    assert refused(capsys, "plot", run, "--out", a_file) == f"error: --out {a_file} is a file; give a folder"
    assert refused(capsys, "plot", run, "--out", a_file / "sub") == (
        f"error: --out {a_file / 'sub'} cannot be written: {a_file} is a file, not a folder")
    assert refused(capsys, "export", "--load-path", run / "actor", "--out", a_file / "merged") == (
        f"error: --out {a_file / 'merged'} cannot be written: {a_file} is a file, not a folder")
    assert refused(capsys, "export", "--load-path", run / "actor", "--format", "gguf", "--out",
                   a_file / "m.gguf") == f"error: --out {a_file / 'm.gguf'} cannot be written: {a_file} is a file, not a folder"
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert refused(capsys, "plot", empty) == f"error: no figure written: {empty} hold(s) no finite metrics to plot"
    assert refused(capsys, "plot", tmp_path / "nothere") == f"error: {tmp_path / 'nothere'}: no such run folder"


def test_an_output_folder_that_refuses_files_is_found_before_any_work(tmp_path, monkeypatch):
    import errno

    from alignkit.io import unwritable

    assert unwritable(tmp_path / "new" / "out") is None
    assert list(tmp_path.iterdir()) == []   # the probe leaves nothing behind

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.mkstemp", read_only)   # writable by permissions, refused by the mount
    assert unwritable(tmp_path / "out") == f"{tmp_path} does not take new files (Read-only file system)"


def test_a_batch_larger_than_the_training_split_is_refused(train, rows_file, tmp_path):
    # 24 rows, 6 held out: a step of 40 would silently take the 18 there are (or run out of memory)
    assert train("sft", rows_file, "--batch-size", "40") == ("error: --batch-size 40 is more than the 18 training "
                                                            "rows (--test-size 6 held out 6); give a --batch-size of "
                                                            "at most 18 or a smaller --test-size")
    assert not (tmp_path / "run").exists()
    # the message names each option that took rows away: here the held-out share and the length limit
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({**r, "prompt": r["prompt"] + " word" * (60 if i % 2 else 0)}) + "\n"
                            for i, r in enumerate(rows)))
    line = train("sft", long, "--batch-size", "16", "--max-length", "64", "--test-size", "0.25")
    kept = int(line.split(" is more than the ")[1].split()[0])
    assert kept < 16 and line == (f"error: --batch-size 16 is more than the {kept} training rows (--test-size 0.25 "
                                  f"held out 6; {18 - kept} did not fit --max-length 64); give a --batch-size of at "
                                  f"most {kept} or a smaller --test-size or a larger --max-length")


def test_a_seed_the_random_generators_cannot_take_is_refused_by_the_library_too():
    from alignkit.data import make_dataset
    from alignkit.errors import UserError

    for seed in (-1, 2 ** 63, 1.5, True):
        with pytest.raises(UserError, match="seed must be a whole number from 0"):
            make_dataset(seed=seed)


def test_chat_refuses_answers_longer_than_the_models_context(tiny_model_dir, tokenizer):
    from alignkit.errors import UserError
    from alignkit.evaluate import Chat

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    context = model.config.max_position_embeddings
    with pytest.raises(UserError, match=f"--max-new-tokens {context} leaves no room for a message: the model's "
                                        f"context holds {context} tokens"):
        Chat(model, tokenizer, max_new_tokens=context)
    assert Chat(model, tokenizer, max_new_tokens=context - 1).context_limit == 1
