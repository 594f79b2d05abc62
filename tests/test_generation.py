"""Generation: batched decoding against plain ``generate``, merged LoRA, sampling, streaming and the chat."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
import torch
from conftest import PROMPTS, lively, plain_generate, with_lora

from alignkit.cli import main
from alignkit.evaluate import Chat, interactive, one_line
from alignkit.generation import (
    LeanStep,
    Sampling,
    TextStream,
    chat_prompt_ids,
    decode,
    generate_answers,
    generate_ids,
    merged_lora,
)
from alignkit.kv_cache import new_cache
from alignkit.lean_step import prompt_mask
from alignkit.models import add_lora


@pytest.fixture
def model(make_model):
    return with_lora(lively(make_model()))


@pytest.fixture
def base(make_model):
    return lively(make_model(seed=3))


class Terminal(io.StringIO):
    """Input that says it is a terminal (the chat then prompts and streams)."""

    def isatty(self):
        return True


# -- batched decoding ------------------------------------------------------------------------------


def test_batched_greedy_is_plain_generate_per_prompt(model, tokenizer):
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)   # different lengths: left padding differs per row
    first = plain_generate(model, prompts[0], 12, stop=tokenizer.eos_token_id)
    stop = first[4]   # a token the first answer produces early: that row ends (and leaves the batch) first
    expected = [plain_generate(model, p, 12, stop) for p in prompts]
    assert len(expected[0]) == 4 and max(len(e) for e in expected) == 12
    for batch_size in (len(prompts), 3, 1):   # one batch; batches sorted by length; one by one
        assert generate_ids(model, prompts, 12, [stop], pad_id=2, batch_size=batch_size) == expected, batch_size
    # and through text: the comparison report's call
    answers = generate_answers(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=len(PROMPTS))
    reference = [plain_generate(model, p, 12, tokenizer.eos_token_id) for p in prompts]
    assert answers == [tokenizer.decode(r, skip_special_tokens=True).strip() for r in reference]


def _qwen2(vocab_size: int, **options):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, **options)
    return lively(Qwen2ForCausalLM(config))


def _steps_agree(model, tokenizer, lean) -> None:
    """Left-padded prompts, then the same tokens, through the model's forward and through ``lean`` on two
    caches: the logits agree for the prompts and at every step after them."""
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), 2)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    theirs, ours = new_cache(model, room=width + 6), new_cache(model, room=width + 6)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=theirs).logits[:, -1]
        torch.testing.assert_close(lean(ids, positions, prompt_mask(mask), ours, last_only=True), logits,
                                   rtol=1e-5, atol=1e-5)
        position = positions[:, -1:]
        for _ in range(5):
            tokens = logits.argmax(-1)
            mask, position = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), position + 1
            logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position,
                           cache=theirs).logits[:, -1]
            lean_logits = lean(tokens, position, mask.bool()[:, None, None, :], ours)
            torch.testing.assert_close(lean_logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("products, pack_rows", [("mkl", None), ("mkl", len(PROMPTS)), ("onednn", None)])
def test_lean_step_computes_the_models_own_next_token_logits(model, tokenizer, products, pack_rows, monkeypatch):
    from alignkit import kernels, lean_step

    if pack_rows and not lean_step.weight_packing():
        pytest.skip("this build of torch cannot pack weights for its matrix library")
    if products == "onednn" and not kernels.onednn_available():
        pytest.skip("this build of torch has no oneDNN linear product")
    # MKL's products, packed whatever this machine measures; or oneDNN's, residuals and the MLP's product
    # fused into them
    monkeypatch.setenv("ALIGNKIT_ONEDNN", "1" if products == "onednn" else "0")
    monkeypatch.setattr(lean_step, "packing_pays", lambda *shape: True)
    with merged_lora(model):
        lean = LeanStep.for_model(model, pack_rows=pack_rows)
        assert lean is not None   # the tiny Llama with merged LoRA takes the lean step
        assert (lean.head.packed is not None) == bool(pack_rows)   # 4 rows: packed products
        assert lean.head.onednn == (products == "onednn")
        _steps_agree(model, tokenizer, lean)
    qwen = _qwen2(len(tokenizer))   # query/key/value biases
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None
    _steps_agree(qwen, tokenizer, LeanStep.for_model(qwen, pack_rows=pack_rows))


def test_models_the_lean_step_does_not_compute_decode_with_their_own_forward(model, make_model, tokenizer):
    assert LeanStep.for_model(model) is None   # LoRA layers not merged: not plain linear layers
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    biased = lively(LlamaForCausalLM(config))   # output and MLP biases: not computed by the lean step
    assert LeanStep.for_model(biased) is None
    windowed = _qwen2(len(tokenizer), use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert LeanStep.for_model(windowed) is None
    prompt = chat_prompt_ids(tokenizer, PROMPTS[1])
    for other in (biased, windowed):
        assert decode(other, [prompt], 8, [-1], pad_id=2)[0] == plain_generate(other, prompt, 8, stop=-1)
    # the Qwen2 shape it does compute answers as generate does, through the lean step
    qwen = _qwen2(len(tokenizer))
    assert decode(qwen, [prompt], 8, [-1], pad_id=2)[0] == plain_generate(qwen, prompt, 8, stop=-1)


def test_answers_stop_at_max_new_tokens_and_at_the_stop_token(base):
    prompt = [5, 6, 7, 8]
    ten = decode(base, [prompt], 10, stop_ids=[0], pad_id=2)[0]
    assert len(ten) == 10
    assert decode(base, [prompt], 10, stop_ids=[ten[3]], pad_id=2)[0] == ten[:ten.index(ten[3])]
    seen = []
    decode(base, [prompt, [9]], 3, stop_ids=[0], pad_id=2, on_token=lambda row, token: seen.append(row))
    assert seen == [0, 1] * 3


# -- merged LoRA ----------------------------------------------------------------------------------


def test_merged_lora_is_exact_to_restore_and_answers_like_the_adapter(model, tokenizer):
    from peft.tuners.lora import LoraLayer

    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    unmerged = decode(model, prompts, 16, [tokenizer.eos_token_id], 2)
    with merged_lora(model):
        assert not any(isinstance(m, LoraLayer) for m in model.modules())   # plain linear layers meanwhile
        merged = decode(model, prompts, 16, [tokenizer.eos_token_id], 2)
    # Token for token: x @ (W + BA) rounds differently from x @ W + x @ BA only in the last bits,
    # far below the gaps between these logits.
    assert merged == unmerged
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)} == layers
    with pytest.raises(RuntimeError, match="boom"), merged_lora(model):
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)} == layers


def test_merged_lora_keeps_a_disabled_adapter_disabled(model, make_model, tokenizer):
    prompt = [chat_prompt_ids(tokenizer, "Hi")]
    base_answer = decode(lively(make_model()), prompt, 10, [tokenizer.eos_token_id], 2)
    with model.disable_adapter(), merged_lora(model):
        assert decode(model, prompt, 10, [tokenizer.eos_token_id], 2) == base_answer
    assert decode(model, prompt, 10, [tokenizer.eos_token_id], 2) != base_answer   # the adapter matters


# -- sampling -------------------------------------------------------------------------------------


def test_sampling_is_reproducible_with_a_seed(base, tokenizer):
    def sample(seed, **kw):
        return generate_answers(base, tokenizer, PROMPTS[:2], max_new_tokens=12, temperature=1.0, seed=seed, **kw)

    assert sample(7) == sample(7)
    assert any(sample(seed) != sample(7) for seed in (8, 9, 10))
    greedy = generate_answers(base, tokenizer, PROMPTS[:2], max_new_tokens=12)
    assert sample(7) != greedy
    assert sample(7, top_p=1e-6) == greedy   # only the most likely token is left to draw


def test_a_prompts_samples_do_not_depend_on_its_batch(base, tokenizer):
    """Each prompt draws from its own seeded generator: alone, in one batch, or in batches of 2 (another
    order, other neighbours), its samples are the same; its key, not its place, picks the generator."""
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS[:4]]
    sampling = Sampling(temperature=1.0, seed=11)

    def sample(ids, **kw):
        return generate_ids(base, ids, 12, [tokenizer.eos_token_id], 2, sampling=sampling, **kw)

    together = sample(prompts, batch_size=4)
    assert sample(prompts, batch_size=2) == together
    assert [sample([p], keys=[i])[0] for i, p in enumerate(prompts)] == together
    assert sample(prompts[::-1], batch_size=4, keys=[3, 2, 1, 0]) == together[::-1]
    assert sample(prompts, batch_size=4, keys=[4, 5, 6, 7]) != together   # other keys, other draws
    with pytest.raises(ValueError, match="2 keys for 4 prompts"):
        sample(prompts, keys=[0, 1])


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5])
def test_draws_follow_the_nucleus_distribution(top_p, monkeypatch):
    """Empirical token frequencies of many draws equal the top-p renormalised softmax, for rows whose
    nucleus lies within the first NUCLEUS_FIRST tokens and for rows sorted in full."""
    import alignkit.sampling as sampling

    monkeypatch.setattr(sampling, "NUCLEUS_FIRST", 3)
    torch.manual_seed(0)
    peaked = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0])    # nucleus of 0.9: 3 tokens
    flat = torch.tensor([0.3, 0.2, 0.2, 0.1, 0.1, 0.0, 0.0, -0.1])       # nucleus wider than 3
    n = 40000
    logits = torch.cat([peaked.expand(n, -1), flat.expand(n, -1)])
    drawn = sampling.next_tokens(logits, Sampling(temperature=1.0, top_p=top_p), None, None)
    for half, row in enumerate((peaked, flat)):
        probs = row.softmax(-1)
        ranked, order = probs.sort(descending=True)
        keep = (ranked.cumsum(-1) - ranked) < top_p
        expected = torch.zeros_like(probs)
        expected[order[keep]] = ranked[keep] / ranked[keep].sum()
        seen = torch.bincount(drawn[half * n:(half + 1) * n], minlength=len(row)).float() / n
        assert (seen[expected == 0] == 0).all(), (top_p, half, seen)   # nothing outside the nucleus
        torch.testing.assert_close(seen, expected, atol=0.01, rtol=0)


def test_repetition_penalty_avoids_tokens_already_there(make_model, tokenizer):
    model = make_model()   # freshly initialised: greedy repeats the prompt's last token
    prompt = chat_prompt_ids(tokenizer, "Hi")
    plain = decode(model, [prompt], 24, [tokenizer.eos_token_id], 2)[0]
    assert len(set(plain)) < len(plain) and set(plain) & set(prompt)
    penalised = decode(model, [prompt], 24, [tokenizer.eos_token_id], 2, Sampling(repetition_penalty=1e4))[0]
    assert len(set(penalised)) == len(penalised) and not set(penalised) & set(prompt)


def test_bad_sampling_options_are_value_errors():
    with pytest.raises(ValueError, match="top_p must be in"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        Sampling(temperature=float("nan"))


@pytest.mark.parametrize("flag, value, needle", [
    ("--temperature", "-0.5", "--temperature must be >= 0"),
    ("--temperature", "inf", "--temperature must be >= 0 and finite"),
    ("--top-p", "0", "--top-p must be in (0, 1]"),
    ("--top-p", "1.5", "--top-p must be in (0, 1]"),
    ("--repetition-penalty", "0", "--repetition-penalty must be > 0"),
    ("--temperature", "warm", "invalid float value"),
])
def test_bad_sampling_flags_print_one_line_and_exit_2(flag, value, needle, capsys):
    assert main(["dpo", "--eval", "--load-path", "nowhere", flag, value]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# -- streaming ------------------------------------------------------------------------------------


def test_text_stream_pieces_add_up_to_the_decoded_text(tokenizer):
    ids = tokenizer("Héllo wörld, ça va? 😀 fine\n\nok")["input_ids"]
    stream = TextStream(tokenizer, stop_ids=[tokenizer.eos_token_id])
    pieces = [stream.push(t) for t in ids + [tokenizer.eos_token_id]]
    pieces.append(stream.finish())
    assert "".join(pieces) == tokenizer.decode(ids).strip()
    assert all("\ufffd" not in p for p in pieces) and stream.ids == ids


def test_streamed_answer_is_the_greedy_answer(model, tokenizer):
    expected = generate_answers(model, tokenizer, ["Hi", "Why?"], max_new_tokens=20)
    pieces = []
    chat = Chat(model, tokenizer, max_new_tokens=20)
    reply, _ = chat.answer("Hi", on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces).strip() == reply == expected[0]
    out = io.StringIO()
    assert interactive(model, tokenizer, 20, Terminal("Why?\nexit\n"), out) == 0
    assert f"model> {expected[1]}" in out.getvalue()
    out = io.StringIO()   # Ctrl-D after typed text: the text comes without its line break, the answer goes below
    assert interactive(model, tokenizer, 20, Terminal("Why?"), out) == 0
    assert f"you> \nmodel> {expected[1]}\n" in out.getvalue()


# -- the chat -------------------------------------------------------------------------------------


@pytest.fixture
def prompts_seen(monkeypatch):
    """The prompt ids of every answer the chat generates."""
    import alignkit.evaluate as evaluate

    seen = []
    real = evaluate.decode

    def spy(model, prompts, *args, **kwargs):
        seen.append(list(prompts[0]))
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluate, "decode", spy)
    return seen


def unescape(line: str) -> str:
    """A piped answer line back to the answer (line breaks in answers are printed escaped)."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), line)


