"""Dataset shapes users have: conversations, multi-turn SFT masks, implicit prompts, ShareGPT,
Alpaca and chat templates, through `make_dataset`, the gyms and the command line (HH transcripts:
test_hh_transcripts.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import SHORT, bot, by_answer, user, write_jsonl

from alignkit.cli import main
from alignkit.columns import ColumnMap
from alignkit.data import BUNDLED_CHAT_DATASET, make_dataset
from alignkit.errors import UserError
from alignkit.forward import sequence_logps
from alignkit.gyms import IGNORE_INDEX, PreferenceGym, SFTGym, encode_messages

SYSTEM = {"role": "system", "content": "Be brief."}


THREE_TURNS = [SYSTEM, user("Hi there!"), bot("Hey! How are you?"), user("Tired."), bot("Long day?"),
               user("Very."), bot("Rest up, friend.")]


def spans(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of learned positions."""
    out, start = [], None
    for i, t in enumerate(labels + [IGNORE_INDEX]):
        if t != IGNORE_INDEX and start is None:
            start = i
        elif t == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


# --- masks, token by token -----------------------------------------------------------------------


def test_three_turn_mask_with_the_embedded_template(tokenizer):
    enc, merged = encode_messages(tokenizer, THREE_TURNS)
    ids, labels = enc.input_ids, enc.labels
    assert not merged
    # The tokens are the template's rendering of the whole conversation, without the newline that
    # follows the last end-of-turn token.
    rendered = tokenizer.apply_chat_template(THREE_TURNS, tokenize=False)
    assert rendered.endswith("<|im_end|>\n")
    assert ids == tokenizer(rendered[:-1], add_special_tokens=False)["input_ids"]
    # Exactly the three answers are learned, each with its end-of-turn token; nothing else.
    learned = [tokenizer.decode(ids[a:b]) for a, b in spans(labels)]
    assert learned == ["Hey! How are you?<|im_end|>", "Long day?<|im_end|>", "Rest up, friend.<|im_end|>"]
    for a, b in spans(labels):
        assert labels[a:b] == ids[a:b]
        assert tokenizer.decode(ids[:a]).endswith("<|im_start|>assistant\n")   # the header is context
    # The prompt is everything before the first answer: system and first user turn.
    assert tokenizer.decode(enc.prompt_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n")
    between = tokenizer.decode(ids[spans(labels)[0][1]:spans(labels)[1][0]])
    assert between == "\n<|im_start|>user\nTired.<|im_end|>\n<|im_start|>assistant\n"


def test_answers_marked_weight_0_are_context_not_learned(tokenizer, tmp_path):
    # OpenAI's chat fine-tuning format: "weight": 0 on an assistant message keeps it out of the loss
    rows = [{"messages": [SYSTEM, user(f"Hi {i}!"), {**bot("A draft."), "weight": 0}, user("Again?"),
                          {**bot(f"Better {i}."), "weight": 1}]} for i in range(3)]
    train, test = make_dataset(write_jsonl(tmp_path / "openai.jsonl", rows), task="sft", test_size=1)
    gym = SFTGym(train, test, tokenizer, data_batch_size_per_gpu=1, max_context_length=256)
    for example in gym.train_examples + gym.test_examples:
        ids, labels = example.input_ids, example.labels
        learned = [tokenizer.decode(ids[a:b]) for a, b in spans(labels)]
        assert len(learned) == 1 and learned[0].startswith("Better") and "A draft." in tokenizer.decode(ids)
    for bad, needle in (({**bot("x"), "weight": 2}, "row 1: messages message 2 has the weight 2, where 0 (not "
                                                    "learned) or 1 is needed"),
                        ({**bot("x"), "weight": 0}, "row 1: every assistant turn of the conversation has weight 0")):
        with pytest.raises(UserError, match=re.escape(needle)):
            make_dataset(write_jsonl(tmp_path / "bad.jsonl", [{"messages": [user("q"), bad]}] * 2), task="sft",
                         test_size=1)


def test_three_turn_mask_without_a_template(plain_tokenizer):
    tok = plain_tokenizer
    enc, _ = encode_messages(tok, THREE_TURNS)
    ids, labels = enc.input_ids, enc.labels
    # The documented fallback: system/user text + newline, assistant text + EOS.
    expected_text = "Be brief.\nHi there!\nHey! How are you?<|im_end|>Tired.\nLong day?<|im_end|>Very.\n" \
                    "Rest up, friend.<|im_end|>"
    assert tok.decode(ids) == expected_text
    learned = [tok.decode(ids[a:b]) for a, b in spans(labels)]
    assert learned == ["Hey! How are you?<|im_end|>", "Long day?<|im_end|>", "Rest up, friend.<|im_end|>"]
    assert tok.decode(enc.prompt_ids) == "Be brief.\nHi there!\n"


def test_one_turn_messages_encode_like_prompt_and_response(tokenizer, rows):
    gym_text = SFTGym(rows, None, tokenizer, data_batch_size_per_gpu=2, max_context_length=128)
    convo = [{"messages": [user(r["prompt"]), bot(r["chosen"])]} for r in rows]
    gym_msgs = SFTGym(convo, None, tokenizer, data_batch_size_per_gpu=2, max_context_length=128)
    assert [e.input_ids for e in gym_text.train_examples] == [e.input_ids for e in gym_msgs.train_examples]
    assert [e.labels for e in gym_text.train_examples] == [e.labels for e in gym_msgs.train_examples]


def test_truncation_keeps_the_mask_aligned(tokenizer):
    full, _ = encode_messages(tokenizer, THREE_TURNS)
    gym = SFTGym([{"messages": THREE_TURNS}], None, tokenizer, max_context_length=len(full.input_ids) - 3)
    (cut,) = gym.train_examples
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]


