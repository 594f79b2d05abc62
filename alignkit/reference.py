"""The frozen reference policy of DPO, and the caches of its log-probs.

DPO compares the policy with the model the run started from. :class:`ReferencePolicy` owns
everything about that model:

- running it: the base with the trained adapter disabled, or, after a warm start, the frozen
  copy of the warm-start adapter loaded under the name ``"reference"``;
- the step-0 shortcut: before the first update the policy IS the reference (a fresh LoRA adds
  zero; a warm start's trained adapter equals the frozen copy), so the policy's own forward
  supplies the reference log-probs and no second forward is run;
- an in-memory cache keyed by each pair's ``example_id`` (a hash of its tokens), so every pair's
  reference log-probs are computed once per run;
- an optional on-disk cache (:class:`ReferenceStore`) shared by runs whose reference computes the
  same numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import torch

from .forward import layout, response_counts, sequence_logps
from .io import atomic_write_json
from .models import adapter_parameters, cache_dir
from .processes import any_process, is_sharded, local_tensor

logger = logging.getLogger(__name__)

REFERENCE_ADAPTER = "reference"
FORMAT_VERSION = 3  # bump when the numbers a cached entry holds, or the keys of pairs, change meaning


def remember_pairs(cache: dict[int, tuple[float, float]], example_ids: list[int], logps: torch.Tensor) -> None:
    """Add the (chosen, rejected) log-probs of ``logps`` (2P,: chosen rows first) to ``cache`` under the
    pairs' ``example_ids``; an entry already there wins (a pair keeps one number)."""
    pairs = len(example_ids)
    values = logps.detach().float().cpu()
    for i, key in enumerate(example_ids):
        cache.setdefault(key, (float(values[i]), float(values[pairs + i])))


