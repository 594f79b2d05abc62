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
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel

from . import checkpoints
from .adapters import lora_config_from
from .config import DPOConfig, SFTConfig, preference_problems
from .errors import ArgumentError, check_accelerator, checked
from .forward import ResponseLogps, check_token_ids, sequence_logps
from .gyms import checked_seed
from .kernels import use_fast_linears
from .losses import PREFERENCE_LOSSES, dpo_nll_loss, preference_loss, sft_loss
from .models import adapter_parameters, add_lora
from .processes import is_deepspeed, is_sharded, most_over_processes, prepare_deepspeed
from .reference import ReferencePolicy, ReferenceStore, remembering

# The option dataclasses are the one source of defaults; the keyword API below reads them.
_SFT, _DPO = SFTConfig(), DPOConfig()


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


NO_GRAD_ROWS = 4
"""A no-grad forward (evaluation, DPO's reference) takes up to this many micro-batches at once: it keeps
no activations for a backward, so it needs far less memory than a training forward of the same rows,
and larger batches run the matrix products faster."""


class LLMAgent:
    """Base of the LoRA fine-tuning agents.

    Args:
        actor_network: a causal LM; wrapped with a LoRA adapter from ``lora_config`` unless it is
            already a ``PeftModel`` (a warm start), in which case its active adapter is trained.
        pad_token_id, pad_token: the tokenizer's padding token (id and text).
        batch_size: rows (SFT) or pairs (DPO) a step is meant to take: the default micro-batch and held-out
            batch size. Each :meth:`learn` takes its step over the whole batch it is given, whose size the gym's
            ``data_batch_size_per_gpu`` sets: give both the same number.
        lr: peak learning rate.
        update_epochs: optimizer steps taken on each batch passed to :meth:`learn`.
        lora_config: a ``peft.LoraConfig``, or a dict of its fields (``{"r": 8, "lora_alpha": 16}``);
            defaults to the command line's (r=16, alpha=32 on q/k/v/o).
        accelerator: an ``accelerate.Accelerator`` or ``None`` for plain PyTorch.
        micro_batch_size: rows (pairs) per forward/backward, from 1 to ``batch_size``; gradients accumulate
            over ``ceil(batch_size / micro_batch_size)`` micro-batches (the last may be smaller: the loss
            divides by the whole step's counts). ``None`` means the whole batch at once.
        max_grad_norm: clip the global gradient norm to this (0 disables clipping).
        weight_decay: AdamW weight decay on adapter weights.
        warmup_steps, total_steps, min_lr_ratio: the learning-rate schedule (see :func:`lr_factor`).
        seed: seeds torch before the adapter is initialised.
        packed: run forward passes padding-free (see ``alignkit.forward``).
        adapter_name: the PEFT adapter this agent trains; other adapters on the same base are left alone.

    Counts are ints (numpy integers too; not bools or floats), rates finite numbers; a wrong type or a value
    out of range is an :class:`~alignkit.gyms.ArgumentError` (a ``UserError``) naming the argument.
    """

    batch_keys, gym = ("input_ids", "attention_mask", "labels"), "SFTGym"   # what learn() reads, from which gym
    other_gym = ("example_ids", "PreferenceGym")   # a key only the other kind of batch has, and its gym

    def __init__(self, actor_network, pad_token_id, pad_token, batch_size=_SFT.batch_size, lr=_SFT.lr,
                 update_epochs=_SFT.update_epochs, lora_config: LoraConfig | dict | None = None, accelerator=None,
                 micro_batch_size=None, max_grad_norm=_SFT.max_grad_norm, weight_decay=_SFT.weight_decay,
                 warmup_steps=0, total_steps=None, min_lr_ratio=_SFT.min_lr_ratio, seed=_SFT.seed,
                 packed=_SFT.packing, adapter_name="default", gradient_checkpointing=_SFT.gradient_checkpointing):
        batch_size, lr = checked("batch_size", batch_size, 1, whole=True), checked("lr", lr, 0, above=True)
        update_epochs, seed = checked("update_epochs", update_epochs, 1, whole=True), checked_seed(seed)
        micro = batch_size if micro_batch_size is None else checked("micro_batch_size", micro_batch_size, 1, whole=True)
        if micro > batch_size:
            raise ArgumentError(f"micro_batch_size must be at most batch_size ({batch_size}) (got {micro})")
        max_grad_norm, weight_decay = checked("max_grad_norm", max_grad_norm, 0), checked("weight_decay", weight_decay, 0)
        warmup_steps, min_lr_ratio = checked("warmup_steps", warmup_steps, 0, whole=True), checked("min_lr_ratio",
                                                                                                   min_lr_ratio, 0, 1)
        total_steps = total_steps if total_steps is None else checked("total_steps", total_steps, 0, whole=True)
        lora_config = lora_config_from(lora_config)
        if not isinstance(actor_network, torch.nn.Module):
            raise ArgumentError(f"actor_network must be a causal language model, e.g. load_model()'s (got "
                                f"{type(actor_network).__name__})")
        check_accelerator(accelerator)
        torch.manual_seed(seed)
        self.pad_token_id, self.pad_token, self.micro_batch_size = pad_token_id, pad_token, micro
        self.batch_size, self.lr, self.update_epochs = batch_size, lr, update_epochs
        self.max_grad_norm, self.weight_decay = max_grad_norm, weight_decay
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        self.packed, self.adapter_name, self.accelerator = packed, adapter_name, accelerator
        self.chat_template: str | None = None  # a replaced chat template, saved beside the adapter
        self.seed = seed
        if isinstance(actor_network, PeftModel) and adapter_name in actor_network.peft_config:
            self.model = actor_network
        else:
            self.model = add_lora(actor_network, lora_config, adapter_name=adapter_name)
        use_fast_linears(self.model)   # oneDNN's products where they measure faster than MKL's (AMD CPUs)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        self.params = self._trained_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.warmup_steps, self.total_steps, self.min_lr_ratio))
        # The policy's forward; under accelerate it runs through the DDP wrapper, which averages the
        # gradients across processes. ``self.model`` stays the plain PeftModel (same parameters).
        self.policy = ResponseLogps(self.model, packed=packed)
        self.sharded = is_sharded(accelerator)
        # DeepSpeed's engine steps the optimizer itself, at the micro-batch boundary this agent marks
        self.deepspeed = is_deepspeed(accelerator)
        if self.deepspeed:
            prepare_deepspeed(accelerator, self.micro_batch_size, max_grad_norm)
        if accelerator is not None:
            self.policy, self.optimizer = accelerator.prepare(self.policy, self.optimizer)
            # FSDP2 replaces each parameter by its shard (the optimizer is moved over by accelerate)
            self.params = self._trained_parameters()
        if self.deepspeed and self.sharded:
            # ZeRO-3 gathers a module's own weights for its forward; the response-only forward reads the
            # output layer's weight outside that layer's forward, so the root module gathers it too
            import deepspeed

            head = self.model.get_base_model().get_output_embeddings()
            for weight in (head.weight, getattr(head, "bias", None)):
                if weight is not None:
                    deepspeed.zero.register_external_parameter(self.policy.module, weight)
        self.steps = 0

    @property
    def partitioned(self) -> bool:
        """Whether this agent's weights or optimizer state are split over processes (FSDP2, DeepSpeed ZeRO), so
        a checkpoint is gathered from all of them."""
        return self.sharded or self.deepspeed

    def _trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in adapter_parameters(self.model, self.adapter_name).values() if p.requires_grad]

    # -- what subclasses define -------------------------------------------------------------------
    def _split(self, batch, size):  # pragma: no cover - abstract
        """Yield micro-batches of ``size`` rows/pairs."""
        raise NotImplementedError

    def _denominators(self, batch) -> tuple[int, ...]:  # pragma: no cover - abstract
        """Counts over this process's share of the step that the loss of every micro-batch divides by."""
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

    def _policy_logps(self, micro, shared_prompts: int = 0):
        return self.policy(micro["input_ids"], micro["attention_mask"], micro["labels"], shared_prompts=shared_prompts)

    @property
    def _processes(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    def _global(self, counts: tuple[int, ...]) -> tuple[int, ...]:
        """The step's counts summed over every process's share (the loss divides by the global count)."""
        if self._processes == 1:
            return counts
        total = self.accelerator.reduce(torch.tensor(counts, dtype=torch.long, device=self.device), "sum")
        return tuple(int(c) for c in total.tolist())

    def _backward(self, loss, last: bool):
        if self.accelerator is None:
            loss.backward()
            return
        # Each process's loss is its share's sum over the GLOBAL count; DDP averages the gradients
        # over processes, so scaling by their number makes the result the global batch's gradient.
        if self.deepspeed:
            # The engine (self.policy) clips and steps when told the step's last backward has run.
            self.policy.set_gradient_accumulation_boundary(last)
            self.policy.backward(loss * self._processes)
            if last:
                self.policy.step()
            return
        self.accelerator.backward(loss * self._processes)

    def _reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Sum statistics across processes (a no-op in one process)."""
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            sums = {k: self.accelerator.reduce(v.detach().float().to(self.device), "sum") for k, v in sums.items()}
        return {k: float(v) for k, v in sums.items()}

    def _check_batch(self, batch) -> None:
        """Refuse a ``batch`` that is not a dict holding the tensors :attr:`batch_keys`, or is the other kind of
        gym's batch (an ArgumentError); make this agent's adapter the active one (see :meth:`activate`)."""
        missing = [k for k in self.batch_keys if not (isinstance(batch, Mapping) and torch.is_tensor(batch.get(k)))]
        key, other = self.other_gym
        if missing or key in batch:
            got = (f"a {other} batch" if not missing else f"a dict without the tensor(s) {', '.join(missing)}"
                   if isinstance(batch, Mapping) else f"a {type(batch).__name__}")
            raise ArgumentError(f"batch must be a dict of the tensors {', '.join(self.batch_keys)}, as "
                                f"{self.gym}.reset() and step() return (got {got})")
        check_token_ids(self.model, batch)
        self.activate()

    def activate(self) -> None:
        """Make this agent's adapter the model's active one: another agent on the same base (its own
        ``adapter_name``) may have switched it. :meth:`learn` and :meth:`test` call it."""
        if self.model.active_adapter != self.adapter_name:
            self.model.set_adapter(self.adapter_name)

    def learn(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Take ``update_epochs`` optimizer steps on ``batch`` (what :attr:`gym`'s ``reset()``/``step()`` return);
        returns the last step's metrics: ``lr`` (the rate used for the step), ``grad_norm`` (before clipping)
        and the subclass's loss statistics, each a true mean over the whole batch."""
        self._check_batch(batch)
        self.model.train()
        for _ in range(self.update_epochs):
            denom = self._global(self._denominators(batch))
            sums: dict[str, torch.Tensor] = {}
            micros = list(self._split(batch, self.micro_batch_size))
            for i, micro in enumerate(micros):
                # Processes synchronise gradients once, on the step's last backward.
                last = i == len(micros) - 1
                quiet = not last and self._processes > 1 and not self.deepspeed
                with self.accelerator.no_sync(self.policy) if quiet else contextlib.nullcontext():
                    loss, stats = self._micro_loss(micro, denom, train=True)
                    self._backward(loss, last)
                add_stats(sums, stats)
            lr = self.scheduler.get_last_lr()[0]
            grad_norm = self._clip()
            self.optimizer.step()   # a no-op under DeepSpeed, whose engine stepped in the last backward
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
        """Metrics over the whole test split of ``env``, as true means over all its rows/tokens.

        ``batch_size``: rows (pairs) per forward; by default up to :data:`NO_GRAD_ROWS` micro-batches.
        """
        if self.gym not in {c.__name__ for c in type(env).__mro__}:
            got = "None" if env is None else f"a {type(env).__name__}"
            raise ArgumentError(f"env must be a {self.gym}, whose test split {type(self).__name__} scores (got {got})")
        if batch_size is not None:
            batch_size = checked("batch_size", batch_size, 1, whole=True)
        self.activate()
        self.model.eval()
        size = batch_size or min(self.batch_size, NO_GRAD_ROWS * self.micro_batch_size)
        batches, idle = env.test_batches(size), 0
        if self.sharded:   # every forward is a collective: each process runs as many as the busiest one
            batches = list(batches)
            idle = most_over_processes(len(batches), self.accelerator) - len(batches)
            if idle and not batches:
                raise ValueError("a process has no held-out rows: the test split has fewer rows than processes")
        sums = sum_stats(self._micro_loss(batch, self._denominators(batch), train=False)[1]
                         for batch in (check_token_ids(self.model, b) for b in batches))
        for _ in range(idle):
            self._join_forward(batches[-1])
        if not sums:
            raise ValueError("the test split is empty")
        return self._finalize(self._reduce(sums))

    def _join_forward(self, batch) -> None:
        """Run the held-out forwards of ``batch`` again only to take part in the other processes' (their
        results are dropped): a sharded process whose share of the test split is done."""
        self._micro_loss(batch, self._denominators(batch), train=False)

    # -- checkpoints ----------------------------------------------------------------------------
    def unwrapped_model(self) -> PeftModel:
        """The PeftModel being trained (the same object with or without accelerate)."""
        return self.model

    def save_checkpoint(self, path, base_model_name: str | None = None, extra_state: dict | None = None):
        """Write ``path/actor/`` (a standard PEFT adapter folder) and the training state beside it."""
        gathered = checkpoints.gather(self) if self.partitioned else None   # every process takes part
        if self.accelerator is not None and not self.accelerator.is_main_process:
            return
        checkpoints.save(self, path, base_model_name=base_model_name, extra_state=extra_state, gathered=gathered)

    def load_checkpoint(self, path) -> dict:
        """Restore adapter weights, optimizer, schedule and step from :meth:`save_checkpoint`'s folder."""
        return checkpoints.load(self, path)


def add_stats(total: dict[str, torch.Tensor], part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add a micro-batch's summed statistics into ``total`` (float64 on the CPU, no graph)."""
    for k, v in part.items():
        total[k] = total.get(k, 0) + v.detach().double().cpu()
    return total


def sum_stats(parts) -> dict[str, torch.Tensor]:
    """The sum of an iterable of statistics dicts (empty when there are none)."""
    total: dict[str, torch.Tensor] = {}
    for part in parts:
        add_stats(total, part)
    return total


def _split_rows(batch, size):
    n = batch["input_ids"].shape[0]
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in batch.items()}


def _response_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of predicted (response) tokens per row of ``labels`` (B, T)."""
    return (labels[:, 1:] != -100).sum(dim=1)


class SFT(LLMAgent):
    """Supervised fine-tuning: cross-entropy on the response tokens (the per-token mean NLL).

    Takes :class:`LLMAgent`'s arguments, with the defaults of ``alignkit sft``.

    Metrics: ``loss`` (mean NLL per response token), ``perplexity`` (exp of it), ``tokens`` (real,
    non-padding tokens processed), plus ``lr`` and ``grad_norm`` from :meth:`learn`.
    """

    def __init__(self, actor_network, pad_token_id, pad_token, batch_size=_SFT.batch_size, lr=_SFT.lr, **kwargs):
        super().__init__(actor_network, pad_token_id, pad_token, batch_size=batch_size, lr=lr, **kwargs)

    def _split(self, batch, size):
        return _split_rows(batch, size)

    def _denominators(self, batch):
        return (int(_response_tokens(batch["labels"]).sum()),)

    def _micro_loss(self, micro, denom, train):
        logps, n_tokens = self._policy_logps(micro)
        loss = sft_loss(logps, max(denom[0], 1))
        stats = {"nll": -logps.sum(), "response_tokens": n_tokens.sum(),
                 "tokens": micro["attention_mask"].sum()}
        return loss, stats

    def _finalize(self, sums):
        loss = sums["nll"] / max(sums["response_tokens"], 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": sums["tokens"]}


def pair_counts(batch) -> tuple[int, int]:
    """``(pairs, chosen response tokens)`` of a DPO batch: what a step's loss is divided by."""
    pairs = batch["example_ids"].shape[0]
    return pairs, int(_response_tokens(batch["labels"][:pairs]).sum())


@dataclass(frozen=True)
class PreferenceObjective:
    """What a DPO loss is made of; turns log-probs into the loss and summed statistics.

    Fields (defaults as ``alignkit dpo``): ``beta`` > 0, the strength of the implicit KL penalty;
    ``nll_alpha`` >= 0, the weight of the NLL term on the chosen response (0 = vanilla DPO);
    ``loss_type``, a key of ``alignkit.losses.PREFERENCE_LOSSES``; ``label_smoothing`` in [0, 0.5),
    ``sigmoid`` only; ``simpo_gamma``, the target margin of ``simpo``.
    """

    beta: float = _DPO.beta
    nll_alpha: float = _DPO.nll_alpha
    loss_type: str = _DPO.loss_type
    label_smoothing: float = _DPO.label_smoothing
    simpo_gamma: float = _DPO.simpo_gamma

    def __post_init__(self):
        for name in ("beta", "nll_alpha", "label_smoothing", "simpo_gamma"):
            checked(name, getattr(self, name))
        if not isinstance(self.loss_type, str):
            raise ArgumentError(f"loss_type must be one of {', '.join(PREFERENCE_LOSSES)} (got {self.loss_type!r})")
        problems = preference_problems(self.beta, self.nll_alpha, self.loss_type, self.label_smoothing, name=str)
        if self.loss_type != "simpo" and self.simpo_gamma != _DPO.simpo_gamma:
            problems.append(f"simpo_gamma applies to loss_type='simpo' only (got loss_type={self.loss_type!r}, "
                            f"simpo_gamma={self.simpo_gamma})")
        if problems:
            raise ArgumentError("; ".join(problems))

    @property
    def reference_free(self) -> bool:
        """Whether the loss ignores the reference policy (``simpo``)."""
        return self.loss_type == "simpo"

    def __call__(self, logps, counts, ref_chosen, ref_rejected, n_pairs: int, n_tokens: int):
        """Loss of P pairs and their summed statistics.

        Args: ``logps`` and ``counts`` (2P,): the policy's summed response log-probs and response token
        counts, chosen rows first; ``ref_chosen``/``ref_rejected`` (P,) or None (reference-free);
        ``n_pairs`` and ``n_tokens``: pairs and chosen tokens of the whole optimizer step, which the
        loss is divided by (so micro-batch losses add up to the step's).
        """
        pairs = logps.shape[0] // 2
        pc, pr = logps[:pairs], logps[pairs:]
        losses, reward_c, reward_r = preference_loss(
            self.loss_type, pc, pr, ref_chosen, ref_rejected, self.beta, chosen_lengths=counts[:pairs],
            rejected_lengths=counts[pairs:], label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma)
        loss, _, _ = dpo_nll_loss(losses, pc, counts[:pairs].sum(), self.nll_alpha,
                                  n_pairs=n_pairs, n_tokens=max(n_tokens, 1))
        sums = {"pairs": torch.tensor(pairs), "dpo_loss": losses.sum(), "nll": -pc.sum(),
                "chosen_tokens": counts[:pairs].sum(), "rewards/chosen": reward_c.sum(),
                "rewards/rejected": reward_r.sum(), "rewards/accuracies": (reward_c > reward_r).float().sum(),
                "logps/chosen": pc.sum(), "logps/rejected": pr.sum()}
        return loss, sums

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """True means from summed statistics (see :class:`DPO` for the names)."""
        n = max(sums["pairs"], 1)
        m = {k: sums[k] / n for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                      "logps/chosen", "logps/rejected")}
        m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
        m["dpo_loss"] = sums["dpo_loss"] / n
        m["nll_loss"] = sums["nll"] / max(sums["chosen_tokens"], 1)
        m["loss"] = m["dpo_loss"] + self.nll_alpha * m["nll_loss"]
        if "tokens" in sums:
            m["tokens"] = sums["tokens"]
        return m


