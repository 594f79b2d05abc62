"""Generation speed: alignkit's decoding beside plain ``model.generate`` with the adapter attached.

    python benchmarking/bench_generation.py                  # 6 and 30 prompts batched + one stream, 200 tokens
    python benchmarking/bench_generation.py --quick          # 6 prompts batched + one stream, 50 tokens
    python benchmarking/bench_generation.py --adapter outputs/sft/actor --json gen.json --repeats 3

The model is the embedded SmolLM2-135M-Instruct in float32 on the CPU with a LoRA adapter: the one
at ``--adapter``, or a fresh one (r=16 on q/k/v/o, ``alignkit.models.add_lora``) whose ``lora_B`` is
drawn from N(0, 0.02) and ``lora_A`` from U(-1/sqrt(in), 1/sqrt(in)), seeded 0, so the adapter changes
the answers and is the same in every run. Greedy decoding, prompts
rendered with the chat template as training renders them, answers end at ``<|im_end|>`` or after
``--max-new-tokens``.

- **plain**: ``model.generate(do_sample=False)`` on the PeftModel as it is (LoRA computed beside
  each adapted layer), all prompts of a case in one left-padded batch: what alignkit did before.
- **ours**: ``alignkit.generation.generate_ids`` (what ``generate_answers``, the comparison report
  and the ``--eval`` chat use): merged LoRA weights, a lean loop, weights packed once for MKL's
  products where a batch has 4 rows or more and they measure faster on this machine (not where a
  key/value cache budget limits the batch), finished rows leave the batch; a single stream checks 2
  tokens drafted by prompt lookup per step (also timed without, "one token per step", so the drafts'
  share shows).

Cases: the report's 6 prompts (``alignkit.compare.DEFAULT_PROMPTS``) in one batch, the first 30
prompts of the bundled dataset (test split, then train) in one batch, and one prompt alone (as the
chat answers). Then the comparison's case: ``--configurations`` configurations on the one base (the
base alone, the adapter, fresh LoRAs) answer the report's prompts and the 39 held-out ones, one
configuration at a time against all in shared batches (each row adding its own adapter's update), and
all in batches capped as the report caps them (its key/value cache budget): batch after batch against
prompts joining the batch as its rows end.
Last, a chat of ``--conversation`` turns (``alignkit.evaluate.Chat``): the seconds to each answer's first
text with the conversation's keys and values kept from one answer to the next, and with the whole
conversation computed again for every answer. tokens/s counts answer tokens (the stop token excluded) over wall time. Each case
runs ``--repeats`` times, plain and ours alternating; medians are reported with min-max, since other
processes on the machine disturb single runs. Every run checks that both sides produced the same
tokens. Beside each case, the matmul bound: the tokens/s of a decoder whose step did nothing but
multiply the case's rows by every weight matrix once (float32 weights streamed from memory, packed
as ours packs them: the floor of any float32 decoder here that takes one token per row and step;
drafted steps take more), and the same with the rows leaving the batch as their answers end (the
bound for that very case: a batch whose rows end early spends most steps on a few rows). For the single
stream, also the memory floor: the tokens/s of a step that only read every weight once (a one-row
product can go no faster than its weight comes from memory). With llama-cpp-python installed and ``--gguf PATH`` given (e.g. from ``alignkit export
--format gguf``), llama.cpp answers the same single prompt and each batched prompt in turn.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from alignkit.cliutil import ArgParser, adapter_folder, guarded, non_negative_int, output_file, positive_int


def _prompts(n: int) -> list[str]:
    from alignkit.data import make_dataset

    train, test = make_dataset()
    rows = [r["prompt"] for r in test] + [r["prompt"] for r in train]
    return rows[:n]


def _model(adapter: str | None):

    from alignkit.adapters import load_adapter
    from alignkit.models import add_lora, load_model, load_tokenizer

    tokenizer = load_tokenizer()
    model = load_model(device="cpu", dtype="float32")
    if adapter:
        model = load_adapter(model, adapter, is_trainable=False)
    else:
        model = _noisy_lora(add_lora(model), "default", seed=0)
    return model.eval(), tokenizer


def _noisy_lora(model, name: str, seed: int):
    """``model`` with both matrices of its adapter ``name`` drawn from seeded generators, so the adapter
    changes answers and is the same in every run: ``lora_B`` from N(0, 0.02) and ``lora_A`` from
    U(-1/sqrt(in), 1/sqrt(in)) (PEFT draws ``lora_A`` from the global generator, whose state depends
    on what ran before)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if f".{name}." not in param_name:
                continue
            if "lora_B" in param_name:
                param.normal_(0.0, 0.02, generator=generator)
            elif "lora_A" in param_name:
                bound = param.shape[1] ** -0.5
                param.uniform_(-bound, bound, generator=generator)
    return model