def chat(model, tokenizer, lines: str, **kw) -> tuple[list[str], str]:
    """The answers (one output line each) and the notices of a piped chat on ``lines``."""
    out, err = io.StringIO(), io.StringIO()
    assert interactive(model, tokenizer, 6, io.StringIO(lines), out, stderr=err, **kw) == 0
    return [unescape(line) for line in out.getvalue().split("\n")[:-1]], err.getvalue()


def test_piped_answers_are_one_line_each(model, tokenizer):


    tricky = "two\nlines\r\nand a \\n backslash"
    assert "\n" not in one_line(tricky) and "\r" not in one_line(tricky) and unescape(one_line(tricky)) == tricky
    lines, _ = chat(model, tokenizer, "/system Be brief.\nQuestion one\nQuestion two\nQuestion three\n")
    assert len(lines) == 3 and any("\n" in a or "\r" in a for a in lines)   # some answers break lines


def test_second_answer_sees_the_first_exchange(model, tokenizer, prompts_seen):
    lines, err = chat(model, tokenizer, "Hello there\nAnd then?\n")
    assert len(lines) == 2 and err == ""   # piped: one line per message, nothing else
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    assert prompts_seen == [chat_prompt_ids(tokenizer, [user("Hello there")]), chat_prompt_ids(
        tokenizer, [user("Hello there"), {"role": "assistant", "content": lines[0]}, user("And then?")])]


