"""Mistakes in the Python API's arguments: a UserError whose one line names the argument, what was given and
what is expected; never a raw TypeError, KeyError or OSError from deep inside. Valid inputs keep working."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from alignkit import DPO, SFT, PreferenceGym, SFTGym
from alignkit.errors import UserError

LORA = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def _agent(cls, tokenizer, model, **kw):
    kw.setdefault("lora_config", copy.deepcopy(LORA))
    return cls(model, pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, **kw)


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, UserError)
    return message


# --- gyms: numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["data_batch_size_per_gpu", "max_context_length", "seed"])
@pytest.mark.parametrize("value", ["2", 2.5, 2.0, True, None])
def test_gym_counts_of_the_wrong_type_are_named(tokenizer, rows, name, value):
    with pytest.raises(UserError, match=rf"^{name} must be a whole number .*\(got {re.escape(repr(value))}\)$") as err:
        SFTGym(rows, None, tokenizer, **{name: value})
    _one_line(err)


@pytest.mark.parametrize("name, value, expected", [("data_batch_size_per_gpu", 0, ">= 1"),
                                                   ("max_context_length", 1, ">= 2"), ("seed", -1, "from 0 to")])
def test_gym_counts_out_of_range_are_named(tokenizer, rows, name, value, expected):
    with pytest.raises(UserError, match=rf"^{name} must be a whole number {expected}.*\(got {value}\)$"):
        PreferenceGym(rows, None, tokenizer, **{name: value})


def test_gym_takes_numpy_integers(tokenizer, rows):
    gym = SFTGym(rows, None, tokenizer, data_batch_size_per_gpu=np.int64(4), max_context_length=np.int32(96),
                 seed=np.int64(3))
    assert (gym.batch_size, gym.max_context_length, gym.seed) == (4, 96, 3)
    assert all(type(v) is int for v in (gym.batch_size, gym.max_context_length, gym.seed))
    assert gym.reset()["input_ids"].shape[0] == 4


# --- gyms: columns and datasets -------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, needle", [
    ({"response_column": "nope"}, "response_column='nope' is not a column of train_dataset (its rows have: "
                                  "prompt, chosen, rejected)"),
    ({"prompt_column": "question"}, "prompt_column='question' is not a column of train_dataset, nor is 'messages' "
                                    "(its rows have: prompt, chosen, rejected)"),
])
@pytest.mark.parametrize("as_dataset", [False, True])
def test_a_missing_column_is_named_before_any_encoding(tokenizer, rows, monkeypatch, kwargs, needle, as_dataset):
    def no_encoding(*args, **kw):
        raise AssertionError("encoded a row before checking the columns")

    monkeypatch.setattr("alignkit.gyms.encode_pair", no_encoding)
    data = Dataset.from_list(rows) if as_dataset else rows
    with pytest.raises(UserError, match=re.escape(needle)) as err:
        SFTGym(data, None, tokenizer, **kwargs)
    assert _one_line(err) == needle


def test_missing_answer_and_preference_columns_are_named(tokenizer, rows):
    no_answer = [{"prompt": r["prompt"], "answer": r["chosen"]} for r in rows]
    with pytest.raises(UserError, match=r"^train_dataset has neither a 'completion' nor a 'chosen' column: name its "
                                        r"answer column with response_column= \(its rows have: prompt, answer\)$"):
        SFTGym(no_answer, None, tokenizer)
    assert len(SFTGym(no_answer, None, tokenizer, response_column="answer").train_examples) == len(rows)
    no_rejected = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in rows]
    with pytest.raises(UserError, match=r"^test_dataset has no 'rejected' column: preference rows need 'prompt', "
                                        r"'chosen' and 'rejected' \(its rows have: prompt, chosen\)$"):
        PreferenceGym(rows, no_rejected, tokenizer)


def test_conversation_rows_and_prompt_rows_mix_in_a_list(tokenizer, rows):
    convo = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    assert len(SFTGym([convo, rows[0]], None, tokenizer).train_examples) == 2


@pytest.mark.parametrize("dataset, needle", [
    (None, "train_dataset must be a datasets.Dataset or a list of dict rows (got NoneType)"),
    (5, "train_dataset must be a datasets.Dataset or a list of dict rows (got int)"),
    ("rows.jsonl", "train_dataset must be a datasets.Dataset or a list of dict rows (got str)"),
    ({"prompt": ["Hi"], "chosen": ["Hello"]}, "train_dataset must be a datasets.Dataset or a list of dict rows "
                                              "(got dict)"),
    (["Hi", "Hello"], "train_dataset must be a datasets.Dataset or a list of dict rows (got a row that is a str)"),
    ([], "train_dataset has no rows: give a datasets.Dataset or a list of dict rows"),
])
def test_a_train_dataset_that_is_not_rows_is_named(tokenizer, dataset, needle):
    with pytest.raises(UserError, match=re.escape(needle)) as err:
        SFTGym(dataset, None, tokenizer)
    assert _one_line(err) == needle


def test_an_empty_test_split_is_no_evaluation(tokenizer, rows):
    assert SFTGym(rows, [], tokenizer).test_examples == []
    with pytest.raises(UserError, match=r"^test_dataset must be a datasets.Dataset or a list of dict rows \(got int\)"):
        SFTGym(rows, 3, tokenizer)


# --- agents: numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, pattern", [
    ({"lr": "1e-4"}, r"^lr must be a number > 0 \(got '1e-4'\)$"),
    ({"lr": 0}, r"^lr must be a number > 0 \(got 0\)$"),
    ({"lr": float("nan")}, r"^lr must be a number > 0 \(got nan\)$"),
    ({"batch_size": "8"}, r"^batch_size must be a whole number >= 1 \(got '8'\)$"),
    ({"batch_size": True}, r"^batch_size must be a whole number >= 1 \(got True\)$"),
    ({"batch_size": 0}, r"^batch_size must be a whole number >= 1 \(got 0\)$"),
    ({"update_epochs": 0.5}, r"^update_epochs must be a whole number >= 1 \(got 0.5\)$"),
    ({"max_grad_norm": -1.0}, r"^max_grad_norm must be a number >= 0 \(got -1.0\)$"),
    ({"weight_decay": "0"}, r"^weight_decay must be a number >= 0 \(got '0'\)$"),
    ({"warmup_steps": 1.5}, r"^warmup_steps must be a whole number >= 0 \(got 1.5\)$"),
    ({"total_steps": "10"}, r"^total_steps must be a whole number >= 0 \(got '10'\)$"),
    ({"min_lr_ratio": 2}, r"^min_lr_ratio must be a number >= 0 and <= 1 \(got 2\)$"),
    ({"seed": "1"}, r"^seed must be a whole number from 0 to \d+ \(got '1'\)$"),
    ({"micro_batch_size": 3, "batch_size": 2}, r"^micro_batch_size must be at most batch_size \(2\) \(got 3\)$"),
    ({"micro_batch_size": 0}, r"^micro_batch_size must be a whole number >= 1 \(got 0\)$"),
    ({"micro_batch_size": 1.5}, r"^micro_batch_size must be a whole number >= 1 \(got 1.5\)$"),
])
@pytest.mark.parametrize("cls", [SFT, DPO])
def test_agent_numbers_of_the_wrong_type_or_range_are_named(tokenizer, tiny_model, cls, kwargs, pattern):
    with pytest.raises(UserError, match=pattern) as err:
        _agent(cls, tokenizer, tiny_model, **kwargs)
    _one_line(err)
    assert isinstance(err.value, ValueError)   # what these constructors raised before


@pytest.mark.parametrize("kwargs, pattern", [
    ({"beta": "0.1"}, r"^beta must be a finite number \(got '0.1'\)$"),
    ({"beta": 0}, r"^beta must be > 0 and finite \(got 0\)$"),
    ({"nll_alpha": -1.0}, r"^nll_alpha must be >= 0 and finite \(got -1.0\)$"),
    ({"label_smoothing": 0.7}, r"^label_smoothing must be in \[0, 0.5\) \(got 0.7\)$"),
    ({"simpo_gamma": None}, r"^simpo_gamma must be a finite number \(got None\)$"),
    ({"loss_type": "nope"}, r"^loss_type must be one of sigmoid, .* \(got 'nope'\)$"),
    ({"simpo_gamma": 1.0}, r"^simpo_gamma applies to loss_type='simpo' only \(got loss_type='sigmoid', simpo_gamma=1.0\)$"),
    ({"simpo_gamma": 1.0, "loss_type": "ipo"}, r"^simpo_gamma applies to loss_type='simpo' only \(got loss_type='ipo'"),
    ({"loss_type": ["sigmoid"]}, r"^loss_type must be one of sigmoid, .* \(got \['sigmoid'\]\)$"),
])
def test_dpo_loss_options_are_named(tokenizer, tiny_model, kwargs, pattern):
    with pytest.raises(UserError, match=pattern) as err:
        _agent(DPO, tokenizer, tiny_model, **kwargs)
    _one_line(err)


def test_simpo_takes_its_gamma(tokenizer, tiny_model):
    assert _agent(DPO, tokenizer, tiny_model, loss_type="simpo", simpo_gamma=1.0).objective.simpo_gamma == 1.0


def test_numpy_numbers_and_a_micro_batch_that_does_not_divide_the_batch_train(tokenizer, tiny_model, rows):
    agent = _agent(SFT, tokenizer, tiny_model, batch_size=np.int64(4), micro_batch_size=np.int32(3),
                   lr=np.float32(1e-3), update_epochs=np.int64(1))
    assert (agent.batch_size, agent.micro_batch_size, agent.update_epochs) == (4, 3, 1)
    assert type(agent.batch_size) is type(agent.micro_batch_size) is int and type(agent.lr) is float
    metrics = agent.learn(SFTGym(rows, None, tokenizer, data_batch_size_per_gpu=4).reset())
    assert np.isfinite(metrics["loss"])


# --- agents: lora_config, batches, checkpoints -------------------------------------------------------


def test_lora_config_may_be_a_dict(tokenizer, tiny_model):
    agent = _agent(SFT, tokenizer, tiny_model, lora_config={"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
    config = agent.model.peft_config["default"]
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (2, 4, {"q_proj"})


@pytest.mark.parametrize("lora, pattern", [
    ({"r": 4, "nope": 1}, r"^lora_config is not a valid peft.LoraConfig: .*unexpected keyword argument 'nope'$"),
    ("r=4", r"^lora_config must be a peft.LoraConfig or a dict of its fields \(got str\)$"),
    ({"r": 0}, r"^lora_config r must be a whole number >= 1 \(got 0\)$"),
    ({"r": "4"}, r"^lora_config r must be a whole number >= 1 \(got '4'\)$"),
    ({"r": 4, "lora_alpha": "16"}, r"^lora_config lora_alpha must be a number > 0 \(got '16'\)$"),
    ({"r": 4, "lora_dropout": 1.5}, r"^lora_config lora_dropout must be a number >= 0 and <= 1 \(got 1.5\)$"),
    ({"r": 4, "lora_dropout": 1.0}, r"^lora_config lora_dropout must be below 1 \(got 1\)$"),
    ({"r": 4, "target_modules": "q_proj"}, r"the pattern 'q_proj' matches no module name of the model \(a text is a "
                                           r"pattern over whole module names; give a list such as \[\"q_proj\"\]"),
])
def test_a_bad_lora_config_is_named(tokenizer, tiny_model, lora, pattern):
    with pytest.raises(UserError, match=pattern) as err:
        _agent(SFT, tokenizer, tiny_model, lora_config=lora)
    _one_line(err)


@pytest.fixture
def sft_agent(tokenizer, tiny_model):
    return _agent(SFT, tokenizer, tiny_model, batch_size=2)


@pytest.mark.parametrize("batch, got", [
    ({"x": 1}, "a dict without the tensor(s) input_ids, attention_mask, labels"),
    ({"input_ids": [[1, 2]], "attention_mask": [[1, 1]], "labels": [[1, 2]]},
     "a dict without the tensor(s) input_ids, attention_mask, labels"),
    ([1, 2], "a list"),
])
def test_learn_names_the_keys_a_batch_needs(sft_agent, batch, got):
    needle = f"batch must be a dict of the tensors input_ids, attention_mask, labels, as SFTGym.reset() and step() " \
             f"return (got {got})"
    with pytest.raises(UserError, match=re.escape(needle)) as err:
        sft_agent.learn(batch)
    assert _one_line(err) == needle


def test_dpo_learn_names_example_ids(tokenizer, tiny_model, rows):
    agent = _agent(DPO, tokenizer, tiny_model, batch_size=2)
    sft_batch = SFTGym(rows, None, tokenizer, data_batch_size_per_gpu=2).reset()
    with pytest.raises(UserError, match=re.escape("batch must be a dict of the tensors input_ids, attention_mask, "
                                                  "labels, example_ids, as PreferenceGym.reset() and step() return "
                                                  "(got a dict without the tensor(s) example_ids)")):
        agent.learn(sft_batch)


def test_save_checkpoint_names_a_path_that_cannot_be_a_folder(sft_agent, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for path in (file, file / "run"):
        with pytest.raises(UserError, match=re.escape(f"checkpoint path {path} cannot be written: {file} is a file, "
                                                      "not a folder")) as err:
            sft_agent.save_checkpoint(path)
        _one_line(err)
    assert file.read_text() == "mine"
    with pytest.raises(UserError, match=r"^checkpoint path /proc/alignkit-no-such-run cannot be written: \S"):
        sft_agent.save_checkpoint("/proc/alignkit-no-such-run")


# --- agents: the other kind of batch or gym, several agents on one base, checkpoints that do not fit --------


def test_an_sft_agent_refuses_preference_batches_and_gyms(sft_agent, tokenizer, tiny_model, rows):
    preference = PreferenceGym(rows, rows[:2], tokenizer, data_batch_size_per_gpu=2)
    with pytest.raises(UserError) as err:   # it would learn the rejected answers too
        sft_agent.learn(preference.reset())
    assert _one_line(err) == ("batch must be a dict of the tensors input_ids, attention_mask, labels, as "
                              "SFTGym.reset() and step() return (got a PreferenceGym batch)")
    for env, got in ((preference, "a PreferenceGym"), (None, "None"), ("rows", "a str")):
        with pytest.raises(UserError) as err:
            sft_agent.test(env)
        assert _one_line(err) == f"env must be a SFTGym, whose test split SFT scores (got {got})"
    dpo = _agent(DPO, tokenizer, tiny_model.__class__(tiny_model.config), batch_size=2)
    with pytest.raises(UserError) as err:
        dpo.test(SFTGym(rows, rows[:2], tokenizer, data_batch_size_per_gpu=2))
    assert _one_line(err) == "env must be a PreferenceGym, whose test split DPO scores (got a SFTGym)"


def test_a_second_agent_on_an_agents_base_model_is_refused_and_one_on_its_peft_model_trains_apart(
        tokenizer, tiny_model, rows):
    first = _agent(SFT, tokenizer, tiny_model, batch_size=2, lr=1e-2)
    with pytest.raises(UserError) as err:   # wrapping the base again would replace the first agent's adapter
        _agent(SFT, tokenizer, tiny_model, batch_size=2)
    assert _one_line(err).startswith("the model already carries LoRA adapters (another agent was built on it)")
    second = _agent(SFT, tokenizer, first.model, batch_size=2, lr=1e-2, adapter_name="second")
    assert first.model.active_adapter == "second"
    before = {n: p.detach().clone() for n, p in zip(range(len(first.params)), first.params, strict=True)}
    batch = SFTGym(rows, None, tokenizer, data_batch_size_per_gpu=2).reset()
    first.learn(batch)   # activates its own adapter first: its weights move, the second's do not
    assert first.model.active_adapter == "default"
    assert any(not torch.equal(before[i], p) for i, p in enumerate(first.params))
    untouched = [p.detach().clone() for p in second.params]
    first.learn(batch)
    assert all(torch.equal(a, b) for a, b in zip(untouched, second.params, strict=True))


def test_extra_state_that_is_not_json_leaves_the_checkpoint_there(sft_agent, tokenizer, rows, tmp_path):
    from alignkit.checkpoints import read_state

    sft_agent.save_checkpoint(tmp_path / "ck", extra_state={"note": 1})
    sft_agent.learn(SFTGym(rows, None, tokenizer, data_batch_size_per_gpu=2).reset())
    for bad, kind in (({1, 2}, "set"), (torch.tensor([1.0]), "Tensor")):
        with pytest.raises(UserError) as err:
            sft_agent.save_checkpoint(tmp_path / "ck", extra_state={"bad": bad})
        assert _one_line(err) == (f"extra_state must hold JSON values (numbers, text, true/false, lists, dicts): a "
                                  f"{kind} is not a JSON value; nothing was written")
    assert read_state(tmp_path / "ck")["steps"] == 0 and read_state(tmp_path / "ck")["extra"] == {"note": 1}
    sft_agent.save_checkpoint(tmp_path / "ck", extra_state={"n": np.int64(3), "x": np.float32(0.5)})
    assert read_state(tmp_path / "ck")["extra"] == {"n": 3, "x": 0.5}


@pytest.mark.parametrize("lora, differ", [
    ({"r": 8, "lora_alpha": 16}, r"\(\S+lora_A.weight: \(4, \d+\) saved, \(8, \d+\) here\)"),
    ({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, r"\(\d+ adapter tensors saved, \d+ in this agent's"),
    ({"r": 4, "lora_alpha": 16}, r"\(lora_alpha 8 saved, 16 here\)"),
])
def test_a_checkpoint_of_another_adapter_shape_is_named_and_changes_nothing(sft_agent, tokenizer, tiny_model,
                                                                          tmp_path, lora, differ):
    sft_agent.save_checkpoint(tmp_path / "ck")
    other = _agent(SFT, tokenizer, tiny_model.__class__(tiny_model.config), batch_size=2,
                   lora_config={"lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], **lora})
    before = [p.detach().clone() for p in other.params]
    rng = torch.get_rng_state()
    with pytest.raises(UserError, match=rf"^the checkpoint {re.escape(str(tmp_path / 'ck'))} holds an adapter of "
                                        rf"another shape than this agent's {differ}") as err:
        other.load_checkpoint(tmp_path / "ck")
    assert _one_line(err).endswith(f"build the agent with the LoRA settings of {tmp_path / 'ck/actor/adapter_config.json'}")
    assert all(torch.equal(a, b) for a, b in zip(before, other.params, strict=True))
    assert torch.equal(rng, torch.get_rng_state()) and other.steps == 0


def test_a_checkpoint_of_another_algorithm_is_refused_and_changes_nothing(sft_agent, tokenizer, tiny_model, tmp_path):
    sft_agent.save_checkpoint(tmp_path / "ck")
    dpo = _agent(DPO, tokenizer, tiny_model.__class__(tiny_model.config), batch_size=2, lr=1e-6)
    before = [p.detach().clone() for p in dpo.params]
    with pytest.raises(UserError) as err:
        dpo.load_checkpoint(tmp_path / "ck")   # SFT's moments, schedule and rate would go on as DPO's
    assert _one_line(err) == (f"the checkpoint {tmp_path / 'ck'} was written by SFT, not DPO: load_checkpoint continues "
                              f"a run of the same algorithm; to start DPO from its adapter, load {tmp_path / 'ck/actor'} "
                              "with alignkit.adapters.load_adapter (a warm start, as the README shows)")
    assert all(torch.equal(a, b) for a, b in zip(before, dpo.params, strict=True))
    assert dpo.steps == 0 and dpo.optimizer.param_groups[0]["lr"] <= 1e-6
    again = _agent(SFT, tokenizer, tiny_model.__class__(tiny_model.config), batch_size=2)
    assert again.load_checkpoint(tmp_path / "ck") == {}   # the same algorithm loads


def test_make_dataset_takes_a_column_map_as_a_dict(tmp_path):
    import json

    from alignkit import ColumnMap, make_dataset

    data = tmp_path / "mapped.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q{i}?", "good": f"yes {i}", "bad": f"no {i}"}) + "\n"
                            for i in range(6)))
    as_dict = make_dataset(data, test_size=2, column_map={"prompt": "question", "chosen": "good", "rejected": "bad"})
    as_map = make_dataset(data, test_size=2, column_map=ColumnMap(prompt="question", chosen="good", rejected="bad"))
    assert as_dict[0].to_list() == as_map[0].to_list() and as_dict[0][0]["prompt"].startswith("Q")
    for bad, needle in (({"question": "prompt"}, "column_map maps parts (prompt, response, chosen, rejected, "
                                                 "messages, system) to column names (got {'question': 'prompt'})"),
                        ("question", "column_map must be an alignkit.ColumnMap or a dict of {part: column} (got str)")):
        with pytest.raises(UserError) as err:
            make_dataset(data, column_map=bad)
        assert _one_line(err) == needle


@pytest.mark.parametrize("pattern, needle", [
    (r".*(q_proj|lm_head)", "lm_head is the output layer"),   # an adapter there would never train
    (r".*mlp", "model.layers.0.mlp is not a linear layer (it is LlamaMLP)"),
    (r"nothing", "the pattern 'nothing' matches no module name of the model"),
])
def test_a_lora_target_pattern_is_checked_like_a_list(tokenizer, tiny_model, pattern, needle):
    with pytest.raises(UserError, match=re.escape(needle)) as err:
        _agent(SFT, tokenizer, tiny_model, lora_config={"r": 2, "target_modules": pattern})
    _one_line(err)
    agent = _agent(SFT, tokenizer, tiny_model, lora_config={"r": 2, "target_modules": r".*\.(q_proj|v_proj)"})
    assert {n.split(".lora_A")[0].rsplit(".", 1)[1] for n in dict(agent.model.named_parameters()) if "lora_A" in n} \
        == {"q_proj", "v_proj"}


@pytest.mark.parametrize("row, column, problem", [
    ({"prompt": "hi", "completion": None}, "completion", "nothing"),
    ({"prompt": "hi", "completion": 5}, "completion", "a number"),
    ({"prompt": "  ", "completion": "yes"}, "prompt", "an empty value"),
    ({"prompt": "caf\udce9", "completion": "yes"}, "prompt", "text that is not valid Unicode (a lone surrogate)"),
    ({"messages": "hello"}, "messages", "text"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "messages", "a list that is not messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]}, "messages",
     "a list that is not messages"),
    # ShareGPT's speakers and capitalised roles: the template would write them as given, and only
    # "assistant" turns are learned from (make_dataset maps them)
    ({"messages": [{"role": "human", "content": "q"}, {"role": "gpt", "content": "a"}]}, "messages",
     "a message with the role 'human' (roles: system, user, assistant)"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "Assistant", "content": "a"}]}, "messages",
     "a message with the role 'Assistant' (roles: system, user, assistant)"),
])
def test_a_row_value_a_gym_cannot_encode_is_named_with_its_row(tokenizer, rows, row, column, problem):
    good = {"prompt": "fine", "completion": "yes"} if "prompt" in row else \
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(UserError) as err:
        SFTGym([good, row], None, tokenizer)
    assert _one_line(err) == (f"train_dataset row 2: {column} holds {problem}, where text or a list of {{role, "
                              "content} messages with text content is needed (make_dataset reads more shapes and role "
                              "names, and drops unusable rows with a count)")


@pytest.mark.parametrize("size", [0, -1, "x", 2.5])
def test_test_batch_size_is_checked(sft_agent, tokenizer, rows, size):
    with pytest.raises(UserError, match=rf"^batch_size must be a whole number >= 1 \(got {re.escape(repr(size))}\)$"):
        sft_agent.test(SFTGym(rows, rows[:2], tokenizer), batch_size=size)


def test_make_dataset_checks_its_task_and_source_before_reading_and_takes_numpy_seeds(monkeypatch):
    from alignkit import make_dataset

    monkeypatch.setattr("alignkit.data.usable_rows", lambda *a, **k: pytest.fail("read the data first"))
    for kwargs, needle in ((dict(task="dpo"), "task must be one of sft, preference (got 'dpo')"),
                           (dict(name_or_path=[{"prompt": "q"}]), "name_or_path must be a file path, a bundled set's "
                                                                  "name or a hub id (got list)")):
        with pytest.raises(UserError, match=re.escape(needle)) as err:
            make_dataset(**kwargs)
        _one_line(err)
    monkeypatch.undo()
    train, test = make_dataset(seed=np.int64(3))
    assert train.to_list() == make_dataset(seed=3)[0].to_list()


def test_a_model_tokenizer_or_accelerator_of_the_wrong_kind_is_named(tokenizer, tiny_model, rows):
    for make, needle in (
            (lambda: _agent(SFT, tokenizer, None), "actor_network must be a causal language model, e.g. load_model()'s "
                                                   "(got NoneType)"),
            (lambda: _agent(SFT, tokenizer, tiny_model, accelerator="cpu"), "accelerator must be an "
             "accelerate.Accelerator or None (got 'cpu'); the device is the model's: load_model(device=...)"),
            (lambda: SFTGym(rows, None, None), "tokenizer must be a transformers tokenizer, e.g. load_tokenizer()'s "
                                               "(got NoneType)"),
            (lambda: PreferenceGym(rows, None, tokenizer, accelerator="cuda"), "accelerator must be an "
             "accelerate.Accelerator or None (got 'cuda')")):
        with pytest.raises(UserError, match=re.escape(needle)) as err:
            make()
        _one_line(err)


@pytest.mark.parametrize("cls, gym_cls", [(SFT, SFTGym), (DPO, PreferenceGym)])
def test_token_ids_outside_the_models_vocabulary_are_named(tokenizer, tiny_model, rows, cls, gym_cls):
    """A gym built with another model's tokenizer: learn() and test() name the id and the vocabulary."""
    agent = _agent(cls, tokenizer, tiny_model.__class__(tiny_model.config), batch_size=2)
    vocab = agent.model.get_input_embeddings().num_embeddings
    gym = gym_cls(rows, rows, tokenizer, data_batch_size_per_gpu=2)
    batch = gym.reset()
    key = next(k for k in batch if k.endswith("input_ids"))
    batch[key][0, 1] = vocab   # the first id past the vocabulary
    before = [p.detach().clone() for p in agent.params]
    with pytest.raises(UserError) as err:
        agent.learn(batch)
    assert _one_line(err) == (f"batch {key} holds token id {vocab}, outside the model's vocabulary of {vocab}: the "
                              "gym's tokenizer is not this model's (build the gym with the tokenizer of the model the "
                              "agent trains)")
    assert all(torch.equal(a, b) for a, b in zip(before, agent.params, strict=True)) and agent.steps == 0
    batches = gym.test_batches

    def shifted(size):
        for b in batches(size):
            yield {k: v - vocab if k == key else v for k, v in b.items()}   # ids below 0
    gym.test_batches = shifted
    with pytest.raises(UserError, match=rf"^batch {key} holds token id -\d+, outside the model's vocabulary of {vocab}"):
        agent.test(gym)