def _plain(model, prompts: list[list[int]], max_new_tokens: int, stop: int, pad: int) -> list[list[int]]:
    """``model.generate`` greedy on one left-padded batch; answers cut before their stop token."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=stop)
    answers = []
    for row in out[:, width:].tolist():
        answers.append(row[:row.index(stop)] if stop in row else row)
    return answers


def _ours(model, prompts, max_new_tokens, stop, pad, draft_tokens=None):
    from alignkit.generation import DRAFT_TOKENS, generate_ids

    return generate_ids(model, prompts, max_new_tokens, [stop], pad, batch_size=len(prompts),
                        draft_tokens=DRAFT_TOKENS if draft_tokens is None else draft_tokens)


def _undrafted(model, prompts, max_new_tokens, stop, pad):
    """Ours with one token per step (no prompt-lookup drafts), for the single stream's comparison."""
    return _ours(model, prompts, max_new_tokens, stop, pad, draft_tokens=0)


def _pass_seconds(model, row_counts, repeats: int = 5) -> dict[int, float]:
    """Per row count of ``row_counts``, the seconds of multiplying that many rows by every weight matrix
    of the model once (LoRA merged, as ours decodes; through oneDNN or packed for MKL where ours is, see
    ``alignkit.lean_step.Product``), best of ``repeats`` passes, so optimistic (weights partly left in
    cache by the last pass)."""
    import torch

    from alignkit.generation import merged_lora
    from alignkit.lean_step import Product, decoding_products

    seconds = {}
    with merged_lora(model), torch.no_grad():
        for rows in sorted(set(row_counts)):
            onednn, pack_rows = decoding_products(model.get_base_model(), rows)
            products = [Product(m.weight, pack_rows=pack_rows, onednn=onednn) for m in model.modules()
                        if type(m) is torch.nn.Linear]
            inputs = {p.weight.shape[1]: torch.randn(rows, p.weight.shape[1]) for p in products}
            seconds[rows] = _best_seconds(lambda ps=products, xs=inputs: [p(xs[p.weight.shape[1]]) for p in ps], repeats)
    return seconds


def _best_seconds(one_pass, repeats: int) -> float:
    """The shortest of ``repeats`` timed calls of ``one_pass()``, after one untimed call that warms up."""
    one_pass()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        best = min(best, time.perf_counter() - start)
    return best


def _matmul_bound(model, rows: int, repeats: int = 5) -> float:
    """Tokens/s if a decoding step cost nothing but multiplying ``rows`` rows by every weight matrix
    of the model once (:func:`_pass_seconds`): the bound the machine puts on any float32 decoder that keeps every
    row in the batch for every step, before attention, norms or Python."""
    return rows / _pass_seconds(model, [rows], repeats)[rows]


def _read_seconds(model, repeats: int = 5) -> float:
    """Seconds of reading every weight matrix a decoding step multiplies once (LoRA merged; summing each,
    which streams it from memory at the machine's read speed), best of ``repeats`` passes: the memory
    floor of a one-row float32 step, which has to bring every weight from memory and does little
    arithmetic with each. The one-row products of :func:`_pass_seconds` run well above it."""
    import torch

    from alignkit.generation import merged_lora

    with merged_lora(model), torch.no_grad():
        weights = [m.weight for m in model.modules() if type(m) is torch.nn.Linear]
        return _best_seconds(lambda: [w.sum() for w in weights], repeats)


def rows_per_step(answers: list[list[int]], max_new_tokens: int) -> list[int]:
    """The rows of each decoding step after the prompts' pass, one token per row and step, when each row
    leaves as it ends: the prompts' pass gives every row its first token, and the steps after it give
    the rest; a row that stopped on its stop token (shorter than ``max_new_tokens``) also ran the step
    that chose it. ``answers`` are the token lists without the stop token."""
    steps = [len(a) if len(a) < max_new_tokens else len(a) - 1 for a in answers]
    return [sum(1 for n in steps if n > s) for s in range(max(steps, default=0))]


