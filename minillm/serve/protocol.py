"""OpenAI's wire format: request bodies, response objects, and server-sent events (SSE) for streaming.

A streamed response is ``Content-Type: text/event-stream``: one event per chunk, each ``data: <json>`` followed by
a blank line, and a last ``data: [DONE]``. Every chunk is a complete JSON object of the response's type
(``text_completion`` or ``chat.completion.chunk``) carrying only the new text, so a client prints text as it arrives.
Exercise 12.1 rebuilds ``sse_encode`` and checks it against the real ``openai`` client's parser.
"""

from __future__ import annotations

import json

DONE = "[DONE]"


def sse_encode(payload: dict | str) -> bytes:
    """One server-sent event: ``data: <compact JSON>\\n\\n`` (a str, such as DONE, goes as it is)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()
