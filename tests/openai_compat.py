#!/usr/bin/env python3
"""Drive the gateway's OpenAI-compatible routes with the official OpenAI Python SDK.

Run by tests/tests/openai_compat.rs, which creates a fresh API key and passes it in the
environment:

    GW_FUNCTIONS_URL     the local stack's function URL base (set by infra/devstack.py)
    GW_COMPAT_API_KEY    an API key (gwk_...); the SDK sends it as `Authorization: Bearer`
    GW_COMPAT_MODEL      a model id the gateway serves
    GW_COMPAT_MARKER     a unique token to put into the messages

Exits 0 when every check passes; otherwise prints what failed and exits 1.
"""

from __future__ import annotations

import os
import sys

import openai
from openai import OpenAI

# The mock LLM starts its reply with `[mock] messages=<N> last=<first 40 chars of last user msg>`.
MOCK_ECHO_CHARS = 40
REQUEST_TIMEOUT_S = 30.0


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    # Explicit checks rather than `assert`, which `python -O` would remove.
    if not condition:
        raise CheckFailed(message)


def mock_prefix(messages: int, last_user: str) -> str:
    echo = " ".join(last_user.split())[:MOCK_ECHO_CHARS].rstrip()
    return f"[mock] messages={messages} last={echo}"


def models_are_listed(client: OpenAI, model: str) -> None:
    ids = [m.id for m in client.models.list()]
    check(model in ids, f"models.list() lacks {model!r}: {ids}")
    print(f"ok: models.list() -> {len(ids)} models including {model}")


def completion_round_trip(client: OpenAI, model: str, marker: str) -> None:
    question = f"hello from the python sdk {marker}"
    completion = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": question},
        ],
        temperature=0.2,
        max_tokens=64,
    )
    check(completion.object == "chat.completion", f"object {completion.object!r}")
    check(bool(completion.id), "empty completion id")
    check(completion.model == model, f"model {completion.model!r} != {model!r}")
    check(len(completion.choices) == 1, f"{len(completion.choices)} choices")
    choice = completion.choices[0]
    check(choice.index == 0, f"choice index {choice.index}")
    check(choice.message.role == "assistant", f"role {choice.message.role!r}")
    content = choice.message.content or ""
    expected = mock_prefix(2, question)
    check(content.startswith(expected), f"content {content!r} does not start with {expected!r}")
    check(choice.finish_reason == "stop", f"finish_reason {choice.finish_reason!r}")
    usage = completion.usage
    check(usage is not None, "no usage")
    assert usage is not None  # for type checkers; `check` above already failed otherwise
    check(usage.completion_tokens == len(content.split()), f"completion_tokens {usage.completion_tokens}")
    check(
        usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
        f"usage does not add up: {usage}",
    )
    print(f"ok: chat.completions.create() -> {content[:60]!r}...")


def upstream_429_raises_rate_limit_error(client: OpenAI, model: str, marker: str) -> None:
    directive = f"[mock fault=429 retry_after=1 times=10 key={marker}-429]"
    try:
        client.with_options(max_retries=0).chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"{directive} throttled {marker}"}],
            max_tokens=16,
        )
    except openai.RateLimitError as err:
        check(err.status_code == 429, f"status {err.status_code}")
        retry_after = err.response.headers.get("retry-after", "")
        check(retry_after.isdigit() and int(retry_after) >= 1, f"Retry-After {retry_after!r}")
        check(err.code == "upstream_rate_limited", f"error code {err.code!r}")
        print(f"ok: upstream 429 -> openai.RateLimitError (Retry-After {retry_after})")
        return
    raise CheckFailed("an upstream 429 did not raise openai.RateLimitError")


def unknown_key_raises_authentication_error(base_url: str, model: str, marker: str) -> None:
    client = OpenAI(base_url=base_url, api_key="gwk_not_a_real_key", max_retries=0, timeout=REQUEST_TIMEOUT_S)
    try:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"who am I {marker}"}],
            max_tokens=16,
        )
    except openai.AuthenticationError as err:
        check(err.status_code == 401, f"status {err.status_code}")
        print("ok: unknown key -> openai.AuthenticationError")
        return
    raise CheckFailed("an unknown API key did not raise openai.AuthenticationError")


def main() -> int:
    try:
        base_url = os.environ["GW_FUNCTIONS_URL"].rstrip("/") + "/chat/v1"
        api_key = os.environ["GW_COMPAT_API_KEY"]
        model = os.environ["GW_COMPAT_MODEL"]
        marker = os.environ["GW_COMPAT_MARKER"]
    except KeyError as missing:
        print(f"FAIL: {missing.args[0]} is not set (run through tests/tests/openai_compat.rs)", file=sys.stderr)
        return 1
    print(f"openai {openai.__version__} against {base_url}")
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=REQUEST_TIMEOUT_S)
    try:
        models_are_listed(client, model)
        completion_round_trip(client, model, marker)
        upstream_429_raises_rate_limit_error(client, model, marker)
        unknown_key_raises_authentication_error(base_url, model, marker)
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
