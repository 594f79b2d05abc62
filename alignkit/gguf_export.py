"""Writing a merged llama-architecture model as one GGUF file, and an Ollama ``Modelfile`` beside it.

A GGUF file is what llama.cpp, Ollama and LM Studio run: the weights plus everything needed to use
them (hyper-parameters, the tokenizer's vocabulary and merges, the chat template) as metadata under
llama.cpp's key names. :func:`write_gguf` writes one with the ``gguf`` package's ``GGUFWriter``, the
way llama.cpp's own converter lays out a Hugging Face llama model:

- tensors are renamed (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``), and
  ``output.weight`` is written only when the output layer is not tied to the token embeddings;
- the rows of the query and key projections are reordered per head (:func:`permute_qk`): Hugging
  Face keeps the two rotary halves of a head apart, llama.cpp wants them interleaved;
- 1-D tensors (the RMS norms) stay float32 whatever the quantisation, as llama.cpp does.

Only the quantisations gguf's Python writer can produce are offered (:data:`QUANTS`); llama.cpp's
``llama-quantize`` turns the f16 file into any other (q4_k_m, ...).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .errors import UserError
from .io import atomic_write, atomic_write_text

QUANTS = ("f32", "f16", "q8_0")
"""Quantisations :func:`write_gguf` writes (default f16)."""

SUPPORTED_MODEL_TYPES = ("llama",)
"""``config.model_type`` values that can be exported (llama's layout; tested on SmolLM2 and tiny llamas)."""

# Hugging Face llama parameter names -> llama.cpp's, per layer and for the whole model.
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_MODEL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_PARAM = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")

# Hugging Face pre-tokenizers (as tokenizer.json spells them) -> llama.cpp's name for the same split.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def check_quant(quant: str) -> str:
    """``quant`` lower-cased when :func:`write_gguf` can write it; else a UserError naming the options."""
    q = str(quant).lower()
    if q in QUANTS:
        return q
    raise UserError(f"--quant {quant}: gguf's Python writer can only produce {', '.join(QUANTS)}; "
                    "export f16 and requantize it with llama.cpp's llama-quantize "
                    "(e.g. llama-quantize model.gguf model-q4_k_m.gguf q4_k_m)")


def check_gguf_out(out, modelfile: bool = False) -> Path:
    """``out`` as a Path when it names a new ``.gguf`` file (and, with ``modelfile``, no Modelfile
    exists beside it); else a UserError. Nothing is ever overwritten."""
    path = Path(out)
    if path.suffix.lower() != ".gguf":
        raise UserError(f"--out {out}: with --format gguf, give a file name ending in .gguf (e.g. model.gguf)")
    if path.exists():
        raise UserError(f"--out {out} already exists; choose another file name")
    if modelfile and (path.parent / "Modelfile").exists():
        raise UserError(f"{path.parent / 'Modelfile'} already exists; write the GGUF file into another folder "
                        "or leave out --ollama")
    return path


def check_supported(config) -> None:
    """UserError unless ``config`` describes a model :func:`write_gguf` lays out correctly."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"GGUF export supports llama-architecture models (model_type 'llama', e.g. SmolLM2, "
                        f"Llama); this base is {model_type!r}: use --format folder")
    problems = []
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("bias terms in attention or MLP")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"activation {config.hidden_act!r}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        problems.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r}")
    if problems:
        raise UserError(f"GGUF export supports plain llama layouts; this model has {', '.join(problems)}: "
                        "use --format folder")


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a query or key projection (``n_head`` heads) from Hugging Face's rotary
    layout (each head's first half, then its second half) to llama.cpp's (the halves interleaved).

    transformers' GGUF loader undoes this (``LlamaTensorProcessor._reverse_permute_weights``).
    """
    rows = weight.shape[0]
    half = rows // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model):
    """``(gguf_name, float32 array)`` for every weight of a llama ``model``, in llama.cpp's naming and layout.

    The output layer is written only when it differs from the token embeddings (untied, or a tied
    model whose lm_head an adapter changed), so the file ties exactly when the weights are equal.
    """
    import torch

    config = model.config
    weights = model.state_dict()
    embeddings = weights.get("model.embed_tokens.weight")
    for name, tensor in weights.items():
        if name == "lm_head.weight" and embeddings is not None and torch.equal(tensor, embeddings):
            continue  # tied: llama.cpp (and transformers' loader) reuse token_embd.weight when output.weight is absent
        array = tensor.detach().float().cpu().numpy()
        if name in _MODEL_NAMES:
            yield _MODEL_NAMES[name], array
            continue
        match = _LAYER_PARAM.fullmatch(name)
        if not match or match.group(2) not in _LAYER_NAMES:
            raise UserError(f"GGUF export does not know where the weight {name!r} goes in a llama GGUF file")
        block, part = match.group(1), match.group(2)
        if part == "self_attn.q_proj":
            array = permute_qk(array, config.num_attention_heads)
        elif part == "self_attn.k_proj":
            array = permute_qk(array, config.num_key_value_heads)
        yield f"blk.{block}.{_LAYER_NAMES[part]}.weight", array


def _pre_tokenizer_name(spec: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer (how text is split before BPE) of the tokenizer.json
    ``spec``, if known."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's split (llama.cpp splits "starcoder" the same way)
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    return None


def read_pre_tokenizer(gguf_file) -> str | None:
    """``tokenizer.ggml.pre`` of an existing GGUF file (e.g. the one the base model came from), if set."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_file).fields.get("tokenizer.ggml.pre")
    return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None


def _byte_level_bpe(tokenizer) -> dict:
    """The tokenizer.json of a byte-level BPE tokenizer (GPT-2 style); a UserError for any other kind."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if spec.get("model", {}).get("type") != "BPE" or '"ByteLevel"' not in text:
        raise UserError("GGUF export supports byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and Llama 3 "
                        "use); this tokenizer is not one")
    return spec


def _add_tokenizer(writer, tokenizer, spec: dict, vocab_size: int, pre: str) -> None:
    """Vocabulary, token types, merges, special ids and chat template, under llama.cpp's keys."""
    from gguf import TokenType

    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise UserError(f"the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embeddings")
    by_id = {i: t for t, i in vocab.items()}
    added = getattr(tokenizer, "added_tokens_decoder", {})
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embeddings rows without a token: llama.cpp's converter pads them the same way
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    # Whether encoding adds BOS/EOS, read off the tokenizer's behaviour rather than its flags.
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = full.index(plain[0]) if plain and plain[0] in full else 0
    writer.add_add_bos_token(start > 0 and full[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(full) > start + len(plain) and full[-1] == tokenizer.eos_token_id)
    writer.add_add_space_prefix(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def _encode(array: np.ndarray, qtype):
    """``(data, raw_dtype)`` for ``GGUFWriter.add_tensor``: 1-D tensors and rows that do not split into
    quantisation blocks fall back to float32 / float16, as llama.cpp's converter does."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    if array.ndim == 1 or qtype == GGMLQuantizationType.F32:
        return array.astype(np.float32), None
    if qtype == GGMLQuantizationType.F16 or array.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        return array.astype(np.float16), None
    return quants.quantize(array, qtype), qtype


def write_gguf(model, tokenizer, path, quant: str = "f16", pre_tokenizer: str | None = None,
               name: str | None = None) -> tuple[Path, list[str]]:
    """Write the llama ``model`` (a plain, merged model) and its ``tokenizer`` as one GGUF file.

    Args:
        model: a transformers ``LlamaForCausalLM`` (merge a PEFT adapter first: ``merge_and_unload()``).
        tokenizer: its byte-level BPE tokenizer; vocabulary, merges, special ids and chat template
            are stored in the file.
        path: the ``.gguf`` file to create; written to a temporary name beside it and renamed into
            place, so a failure never leaves a partial file under ``path``.
        quant: ``"f32"``, ``"f16"`` or ``"q8_0"`` (see :data:`QUANTS`).
        pre_tokenizer: llama.cpp's name for how text is split before BPE (``tokenizer.ggml.pre``),
            e.g. the value in the GGUF file the base came from; inferred from the tokenizer when None.
        name: ``general.name`` [default: the model's ``name_or_path``].

    Returns ``(path, notes)``: notes are lines worth showing the user (e.g. a guessed pre-tokenizer).
    Raises UserError for a model or tokenizer it cannot write correctly.
    """
    from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType

    quant = check_quant(quant)
    config = model.config
    check_supported(config)
    qtype, file_type = {
        "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
        "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
        "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    }[quant]
    spec = _byte_level_bpe(tokenizer)
    notes = []
    if pre_tokenizer is None:
        pre_tokenizer = _pre_tokenizer_name(spec)
        if pre_tokenizer is None:
            pre_tokenizer = "default"
            notes.append("note: the tokenizer's pre-tokenizer has no known llama.cpp name; wrote 'default', "
                         "so llama.cpp may split some text differently than transformers")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    name = name or Path(str(getattr(config, "_name_or_path", "") or "alignkit-export")).name

    def write(tmp: Path) -> None:
        writer = GGUFWriter(tmp, "llama")
        try:
            writer.add_type("model")
            writer.add_name(name)
            writer.add_context_length(config.max_position_embeddings)
            writer.add_embedding_length(config.hidden_size)
            writer.add_block_count(config.num_hidden_layers)
            writer.add_feed_forward_length(config.intermediate_size)
            writer.add_head_count(heads)
            writer.add_head_count_kv(config.num_key_value_heads)
            writer.add_rope_dimension_count(head_dim)
            if head_dim * heads != config.hidden_size:
                writer.add_key_length(head_dim)
                writer.add_value_length(head_dim)
            writer.add_rope_freq_base(float(rope_theta))
            writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
            writer.add_vocab_size(config.vocab_size)
            writer.add_file_type(file_type)
            writer.add_quantization_version(GGML_QUANT_VERSION)
            _add_tokenizer(writer, tokenizer, spec, config.vocab_size, pre_tokenizer)
            for gguf_name, array in gguf_tensors(model):
                data, raw_dtype = _encode(array, qtype)
                writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    return atomic_write(path, write), notes


# ---------------------------------------------------------------------------------------------
# Ollama
# ---------------------------------------------------------------------------------------------

_CHATML_TEMPLATE = '''{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
'''

_PLAIN_TEMPLATE = '''{{- if .System }}{{ .System }}

{{ end }}{{ .Prompt }}
'''


def chatml_default_system(tokenizer) -> tuple[bool, str | None]:
    """``(is_chatml, default_system)``: whether the chat template renders ChatML (``<|im_start|>role\\n
    content<|im_end|>\\n`` blocks, then ``<|im_start|>assistant\\n``), and the system message it puts
    first when a conversation has none (None when it puts none). Found by rendering probe
    conversations, so any template that behaves like ChatML counts, however it is written."""
    def block(role, text):
        return f"<|im_start|>{role}\n{text}<|im_end|>\n"

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    if not getattr(tokenizer, "chat_template", None):
        return False, None
    turns = [("system", "S1"), ("user", "U1"), ("assistant", "A1"), ("user", "U2")]
    try:
        full = render([{"role": r, "content": c} for r, c in turns])
        alone = render([{"role": "user", "content": "U1"}])
    except Exception:  # a template that needs other input (tools, special roles) is not plain ChatML
        return False, None
    if full != "".join(block(r, c) for r, c in turns) + "<|im_start|>assistant\n":
        return False, None
    tail = block("user", "U1") + "<|im_start|>assistant\n"
    if not alone.endswith(tail):
        return False, None
    prefix = alone[: -len(tail)]
    if not prefix:
        return True, None
    match = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", prefix, flags=re.DOTALL)
    return (True, match.group(1)) if match else (False, None)


def write_modelfile(gguf_path, tokenizer, context_length: int | None = None, temperature: float = 0.7,
                    top_p: float = 0.9, system: str | None = None) -> tuple[Path, list[str]]:
    """Write an Ollama ``Modelfile`` beside ``gguf_path`` so ``ollama create NAME -f Modelfile`` works.

    A ChatML chat template (SmolLM2's, Qwen's; see :func:`chatml_default_system`) becomes the
    equivalent Go template, with its default system message as ``SYSTEM`` and the end-of-turn
    tokens as ``stop`` parameters. Any other template gets a plain prompt template and a note
    saying so. ``num_ctx`` is the model's context length, at most 4096. ``system`` replaces the default
    system message. Returns ``(path, notes)``.
    """
    gguf_path = Path(gguf_path)
    chatml, default_system = chatml_default_system(tokenizer)
    system = system if system is not None else default_system
    notes = []
    lines = [f"FROM ./{gguf_path.name}", ""]
    if chatml:
        lines.append(f'TEMPLATE """{_CHATML_TEMPLATE}"""')
        stops = ["<|im_start|>", "<|im_end|>"]
    else:
        lines.append(f'TEMPLATE """{_PLAIN_TEMPLATE}"""')
        stops = []
        notes.append("note: the chat template is not ChatML, which is the one alignkit can translate for Ollama; "
                     "the Modelfile has a plain prompt template: edit its TEMPLATE to match the model")
    if system is not None and '"""' not in system:
        lines.append(f'SYSTEM """{system}"""')
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    lines.append("")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append(f"PARAMETER temperature {temperature}")
    lines.append(f"PARAMETER top_p {top_p}")
    if context_length:
        lines.append(f"PARAMETER num_ctx {min(int(context_length), 4096)}")
    path = atomic_write_text(gguf_path.parent / "Modelfile", "\n".join(lines) + "\n")
    return path, notes
