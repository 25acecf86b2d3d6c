"""The one chat completion every constant-answer target sends, byte for byte.

Why one module: ``bench/compare.py``'s static upstream (an nginx ``return``) and the hello
world targets (``bench/hello_server.py``, ``bench/hello_app.py``) must send the same bytes,
so a throughput difference between them is the server's, not the body's. It is what the
mock upstream (``python -m proxy.mock``) would answer to ``bench.load``'s default request.
"""

from __future__ import annotations

import orjson

from proxy.mock import payloads

PROMPT = "Say hello to the benchmark."
CONTENT_TYPE = "application/json"


def chat_body() -> bytes:
    """The mock's answer to ``PROMPT`` with a fixed id and timestamp (compact JSON)."""
    text = payloads.answer_for(PROMPT)
    answer = payloads.Answer("chatcmpl-static", 1700000000, "mock-gpt", text,
                             payloads.usage(PROMPT, text))
    return orjson.dumps(payloads.chat_completion(answer))


BODY = chat_body()
