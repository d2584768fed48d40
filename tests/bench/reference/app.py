"""Reference implementation of `POST /chat`, written the way the FastAPI design it replaces does it.

FastAPI + Pydantic for the request, boto3 for DynamoDB, the official `openai` client for the
upstream, PyJWT for the bearer token, and Mangum to run the ASGI app as a Lambda handler
(`app.handler`). It exists only so `make bench` can measure the Rust functions against it on the
same machine, against the same DynamoDB tables and the same mock LLM; see BENCHMARKS.md for
where it differs from the Rust `chat` function.

On the benchmarked path it does what the Rust chat turn does:
- validation: `message` 1..5000 characters after trimming, `system_prompt` <= 1000, no control
  characters but newline and tab, `conversation_id` a UUID, `model` an id or alias of the same
  model registry (shared/models.toml), `temperature` 0..2 (0.7), `max_tokens` 1..4000 (1000),
  unknown fields rejected; failures use the gateway's error envelope;
- auth: `Authorization: Bearer <HS256 JWT>` with `sub`, `exp` and an optional `tier`;
- DynamoDB, with the same items: the last 20 messages (one Query, newest first), the rate-limit
  counter (one conditional UpdateItem that counts the request and reserves the token estimate),
  and the turn (one TransactWriteItems: both messages and the conversation's META);
- upstream: one chat completion with the same model, messages, temperature and token limit.

What the design it replaces does not have, it does not do either: no response cache and no
settlement of the token reservation after the call.
"""

from __future__ import annotations

import datetime
import os
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import boto3
import jwt
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from mangum import Mangum
from openai import APIConnectionError, APIStatusError, APITimeoutError, OpenAI
from pydantic import BaseModel, ConfigDict, Field, field_validator

HISTORY_MESSAGES = 20
MAX_MESSAGE_CHARS = 5000
MAX_SYSTEM_PROMPT_CHARS = 1000
MESSAGE_OVERHEAD_TOKENS = 4
COUNTER_GRACE_SECS = 300
MAX_APPEND_ATTEMPTS = 40

# ---------------------------------------------------------------------------------------------
# Settings and clients, built once per cold start (module import), outside the handler.

TABLE_CONVERSATIONS = os.environ["CONVERSATIONS_TABLE"]
TABLE_RATE_LIMITS = os.environ["RATE_LIMITS_TABLE"]
JWT_SECRET = os.environ["JWT_SECRET"]
JWT_LEEWAY = int(os.environ.get("JWT_LEEWAY_SECONDS", "30"))
RETENTION_SECS = int(os.environ.get("HISTORY_RETENTION_DAYS", "30")) * 86_400
QUOTAS = {
    tier: (
        int(os.environ.get(f"RATE_LIMIT_{tier.upper()}_REQUESTS_PER_HOUR", rph)),
        int(os.environ.get(f"RATE_LIMIT_{tier.upper()}_TOKENS_PER_MINUTE", tpm)),
    )
    for tier, rph, tpm in (
        ("free", 100, 20_000),
        ("pro", 1_000, 200_000),
        ("enterprise", 10_000, 2_000_000),
    )
}


def _load_registry() -> tuple[dict[str, dict[str, Any]], str]:
    path = Path(os.environ.get("REFERENCE_REGISTRY_PATH", Path(__file__).with_name("models.toml")))
    with path.open("rb") as f:
        data = tomllib.load(f)
    names: dict[str, dict[str, Any]] = {}
    for model in data["models"]:
        for name in [model["id"], *model.get("aliases", [])]:
            names[name] = model
    return names, data["default_model"]


MODELS, DEFAULT_MODEL = _load_registry()

dynamodb = boto3.client(
    "dynamodb",
    config=BotoConfig(
        connect_timeout=1,
        read_timeout=2,
        retries={"mode": "standard", "max_attempts": 3},
    ),
)
llm = OpenAI(
    base_url=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
    api_key=os.environ.get("OPENAI_API_KEY", "unset"),
    timeout=int(os.environ.get("LLM_TIMEOUT_MS", "10000")) / 1000,
    max_retries=2,
)

# ---------------------------------------------------------------------------------------------
# Errors: the gateway's envelope.