# --- preference conversations ------------------------------------------------------------------------


def test_multi_turn_preference_shares_the_prompt_and_its_forward(tokenizer, make_model):
    prompt = [SYSTEM, user("I burnt the toast."), bot("Oh no! Again?"), user("Yes, third time.")]
    rows = [{"prompt": prompt, "chosen": [bot("Ha, the toaster has it out for you.")],
             "rejected": [bot("Toasting requires attention.")]},
            {"prompt": prompt[1:], "chosen": [bot("Scrape it!"), user("And then?"), bot("Add jam, good as new!")],
             "rejected": [bot("Discard the item.")]}]
    gym = PreferenceGym(rows, None, tokenizer, data_batch_size_per_gpu=2, max_context_length=160)
    for pair in gym.train_examples:
        assert pair.chosen.prompt_ids == pair.rejected.prompt_ids
        # the earlier assistant turn is part of the prompt: not learned
        assert tokenizer.decode(pair.chosen.prompt_ids).count("<|im_start|>assistant") == 2
    long_chosen = max((p.chosen for p in gym.train_examples), key=lambda e: len(e.response_ids))
    learned = [tokenizer.decode(long_chosen.input_ids[a:b]) for a, b in spans(long_chosen.labels)]
    assert learned == ["Scrape it!<|im_end|>", "Add jam, good as new!<|im_end|>"]
    batch = gym.reset()
    model = make_model()
    with torch.no_grad():
        plain = sequence_logps(model, batch, packed=False)
        shared = sequence_logps(model, batch, packed=True, shared_prompts=2)
    torch.testing.assert_close(shared[0], plain[0], atol=1e-4, rtol=0)
    assert shared[1].tolist() == plain[1].tolist()


def test_implicit_prompt_is_the_shared_prefix(tmp_path):
    rows = [{"chosen": [user(f"q{i}"), bot("a"), user("more?"), bot(f"yes {i}!")],
             "rejected": [user(f"q{i}"), bot("a"), user("more?"), bot(f"No. {i}")]} for i in range(4)]
    train, test = make_dataset(write_jsonl(tmp_path / "implicit.jsonl", rows), test_size=1)
    row = sorted(train.to_list() + test.to_list(), key=lambda r: r["prompt"][0]["content"])[0]
    assert row == {"prompt": [user("q0"), bot("a"), user("more?")], "chosen": [bot("yes 0!")],
                   "rejected": [bot("No. 0")]}


def test_speaker_names_written_as_roles_are_read_as_the_roles_they_mean(tmp_path):
    # Gemini's "model", ShareGPT's "human"/"gpt" in {role, content} turns, any case
    rows = [{"messages": [{"role": "system", "content": "Be kind."}, {"role": "Human", "content": f"q{i}"},
                          {"role": "model", "content": f"a{i}"}, {"role": "human", "content": "more?"},
                          {"role": "GPT", "content": f"yes {i}"}]} for i in range(3)]
    train, test = make_dataset(write_jsonl(tmp_path / "roles.jsonl", rows), task="sft", test_size=1)
    row = sorted(train.to_list() + test.to_list(), key=lambda r: str(r))[0]
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "user", "assistant"]


def test_numbers_in_text_are_read_as_text_as_a_csv_file_holds_them(tmp_path):
    rows = [{"prompt": f"What is {i} + {i}?", "completion": 2 * i} for i in range(3)]
    train, test = make_dataset(write_jsonl(tmp_path / "numbers.jsonl", rows), task="sft", test_size=1)
    assert sorted(list(train["completion"]) + list(test["completion"])) == ["0", "2", "4"]
    rows = [{"messages": [{"role": "user", "content": f"Half of {n}?"}, {"role": "assistant", "content": n / 2}]}
            for n in (5, 7)]
    train, test = make_dataset(write_jsonl(tmp_path / "messages.jsonl", rows), task="sft", test_size=1)
    assert sorted(r["messages"][1]["content"] for r in train.to_list() + test.to_list()) == ["2.5", "3.5"]


