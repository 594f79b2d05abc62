"""Generation: batched greedy answers, and the interactive chat of ``--eval``."""

from __future__ import annotations

import sys

import torch

from .adapters import adapter_chat_template, load_adapter
from .models import load_model, load_tokenizer

EXIT_WORDS = {"quit", "exit", ":q"}


def chat_prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of ``prompt`` (text: one user turn; or a message list) followed by the assistant
    header, exactly as training renders the context of an answer."""
    from .gyms import as_messages, render_messages

    text = render_messages(tokenizer, as_messages(prompt, "user"), generation_prompt=True)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(text, add_special_tokens=not has_template)["input_ids"]


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 200, batch_size: int = 8,
                     do_sample: bool = False) -> list[str]:
    """Answer each prompt (greedy by default), batching left-padded prompts for speed."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for start in range(0, len(prompts), batch_size):
        encoded = [chat_prompt_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encoded):  # left padding: every prompt ends where generation starts
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=do_sample,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for row in out[:, width:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def load_for_generation(model_name: str, load_path=None, device=None, dtype=None, trust_remote_code=False):
    """Base model (with the adapter at ``load_path`` when given) and its tokenizer, ready to generate."""
    template = adapter_chat_template(load_path) if load_path else None
    tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code, chat_template=template)
    model = load_model(model_name, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    if load_path:
        model = load_adapter(model, load_path, is_trainable=False)
    model.eval()
    return model, tokenizer


def interactive(model, tokenizer, max_new_tokens: int = 200, stdin=None, stdout=None) -> int:
    """Answer each line typed (or piped) on ``stdin`` until ``quit``/``exit``, end of input or Ctrl-C."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tty = hasattr(stdin, "isatty") and stdin.isatty()
    if tty:
        stdout.write("Type a message and press Enter; 'quit', 'exit' or Ctrl-D leaves.\n")
    try:
        while True:
            if tty:
                stdout.write("you> ")
                stdout.flush()
            line = stdin.readline()
            if not line:
                break
            prompt = line.strip()
            if not prompt:
                continue
            if prompt.lower() in EXIT_WORDS:
                break
            answer = generate_answers(model, tokenizer, [prompt], max_new_tokens=max_new_tokens)[0]
            stdout.write(f"model> {answer}\n" if tty else f"{answer}\n")
            stdout.flush()
    except KeyboardInterrupt:
        stdout.write("\n")
    return 0