def _schedule_bound(model, answers: list[list[int]], max_new_tokens: int) -> float:
    """Tokens/s of a decoder whose steps cost nothing but multiplying their rows by every weight once,
    with the rows leaving as ``answers`` end (:func:`rows_per_step`): the bound on one-token-per-row-and-step
    decoding of this very case, which a batch whose rows end early keeps far below :func:`_matmul_bound`."""
    schedule = rows_per_step(answers, max_new_tokens)
    seconds = _pass_seconds(model, schedule)
    return sum(len(a) for a in answers) / sum(seconds[rows] for rows in schedule)


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _case(label, model, prompts, args, stop, pad) -> dict:
    runs = {"plain": [], "ours": []}
    single = len(prompts) == 1   # one greedy stream drafts tokens: timed without drafts too
    if single:
        runs["undrafted"] = []
    identical, first_difference = True, None
    for repeat in range(args.repeats):
        plain, plain_s = _timed(_plain, model, prompts, args.max_new_tokens, stop, pad)
        ours, ours_s = _timed(_ours, model, prompts, args.max_new_tokens, stop, pad)
        tokens = sum(len(a) for a in plain)
        runs["plain"].append(tokens / plain_s)
        runs["ours"].append(sum(len(a) for a in ours) / ours_s)
        if single:
            undrafted, undrafted_s = _timed(_undrafted, model, prompts, args.max_new_tokens, stop, pad)
            runs["undrafted"].append(sum(len(a) for a in undrafted) / undrafted_s)
            identical = identical and undrafted == plain
        for i, (a, b) in enumerate(zip(plain, ours, strict=True)):
            if a != b and first_difference is None:
                at = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                first_difference = f"prompt {i}, token {at} of {len(a)} / {len(b)}"
        identical = identical and plain == ours
        print(f"  {label} run {repeat + 1}: plain {runs['plain'][-1]:7.1f} tok/s ({plain_s:6.1f} s)   "
              f"ours {runs['ours'][-1]:7.1f} tok/s ({ours_s:6.1f} s)   "
              + (f"ours one token per step {runs['undrafted'][-1]:7.1f} tok/s   " if single else "")
              + f"{tokens} tokens   load {os.getloadavg()[0]:.1f}", flush=True)
    result = {"prompts": len(prompts), "tokens": tokens,
              "plain_tokens_per_s": statistics.median(runs["plain"]),
              "ours_tokens_per_s": statistics.median(runs["ours"]),
              "plain_runs": runs["plain"], "ours_runs": runs["ours"], "identical": identical}
    result["speedup"] = result["ours_tokens_per_s"] / result["plain_tokens_per_s"]
    if single:
        result["ours_undrafted_tokens_per_s"] = statistics.median(runs["undrafted"])
        result["undrafted_runs"] = runs["undrafted"]
        result["drafting_speedup"] = statistics.median(a / b for a, b in zip(runs["ours"], runs["undrafted"], strict=True))
    result["matmul_bound_tokens_per_s"] = _matmul_bound(model, len(prompts))
    result["schedule_bound_tokens_per_s"] = _schedule_bound(model, ours, args.max_new_tokens)
    if single:
        result["read_bound_tokens_per_s"] = 1 / _read_seconds(model)
    if first_difference:
        result["first_difference"] = first_difference
    same = "identical token for token" if identical else f"DIFFERENT (first at {first_difference})"
    print(f"{label}: plain {result['plain_tokens_per_s']:.1f} tok/s, ours {result['ours_tokens_per_s']:.1f} tok/s "
          f"(median of {args.repeats}), speedup {result['speedup']:.2f}x; outputs {same}; matmul bound "
          f"{result['matmul_bound_tokens_per_s']:.1f} tok/s (one token per row and step), "
          f"{result['schedule_bound_tokens_per_s']:.1f} tok/s with the rows leaving as their answers end", flush=True)
    if single:
        print(f"{label}: one token per step {result['ours_undrafted_tokens_per_s']:.1f} tok/s; drafts by prompt "
              f"lookup {result['drafting_speedup']:.2f}x (median of paired runs); reading every weight once "
              f"bounds one row at {result['read_bound_tokens_per_s']:.1f} tok/s, the one-row products at "
              f"{result['matmul_bound_tokens_per_s']:.1f}", flush=True)
    return result


