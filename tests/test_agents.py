"""SFT and DPO agents on a tiny random-weight model: losses, what trains, accumulation, checkpoints."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel

from alignkit import DPO, SFT, PreferenceGym, SFTGym
from alignkit.agents import lr_factor
from alignkit.forward import sequence_logps
from alignkit.reference import ReferencePolicy

LORA = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def _sft(tokenizer, model, **kw):
    kw.setdefault("lr", 1e-2)
    return SFT(model, pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token,
               lora_config=copy.deepcopy(LORA), **kw)


def _dpo(tokenizer, model, **kw):
    kw.setdefault("lr", 1e-2)
    kw.setdefault("lora_config", copy.deepcopy(LORA))
    return DPO(model, pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, **kw)


def _first_lora_b(agent):
    return next(p for n, p in agent.model.named_parameters() if "lora_B" in n)


def test_sft_loss_is_cross_entropy_on_response_tokens(tokenizer, tiny_model, rows):
    gym = SFTGym(rows, rows, tokenizer, data_batch_size_per_gpu=len(rows))
    agent = _sft(tokenizer, tiny_model, batch_size=len(rows))
    batch = gym.reset()
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    metrics = agent.test(gym, batch_size=2)   # 3 micro-batches, true mean over all tokens
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(float(expected.exp()), rel=1e-5)


def test_sft_trains_lora_only_and_loss_falls(tokenizer, tiny_model, rows):
    gym = SFTGym(rows, rows, tokenizer, data_batch_size_per_gpu=len(rows))
    agent = _sft(tokenizer, tiny_model, batch_size=len(rows), lr=5e-2)
    base_before = {n: p.detach().clone() for n, p in agent.model.named_parameters() if "lora_" not in n}
    lora_b_before = _first_lora_b(agent).detach().clone()
    batch = gym.reset()
    first = agent.learn(batch)
    for _ in range(5):
        last = agent.learn(batch)
    assert last["loss"] < first["loss"]
    assert not torch.equal(_first_lora_b(agent), lora_b_before)
    for n, p in agent.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    assert {"loss", "perplexity", "tokens", "lr", "grad_norm"} <= set(last)
    assert last["tokens"] == int(batch["attention_mask"].sum())


@pytest.mark.parametrize("algo", ["sft", "dpo"])
def test_accumulation_equals_one_big_batch(tokenizer, rows, algo, make_model):
    gym_cls, make = (SFTGym, _sft) if algo == "sft" else (PreferenceGym, _dpo)
    gym = gym_cls(rows, None, tokenizer, data_batch_size_per_gpu=4)
    batch = gym.reset()
    results = []
    for micro in (4, 1):
        agent = make(tokenizer, make_model(seed=1), batch_size=4, micro_batch_size=micro,
                     max_grad_norm=0.0, seed=3)
        metrics = agent.learn(batch)
        results.append((metrics, [p.detach().clone() for p in agent.params]))
    (m_big, p_big), (m_acc, p_acc) = results
    assert m_big["loss"] == pytest.approx(m_acc["loss"], rel=1e-5)
    assert m_big["grad_norm"] == pytest.approx(m_acc["grad_norm"], rel=1e-4)
    for a, b in zip(p_big, p_acc, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_checkpoint_round_trip_reproduces_logits(tokenizer, rows, tmp_path, make_model):
    gym = SFTGym(rows, None, tokenizer, data_batch_size_per_gpu=len(rows))
    agent = _sft(tokenizer, make_model(), batch_size=len(rows), lr=5e-2)
    batch = gym.reset()
    agent.learn(batch)
    agent.save_checkpoint(tmp_path / "run", base_model_name="tiny")
    assert (tmp_path / "run" / "actor" / "adapter_model.safetensors").exists()
    assert (tmp_path / "run" / "actor" / "adapter_config.json").exists()
    assert not list((tmp_path / "run").glob("*.bin")) and not list((tmp_path / "run").glob("*.pt"))
    agent.model.eval()
    with torch.no_grad():
        expected = agent.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reloaded = PeftModel.from_pretrained(make_model(), tmp_path / "run" / "actor").eval()
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected)
    # the optimizer state comes back too: one more step from the checkpoint lands on the same adapter
    # (the Adam moments decide the step's size; without them the adapters would differ)
    other = _sft(tokenizer, make_model(), batch_size=len(rows), lr=5e-2, seed=9)
    other.load_checkpoint(tmp_path / "run")
    assert other.steps == 1
    agent.learn(batch)
    other.learn(batch)
    for a, b in zip(agent.params, other.params, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    fresh_moments = _sft(tokenizer, make_model(), batch_size=len(rows), lr=5e-2, seed=9)
    fresh_moments.load_checkpoint(tmp_path / "run")
    fresh_moments.optimizer.state.clear()   # what a checkpoint without the Adam moments would restore
    fresh_moments.learn(batch)
    assert max((a - b).abs().max() for a, b in zip(agent.params, fresh_moments.params, strict=True)) > 1e-4


def test_dpo_one_concatenated_forward_equals_two_passes(tokenizer, tiny_model, rows):
    gym = PreferenceGym(rows, None, tokenizer, data_batch_size_per_gpu=3)
    batch = gym.reset()
    both, _ = sequence_logps(tiny_model, batch)
    n = 3
    chosen = {k: batch[k][:n] for k in ("input_ids", "attention_mask", "labels")}
    rejected = {k: batch[k][n:] for k in ("input_ids", "attention_mask", "labels")}
    torch.testing.assert_close(both[:n], sequence_logps(tiny_model, chosen, packed=False)[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(both[n:], sequence_logps(tiny_model, rejected, packed=False)[0], atol=1e-4, rtol=1e-5)


def test_dpo_reference_is_frozen_and_only_adapter_trains(tokenizer, tiny_model, rows):
    gym = PreferenceGym(rows, rows, tokenizer, data_batch_size_per_gpu=len(rows))
    agent = _dpo(tokenizer, tiny_model, batch_size=len(rows), lr=5e-2, nll_alpha=0.0)
    batch = gym.reset()
    ref_before = agent.reference.logps(batch)
    base_before = {n: p.detach().clone() for n, p in agent.model.named_parameters() if "lora_" not in n}
    start = agent.test(gym)
    for _ in range(4):
        agent.learn(batch)
    ref_after = ReferencePolicy(agent.model).logps(batch)   # recomputed: the reference must not have moved
    torch.testing.assert_close(ref_after[0], ref_before[0])
    torch.testing.assert_close(ref_after[1], ref_before[1])
    for n, p in agent.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    end = agent.test(gym)
    assert start["rewards/accuracies"] == 0.0 and start["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert end["rewards/margins"] > 0 and end["rewards/accuracies"] > 0.5
    keys = {"loss", "dpo_loss", "nll_loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies", "logps/chosen", "logps/rejected"}
    assert keys <= set(end)
    assert end["rewards/margins"] == pytest.approx(end["rewards/chosen"] - end["rewards/rejected"])


def test_untrained_policy_supplies_the_reference_logps(tokenizer, rows, make_model, monkeypatch):
    """Before the first update the policy's log-probs are the reference's: no second forward is needed."""
    gym = PreferenceGym(rows, rows, tokenizer, data_batch_size_per_gpu=len(rows))
    batch = gym.reset()
    agent = _dpo(tokenizer, make_model(), batch_size=len(rows))
    assert agent.reference.is_policy(updated=False, training=True)
    assert not agent.reference.is_policy(updated=True)

    def no_reference_forward():
        raise AssertionError("the reference ran a forward of its own")

    monkeypatch.setattr(agent.reference, "active", no_reference_forward)
    start = agent.test(gym)       # fills the cache from the policy's own forward
    shortcut = torch.stack(agent.reference.logps(batch), dim=1)   # served from the cache: no forward
    real = torch.stack(ReferencePolicy(agent.model).logps(batch), dim=1)   # the adapter disabled
    torch.testing.assert_close(shortcut, real, atol=1e-5, rtol=1e-6)
    assert start["rewards/margins"] == 0.0 and start["rewards/accuracies"] == 0.0
    torch.nn.init.normal_(_first_lora_b(agent))   # an adapter that adds something is not the reference
    assert not agent.reference.is_policy(updated=False)
    dropout = _dpo(tokenizer, make_model(), lora_config=LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj"]))
    dropout.model.train()
    assert dropout.reference.is_policy(False, training=False) and not dropout.reference.is_policy(False, training=True)


def test_warm_start_reference_is_the_loaded_adapter(tokenizer, rows, tmp_path, make_model):
    sft = _sft(tokenizer, make_model(), batch_size=len(rows), lr=5e-2)
    sft.learn(SFTGym(rows, None, tokenizer, data_batch_size_per_gpu=len(rows)).reset())
    sft.save_checkpoint(tmp_path)
    model = PeftModel.from_pretrained(make_model(), str(tmp_path / "actor"), adapter_name="default",
                                      is_trainable=True)
    model.load_adapter(str(tmp_path / "actor"), adapter_name="reference", is_trainable=False)
    model.set_adapter("default")
    agent = _dpo(tokenizer, model, batch_size=len(rows), nll_alpha=0.0)
    gym = PreferenceGym(rows, rows, tokenizer, data_batch_size_per_gpu=len(rows))
    batch = gym.reset()
    assert agent.reference.is_policy(updated=False, training=True)
    first = agent.learn(batch)   # reference taken from the policy's forward at step 0
    assert first["rewards/margins"] == 0.0 and first["dpo_loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert not agent.reference.is_policy(updated=False)   # the trained adapter moved away from its copy
    shortcut = torch.stack(agent.reference.logps(batch), dim=1)
    real = torch.stack(ReferencePolicy(agent.model).logps(batch), dim=1)   # the frozen SFT adapter, not the base
    torch.testing.assert_close(shortcut, real, atol=1e-5, rtol=1e-6)
    with torch.no_grad(), agent.model.disable_adapter():
        base, _ = sequence_logps(agent.model, batch)
    assert not torch.allclose(base[: len(rows)], real[:, 0], atol=1e-3)


def test_dpo_metrics_match_hand_computation(tokenizer, tiny_model, rows):
    gym = PreferenceGym(rows, rows, tokenizer, data_batch_size_per_gpu=len(rows))
    agent = _dpo(tokenizer, tiny_model, batch_size=len(rows), beta=0.5, nll_alpha=1.0)
    batch = gym.reset()
    agent.learn(batch)   # move the policy away from the reference
    metrics = agent.test(gym, batch_size=4)
    with torch.no_grad():
        agent.model.eval()
        logps, counts = sequence_logps(agent.model, batch)
        ref_c, ref_r = agent.reference.logps(batch)
    n = len(rows)
    rc, rr = 0.5 * (logps[:n] - ref_c), 0.5 * (logps[n:] - ref_r)
    dpo = -F.logsigmoid(rc - rr).mean()
    nll = -logps[:n].sum() / counts[:n].sum()
    assert metrics["dpo_loss"] == pytest.approx(float(dpo), rel=1e-4)
    assert metrics["nll_loss"] == pytest.approx(float(nll), rel=1e-4)
    assert metrics["loss"] == pytest.approx(float(dpo + nll), rel=1e-4)
    assert metrics["rewards/accuracies"] == pytest.approx(float((rc > rr).float().mean()))


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_factor(19, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_factor(5, 0, None, 0.1) == 1.0
    assert lr_factor(0, 0, 1, 0.1) == 1.0


def test_micro_batches_get_their_reference_in_larger_no_grad_forwards(tokenizer, rows, make_model, monkeypatch):
    """With micro-batches of 1 pair, the reference of a 6-pair batch runs as 2 forwards (4 + 2 pairs), held-out
    scoring as batches of 4: the same step (loss, gradient-updated adapter) as one forward per micro-batch."""
    import alignkit.agents
    import alignkit.reference

    gym = PreferenceGym(rows, rows, tokenizer, data_batch_size_per_gpu=len(rows))
    batch = gym.reset()
    shapes = []
    real = alignkit.reference.sequence_logps

    def counted(model, sub, **kwargs):
        shapes.append(sub["input_ids"].shape[0] // 2)
        return real(model, sub, **kwargs)

    monkeypatch.setattr(alignkit.reference, "sequence_logps", counted)
    results = {}
    for factor in (1, alignkit.agents.NO_GRAD_ROWS):
        monkeypatch.setattr(alignkit.agents, "NO_GRAD_ROWS", factor)
        agent = _dpo(tokenizer, make_model(), batch_size=len(rows), micro_batch_size=1, lr=1e-2)
        agent.learn(batch)                 # step 0: the policy is the reference, no reference forward
        shapes.clear()
        agent.learn(batch)                 # the cache holds these pairs: clear it to see the forwards
        assert shapes == []
        agent.reference.cache.clear()
        metrics = agent.learn(batch)
        results[factor] = (metrics, shapes[:], [p.detach().clone() for p in agent.params])
        held_out = []

        def scored(micro, denom, train, _real=agent._micro_loss, _seen=held_out):
            _seen.append(micro["example_ids"].shape[0])
            return _real(micro, denom, train)

        monkeypatch.setattr(agent, "_micro_loss", scored)
        agent.test(gym)
        assert held_out == ([1] * 6 if factor == 1 else [4, 2])
    assert results[1][1] == [1] * 6 and results[4][1] == [4, 2]
    assert results[4][0]["loss"] == pytest.approx(results[1][0]["loss"], rel=1e-5)
    for a, b in zip(results[1][2], results[4][2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