class ApiError(Exception):
    def __init__(self, status: int, kind: str, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.message = status, kind, code, message
        self.headers = headers or {}


def envelope(request: Request, kind: str, code: str, message: str, param: str | None = None,
             details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": kind, "code": code, "message": message, "param": param,
                             "request_id": request.state.request_id}
    if details is not None:
        error["details"] = details
    return {"error": error}


# ---------------------------------------------------------------------------------------------
# Request and response models.


def _check_text(value: str, field: str, minimum: int, maximum: int) -> str:
    length = len(value.strip())
    if length < minimum:
        raise ValueError(f"{field} must not be empty")
    if length > maximum:
        raise ValueError(f"{field} must be at most {maximum} characters (got {length})")
    if any((ord(c) < 32 or 127 <= ord(c) < 160) and c not in "\n\t" for c in value):
        raise ValueError(f"{field} must not contain control characters other than newline and tab")
    return value


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    message: str
    conversation_id: uuid.UUID | None = Field(default=None, strict=False)
    system_prompt: str | None = None
    model: str | None = None
    temperature: float = Field(default=0.7, ge=0, le=2)
    max_tokens: int = Field(default=1000, ge=1, le=4000)

    @field_validator("message")
    @classmethod
    def _message(cls, value: str) -> str:
        return _check_text(value, "message", 1, MAX_MESSAGE_CHARS)

    @field_validator("system_prompt")
    @classmethod
    def _system_prompt(cls, value: str | None) -> str | None:
        return None if value is None else _check_text(value, "system_prompt", 0, MAX_SYSTEM_PROMPT_CHARS)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        if value is not None and value not in MODELS:
            raise ValueError(f"unknown model '{value[:100]}'; see GET /models")
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponse(BaseModel):
    message: str
    conversation_id: uuid.UUID
    model: str
    usage: Usage
    cost_estimate: float
    cached: bool
    created_at: str


class Principal(BaseModel):
    user_id: str
    tier: str


# ---------------------------------------------------------------------------------------------
# The app.

app = FastAPI(title="reference chat", version="1.0.0")


@app.middleware("http")
async def request_context(request: Request, call_next: Any) -> Any:
    started = time.perf_counter()
    request.state.request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
    response = await call_next(request)
    response.headers["x-request-id"] = request.state.request_id
    response.headers["x-process-time-ms"] = f"{(time.perf_counter() - started) * 1000:.1f}"
    return response


@app.exception_handler(ApiError)
async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(envelope(request, exc.kind, exc.code, exc.message), exc.status, exc.headers)


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    malformed = [e for e in errors if e["type"] in ("json_invalid", "extra_forbidden", "model_attributes_type")]
    if malformed:
        first = malformed[0]
        param = str(first["loc"][-1]) if first["type"] == "extra_forbidden" else None
        return JSONResponse(envelope(request, "invalid_request_error", "invalid_json",
                                     str(first["msg"]), param=param), 400)
    details = [{"loc": [str(p) for p in e["loc"]], "msg": str(e["msg"]).removeprefix("Value error, "),
                "type": e["type"]} for e in errors]
    param = details[0]["loc"][-1] if details else None
    return JSONResponse(envelope(request, "invalid_request_error", "validation_error",
                                 "request validation failed", param=param, details=details), 422)


def principal(request: Request) -> Principal:
    auth = request.headers.get("authorization", "")
    if not auth.lower().startswith("bearer "):
        raise ApiError(401, "authentication_error", "missing_credentials", "missing credentials")
    try:
        claims = jwt.decode(auth[7:].strip(), JWT_SECRET, algorithms=["HS256"], leeway=JWT_LEEWAY,
                            options={"require": ["sub", "exp"]})
    except jwt.PyJWTError:
        raise ApiError(401, "authentication_error", "invalid_credentials", "invalid credentials") from None
    tier = claims.get("tier", "free")
    if tier not in QUOTAS:
        raise ApiError(401, "authentication_error", "invalid_credentials", "invalid credentials")
    return Principal(user_id=claims["sub"], tier=tier)


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok", "function": "reference"}


@app.post("/chat", response_model=ChatResponse)
def chat(body: ChatRequest, who: Principal = Depends(principal)) -> JSONResponse:
    model = MODELS[body.model] if body.model else MODELS[DEFAULT_MODEL]
    system_prompt = body.system_prompt if body.system_prompt and body.system_prompt.strip() else None

    # 1. The last 20 messages, newest first (also proves ownership).
    if body.conversation_id is not None:
        conversation_id = body.conversation_id
        history, expected = recent_messages(who.user_id, conversation_id)
    else:
        conversation_id, history, expected = uuid.uuid4(), [], None
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + history
    messages.append({"role": "user", "content": body.message})

    # 2. Count the request and reserve its tokens in one conditional update.
    estimate = estimate_messages(m["content"] for m in messages) + body.max_tokens
    limit, remaining, reset_after = admit(who, estimate)

    # 3. The model.
    try:
        completion = llm.chat.completions.create(
            model=model["id"],
            messages=messages,
            temperature=body.temperature,
            max_completion_tokens=min(body.max_tokens, model["max_output_tokens"]),
        )
    except APITimeoutError:
        raise ApiError(504, "upstream_error", "upstream_timeout", "the model did not answer in time") from None
    except APIStatusError as exc:
        status = 429 if exc.status_code == 429 else 502
        raise ApiError(status, "upstream_error", "upstream_error", "the model failed") from None
    except APIConnectionError:
        raise ApiError(502, "upstream_error", "upstream_unreachable", "the model is unreachable") from None
    answer = completion.choices[0].message.content or ""
    usage = completion.usage
    prompt_tokens = usage.prompt_tokens if usage else 0
    completion_tokens = usage.completion_tokens if usage else 0
    cost = (prompt_tokens * model["input_per_1k_usd"] + completion_tokens * model["output_per_1k_usd"]) / 1000

    # 4. Both messages and the conversation's counters in one transaction.
    append_turn(who.user_id, conversation_id, expected, body.message, answer, prompt_tokens,
                completion_tokens, model["id"], cost)

    response = ChatResponse(
        message=answer, conversation_id=conversation_id, model=model["id"],
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens),
        cost_estimate=cost, cached=False, created_at=now_rfc3339(),
    )
    return JSONResponse(response.model_dump(mode="json"), headers={
        "x-ratelimit-limit": str(limit), "x-ratelimit-remaining": str(remaining),
        "x-ratelimit-reset": str(reset_after), "x-cache": "MISS",
    })


