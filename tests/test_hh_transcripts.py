"""Anthropic HH-RLHF transcripts ("Human: ... Assistant: ..." text) read as conversations: the shared
turns become the prompt, the last answers the pair, in either line-break style."""

from __future__ import annotations

from conftest import bot, by_answer, user, write_jsonl

from alignkit.data import make_dataset
from alignkit.gyms import IGNORE_INDEX, PreferenceGym


def _hh(*turns):
    return "".join(f"\n\n{role}: {text}" for role, text in turns)


def test_hh_transcripts_become_messages_with_the_shared_turns_as_prompt(tmp_path, tokenizer, caplog):
    import logging

    head = [("Human", "Plans?"), ("Assistant", "Hiking! You?"), ("Human", "Same. Tips?")]
    rows = [{"chosen": _hh(*head, ("Assistant", "Bring water.")), "rejected": _hh(*head, ("Assistant", "No."))},
            {"chosen": _hh(("Human", "Hi"), ("Assistant", "Hey!")), "rejected": _hh(("Human", "Hi"), ("Assistant", "Go."))},
            # a broken transcript (no final answer), as HH-RLHF has a few: dropped and counted
            {"chosen": _hh(("Human", "Yo"), ("Assistant", "Hey"), ("Human", "Bye")), "rejected": _hh(("Human", "Yo"))}]
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        train, test = make_dataset(write_jsonl(tmp_path / "hh.jsonl", rows), test_size=1)
    assert "dropped 1 of 3 rows (1 with a transcript that is no preference pair" in caplog.text
    by = by_answer(train) | by_answer(test)
    assert by["Bring water."] == {"prompt": [user("Plans?"), bot("Hiking! You?"), user("Same. Tips?")],
                                  "chosen": [bot("Bring water.")], "rejected": [bot("No.")]}
    gym = PreferenceGym(train, test, tokenizer, max_context_length=256)
    pair = next(p for p in gym.train_examples + gym.test_examples
                if "Bring water." in tokenizer.decode(p.chosen.input_ids))
    learned = [t for t in pair.chosen.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "Bring water.<|im_end|>"   # only the final answer, no "Assistant:" marker
    assert "Human:" not in tokenizer.decode(pair.chosen.input_ids)

    # SFT on chosen transcripts alone: every assistant turn is learned.
    sft = [{"chosen": _hh(*head, ("Assistant", f"Bring water {i}."))} for i in range(2)]
    train, test = make_dataset(write_jsonl(tmp_path / "hh_sft.jsonl", sft), test_size=1, task="sft")
    assert [m["role"] for m in train[0]["messages"]] == ["user", "assistant", "user", "assistant"]


def test_hh_transcripts_with_line_breaks_between_turns(tmp_path):
    # some copies of HH-RLHF put one line break, not a blank line, before each turn
    def lines(*turns):
        return "".join(f"\n{role}: {text}" for role, text in turns)

    head = [("Human", "Plans?\nSay more."), ("Assistant", "Hiking! You?"), ("Human", "Same. Tips?")]
    rows = [{"chosen": lines(*head, ("Assistant", f"Water {i}.")), "rejected": lines(*head, ("Assistant", f"No {i}."))}
            for i in range(2)]
    train, test = make_dataset(write_jsonl(tmp_path / "hh1.jsonl", rows), test_size=1)
    by = by_answer(train) | by_answer(test)
    assert by["Water 0."] == {"prompt": [user("Plans?\nSay more."), bot("Hiking! You?"), user("Same. Tips?")],
                              "chosen": [bot("Water 0.")], "rejected": [bot("No 0.")]}
    prompts = [{"prompt": lines(("Human", f"Q{i}?"), ("Assistant", "")), "chosen": f"Good {i}.", "rejected": f"Bad {i}."}
               for i in range(2)]
    train, test = make_dataset(write_jsonl(tmp_path / "hh1p.jsonl", prompts), test_size=1)
    assert sorted(r["prompt"][0]["content"] for r in list(train) + list(test)) == ["Q0?", "Q1?"]
    # a transcript with blank lines before its turns keeps line breaks inside a turn as text
    blank = [{"chosen": _hh(("Human", f"Q{i}\nAssistant: quoted"), ("Assistant", "A")),
              "rejected": _hh(("Human", f"Q{i}\nAssistant: quoted"), ("Assistant", "B"))} for i in range(2)]
    train, test = make_dataset(write_jsonl(tmp_path / "hh2.jsonl", blank), test_size=1)
    assert sorted(r["prompt"][0]["content"] for r in list(train) + list(test)) == [
        "Q0\nAssistant: quoted", "Q1\nAssistant: quoted"]


def test_hh_prompt_transcripts_with_text_answers(tmp_path):
    rows = [{"prompt": _hh(("Human", f"Q{i}?"), ("Assistant", "")), "chosen": f" Good {i}.", "rejected": f" Bad {i}."}
            for i in range(2)]
    train, test = make_dataset(write_jsonl(tmp_path / "hhp.jsonl", rows), test_size=1)
    for row in list(train) + list(test):
        i = row["prompt"][0]["content"][1:-1]
        assert row == {"prompt": [user(f"Q{i}?")], "chosen": [bot(f"Good {i}.")], "rejected": [bot(f"Bad {i}.")]}
    # Beside plain prompts, a prompt that quotes a dialogue is text as written; so is every prompt under
    # --format standard.
    mixed = [rows[0], {"prompt": "Q", "chosen": "A", "rejected": "B"}]
    train, test = make_dataset(write_jsonl(tmp_path / "mixed.jsonl", mixed), test_size=1)
    assert sorted(r["prompt"] for r in list(train) + list(test)) == sorted(r["prompt"] for r in mixed)
    train, test = make_dataset(write_jsonl(tmp_path / "std.jsonl", rows), test_size=1, format="standard")
    assert sorted(r["prompt"] for r in list(train) + list(test)) == sorted(r["prompt"] for r in rows)