def test_reset_forgets_and_system_sets_the_system_message(model, tokenizer, prompts_seen):
    lines, err = chat(model, tokenizer, "Hello there\n/reset\nAnd then?\n/system Talk like a pirate.\nAhoy\n"
                                        "/system\nBye\nquit\nnot read\n")
    assert len(lines) == 4
    assert prompts_seen[1] == chat_prompt_ids(tokenizer, "And then?")
    assert prompts_seen[2] == chat_prompt_ids(tokenizer, [
        {"role": "system", "content": "Talk like a pirate."}, {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": lines[1]}, {"role": "user", "content": "Ahoy"}])
    assert "Talk like a pirate." in tokenizer.decode(prompts_seen[2])
    assert "Talk like a pirate." not in tokenizer.decode(prompts_seen[3])   # "/system" alone removed it
    assert err.splitlines() == ["(conversation cleared)", "(system message set: Talk like a pirate.)",
                                "(system message removed)"]


def test_oldest_exchanges_are_dropped_to_fit_the_context(model, tokenizer, prompts_seen):
    system = {"role": "system", "content": "Be brief."}
    one = len(chat_prompt_ids(tokenizer, [system, {"role": "user", "content": "Question one"}]))
    lines, err = chat(model, tokenizer, "/system Be brief.\nQuestion one\nQuestion two\nQuestion three\n",
                      context_limit=one + 30)
    assert len(lines) == 3
    third = tokenizer.decode(prompts_seen[2])
    assert "Be brief." in third and "Question three" in third and "Question one" not in third
    assert len(prompts_seen[2]) <= one + 30 < len(chat_prompt_ids(tokenizer, [
        system, {"role": "user", "content": "Question one"}, {"role": "assistant", "content": lines[0]},
        {"role": "user", "content": "Question two"}, {"role": "assistant", "content": lines[1]},
        {"role": "user", "content": "Question three"}]))
    assert "left out the oldest" in err
    # a message that cannot fit on its own is not answered, but still gets its (empty) line
    lines, err = chat(model, tokenizer, "word " * 50 + "\nHi\n", context_limit=one + 10)
    assert lines[0] == "" and "not answered" in err and len(lines) == 2


def test_a_system_message_that_leaves_no_room_is_refused_and_the_one_before_kept(model, tokenizer, prompts_seen):
    system = {"role": "system", "content": "Be brief."}
    limit = len(chat_prompt_ids(tokenizer, [system, {"role": "user", "content": "Hi"}])) + 5
    long = "word " * 40
    needs = len(chat_prompt_ids(tokenizer, [{"role": "system", "content": long.strip()},
                                            {"role": "user", "content": ""}]))
    lines, err = chat(model, tokenizer, f"/system Be brief.\n/system {long}\nHi\n", context_limit=limit)
    assert len(lines) == 1 and len(prompts_seen) == 1   # "Hi" was answered, under the kept system message
    assert prompts_seen[0] == chat_prompt_ids(tokenizer, [system, {"role": "user", "content": "Hi"}])
    assert err.splitlines() == ["(system message set: Be brief.)", (
        f"(system message not changed: the system message needs {needs} tokens of context, leaving no room for "
        f"a message in the {limit} that fit (the model's context minus --max-new-tokens))")]


def test_a_line_that_is_not_utf8_is_not_answered_and_the_chat_goes_on(model, tokenizer, prompts_seen):
    # what sys.stdin makes of the bytes 0xff 0xfe: lone surrogates, which the tokenizer cannot take
    lines, err = chat(model, tokenizer, "hello \udcff\udcfe there\n/system caf\udce9\nbye\n")
    assert lines[0] == "" and len(lines) == 2 and len(prompts_seen) == 1   # only "bye" reached the model
    assert err.splitlines() == ["(not answered: the line is not UTF-8 text; send it as UTF-8)"] * 2
    assert "caf" not in tokenizer.decode(prompts_seen[0])   # the undecodable system message was not set


def test_chat_bound_defaults_to_the_model_context(model, tokenizer):
    assert Chat(model, tokenizer, max_new_tokens=12).context_limit == 512 - 12   # tiny model: 512 positions


def test_replies_say_whether_the_answer_ended(make_model, base, tokenizer):
    from alignkit.generation import generate_replies

    echo = make_model()   # freshly initialised: it answers the prompt's last token, "\n", again and again
    with torch.no_grad():  # ... unless the end-of-turn token scores higher on that "\n"
        echo.get_input_embeddings().weight[tokenizer.eos_token_id] = 3 * echo.get_input_embeddings().weight[198]
    replies = generate_replies(echo, tokenizer, ["Hi", "Why?"], max_new_tokens=5)
    assert [(r.text, r.ended) for r in replies] == [("", True), ("", True)]
    replies = generate_replies(base, tokenizer, ["Hi", "Why?"], max_new_tokens=5)
    assert all(r.text and not r.ended for r in replies)


def test_roomy_cache_keeps_the_rows_that_stay_exactly_as_a_plain_cache_does(make_model):
    from transformers import DynamicCache

    model = make_model()
    torch.manual_seed(0)
    roomy, plain = new_cache(model, room=6), DynamicCache(config=model.config)
    heads, dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads

    def append(rows, length):
        keys, values = torch.randn(rows, heads, length, dim), torch.randn(rows, heads, length, dim)
        for cache in (roomy, plain):
            got = cache.layers[0].update(keys, values)
        return got

    append(5, 3)
    for cache in (roomy, plain):
        cache.batch_select_indices(torch.tensor([4, 1, 3]))   # rows 0 and 2 leave, row 4 takes row 0's place
    append(3, 1)
    for cache in (roomy, plain):
        cache.batch_select_indices(torch.tensor([1, 2]))   # row 0 leaves, the others move up
    append(2, 1)
    keys, values = append(2, 4)   # past the room: the buffers grow
    assert roomy.layers[0].get_seq_length() == 9
    assert torch.equal(keys, plain.layers[0].keys) and torch.equal(values, plain.layers[0].values)
    assert torch.equal(roomy.layers[0].keys, plain.layers[0].keys)


# -- several adapters in one batch ----------------------------------------------------------------


def _two_adapters(make_model):
    """A tiny model with two LoRA adapters, ``one`` (query/key/value/output) and ``two`` (those and the
    MLP, another rank), each with a non-zero ``lora_B``: three different models on one base."""
    from peft import LoraConfig

    model = add_lora(lively(make_model()), adapter_name="one")
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj",
                                                                   "up_proj", "down_proj"]), adapter_name="two")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5, generator=generator)
    return model.eval()