def preference_micro_loss(policy, reference: ReferencePolicy | None, objective: PreferenceObjective, micro: dict,
                          n_pairs: int, n_tokens: int, shortcut: bool, share_prompts: bool = True):
    """One DPO micro-batch: policy log-probs, reference log-probs, loss and summed statistics.

    ``policy(micro, shared_prompts)`` returns the policy's ``(logps, counts)``, each (2P,) (see
    ``alignkit.forward``). ``micro`` holds P pairs (``input_ids``/``attention_mask``/``labels``
    (2P, T), chosen rows first, and ``example_ids`` (P,)). ``shortcut``: the policy is known to equal
    the reference (``ReferencePolicy.is_policy``), so its own log-probs serve as the reference's.
    Returns ``(loss, sums)`` as :class:`PreferenceObjective` does, plus ``tokens`` (real tokens).
    """
    pairs = micro["example_ids"].shape[0]
    shared = pairs if share_prompts else 0
    ids = micro["example_ids"].tolist()
    ref_c = ref_r = None
    if reference is None:      # a reference-free loss
        logps, counts = policy(micro, shared)                        # (2P,)
    elif shortcut:             # before the first update the policy IS the reference
        logps, counts = policy(micro, shared)
        ref_c, ref_r = reference.remember(ids, logps)
    else:                      # cached, or one no-grad forward of the frozen reference
        ref_c, ref_r = reference.logps(micro)                        # (P,) each
        logps, counts = policy(micro, shared)
    loss, sums = objective(logps, counts, ref_c, ref_r, n_pairs, n_tokens)
    sums["tokens"] = micro["attention_mask"].sum()
    return loss, sums