def _configurations(model, prompts: list[list[int]], count: int, args, stop: int, pad: int) -> dict:
    """``count`` configurations on the one base (the base alone, the adapter, and fresh LoRAs with random
    ``lora_B`` seeded 1, 2, ...) answering every prompt: one configuration at a time (merged weights,
    as the comparison did) against all in shared batches (each row its own adapter), and all with at most
    the report's rows at once, batch after batch against waiting prompts joining as rows end. The ways
    alternate in order from one repeat to the next."""

    from alignkit.compare import Evaluator
    from alignkit.generation import generate_ids
    from alignkit.kv_cache import rows_in_budget
    from alignkit.lean_step import BASE
    from alignkit.models import add_lora

    names = [BASE, "default"]
    for seed in range(1, count - 1):
        name = f"extra{seed}"
        _noisy_lora(add_lora(model, adapter_name=name), name, seed)
        names.append(name)
    model.set_adapter("default")
    model.eval()
    names = names[:count]

    def separate():
        out = []
        for name in names:
            if name == BASE:
                with model.disable_adapter():
                    out += generate_ids(model, prompts, args.max_new_tokens, [stop], pad, batch_size=len(prompts))
            else:
                model.set_adapter(name)
                out += generate_ids(model, prompts, args.max_new_tokens, [stop], pad, batch_size=len(prompts))
        model.set_adapter("default")
        return out

    every = prompts * len(names)
    rows = [name for name in names for _ in prompts]

    def shared():
        return generate_ids(model, every, args.max_new_tokens, [stop], pad, batch_size=len(rows), adapters=rows)

    # The comparison report's rows at once: its cache budget caps the batch, and waiting prompts join as rows end.
    budget = Evaluator.CACHE_BUDGET
    capped = max(1, rows_in_budget(model, every, args.max_new_tokens, budget))

    def joining():
        return generate_ids(model, every, args.max_new_tokens, [stop], pad, batch_size=len(rows), adapters=rows,
                            cache_budget=budget)

    # The same cap, the next batch starting when the last row of the one before ends. Each such batch fits the
    # budget, so its weights are packed where that pays on this machine; joining's budget leaves rows out, so it
    # decodes unpacked (~0.6 GB less on the embedded model): the comparison's path against the one it replaced.
    def batch_after_batch():
        order = sorted(range(len(every)), key=lambda i: len(every[i]))
        size = math.ceil(len(order) / math.ceil(len(order) / capped))
        out: list = [None] * len(every)
        for start in range(0, len(order), size):
            part = order[start:start + size]
            for i, ids in zip(part, generate_ids(model, [every[i] for i in part], args.max_new_tokens, [stop], pad,
                                                 batch_size=len(part), adapters=[rows[i] for i in part]), strict=True):
                out[i] = ids
        return out

    ways = {"separate": separate, "shared": shared, "batches": batch_after_batch, "joining": joining}
    runs: dict[str, list[float]] = {way: [] for way in ways}
    identical, reference = True, None
    for repeat in range(args.repeats):
        line = []
        for way, function in (ways.items() if repeat % 2 == 0 else reversed(ways.items())):
            answers, seconds = _timed(function)
            runs[way].append(sum(len(a) for a in answers) / seconds)
            reference = reference or answers
            identical = identical and answers == reference
            line.append(f"{way} {runs[way][-1]:6.1f} tok/s ({seconds:5.1f} s)")
        print(f"  {len(names)} configurations run {repeat + 1}: " + "   ".join(line), flush=True)
    result = {"configurations": len(names), "prompts": len(prompts), "rows": len(every), "rows_at_once": capped,
              "identical": identical, **{f"{way}_tokens_per_s": statistics.median(r) for way, r in runs.items()},
              **{f"{way}_runs": r for way, r in runs.items()}}
    result["speedup"] = result["shared_tokens_per_s"] / result["separate_tokens_per_s"]
    result["joining_speedup"] = statistics.median(j / b for j, b in zip(runs["joining"], runs["batches"], strict=True))
    print(f"{len(names)} configurations x {len(prompts)} prompts: one at a time {result['separate_tokens_per_s']:.1f} "
          f"tok/s, shared batches {result['shared_tokens_per_s']:.1f} tok/s (median of {args.repeats}), speedup "
          f"{result['speedup']:.2f}x; at most {capped} rows at once (the report's cache budget): batch after batch "
          f"{result['batches_tokens_per_s']:.1f}, prompts joining as rows end {result['joining_tokens_per_s']:.1f} "
          f"tok/s ({result['joining_speedup']:.2f}x, median of paired runs); outputs "
          f"{'identical token for token' if identical else 'DIFFERENT'}", flush=True)
    return result


