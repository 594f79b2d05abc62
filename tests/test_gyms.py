"""Tokenization, masks and batching of the gyms."""

import logging

import pytest
import torch

from alignkit.errors import UserError
from alignkit.gyms import IGNORE_INDEX, PreferenceGym, SFTGym, encode_pair


def _response_text(tok, batch, row):
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    return tok.decode(ids[labels != IGNORE_INDEX])


def test_chat_template_labels_are_exactly_the_response(tokenizer, rows):
    gym = SFTGym(rows, rows[:2], tokenizer, data_batch_size_per_gpu=len(rows))
    batch = gym._collate(gym.train_examples)
    for i, row in enumerate(rows):
        assert _response_text(tokenizer, batch, i) == row["chosen"] + "<|im_end|>"
        first_label = int((batch["labels"][i] != IGNORE_INDEX).nonzero()[0])
        prompt_text = tokenizer.decode(batch["input_ids"][i][:first_label])
        assert prompt_text.endswith(f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n")
    # padding is masked out of the labels and the attention mask
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == IGNORE_INDEX).all()


def test_plain_tokenizer_labels_are_response_plus_eos(plain_tokenizer, rows):
    gym = SFTGym(rows, None, plain_tokenizer, data_batch_size_per_gpu=2, response_column="rejected")
    batch = gym._collate(gym.train_examples[:2])
    assert _response_text(plain_tokenizer, batch, 0) == rows[0]["rejected"] + plain_tokenizer.eos_token
    first = batch["input_ids"][0][: batch["attention_mask"][0].sum()]
    assert plain_tokenizer.decode(first) == rows[0]["prompt"] + "\n" + rows[0]["rejected"] + plain_tokenizer.eos_token


def test_encode_pair_prompt_is_prefix(tokenizer):
    enc, _ = encode_pair(tokenizer, "Hi!", "Hello there, friend.")
    full = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True)
    full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
    assert enc.prompt_ids == list(full)


def test_truncation_keeps_prompt_and_drops_long_prompts(tokenizer, rows, caplog):
    long_prompt = {"prompt": "word " * 300, "chosen": "ok", "rejected": "no"}
    with caplog.at_level(logging.WARNING):
        gym = SFTGym(rows + [long_prompt], None, tokenizer, max_context_length=50)
    assert len(gym.train_examples) == len(rows)
    assert "dropped 1 of 7 rows" in caplog.text
    for ex in gym.train_examples:
        assert len(ex.input_ids) <= 50 and len(ex.response_ids) >= 1
    cut = gym.encode_stats["train"].truncated_responses
    assert cut > 0 and f"train split: cut {cut} of 6 responses to fit --max-length (50 tokens)" in caplog.text
    # A preference pair has two responses, each counted.
    caplog.clear()
    long_answers = [{"prompt": f"q{i}", "chosen": "yes " * 80 + "A", "rejected": "no " * 80 + "B"} for i in range(3)]
    with caplog.at_level(logging.WARNING):
        PreferenceGym(long_answers, None, tokenizer, max_context_length=50)
    assert "train split: cut 6 of 6 responses to fit --max-length (50 tokens)" in caplog.text


def test_pairs_whose_answers_are_the_same_tokens_once_cut_are_dropped_and_counted(tokenizer, rows, caplog):
    # The answers differ only past the length limit: cut, both are the same tokens and teach nothing.
    same_once_cut = [{"prompt": f"q{i}", "chosen": "word " * 80 + "Pasta!", "rejected": "word " * 80 + "Salad."}
                     for i in range(2)]
    with caplog.at_level(logging.WARNING):
        gym = PreferenceGym(rows + same_once_cut, None, tokenizer, max_context_length=50)
    assert len(gym.train_examples) == len(rows)
    assert all(p.chosen.input_ids != p.rejected.input_ids for p in gym.train_examples)
    assert "dropped 2 of 8 pairs whose chosen and rejected answers are the same tokens once cut" in caplog.text
    with pytest.raises(UserError, match=r"^no training rows left after tokenization: of 2 train rows, 2 have the "
                                        r"same chosen and rejected tokens once cut to --max-length; raise"):
        PreferenceGym(same_once_cut, None, tokenizer, max_context_length=50)
    # With room for the whole answers they differ and are kept.
    assert len(PreferenceGym(same_once_cut, None, tokenizer, max_context_length=256).train_examples) == 2
    # The same answer as written: said so, with no length to blame.
    caplog.clear()
    same = [{"prompt": f"q{i}", "chosen": "Pasta!", "rejected": "Pasta!"} for i in range(3)]
    with caplog.at_level(logging.WARNING):
        assert len(PreferenceGym(rows + same, None, tokenizer, max_context_length=256).train_examples) == len(rows)
    assert "train split: dropped 3 of 9 pairs whose chosen and rejected answers are the same" in caplog.text
    assert "once cut" not in caplog.text
    with pytest.raises(UserError) as err:
        PreferenceGym(same, None, tokenizer)
    assert str(err.value) == ("no training rows left after tokenization: of 3 train rows, 3 have the same chosen and "
                              "rejected answer")