@torch.no_grad()
def score_preferences(model, batches, reference: ReferencePolicy | None, objective: PreferenceObjective,
                      packed: bool = True, share_prompts: bool = True,
                      known: dict[int, tuple[float, float]] | None = None) -> dict[str, float]:
    """Held-out DPO metrics of ``model`` (as it is: adapters active as set) over DPO ``batches``.

    A plain function: no optimizer, nothing trainable. ``reference`` supplies the reference
    log-probs (None for a reference-free loss). ``known``: log-probs of this model already computed
    (see :func:`remembering`), filled with those computed here. Returns the metrics of :class:`DPO`,
    true means over all pairs of all batches.
    """
    was_training = model.training
    model.eval()
    try:
        shortcut = reference is not None and reference.is_policy(updated=False)

        def forward(batch, shared):
            return sequence_logps(model, batch, packed=packed, shared_prompts=shared)

        policy = forward if known is None else remembering(forward, known)
        sums = sum_stats(preference_micro_loss(policy, reference, objective, batch, *pair_counts(batch), shortcut,
                                               share_prompts)[1] for batch in batches)
    finally:
        model.train(was_training)
    if not sums:
        raise ValueError("no held-out pairs to score")
    return objective.metrics({k: float(v) for k, v in sums.items()})


class DPO(LLMAgent):
    """Direct Preference Optimization with an optional NLL term on the chosen response.

    ``loss = mean over pairs of the preference loss + nll_alpha * mean NLL per chosen token``
    (see ``alignkit.losses``). Log-probs are summed over response tokens.

    The reference policy (:class:`alignkit.reference.ReferencePolicy`) is the model the run starts
    from, frozen: the base with this agent's adapter disabled, or, when the model carries a
    ``"reference"`` adapter (a warm start from an SFT adapter, loaded twice), that frozen adapter.

    Extra args (defaults as ``alignkit dpo``): ``beta``, ``nll_alpha``, ``loss_type``,
    ``label_smoothing``, ``simpo_gamma`` (see :class:`PreferenceObjective`); ``share_prompts`` (with
    ``packed``: run each pair's prompt once for both responses; same numbers, fewer FLOPs);
    ``reference_cache``: a :class:`~alignkit.reference.ReferenceStore` to load reference log-probs
    from and save them to (``reference.save()``); ``shared_reference``: another agent's
    ``reference`` on the same base whose cached log-probs this one shares (population members).

    Metrics: ``loss``, ``dpo_loss``, ``nll_loss``, ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``, ``tokens``.
    Rewards are ``beta * (logp_policy - logp_reference)``, means over pairs; accuracy is the share
    of pairs whose chosen reward exceeds the rejected one.
    """

    batch_keys, gym = LLMAgent.batch_keys + ("example_ids",), "PreferenceGym"
    other_gym = ("", "SFTGym")   # an SFT batch lacks example_ids

    def __init__(self, actor_network, pad_token_id, pad_token, batch_size=_DPO.batch_size, lr=_DPO.lr,
                 beta=_DPO.beta, nll_alpha=_DPO.nll_alpha, update_epochs=_DPO.update_epochs, lora_config=None,
                 accelerator=None, loss_type=_DPO.loss_type, label_smoothing=_DPO.label_smoothing,
                 simpo_gamma=_DPO.simpo_gamma, share_prompts=_DPO.share_prompts,
                 reference_cache: ReferenceStore | None = None, shared_reference: ReferencePolicy | None = None,
                 **kwargs):
        self.objective = PreferenceObjective(beta, nll_alpha, loss_type, label_smoothing, simpo_gamma)
        self.share_prompts = share_prompts
        super().__init__(actor_network, pad_token_id, pad_token, batch_size=batch_size, lr=lr,
                         update_epochs=update_epochs, lora_config=lora_config, accelerator=accelerator, **kwargs)
        self.reference = None if self.objective.reference_free else ReferencePolicy(
            self.unwrapped_model(), self.adapter_name, packed=self.packed, share_prompts=share_prompts,
            cache=shared_reference.cache if shared_reference is not None else None, store=reference_cache,
            accelerator=self.accelerator, forward=self.policy if self.sharded else None)
        self.held_out_logps: dict[int, tuple[float, float]] = {}
        self.held_out_step: int | None = None

    def test(self, env, batch_size: int | None = None) -> dict[str, float]:
        """Held-out metrics (see :meth:`LLMAgent.test`); the policy's (chosen, rejected) log-probs of
        every held-out pair this process scored stay in ``held_out_logps``, taken at ``held_out_step``."""
        self.held_out_logps, self.held_out_step = {}, self.steps
        return super().test(env, batch_size)

    def learn(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """:meth:`LLMAgent.learn`; a batch split into micro-batches first gets its pairs' reference
        log-probs in no-grad forwards of up to :data:`NO_GRAD_ROWS` micro-batches each (larger,
        fewer matrix products than one forward per micro-batch)."""
        self._check_batch(batch)
        pairs = batch["example_ids"].shape[0]
        if (self.reference is not None and self.micro_batch_size < pairs
                and not self.reference.is_policy(self.steps > 0, training=True)):
            for chunk in self._split(batch, NO_GRAD_ROWS * self.micro_batch_size):
                self.reference.logps(chunk)
        return super().learn(batch)

    def _split(self, batch, size):
        pairs = batch["example_ids"].shape[0]
        for start in range(0, pairs, size):
            rows = list(range(start, min(start + size, pairs)))
            rows += [pairs + r for r in rows]
            micro = {k: v[rows] for k, v in batch.items() if k != "example_ids"}
            micro["example_ids"] = batch["example_ids"][start:start + size]
            yield micro

    def _denominators(self, batch):
        return pair_counts(batch)

    def _micro_loss(self, micro, denom, train, remember=True):
        shortcut = self.reference is not None and self.reference.is_policy(self.steps > 0, training=train)
        policy = self._policy_logps if train or not remember else remembering(self._policy_logps, self.held_out_logps)
        return preference_micro_loss(policy, self.reference, self.objective, micro, *denom, shortcut,
                                     self.share_prompts)

    def _join_forward(self, batch) -> None:
        # not through ``held_out_logps``: its pairs are known, and the forward must run all the same
        self._micro_loss(batch, self._denominators(batch), train=False, remember=False)

    def _finalize(self, sums):
        return self.objective.metrics(sums)
