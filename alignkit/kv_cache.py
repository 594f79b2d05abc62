"""Key/value caches for decoding: written in place with room to grow, rows that leave and positions
that are forgotten (:func:`new_cache`), their size per token (:func:`cache_bytes_per_token`), and the
cache a conversation keeps from one answer to the next (:class:`ConversationCache`)."""

from __future__ import annotations

import functools

import torch


def new_cache(model, room: int = 0, zeroed: bool = False):
    """An empty key/value cache for ``model``: transformers' ``DynamicCache`` for its config, with
    room for ``room`` positions in each full-attention layer, so a new token is written in place
    instead of copying the whole cache (other kinds of layer, such as sliding windows, stay as
    they are). Meant for :func:`decode`, which only appends and drops rows. ``zeroed``: the room
    starts as zeros, so every position a row has not written holds finite numbers (what rows of
    different lengths in one batch need: see :func:`write_columns` and :func:`admit_rows`)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    if room > 0:
        roomy = _roomy_layer_type()
        cache.layers = [roomy(room, zeroed) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def can_admit(cache) -> bool:
    """Whether rows can join ``cache`` and write at positions of their own (:func:`admit_rows`,
    :func:`write_columns`): every layer is one of :func:`new_cache`'s roomy ones."""
    return all(hasattr(layer, "admit") for layer in cache.layers)


def write_columns(cache, columns: torch.Tensor | None) -> None:
    """Where the next one-token update of ``cache`` (from :func:`new_cache`, every layer roomy) writes:
    row ``i`` at position ``columns[i]`` (rows of different lengths, each in its own place), the filled
    part then reaching the furthest of them; None: every row after the filled part (the default)."""
    where = None
    if columns is not None and columns.numel():
        where = (torch.arange(columns.shape[0], device=columns.device), columns, int(columns.max()) + 1)
    for layer in cache.layers:
        layer.columns = where


def admit_rows(cache, source, starts: list[int], lengths: list[int]) -> None:
    """Append rows to ``cache`` (from :func:`new_cache` with ``zeroed``): row ``j`` of the cache ``source``
    (its positions ``starts[j]`` to ``starts[j] + lengths[j]``, e.g. a left-padded prompt) becomes a new
    last row whose first ``lengths[j]`` positions hold them. The positions after them hold whatever
    finite numbers were there: the new rows' attention masks must leave them out."""
    for layer, other in zip(cache.layers, source.layers, strict=True):
        layer.admit(other, starts, lengths)


def forget_from(cache, length: int) -> None:
    """Forget every position of ``cache`` from ``length`` on, in every layer (each must be able to:
    :func:`forgets_positions`): drafted tokens that were not kept, a conversation's answer that the next
    prompt does not repeat, positions only rows that left had reached."""
    for layer in cache.layers:
        layer.truncate(length)


def forgets_positions(cache) -> bool:
    """Whether every layer of ``cache`` can forget positions from some length on (:func:`new_cache`'s
    full-attention layers can; a sliding window's cannot): what drafts and reuse across answers need."""
    return all(hasattr(layer, "truncate") for layer in cache.layers)


class ConversationCache:
    """The key/value cache a conversation's last answer left, for :func:`decode`'s ``reuse``: the next
    prompt repeats the conversation so far, and the tokens it shares from the start with what the
    cache holds are not computed again (prefilling 600 tokens of conversation costs ~0.7 s on 2 CPU
    cores, 40 new ones ~0.1 s). Only caches that can forget positions (:func:`forgets_positions`) are kept."""

    def __init__(self):
        self.cache, self.ids = None, []

    def claim(self, model, prompt: list[int], room: int):
        """The cache to answer ``prompt`` on (the kept one, cut to the tokens it shares with ``prompt``, or a new
        one) and how many of ``prompt``'s tokens it holds: never all, since the last one's logits pick the
        first answer token. The cache is in use until :meth:`keep` gets it back."""
        cache, self.cache = self.cache, None
        if cache is None:
            return new_cache(model, room=room), 0
        past, limit = 0, min(len(self.ids), len(prompt) - 1)
        while past < limit and self.ids[past] == prompt[past]:
            past += 1
        forget_from(cache, past)
        return cache, past

    def keep(self, cache, ids: list[int]) -> None:
        """Keep ``cache`` for the next prompt; ``ids`` begins with the tokens it holds, in order."""
        if forgets_positions(cache):
            self.cache, self.ids = cache, ids[:cache.get_seq_length()]