def test_an_opening_assistant_turn_is_context_not_learned(tokenizer, tmp_path):
    convo = [bot("Hi, I am your helper."), user("Hello!"), bot("How can I help?")]
    enc, _ = encode_messages(tokenizer, convo)
    ids, labels = enc.input_ids, enc.labels
    assert [tokenizer.decode(ids[a:b]) for a, b in spans(labels)] == ["How can I help?<|im_end|>"]
    assert "Hi, I am your helper." in tokenizer.decode(enc.prompt_ids)
    alone = [{"messages": [bot(f"Hi {i}."), user("Bye.")]} for i in range(3)]
    with pytest.raises(UserError, match="row 1: the conversation's only assistant turn opens it"):
        make_dataset(write_jsonl(tmp_path / "alone.jsonl", alone), task="sft")


def test_sft_on_implicit_prompt_rows_learns_the_chosen_answer(tmp_path):
    rows = [{"chosen": [SYSTEM, user(f"q{i}"), bot(f"yes {i}!")], "rejected": [SYSTEM, user(f"q{i}"), bot("No.")]}
            for i in range(4)]
    train, test = make_dataset(write_jsonl(tmp_path / "implicit.jsonl", rows), test_size=1, task="sft")
    row = sorted(train.to_list() + test.to_list(), key=lambda r: r["prompt"][1]["content"])[0]
    assert row == {"prompt": [SYSTEM, user("q0")], "completion": [bot("yes 0!")]}


def test_pairs_that_are_the_same_conversation_are_dropped(tmp_path, caplog):
    rows = [{"chosen": [user(f"q{i}"), bot(f"yes {i}!")], "rejected": [user(f"q{i}"), bot("No.")]} for i in range(4)]
    rows[0]["rejected"] = rows[0]["chosen"]
    with caplog.at_level("WARNING", logger="alignkit.data"):
        train, test = make_dataset(write_jsonl(tmp_path / "same.jsonl", rows), test_size=1)
    assert len(train) + len(test) == 3 and "1 with the same chosen and rejected answer" in caplog.text


def test_alpaca_rows_take_the_answer_column_the_user_names(tmp_path):
    rows = [{"instruction": f"Summarise {i}.", "context": "A cat sat.", "response": f"Cat {i}."} for i in range(3)]
    train, test = make_dataset(write_jsonl(tmp_path / "dolly.jsonl", rows), test_size=1, task="sft",
                               column_map=ColumnMap(response="response"))
    assert sorted(r["completion"] for r in train.to_list() + test.to_list()) == ["Cat 0.", "Cat 1.", "Cat 2."]


# --- every shape loads ------------------------------------------------------------------------------


def _sft_rows(n=6):
    return [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(n)]


