"""Generation for people: batched answers, and the interactive chat of ``--eval``.

The chat keeps the conversation: each answer sees the system message (when set) and the earlier
exchanges, rendered as training renders a conversation (:func:`alignkit.gyms.render_messages`).
When the conversation outgrows the model's context, its oldest exchanges are left out (never the
system message). Typed at a terminal, answers appear token by token; piped in, each input line
gets one output line (line breaks inside an answer written as ``\\n``) and nothing else.
"""

from __future__ import annotations

import sys

from .adapters import adapter_chat_template, load_adapter
from .errors import UserError
from .formats import is_unicode
from .generation import (
    Sampling,
    TextStream,
    answer_text,
    chat_prompt_ids,
    decode,
    generate_answers,
    merged_lora,
    pad_token_id,
    stop_token_ids,
)
from .kv_cache import ConversationCache
from .models import load_model, load_tokenizer

__all__ = ["Chat", "chat_prompt_ids", "generate_answers", "interactive", "load_for_generation"]

EXIT_WORDS = {"quit", "exit", ":q"}
HELP = ("commands: /reset forgets the conversation, /system TEXT sets the system message (/system alone "
        "removes it), /help shows this, quit or exit (or Ctrl-D) leaves; a message that starts with / is sent "
        "with // in front of it (//etc/hosts sends /etc/hosts)")
ESCAPE = "//"
"""A line starting with this sends the rest as a message, one ``/`` removed (a message that starts with ``/``)."""


def load_for_generation(model_name: str, load_path=None, device=None, dtype=None, trust_remote_code=False,
                        chat_template: str | None = None):
    """Base model (with the adapter at ``load_path`` when given) and its tokenizer, ready to generate; the
    tokenizer renders with ``chat_template`` when given, else with the one saved beside the adapter."""
    template = chat_template or (adapter_chat_template(load_path) if load_path else None)
    tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code, chat_template=template)
    model = load_model(model_name, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    if load_path:
        model = load_adapter(model, load_path, is_trainable=False)
    model.eval()
    return model, tokenizer


class MessageTooLong(Exception):
    """A message that does not fit the context even with every earlier exchange left out."""


class Chat:
    """A conversation with ``model``: the history, its bound, and the next answer.

    ``context_limit`` bounds a prompt in tokens (default: the model's
    ``max_position_embeddings`` minus ``max_new_tokens``, so the answer fits too; None when the
    model does not say). Call it inside :func:`alignkit.generation.merged_lora` for speed. The keys and
    values of the conversation are kept from one answer to the next
    (:class:`~alignkit.kv_cache.ConversationCache`), so only the new message is computed: the model
    must not change while the chat lasts.
    """

    def __init__(self, model, tokenizer, max_new_tokens: int = 200, sampling: Sampling | None = None,
                 context_limit: int | None = None):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.sampling = sampling or Sampling()
        if context_limit is None:
            longest = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            context_limit = longest - max_new_tokens if longest else None
            if context_limit is not None and context_limit < 1:
                raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a message: the model's "
                                f"context holds {longest} tokens, prompt and answer together")
        self.context_limit = context_limit
        self.system: str | None = None
        self.turns: list[dict] = []   # user and assistant messages, alternating, oldest first
        self.stop_ids, self.pad_id = stop_token_ids(model, tokenizer), pad_token_id(tokenizer)
        self.generator = self.sampling.generator(next(model.parameters()).device)  # one stream per chat
        self.cache = ConversationCache()   # the last answer's keys and values, for the next prompt's shared start

    def messages(self, text: str) -> list[dict]:
        """The conversation so far plus the user message ``text``."""
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return system + self.turns + [{"role": "user", "content": text}]

    def prompt_ids(self, text: str) -> tuple[list[int], int]:
        """Token ids of the context of the answer to ``text``, and how many of the oldest exchanges
        were dropped from the history to fit ``context_limit``; raises :class:`MessageTooLong`."""
        dropped = 0
        while True:
            ids = chat_prompt_ids(self.tokenizer, self.messages(text))
            if self.context_limit is None or len(ids) <= self.context_limit:
                return ids, dropped
            if not self.turns:
                what = "the message and the system message need" if self.system is not None else "the message needs"
                raise MessageTooLong(f"{what} {len(ids)} tokens of context; at most "
                                     f"{self.context_limit} fit (the model's context minus --max-new-tokens)")
            # The oldest exchange: a user message and the answers up to the next user message.
            end = next((i for i, m in enumerate(self.turns) if i and m["role"] == "user"), len(self.turns))
            del self.turns[:end]
            dropped += 1

    def set_system(self, text: str | None) -> None:
        """Make ``text`` the system message (None: no system message); raises :class:`MessageTooLong`, keeping the
        one before, when it leaves no room in the context for a user message."""
        if text is not None and self.context_limit is not None:
            ids = chat_prompt_ids(self.tokenizer, [{"role": "system", "content": text}, {"role": "user", "content": ""}])
            if len(ids) >= self.context_limit:
                raise MessageTooLong(f"the system message needs {len(ids)} tokens of context, leaving no room for a "
                                     f"message in the {self.context_limit} that fit (the model's context minus "
                                     "--max-new-tokens)")
        self.system = text

    def answer(self, text: str, on_text=None) -> tuple[str, int]:
        """The model's answer to ``text`` (added to the history, like ``text``), and how many old
        exchanges were dropped to make room. ``on_text(piece)`` gets the answer as it is generated."""
        ids, dropped = self.prompt_ids(text)
        stream = TextStream(self.tokenizer, self.stop_ids)

        def show(_row: int, token: int) -> None:
            piece = stream.push(token)
            if piece:
                on_text(piece)

        out = decode(self.model, [ids], self.max_new_tokens, self.stop_ids, self.pad_id, self.sampling,
                     [self.generator] if self.generator is not None else None, on_token=show if on_text else None,
                     reuse=self.cache)[0]
        if on_text:
            rest = stream.finish()
            if rest:
                on_text(rest)
        reply = answer_text(self.tokenizer, out)
        self.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply, dropped

    def reset(self) -> None:
        """Forget the exchanges (the system message stays)."""
        self.turns = []


