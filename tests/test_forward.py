"""The shared forward routine: packed and padded passes agree with log_softmax of full logits."""

import pytest
import torch

from alignkit import forward
from alignkit.forward import flat_layout, flat_supported, pack_batch, plan_bins, sequence_logps
from alignkit.gyms import PreferenceGym, SFTGym
from alignkit.models import add_lora


def _reference_logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = torch.full_like(batch["labels"], -100)   # position t predicts token t + 1
    targets[:, :-1] = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits.float(), -1)
    keep = targets != -100
    per_token = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * keep
    return per_token.sum(1), keep.sum(1)


@pytest.fixture(params=["flat", "bins"])
def layout(request, monkeypatch):
    """Run a test with the one-row layout (the tiny Llama's) and again with the bins other models take."""
    if request.param == "bins":
        monkeypatch.setattr(forward, "flat_supported", lambda model: False)
    return request.param


def test_packed_and_padded_match_full_logits(tokenizer, tiny_model, rows, layout):
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


def test_shared_prompts_match_separate_rows(tokenizer, tiny_model, rows, layout):
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


def test_flat_layout_holds_every_token_once_and_keeps_sequences_apart():
    # rows 0/2 and 1/3 are pairs: prompt [7, 8] + chosen [1, 2] / rejected [3]; prompt [9] + [4] / [5, 6]
    ids = torch.tensor([[7, 8, 1, 2], [9, 4, 0, 0], [7, 8, 3, 0], [9, 5, 6, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([[-100, -100, 1, 2], [-100, 4, -100, -100], [-100, -100, 3, -100], [-100, 5, 6, -100]])
    p = flat_layout(ids, mask, labels, shared_prompts=2)
    assert p["input_ids"].tolist() == [[7, 8, 1, 2, 3, 9, 4, 5, 6]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2]]
    assert p["token_index"].tolist() == [[0, 1, 2, 3], [5, 6, -1, -1], [0, 1, 4, -1], [5, 7, 8, -1]]
    # each block: its query count and the (block, start, end) slices it attends to
    assert p["blocks"] == ((4, ((0, 0, 4),)), (1, ((0, 0, 2), (1, 0, 1))), (2, ((2, 0, 2),)), (2, ((2, 0, 1), (3, 0, 2))))
    plain = flat_layout(ids, mask, labels)   # without shared prompts every row is a block of its own
    assert plain["input_ids"].tolist() == [[7, 8, 1, 2, 9, 4, 7, 8, 3, 9, 5, 6]]
    assert [n for n, _ in plain["blocks"]] == [4, 2, 3, 3]


def test_flat_and_binned_layouts_give_the_same_gradients(tokenizer, rows, make_model, monkeypatch):
    """The loss and every LoRA gradient through block attention equal those through the binned mask."""
    batch = PreferenceGym(rows, None, tokenizer, data_batch_size_per_gpu=len(rows)).reset()
    model = add_lora(make_model())
    with torch.no_grad():   # LoRA B starts at zero, which would leave A's gradient zero on both sides
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    trained = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads():
        model.zero_grad()
        logps, _ = sequence_logps(model, batch, shared_prompts=len(rows))
        (logps * torch.linspace(-1, 1, len(logps))).sum().backward()
        return logps.detach(), [p.grad.clone() for p in trained]

    assert flat_supported(model)
    flat, flat_grads = loss_and_grads()
    monkeypatch.setattr(forward, "flat_supported", lambda model: False)
    bins, bin_grads = loss_and_grads()
    torch.testing.assert_close(flat, bins, atol=1e-4, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in flat_grads)
    for a, b in zip(flat_grads, bin_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_block_attention_under_gradient_checkpointing_gives_the_same_gradients(tokenizer, rows, make_model):
    """Recomputed layers get the blocks too: the same loss and LoRA gradients as without checkpointing."""
    batch = PreferenceGym(rows, None, tokenizer, data_batch_size_per_gpu=len(rows)).reset()
    results = []
    for checkpointing in (False, True):
        model = add_lora(make_model())
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        logps, _ = sequence_logps(model, batch, shared_prompts=len(rows))
        logps.sum().backward()
        results.append((logps.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (plain, plain_grads), (recomputed, recomputed_grads) = results
    torch.testing.assert_close(recomputed, plain)
    assert all(g.abs().sum() > 0 for g in plain_grads)
    for a, b in zip(recomputed_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_eager_attention_takes_the_bins_and_the_config_is_restored(tokenizer, rows, make_model):
    gym = SFTGym(rows, None, tokenizer, data_batch_size_per_gpu=len(rows))
    batch = gym._collate(gym.train_examples)
    model = make_model()
    assert flat_supported(model) and model.config._attn_implementation == "sdpa"
    sequence_logps(model, batch)
    assert model.config._attn_implementation == "sdpa"   # block attention only for the duration of the forward
    assert forward.layout(model) == "flat" and forward.layout(model, packed=False) == "padded"
    model.config._attn_implementation = "eager"   # eager attention adds a mask: the bins' mask becomes additive
    assert not flat_supported(model) and forward.layout(model) == "bins"
    expected, _ = _reference_logps(model, batch)
    torch.testing.assert_close(sequence_logps(model, batch)[0], expected, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="plain causal attention only"):
        forward.block_attention(None, *(torch.zeros(1, 2, 3, 4) for _ in range(3)), attention_mask=torch.ones(1, 1, 3, 3),
                                blocks=((3, ((0, 0, 3),)),))
