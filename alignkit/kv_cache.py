"""Key/value caches for decoding: written in place with room to grow, rows that leave and positions
that are forgotten (:func:`new_cache`), their size per token (:func:`cache_bytes_per_token`), and the
cache a conversation keeps from one answer to the next (:class:`ConversationCache`)."""

from __future__ import annotations

import functools

import torch


def new_cache(model, room: int = 0):
    """An empty key/value cache for ``model``: transformers' ``DynamicCache`` for its config, with
    room for ``room`` positions in each full-attention layer, so a new token is written in place
    instead of copying the whole cache (other kinds of layer, such as sliding windows, stay as
    they are). Meant for :func:`decode`, which only appends and drops rows."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    if room > 0:
        roomy = _roomy_layer_type()
        cache.layers = [roomy(room) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


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
        for layer in cache.layers:
            layer.truncate(past)
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
        and ``values`` are views of the filled part. Appending and ``batch_select_indices`` only."""

        def __init__(self, room: int):
            super().__init__()
            self.room, self.length = room, 0

        def _allocate(self, like_keys, like_values, room):
            kept_keys, kept_values = self.keys, self.values
            self._keys = like_keys.new_empty(*like_keys.shape[:2], room, like_keys.shape[3])
            self._values = like_values.new_empty(*like_values.shape[:2], room, like_values.shape[3])
            if self.length:
                self._keys[:, :, :self.length] = kept_keys
                self._values[:, :, :self.length] = kept_values

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._allocate(key_states, value_states, max(self.room, key_states.shape[-2]))
            end = self.length + key_states.shape[-2]
            if end > self._keys.shape[-2]:
                self._allocate(key_states, value_states, max(end, 2 * self._keys.shape[-2]))
            self._keys[:, :, self.length:end] = key_states
            self._values[:, :, self.length:end] = value_states
            self.length = end
            self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def truncate(self, length: int) -> None:
            """Forget every position from ``length`` on (drafted tokens that were not accepted)."""
            self.length = min(self.length, length)
            if self.is_initialized:
                self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]

        def batch_select_indices(self, indices) -> None:
            # Rows only leave: row j of the batch becomes old row indices[j], in the same buffers (no fresh
            # allocation, the empty room not copied, and rows already in their place not copied either).
            if self.is_initialized:
                indices = torch.as_tensor(indices, dtype=torch.long, device=self._keys.device)
                kept = indices.shape[0]
                moved = (indices != torch.arange(kept, device=indices.device)).nonzero().squeeze(1)
                if moved.numel():
                    sources = indices[moved]
                    for buffer in (self._keys, self._values):
                        buffer[moved, :, :self.length] = buffer[sources, :, :self.length]   # read, then written
                self._keys, self._values = self._keys[:kept], self._values[:kept]
                self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]

    return RoomyLayer


def cache_bytes_per_token(model) -> int:
    """Bytes one token of one row takes in ``model``'s key/value cache (keys and values of every layer)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers * 2 * kv_heads * dim * next(model.parameters()).element_size()