def interactive(model, tokenizer, max_new_tokens: int = 200, stdin=None, stdout=None, *,
                sampling: Sampling | None = None, context_limit: int | None = None, stderr=None) -> int:
    """Chat on ``stdin``/``stdout`` until ``quit``/``exit`` or end of input (returns 0), or Ctrl-C (returns 130).

    Each line is a user message answered in the conversation so far, or a command: ``/reset``,
    ``/system TEXT``, ``/help``; a line starting with ``//`` is a message, sent with one ``/`` removed. At a
    terminal answers stream as they are generated and notices (history dropped to fit the context, commands
    done) go to ``stdout``; with piped input each message gets exactly one output line (see :func:`one_line`)
    and notices go to ``stderr``.
    """
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    tty = hasattr(stdin, "isatty") and stdin.isatty()
    notices = stdout if tty else stderr

    def notice(text: str) -> None:
        notices.write(f"({text})\n")
        notices.flush()

    chat = Chat(model, tokenizer, max_new_tokens, sampling, context_limit)
    if tty:
        stdout.write("Type a message and press Enter; 'quit', 'exit' or Ctrl-D leaves, /help lists commands.\n")
    was_training = model.training
    model.eval()
    try:
        with merged_lora(model):
            while True:
                if tty:
                    stdout.write("you> ")
                    stdout.flush()
                line = stdin.readline()
                if not line:
                    break
                if tty and not line.endswith("\n"):
                    stdout.write("\n")   # Ctrl-D after text sends it without a line break: the answer starts below
                text = line.strip()
                if not text:
                    continue
                if text.lower() in EXIT_WORDS:
                    break
                command = text.startswith("/") and not text.startswith(ESCAPE)
                if not is_unicode(text):   # stdin reads undecodable bytes as lone surrogates
                    if not tty and not command:
                        stdout.write("\n")   # still one output line per message
                    notice("not answered: the line is not UTF-8 text; send it as UTF-8")
                    continue
                if command:
                    _command(chat, text, notice)
                    continue
                if text.startswith(ESCAPE):
                    text = text[1:]   # "//etc/hosts" sends "/etc/hosts"
                try:
                    _, dropped = chat.prompt_ids(text)   # makes room in the history first, if needed
                except MessageTooLong as exc:
                    if not tty:
                        stdout.write("\n")   # still one output line per message
                    notice(f"not answered: {exc}")
                    continue
                if dropped:
                    notice("context full: left out the oldest exchange" if dropped == 1 else
                           f"context full: left out the oldest {dropped} exchanges")
                if tty:
                    stdout.write("model> ")
                    stdout.flush()

                def write(piece: str) -> None:
                    stdout.write(piece)
                    stdout.flush()

                reply, _ = chat.answer(text, on_text=write if tty else None)
                stdout.write("\n" if tty else f"{one_line(reply)}\n")
                stdout.flush()
    except KeyboardInterrupt:   # a script reading the answers can tell a stopped chat from a finished one
        stdout.write("\n")
        return 130
    finally:
        model.train(was_training)
    return 0


def one_line(text: str) -> str:
    """``text`` on one line: backslashes, line feeds and carriage returns written as ``\\\\``, ``\\n``
    and ``\\r`` (how piped answers are printed; reversible)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _command(chat: Chat, text: str, notice) -> None:
    """Carry out a ``/command`` line."""
    word, _, rest = text.partition(" ")
    word, rest = word.lower(), rest.strip()
    if word == "/reset":
        chat.reset()
        notice("conversation cleared")
    elif word == "/system":
        try:
            chat.set_system(rest or None)
        except MessageTooLong as exc:
            notice(f"system message not changed: {exc}")
            return
        notice(f"system message set: {rest}" if rest else "system message removed")
    elif word == "/help":
        notice(HELP)
    else:
        typed = text.partition(" ")[0]
        notice(f"unknown command {typed}, nothing sent; to send a message that starts with /, start the line with "
               f"// (as in /{typed}); /help lists the commands")