@functools.cache
def _roomy_layer_type():
    """The class of :func:`new_cache`'s layers (made on first use: transformers loads late)."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A ``DynamicLayer`` writing into preallocated tensors (twice as large when full); ``keys``
        and ``values`` are views of the filled part of the batch's rows. Appending (after the filled
        part, or per row where :func:`write_columns` says), rows leaving (``batch_select_indices``)
        and rows joining (:func:`admit_rows`) into the room the rows that left freed."""

        def __init__(self, room: int, zeroed: bool = False):
            super().__init__()
            self.room, self.zeroed, self.length, self.rows = room, zeroed, 0, 0
            self.columns = None

        def _allocate(self, rows, like, room):
            """Storage for ``rows`` rows and ``room`` positions, holding what the current storage held."""
            kept = [self._store_keys, self._store_values] if self.rows else []
            make = like.new_zeros if self.zeroed else like.new_empty
            self._store_keys = make(rows, like.shape[1], room, like.shape[3])
            self._store_values = make(rows, like.shape[1], room, like.shape[3])
            if kept:
                self._store_keys[:self.rows, :, :self.length] = kept[0][:self.rows, :, :self.length]
                self._store_values[:self.rows, :, :self.length] = kept[1][:self.rows, :, :self.length]

        def _views(self):
            self.keys = self._store_keys[:self.rows, :, :self.length]
            self.values = self._store_values[:self.rows, :, :self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._allocate(key_states.shape[0], key_states, max(self.room, key_states.shape[-2]))
                self.rows = key_states.shape[0]
            if self.columns is not None:   # one token per row, each at its own position
                rows, columns, end = self.columns
                if end > self._store_keys.shape[-2]:
                    self._allocate(self._store_keys.shape[0], key_states, max(end, 2 * self._store_keys.shape[-2]))
                self._store_keys[rows, :, columns] = key_states[:, :, 0]
                self._store_values[rows, :, columns] = value_states[:, :, 0]
                self.length = max(self.length, end)
                self._views()
                return self.keys, self.values
            end = self.length + key_states.shape[-2]
            if end > self._store_keys.shape[-2]:
                self._allocate(self._store_keys.shape[0], key_states, max(end, 2 * self._store_keys.shape[-2]))
            self._store_keys[:self.rows, :, self.length:end] = key_states
            self._store_values[:self.rows, :, self.length:end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def truncate(self, length: int) -> None:
            """Forget every position from ``length`` on (drafted tokens that were not accepted)."""
            self.length = min(self.length, length)
            if self.is_initialized:
                self._views()

        def batch_select_indices(self, indices) -> None:
            # Row j of the batch becomes old row indices[j], in the same buffers (no fresh allocation, the
            # empty room not copied, and rows already in their place not copied either).
            if self.is_initialized:
                indices = torch.as_tensor(indices, dtype=torch.long, device=self._store_keys.device)
                kept = indices.shape[0]
                moved = (indices != torch.arange(kept, device=indices.device)).nonzero().squeeze(1)
                if moved.numel():
                    sources = indices[moved]
                    for buffer in (self._store_keys, self._store_values):
                        buffer[moved, :, :self.length] = buffer[sources, :, :self.length]   # read, then written
                self.rows = kept
                self._views()

        def admit(self, source, starts: list[int], lengths: list[int]) -> None:
            """:func:`admit_rows` for this layer (``source``: the same layer of the other cache)."""
            if not lengths:
                return
            rows, longest = self.rows + len(lengths), max(lengths)
            if not self.is_initialized:
                self.lazy_initialization(source.keys, source.values)
            store = getattr(self, "_store_keys", None)
            if store is None or rows > store.shape[0] or longest > store.shape[-2]:
                self._allocate(max(rows, store.shape[0] if store is not None else 0), source.keys,
                               max(longest, self.room, store.shape[-2] if store is not None else 0))
            for j, (start, length) in enumerate(zip(starts, lengths, strict=True)):
                self._store_keys[self.rows + j, :, :length] = source.keys[j, :, start:start + length]
                self._store_values[self.rows + j, :, :length] = source.values[j, :, start:start + length]
            self.rows, self.length = rows, max(self.length, longest)
            self._views()

    return RoomyLayer


def rows_in_budget(model, prompts: list[list[int]], max_new_tokens: int, budget: int) -> int:
    """How many rows of ``prompts`` answering ``max_new_tokens`` tokens a key/value cache of ``budget`` bytes holds,
    each row preallocated for the longest prompt (0 when not even one fits)."""
    return budget // (cache_bytes_per_token(model) * (max(len(p) for p in prompts) + max_new_tokens))


def cache_bytes_per_token(model) -> int:
    """Bytes one token of one row takes in ``model``'s key/value cache (keys and values of every layer)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers * 2 * kv_heads * dim * next(model.parameters()).element_size()