def test_a_test_split_emptied_by_tokenization_is_said_plainly(tokenizer, rows, caplog):
    long_prompt = {"prompt": "word " * 300, "chosen": "ok", "rejected": "no"}
    with caplog.at_level(logging.WARNING):
        gym = PreferenceGym(rows, [long_prompt], tokenizer, max_context_length=50)
    assert gym.test_examples == [] and "test split: no row is left after tokenization" in caplog.text


@pytest.mark.parametrize("rows_in_split, expected", [(21, 5), (22, 6), (24, 3 * 2), (3, 0 + 1), (1, 0)])
def test_an_epoch_of_two_processes_has_as_many_batches_as_it_takes(tokenizer, rows, rows_in_split, expected):
    # global batches of 2 x 2 rows; the epoch's last short batch is cut to a multiple of 2, and a lone row is
    # no batch: the steps --epochs asks for are the batches an epoch really has, so a run ends on its epoch
    from types import SimpleNamespace

    examples = [dict(rows[i % len(rows)], prompt=f"{rows[i % len(rows)]['prompt']} {i}") for i in range(rows_in_split)]
    gyms = [SFTGym(examples, None, tokenizer, data_batch_size_per_gpu=2,
                   accelerator=SimpleNamespace(num_processes=2, process_index=rank)) for rank in (0, 1)]
    assert gyms[0].batches_per_epoch == expected
    if not expected:
        return
    for gym in gyms:
        gym.reset()
        for _ in range(expected):
            gym.step()
    assert gyms[0].epoch == gyms[1].epoch == 1 and gyms[0]._cursor <= 2 * 2


def test_reset_and_step_cover_each_row_once_per_epoch(tokenizer, rows):
    gym = SFTGym(rows, None, tokenizer, data_batch_size_per_gpu=4)
    assert gym.batches_per_epoch == 2
    seen = []
    batch = gym.reset()
    for _ in range(gym.batches_per_epoch):
        seen += [tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
        batch = gym.step()
    assert gym.epoch == 1
    assert sorted(seen) == sorted(tuple(e.input_ids) for e in gym.train_examples)


def test_preference_batch_layout(tokenizer, rows):
    gym = PreferenceGym(rows, rows, tokenizer, data_batch_size_per_gpu=3)
    batch = gym.reset()
    assert batch["input_ids"].shape[0] == 6 and batch["example_ids"].shape == (3,)
    for i in range(3):
        chosen, rejected = batch["input_ids"][i], batch["input_ids"][i + 3]
        n_prompt = int((batch["labels"][i] == IGNORE_INDEX).logical_and(batch["attention_mask"][i] == 1).sum())
        assert torch.equal(chosen[:n_prompt], rejected[:n_prompt])
    ids = {p.example_id for p in gym.train_examples}
    again = PreferenceGym(rows, None, tokenizer)
    assert ids == {p.example_id for p in again.train_examples} and len(ids) == len(rows)
    test_rows = sum(b["example_ids"].numel() for b in gym.test_batches(4))
    assert test_rows == len(rows)


def test_bad_batch_size_is_a_user_error(tokenizer, rows):
    from alignkit.errors import UserError

    with pytest.raises(UserError):
        SFTGym(rows, None, tokenizer, data_batch_size_per_gpu=0)


def test_a_pair_id_tells_apart_the_same_tokens_scored_from_another_turn(tokenizer):
    """Two datasets holding the same conversations, one with the answer from the first assistant turn, one
    from the last: the same tokens, other labels, so other ids (cached log-probs of one never serve the other)."""
    def msg(role, text):
        return {"role": role, "content": text}

    early = {"prompt": [msg("user", "Hi?")],
             "chosen": [msg("assistant", "Hello."), msg("user", "And?"), msg("assistant", "Good.")],
             "rejected": [msg("assistant", "Hello."), msg("user", "And?"), msg("assistant", "Bad.")]}
    late = {"prompt": [msg("user", "Hi?"), msg("assistant", "Hello."), msg("user", "And?")],
            "chosen": [msg("assistant", "Good.")], "rejected": [msg("assistant", "Bad.")]}
    batches = [PreferenceGym([row], [row], tokenizer, data_batch_size_per_gpu=1).reset() for row in (early, late)]
    assert torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])
    assert not torch.equal(batches[0]["labels"], batches[1]["labels"])
    assert batches[0]["example_ids"].item() != batches[1]["example_ids"].item()