SHAPES = {
    "messages": (lambda i: {"messages": [user(f"hi {i}"), bot("hey"), user("bye"), bot(f"see you {i}")]}, "sft"),
    "prompt-completion text": (lambda i: {"prompt": f"Q{i}?", "completion": f"A{i}."}, "sft"),
    "prompt-completion messages": (lambda i: {"prompt": [SYSTEM, user(f"Q{i}?")], "completion": [bot(f"A{i}.")]},
                                   "sft"),
    "sharegpt sft": (lambda i: {"conversations": [{"from": "system", "value": "Be kind."},
                                                  {"from": "human", "value": f"hi {i}"},
                                                  {"from": "gpt", "value": f"hello {i}"}]}, "sft"),
    "alpaca": (lambda i: {"instruction": f"Add {i} and 1.", "input": "" if i % 2 else "Show work.",
                          "output": f"{i + 1}"}, "sft"),
    "dolly": (lambda i: {"instruction": f"Add {i} and 1.", "context": "" if i % 2 else "Show work.",
                         "response": f"{i + 1}", "category": "closed_qa"}, "sft"),
    "standard preference": (lambda i: {"prompt": f"Q{i}", "chosen": "yay!", "rejected": "No."}, "preference"),
    "conversational preference": (lambda i: {"prompt": [SYSTEM, user(f"Q{i}"), bot("hm?"), user("go on")],
                                             "chosen": bot("yay!"), "rejected": [bot("No.")]}, "preference"),
    "implicit prompt": (lambda i: {"chosen": [user(f"Q{i}"), bot("yay!")], "rejected": [user(f"Q{i}"), bot("No.")]},
                        "preference"),
    "sharegpt preference": (lambda i: {"conversations": [{"from": "human", "value": f"Q{i}"}],
                                       "chosen": {"from": "gpt", "value": "yay!"},
                                       "rejected": {"from": "gpt", "value": "No."}}, "preference"),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_shape_loads(tmp_path, shape):
    make_row, task = SHAPES[shape]
    train, test = make_dataset(write_jsonl(tmp_path / "d.jsonl", [make_row(i) for i in range(6)]),
                               test_size=2, task=task)
    assert len(train) == 4 and len(test) == 2
    row = train[0]
    if task == "preference":
        assert set(row) == {"prompt", "chosen", "rejected"}
        chosen = row["chosen"]
        assert chosen == "yay!" or chosen == [bot("yay!")]
    else:
        assert set(row) in ({"messages"}, {"prompt", "completion"})


def test_shapes_convert_to_what_the_gyms_read(tmp_path, caplog):
    alpaca = [{"instruction": "Add 2 and 1.", "input": "Show work.", "output": "3"},
              {"instruction": "Say hi.", "input": "", "output": "hi"}]
    train, test = make_dataset(write_jsonl(tmp_path / "a.jsonl", alpaca), test_size=1, task="sft")
    assert sorted(map(str, train.to_list() + test.to_list())) == sorted(map(str, [
        {"prompt": "Add 2 and 1.\n\nShow work.", "completion": "3"}, {"prompt": "Say hi.", "completion": "hi"}]))
    dolly = [{"instruction": "Summarise.", "context": "A cat sat.", "response": "Cat.", "category": "summarization"},
             {"instruction": "Say hi.", "context": "", "response": "hi", "category": "open_qa"}]
    with caplog.at_level("WARNING", logger="alignkit.data"):
        train, test = make_dataset(write_jsonl(tmp_path / "d.jsonl", dolly), test_size=1, task="sft")
    assert sorted(map(str, train.to_list() + test.to_list())) == sorted(map(str, [
        {"prompt": "Summarise.\n\nA cat sat.", "completion": "Cat."}, {"prompt": "Say hi.", "completion": "hi"}]))
    assert "column(s) category are not read" in caplog.text and "context" not in caplog.text
    with pytest.raises(UserError, match="DPO needs a rejected answer"):
        make_dataset(tmp_path / "d.jsonl", test_size=1)
    share = [{"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": "yo"}]}
             for i in range(2)]
    train, _ = make_dataset(write_jsonl(tmp_path / "s.jsonl", share), test_size=1, task="sft", seed=1)
    assert train[0]["messages"][1] == bot("yo") and train[0]["messages"][0]["role"] == "user"


def test_bundled_chat_set():
    train, test = make_dataset(BUNDLED_CHAT_DATASET, task="sft")
    rows = train.to_list() + test.to_list()
    assert len(rows) >= 40 and all(set(r) == {"messages"} for r in rows)
    assert sum(r["messages"][0]["role"] == "system" for r in rows) >= 5
    assert all(sum(m["role"] == "assistant" for m in r["messages"]) >= 2 for r in rows)
    with pytest.raises(UserError, match="lacks column.*rejected.*SFT data cannot train DPO"):
        make_dataset(BUNDLED_CHAT_DATASET)


# --- clear errors with the row ------------------------------------------------------------------------------


