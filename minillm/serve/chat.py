"""``python -m minillm chat``: a terminal chat that a lecture cannot break.

    python -m minillm chat                                   # the engine in this process
    python -m minillm chat --server http://127.0.0.1:8000    # through a running `python -m minillm serve`

What it survives:
  * Ctrl-C during an answer stops that answer (the request is aborted, its KV blocks freed: ``LLM.stream`` aborts
    its request when the loop leaves it; through a server, closing the stream is the client disconnect the server
    aborts on). The conversation goes on, and the half answer stays in the history, as the model wrote it.
  * A message longer than the context: the oldest exchanges are dropped from what is sent (the system prompt is
    kept) until the conversation fits with room for an answer; a message that cannot fit even alone is refused
    with its length and the limit, and the history is left as it was.
Ctrl-C at the prompt, Ctrl-D or an empty line end the chat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

Messages = list[dict[str, str]]


def fit_history(history: Messages, message: dict[str, str], count_tokens: Callable[[Messages], int],
                limit: int) -> Messages | None:
    """The longest recent part of `history` that, with `message`, counts at most `limit` tokens (None: the message
    alone does not fit). System messages are kept; whole exchanges are dropped, oldest first."""
    messages = history + [message]
    while messages is not None and count_tokens(messages) > limit:
        messages = drop_oldest_exchange(messages)
    return messages


class LocalChat:
    """Answers from an `LLM` in this process."""

    def __init__(self, llm, params, name: str):
        self.llm, self.params = llm, params
        self.name = f"{name} on {llm.device}"

    def count_tokens(self, messages: Messages) -> int:
        text = self.llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(self.llm.tokenizer(text, add_special_tokens=False).input_ids)

    @property
    def limit(self) -> int:
        """Prompt tokens allowed: the context minus room for the answer (at least a quarter of the context)."""
        return self.llm.max_model_len - min(self.params.max_tokens, self.llm.max_model_len // 4)

    def answer(self, messages: Messages) -> Iterator[str]:
        return self.llm.stream(messages, self.params)


class RemoteChat:
    """Answers from a server, with the real OpenAI client. It cannot count tokens itself: it asks the server, and
    a 400 about the context length means "drop the oldest exchange and try again"."""

    def __init__(self, url: str, max_tokens: int, temperature: float, seed: int | None):
        import openai

        base_url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1")
        self.client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
        self.model = self.client.models.list().data[0].id
        self.name = f"{self.model} at {base_url}"
        self.options = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}

    def answer(self, messages: Messages) -> Iterator[str]:
        stream = self.client.chat.completions.create(model=self.model, messages=messages, stream=True,
                                                     **self.options)
        try:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        finally:  # Ctrl-C: closing the connection is how the server learns to abort the request
            stream.close()


def is_context_error(error: Exception) -> bool:
    """A server's 400 for a prompt longer than the context (the message of LLM.encode's ValueError)."""
    return "context" in str(error) and "tokens" in str(error)


def drop_oldest_exchange(messages: Messages) -> Messages | None:
    """`messages` without its oldest user/assistant exchange (system messages stay); None if only one is left."""
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) <= 1:
        return None
    return system + (turns[2:] if turns[1]["role"] == "assistant" else turns[1:])


def chat_loop(backend, read: Callable[[str], str] = input, write: Callable[[str], None] | None = None) -> Messages:
    """Read messages, stream answers, survive Ctrl-C and long messages; returns the history at the end."""
    def say(text: str) -> None:
        if write is None:
            print(text, end="", flush=True)
        else:
            write(text)

    history: Messages = []
    say(f"Chatting with {backend.name}. Ctrl-C stops an answer; an empty line, Ctrl-D or Ctrl-C here quits.\n")
    while True:
        try:
            user = read("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            say("\n")
            return history
        if not user:
            return history
        message = {"role": "user", "content": user}
        if isinstance(backend, LocalChat):
            messages = fit_history(history, message, backend.count_tokens, backend.limit)
        else:
            messages = history + [message]  # the server counts: a 400 about the context makes us drop and retry
        reply = None
        while messages is not None and reply is None:
            if len(messages) < len(history) + 1:
                say(f"[the conversation is too long for the context: its {len(history) + 1 - len(messages)} "
                    "oldest messages are left out of what is sent]\n")
            reply = ""
            say("bot> ")
            try:
                for piece in backend.answer(messages):
                    reply += piece
                    say(piece)
                say("\n")
            except KeyboardInterrupt:
                say(" [stopped]\n")
            except Exception as error:  # a server's refusal (too long, a full queue) or a lost connection
                if not is_context_error(error):
                    say(f"[error: {error}]\n")
                    reply = None
                    break
                say("[too long]\n")
                messages, reply = drop_oldest_exchange(messages), None
        if messages is None:
            say("[this message alone is longer than the context allows; it was not sent]\n")
        elif reply is not None:
            history = messages + [{"role": "assistant", "content": reply}]