handler = Mangum(app, lifespan="off")

# ---------------------------------------------------------------------------------------------
# DynamoDB.


def now_rfc3339() -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def estimate_tokens(text: str) -> int:
    ascii_chars = sum(1 for c in text if ord(c) < 128)
    return -(-ascii_chars // 4) + (len(text) - ascii_chars)


def estimate_messages(contents: Any) -> int:
    return sum(estimate_tokens(c) + MESSAGE_OVERHEAD_TOKENS for c in contents) + 3


def recent_messages(owner: str, conversation_id: uuid.UUID) -> tuple[list[dict[str, str]], int]:
    out = dynamodb.query(
        TableName=TABLE_CONVERSATIONS,
        KeyConditionExpression="pk = :pk AND begins_with(sk, :msg)",
        ExpressionAttributeValues={":pk": {"S": f"CONV#{conversation_id}"}, ":msg": {"S": "MSG#"}},
        ScanIndexForward=False,
        Limit=HISTORY_MESSAGES,
    )
    items = out.get("Items", [])
    now = int(time.time())

    def expired(item: dict[str, Any]) -> bool:
        return "expires_at" in item and int(item["expires_at"]["N"]) <= now

    if not items or items[0].get("owner", {}).get("S") != owner or expired(items[0]):
        raise ApiError(404, "not_found_error", "not_found", "conversation not found")
    live = [i for i in reversed(items) if not expired(i)]
    history = [{"role": "assistant" if i["role"]["S"] == "assistant" else "user",
                "content": i["content"]["S"]} for i in live]
    expected = int(items[0]["sk"]["S"].removeprefix("MSG#")) + 1
    return history, expected


def admit(who: Principal, estimate: int) -> tuple[int, int, int]:
    requests_per_hour, tokens_per_minute = QUOTAS[who.tier]
    now = int(time.time())
    hour = now - now % 3600
    minute = now - now % 60
    reset_after = max(hour + 3600 - now, 1)
    if estimate > tokens_per_minute:
        raise ApiError(429, "rate_limit_error", "rate_limited", f"{tokens_per_minute} tokens per minute",
                       {"retry-after": str(max(minute + 60 - now, 1))})
    try:
        out = dynamodb.update_item(
            TableName=TABLE_RATE_LIMITS,
            Key={"pk": {"S": f"rl#{who.user_id}#{hour}"}},
            UpdateExpression="ADD #c0 :a0, #c1 :a1 SET #exp = if_not_exists(#exp, :exp)",
            ConditionExpression="(attribute_not_exists(#c0) OR #c0 <= :m0) AND "
                                "(attribute_not_exists(#c1) OR #c1 <= :m1)",
            ExpressionAttributeNames={"#c0": "requests", "#c1": f"tokens_{minute}", "#exp": "expires_at"},
            ExpressionAttributeValues={
                ":a0": {"N": "1"}, ":m0": {"N": str(requests_per_hour - 1)},
                ":a1": {"N": str(estimate)}, ":m1": {"N": str(tokens_per_minute - estimate)},
                ":exp": {"N": str(hour + 3600 + COUNTER_GRACE_SECS)},
            },
            ReturnValues="UPDATED_NEW",
        )
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
            raise ApiError(429, "rate_limit_error", "rate_limited", "rate limit exceeded",
                           {"retry-after": str(reset_after)}) from None
        raise ApiError(503, "service_unavailable", "dependency_unavailable", "DynamoDB is unavailable") from None
    used = int(out["Attributes"]["requests"]["N"])
    return requests_per_hour, max(requests_per_hour - used, 0), reset_after


def append_turn(owner: str, conversation_id: uuid.UUID, expected: int | None, user_message: str,
                answer: str, prompt_tokens: int, completion_tokens: int, model: str, cost: float) -> None:
    pk = {"S": f"CONV#{conversation_id}"}
    for attempt in range(MAX_APPEND_ATTEMPTS):
        now = now_rfc3339()
        expires_at = {"N": str(int(time.time()) + RETENTION_SECS)}
        base = expected or 0
        tokens = {"N": str(prompt_tokens + completion_tokens)}
        cost_n = {"N": f"{cost:.10f}"}
        if expected is None:
            meta = {"Put": {
                "TableName": TABLE_CONVERSATIONS,
                "Item": {"pk": pk, "sk": {"S": "META"}, "owner": {"S": owner},
                         "title": {"S": (user_message.splitlines() or [""])[0].strip()[:80]},
                         "model": {"S": model}, "message_count": {"N": "2"}, "total_tokens": tokens,
                         "total_cost": cost_n, "created_at": {"S": now}, "updated_at": {"S": now},
                         "expires_at": expires_at},
                "ConditionExpression": "attribute_not_exists(pk)",
            }}
        else:
            meta = {"Update": {
                "TableName": TABLE_CONVERSATIONS,
                "Key": {"pk": pk, "sk": {"S": "META"}},
                "UpdateExpression": "SET message_count = :next, updated_at = :now, model = :model, "
                                    "expires_at = :exp ADD total_tokens :tokens, total_cost :cost",
                "ConditionExpression": "message_count = :expected AND #owner = :owner",
                "ExpressionAttributeNames": {"#owner": "owner"},
                "ExpressionAttributeValues": {
                    ":next": {"N": str(expected + 2)}, ":expected": {"N": str(expected)},
                    ":owner": {"S": owner}, ":now": {"S": now}, ":model": {"S": model},
                    ":exp": expires_at, ":tokens": tokens, ":cost": cost_n,
                },
            }}

        def message(seq: int, role: str, content: str, count: int) -> dict[str, Any]:
            return {"Put": {
                "TableName": TABLE_CONVERSATIONS,
                "Item": {"pk": pk, "sk": {"S": f"MSG#{seq:010d}"}, "owner": {"S": owner},
                         "role": {"S": role}, "content": {"S": content}, "tokens": {"N": str(count)},
                         "created_at": {"S": now}, "expires_at": expires_at},
                "ConditionExpression": "attribute_not_exists(pk)",
            }}

        try:
            dynamodb.transact_write_items(TransactItems=[
                message(base, "user", user_message, prompt_tokens),
                message(base + 1, "assistant", answer, completion_tokens),
                meta,
            ])
            return
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "TransactionCanceledException":
                raise ApiError(503, "service_unavailable", "dependency_unavailable",
                               "DynamoDB is unavailable") from None
        # Lost a race: read the conversation's head and try the next free slots.
        head = dynamodb.get_item(TableName=TABLE_CONVERSATIONS, Key={"pk": pk, "sk": {"S": "META"}},
                                 ConsistentRead=True).get("Item")
        if head is None or head["owner"]["S"] != owner:
            raise ApiError(404, "not_found_error", "not_found", "conversation not found")
        expected = int(head["message_count"]["N"])
        time.sleep(min(0.005 * (2 ** min(attempt, 4)), 0.08))
    raise ApiError(503, "service_unavailable", "dependency_unavailable", "conversation append kept conflicting")