BAD = {
    "mixed shapes": ([{"prompt": "q", "completion": "a"}, {"messages": [user("q"), bot("a")]}], "sft",
                     "row 2 is written as conversational data but row 1 as standard; a dataset holds one shape"),
    "unknown role": ([{"messages": [user("q"), {"role": "narrator", "content": "x"}, bot("a")]}], "sft",
                     "row 1: messages message 2 has the unknown role 'narrator' (accepted: system, user, assistant, "
                     "developer, human, gpt, bot, model, chatgpt)"),
    "empty conversation": ([{"messages": [user("q"), bot("a")]}, {"messages": []}], "sft",
                           "row 2: messages is an empty conversation"),
    "no assistant turn": ([{"messages": [SYSTEM, user("q")]}], "sft",
                          "row 1: the conversation has no assistant turn, so there is nothing to learn"),
    "ends with user": ([{"prompt": [user("q")], "chosen": [bot("a"), user("and?")], "rejected": [bot("b")]}],
                       "preference", "row 1: the chosen conversation ends with a user turn; preference answers "
                                     "must end with an assistant turn"),
    "no shared prefix": ([{"chosen": [user("q"), bot("a")], "rejected": [user("other"), bot("b")]}], "preference",
                         "row 1: chosen and rejected share no leading message"),
    "not role/content": ([{"messages": [{"speaker": "user", "text": "q"}]}], "sft",
                         "row 1: messages message 1 holds an object with only 'speaker', 'text' where a {role, "
                         "content} object is needed"),
    "no role": ([{"messages": [{"content": "q"}, bot("a")]}], "sft",
                "row 1: messages message 1 holds an object with only 'content' where a {role, content} object is "
                "needed"),
    "unknown sharegpt speaker": ([{"conversations": [{"from": "narrator", "value": "x"}]}], "sft",
                                 "row 1: conversations message 1 has the unknown speaker 'narrator'"),
    "forced format": ([{"prompt": "q", "completion": "a"}], "sft", "row 1 is written as standard data, not sharegpt"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_shapes_name_the_row(tmp_path, case):
    rows, task, message = BAD[case]
    fmt = "sharegpt" if case == "forced format" else "auto"
    with pytest.raises(UserError) as info:
        make_dataset(write_jsonl(tmp_path / "bad.jsonl", rows * 2 if len(rows) == 1 else rows), task=task,
                     format=fmt)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


# --- through the command line -----------------------------------------------------------------------------


CLI_CASES = {
    "sft messages": ("sft", "messages", []),
    "sft prompt-completion text": ("sft", "prompt-completion text", []),
    "sft prompt-completion messages": ("sft", "prompt-completion messages", []),
    "sft sharegpt": ("sft", "sharegpt sft", ["--format", "sharegpt"]),
    "sft alpaca": ("sft", "alpaca", ["--format", "alpaca"]),
    "dpo conversational": ("dpo", "conversational preference", []),
    "dpo implicit prompt": ("dpo", "implicit prompt", []),
    "dpo sharegpt": ("dpo", "sharegpt preference", []),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_each_shape_trains_through_the_cli(tmp_path, tiny_model_dir, case, capsys):
    algo, shape, extra = CLI_CASES[case]
    data = write_jsonl(tmp_path / "d.jsonl", [SHAPES[shape][0](i) for i in range(6)])
    out = tmp_path / "run"
    code = main([algo, *SHORT, "--model", str(tiny_model_dir), "--dataset", str(data), "--save-path", str(out),
                 "--no-timestamp", *extra])
    assert code == 0, capsys.readouterr().err
    assert (out / "actor" / "adapter_model.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m and m["loss"] > 0 for m in metrics)


def test_chat_template_file(tmp_path, tiny_model_dir, plain_tokenizer, capsys):
    from alignkit.evaluate import load_for_generation
    from alignkit.gyms import render_messages
    from alignkit.models import load_tokenizer

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == "
                        "'assistant' %}<|im_end|>{% endif %}\n{% endfor %}{% if add_generation_prompt %}"
                        "<assistant>{% endif %}")
    tok = load_tokenizer(tiny_model_dir, chat_template=template.read_text())
    assert render_messages(tok, [user("hi")], generation_prompt=True) == "<user>hi<assistant>"
    data = write_jsonl(tmp_path / "d.jsonl", [SHAPES["messages"][0](i) for i in range(6)])
    out = tmp_path / "run"
    assert main(["sft", *SHORT, "--model", str(tiny_model_dir), "--dataset", str(data), "--save-path", str(out),
                 "--no-timestamp", "--chat-template", str(template)]) == 0
    assert (out / "actor" / "chat_template.jinja").read_text() == template.read_text()
    _, tokenizer = load_for_generation(str(tiny_model_dir), out / "actor")
    assert tokenizer.chat_template == template.read_text()
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    assert main(["sft", *SHORT, "--model", str(tiny_model_dir), "--dataset", str(data), "--save-path",
                 str(tmp_path / "x"), "--no-timestamp", "--chat-template", str(broken)]) == 2
    assert "is not a working Jinja template" in capsys.readouterr().err
    # The chat reads --chat-template too: a broken one is refused there as well, another one replaces the adapter's.
    assert main(["sft", "--eval", "--model", str(tiny_model_dir), "--load-path", str(out / "actor"),
                 "--chat-template", str(broken)]) == 2
    assert "is not a working Jinja template" in capsys.readouterr().err
    other = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    _, tokenizer = load_for_generation(str(tiny_model_dir), out / "actor", chat_template=other)
    assert tokenizer.chat_template == other


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
README_EXAMPLES = {  # file -> (task, format, column map), as the README's commands give them
    "chat_messages.jsonl": ("sft", "auto", ColumnMap()),
    "prompt_completion.jsonl": ("sft", "auto", ColumnMap()),
    "sharegpt.jsonl": ("sft", "auto", ColumnMap()),
    "alpaca.jsonl": ("sft", "alpaca", ColumnMap()),
    "conversational_preference.jsonl": ("preference", "auto", ColumnMap()),
    "implicit_prompt.jsonl": ("preference", "auto", ColumnMap()),
    "mapped_columns.jsonl": ("preference", "auto", ColumnMap(prompt="question", chosen="good_answer",
                                                              rejected="bad_answer")),
    "system_column.jsonl": ("preference", "auto", ColumnMap(prompt="question")),
    "hh_transcripts.jsonl": ("preference", "auto", ColumnMap()),
}


@pytest.mark.parametrize("name", list(README_EXAMPLES))
def test_readme_example_files_load(name, tokenizer):
    task, fmt, cmap = README_EXAMPLES[name]
    train, test = make_dataset(EXAMPLES / name, task=task, format=fmt, column_map=cmap)
    gym_cls = SFTGym if task == "sft" else PreferenceGym
    gym = gym_cls(train, test, tokenizer, max_context_length=256)
    assert len(gym.train_examples) == len(train) and len(gym.test_examples) == len(test)


def test_every_example_file_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.jsonl")) == sorted(README_EXAMPLES)


@pytest.mark.parametrize("which", ["tokenizer", "plain_tokenizer"])
def test_generation_context_is_the_training_prompt(which, request):
    from alignkit.generation import chat_prompt_ids
    from alignkit.gyms import encode_pair

    tok = request.getfixturevalue(which)
    prompt = [SYSTEM, user("Hi there!"), bot("Hey!"), user("Any weekend plans?")]
    assert chat_prompt_ids(tok, prompt) == encode_pair(tok, prompt, "Hiking, you?")[0].prompt_ids
    assert chat_prompt_ids(tok, "Hi!") == encode_pair(tok, "Hi!", "Hello.")[0].prompt_ids


# -- a system column ---------------------------------------------------------------------------


def test_a_system_column_opens_every_shapes_prompt_with_a_system_message(tmp_path, tokenizer):
    rows = [{"system": "Talk like a pirate.", "prompt": "Capital of France?", "chosen": "Arr, Paris!",
             "rejected": "Paris."},
            {"system": "", "prompt": "A fruit?", "chosen": "Apple!", "rejected": "A seed-bearing structure."},
            {"prompt": "2+2?", "chosen": "4", "rejected": "Four, by arithmetic."}]
    train, test = make_dataset(write_jsonl(tmp_path / "s.jsonl", rows), test_size=1)
    rows_by = {**by_answer(train), **by_answer(test)}
    assert rows_by["Arr, Paris!"]["prompt"] == [{"role": "system", "content": "Talk like a pirate."},
                                                user("Capital of France?")]
    assert rows_by["Apple!"]["prompt"] == [user("A fruit?")]   # empty cell: the model's default stays
    assert rows_by["4"]["prompt"] == [user("2+2?")]            # missing key: the same
    # The system text is context: rendered before the question, never learned.
    enc, _merged = encode_messages(tokenizer, rows_by["Arr, Paris!"]["prompt"] + [bot("Arr, Paris!")],
                                   learn_from=2)
    assert "Talk like a pirate." in tokenizer.decode(enc.prompt_ids)
    assert "pirate" not in tokenizer.decode(enc.response_ids)

    sft_rows = [{"system": "Be brief.", "messages": [user("Hi"), bot("Hey.")]},
                {"system": "Be brief.", "messages": [user("Bye"), bot("Ciao.")]}]
    train, test = make_dataset(write_jsonl(tmp_path / "m.jsonl", sft_rows), test_size=1, task="sft")
    assert all(r["messages"][0] == SYSTEM for r in list(train) + list(test))

    alpaca = [{"system": "Be brief.", "instruction": f"Say {w}", "input": "", "output": w} for w in ("a", "b")]
    train, test = make_dataset(write_jsonl(tmp_path / "a.jsonl", alpaca), test_size=1, task="sft")
    assert all(r["prompt"][0] == SYSTEM and r["prompt"][1]["role"] == "user" for r in list(train) + list(test))


def test_system_column_flag_names_the_column_and_a_second_system_message_is_refused(tmp_path):
    rows = [{"persona": "Be brief.", "prompt": f"Q{i}", "chosen": f"A{i}", "rejected": f"B{i} long"} for i in range(3)]
    train, test = make_dataset(write_jsonl(tmp_path / "p.jsonl", rows), test_size=1,
                               column_map=ColumnMap(system="persona"))
    assert all(r["prompt"][0] == SYSTEM for r in list(train) + list(test))

    same = [{"system": "Be brief. ", "prompt": [SYSTEM, user(f"Hi {i}")], "chosen": [bot("Hey")], "rejected": [bot("Go")]}
            for i in range(2)]
    train, test = make_dataset(write_jsonl(tmp_path / "same.jsonl", same), test_size=1)
    assert all(r["prompt"][:2] == [SYSTEM, user(r["prompt"][1]["content"])] for r in list(train) + list(test))
    other = [dict(row, persona="Talk like a pirate.") for row in same]
    with pytest.raises(UserError, match="row 1: has a persona column value and a different system message of its own"):
        make_dataset(write_jsonl(tmp_path / "other.jsonl", other), test_size=1, column_map=ColumnMap(system="persona"))
    numeric = [{"persona": 7, "prompt": f"Q{i}", "chosen": "A", "rejected": "B"} for i in range(2)]
    with pytest.raises(UserError, match="row 1: persona is a number, not text"):
        make_dataset(write_jsonl(tmp_path / "num.jsonl", numeric), test_size=1, column_map=ColumnMap(system="persona"))
    # NaN, as json.dump writes pandas' missing values, is a missing system message like null
    (tmp_path / "nan.jsonl").write_text('{"system": NaN, "prompt": "Q1", "chosen": "A", "rejected": "B"}\n'
                                        '{"system": "Be brief.", "prompt": "Q2", "chosen": "A", "rejected": "B"}\n')
    train, test = make_dataset(tmp_path / "nan.jsonl", test_size=1)
    assert sorted(len(r["prompt"]) for r in list(train) + list(test)) == [1, 2]
    with pytest.raises(UserError, match="--prompt-column and --system-column both name the column 'prompt'"):
        make_dataset(tmp_path / "nan.jsonl", column_map=ColumnMap(prompt="prompt", system="prompt"))


def test_answers_written_as_whole_conversations_beside_a_prompt_are_cut_to_the_answer(tmp_path):
    """UltraFeedback-style rows: a text prompt, and chosen/rejected that repeat it as the first turn."""
    rows = [{"prompt": f"Question {i}?", "chosen": [user(f"Question {i}?"), bot(f"Good {i}.")],
             "rejected": [user(f"Question {i}?"), bot(f"Bad {i}.")], "score_chosen": 8.0} for i in range(3)]
    train, test = make_dataset(write_jsonl(tmp_path / "uf.jsonl", rows), test_size=1)
    for row in list(train) + list(test):
        i = row["prompt"][0]["content"].split()[1][:-1]
        assert row == {"prompt": [user(f"Question {i}?")], "chosen": [bot(f"Good {i}.")],
                       "rejected": [bot(f"Bad {i}.")]}
    train, test = make_dataset(write_jsonl(tmp_path / "uf.jsonl", rows), test_size=1, task="sft")
    assert all(r["completion"] == [bot(r["prompt"][0]["content"].replace("Question", "Good").replace("?", "."))]
               for r in list(train) + list(test))
    # A first turn that is not exactly the prompt is not cut: the row is refused as before.
    rows[0]["chosen"][0] = user("Another question?")
    with pytest.raises(UserError, match="row 1: chosen starts with a user turn"):
        make_dataset(write_jsonl(tmp_path / "uf.jsonl", rows), test_size=1)


def test_whole_conversations_opening_with_a_system_message_give_it_to_the_prompt(tmp_path):
    """chosen/rejected written as [system, user, assistant] beside a text prompt: the system message both
    open with becomes part of the prompt, the answer is the assistant turn (preference and SFT)."""
    sys_turn = {"role": "system", "content": "Be kind."}
    rows = [{"prompt": f"Question {i}?", "chosen": [sys_turn, user(f"Question {i}?"), bot(f"Good {i}.")],
             "rejected": [sys_turn, user(f"Question {i}?"), bot(f"Bad {i}.")]} for i in range(3)]
    train, test = make_dataset(write_jsonl(tmp_path / "uf.jsonl", rows), test_size=1)
    for row in list(train) + list(test):
        i = row["prompt"][1]["content"].split()[1][:-1]
        assert row == {"prompt": [sys_turn, user(f"Question {i}?")], "chosen": [bot(f"Good {i}.")],
                       "rejected": [bot(f"Bad {i}.")]}
    train, _ = make_dataset(write_jsonl(tmp_path / "uf.jsonl", rows), test_size=1, task="sft")
    assert all(r["prompt"][0] == sys_turn and len(r["completion"]) == 1 for r in train)
    # Different system messages in chosen and rejected: which one the prompt had is unknown.
    rows[0]["rejected"][0] = {"role": "system", "content": "Be terse."}
    with pytest.raises(UserError, match="row 1: chosen and rejected open with different system messages"):
        make_dataset(write_jsonl(tmp_path / "uf.jsonl", rows), test_size=1)
    # A conversation that holds the prompt but goes on with something else than an answer names that.
    late = dict(rows[1], chosen=[sys_turn, user("Question 1?"), {"role": "system", "content": "late"}])
    with pytest.raises(UserError, match=r"row 1: chosen starts with a system turn \(after the prompt's messages "
                                        r"it repeats\); an answer starts with an assistant turn$"):
        make_dataset(write_jsonl(tmp_path / "late.jsonl", [late] + rows[1:]), test_size=1)
    # A system message not followed by the prompt's turn is not cut.
    rows[0]["rejected"][0] = sys_turn
    rows[0]["chosen"][1] = user("Another question?")
    with pytest.raises(UserError, match="row 1: chosen starts with a system turn"):
        make_dataset(write_jsonl(tmp_path / "uf.jsonl", rows), test_size=1)


def test_an_assistant_greeting_after_a_system_message_still_opens_the_conversation(tmp_path, tokenizer):
    greeting = [{"system": "Be brief.", "messages": [bot("Welcome!"), user(f"Q{i}"), bot(f"A{i}")]} for i in range(2)]
    train, test = make_dataset(write_jsonl(tmp_path / "greet.jsonl", greeting), test_size=1, task="sft")
    gym = SFTGym(train, test, tokenizer, max_context_length=256)
    for enc in gym.train_examples + gym.test_examples:
        learned = tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX])
        assert learned in ("A0<|im_end|>", "A1<|im_end|>")   # not the greeting
    only = [{"messages": [SYSTEM, bot("Welcome!")]}, {"messages": [user("Q"), bot("A")]}]
    with pytest.raises(UserError, match="row 1: the conversation's only assistant turn opens it"):
        make_dataset(write_jsonl(tmp_path / "only.jsonl", only), test_size=1, task="sft")


def test_turns_are_read_in_either_style_and_tool_use_is_dropped_with_a_count(tmp_path, caplog):
    import logging

    # ShareGPT {from, value} turns in a 'messages' column (or named by --messages-column), {role, content}
    # turns in a 'conversations' column, speakers in capitals, and 'developer' for the system message.
    sharegpt_turns = [{"from": "Human", "value": "Hi"}, {"from": "GPT", "value": "Hey"}]
    role_turns = [{"role": "developer", "content": "Be kind."}, {"role": "USER", "content": "Hi"},
                  {"role": "assistant", "content": "Hey"}]
    for name, rows, mapping in (
            ("sg_messages.jsonl", [{"messages": sharegpt_turns}], None),
            ("sg_named.jsonl", [{"dialog": sharegpt_turns}], ColumnMap(messages="dialog")),
            ("roles_conversations.jsonl", [{"conversations": role_turns}], None)):
        rows = [json.loads(json.dumps(rows[0]).replace("Hi", f"Hi {i}")) for i in range(2)]
        train, test = make_dataset(write_jsonl(tmp_path / name, rows), test_size=1, task="sft", column_map=mapping)
        row = (list(train) + list(test))[0]
        roles = [m["role"] for m in (row.get("messages") or row["prompt"] + row["completion"])]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"]), (name, row)
    # A conversation with a tool call or a tool result is dropped, named once in the count.
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "add"}}]}
    rows = [{"messages": [user(f"q{i}"), bot(f"a{i}")]} for i in range(3)]
    rows += [{"messages": [user("sum?"), call, {"role": "tool", "content": "42"}, bot("42")]},
             {"messages": [user("now?"), {"role": "tool", "content": "noon"}, bot("noon")]}]
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        train, test = make_dataset(write_jsonl(tmp_path / "tools.jsonl", rows), test_size=1, task="sft")
    assert len(train) + len(test) == 3
    assert "dropped 2 of 5 rows (2 with a tool call or tool result (tool use is not supported))" in caplog.text