def _alone(model, name, prompts, stop):
    """Each prompt answered by ``model`` with only the adapter ``name`` active (BASE: none)."""
    from alignkit.lean_step import BASE

    if name == BASE:
        with model.disable_adapter():
            return [plain_generate(model, p, 10, stop) for p in prompts]
    model.set_adapter(name)
    return [plain_generate(model, p, 10, stop) for p in prompts]


def test_rows_of_several_adapters_answer_as_each_adapter_alone(make_model, tokenizer, monkeypatch):
    from alignkit.lean_step import BASE, mixable_adapters

    model = _two_adapters(make_model)
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    stop = tokenizer.eos_token_id
    expected = {name: _alone(model, name, prompts, stop) for name in ("one", BASE, "two")}
    assert expected["one"] != expected["two"] != expected[BASE] != expected["one"]   # three different models
    # interleaved: every adapter's rows are scattered over the prompt list
    names = [name for _ in prompts for name in ("two", BASE, "one")]
    every = [p for p in prompts for _ in range(3)]
    assert mixable_adapters(model, names)
    assert LeanStep.for_model(model, ("two", BASE, "one")) is not None
    want = [expected[name][i // 3] for i, name in enumerate(names)]
    for batch_size in (len(every), 5):
        assert generate_ids(model, every, 10, [stop], pad_id=2, batch_size=batch_size, adapters=names) == want
    # the model's own forward with PEFT's per-row adapter names answers the same
    monkeypatch.setattr(LeanStep, "for_model", classmethod(lambda cls, model, adapters=(), pack_rows=None: None))
    assert decode(model, every, 10, [stop], 2, adapters=names) == want
    with pytest.raises(ValueError, match="adapter names for"):
        decode(model, every, 10, [stop], 2, adapters=names[:2])
    with pytest.raises(ValueError, match="need a PEFT model"):
        decode(lively(make_model()), every[:1], 10, [stop], 2, adapters=[BASE])


def test_adapters_that_cannot_share_a_batch_are_told_apart(make_model):
    from peft import LoraConfig

    from alignkit.lean_step import BASE, mixable_adapters

    model = _two_adapters(make_model)
    assert not mixable_adapters(model, ["one", "three"])   # not loaded
    assert not mixable_adapters(lively(make_model()), [BASE])   # no LoRA at all
    add_lora(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), adapter_name="dora")
    assert mixable_adapters(model, ["one", "two", BASE]) and not mixable_adapters(model, ["one", "dora"])
    assert LeanStep.for_model(model, ("one", "dora")) is None
    saved = _two_adapters(make_model)   # a fully trained norm beside the LoRA: PEFT cannot mix it per row
    add_lora(saved, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["norm"]), adapter_name="saved")
    assert not mixable_adapters(saved, ["one", "saved"]) and not mixable_adapters(saved, ["one", "two"])
    merged = _two_adapters(make_model)
    merged.merge_adapter(["one"])   # an adapter in the base weights would count twice
    assert not mixable_adapters(merged, ["one", "two"])


