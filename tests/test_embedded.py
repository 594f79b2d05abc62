"""Short runs on the embedded SmolLM2-135M-Instruct: learning really happens (seconds to a minute each)."""

import json

import pytest
from peft import LoraConfig

from alignkit import DPO, SFT, PreferenceGym, SFTGym, load_model, make_dataset
from alignkit.reference import ReferenceStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def splits():
    train, test = make_dataset(test_size=8, seed=0)
    return train.select(range(8)), test


def _lora():
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def test_sft_loss_on_a_fixed_batch_falls(tokenizer, splits, tmp_path):
    train, _ = splits
    gym = SFTGym(train.select(range(4)), None, tokenizer, data_batch_size_per_gpu=4, max_context_length=80)
    agent = SFT(load_model(device="cpu"), tokenizer.pad_token_id, tokenizer.pad_token, batch_size=4, lr=2e-3,
                lora_config=_lora())
    batch = gym.reset()
    losses = [agent.learn(batch)["loss"] for _ in range(4)]
    assert losses[-1] < losses[0] - 0.1, losses
    # Saved through the library API, the adapter names its base as the user did, not by this machine's cache copy.
    agent.save_checkpoint(tmp_path / "api")
    config = json.loads((tmp_path / "api" / "actor" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m-instruct"


def _train_dpo(tokenizer, splits, nll_alpha, store):
    train, test = splits
    gym = PreferenceGym(train, test, tokenizer, data_batch_size_per_gpu=4, max_context_length=80)
    # both runs start from the same base: the second reads the first's reference log-probs from the store
    agent = DPO(load_model(device="cpu"), tokenizer.pad_token_id, tokenizer.pad_token, batch_size=4, lr=2e-3,
                beta=0.1, nll_alpha=nll_alpha, lora_config=_lora(), seed=0, reference_cache=store)
    start = agent.test(gym)
    batch = gym.reset()
    for _ in range(4):
        agent.learn(batch)
        batch = gym.step()
    agent.reference.save()
    return start, agent.test(gym)


def test_dpo_raises_held_out_accuracy_and_nll_keeps_chosen_likelihood(tokenizer, splits, tmp_path):
    store = ReferenceStore(tmp_path / "reference")
    start, plain = _train_dpo(tokenizer, splits, nll_alpha=0.0, store=store)
    _, with_nll = _train_dpo(tokenizer, splits, nll_alpha=1.0, store=store)
    assert start["rewards/accuracies"] == 0.0   # policy == reference: every reward is 0
    for end in (plain, with_nll):
        assert all(v == v and abs(v) != float("inf") for v in end.values())   # finite
        assert end["rewards/accuracies"] > start["rewards/accuracies"]
        assert end["rewards/margins"] > 0
    # the NLL term holds the chosen response's likelihood up
    assert with_nll["logps/chosen"] > plain["logps/chosen"], (with_nll["logps/chosen"], plain["logps/chosen"])