def test_content_written_as_text_parts_is_joined_and_other_parts_are_refused(tmp_path):
    def parts(*texts):
        return [{"type": "text", "text": t} for t in texts]

    rows = [{"messages": [{"role": "user", "content": parts(f"Look {i}:", "what is it?")},
                          {"role": "assistant", "content": parts(f"A cat {i}.")}]} for i in range(2)]
    train, test = make_dataset(write_jsonl(tmp_path / "parts.jsonl", rows), test_size=1, task="sft")
    assert sorted(r["messages"][0]["content"] for r in list(train) + list(test)) == ["Look 0:\nwhat is it?",
                                                                                    "Look 1:\nwhat is it?"]
    rows[1]["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": "x.png"}})
    with pytest.raises(UserError, match="row 2: messages message 1 has a 'image_url' content part; only text parts"):
        make_dataset(write_jsonl(tmp_path / "image.jsonl", rows), test_size=1, task="sft")


def test_sft_on_whole_conversation_pairs_leaves_out_turns_after_the_last_answer(tmp_path):
    # HH transcripts (and implicit-prompt conversations) ending in a user turn train SFT on the answer before it.
    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: good {i}\n\nHuman: thanks",
             "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad {i}\n\nHuman: thanks"} for i in range(3)]
    train, test = make_dataset(write_jsonl(tmp_path / "hh.jsonl", rows), task="sft", test_size=1)
    pairs = sorted((r["prompt"][-1]["content"], r["completion"][-1]["content"]) for r in list(train) + list(test))
    assert pairs == [("q0", "good 0"), ("q1", "good 1"), ("q2", "good 2")]
    # DPO still refuses such answers: a preference pair's answers are what ends the conversation.
    with pytest.raises(UserError, match="no usable rows"):
        make_dataset(write_jsonl(tmp_path / "hh.jsonl", rows), task="preference", test_size=1)
