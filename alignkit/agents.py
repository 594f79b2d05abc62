"""Agents: a LoRA-wrapped model with its optimizer and schedule, taught one batch at a time.

``SFT`` and ``DPO`` share :class:`LLMAgent`, which owns everything but the loss: LoRA set-up,
AdamW, warm-up + cosine learning rate, micro-batches with gradient accumulation, clipping,
evaluation over a test split and checkpoints. A subclass only says how to split a batch into
micro-batches, what the loss of a micro-batch is, and how summed statistics become metrics.

Metrics are true means: each micro-batch adds sums and counts, and division happens once per
optimizer step (or once per evaluation), never as a mean of means.
"""

from __future__ import annotations

import contextlib
import math

import torch
from peft import LoraConfig, PeftModel

from . import checkpoints
from .forward import sequence_logps
from .losses import PREFERENCE_LOSSES, dpo_nll_loss, preference_loss, sft_loss
from .models import add_lora

REFERENCE_ADAPTER = "reference"


def lr_factor(step: int, warmup_steps: int, total_steps: int | None, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    1) linear warm-up from 1/warmup_steps to 1 over ``warmup_steps`` steps;
    2) without ``total_steps``: constant after warm-up;
    3) else cosine decay from 1 down to ``min_lr_ratio`` at the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not total_steps or total_steps <= warmup_steps + 1:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps - 1))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LLMAgent:
    """Base of the LoRA fine-tuning agents.

    Args:
        actor_network: a causal LM; wrapped with a LoRA adapter from ``lora_config`` unless it is
            already a ``PeftModel`` (a warm start), in which case its active adapter is trained.
        pad_token_id, pad_token: the tokenizer's padding token (id and text).
        batch_size: rows (SFT) or pairs (DPO) per optimizer step.
        lr: peak learning rate.
        update_epochs: optimizer steps taken on each batch passed to :meth:`learn`.
        lora_config: a ``peft.LoraConfig``; defaults to r=16, alpha=32 on q/k/v/o projections.
        accelerator: an ``accelerate.Accelerator`` or ``None`` for plain PyTorch.
        micro_batch_size: rows (pairs) per forward/backward; gradients accumulate over
            ``batch_size / micro_batch_size`` micro-batches. ``None`` means the whole batch at once.
        max_grad_norm: clip the global gradient norm to this (0 disables clipping).
        weight_decay: AdamW weight decay on adapter weights.
        warmup_steps, total_steps, min_lr_ratio: the learning-rate schedule (see :func:`lr_factor`).
        seed: seeds torch before the adapter is initialised.
        packed: run forward passes padding-free (see ``alignkit.forward``).
        adapter_name: the PEFT adapter this agent trains; other adapters on the same base are left alone.
    """

    def __init__(self, actor_network, pad_token_id, pad_token, batch_size=16, lr=5e-5, update_epochs=1,
                 lora_config: LoraConfig | None = None, accelerator=None, micro_batch_size=None,
                 max_grad_norm=1.0, weight_decay=0.0, warmup_steps=0, total_steps=None, min_lr_ratio=0.1,
                 seed=42, packed=True, adapter_name="default", gradient_checkpointing=False):
        if batch_size < 1 or update_epochs < 1 or lr <= 0:
            raise ValueError("batch_size and update_epochs must be >= 1 and lr > 0")
        torch.manual_seed(seed)
        self.pad_token_id, self.pad_token = pad_token_id, pad_token
        self.batch_size, self.lr, self.update_epochs = batch_size, lr, update_epochs
        self.micro_batch_size = micro_batch_size or batch_size
        self.max_grad_norm, self.weight_decay = max_grad_norm, weight_decay
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        self.packed, self.adapter_name, self.accelerator = packed, adapter_name, accelerator
        self.seed = seed
        if isinstance(actor_network, PeftModel) and adapter_name in actor_network.peft_config:
            self.model = actor_network
        else:
            self.model = add_lora(actor_network, lora_config, adapter_name=adapter_name)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        self.params = [p for n, p in self.model.named_parameters()
                       if p.requires_grad and f".{adapter_name}." in n]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.warmup_steps, self.total_steps, self.min_lr_ratio))
        if accelerator is not None:
            self.model, self.optimizer = accelerator.prepare(self.model, self.optimizer)
        self.steps = 0

    # -- what subclasses define -------------------------------------------------------------------
    def _split(self, batch, size):  # pragma: no cover - abstract
        """Yield micro-batches of ``size`` rows/pairs."""
        raise NotImplementedError

    def _denominators(self, batch) -> dict[str, int]:  # pragma: no cover - abstract
        """Counts over the whole optimizer step that the loss of every micro-batch divides by."""
        raise NotImplementedError

    def _micro_loss(self, micro, denom, train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch (already divided by the step's denominators) and its summed stats."""
        raise NotImplementedError  # pragma: no cover

    def _finalize(self, sums: dict[str, float]) -> dict[str, float]:  # pragma: no cover - abstract
        """Turn summed statistics into metrics (true means)."""
        raise NotImplementedError

    # -- shared machinery ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def _backward(self, loss):
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def _reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Sum statistics across processes (a no-op in one process)."""
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            sums = {k: self.accelerator.reduce(v.detach().float().to(self.device), "sum") for k, v in sums.items()}
        return {k: float(v) for k, v in sums.items()}

    @staticmethod
    def _add(total: dict, part: dict) -> None:
        for k, v in part.items():
            total[k] = total.get(k, 0) + v.detach().double().cpu()

    def learn(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Take ``update_epochs`` optimizer steps on ``batch``; returns the last step's metrics.

        Metrics include ``lr`` (the rate used for the step), ``grad_norm`` (before clipping) and the
        subclass's loss statistics, each a true mean over the whole batch.
        """
        self.model.train()
        for _ in range(self.update_epochs):
            denom = self._denominators(batch)
            sums: dict[str, torch.Tensor] = {}
            for micro in self._split(batch, self.micro_batch_size):
                loss, stats = self._micro_loss(micro, denom, train=True)
                self._backward(loss)
                self._add(sums, stats)
            lr = self.scheduler.get_last_lr()[0]
            grad_norm = self._clip()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.steps += 1
            metrics = self._finalize(self._reduce(sums))
            metrics.update(lr=lr, grad_norm=grad_norm)
        return metrics

    def _clip(self) -> float:
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        if self.accelerator is not None:
            norm = self.accelerator.clip_grad_norm_(self.params, max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        return float(norm)

    @torch.no_grad()
    def test(self, env, batch_size: int | None = None) -> dict[str, float]:
        """Metrics over the whole test split of ``env``, as true means over all its rows/tokens."""
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        for batch in env.test_batches(batch_size or self.micro_batch_size):
            _, stats = self._micro_loss(batch, self._denominators(batch), train=False)
            self._add(sums, stats)
        if not sums:
            raise ValueError("the test split is empty")
        return self._finalize(self._reduce(sums))

    # -- checkpoints ----------------------------------------------------------------------------
    def unwrapped_model(self) -> PeftModel:
        return self.accelerator.unwrap_model(self.model) if self.accelerator is not None else self.model

    def save_checkpoint(self, path, base_model_name: str | None = None, extra_state: dict | None = None):
        """Write ``path/actor/`` (a standard PEFT adapter folder) and the training state beside it."""
        if self.accelerator is not None and not self.accelerator.is_main_process:
            return
        checkpoints.save(self, path, base_model_name=base_model_name, extra_state=extra_state)

    def load_checkpoint(self, path) -> dict:
        """Restore adapter weights, optimizer, schedule and step from :meth:`save_checkpoint`'s folder."""
        return checkpoints.load(self, path)


def _split_rows(batch, size):
    n = batch["input_ids"].shape[0]
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in batch.items()}


def _adapter_weights(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """The LoRA weights of one adapter, keyed by their names with the adapter's name taken out."""
    tag = f".{adapter_name}."
    return {n.replace(tag, "."): p for n, p in model.named_parameters() if tag in n}


def _response_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of predicted (response) tokens per row of ``labels`` (B, T)."""
    return (labels[:, 1:] != -100).sum(dim=1)


class SFT(LLMAgent):
    """Supervised fine-tuning: cross-entropy on the response tokens (the per-token mean NLL).

    Metrics: ``loss`` (mean NLL per response token), ``perplexity`` (exp of it), ``tokens`` (real,
    non-padding tokens processed), plus ``lr`` and ``grad_norm`` from :meth:`learn`.
    """

    def _split(self, batch, size):
        return _split_rows(batch, size)

    def _denominators(self, batch):
        return {"tokens": int(_response_tokens(batch["labels"]).sum())}

    def _micro_loss(self, micro, denom, train):
        logps, n_tokens = sequence_logps(self.model, micro, packed=self.packed)
        loss = sft_loss(logps, max(denom["tokens"], 1))
        stats = {"nll": -logps.sum(), "response_tokens": n_tokens.sum(),
                 "tokens": micro["attention_mask"].sum()}
        return loss, stats

    def _finalize(self, sums):
        loss = sums["nll"] / max(sums["response_tokens"], 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": sums["tokens"]}


class DPO(LLMAgent):
    """Direct Preference Optimization with an optional NLL term on the chosen response.

    ``loss = mean over pairs of the preference loss + nll_alpha * mean NLL per chosen token``
    (see ``alignkit.losses``). Log-probs are summed over response tokens.

    The reference policy is the model the run starts from, frozen: the base with this agent's
    adapter disabled, or, when the model carries a ``"reference"`` adapter (a warm start from an
    SFT adapter, loaded twice), that frozen adapter. Reference log-probs are computed once per
    pair without gradients and cached by the pair's ``example_id``.

    Extra args: ``beta`` (strength of the implicit KL penalty), ``nll_alpha`` (weight of the NLL
    term; 0 gives vanilla DPO), ``loss_type`` (one of ``alignkit.losses.PREFERENCE_LOSSES``),
    ``label_smoothing`` (sigmoid only), ``simpo_gamma`` (simpo only), ``share_prompts`` (with
    ``packed``: run each pair's prompt once for both responses; same numbers, fewer FLOPs).

    Metrics: ``loss``, ``dpo_loss``, ``nll_loss``, ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``, ``tokens``.
    Rewards are ``beta * (logp_policy - logp_reference)``, means over pairs; accuracy is the share
    of pairs whose chosen reward exceeds the rejected one.
    """

    def __init__(self, actor_network, pad_token_id, pad_token, batch_size=16, lr=5e-5, beta=0.1, nll_alpha=1.0,
                 update_epochs=1, lora_config=None, accelerator=None, loss_type="sigmoid", label_smoothing=0.0,
                 simpo_gamma=0.5, share_prompts=True, **kwargs):
        if loss_type not in PREFERENCE_LOSSES:
            raise ValueError(f"unknown loss_type {loss_type!r}; choose from {sorted(PREFERENCE_LOSSES)}")
        if beta <= 0 or nll_alpha < 0:
            raise ValueError("beta must be > 0 and nll_alpha >= 0")
        self.beta, self.nll_alpha, self.loss_type = beta, nll_alpha, loss_type
        self.label_smoothing, self.simpo_gamma = label_smoothing, simpo_gamma
        self.share_prompts = share_prompts
        self.ref_cache: dict[int, tuple[float, float]] = {}
        super().__init__(actor_network, pad_token_id, pad_token, batch_size=batch_size, lr=lr,
                         update_epochs=update_epochs, lora_config=lora_config, accelerator=accelerator, **kwargs)

    def _logps(self, batch, pairs: int):
        shared = pairs if self.packed and self.share_prompts else 0
        return sequence_logps(self.model, batch, packed=self.packed, shared_prompts=shared)

    @property
    def reference_free(self) -> bool:
        return self.loss_type == "simpo"

    def _split(self, batch, size):
        pairs = batch["example_ids"].shape[0]
        for start in range(0, pairs, size):
            rows = list(range(start, min(start + size, pairs)))
            rows += [pairs + r for r in rows]
            micro = {k: v[rows] for k, v in batch.items() if k != "example_ids"}
            micro["example_ids"] = batch["example_ids"][start:start + size]
            yield micro

    def _denominators(self, batch):
        pairs = batch["example_ids"].shape[0]
        return {"pairs": pairs, "chosen_tokens": int(_response_tokens(batch["labels"][:pairs]).sum())}

    @contextlib.contextmanager
    def reference_mode(self):
        """Run the model as the frozen reference policy inside this block."""
        model = self.unwrapped_model()
        if REFERENCE_ADAPTER not in model.peft_config:
            with model.disable_adapter():
                yield
            return
        # PEFT's set_adapter marks the active adapter trainable: remember and restore the flags.
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        model.set_adapter(REFERENCE_ADAPTER)
        try:
            yield
        finally:
            model.set_adapter(self.adapter_name)
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])

    def policy_is_reference(self, train: bool = False) -> bool:
        """Whether a forward of the policy computes the reference's log-probs exactly right now.

        True before the first optimizer step when the trained adapter adds nothing (every
        ``lora_B`` is zero, as PEFT initialises it) or equals the frozen ``"reference"`` adapter of a
        warm start, and, for a training forward, LoRA dropout is off. The policy's own log-probs
        then serve as reference log-probs, which saves one forward over the test split at step 0
        and over the first batch.
        """
        if self.steps > 0 or self.reference_free:
            return False
        model = self.unwrapped_model()
        if train and model.training and model.peft_config[self.adapter_name].lora_dropout > 0:
            return False
        mine = _adapter_weights(model, self.adapter_name)
        if REFERENCE_ADAPTER in model.peft_config:
            ref = _adapter_weights(model, REFERENCE_ADAPTER)
            return ref.keys() == mine.keys() and all(torch.equal(p, ref[n]) for n, p in mine.items())
        return all(not p.any() for n, p in mine.items() if "lora_B" in n)

    def _cache_reference(self, ids: list[int], chosen: torch.Tensor, rejected: torch.Tensor):
        for i in range(len(ids)):
            self.ref_cache.setdefault(ids[i], (float(chosen[i]), float(rejected[i])))

    @torch.no_grad()
    def reference_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs (chosen, rejected), each (B,), from the cache or one no-grad forward."""
        ids = batch["example_ids"].tolist()
        missing = [i for i, key in enumerate(ids) if key not in self.ref_cache]
        if missing:
            pairs = len(ids)
            rows = missing + [pairs + i for i in missing]
            sub = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "labels")}
            was_training = self.model.training
            self.model.eval()  # no dropout in the reference
            with self.reference_mode():
                logps, _ = self._logps(sub, len(missing))
            self.model.train(was_training)
            n = len(missing)
            self._cache_reference([ids[i] for i in missing], logps[:n], logps[n:])
        ref = torch.tensor([self.ref_cache[k] for k in ids], dtype=torch.float32, device=self.device)
        return ref[:, 0], ref[:, 1]

    def _micro_loss(self, micro, denom, train):
        pairs = micro["example_ids"].shape[0]
        logps = None
        if self.reference_free:
            ref_c = ref_r = torch.zeros(pairs, device=self.device)
        else:
            if self.policy_is_reference(train):
                logps, counts = self._logps(micro, pairs)
                detached = logps.detach()
                self._cache_reference(micro["example_ids"].tolist(), detached[:pairs], detached[pairs:])
            ref_c, ref_r = self.reference_logps(micro)
        if logps is None:
            logps, counts = self._logps(micro, pairs)
        pc, pr = logps[:pairs], logps[pairs:]
        losses, reward_c, reward_r = preference_loss(
            self.loss_type, pc, pr, ref_c, ref_r, self.beta, chosen_lengths=counts[:pairs],
            rejected_lengths=counts[pairs:], label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma)
        loss, _, _ = dpo_nll_loss(losses, pc, counts[:pairs].sum(), self.nll_alpha,
                                  n_pairs=denom["pairs"], n_tokens=max(denom["chosen_tokens"], 1))
        stats = {
            "pairs": torch.tensor(pairs), "dpo_loss": losses.sum(), "nll": -pc.sum(),
            "chosen_tokens": counts[:pairs].sum(), "rewards/chosen": reward_c.sum(),
            "rewards/rejected": reward_r.sum(), "rewards/accuracies": (reward_c > reward_r).float().sum(),
            "logps/chosen": pc.sum(), "logps/rejected": pr.sum(), "tokens": micro["attention_mask"].sum(),
        }
        return loss, stats

    def _finalize(self, sums):
        n = max(sums["pairs"], 1)
        m = {k: sums[k] / n for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                      "logps/chosen", "logps/rejected")}
        m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
        m["dpo_loss"] = sums["dpo_loss"] / n
        m["nll_loss"] = sums["nll"] / max(sums["chosen_tokens"], 1)
        m["loss"] = m["dpo_loss"] + self.nll_alpha * m["nll_loss"]
        m["tokens"] = sums["tokens"]
        return m
