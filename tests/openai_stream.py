#!/usr/bin/env python3
"""Stream from the stream function's OpenAI-compatible route with the official OpenAI Python SDK.

Run by tests/tests/stream.rs, which creates a fresh API key and passes in the environment:

    GW_FUNCTIONS_URL     the local stack's function URL base (set by infra/devstack.py)
    GW_STREAM_API_KEY    an API key (gwk_...); the SDK sends it as `Authorization: Bearer`
    GW_STREAM_MODEL      a model id the gateway serves
    GW_STREAM_MARKER     a unique token to put into the messages

The same question is asked three times: without streaming, streaming with
`stream_options={"include_usage": True}`, and streaming without it. Every request sends
`Cache-Control: no-cache`, so each is a live upstream call rather than a cache replay (the Rust
side checks the mock received all three). Exits 0 when every check passes; otherwise prints what
failed and exits 1.
"""

from __future__ import annotations

import os
import sys

import openai
from openai import OpenAI

REQUEST_TIMEOUT_S = 30.0
# A reply of this many words (one mock token each), streamed one word per chunk.
MOCK_TOKENS = 15


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    # Explicit checks rather than `assert`, which `python -O` would remove.
    if not condition:
        raise CheckFailed(message)


def usage_numbers(usage: object) -> tuple[int, int, int]:
    return (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)  # type: ignore[attr-defined]


def main() -> int:
    try:
        base_url = os.environ["GW_FUNCTIONS_URL"].rstrip("/") + "/stream/v1"
        api_key = os.environ["GW_STREAM_API_KEY"]
        model = os.environ["GW_STREAM_MODEL"]
        marker = os.environ["GW_STREAM_MARKER"]
    except KeyError as missing:
        print(f"FAIL: {missing.args[0]} is not set (run through tests/tests/stream.rs)", file=sys.stderr)
        return 1
    print(f"openai {openai.__version__} against {base_url}")
    client = OpenAI(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        timeout=REQUEST_TIMEOUT_S,
        default_headers={"Cache-Control": "no-cache"},
    )
    messages = [{"role": "user", "content": f"stream to the sdk {marker} [mock tokens={MOCK_TOKENS} token_ms=20]"}]
    try:
        whole = client.chat.completions.create(model=model, messages=messages, max_tokens=64)
        expected_text = whole.choices[0].message.content or ""
        check(whole.usage is not None, "the non-streamed answer has no usage")
        expected_usage = usage_numbers(whole.usage)
        check(expected_usage[1] == MOCK_TOKENS, f"non-streamed completion_tokens {expected_usage[1]}")
        print(f"ok: non-streamed answer {expected_text[:50]!r}... usage {expected_usage}")

        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=64,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces: list[str] = []
        usage_chunks = []
        finish_reasons = []
        ids = set()
        chunk_count = 0
        for chunk in stream:
            chunk_count += 1
            check(chunk.object == "chat.completion.chunk", f"chunk object {chunk.object!r}")
            ids.add(chunk.id)
            check(not usage_chunks, f"a chunk came after the usage chunk: {chunk}")
            if chunk.usage is not None:
                check(chunk.choices == [], f"the usage chunk has choices: {chunk}")
                usage_chunks.append(chunk.usage)
                continue
            check(len(chunk.choices) == 1, f"{len(chunk.choices)} choices in {chunk}")
            choice = chunk.choices[0]
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish_reasons.append(choice.finish_reason)
        text = "".join(pieces)
        check(text == expected_text, f"streamed text {text!r} != non-streamed {expected_text!r}")
        check(len(pieces) >= MOCK_TOKENS, f"only {len(pieces)} content chunks: not streamed piece by piece")
        check(len(ids) == 1, f"chunks carry {len(ids)} different ids")
        check(finish_reasons == ["stop"], f"finish reasons {finish_reasons}")
        check(len(usage_chunks) == 1, f"{len(usage_chunks)} usage chunks")
        check(
            usage_numbers(usage_chunks[0]) == expected_usage,
            f"streamed usage {usage_numbers(usage_chunks[0])} != non-streamed {expected_usage}",
        )
        print(f"ok: streamed {len(pieces)} pieces in {chunk_count} chunks, usage {expected_usage}")

        plain = client.chat.completions.create(model=model, messages=messages, max_tokens=64, stream=True)
        plain_chunks = list(plain)
        plain_text = "".join(c.choices[0].delta.content or "" for c in plain_chunks if c.choices)
        check(plain_text == expected_text, f"stream without usage: text {plain_text!r}")
        check(
            all(c.usage is None for c in plain_chunks),
            "a usage chunk was sent although stream_options.include_usage was not set",
        )
        print("ok: without include_usage there is no usage chunk")
    except CheckFailed as failure:
        print(f"FAIL: {failure}", file=sys.stderr)
        return 1
    except openai.APIError as err:
        status = getattr(err, "status_code", None)
        print(f"FAIL: unexpected {type(err).__name__} (status {status}): {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
