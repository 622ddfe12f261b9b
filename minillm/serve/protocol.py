"""OpenAI's wire format: request bodies, response objects, and server-sent events (SSE) for streaming.

A streamed response is ``Content-Type: text/event-stream``: one event per chunk, each ``data: <json>`` followed by
a blank line, and a last ``data: [DONE]``. Every chunk is a complete JSON object of the response's type
(``text_completion`` or ``chat.completion.chunk``) carrying only the new text, so a client prints text as it arrives.
Exercise 12.1 rebuilds ``sse_encode`` and checks it against the real ``openai`` client's parser.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DONE = "[DONE]"


def sse_encode(payload: dict | str) -> bytes:
    """One server-sent event: ``data: <compact JSON>\\n\\n`` (a str, such as DONE, goes as it is)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()


# ---- request bodies: OpenAI's fields, plus vLLM's extras (top_k, ignore_eos, guided_regex) -----------------------
# Fields OpenAI defines that minillm does not implement are accepted only at their neutral value, so a client that
# relies on them hears so (400) instead of silently getting something else.

class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's default and range
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the token counts
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None
    response_format: dict | None = None  # {"type": "text" | "json_object"}
    top_k: int = Field(default=0, ge=0)  # vLLM's extra: 0 = off
    ignore_eos: bool = False  # vLLM's extra: benchmarks want exact output lengths
    guided_regex: str | None = None  # vLLM's extra: the output must match this regex

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > 4 or not all(stops)):
            raise ValueError("stop must be a non-empty string or a list of at most 4 non-empty strings")
        return stops

    def unsupported(self) -> str | None:
        """The first field set to something minillm does not do, as an error message (None: all fine)."""
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty are not supported by minillm (leave them at 0)"
        if self.logprobs not in (None, False, 0):
            return "logprobs are not supported by minillm"
        if self.stream_options is not None and not self.stream:
            return "stream_options is only allowed with stream=true"
        return None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """One prompt or a batch: a string, token ids, or a list of either."""
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        return list(p)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict]

    def text(self) -> str:
        """A string, or OpenAI's list of content parts of which minillm reads the text ones."""
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" for part in self.content):
            raise ValueError("only text content parts are supported (the model reads text)")
        return "".join(part.get("text", "") for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens


# ---- response objects ------------------------------------------------------------------------------------------

def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object: the `openai` client raises it as BadRequestError (400), RateLimitError (429)..."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_chunk(request_id: str, model: str, created: int, index: int, text: str,
                     finish_reason: str | None) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk(request_id: str, model: str, created: int, index: int, delta: dict,
               finish_reason: str | None) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(request_id: str, model: str, created: int, obj: str, counts: dict) -> dict:
    """The last chunk with stream_options.include_usage: no choices, only the token counts."""
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [], "usage": counts}