def cached_pairs(cache: dict[int, tuple[float, float]], example_ids: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached (chosen, rejected) log-probs of these pairs, each (P,) float32 on ``device``."""
    values = torch.tensor([cache[k] for k in example_ids], dtype=torch.float32, device=device)
    return values[:, 0], values[:, 1]


class ReferencePolicy:
    """Reference log-probs for DPO batches, from the cache, the policy's forward at step 0, or a forward.

    Args:
        model: the ``PeftModel`` being trained (unwrapped from any accelerate wrapper).
        policy_adapter: the name of the adapter being trained.
        packed, share_prompts: how the reference forward lays out a batch (see ``alignkit.forward``);
            the same layout as the policy's keeps the two numerically alike.
        cache: a dict ``example_id -> (chosen logp, rejected logp)`` to start from and fill (pass one
            dict to several policies that share a reference, e.g. the configurations of a comparison).
        store: an on-disk cache to load from now and to :meth:`save` to.
        accelerator: the run's ``accelerate.Accelerator`` (None in one process). When its processes shard
            the weights (FSDP2, ZeRO-3), a forward one process needs runs in all of them, and decisions about
            the weights are agreed between them.
        forward: the module the reference forward runs through (``input_ids, attention_mask, labels,
            shared_prompts`` -> ``(logps, counts)``); needed when sharded, where it is the root
            that gathers the weights. By default :func:`~alignkit.forward.sequence_logps` of ``model``.
    """

    def __init__(self, model, policy_adapter: str = "default", packed: bool = True, share_prompts: bool = True,
                 cache: dict[int, tuple[float, float]] | None = None, store: ReferenceStore | None = None,
                 accelerator=None, forward=None):
        self.model, self.policy_adapter = model, policy_adapter
        self.accelerator, self.forward = accelerator, forward
        self.lockstep = is_sharded(accelerator)
        self.packed, self.share_prompts = packed, share_prompts
        self.cache = cache if cache is not None else {}
        self.store = store
        if store is not None:
            for key, value in store.load().items():
                self.cache.setdefault(key, value)
        self._saved = set(self.cache) if store is not None else set()

    @contextlib.contextmanager
    def active(self):
        """Run ``self.model`` as the frozen reference inside this block."""
        # PEFT marks the adapter it (re-)activates trainable, on set_adapter and on leaving
        # disable_adapter: remember every flag and put it back, so a frozen adapter stays frozen.
        flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        try:
            if REFERENCE_ADAPTER not in self.model.peft_config:
                with self.model.disable_adapter():
                    yield
            else:
                self.model.set_adapter(REFERENCE_ADAPTER)
                try:
                    yield
                finally:
                    self.model.set_adapter(self.policy_adapter)
        finally:
            for n, p in self.model.named_parameters():
                p.requires_grad_(flags[n])

    def is_policy(self, updated: bool, training: bool = False) -> bool:
        """Whether a forward of the policy computes the reference's log-probs exactly right now.

        False once the policy has been ``updated``. Before that, True when the trained adapter adds
        nothing (every ``lora_B`` is zero, as PEFT initialises it) or equals the frozen
        ``"reference"`` adapter of a warm start, and, for a ``training`` forward, LoRA dropout is off.
        """
        if updated:
            return False
        if training and self.model.training and self.model.peft_config[self.policy_adapter].lora_dropout > 0:
            return False
        # sharded weights: each process looks at its shard (both adapters are cut alike), then they agree
        mine = self._local_weights(self.policy_adapter)
        if REFERENCE_ADAPTER in self.model.peft_config:
            ref = self._local_weights(REFERENCE_ADAPTER)
            same = ref.keys() == mine.keys() and all(torch.equal(p, ref[n]) for n, p in mine.items())
        else:
            same = all(not p.any() for n, p in mine.items() if "lora_B" in n)
        return not any_process(not same, self.accelerator) if self.lockstep else same

    def _local_weights(self, adapter: str) -> dict[str, torch.Tensor]:
        """An adapter's weights (this process's shards of them, when sharded) by their saved names."""
        return {n: local_tensor(p) for n, p in adapter_parameters(self.model, adapter, saved_names=True).items()}

    def remember(self, example_ids: list[int], logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the policy's ``logps`` (2P,) as the reference's for these pairs (the step-0 shortcut).

        Returns the reference log-probs (chosen, rejected), each (P,): an entry already cached (from
        an earlier run) wins, so a pair's reference is the same number every time it is seen.
        """
        remember_pairs(self.cache, example_ids, logps)
        return cached_pairs(self.cache, example_ids, logps.device)

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs (chosen, rejected), each (P,), for a DPO batch of P pairs.

        Cached pairs are looked up; the others run through the reference in one no-grad forward
        (in eval mode: no dropout in the reference) and are cached.
        """
        ids = batch["example_ids"].tolist()
        missing = [i for i, key in enumerate(ids) if key not in self.cache]
        device = next(p for p in self.model.parameters()).device
        # sharded processes run every forward together: one whose pairs are all cached joins the others'
        run = any_process(bool(missing), self.accelerator) if self.lockstep else bool(missing)
        if run:
            pairs = len(ids)
            run_pairs = missing or list(range(pairs))
            n = len(run_pairs)
            rows = run_pairs + [pairs + i for i in run_pairs]
            sub = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "labels")}
            shared = n if self.packed and self.share_prompts else 0
            was_training = self.model.training
            self.model.eval()
            with self.active():
                if self.forward is not None:
                    logps, _ = self.forward(sub["input_ids"], sub["attention_mask"], sub["labels"],
                                            shared_prompts=shared)
                else:
                    logps, _ = sequence_logps(self.model, sub, packed=self.packed, shared_prompts=shared)
            self.model.train(was_training)
            values = logps.float().cpu()
            for j, i in enumerate(missing):
                self.cache[ids[i]] = (float(values[j]), float(values[n + j]))
        return cached_pairs(self.cache, ids, device)

    def state_dict(self) -> dict[str, list[float]]:
        """The cached entries as JSON-able data (for a checkpoint: a resumed run then uses the very same
        reference numbers as the run it continues)."""
        return {str(k): list(v) for k, v in self.cache.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        """Take the entries of :meth:`state_dict`; they win over entries loaded from the store."""
        self.cache.update({int(k): (float(v[0]), float(v[1])) for k, v in state.items()})

    def save(self) -> int:
        """Add the entries computed since loading to the on-disk store; returns how many (0 without one)."""
        if self.store is None:
            return 0
        new = {k: v for k, v in self.cache.items() if k not in self._saved}
        if new:
            self.store.save(new)
            self._saved.update(new)
        return len(new)


class ReferenceStore:
    """On-disk reference log-probs of one reference policy: a folder of JSON shard files.

    Each :meth:`save` writes its entries as a new shard under a unique name (atomically), so
    processes writing at the same time never overwrite each other; :meth:`load` merges every
    shard. Past ``max_shards`` files a save folds the shards it read into one and deletes exactly
    those, so a shard written meanwhile by another process survives.
    """

    def __init__(self, folder: str | os.PathLike, max_shards: int = 16):
        self.folder, self.max_shards = Path(folder), max_shards

    def _shards(self) -> list[Path]:
        return sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []

    def _read(self, shards: list[Path]) -> dict[int, tuple[float, float]]:
        merged: dict[int, tuple[float, float]] = {}
        for shard in shards:
            try:
                data = json.loads(shard.read_text())
                entries = {int(k): (float(v[0]), float(v[1])) for k, v in data["entries"].items()}
            except FileNotFoundError:  # folded into another shard by a concurrent save
                continue
            except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
                logger.warning("ignoring unreadable reference cache shard %s: %s", shard, exc)
                continue
            for key, value in entries.items():
                merged.setdefault(key, value)
        return merged

    def load(self) -> dict[int, tuple[float, float]]:
        """Every cached entry (empty when nothing was saved yet)."""
        return self._read(self._shards())

    def save(self, entries: dict[int, tuple[float, float]]) -> None:
        """Add ``entries`` to the store as one new shard (nothing when there are none)."""
        if not entries:
            return
        self._write(entries)
        shards = self._shards()
        if len(shards) > self.max_shards:
            merged = self._read(shards)
            self._write(merged)
            for shard in shards:
                shard.unlink(missing_ok=True)

    def _write(self, entries: dict[int, tuple[float, float]]) -> Path:
        path = self.folder / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.json"
        atomic_write_json(path, {"version": FORMAT_VERSION,
                                 "entries": {str(k): list(v) for k, v in entries.items()}}, indent=None)
        return path


def _base_identity(base_model: str) -> str:
    """What tells one version of ``base_model`` from another: the content digest of a GGUF file (the
    embedded model's too, so a reinstalled package with other weights gets a fresh cache), the
    :func:`~alignkit.models.file_stamp` of a local folder's config and weight files (sharded ones included):
    a file rewritten in place changes its stamp even when its size and modification time are kept."""
    from .errors import UserError
    from .models import file_stamp, gguf_cache_path, resolve_model_source

    try:
        source = resolve_model_source(base_model)
    except UserError:   # a name that does not resolve here keys by itself
        return ""
    if source.kind in ("embedded", "gguf"):
        return gguf_cache_path(source.location).name
    if source.kind == "local":
        folder = Path(source.location)
        files = sorted([folder / "config.json", *folder.glob("*.safetensors")])
        return "|".join(f"{f.name}:{file_stamp(f)}" for f in files if f.is_file())
    return ""


def _canonical_config(path: Path) -> str:
    """An adapter config as text that is the same for the same settings: keys sorted, and lists of names
    sorted (PEFT writes ``target_modules``, a set, in an order that changes from process to process)."""
    def canonical(value):
        if isinstance(value, dict):
            return {k: canonical(v) for k, v in value.items()}
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return sorted(value)
        return [canonical(v) for v in value] if isinstance(value, list) else value

    try:
        return json.dumps(canonical(json.loads(path.read_text())), sort_keys=True)
    except (OSError, ValueError):
        return path.read_bytes().hex() if path.is_file() else ""


def reference_store(model, base_model: str, load_path: str | None, packed: bool, share_prompts: bool,
                    root: Path | None = None) -> ReferenceStore:
    """The on-disk store for the reference a run will use, keyed by everything that decides its numbers.

    The key hashes the base model (and what tells its versions apart, see :func:`_base_identity`, so
    a model rewritten in place gets a fresh cache), the warm-start adapter's weights, the
    resolved device type and dtype of ``model``'s weights, and the forward's layout (packing, its
    one-row or binned form, and shared prompts change the float rounding). Pairs inside are keyed by
    a hash of their tokens, so one store serves every dataset, split and epoch.
    """
    weight = next(model.parameters())
    h = hashlib.sha256(f"v{FORMAT_VERSION}|{base_model}|{weight.device.type}|{weight.dtype}|"
                       f"packed={packed}|shared={packed and share_prompts}|layout={layout(model, packed)}".encode())
    h.update(_base_identity(base_model).encode())
    if load_path:   # its weights and its config (alpha, rank, rsLoRA scale the same weights differently)
        h.update((Path(load_path) / "adapter_model.safetensors").read_bytes())
        h.update(_canonical_config(Path(load_path) / "adapter_config.json").encode())
    return ReferenceStore((root or cache_dir() / "reference_logps") / h.hexdigest()[:24])


def remembering(policy, known: dict[int, tuple[float, float]]):
    """``policy`` (as ``alignkit.agents.preference_micro_loss`` takes it) that remembers its log-probs in ``known``.

    ``known`` maps a pair's ``example_id`` to its (chosen, rejected) log-probs under this very model.
    A batch whose pairs are all there is looked up instead of run (no gradient: for scoring only); the
    log-probs of the batches that run are added to it.
    """
    def run(micro, shared):
        ids = micro["example_ids"].tolist()
        if ids and all(key in known for key in ids):
            return torch.cat(cached_pairs(known, ids, micro["labels"].device)), response_counts(micro["labels"])
        logps, counts = policy(micro, shared)
        remember_pairs(known, ids, logps)
        return logps, counts
    return run
