"""TRL's side of the throughput benchmark: the same rows as TRL datasets, a trainer set up to do
exactly what alignkit does, the checks that its batches hold our tokens, and one timed run.

Imported by ``bench_throughput.py`` from beside it (see that script's docstring for the method).
"""

from __future__ import annotations

import contextlib
import tempfile

import torch
from datasets import Dataset
from measuring import FIRST_STEP_KEYS, clock, peak_mb, reset_peak, stamp
from peft import LoraConfig
from transformers import TrainerCallback

TRL_VARIANTS = {"sft": ("padding_free",), "dpo": ("precompute",)}  # TRL speed options tried beside plain


def lora_config():
    """The adapter both sides train: LoRA r=16, alpha 32, no dropout, on q/k/v/o."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, bias="none", task_type="CAUSAL_LM")


def split_row(batch, i) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of row ``i`` of a right-padded gym batch."""
    n = int(batch["attention_mask"][i].sum())
    ids, is_response = batch["input_ids"][i, :n].tolist(), (batch["labels"][i, :n] != -100).tolist()
    start = is_response.index(True)
    return ids[:start], ids[start:]


def trl_sft_dataset(batches):
    rows = [split_row(b, i) for b in batches for i in range(len(b["input_ids"]))]
    return Dataset.from_dict({"input_ids": [p + r for p, r in rows],
                              "completion_mask": [[0] * len(p) + [1] * len(r) for p, r in rows]})


def trl_dpo_dataset(batches, tokenizer):
    """Pairs in batch order, as text (decoded from our ids) for TRL to tokenize."""
    cols = {"prompt": [], "chosen": [], "rejected": []}
    for b in batches:
        pairs = b["example_ids"].shape[0]
        for i in range(pairs):
            (prompt, chosen), (_, rejected) = split_row(b, i), split_row(b, pairs + i)
            for key, ids in zip(cols, (prompt, chosen, rejected), strict=True):
                cols[key].append(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return Dataset.from_dict(cols)


def trl_trainer(algo, model, tokenizer, batches, output_dir, *, lr=5e-5, beta=0.1, nll_alpha=0.0, seed=42,
                max_length=None, callbacks=(), variant="plain"):
    """A TRL trainer set up to do exactly what alignkit does on ``batches`` (see the module docstring),
    with one of TRL's speed options when ``variant`` is ``"padding_free"`` (SFT) or ``"precompute"`` (DPO)."""
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    if variant not in ("plain", *TRL_VARIANTS[algo]):
        raise ValueError(f"no TRL variant {variant!r} for {algo}")
    on_gpu = model.device.type == "cuda"
    rows = len(batches[0]["input_ids"]) // (1 if algo == "sft" else 2)
    max_length = max_length or max(len(b["input_ids"][0]) for b in batches)
    common = dict(output_dir=output_dir, per_device_train_batch_size=rows, gradient_accumulation_steps=1,
                  max_steps=len(batches), learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", gradient_checkpointing=False,
                  bf16=on_gpu, fp16=False, use_cpu=not on_gpu, logging_steps=1, save_strategy="no",
                  report_to="none", disable_tqdm=True, seed=seed, train_sampling_strategy="sequential",
                  dataloader_pin_memory=False, max_length=max_length)
    kwargs = dict(processing_class=tokenizer, peft_config=lora_config(), callbacks=list(callbacks))
    if algo == "sft":
        if variant == "padding_free":  # TRL refuses max_length with padding_free; our rows are already cut to it
            common.update(max_length=None, padding_free=True)
        args = SFTConfig(completion_only_loss=True, **common)
        return SFTTrainer(model, args=args, train_dataset=trl_sft_dataset(batches), **kwargs)
    losses = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, nll_alpha]) if nll_alpha else {}
    args = DPOConfig(beta=beta, precompute_ref_log_probs=variant == "precompute", **losses, **common)
    return DPOTrainer(model, args=args, train_dataset=trl_dpo_dataset(batches, tokenizer), **kwargs)


