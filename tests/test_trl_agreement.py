"""alignkit and TRL report the same step-1 losses on the same batch.

A tiny random-weight Llama with the embedded tokenizer; TRL's trainers are set up by the
throughput benchmark's own ``trl_trainer`` (LoRA r16 q/k/v/o, same rows in the same order, same
token ids), so this test also guards the benchmark's like-for-like comparison. lora_B starts at
zero, so the step-1 loss is the base model's loss on the batch on both sides.
"""


import pytest

pytest.importorskip("trl", reason="TRL is not installed (the optional [bench] extra)")

from transformers import TrainerCallback  # noqa: E402

from alignkit import DPO, SFT, PreferenceGym, SFTGym  # noqa: E402

REL = 1e-3


class _KeepLogs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def _trl_first_logs(bench, algo, model, tokenizer, batch, tmp_path, **kw):
    keep = _KeepLogs()
    trainer = bench.trl_trainer(algo, model, tokenizer, [batch], str(tmp_path), callbacks=[keep], **kw)
    assert bench.batch_mismatches(trainer, [batch], algo) == 0, "TRL's batch differs from ours"
    trainer.train()
    return keep.logs[0]


def _ours(bench, agent_cls, model, tokenizer, n, **kw):
    return agent_cls(model, pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, batch_size=n,
                     lr=5e-5, lora_config=bench.lora_config(), **kw)


def test_sft_step1_loss_matches_trl(bench, tokenizer, make_model, rows, tmp_path):
    batch = SFTGym(rows, None, tokenizer, data_batch_size_per_gpu=len(rows)).reset()
    # rows of different lengths: a mean of per-row means would differ from the per-token mean
    assert len(set((batch["labels"] != -100).sum(1).tolist())) > 1
    ours = _ours(bench, SFT, make_model(seed=0), tokenizer, len(rows)).learn(batch)
    theirs = _trl_first_logs(bench, "sft", make_model(seed=0), tokenizer, batch, tmp_path)
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=REL)


@pytest.mark.parametrize("nll_alpha", [0.0, 1.0])
def test_dpo_step1_metrics_match_trl(bench, tokenizer, make_model, rows, tmp_path, nll_alpha):
    batch = PreferenceGym(rows, None, tokenizer, data_batch_size_per_gpu=len(rows)).reset()
    ours = _ours(bench, DPO, make_model(seed=0), tokenizer, len(rows), beta=0.1, nll_alpha=nll_alpha,
                 loss_type="sigmoid").learn(batch)
    theirs = _trl_first_logs(bench, "dpo", make_model(seed=0), tokenizer, batch, tmp_path, beta=0.1,
                             nll_alpha=nll_alpha)
    for key in ("loss", "logps/chosen", "logps/rejected"):
        assert ours[key] == pytest.approx(theirs[key], rel=REL), key
    assert ours["rewards/margins"] == pytest.approx(theirs["rewards/margins"], abs=1e-4)
