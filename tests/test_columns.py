"""Columns: the user's names for the parts a shape reads (flags, YAML keys, the API's ColumnMap), and
the columns a shape does not read."""

from __future__ import annotations

import pytest
from conftest import SHORT, bot, user, write_jsonl

from alignkit.cli import main
from alignkit.columns import ColumnMap, unread_columns
from alignkit.data import make_dataset
from alignkit.errors import UserError


def test_column_mapping(tmp_path):
    rows = [{"question": f"q{i}", "good": "yes!", "bad": "No.", "prompt": "ignored"} for i in range(4)]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    cmap = ColumnMap(prompt="question", chosen="good", rejected="bad")
    train, test = make_dataset(path, test_size=1, column_map=cmap)
    assert {r["prompt"] for r in train.to_list() + test.to_list()} == {"q0", "q1", "q2", "q3"}
    train, _ = make_dataset(path, test_size=1, task="sft", column_map=ColumnMap(prompt="question", response="good"))
    assert train[0]["completion"] == "yes!"
    convo = [{"dialog": [user(f"a{i}"), bot("b")]} for i in range(3)]
    train, _ = make_dataset(write_jsonl(tmp_path / "c.jsonl", convo), test_size=1, task="sft",
                            column_map=ColumnMap(messages="dialog"))
    assert train[0]["messages"][1] == bot("b")
    with pytest.raises(UserError, match=r"no column 'best' \(--chosen-column\); its columns are: question, "
                                        r"good, bad, prompt"):
        make_dataset(path, column_map=ColumnMap(chosen="best"))


def test_column_flags_and_yaml_keys(tmp_path, tiny_model_dir, capsys):
    rows = [{"question": f"q{i}", "good": "yes!", "bad": "No."} for i in range(6)]
    data = write_jsonl(tmp_path / "m.jsonl", rows)
    base = [*SHORT, "--model", str(tiny_model_dir), "--dataset", str(data), "--no-timestamp"]
    assert main(["dpo", *base, "--save-path", str(tmp_path / "a"), "--prompt-column", "question",
                 "--chosen-column", "good", "--rejected-column", "bad"]) == 0
    config = tmp_path / "c.yaml"
    config.write_text("prompt_column: question\nresponse-column: good\n")
    assert main(["sft", *base, "--save-path", str(tmp_path / "b"), "--config", str(config)]) == 0
    assert main(["sft", *base, "--save-path", str(tmp_path / "c"), "--prompt-column", "nope"]) == 2
    assert "no column 'nope' (--prompt-column); its columns are: question, good, bad" in capsys.readouterr().err
    assert main(["dpo", *base, "--save-path", str(tmp_path / "d"), "--response-column", "good"]) == 2
    assert "--response-column and --messages-column are for SFT data" in capsys.readouterr().err


def test_columns_the_shape_does_not_read_are_named_and_mapping_hints(tmp_path):
    assert unread_columns(["prompt", "input", "chosen", "rejected", "system"], "standard") == ["input"]
    assert unread_columns(["instruction", "input", "output"], "alpaca") == []
    (tmp_path / "m.csv").write_text('messages\n"[{""role"": ""user"", ""content"": ""Hi""}]"\n')
    with pytest.raises(UserError, match="CSV cells are always text: keep message lists in a .jsonl"):
        make_dataset(tmp_path / "m.csv", task="sft")
