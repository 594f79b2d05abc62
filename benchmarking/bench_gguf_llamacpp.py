"""The exported GGUF file in llama.cpp beside alignkit's transformers generation, on one prompt.

Merges the adapter at --load-path into its base (or takes the base alone), writes it as GGUF
(``alignkit.gguf_export.write_gguf``), then runs the same chat prompt greedily in both:
transformers on the merged float32 model, llama.cpp (through llama-cpp-python) on the file.
It reports whether llama.cpp tokenizes the prompt text as transformers does, how far apart their
next-token logits are, both answers (and where they first differ) and tokens/s on the same threads.

    pip install llama-cpp-python      # optional, not an alignkit dependency; compiles llama.cpp (~6 min)
    python benchmarking/bench_gguf_llamacpp.py --load-path outputs/sft/actor --quant f16

Without llama-cpp-python installed it says how to install it (one ``error:`` line) and exits 2.
"""

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

from alignkit.cliutil import ArgParser, adapter_folder, guarded, positive_int
from alignkit.compare import SEED_PROMPTS
from alignkit.errors import UserError
from alignkit.models import DEFAULT_MODEL

INSTALL = ("llama-cpp-python is not installed; to run this comparison: pip install llama-cpp-python "
           "(compiles llama.cpp, ~6 minutes on 2 cores)")


def _transformers_greedy(model, tokenizer, ids, max_new_tokens):
    """Next-token logits of ``ids``, then the greedy answer's token ids and seconds (after a short warm-up)."""
    import torch

    def generate(n):
        return model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=n, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].numpy()
        generate(4)
        start = time.perf_counter()
        out = generate(max_new_tokens)
        seconds = time.perf_counter() - start
    new = out[0, len(ids):].tolist()
    if tokenizer.eos_token_id in new:
        new = new[:new.index(tokenizer.eos_token_id) + 1]
    return logits, new, seconds


def _llamacpp_greedy(path, text, ids, max_new_tokens, threads, repack=True):
    """llama.cpp's tokens for ``text``, its next-token logits of ``ids``, then the greedy answer's token
    ids and seconds (after a short warm-up). ``repack=False`` keeps quantized weights in the file's
    layout (llama.cpp's --no-repack): its repacked CPU kernels crash on some virtual machines."""
    import llama_cpp
    import llama_cpp.llama as llama_module
    import numpy as np

    if not repack:
        defaults = llama_cpp.llama_model_default_params

        def without_repack():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_module.llama_cpp.llama_model_default_params = without_repack
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    own_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    llm.eval(ids)
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()

    def generate(n):
        new = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            new.append(token)
            if token == llm.token_eos() or len(new) == n:
                return new
        return new

    llm.reset()
    generate(4)
    llm.reset()
    start = time.perf_counter()
    new = generate(max_new_tokens)
    return own_ids, logits, new, time.perf_counter() - start


def run(args) -> int:
    """The comparison for parsed ``args``; a UserError (one line) when llama-cpp-python is missing."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise UserError(INSTALL)
    import numpy as np
    import torch

    from alignkit.adapters import adapter_base_model
    from alignkit.evaluate import chat_prompt_ids, load_for_generation
    from alignkit.gguf_export import read_pre_tokenizer, write_gguf
    from alignkit.models import resolve_model_source

    torch.set_num_threads(args.threads)
    base = args.model or (adapter_base_model(args.load_path) if args.load_path else None) or DEFAULT_MODEL
    model, tokenizer = load_for_generation(base, args.load_path, device="cpu", dtype="float32")
    merged = model.merge_and_unload() if args.load_path else model
    source = resolve_model_source(base)
    pre = read_pre_tokenizer(source.location) if source.kind in ("embedded", "gguf") else None
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = write_gguf(merged, tokenizer, Path(tmp) / f"bench-{args.quant}.gguf", quant=args.quant,
                             pre_tokenizer=pre, name=Path(base).name)
        print(f"model: {base}" + (f" + {args.load_path} (merged)" if args.load_path else "")
              + f"; GGUF {args.quant}, {path.stat().st_size / 1e6:.1f} MB; {args.threads} threads")
        ids = chat_prompt_ids(tokenizer, args.prompt)
        hf_logits, hf_new, hf_s = _transformers_greedy(merged, tokenizer, ids, args.max_new_tokens)
        cpp_ids, cpp_logits, cpp_new, cpp_s = _llamacpp_greedy(path, tokenizer.decode(ids), ids,
                                                               args.max_new_tokens, args.threads,
                                                               repack=not args.no_repack)

    print(f"prompt: {args.prompt!r} ({len(ids)} tokens with the chat template)")
    print(f"llama.cpp tokenizes the rendered prompt as transformers does: {'yes' if cpp_ids == ids else 'NO'}")
    print(f"next-token logits, llama.cpp ({args.quant}) vs transformers (f32): max |diff| "
          f"{float(np.abs(cpp_logits - hf_logits).max()):.4f}, same top token: "
          f"{'yes' if cpp_logits.argmax() == hf_logits.argmax() else 'no'}")
    print(f"{'side':<26}{'new tokens':>11}{'seconds':>10}{'tokens/s':>10}")
    for side, new, seconds in (("transformers (f32, torch)", hf_new, hf_s), (f"llama.cpp ({args.quant})", cpp_new, cpp_s)):
        print(f"{side:<26}{len(new):>11}{seconds:>10.2f}{len(new) / seconds:>10.1f}")
    same = next((i for i, (a, b) in enumerate(zip(hf_new, cpp_new, strict=False)) if a != b), None)
    if same is None and len(hf_new) == len(cpp_new):
        print(f"greedy answers: identical ({len(hf_new)} tokens)")
    else:
        print(f"greedy answers: first differ at new token {same if same is not None else min(len(hf_new), len(cpp_new))}")
    for side, new in (("transformers", hf_new), ("llama.cpp", cpp_new)):
        print(f"\n{side}: {tokenizer.decode(new, skip_special_tokens=True).strip()}")
    return 0


def main(argv=None) -> int:
    """Command line of the comparison: its exit code (2 for a user mistake or a missing llama-cpp-python)."""
    parser = ArgParser(prog="bench_gguf_llamacpp.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-path", type=adapter_folder, default=None, help="adapter folder [default: none, the base alone]")
    parser.add_argument("--model", default=None, help="base model [default: the adapter's, else the embedded one]")
    parser.add_argument("--quant", default="f16", choices=("f32", "f16", "q8_0"), help="GGUF weights [default: f16]")
    parser.add_argument("--prompt", default=SEED_PROMPTS[2], help="the user message [default: a report prompt]")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128, help="[default: 128]")
    parser.add_argument("--threads", type=positive_int, default=2, help="CPU threads for both sides [default: 2]")
    parser.add_argument("--no-repack", action="store_true",
                        help="keep llama.cpp from repacking quantized weights (its repacked kernels "
                        "segfault on some virtual machines, e.g. with q8_0 here)")
    return guarded(lambda: run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
