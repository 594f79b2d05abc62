"""The reference policy's on-disk cache: entries survive concurrent writers, files are never half-written."""

import json
import subprocess
import sys

import torch

from alignkit.reference import ReferencePolicy, ReferenceStore, _base_identity, reference_store

WRITER = """
import sys
from alignkit.reference import ReferenceStore
store = ReferenceStore(sys.argv[1], max_shards=3)   # few shards: writers fold each other's files often
worker = int(sys.argv[2])
for i in range(40):
    store.save({worker * 1000 + i: (float(-i), float(-2 * i))})
"""


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    folder = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(w)]) for w in (1, 2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    loaded = ReferenceStore(folder).load()
    expected = {w * 1000 + i: (float(-i), float(-2 * i)) for w in (1, 2) for i in range(40)}
    assert loaded == expected
    for shard in folder.iterdir():   # no temporary or broken file left behind
        assert shard.suffix == ".json" and not shard.name.startswith(".")
        assert isinstance(json.loads(shard.read_text())["entries"], dict)


def test_unreadable_shard_is_skipped_with_a_warning(tmp_path, caplog):
    store = ReferenceStore(tmp_path)
    store.save({1: (-1.0, -2.0)})
    (tmp_path / "broken.json").write_text("{not json")
    assert store.load() == {1: (-1.0, -2.0)}
    assert "unreadable reference cache shard" in caplog.text


class _Policy(torch.nn.Module):
    """Just enough of a PeftModel for the cache bookkeeping (no forward is run)."""

    peft_config = {"default": None}

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def test_policy_saves_only_what_it_computed_and_keeps_the_first_value(tmp_path):
    store = ReferenceStore(tmp_path)
    store.save({7: (-3.0, -4.0)})
    ref = ReferencePolicy(_Policy(), store=store)
    assert ref.cache == {7: (-3.0, -4.0)}
    chosen, rejected = ref.remember([7, 8], torch.tensor([-30.0, -5.0, -40.0, -6.0]))
    # pair 7 was cached by an earlier run: its value wins, so a pair's reference never changes
    assert chosen.tolist() == [-3.0, -5.0] and rejected.tolist() == [-4.0, -6.0]
    assert ref.save() == 1 and ref.save() == 0
    assert store.load() == {7: (-3.0, -4.0), 8: (-5.0, -6.0)}
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_the_store_of_a_base_changes_with_its_weights_not_its_place(tmp_path):
    model = torch.nn.Linear(2, 2)
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for i in (1, 2):
        (folder / f"model-0000{i}-of-00002.safetensors").write_bytes(b"x" * i)
    first = reference_store(model, str(folder), None, True, True, root=tmp_path / "stores").folder
    assert reference_store(model, str(folder), None, True, True, root=tmp_path / "stores").folder == first
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"yyy")     # one shard rewritten
    assert reference_store(model, str(folder), None, True, True, root=tmp_path / "stores").folder != first
    # a GGUF file is known by its content: the same bytes elsewhere, the same identity; other bytes, another
    one, two = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for path in (one, two):
        path.parent.mkdir()
        path.write_bytes(b"GGUF-1")
    assert _base_identity(str(one)) == _base_identity(str(two)) != ""
    two.write_bytes(b"GGUF-2")
    assert _base_identity(str(one)) != _base_identity(str(two))
    assert _base_identity("org/not-here") == ""   # a hub id keys by its name alone


def test_the_store_of_an_adapter_changes_with_its_config_too(tmp_path):
    """The same LoRA weights scaled otherwise (another lora_alpha) compute other log-probs: another store."""
    model = torch.nn.Linear(2, 2)
    adapter = tmp_path / "actor"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    first = reference_store(model, "base", str(adapter), True, True, root=tmp_path / "stores").folder
    # the same settings written in another order (PEFT writes target_modules, a set, in any order): the same store
    (adapter / "adapter_config.json").write_text(json.dumps({"target_modules": ["q", "v"], "r": 8, "lora_alpha": 16}))
    same = reference_store(model, "base", str(adapter), True, True, root=tmp_path / "stores").folder
    (adapter / "adapter_config.json").write_text(json.dumps({"lora_alpha": 16, "r": 8, "target_modules": ["v", "q"]}))
    assert reference_store(model, "base", str(adapter), True, True, root=tmp_path / "stores").folder == same
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 128, "target_modules": ["v", "q"]}))
    assert reference_store(model, "base", str(adapter), True, True, root=tmp_path / "stores").folder not in (first, same)


def test_the_store_is_kept_per_forward_layout(tmp_path, make_model):
    """One-row, binned and padded forwards round differently: each keeps its own reference log-probs."""
    model = make_model()
    folders = set()
    for attention, packed in (("sdpa", True), ("eager", True), ("sdpa", False)):
        model.config._attn_implementation = attention
        folders.add(reference_store(model, "base", None, packed, True, root=tmp_path).folder)
    assert len(folders) == 3
