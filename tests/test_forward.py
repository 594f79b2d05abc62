"""The shared forward routine: packed and padded passes agree with log_softmax of full logits."""

import torch

from alignkit.forward import pack_batch, plan_bins, sequence_logps
from alignkit.gyms import SFTGym


def _reference_logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = torch.full_like(batch["labels"], -100)   # position t predicts token t + 1
    targets[:, :-1] = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits.float(), -1)
    keep = targets != -100
    per_token = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * keep
    return per_token.sum(1), keep.sum(1)


def test_packed_and_padded_match_full_logits(tokenizer, tiny_model, rows):
    gym = SFTGym(rows, None, tokenizer, data_batch_size_per_gpu=len(rows))
    batch = gym._collate(gym.train_examples)
    expected, counts = _reference_logps(tiny_model, batch)
    for packed in (False, True):
        got, n = sequence_logps(tiny_model, batch, packed=packed, chunk_size=7)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
        assert torch.equal(n, counts)


def test_plan_bins_first_fit_decreasing():
    assert plan_bins([5, 3, 2, 4], capacity=7) == [[0, 2], [3, 1]]
    assert plan_bins([7, 7], capacity=7) == [[0], [1]]


def test_pack_batch_mask_is_block_diagonal_causal():
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 0, 0, 0]])
    mask = (ids != 0).long()
    p = pack_batch(ids, mask, ids.clone(), capacity=4)
    assert p["input_ids"].shape == (2, 4)
    assert p["input_ids"][0].tolist() == [1, 2, 3, 6] and p["position_ids"][0].tolist() == [0, 1, 2, 0]
    m = p["mask"][0, 0]
    assert m[3].tolist() == [False, False, False, True]   # the packed 2nd sequence sees only itself
    assert m[2].tolist() == [True, True, True, False]      # causal within the first
    assert p["token_index"].tolist() == [[0, 1, 2, -1], [4, 5, -1, -1], [3, -1, -1, -1]]


def test_shared_prompt_layout():
    # pair: prompt [7, 8], chosen [1, 2], rejected [3]; labels mark the responses
    ids = torch.tensor([[7, 8, 1, 2], [7, 8, 3, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([[-100, -100, 1, 2], [-100, -100, 3, -100]])
    p = pack_batch(ids, mask, labels, shared_prompts=1)
    assert p["input_ids"].tolist() == [[7, 8, 1, 2, 3]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 3, 2]]
    assert p["token_index"].tolist() == [[0, 1, 2, 3], [0, 1, 4, -1]]
    m = p["mask"][0, 0].int().tolist()
    assert m[4] == [1, 1, 0, 0, 1]   # the rejected token sees the prompt and itself, not the chosen
    assert m[3] == [1, 1, 1, 1, 0]


def test_shared_prompts_match_separate_rows(tokenizer, tiny_model, rows):
    from alignkit.gyms import PreferenceGym

    gym = PreferenceGym(rows, None, tokenizer, data_batch_size_per_gpu=len(rows))
    batch = gym.reset()
    expected, counts = _reference_logps(tiny_model, batch)
    got, n = sequence_logps(tiny_model, batch, packed=True, shared_prompts=len(rows))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(n, counts)


def test_capacity_choice_trades_padding_against_attention():
    from alignkit.forward import choose_capacity

    # uneven units: doubling the bin length removes most padding and attention is cheap
    assert choose_capacity([300, 200, 180, 150, 250, 120], attention_ratio=3000) > 300
    # even units: longer bins only add attention cost
    assert choose_capacity([130, 128, 129, 127], attention_ratio=3000) == 130