def batch_differs(theirs: dict, ours: dict, algo: str) -> bool:
    """Whether one TRL training batch holds other tokens than ours: padded batches must match in ids,
    attention mask and loss positions; a padding-free batch (one flattened row, no attention mask) must
    hold our rows' real tokens, in order, with the same loss positions."""
    theirs = {k: v.cpu() for k, v in theirs.items() if torch.is_tensor(v)}
    real = ours["attention_mask"].bool()
    ours_loss = ours["labels"] != -100
    if "attention_mask" not in theirs:  # padding-free: compare the real tokens, flattened
        if theirs["input_ids"].shape != (1, int(real.sum())):
            return True
        return not (torch.equal(theirs["input_ids"][0], ours["input_ids"][real])
                    and torch.equal(theirs["labels"][0] != -100, ours_loss[real]))
    loss_at = theirs["labels"] != -100 if algo == "sft" else theirs["completion_mask"].bool()
    return not (theirs["input_ids"].shape == ours["input_ids"].shape
                and torch.equal(theirs["input_ids"] * theirs["attention_mask"], ours["input_ids"] * ours["attention_mask"])
                and torch.equal(theirs["attention_mask"].long(), ours["attention_mask"].long())
                and torch.equal(loss_at, ours_loss))


def batch_mismatches(trainer, batches, algo) -> int:
    """How many of TRL's training batches differ from ours (see ``batch_differs``)."""
    return sum(batch_differs(theirs, ours, algo)
               for theirs, ours in zip(trainer.get_train_dataloader(), batches, strict=True))


def flop_counter():
    """A ``FlopCounterMode`` that also counts the CPU's fused SDPA kernel (torch's table lacks it), with
    torch's own SDPA formulas."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_val=None, **kwargs):
        return sdpa_flop_count(query.shape, key.shape, value.shape)

    def backward(grad_out, query, key, value, *args, out_val=None, **kwargs):
        return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)

    forward._get_raw = backward._get_raw = True  # they take tensors, not shapes
    aten = torch.ops.aten
    mapping = {op: fn for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", forward),
                                       ("_scaled_dot_product_flash_attention_for_cpu_backward", backward))
               if (op := getattr(aten, name, None)) is not None}
    return FlopCounterMode(display=False, custom_mapping=mapping)


class Stopwatch(TrainerCallback):
    """Times each TRL optimizer step (from the start of training), keeps TRL's logged metrics and, when
    given a running FLOP counter, its total at the same moments."""

    def __init__(self, device, counter=None):
        self.device, self.counter, self.stamps, self.logs, self.flops = device, counter, [], [], []

    def _mark(self):
        self.stamps.append(stamp(self.device))
        if self.counter is not None:
            self.flops.append(self.counter.get_total_flops())

    def on_train_begin(self, args, state, control, **kw):
        reset_peak(self.device)
        self._mark()

    def on_step_end(self, args, state, control, **kw):
        self._mark()

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


def run_trl(spec, model, tokenizer, batches) -> dict:
    counting = spec["count_flops"]
    build_counter, counter = (flop_counter(), flop_counter()) if counting else (None, None)
    watch = Stopwatch(spec["device"], counter)
    with tempfile.TemporaryDirectory() as out:
        start = clock(spec["device"])
        with build_counter or contextlib.nullcontext():  # the constructor: DPO precompute runs here
            trainer = trl_trainer(spec["algo"], model, tokenizer, batches, out, lr=spec["lr"], beta=spec["beta"],
                                  nll_alpha=spec["nll_alpha"], seed=spec["seed"], max_length=spec["max_length"],
                                  callbacks=[watch], variant=spec["variant"])
        build_s = clock(spec["device"]) - start
        mismatches = batch_mismatches(trainer, batches, spec["algo"])
        with counter or contextlib.nullcontext():
            trainer.train()
    return {"stamps": watch.stamps, "first": {k: watch.logs[0][k] for k in FIRST_STEP_KEYS[spec["algo"]]},
            "peak_mem_mb": peak_mb(spec["device"]), "batch_mismatches": mismatches, "build_s": build_s,
            "flops": watch.flops if counting else None,
            "build_flops": build_counter.get_total_flops() if counting else None}