CONVERSATION = ["Hi! What's a good way to spend a rainy Sunday?", "Tell me more about the second idea.",
                "What would I need to buy for that?", "How long would it take?", "Any tips for doing it with kids?",
                "Thanks! What about a sunny day instead?", "Which of the two do you like better?",
                "Why that one?"]
"""The messages of the conversation case, one per turn."""


def _conversation(model, tokenizer, turns: int, args) -> dict:
    """A chat of ``turns`` messages (``alignkit.evaluate.Chat``, the ``--eval`` chat's loop), greedy: the
    seconds to each answer's first text with the conversation's keys and values kept from one answer to the
    next, against every prompt computed from its first token (a fresh cache before each answer)."""
    from alignkit.evaluate import Chat
    from alignkit.generation import merged_lora
    from alignkit.kv_cache import ConversationCache

    messages = (CONVERSATION * (turns // len(CONVERSATION) + 1))[:turns]

    def chat(fresh: bool):
        talk = Chat(model, tokenizer, max_new_tokens=args.max_new_tokens)
        answers, first, total, context = [], [], 0.0, []
        for text in messages:
            if fresh:
                talk.cache = ConversationCache()
            context.append(len(talk.prompt_ids(text)[0]))
            seen: list[float] = []
            start = time.perf_counter()
            reply, _ = talk.answer(text, on_text=lambda piece, seen=seen: seen or seen.append(time.perf_counter()))
            total += time.perf_counter() - start
            answers.append(reply)
            first.append(seen[0] - start if seen else float("nan"))
        return answers, first, total, context

    runs = {"kept": [], "fresh": []}
    identical, reference = True, None
    with merged_lora(model):
        for repeat in range(args.repeats):
            for way in (("fresh", "kept") if repeat % 2 == 0 else ("kept", "fresh")):
                answers, first, total, context = chat(way == "fresh")
                runs[way].append((first, total))
                reference = reference or answers
                identical = identical and answers == reference
                print(f"  conversation run {repeat + 1}, {way:5}: first text after "
                      + " ".join(f"{s:.2f}" for s in first) + f" s; whole chat {total:.1f} s", flush=True)
    result = {"turns": turns, "context_tokens": context, "identical": identical}
    for way in runs:
        result[f"{way}_first_text_s"] = [statistics.median(run[0][i] for run in runs[way]) for i in range(turns)]
        result[f"{way}_total_s"] = statistics.median(run[1] for run in runs[way])
    print(f"conversation of {turns} turns ({context[0]} -> {context[-1]} tokens of context): first text of the last "
          f"answer {result['kept_first_text_s'][-1]:.2f} s with the cache kept, {result['fresh_first_text_s'][-1]:.2f} s "
          f"computing the conversation again; whole chat {result['kept_total_s']:.1f} s against "
          f"{result['fresh_total_s']:.1f} s (medians of {args.repeats}); answers "
          f"{'identical' if identical else 'DIFFERENT'}", flush=True)
    return result


def _llama_cpp(path: str, single: list[int], batched: list[list[int]], max_new_tokens: int, threads: int,
               ours_single: list[int]) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)

    def answer(ids):
        new = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if token == llm.token_eos():
                break
            new.append(token)
            if len(new) == max_new_tokens:
                break
        return new

    one, one_s = _timed(answer, single)
    many, many_s = _timed(lambda: [answer(p) for p in batched])
    result = {"single_tokens_per_s": len(one) / one_s,
              "sequential_tokens_per_s": sum(len(a) for a in many) / many_s,
              "single_same_as_ours": one == ours_single}
    print(f"llama.cpp: single {result['single_tokens_per_s']:.1f} tok/s, {len(batched)} prompts one after another "
          f"{result['sequential_tokens_per_s']:.1f} tok/s; single answer same tokens as ours: "
          f"{result['single_same_as_ours']}", flush=True)
    return result


def _gguf_file(text: str) -> str:
    """argparse type: a GGUF file, checked by its magic bytes before the model loads and the cases run."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file" + (" (a folder)" if path.is_dir() else ""))
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise argparse.ArgumentTypeError(f"{text} is not a GGUF file (alignkit export --format gguf writes one)")
    return text


def run(args) -> int:
    import torch

    from alignkit.compare import DEFAULT_PROMPTS
    from alignkit.generation import chat_prompt_ids, decode, merged_lora, pad_token_id
    from alignkit.lean_step import decoding_products

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.max_new_tokens = min(args.max_new_tokens, 50)
    model, tokenizer = _model(args.adapter)
    stop, pad = tokenizer.eos_token_id, pad_token_id(tokenizer)
    print(f"SmolLM2-135M-Instruct float32 CPU, {'adapter ' + args.adapter if args.adapter else 'fresh LoRA'}, "
          f"{torch.get_num_threads()} threads, {args.max_new_tokens} new tokens, {args.repeats} repeat(s), "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    onednn, pack_rows = decoding_products(model.get_base_model(), len(DEFAULT_PROMPTS))
    packed = pack_rows is not None
    print("ours multiplies through " + ("oneDNN (alignkit.kernels.onednn_pays: measured faster than MKL here)" if onednn
          else "MKL, weights packed for batched steps (measured faster here)" if packed else "MKL, weights as they are"),
          flush=True)
    encode = [chat_prompt_ids(tokenizer, p) for p in DEFAULT_PROMPTS]
    results: dict = {"threads": torch.get_num_threads(), "max_new_tokens": args.max_new_tokens, "packed_weights": packed, "onednn": onednn,
                     "adapter": args.adapter or "fresh LoRA, seeded: lora_A ~ U(-1/sqrt(in), 1/sqrt(in)), lora_B ~ N(0, 0.02)", "repeats": args.repeats}
    # One short warm-up of each path, so neither pays first-call costs in the timings.
    _plain(model, encode[:2], 4, stop, pad)
    _ours(model, encode[:2], 4, stop, pad)
    results["batched"] = _case(f"batched, {len(encode)} prompts", model, encode, args, stop, pad)
    if not args.quick:
        many = [chat_prompt_ids(tokenizer, p) for p in _prompts(30)]
        results["batched_30"] = _case(f"batched, {len(many)} prompts", model, many, args, stop, pad)
    results["single"] = _case("single stream", model, encode[:1], args, stop, pad)
    if args.configurations > 1:
        shared = encode if args.quick else encode + [chat_prompt_ids(tokenizer, p) for p in _prompts(39)]
        results["configurations"] = _configurations(model, shared, args.configurations, args, stop, pad)
    if args.conversation:
        results["conversation"] = _conversation(model, tokenizer, args.conversation, args)
    if args.gguf:
        if importlib.util.find_spec("llama_cpp") is None:
            print("llama-cpp-python is not installed: llama.cpp not measured (pip install llama-cpp-python)")
        else:
            with merged_lora(model):
                ours_single = decode(model, encode[:1], args.max_new_tokens, [stop], pad)[0]
            results["llama_cpp"] = _llama_cpp(args.gguf, encode[0], encode, args.max_new_tokens,
                                              torch.get_num_threads(), ours_single)
    results["load_average_after"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    """Command line of the benchmark."""
    parser = ArgParser(prog="bench_generation.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the 6-prompt batch and one stream only, at most "
                                                               "50 new tokens")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200, help="tokens per answer [200]")
    parser.add_argument("--repeats", type=positive_int, default=1, help="runs of each case; medians reported [1]")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--adapter", type=adapter_folder, help="a LoRA adapter folder of the embedded model [default: a fresh LoRA "
                                          "with random lora_B]")
    parser.add_argument("--configurations", type=non_negative_int, default=3,
                        help="configurations answering the comparison's prompts (the 6 report prompts and 39 "
                             "held-out ones; --quick: the 6), one at a time and in shared batches; 0 or 1 "
                             "skips the case [3: the base, the adapter and one more]")
    parser.add_argument("--conversation", type=non_negative_int, default=6,
                        help="turns of the chat case: each answer's first text with the conversation's cache kept "
                             "and computed again; 0 skips it [6]")
    parser.add_argument("--gguf", type=_gguf_file, help="a GGUF file for llama.cpp (needs llama-cpp-python)")
    parser.add_argument("--json", type=output_file, help="write the numbers to this JSON file (its folder must exist)")
    return guarded(lambda: run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
