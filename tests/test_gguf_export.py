"""``alignkit export --format gguf``: files that transformers' own GGUF loader reads back as the same
model and tokenizer, an Ollama Modelfile, and one-line errors for what cannot be exported."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.cli import main
from alignkit.compare import DEFAULT_PROMPTS
from alignkit.errors import UserError
from alignkit.evaluate import chat_prompt_ids, generate_answers, load_for_generation
from alignkit.gguf_export import permute_qk, write_gguf, write_modelfile
from alignkit.models import DEFAULT_MODEL, load_model

PROMPTS = DEFAULT_PROMPTS + ["Hi! 12345 + 678 = ?", "  leading spaces\tand tabs\n\nnew lines ünïcödé 日本語 🙂"]


def _save_adapter(model, folder, base_name=None, seed=0):
    """Put a LoRA adapter with small random B (so merging changes the model) on every projection of
    ``model`` and save it in ``folder``; returns the PEFT model."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    peft_model.save_pretrained(folder)
    if base_name:   # as alignkit's training records it (e.g. the embedded model's command-line name)
        config_file = folder / "adapter_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": base_name}))
    return peft_model


def _logits(model, tokenizer, prompts):
    with torch.no_grad():
        return [model(torch.tensor([chat_prompt_ids(tokenizer, p)])).logits[0] for p in prompts]


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _reload(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    _save_adapter(load_model(tiny_model_dir, device="cpu"), folder)
    return folder


def test_qk_permutation_is_undone_by_transformers_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    undo = LlamaTensorProcessor()._reverse_permute_weights
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)   # 3 heads of dimension 4
    assert not np.array_equal(permute_qk(w, 3), w)
    np.testing.assert_array_equal(undo(permute_qk(w, 3), 3, 3), w)
    np.testing.assert_array_equal(undo(permute_qk(w, 3), 6, 3), w)   # keys: kv heads win


def test_f32_through_the_cli_round_trips_model_and_tokenizer(tiny_model_dir, tiny_adapter, tmp_path, capsys):
    out = tmp_path / "tiny.gguf"
    assert main(["export", "--load-path", str(tiny_adapter), "--format", "gguf", "--quant", "f32",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"GGUF written to {out}" in printed and "MB, f32" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]   # no temporary file left behind

    adapted, tokenizer = load_for_generation(str(tiny_model_dir), tiny_adapter, device="cpu")
    merged = adapted.merge_and_unload()
    reloaded = _reload(out)
    assert reloaded.config.tie_word_embeddings and reloaded.config.num_key_value_heads == 2
    assert _max_diff(_logits(merged, tokenizer, PROMPTS[:3]), _logits(reloaded, tokenizer, PROMPTS[:3])) < 1e-4
    assert (generate_answers(reloaded, tokenizer, PROMPTS, max_new_tokens=20)
            == generate_answers(merged, tokenizer, PROMPTS, max_new_tokens=20))

    tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert tok.chat_template == tokenizer.chat_template
    for prompt in PROMPTS:
        assert tok(prompt)["input_ids"] == tokenizer(prompt)["input_ids"], prompt
        assert chat_prompt_ids(tok, prompt) == chat_prompt_ids(tokenizer, prompt), prompt
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)


@pytest.fixture(scope="module")
def small_tokenizer(tokenizer):
    """A byte-level BPE tokenizer of ~300 tokens (reads back from GGUF in a fraction of a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(PROMPTS * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    small = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=specials[0], bos_token=specials[1],
                                    eos_token=specials[2], pad_token=specials[2])
    small.chat_template = tokenizer.chat_template
    return small


@pytest.mark.parametrize("quant, tolerance", [("f16", 5e-2), ("q8_0", 0.2)])
def test_f16_and_q8_0_load_back_close(quant, tolerance, small_tokenizer, tmp_path):
    from gguf import GGUFReader

    tok = small_tokenizer
    model = make_tiny_model(len(tok) + 3, seed=1)  # 3 embedding rows without a token, as models often have
    model.config.tie_word_embeddings = False    # an untied model writes output.weight too
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 0.01)
    path, notes = write_gguf(model, tok, tmp_path / f"m-{quant}.gguf", quant=quant)
    assert notes == []   # a plain byte-level pre-tokenizer has a llama.cpp name ("gpt-2")
    reader = GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"   # 1-D stays f32
    assert types["blk.0.attn_q.weight"] == types["output.weight"] == quant.upper()
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert reader.fields["tokenizer.ggml.tokens"].contents()[-1] == f"[PAD{len(tok) + 2}]"
    reloaded = _reload(path)
    assert not reloaded.config.tie_word_embeddings
    diff = _max_diff(_logits(model, tok, PROMPTS[:3]), _logits(reloaded, tok, PROMPTS[:3]))
    assert diff < tolerance, diff
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert [back(p)["input_ids"] for p in PROMPTS] == [tok(p)["input_ids"] for p in PROMPTS]


def test_modelfile_translates_chatml_and_falls_back_for_other_templates(tokenizer, plain_tokenizer, tmp_path):
    path, notes = write_modelfile(tmp_path / "model.gguf", tokenizer, context_length=8192)
    text = path.read_text()
    assert path == tmp_path / "Modelfile" and notes == []
    assert text.startswith("FROM ./model.gguf\n")
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n" in text and "<|im_start|>assistant\n" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    for line in ('PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"', "PARAMETER temperature 0.7",
                 "PARAMETER num_ctx 4096"):
        assert line in text.splitlines(), line

    other = tmp_path / "other"
    other.mkdir()
    path, notes = write_modelfile(other / "m.gguf", plain_tokenizer)
    assert "{{ .Prompt }}" in path.read_text() and 'PARAMETER stop "<|im_end|>"' in path.read_text()
    assert len(notes) == 1 and "not ChatML" in notes[0]
    # a system message of the user's replaces the template's default, in either kind of template
    for folder, tok in ((tmp_path / "own", tokenizer), (other / "own", plain_tokenizer)):
        folder.mkdir()
        text = write_modelfile(folder / "m.gguf", tok, system="You answer warmly.")[0].read_text()
        assert [line for line in text.splitlines() if line.startswith("SYSTEM")] == ['SYSTEM """You answer warmly."""']


@pytest.mark.parametrize("argv, needle", [
    (["--quant", "q4_k_m"], "can only produce f32, f16, q8_0; export f16 and requantize it with llama.cpp's "
                            "llama-quantize"),
    (["--out", "{tmp}/model.bin"], "give a file name ending in .gguf"),
    (["--out", "{tmp}/exists.gguf"], "already exists; choose another file name"),
    (["--system", "Be kind."], "--system sets the Ollama Modelfile's system message: add --ollama"),
    (["--system", 'Say """hi"""', "--ollama", ""], '--system must be non-empty text without """'),
])
def test_bad_gguf_flags_are_one_line(argv, needle, tmp_path, capsys):
    (tmp_path / "exists.gguf").write_bytes(b"keep me")
    flags = {"--out": str(tmp_path / "new.gguf"), "--quant": "f16"}
    flags.update(dict(zip(argv[::2], [a.format(tmp=tmp_path) for a in argv[1::2]], strict=True)))
    code = main(["export", "--load-path", str(tmp_path / "adapter"), "--format", "gguf",
                 *[x for kv in flags.items() for x in kv if x != ""]])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep me"
    assert main(["export", "--load-path", "x", "--out", str(tmp_path / "f"), "--quant", "f16"]) == 2
    assert "--quant, --ollama and --system apply to --format gguf" in capsys.readouterr().err