# -- drafted single streams ------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 4, 7])
@pytest.mark.parametrize("masked", [False, True])
def test_one_token_attention_equals_scaled_dot_product_attention(rows, masked, monkeypatch):
    from alignkit import lean_step

    generator = torch.Generator().manual_seed(rows)
    store = torch.randn(2, rows, 3, 40, 8, generator=generator)
    keys, values = store[0, :, :, :33], store[1, :, :, :33]   # views of a roomier cache, as decoding has
    query = torch.randn(rows, 3, 2, 8, generator=generator)
    mask = None
    if masked:   # rows of different lengths, each seeing its own real positions
        lengths = torch.randint(1, 34, (rows,), generator=generator)
        mask = (torch.arange(33)[None] < lengths[:, None])[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=0.3)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    out = lean_step.attend_one_token(query, keys, values, mask, 0.3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert bool(calls) == (rows < lean_step.ATTENTION_PRODUCTS_FROM_ROWS)   # products from 4 rows on
    if masked:
        torch.testing.assert_close(lean_step.attend_one_token(query, keys, values, mask, 0.3, mask.logical_not()), out)


class _Interrupted(io.StringIO):
    """Input whose reader is interrupted (Ctrl-C) after ``lines`` lines."""

    def __init__(self, text: str, lines: int):
        super().__init__(text)
        self.left = lines

    def readline(self, *args):
        if not self.left:
            raise KeyboardInterrupt
        self.left -= 1
        return super().readline(*args)


def test_a_chat_stopped_by_ctrl_c_exits_130_after_the_answers_it_gave(model, tokenizer):
    expected = generate_answers(model, tokenizer, ["Hi"], max_new_tokens=6)[0]
    out, err = io.StringIO(), io.StringIO()
    assert interactive(model, tokenizer, 6, _Interrupted("Hi\nWhy?\n", lines=1), out, stderr=err) == 130
    assert out.getvalue() == f"{one_line(expected)}\n\n"   # the answer given, then a line break; "Why?" unread
    assert interactive(model, tokenizer, 6, _Interrupted("Hi\n", lines=2), io.StringIO(), stderr=err) == 0


def test_output_whose_reader_went_away_ends_quietly_with_141():
    # `alignkit ... | head -1`: the reader closes the pipe while the command still writes
    code = ("import sys\nfrom alignkit.cliutil import guarded\n"
            "def chat():\n    while True:\n        print('an answer', flush=True)\n"
            "sys.exit(guarded(chat))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(9) == b"an answer"
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""   # no traceback


@pytest.mark.parametrize("prompts, got", [
    ("Hi there!", "a str: wrap one prompt in a list"),
    ({"role": "user", "content": "Hi"}, "a dict: wrap one prompt in a list"),
    (["Hi", None], "an item that is a NoneType"),
])
def test_prompts_that_are_not_a_list_of_prompts_are_named(model, tokenizer, prompts, got):
    from alignkit.errors import UserError
    from alignkit.evaluate import generate_answers

    with pytest.raises(UserError) as err:   # a text used to be answered character by character
        generate_answers(model, tokenizer, prompts, max_new_tokens=2)
    assert str(err.value) == f"prompts must be a list of prompts, each text or a list of messages (got {got})"