def test_non_llama_base_is_refused_in_one_line(tokenizer, tmp_path, capsys):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    base = tmp_path / "qwen"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    adapter = tmp_path / "adapter"
    _save_adapter(load_model(base, device="cpu"), adapter, base_name=str(base))
    out = tmp_path / "q.gguf"
    capsys.readouterr()
    assert main(["export", "--load-path", str(adapter), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "supports llama-architecture models" in err and "'qwen2'" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "qwen"]


def test_a_failed_write_leaves_no_file(small_tokenizer, tmp_path):
    model = make_tiny_model(len(small_tokenizer))
    model.model.register_parameter("extra", torch.nn.Parameter(torch.zeros(4, 32)))   # no GGUF name
    with pytest.raises(UserError, match="does not know where the weight 'model.extra'"):
        write_gguf(model, small_tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_embedded_model_through_the_cli_with_ollama(tokenizer, tmp_path):
    from gguf import GGUFReader

    adapter = tmp_path / "adapter"
    merged = _save_adapter(load_model(DEFAULT_MODEL, device="cpu"), adapter, base_name=DEFAULT_MODEL).merge_and_unload()
    out = tmp_path / "gguf" / "smol.gguf"
    proc = subprocess.run([sys.executable, "-m", "alignkit.cli", "export", "--load-path", str(adapter),
                           "--format", "gguf", "--out", str(out), "--ollama"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MB, f16" in proc.stdout and "Modelfile" in proc.stdout
    assert (out.parent / "Modelfile").read_text().startswith("FROM ./smol.gguf\n")

    fields = GGUFReader(out).fields
    meta = {k: fields[k].contents() for k in ("general.architecture", "tokenizer.ggml.pre", "tokenizer.chat_template",
                                               "llama.attention.head_count_kv", "general.file_type")}
    assert meta == {"general.architecture": "llama", "tokenizer.ggml.pre": "smollm", "llama.attention.head_count_kv": 3,
                    "tokenizer.chat_template": tokenizer.chat_template, "general.file_type": 1}

    diff = _max_diff(_logits(merged, tokenizer, PROMPTS[:2]), _logits(_reload(out), tokenizer, PROMPTS[:2]))
    assert diff < 5e-2, diff
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == DEFAULT_MODEL


@pytest.mark.parametrize("fmt", ["folder", "gguf"])
def test_sigterm_during_an_export_leaves_no_partial_file_and_keeps_an_empty_out(fmt, tiny_adapter, tmp_path,
                                                                                  monkeypatch, capsys):
    import os
    import signal
    from pathlib import Path

    from alignkit import gguf_export
    from alignkit.io import atomic_write

    def die_while_writing(path: Path) -> None:   # part of a file written, then the signal
        path.write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    if fmt == "gguf":
        monkeypatch.setattr(gguf_export, "write_gguf", lambda model, tokenizer, out, **kw: atomic_write(
            out, die_while_writing))
        out, argv = tmp_path / "m.gguf", ["--format", "gguf"]
    else:
        from transformers import PreTrainedModel

        monkeypatch.setattr(PreTrainedModel, "save_pretrained",
                            lambda self, folder, **kw: die_while_writing(Path(folder) / "model.safetensors"))
        out, argv = tmp_path / "merged", []
        out.mkdir()   # an empty --out the user made
    assert main(["export", "--load-path", str(tiny_adapter), "--out", str(out), *argv]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "SIGTERM: the export stopped; nothing was written"
    # no hidden temporary file or folder; the user's empty folder stays
    assert [p.name for p in tmp_path.iterdir()] == (["merged"] if fmt == "folder" else [])
    if fmt == "folder":
        assert list(out.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is previous   # the handler is put back
