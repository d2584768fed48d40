#!/usr/bin/env python3
"""`make bench`: the Rust functions against the FastAPI reference, side by side, in one run.

    python tests/bench/bench.py [--iterations 1000] [--cold-starts 11] [--skip-package] [--quick]

Prepare (outside the stack): the pinned venvs of the reference and of the chart
(.bench/reference-venv, .bench/tools-venv), a release build of the four functions and of the
in-process loop (`cargo build --release`, shared target/), the deployment packages
(`cargo lambda build --release --arm64 --output-format zip` per function, and the reference's
zip with its dependencies for the Lambda Python runtime on arm64).

Measure (inside `infra/devstack.py run`, so against one serialized DynamoDB emulator and one mock
LLM): cold starts under the Runtime Interface Emulator, warm overhead above a floor, peak RSS,
DynamoDB round trips per chat turn, streaming TTFB through `cargo lambda watch`, batch fan-out
efficiency, and the in-process loop. Results go to tests/bench/results/ (results.json,
results.md, latency.png) and the table is printed.

Every process this script starts runs in its own session and is stopped by its pid (process
group) when its measurement ends, on failure too; devstack stops the stack itself.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import hashlib
import hmac
import http.client
import http.server
import json
import os
import platform
import re
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time
import traceback
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "tests" / "bench"
STATE = ROOT / ".bench"
RESULTS = BENCH / "results"
VENV = ROOT / ".venv"
FUNCTIONS = ("chat", "stream", "analyze", "batch")
REFERENCE_VENV = STATE / "reference-venv"
TOOLS_VENV = STATE / "tools-venv"
REFERENCE_TASK = STATE / "reference-task"
PLAN = STATE / "plan.json"

# The mock LLM's fixed latency for warm runs, and its streaming shape for the TTFB run.
MOCK_LATENCY_MS = 25
STREAM_TTFT_MS = 150
STREAM_TOKEN_MS = 25
STREAM_TOKENS = 20
BATCH_ITEMS, BATCH_CONCURRENCY, BATCH_ITEM_MS = 100, 10, 200
TURNS_PER_CONVERSATION = 10
# Part of every benchmark message, so nothing left in the emulator by an earlier run can hit.
RUN_NONCE = uuid.uuid4().hex[:8]
# Quotas for the bench principals: far above what a run uses, so admission always admits.
BENCH_QUOTAS = {"RATE_LIMIT_PRO_REQUESTS_PER_HOUR": "100000000",
                "RATE_LIMIT_PRO_TOKENS_PER_MINUTE": "4000000000"}
TARGETS = {
    "cold_start_ms": 25.0, "cold_start_ratio": 20.0, "warm_p99_ms": 5.0, "inproc_p99_us": 200.0,
    "rss_mb": 32.0, "zip_mb": 6.0, "round_trips": 3, "stream_ttfb_ms": 5.0, "batch_efficiency": 0.9,
}


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ============================================================================================
# Prepare (outer process)


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    say("$ " + " ".join(argv))
    return subprocess.run(argv, cwd=kwargs.pop("cwd", ROOT), text=True, stdin=subprocess.DEVNULL, **kwargs)


def ensure_venv(venv: Path, requirements: Path) -> Path:
    """A venv with exactly the pinned requirements (re-created when the file changes)."""
    stamp = venv / ".requirements.sha256"
    want = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != want:
        say(f"creating {venv.relative_to(ROOT)} from {requirements.relative_to(ROOT)}")
        shutil.rmtree(venv, ignore_errors=True)
        if run([sys.executable, "-m", "venv", str(venv)]).returncode != 0:
            raise BenchError(f"cannot create {venv}")
        pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps", "-r", str(requirements)]
        if run(pip).returncode != 0:
            raise BenchError(f"pip install -r {requirements} failed")
        stamp.write_text(want + "\n")
    return venv / "bin" / "python"


def find_rie() -> Path:
    found = sorted(VENV.glob("lib/python3*/site-packages/samcli/local/rapid/aws-lambda-rie-x86_64"))
    if not found:
        raise BenchError("aws-lambda-rie-x86_64 not found in .venv (aws-sam-cli): run `make bootstrap`")
    return found[0]


def build_release() -> dict[str, str | None]:
    """x86_64 release binaries for the emulator runs and the in-process loop (shared target/).

    `--keep-going` builds what it can; only binaries that cargo reports as built (or fresh) in
    this run are used, so a stale binary of a package that no longer compiles is never measured.
    """
    argv = ["cargo", "build", "--release", "--keep-going", "--message-format", "json-render-diagnostics"]
    for package in (*FUNCTIONS, "bench"):
        argv += ["-p", package]
    say("$ " + " ".join(argv))
    result = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    built: dict[str, str] = {}
    for line in result.stdout.splitlines():
        with contextlib.suppress(ValueError):
            message = json.loads(line)
            if message.get("reason") == "compiler-artifact" and message.get("executable"):
                built[message["target"]["name"]] = message["executable"]
    if result.returncode != 0:
        say("warning: the release build failed for some packages; their rows are marked pending")
    # A copy, so a rebuild in the shared target/ during the run cannot swap a binary under it.
    copies = STATE / "bin"
    shutil.rmtree(copies, ignore_errors=True)
    copies.mkdir(parents=True)
    binaries: dict[str, str | None] = {}
    for name in (*FUNCTIONS, "inproc"):
        binaries[name] = None
        if built.get(name):
            shutil.copy2(built[name], copies / name)
            binaries[name] = str(copies / name)
    return binaries


def aarch64_installed() -> bool:
    result = subprocess.run(["rustup", "target", "list", "--installed"], capture_output=True, text=True)
    return "aarch64-unknown-linux-gnu" in result.stdout


def build_packages() -> dict[str, Any]:
    """`cargo lambda build --release --arm64 --output-format zip`, one zip per function."""
    arm = aarch64_installed()
    arch = "arm64" if arm else "x86_64"
    if not arm:
        say("warning: the aarch64-unknown-linux-gnu Rust target is not installed "
            "(`rustup target add aarch64-unknown-linux-gnu`); measuring x86_64 zips instead")
    lambda_dir = STATE / f"lambda-{arch}"
    packages: dict[str, Any] = {"arch": arch, "functions": {}}
    for name in FUNCTIONS:
        # One function per invocation, so a function that does not build leaves the others.
        argv = [str(VENV / "bin" / "cargo-lambda"), "lambda", "build", "--release", "--output-format", "zip",
                "--lambda-dir", str(lambda_dir), "--bin", name]
        if arm:
            argv.insert(3, "--arm64")
        env = {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
        result = run(argv, env=env)
        zip_path = lambda_dir / name / "bootstrap.zip"
        if result.returncode != 0 or not zip_path.exists():
            packages["functions"][name] = None
            continue
        with zipfile.ZipFile(zip_path) as z:
            unzipped = sum(i.file_size for i in z.infolist())
        packages["functions"][name] = {"zip_bytes": zip_path.stat().st_size, "unzipped_bytes": unzipped,
                                       "path": str(zip_path.relative_to(ROOT))}
    return packages


def reference_package() -> dict[str, Any]:
    """The reference as it would be deployed: app + registry + dependencies for the Lambda Python
    3.12 runtime on arm64 (wheels for that platform), zipped. awslambdaric is left out: the
    managed runtime has its own."""
    work = STATE / "reference-package"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    requirements = work / "requirements.txt"
    pins = [line for line in (BENCH / "reference" / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    runtime_only = {"awslambdaric", "simplejson", "snapshot-restore-py"}
    requirements.write_text("\n".join(p for p in pins if p.split("==")[0].lower() not in runtime_only) + "\n")
    pip = [str(REFERENCE_VENV / "bin" / "pip"), "install", "--quiet", "--no-deps", "--target", str(work / "pkg"),
           "--platform", "manylinux2014_aarch64", "--implementation", "cp", "--python-version", "3.12",
           "--only-binary=:all:", "-r", str(requirements)]
    if run(pip).returncode != 0:
        return {"error": "pip could not assemble the reference package"}
    shutil.copy(BENCH / "reference" / "app.py", work / "pkg" / "app.py")
    shutil.copy(ROOT / "shared" / "models.toml", work / "pkg" / "models.toml")
    zip_path = work / "reference.zip"
    unzipped = 0
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted((work / "pkg").rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                z.write(path, path.relative_to(work / "pkg"))
                unzipped += path.stat().st_size
    return {"zip_bytes": zip_path.stat().st_size, "unzipped_bytes": unzipped, "arch": "arm64",
            "python": "3.12", "note": "boto3/botocore bundled (pinned), awslambdaric from the runtime"}


def prepare_reference_task() -> None:
    """The reference's task root for the emulator runs: app.py and the registry, like /var/task."""
    shutil.rmtree(REFERENCE_TASK, ignore_errors=True)
    REFERENCE_TASK.mkdir(parents=True)
    shutil.copy(BENCH / "reference" / "app.py", REFERENCE_TASK / "app.py")
    shutil.copy(ROOT / "shared" / "models.toml", REFERENCE_TASK / "models.toml")


def packages_only(build: bool = True) -> int:
    """Builds the zips alone (or, with `build` false, takes the sizes the last such build saved)
    and merges their sizes into the last results, re-rendering results.md, so the sizes can be
    refreshed without measuring again."""
    STATE.mkdir(exist_ok=True)
    if build:
        ensure_venv(REFERENCE_VENV, BENCH / "reference" / "requirements.txt")
        packages = {"packages": build_packages(), "reference_package": reference_package()}
        (STATE / "packages.json").write_text(json.dumps(packages, indent=2))
    else:
        packages = json.loads((STATE / "packages.json").read_text())
    results_path = RESULTS / "results.json"
    if not results_path.exists():
        say(f"no {results_path.relative_to(ROOT)} yet: sizes kept in .bench/packages.json")
        return 0
    results = json.loads(results_path.read_text())
    results.update(packages)
    results_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    text = markdown(results)
    (RESULTS / "results.md").write_text(text)
    print(text, flush=True)
    return 0


def outer(args: argparse.Namespace) -> int:
    if args.packages_only or args.merge_packages:
        return packages_only(build=args.packages_only)
    STATE.mkdir(exist_ok=True)
    ref_python = ensure_venv(REFERENCE_VENV, BENCH / "reference" / "requirements.txt")
    tools_python = ensure_venv(TOOLS_VENV, BENCH / "requirements.txt")
    prepare_reference_task()
    started = time.monotonic()
    if args.reuse_build and PLAN.exists():
        # The copies in .bench/bin of the previous run (for a rerun while target/ is busy).
        binaries = json.loads(PLAN.read_text())["binaries"]
        say("reusing the release binaries of the previous run (--reuse-build)")
    else:
        binaries = build_release()
    build_seconds = time.monotonic() - started
    packages = {"skipped": True} if args.skip_package else build_packages()
    plan = {
        "rie": str(find_rie()),
        "binaries": binaries,
        "release_build_seconds": round(build_seconds, 1),
        "packages": packages,
        "reference_package": {"skipped": True} if args.skip_package else reference_package(),
        "reference_python": str(ref_python),
        "tools_python": str(tools_python),
        "iterations": args.iterations,
        "cold_starts": args.cold_starts,
        "inproc_iterations": args.inproc_iterations,
        "stream_runs": args.stream_runs,
        "only": args.only,
        "stream_watch": args.stream_watch,
        "command": " ".join(["make bench"] + ([f"BENCH_ARGS='{' '.join(sys.argv[1:])}'"] if sys.argv[1:] else [])),
    }
    PLAN.write_text(json.dumps(plan, indent=2))
    argv = [str(VENV / "bin" / "python"), str(ROOT / "infra" / "devstack.py"), "run",
            "--state-dir", str(STATE / "stack"), "--",
            str(VENV / "bin" / "python"), str(Path(__file__).resolve()), "measure", "--plan", str(PLAN)]
    return run(argv).returncode


# ============================================================================================
# Measure (inner process, inside the stack)

# ---- small utilities ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def dist(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "mean": statistics.fmean(values) if values else float("nan"),
            "min": min(values) if values else float("nan"), "max": max(values) if values else float("nan")}


def jwt_hs256(secret: str, claims: dict[str, Any]) -> str:
    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = b64(hmac.new(secret.strip().encode(), header + b"." + payload, hashlib.sha256).digest())
    return (header + b"." + payload + b"." + signature).decode()


class NoDelayConnection(http.client.HTTPConnection):
    """Keep-alive HTTP/1.1 connection with TCP_NODELAY (see LOCAL-STACK.md: Nagle costs ~40 ms)."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Http:
    def __init__(self, base_url: str, timeout: float = 60.0) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.conn = NoDelayConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                self.conn.request(method, self.prefix + path, body, headers or {})
                response = self.conn.getresponse()
                return response.status, response.read()
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = NoDelayConnection(self.host, self.port, timeout=self.timeout)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


def url_event(method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> bytes:
    """A Lambda function URL event (HTTP API v2 payload)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    event: dict[str, Any] = {
        "version": "2.0", "routeKey": "$default", "rawPath": path, "rawQueryString": "",
        "headers": {"host": "bench.lambda-url.us-east-1.on.aws", "user-agent": "bench", **(headers or {})},
        "requestContext": {
            "accountId": "anonymous", "apiId": "bench", "domainName": "bench.lambda-url.us-east-1.on.aws",
            "domainPrefix": "bench",
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1",
                     "userAgent": "bench"},
            "requestId": str(uuid.uuid4()), "routeKey": "$default", "stage": "$default",
            "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"), "timeEpoch": int(now.timestamp() * 1000),
        },
        "isBase64Encoded": False,
    }
    if body is not None:
        event["body"] = body if isinstance(body, str) else json.dumps(body)
        event["headers"]["content-type"] = "application/json"
    return json.dumps(event).encode()


def response_json(answer: dict[str, Any]) -> Any:
    body = answer.get("body") or ""
    if answer.get("isBase64Encoded"):
        body = base64.b64decode(body).decode()
    try:
        return json.loads(body)
    except ValueError:
        return body


# ---- processes under the Runtime Interface Emulator ----------------------------------------


def _children(pid: int) -> list[int]:
    """Children of `pid`, whichever of its threads forked them (the emulator is a Go program)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return sorted(set(found))


def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Rie:
    """One function under `aws-lambda-rie` as a local process (no Docker), in its own session."""

    def __init__(self, rie: str, name: str, argv: list[str], env: dict[str, str], cwd: Path, logs: Path) -> None:
        self.name = name
        self.port = free_port()
        api_port = free_port()
        self.log_path = logs / f"{name}-{self.port}.log"
        logs.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        command = [rie, "--runtime-interface-emulator-address", f"127.0.0.1:{self.port}",
                   "--runtime-api-address", f"127.0.0.1:{api_port}", *argv]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.http: Http | None = None

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.perf_counter() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name}: the emulator exited ({self.proc.returncode}); see {self.log_path}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.perf_counter() > deadline:
                    raise BenchError(f"{self.name}: the emulator did not listen within {timeout} s") from None
                time.sleep(0.0005)
        self.http = Http(f"http://127.0.0.1:{self.port}", timeout=120)

    def invoke(self, event: bytes) -> tuple[float, dict[str, Any]]:
        assert self.http is not None
        started = time.perf_counter()
        status, body = self.http.request("POST", "/2015-03-31/functions/function/invocations", event,
                                          {"content-type": "application/json"})
        elapsed = (time.perf_counter() - started) * 1000
        if status != 200:
            raise BenchError(f"{self.name}: the emulator answered {status}: {body[:300]!r}")
        separator = b"\x00" * 8
        if separator in body:
            # A RESPONSE_STREAM function: the emulator passes the stream through as it came, the
            # HTTP prelude (status, headers) as JSON, eight NUL bytes, then the body.
            prelude, rest = body.split(separator, 1)
            try:
                answer = {**json.loads(prelude), "body": rest.decode(errors="replace")}
            except ValueError:
                raise BenchError(f"{self.name}: unreadable streaming prelude: {body[:300]!r}") from None
            return elapsed, answer
        try:
            answer = json.loads(body)
        except ValueError:
            raise BenchError(f"{self.name}: not a JSON answer: {body[:300]!r}") from None
        if not isinstance(answer, dict) or "statusCode" not in answer:
            raise BenchError(f"{self.name}: the function failed: {body[:500]!r}")
        return elapsed, answer

    def runtime_pid(self) -> int | None:
        children = _children(self.proc.pid)
        return children[0] if children else None

    def peak_rss_kb(self) -> int | None:
        pid = self.runtime_pid()
        return _status_kb(pid, "VmHWM") if pid else None

    def init_report_ms(self) -> float | None:
        self._log.flush()
        text = self.log_path.read_text(errors="replace")
        match = re.search(r"INIT REPORT\(durationMs: ([0-9.]+)\)", text)
        return float(match.group(1)) if match else None

    def stop(self) -> None:
        if self.http is not None:
            self.http.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        else:
            # The emulator is gone; its runtime child (same process group) may not be.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


@contextlib.contextmanager
def rie_process(ctx: "Context", name: str, target: str, tables: dict[str, str],
                endpoint: str | None = None) -> Iterator[Rie]:
    rie = ctx.spawn(name, target, tables, endpoint)
    try:
        rie.wait_listening()
        yield rie
    finally:
        rie.stop()


# ---- the raw floor: the same DynamoDB and upstream calls, as plain HTTP --------------------


class Dynamo:
    """Raw DynamoDB JSON requests to the emulator (it does not check signatures)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.http = Http(endpoint)
        self.calls = 0

    def call(self, operation: str, payload: dict[str, Any]) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.timezone.utc)
        headers = {
            "content-type": "application/x-amz-json-1.0",
            "x-amz-target": f"DynamoDB_20120810.{operation}",
            "x-amz-date": now.strftime("%Y%m%dT%H%M%SZ"),
            "authorization": f"AWS4-HMAC-SHA256 Credential=local/{now:%Y%m%d}/us-east-1/dynamodb/aws4_request, "
                             "SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=00",
        }
        status, body = self.http.request("POST", "/", json.dumps(payload).encode(), headers)
        self.calls += 1
        answer = json.loads(body or b"{}")
        if status != 200 and "ConditionalCheckFailed" not in str(answer.get("__type", "")):
            raise BenchError(f"floor {operation}: {status} {body[:300]!r}")
        return answer


def delete_conversation(dynamo: Dynamo, table: str, conversation: str) -> None:
    """Removes a finished conversation's items. Not measured: it keeps the table small, because
    the emulator deep-copies the whole table for every item of a TransactWriteItems (to roll
    back), so a growing table would slow every later turn down on both sides."""
    out = dynamo.call("Query", {"TableName": table, "KeyConditionExpression": "pk = :pk",
                                "ExpressionAttributeValues": {":pk": {"S": f"CONV#{conversation}"}},
                                "ProjectionExpression": "pk, sk", "ConsistentRead": True})
    keys = [{"pk": item["pk"], "sk": item["sk"]} for item in out.get("Items", [])]
    for start in range(0, len(keys), 25):
        dynamo.call("BatchWriteItem", {"RequestItems": {table: [{"DeleteRequest": {"Key": k}}
                                                                for k in keys[start:start + 25]]}})


def estimate_tokens(text: str) -> int:
    ascii_chars = sum(1 for c in text if ord(c) < 128)
    return -(-ascii_chars // 4) + (len(text) - ascii_chars)


class Floor:
    """Sends, as raw HTTP from this process, the calls a chat turn makes, with items of the same
    shape in the same tables; its time is the floor a function's latency is compared with."""

    def __init__(self, dynamo: Dynamo, mock: Http, tables: dict[str, str], user: str,
                 concurrent_tail: bool = False) -> None:
        self.dynamo, self.mock, self.tables, self.user = dynamo, mock, tables, user
        self.concurrent_tail = concurrent_tail
        if concurrent_tail:
            # Its own connection (and call counter, added to the main one's below).
            self.side = Floor(Dynamo(dynamo.endpoint), mock, tables, user)
        self.conversation: str | None = None
        self.count = 0
        self.history: list[dict[str, str]] = []
        self.hit_key = hashlib.sha256(f"floor-hit-{user}".encode()).hexdigest()
        self.dynamo.call("PutItem", {"TableName": tables["CACHE_TABLE"], "Item": {
            "pk": {"S": self.hit_key}, "payload": {"S": json.dumps({"content": "x" * 60, "model": "gpt-4o-mini"})},
            "created_at": {"S": "2026-01-01T00:00:00.000Z"}, "expires_at": {"N": str(int(time.time()) + 86_400)}}})

    def query(self) -> None:
        self.dynamo.call("Query", {
            "TableName": self.tables["CONVERSATIONS_TABLE"],
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :msg)",
            "ExpressionAttributeValues": {":pk": {"S": f"CONV#{self.conversation}"}, ":msg": {"S": "MSG#"}},
            "ScanIndexForward": False, "Limit": 20})

    def admit(self, estimate: int) -> None:
        """The admission update; estimate 0 (a cache hit) counts the request only, as ours does."""
        now = int(time.time())
        hour, minute = now - now % 3600, now - now % 60
        if estimate == 0:
            self.dynamo.call("UpdateItem", {
                "TableName": self.tables["RATE_LIMITS_TABLE"], "Key": {"pk": {"S": f"rl#{self.user}#{hour}"}},
                "UpdateExpression": "ADD #c0 :a0 SET #exp = if_not_exists(#exp, :exp)",
                "ConditionExpression": "attribute_not_exists(#c0) OR #c0 <= :m0",
                "ExpressionAttributeNames": {"#c0": "requests", "#exp": "expires_at"},
                "ExpressionAttributeValues": {":a0": {"N": "1"}, ":m0": {"N": "99999999"},
                                              ":exp": {"N": str(hour + 3900)}},
                "ReturnValues": "UPDATED_NEW", "ReturnValuesOnConditionCheckFailure": "ALL_OLD"})
            return
        self.dynamo.call("UpdateItem", {
            "TableName": self.tables["RATE_LIMITS_TABLE"], "Key": {"pk": {"S": f"rl#{self.user}#{hour}"}},
            "UpdateExpression": "ADD #c0 :a0, #c1 :a1 SET #exp = if_not_exists(#exp, :exp)",
            "ConditionExpression": "(attribute_not_exists(#c0) OR #c0 <= :m0) AND "
                                   "(attribute_not_exists(#c1) OR #c1 <= :m1)",
            "ExpressionAttributeNames": {"#c0": "requests", "#c1": f"tokens_{minute}", "#exp": "expires_at"},
            "ExpressionAttributeValues": {":a0": {"N": "1"}, ":m0": {"N": "99999999"}, ":a1": {"N": str(estimate)},
                                          ":m1": {"N": "99999999999"}, ":exp": {"N": str(hour + 3900)}},
            "ReturnValues": "UPDATED_NEW", "ReturnValuesOnConditionCheckFailure": "ALL_OLD"})

    def settle(self, delta: int) -> None:
        now = int(time.time())
        hour, minute = now - now % 3600, now - now % 60
        self.dynamo.call("UpdateItem", {
            "TableName": self.tables["RATE_LIMITS_TABLE"], "Key": {"pk": {"S": f"rl#{self.user}#{hour}"}},
            "UpdateExpression": "ADD #c :delta SET #exp = if_not_exists(#exp, :exp)",
            "ExpressionAttributeNames": {"#c": f"tokens_{minute}", "#exp": "expires_at"},
            "ExpressionAttributeValues": {":delta": {"N": str(delta)}, ":exp": {"N": str(hour + 3900)}}})

    def cache_get(self, hit: bool) -> None:
        key = self.hit_key if hit else hashlib.sha256(os.urandom(16)).hexdigest()
        self.dynamo.call("GetItem", {"TableName": self.tables["CACHE_TABLE"], "Key": {"pk": {"S": key}}})

    def cache_item(self, content: str) -> dict[str, Any]:
        return {"TableName": self.tables["CACHE_TABLE"], "Item": {
            "pk": {"S": hashlib.sha256(os.urandom(16)).hexdigest()},
            "payload": {"S": json.dumps({"content": content, "model": "gpt-4o-mini",
                                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                                         "finish_reason": "stop"})},
            "created_at": {"S": "2026-01-01T00:00:00.000Z"}, "expires_at": {"N": str(int(time.time()) + 3600)}}}

    def cache_put(self, content: str) -> None:
        self.dynamo.call("PutItem", self.cache_item(content))

    def upstream(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": "gpt-4o-mini", "messages": messages, "temperature": 0.7,
                           "max_completion_tokens": 1000}).encode()
        status, raw = self.mock.request("POST", "/chat/completions", body,
                                        {"content-type": "application/json", "authorization": "Bearer mock-key"})
        if status != 200:
            raise BenchError(f"floor upstream: {status} {raw[:200]!r}")
        return json.loads(raw)["choices"][0]["message"]["content"]

    def transact(self, user_message: str, answer: str, cache_fill: bool = False) -> None:
        """The turn's transaction; with `cache_fill`, carrying the cache entry's Put as ours does."""
        table = self.tables["CONVERSATIONS_TABLE"]
        conversation = self.conversation or str(uuid.uuid4())
        pk = {"S": f"CONV#{conversation}"}
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        exp = {"N": str(int(time.time()) + 30 * 86_400)}
        if self.conversation is None:
            meta = {"Put": {"TableName": table, "ConditionExpression": "attribute_not_exists(pk)", "Item": {
                "pk": pk, "sk": {"S": "META"}, "owner": {"S": self.user}, "title": {"S": user_message[:80]},
                "model": {"S": "gpt-4o-mini"}, "message_count": {"N": "2"}, "total_tokens": {"N": "30"},
                "total_cost": {"N": "0.0000100000"}, "created_at": {"S": now}, "updated_at": {"S": now},
                "expires_at": exp}}}
        else:
            meta = {"Update": {
                "TableName": table, "Key": {"pk": pk, "sk": {"S": "META"}},
                "UpdateExpression": "SET message_count = :next, updated_at = :now, model = :model, "
                                    "expires_at = :exp ADD total_tokens :tokens, total_cost :cost",
                "ConditionExpression": "message_count = :expected AND #owner = :owner",
                "ExpressionAttributeNames": {"#owner": "owner"},
                "ExpressionAttributeValues": {
                    ":next": {"N": str(self.count + 2)}, ":expected": {"N": str(self.count)},
                    ":owner": {"S": self.user}, ":now": {"S": now}, ":model": {"S": "gpt-4o-mini"}, ":exp": exp,
                    ":tokens": {"N": "30"}, ":cost": {"N": "0.0000100000"}}}}

        def message(seq: int, role: str, content: str) -> dict[str, Any]:
            return {"Put": {"TableName": table, "ConditionExpression": "attribute_not_exists(pk)", "Item": {
                "pk": pk, "sk": {"S": f"MSG#{seq:010d}"}, "owner": {"S": self.user}, "role": {"S": role},
                "content": {"S": content}, "tokens": {"N": "15"}, "created_at": {"S": now}, "expires_at": exp}}}

        items = [message(self.count, "user", user_message), message(self.count + 1, "assistant", answer), meta]
        if cache_fill:
            items.append({"Put": self.cache_item(answer)})
        self.dynamo.call("TransactWriteItems", {"TransactItems": items})
        self.conversation = conversation
        self.count += 2

    def turn(self, message: str, *, history: bool, cache: str | None, settle: bool, new: bool) -> float:
        """One chat turn's calls in the order the implementation makes them; returns ms.

        `cache`: None (no lookup), "miss" (lookup, then fill) or "hit" (lookup, no model call).
        With `concurrent_tail` (ours): the cache is looked up before admission, a hit is admitted
        for its request only and settles nothing, and after the model the transaction (carrying
        the cache fill) and the settlement run at once. Without it (the reference): admission,
        then the calls one after the other."""
        if new:
            self.conversation, self.count, self.history = None, 0, []
        started = time.perf_counter()
        if history and self.conversation is not None:
            self.query()
        messages = [*self.history, {"role": "user", "content": message}]
        estimate = sum(estimate_tokens(m["content"]) + 4 for m in messages) + 3 + 1000
        if not self.concurrent_tail:
            self.admit(estimate)
            if cache is not None:
                self.cache_get(hit=cache == "hit")
            answer = "x" * 60 if cache == "hit" else self.upstream(messages)
            self.transact(message, answer)
            if settle and cache != "hit":
                self.settle(30 - estimate)
            if cache == "miss":
                self.cache_put(answer)
        else:
            if cache is not None:
                self.cache_get(hit=cache == "hit")
            if cache == "hit":
                self.admit(0)
                answer = "x" * 60
                self.transact(message, answer)
            else:
                self.admit(estimate)
                answer = self.upstream(messages)
                tail = [threading.Thread(target=self.transact, args=(message, answer, cache == "miss"))]
                if settle:
                    tail.append(threading.Thread(target=self.side.settle, args=(30 - estimate,)))
                for thread in tail:
                    thread.start()
                for thread in tail:
                    thread.join()
        elapsed = (time.perf_counter() - started) * 1000
        self.history = [*messages, {"role": "assistant", "content": answer}][-20:]
        return elapsed


# ---- a counting proxy in front of the emulator ---------------------------------------------


class CountingProxy:
    """Forwards DynamoDB requests to the emulator and records each operation (X-Amz-Target)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.operations: list[str] = []
        lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                operation = (self.headers.get("x-amz-target") or "?").rsplit(".", 1)[-1]
                with lock:
                    proxy.operations.append(operation)
                conn = http.client.HTTPConnection(*target, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request("POST", self.path, body, headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                        self.send_header(key, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def take(self) -> list[str]:
        operations, self.operations = self.operations, []
        return operations

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- the measurement context ---------------------------------------------------------------


def read_env_file(path: str) -> dict[str, str]:
    values = {}
    for line in Path(path).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values[key] = value
    return values


class Context:
    def __init__(self, plan: dict[str, Any], logs: Path) -> None:
        self.plan = plan
        self.logs = logs
        self.rie = plan["rie"]
        self.stack_env = read_env_file(os.environ["GW_STACK_ENV_FILE"])
        self.endpoint = self.stack_env["AWS_ENDPOINT_URL_DYNAMODB"]
        self.mock_url = os.environ["GW_MOCK_LLM_URL"]
        self.functions_url = os.environ["GW_FUNCTIONS_URL"]
        self.secret = self.stack_env["JWT_SECRET"]
        self.table_rounds = 0
        sys.path.insert(0, str(ROOT / "infra"))
        import tables  # noqa: PLC0415 (infra/tables.py, on .venv's Python)

        self._tables = tables
        self._template = tables.load_template(ROOT / "template.yaml")
        self._client = tables.dynamodb_client(self.endpoint)

    def fresh_tables(self) -> dict[str, str]:
        """New, empty tables for one round: the emulator slows down as a table fills up."""
        self.table_rounds += 1
        prefix = f"bench{self.table_rounds}"
        self._tables.create_tables(self._client, self._template, prefix, log=lambda m: None)
        return self._tables.table_env(self._template, prefix)

    def token(self, user: str) -> str:
        now = int(time.time())
        return jwt_hs256(self.secret, {"sub": user, "tier": "pro", "iat": now, "exp": now + 6 * 3600})

    def function_env(self, tables: dict[str, str], endpoint: str | None) -> dict[str, str]:
        keep = ("PATH", "HOME", "LANG", "TZ")
        env = {k: v for k, v in os.environ.items() if k in keep}
        env.update(self.stack_env)
        env.update(tables)
        env.update(BENCH_QUOTAS)
        env["LLM_TIMEOUT_MS"] = "10000"
        env["AWS_ENDPOINT_URL_DYNAMODB"] = endpoint or self.endpoint
        env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] = "1769"
        return env

    def spawn(self, name: str, target: str, tables: dict[str, str], endpoint: str | None = None) -> Rie:
        env = self.function_env(tables, endpoint)
        if target == "reference":
            env["PYTHONDONTWRITEBYTECODE"] = "1"  # /var/task is read-only on Lambda
            argv = [self.plan["reference_python"], "-m", "awslambdaric", "app.handler"]
            return Rie(self.rie, name, argv, env, REFERENCE_TASK, self.logs)
        binary = self.plan["binaries"].get(target)
        if not binary:
            raise BenchError(f"no release binary for {target}")
        return Rie(self.rie, name, [binary], env, STATE, self.logs)

    def targets(self) -> list[str]:
        return [f for f in FUNCTIONS if self.plan["binaries"].get(f)] + ["reference"]


# ---- the measurements ----------------------------------------------------------------------


def cold_starts(ctx: Context, count: int) -> dict[str, Any]:
    """Spawn-to-first-completed-invocation (GET /health) under the emulator, `count` times each."""
    results: dict[str, Any] = {}
    tables = ctx.fresh_tables()
    event = url_event("GET", "/health")
    for target in ctx.targets():
        wall, init, listening = [], [], []
        for i in range(count):
            rie = ctx.spawn(f"cold-{target}", target, tables)
            try:
                rie.wait_listening()
                listening.append((time.perf_counter() - rie.started) * 1000)
                elapsed, answer = rie.invoke(event)
                total = (time.perf_counter() - rie.started) * 1000
                if answer.get("statusCode") != 200:
                    raise BenchError(f"cold start of {target}: /health answered {answer}")
                wall.append(total)
                time.sleep(0.05)  # lets the emulator write its INIT REPORT line
                report = rie.init_report_ms()
                if report is not None:
                    init.append(report)
            finally:
                rie.stop()
            if i == 0:
                say(f"cold start {target}: first {wall[0]:.1f} ms")
        results[target] = {"spawn_to_first_answer_ms": dist(wall), "init_report_ms": dist(init) if init else None,
                           "emulator_listening_ms": dist(listening),
                           "samples_ms": [round(w, 2) for w in wall]}
        say(f"cold start {target}: median {percentile(wall, 50):.1f} ms over {count}")
    return results


def init_roots(ctx: Context, count: int = 21) -> dict[str, Any]:
    """Diagnostic behind the cold-start reading: the chat binary's init alone (process start to
    its first runtime API call, which fails at once on a closed port), median of `count`, with
    its default roots (Mozilla's, compiled in: no file read), with a one-certificate store
    (SSL_CERT_FILE / SSL_CERT_DIR, the floor) and with Debian's system store named the same way
    (bundle + /etc/ssl/certs, what a deployment that overrides the roots pays, once). Default
    minus one-root is what the roots still cost at cold start."""
    binary = ctx.plan["binaries"].get("chat")
    if not binary:
        return {"pending": "the chat function did not build"}
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if not bundle.exists():
        return {"skipped": "no Debian CA bundle on this machine"}
    one = STATE / "one-root.pem"
    text = bundle.read_text()
    one.write_text(text[: text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")] + "\n")
    empty = STATE / "no-roots"
    empty.mkdir(exist_ok=True)
    env = ctx.function_env(ctx.fresh_tables(), None)
    env.update({"AWS_LAMBDA_FUNCTION_NAME": "chat", "AWS_LAMBDA_FUNCTION_VERSION": "1",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1769", "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{free_port()}",
                "RUST_LOG": "off"})
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        env.pop(name, None)

    def timed(extra: dict[str, str]) -> list[float]:
        # A blocking wait, with a watchdog for the hang this never is: `subprocess.run(...,
        # timeout=)` polls with doubling sleeps (0.5, 1, 2, 4, 8, 16 ms), which rounded every
        # sample up to about 8, 16 or 32 ms.
        out = []
        for _ in range(count):
            started = time.perf_counter()
            proc = subprocess.Popen([binary], env={**env, **extra}, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            watchdog = threading.Timer(30, proc.kill)
            watchdog.start()
            proc.wait()
            out.append((time.perf_counter() - started) * 1000)
            watchdog.cancel()
        return out

    default = timed({})
    single = timed({"SSL_CERT_FILE": str(one), "SSL_CERT_DIR": str(empty)})
    system = timed({"SSL_CERT_FILE": str(bundle), "SSL_CERT_DIR": str(bundle.parent)})
    return {"default_roots_ms": dist(default), "one_root_ms": dist(single), "system_store_ms": dist(system),
            "roots_cost_ms": percentile(default, 50) - percentile(single, 50),
            "system_store_cost_ms": percentile(system, 50) - percentile(single, 50)}


def chat_body(message: str, conversation: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"message": message}
    if conversation:
        body["conversation_id"] = conversation
    return body


class ChatDriver:
    """Builds the chat turns of a scenario and follows its conversations."""

    def __init__(self, kind: str, token: str) -> None:
        self.kind, self.token = kind, token
        self.conversation: str | None = None
        self.turns = 0

    def next(self, index: int) -> tuple[bytes, bool]:
        """The event of turn `index`, and whether it starts a new conversation."""
        directive = f"[mock latency_ms={MOCK_LATENCY_MS}]"
        headers = {"authorization": f"Bearer {self.token}"}
        if self.kind == "chat_hit":
            return url_event("POST", "/chat", chat_body(f"What is the capital of France ({RUN_NONCE})? {directive}", None),
                             headers), True
        if self.turns >= TURNS_PER_CONVERSATION:
            self.conversation, self.turns = None, 0
        if self.kind == "chat_nocache":
            headers["cache-control"] = "no-cache"
        message = f"Question {index} of {self.kind} ({RUN_NONCE}): why is the sky blue? {directive}"
        return url_event("POST", "/chat", chat_body(message, self.conversation), headers), self.conversation is None

    def answered(self, answer: dict[str, Any], expect_cached: bool) -> str | None:
        """Checks the answer; returns the id of a conversation that will not be continued."""
        if answer.get("statusCode") != 200:
            raise BenchError(f"{self.kind}: {answer.get('statusCode')} {str(answer.get('body'))[:300]}")
        body = response_json(answer)
        if not isinstance(body, dict) or bool(body.get("cached")) != expect_cached:
            raise BenchError(f"{self.kind}: expected cached={expect_cached}, got {body}")
        if self.kind == "chat_hit":
            return body["conversation_id"]
        self.conversation = body["conversation_id"]
        self.turns += 1
        return self.conversation if self.turns >= TURNS_PER_CONVERSATION else None


SCENARIOS = {
    # name: (target, floor shape)
    # The floor makes the calls the way the implementation does: ours runs the transaction
    # (carrying the cache fill) and the settlement concurrently, the reference one call after
    # the other.
    "chat_miss": ("chat", {"history": True, "cache": "miss", "settle": True}),
    "chat_hit": ("chat", {"history": False, "cache": "hit", "settle": True}),
    "chat_nocache": ("chat", {"history": True, "cache": None, "settle": True}),
    "reference": ("reference", {"history": True, "cache": None, "settle": False}),
}


def warm(ctx: Context, scenario: str, iterations: int, warmup: int = 30) -> dict[str, Any]:
    """`iterations` sequential invocations, each followed by its floor; overhead = latency - floor."""
    target, shape = SCENARIOS[scenario]
    tables = ctx.fresh_tables()
    user = f"bench-{scenario}"
    driver = ChatDriver(scenario, ctx.token(user))
    floor = Floor(Dynamo(ctx.endpoint), Http(ctx.mock_url + "/v1"), tables, f"floor-{scenario}",
                  concurrent_tail=target != "reference")
    janitor = Dynamo(ctx.endpoint)
    conversations_table = tables["CONVERSATIONS_TABLE"]
    latency, floors, overhead = [], [], []
    errors: list[str] = []
    sides = [side for side in (getattr(floor, "side", None), getattr(floor, "side2", None)) if side]
    floor_calls_before = floor.dynamo.calls + sum(side.dynamo.calls for side in sides)
    with rie_process(ctx, f"warm-{scenario}", target, tables) as rie:
        # The emulator's own round trip with the function doing next to nothing (GET /health):
        # part of every measured latency, never of the floor.
        health_event = url_event("GET", "/health")
        noop = [rie.invoke(health_event)[0] for _ in range(220)][20:]
        for index in range(warmup + iterations):
            event, new = driver.next(index)
            elapsed, answer = rie.invoke(event)
            if answer.get("statusCode") in (502, 503, 504) and len(errors) < max(iterations // 100, 1):
                # A dependency that stalled past the SDK's timeouts (the emulator, on a busy
                # machine): counted and reported, not measured; the conversation starts over.
                errors.append(f"{index}: {answer.get('statusCode')} {str(answer.get('body'))[:160]}")
                driver.conversation, driver.turns = None, 0
                say(f"warm {scenario}: invocation {index} answered {answer.get('statusCode')}, not measured")
                continue
            finished = driver.answered(answer, expect_cached=scenario == "chat_hit" and index > 0)
            message = f"Floor question {index}: why is the sky blue? [mock latency_ms={MOCK_LATENCY_MS}]"
            floor_ms = floor.turn(message, new=new, **shape)
            if finished:
                delete_conversation(janitor, conversations_table, finished)
            if floor.conversation and (scenario == "chat_hit" or floor.count >= 2 * TURNS_PER_CONVERSATION):
                delete_conversation(janitor, conversations_table, floor.conversation)
            if index >= warmup:
                latency.append(elapsed)
                floors.append(floor_ms)
                overhead.append(elapsed - floor_ms)
            if index and index % 250 == 0:
                say(f"warm {scenario}: {index}/{warmup + iterations}")
        rss = rie.peak_rss_kb()
    result = {
        "target": target, "iterations": iterations, "mock_latency_ms": MOCK_LATENCY_MS,
        "latency_ms": dist(latency), "floor_ms": dist(floors), "overhead_ms": dist(overhead),
        "latency_minus_mock_ms": dist([v - MOCK_LATENCY_MS for v in latency]),
        "health_invoke_ms": dist(noop),
        "floor_dynamodb_calls_per_turn": round(
            (floor.dynamo.calls + sum(side.dynamo.calls for side in sides) - floor_calls_before)
            / (warmup + iterations), 2),
        "floor_tail": "concurrent" if floor.concurrent_tail else "sequential",
        "dependency_errors": errors,
        "peak_rss_kb": rss,
        "overhead_samples_ms": [round(v, 3) for v in overhead],
    }
    say(f"warm {scenario}: overhead p50 {result['overhead_ms']['p50']:.2f} ms, p99 {result['overhead_ms']['p99']:.2f} ms, "
        f"RSS {rss} kB")
    return result


def rss_run(ctx: Context, target: str, iterations: int) -> dict[str, Any]:
    """Peak RSS of a function's process after `iterations` invocations of its main route."""
    tables = ctx.fresh_tables()
    headers = {"authorization": f"Bearer {ctx.token(f'bench-rss-{target}')}"}
    texts = ["The new release is fast, the documentation is excellent and support answered within an hour. "
             "Some users still report that the installer fails on older machines, which is disappointing.",
             "新版本速度很快，文档也非常完善。不过有些用户反映安装程序在旧电脑上无法运行，这让人失望。"]
    janitor = Dynamo(ctx.endpoint)
    errors = 0
    with rie_process(ctx, f"rss-{target}", target, tables) as rie:
        for index in range(iterations):
            if target == "stream":
                event = url_event("POST", "/chat/stream", {"message": f"Stream {index}: tell me a story"}, headers)
            elif target == "analyze":
                content = f"{texts[index % 2]} ({index})"
                event = url_event("POST", "/analyze", {"content": content, "mode": "local"}, headers)
            elif target == "batch":
                items = [{"prompt": f"Item {index}.{n}: summarise this"} for n in range(5)]
                event = url_event("POST", "/batch", {"items": items, "max_concurrency": 5}, headers)
            else:
                raise BenchError(f"no RSS workload for {target}")
            _, answer = rie.invoke(event)
            if answer.get("statusCode") in (502, 503, 504) and errors < max(iterations // 100, 1):
                errors += 1  # a stalled dependency (see `warm`); the process was still exercised
                continue
            if answer.get("statusCode") != 200:
                raise BenchError(f"rss {target}: {answer.get('statusCode')} {str(answer.get('body'))[:300]}")
            if target == "stream":
                started = re.search(r'"conversation_id":"([0-9a-f-]{36})"', str(answer.get("body")))
                if started:
                    delete_conversation(janitor, tables["CONVERSATIONS_TABLE"], started.group(1))
        rss = rie.peak_rss_kb()
    say(f"peak RSS {target}: {rss} kB after {iterations} invocations")
    return {"peak_rss_kb": rss, "iterations": iterations, "dependency_errors": errors}


def round_trips(ctx: Context) -> dict[str, Any]:
    """DynamoDB operations per chat turn, counted by a proxy in front of the emulator."""
    tables = ctx.fresh_tables()
    proxy = CountingProxy(ctx.endpoint)
    results: dict[str, Any] = {}
    directive = f"[mock latency_ms={MOCK_LATENCY_MS}]"
    try:
        for target in ("chat", "reference"):
            if target == "chat" and not ctx.plan["binaries"].get("chat"):
                continue
            token = ctx.token(f"bench-rt-{target}")
            headers = {"authorization": f"Bearer {token}"}
            with rie_process(ctx, f"rt-{target}", target, tables, endpoint=proxy.url) as rie:
                rie.invoke(url_event("GET", "/health"))
                proxy.take()

                def turn(label: str, body: dict[str, Any], extra: dict[str, str] | None = None) -> Any:
                    _, answer = rie.invoke(url_event("POST", "/chat", body, {**headers, **(extra or {})}))
                    if answer.get("statusCode") != 200:
                        raise BenchError(f"round trips {target} {label}: {answer}")
                    operations = proxy.take()
                    results.setdefault(target, {})[label] = {"count": len(operations), "operations": operations}
                    return response_json(answer)

                first = turn("new conversation, cache miss", {"message": f"Round trip one {directive}"})
                conversation = first["conversation_id"]
                turn("continued, cache miss", {"message": f"Round trip two {directive}", "conversation_id": conversation})
                if target == "chat":
                    turn("continued, cache bypassed (no-cache)",
                         {"message": f"Round trip three {directive}", "conversation_id": conversation},
                         {"cache-control": "no-cache"})
                    turn("prime", {"message": f"Cached question {directive}"})
                    hit = turn("new conversation, cache hit", {"message": f"Cached question {directive}"})
                    if not hit.get("cached"):
                        raise BenchError(f"round trips: expected a cache hit, got {hit}")
                    results["chat"].pop("prime", None)
    finally:
        proxy.close()
    for target, turns in results.items():
        for label, counted in turns.items():
            say(f"round trips {target} / {label}: {counted['count']} ({', '.join(counted['operations'])})")
    return results


def start_release_watch(ctx: Context) -> tuple[list[subprocess.Popen[bytes]], str]:
    """`cargo lambda watch --only-lambda-apis` (its function-URL front end and runtime API, no
    build) serving the release `stream` binary of this run, started here with the stack's env."""
    port = free_port()
    watch_log = open(ctx.logs / "watch-release.log", "wb")
    argv = [str(VENV / "bin" / "cargo-lambda"), "lambda", "watch", "--only-lambda-apis",
            "--invoke-address", "127.0.0.1", "--invoke-port", str(port)]
    env = {k: v for k, v in os.environ.items() if k not in ctx.stack_env}
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    watch = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=watch_log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if watch.poll() is not None or time.monotonic() > deadline:
                stop_group(watch)
                raise BenchError(f"cargo lambda watch --only-lambda-apis did not start; see {ctx.logs}") from None
            time.sleep(0.1)
    function_env = ctx.function_env(read_env_file(os.environ["GW_STACK_ENV_FILE"]), None)
    # The stack's quotas and tables, as the stack's own watch would give the function.
    function_env.update({k: v for k, v in ctx.stack_env.items() if k.endswith("_TABLE")})
    # What watch prints for --only-lambda-apis; it routes /lambda-url/_/ to this function.
    function_env.update({"AWS_LAMBDA_FUNCTION_VERSION": "1", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1769",
                         "AWS_LAMBDA_RUNTIME_API": f"http://127.0.0.1:{port}/.rt", "AWS_LAMBDA_FUNCTION_NAME": "_"})
    function = subprocess.Popen([ctx.plan["binaries"]["stream"]], cwd=STATE, env=function_env,
                                stdin=subprocess.DEVNULL, stdout=open(ctx.logs / "stream-release.log", "wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
    return [function, watch], f"http://127.0.0.1:{port}/lambda-url/_"


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def read_sse(url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    """POSTs and reads an SSE response as it arrives, timestamping every event (ms from send)."""
    parts = urlsplit(url)
    conn = NoDelayConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=60)
    started = time.perf_counter()
    conn.request("POST", parts.path, json.dumps(body).encode(), {"content-type": "application/json", **headers})
    response = conn.getresponse()
    headers_at = (time.perf_counter() - started) * 1000
    if response.status != 200:
        raise BenchError(f"stream answered {response.status}: {response.read()[:300]!r}")
    events: list[tuple[float, str]] = []
    first_byte = None
    buffer = b""
    while True:
        chunk = response.read1(65536)
        if not chunk:
            break
        at = (time.perf_counter() - started) * 1000
        if first_byte is None:
            first_byte = at
        buffer += chunk
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            for line in raw.decode(errors="replace").splitlines():
                if line.startswith("data:"):
                    events.append((at, line[5:].strip()))
    conn.close()
    return {"headers_ms": headers_at, "first_byte_ms": first_byte, "events": events,
            "content_type": response.getheader("content-type")}


def raw_stream_first_token(mock: str, message: str) -> tuple[float, float]:
    """The mock alone: ms to its first content chunk, and to its last byte."""
    body = {"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": message}], "temperature": 0.7, "max_completion_tokens": 1000}
    result = read_sse(mock + "/v1/chat/completions", body, {"authorization": "Bearer mock-key"})
    first = next((at for at, data in result["events"] if '"content"' in data and data != "[DONE]"), float("nan"))
    last = result["events"][-1][0] if result["events"] else float("nan")
    return first, last


def streaming(ctx: Context, runs: int) -> dict[str, Any]:
    """TTFB of /chat/stream through `cargo lambda watch` over the mock's own TTFT, and whether
    tokens arrive spread out as the mock emits them (not buffered)."""
    mode = ctx.plan.get("stream_watch", "release")
    procs: list[subprocess.Popen[bytes]] = []
    base = ctx.functions_url + "/stream"
    if mode == "release":
        if not ctx.plan["binaries"].get("stream"):
            return {"pending": "the stream function did not build"}
        procs, base = start_release_watch(ctx)
    try:
        deadline = time.monotonic() + 60
        while True:
            if any(p.poll() is not None for p in procs):
                raise BenchError(f"the stream function or watch exited; see {ctx.logs}")
            try:
                status, _ = Http(base, timeout=5).request("GET", "/health")
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{base}/health did not answer")
            time.sleep(0.2)
        tables = ctx.fresh_tables()  # only the floor uses them; watch uses the stack's tables
        floor = Floor(Dynamo(ctx.endpoint), Http(ctx.mock_url + "/v1"), tables, "floor-stream")
        token = ctx.token("bench-stream")
        directive = f"[mock ttft_ms={STREAM_TTFT_MS} token_ms={STREAM_TOKEN_MS} tokens={STREAM_TOKENS}]"
        samples = []
        for index in range(runs + 3):
            message = f"Stream {index}: tell me a story {directive}"
            result = read_sse(base + "/chat/stream", {"message": message},
                              {"authorization": f"Bearer {token}"})
            deltas = [at for at, data in result["events"] if '"delta"' in data]
            # Floor: what the function does before its first token (cache lookup, admission),
            # then the mock's own time to its first token for the same request.
            started = time.perf_counter()
            floor.cache_get(hit=False)
            floor.admit(1000)
            pre = (time.perf_counter() - started) * 1000
            mock_first, mock_last = raw_stream_first_token(ctx.mock_url, message)
            if index < 3 or not deltas:
                if not deltas:
                    raise BenchError(f"stream run {index}: no delta events: {result['events'][:5]}")
                continue
            samples.append({
                "first_byte_ms": result["first_byte_ms"], "first_delta_ms": deltas[0], "last_delta_ms": deltas[-1],
                "deltas": len(deltas), "floor_ms": pre + mock_first, "mock_first_token_ms": mock_first,
                "mock_last_byte_ms": mock_last, "delta_times_ms": [round(d, 2) for d in deltas],
                "content_type": result["content_type"],
            })
    finally:
        for proc in procs:
            stop_group(proc)
    overhead = [s["first_delta_ms"] - s["floor_ms"] for s in samples]
    spread = [s["last_delta_ms"] - s["first_delta_ms"] for s in samples]
    gaps = [b - a for s in samples for a, b in zip(s["delta_times_ms"], s["delta_times_ms"][1:])]
    expected_spread = (STREAM_TOKENS - 1) * STREAM_TOKEN_MS
    # Buffered output would deliver every delta at once (spread ~0) after the mock finished.
    unbuffered = all(sp >= 0.7 * expected_spread for sp in spread)
    return {
        "watch": mode, "runs": len(samples), "mock": {"ttft_ms": STREAM_TTFT_MS, "token_ms": STREAM_TOKEN_MS,
                                                      "tokens": STREAM_TOKENS},
        "ttfb_overhead_ms": dist(overhead), "first_delta_ms": dist([s["first_delta_ms"] for s in samples]),
        "first_byte_ms": dist([s["first_byte_ms"] for s in samples]),
        "floor_ms": dist([s["floor_ms"] for s in samples]),
        "delta_spread_ms": dist(spread), "expected_spread_ms": expected_spread,
        "inter_delta_gap_ms": dist(gaps), "unbuffered": unbuffered,
        "example": samples[0] if samples else None,
    }


def batch_fanout(ctx: Context, repeats: int = 3) -> dict[str, Any]:
    """`POST /batch` with 100 items at concurrency 10, each item held `BATCH_ITEM_MS` by the mock:
    ideal = ceil(100 / 10) waves x item latency; efficiency = ideal / measured."""
    if not ctx.plan["binaries"].get("batch"):
        return {"pending": "the batch function did not build"}
    tables = ctx.fresh_tables()
    headers = {"authorization": f"Bearer {ctx.token('bench-batch')}"}
    ideal = -(-BATCH_ITEMS // BATCH_CONCURRENCY) * BATCH_ITEM_MS
    measured = []
    with rie_process(ctx, "batch-fanout", "batch", tables) as rie:
        for attempt in range(repeats + 1):
            items = [{"id": f"i{n}", "prompt": f"Item {attempt}.{n} [mock latency_ms={BATCH_ITEM_MS}]"}
                     for n in range(BATCH_ITEMS)]
            event = url_event("POST", "/batch", {"items": items, "max_concurrency": BATCH_CONCURRENCY}, headers)
            elapsed, answer = rie.invoke(event)
            if answer.get("statusCode") != 200:
                if answer.get("statusCode") == 404:
                    return {"pending": "POST /batch is not routed yet"}
                raise BenchError(f"batch: {answer.get('statusCode')} {str(answer.get('body'))[:300]}")
            body = response_json(answer)
            if body.get("successful") != BATCH_ITEMS:
                raise BenchError(f"batch: {body.get('successful')} of {BATCH_ITEMS} items succeeded: "
                                 f"{str(body)[:300]}")
            if attempt:  # the first batch warms the connection pool
                measured.append(elapsed)
    return {"items": BATCH_ITEMS, "concurrency": BATCH_CONCURRENCY, "item_latency_ms": BATCH_ITEM_MS,
            "ideal_ms": ideal, "measured_ms": dist(measured),
            "efficiency": ideal / percentile(measured, 50), "runs_ms": [round(m, 1) for m in measured]}


def in_process(ctx: Context) -> dict[str, Any]:
    binary = ctx.plan["binaries"].get("inproc")
    if not binary:
        return {"pending": "the in-process loop did not build"}
    iterations = ctx.plan["inproc_iterations"]
    result = subprocess.run([binary, "--iterations", str(iterations), "--warmup", str(max(iterations // 20, 10))],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise BenchError(f"inproc failed: {result.stderr[-2000:]}")
    # The handlers print their EMF metric lines to stdout too (as on Lambda); the summary is the
    # one document with "scenarios".
    for line in reversed(result.stdout.splitlines()):
        with contextlib.suppress(ValueError):
            document = json.loads(line)
            if isinstance(document, dict) and "scenarios" in document:
                return document
    raise BenchError("inproc printed no summary")


def versions(plan: dict[str, Any]) -> dict[str, str]:
    def out(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    ref_pip = subprocess.run([str(Path(plan["reference_python"]).parent / "pip"), "freeze"], capture_output=True,
                             text=True).stdout
    pins = dict(line.split("==", 1) for line in ref_pip.splitlines() if "==" in line)
    lock = (ROOT / "Cargo.lock").read_text()

    def crate(name: str) -> str:
        match = re.search(rf'name = "{re.escape(name)}"\nversion = "([^"]+)"', lock)
        return match.group(1) if match else "?"

    return {
        "rustc": out(["rustc", "--version"]), "cargo-lambda": out([str(VENV / "bin" / "cargo-lambda"), "lambda", "--version"]),
        "lambda_http": crate("lambda_http"), "lambda_runtime": crate("lambda_runtime"),
        "aws-sdk-dynamodb": crate("aws-sdk-dynamodb"), "axum": crate("axum"), "tokio": crate("tokio"),
        "python (reference)": out([plan["reference_python"], "--version"]),
        **{k: pins.get(k, "?") for k in ("fastapi", "pydantic", "mangum", "boto3", "openai", "awslambdaric")},
        "aws-sam-cli (RIE)": out([str(VENV / "bin" / "sam"), "--version"]),
        "moto": out([str(VENV / "bin" / "python"), "-c", "import moto; print(moto.__version__)"]),
    }


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "os": platform.platform(), "loadavg_start": os.getloadavg()}


def measure(args: argparse.Namespace) -> int:
    plan = json.loads(Path(args.plan).read_text())
    logs = STATE / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    ctx = Context(plan, logs)
    only = set(plan["only"].split(",")) if plan.get("only") else None

    def wanted(section: str) -> bool:
        return only is None or section in only

    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": plan["command"], "machine": machine(), "versions": versions(plan),
        "release_build_seconds": plan["release_build_seconds"],
        "packages": plan["packages"], "reference_package": plan["reference_package"],
        "pending": {f: "did not build" for f in FUNCTIONS if not plan["binaries"].get(f)},
    }
    # What one raw call of the floor costs this process beyond the server's work: GET /health of
    # the mock LLM (a constant answer), so the floor's client-side share can be stated.
    mock = Http(ctx.mock_url)
    probe = []
    for _ in range(300):
        t0 = time.perf_counter()
        mock.request("GET", "/health")
        probe.append((time.perf_counter() - t0) * 1000)
    results["driver_client_ms"] = dist(probe[50:])
    started = time.monotonic()
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("inproc", lambda: in_process(ctx)),
        ("round_trips", lambda: round_trips(ctx)),
        ("cold", lambda: cold_starts(ctx, plan["cold_starts"])),
        ("init_roots", lambda: init_roots(ctx)),
        ("warm", lambda: {s: warm(ctx, s, plan["iterations"]) for s in SCENARIOS
                          if SCENARIOS[s][0] == "reference" or plan["binaries"].get(SCENARIOS[s][0])}),
        ("rss", lambda: {t: rss_run(ctx, t, plan["iterations"]) for t in ("stream", "analyze", "batch")
                         if plan["binaries"].get(t)}),
        ("stream", lambda: streaming(ctx, plan["stream_runs"])),
        ("batch", lambda: batch_fanout(ctx)),
    ]
    failures = {}
    for name, section in sections:
        if not wanted(name):
            continue
        say(f"--- {name}")
        try:
            results[name] = section()
        except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others
            failures[name] = f"{type(exc).__name__}: {exc}"
            results[name] = {"error": failures[name]}
            say(f"{name} failed: {failures[name]}")
            traceback.print_exc()
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["duration_seconds"] = round(time.monotonic() - started, 1)
    results["sections_run"] = {name: results["date"] for name, _ in sections if wanted(name)}
    if only is not None and (RESULTS / "results.json").exists():
        # A partial run updates its sections of the last results and keeps the others (each
        # section's date is in `sections_run`).
        last = json.loads((RESULTS / "results.json").read_text())
        samples_path = RESULTS / "latency-samples.json"
        if "warm" not in only and samples_path.exists() and isinstance(last.get("warm"), dict):
            for scenario, samples in json.loads(samples_path.read_text()).items():
                if isinstance(last["warm"].get(scenario), dict):
                    last["warm"][scenario]["overhead_samples_ms"] = samples
        merged = {**last, **{k: v for k, v in results.items() if k not in ("packages", "reference_package")
                             or not (isinstance(v, dict) and v.get("skipped"))}}
        merged["sections_run"] = {**last.get("sections_run", {}), **results["sections_run"]}
        results = merged
    write_results(results, plan)
    return 1 if failures else 0


# ============================================================================================
# Reporting


def fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_rows(r: dict[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    """The main table (metric, ours, reference, ratio) and the targets table."""
    rows: list[list[str]] = []
    targets: list[list[str]] = []

    def target(name: str, value: float | None, limit: float, lower_is_better: bool = True, unit: str = "") -> None:
        if value is None or value != value:
            targets.append([name, "n/a", f"{limit:g}{unit}", "not measured"])
            return
        met = value <= limit if lower_is_better else value >= limit
        if lower_is_better:
            margin = f"{(limit - value):+.2f}{unit} headroom" if met else f"missed by {value - limit:.2f}{unit} ({value / limit:.1f}x)"
        else:
            margin = f"{value - limit:+.2f} above" if met else f"missed by {limit - value:.2f}"
        targets.append([name, f"{value:.2f}{unit}", f"{'<=' if lower_is_better else '>='} {limit:g}{unit}",
                        ("met, " if met else "MISSED, ") + margin])

    cold = r.get("cold", {})
    ref_cold = (cold.get("reference") or {}).get("spawn_to_first_answer_ms", {}).get("p50") if isinstance(cold, dict) else None
    for f in FUNCTIONS:
        c = cold.get(f) if isinstance(cold, dict) else None
        if c:
            med = c["spawn_to_first_answer_ms"]["p50"]
            init = (c.get("init_report_ms") or {}).get("p50")
            ratio = ref_cold / med if ref_cold else None
            rows.append([f"cold start, {f} (median of {c['spawn_to_first_answer_ms']['n']}; INIT REPORT)",
                         f"{med:.1f} ms ({fmt(init)} ms)",
                         f"{fmt(ref_cold)} ms ({fmt(((cold.get('reference') or {}).get('init_report_ms') or {}).get('p50'))} ms)",
                         f"{ratio:.0f}x faster" if ratio else "n/a"])
            target(f"cold start {f} median", med, TARGETS["cold_start_ms"], unit=" ms")
            if ratio:
                target(f"cold start {f} vs reference", ratio, TARGETS["cold_start_ratio"], lower_is_better=False, unit="x")
        elif f in r.get("pending", {}):
            rows.append([f"cold start, {f}", "pending", "", ""])
    roots = r.get("init_roots")
    if isinstance(roots, dict) and "default_roots_ms" in roots:
        rows.append(["chat init alone (to its first runtime API call), default roots / one root / Debian store via SSL_CERT_FILE+DIR",
                     f"{roots['default_roots_ms']['p50']:.1f} / {roots['one_root_ms']['p50']:.1f} / "
                     f"{roots['system_store_ms']['p50']:.1f} ms (default roots cost {roots['roots_cost_ms']:.1f} ms)", "", ""])
    warm = r.get("warm", {}) if isinstance(r.get("warm"), dict) else {}
    ref = warm.get("reference")
    for scenario in ("chat_miss", "chat_nocache", "chat_hit"):
        w = warm.get(scenario)
        if not w or "overhead_ms" not in w:
            continue
        o = w["overhead_ms"]
        ro = ref["overhead_ms"] if ref and "overhead_ms" in ref else None
        rows.append([f"warm overhead above floor, {scenario} p50 / p99 (n={o['n']})",
                     f"{o['p50']:.2f} / {o['p99']:.2f} ms",
                     f"{ro['p50']:.2f} / {ro['p99']:.2f} ms" if ro else "n/a",
                     f"{ro['p50'] / o['p50']:.1f}x / {ro['p99'] / o['p99']:.1f}x" if ro and o['p50'] > 0 and o['p99'] > 0 else "n/a"])
        target(f"warm overhead p99, {scenario}", o["p99"], TARGETS["warm_p99_ms"], unit=" ms")
    ours_health = (warm.get("chat_miss") or {}).get("health_invoke_ms")
    ref_health = (ref or {}).get("health_invoke_ms")
    if ours_health or ref_health:
        cell = lambda h: f"{h['p50']:.2f} / {h['p99']:.2f} ms" if h else "n/a"  # noqa: E731
        rows.append(["GET /health through the emulator p50 / p99 (emulator + runtime + router)",
                     cell(ours_health), cell(ref_health),
                     f"{ref_health['p50'] / ours_health['p50']:.1f}x" if ours_health and ref_health else "n/a"])
    for scenario in ("chat_miss", "chat_nocache", "chat_hit", "reference"):
        w = warm.get(scenario)
        if not w or "latency_ms" not in w:
            continue
        lat, fl = w["latency_ms"], w["floor_ms"]
        cell = f"{lat['p50']:.1f} / {lat['p99']:.1f} ms (floor {fl['p50']:.1f} / {fl['p99']:.1f})"
        label = f"end-to-end latency, {scenario} p50 / p99"
        rows.append([label, "", cell, ""] if scenario == "reference" else [label, cell, "", ""])
    inproc = r.get("inproc", {})
    for s in inproc.get("scenarios", []) if isinstance(inproc, dict) else []:
        rows.append([f"in-process {s['scenario']} p50 / p99 (n={s['iterations']})",
                     f"{s['p50_us']:.0f} / {s['p99_us']:.0f} µs", "", ""])
        if s["scenario"] != "health":
            target(f"in-process p99, {s['scenario']}", s["p99_us"], TARGETS["inproc_p99_us"], unit=" µs")
    ref_rss = (ref or {}).get("peak_rss_kb")
    rss: dict[str, int | None] = {}
    if warm.get("chat_miss"):
        rss["chat"] = max(filter(None, [warm[s].get("peak_rss_kb") for s in ("chat_miss", "chat_hit", "chat_nocache")
                                        if s in warm and isinstance(warm[s], dict)]), default=None)
    for t, v in (r.get("rss") or {}).items():
        if isinstance(v, dict):
            rss[t] = v.get("peak_rss_kb")
    for f in FUNCTIONS:
        if f in rss and rss[f]:
            mb = rss[f] / 1024
            rows.append([f"peak RSS after 1000+ invocations, {f}",
                         f"{mb:.1f} MiB", f"{ref_rss / 1024:.1f} MiB" if ref_rss else "n/a",
                         f"{ref_rss / rss[f]:.1f}x less" if ref_rss else "n/a"])
            target(f"peak RSS {f}", mb, TARGETS["rss_mb"], unit=" MiB")
    packages = r.get("packages", {})
    ref_pkg = r.get("reference_package", {})
    for f, p in (packages.get("functions") or {}).items():
        if p:
            mb = p["zip_bytes"] / 2**20
            rows.append([f"package zip ({packages['arch']}), {f}", f"{mb:.2f} MiB",
                         f"{ref_pkg['zip_bytes'] / 2**20:.2f} MiB" if ref_pkg.get("zip_bytes") else "n/a",
                         f"{ref_pkg['zip_bytes'] / p['zip_bytes']:.1f}x smaller" if ref_pkg.get("zip_bytes") else "n/a"])
            target(f"zip {f} ({packages['arch']})", mb, TARGETS["zip_mb"], unit=" MiB")
        else:
            rows.append([f"package zip, {f}", "pending (did not build)", "", ""])
    rt = r.get("round_trips", {})
    if isinstance(rt, dict) and "chat" in rt:
        ref_rt = rt.get("reference", {})
        for label, counted in rt["chat"].items():
            ref_label = label if label in ref_rt else None
            rows.append([f"DynamoDB round trips per turn, {label}", str(counted["count"]),
                         str(ref_rt[ref_label]["count"]) if ref_label else "", ""])
        uncached = rt["chat"].get("continued, cache bypassed (no-cache)")
        if uncached:
            target("round trips, uncached turn (cache bypassed)", uncached["count"], TARGETS["round_trips"])
        miss = rt["chat"].get("continued, cache miss")
        if miss:
            target("round trips, uncached turn with cache lookup", miss["count"], TARGETS["round_trips"] + 1)
    st = r.get("stream", {})
    if isinstance(st, dict) and "ttfb_overhead_ms" in st:
        o = st["ttfb_overhead_ms"]
        rows.append([f"streaming TTFB over floor (watch {st['watch']}) p50 / p99 (n={o['n']})",
                     f"{o['p50']:.2f} / {o['p99']:.2f} ms", "", ""])
        rows.append(["streaming: deltas spread (p50) vs mock emission span",
                     f"{st['delta_spread_ms']['p50']:.0f} ms of {st['expected_spread_ms']} ms; "
                     f"{'not buffered' if st['unbuffered'] else 'BUFFERED'}", "", ""])
        target("streaming TTFB overhead p50", o["p50"], TARGETS["stream_ttfb_ms"], unit=" ms")
    b = r.get("batch", {})
    if isinstance(b, dict) and "efficiency" in b:
        rows.append([f"batch fan-out {b['items']} items at {b['concurrency']}: ideal / measured (median)",
                     f"{b['ideal_ms']} / {b['measured_ms']['p50']:.0f} ms = {b['efficiency']:.3f}", "", ""])
        target("batch efficiency", b["efficiency"], TARGETS["batch_efficiency"], lower_is_better=False)
    elif isinstance(b, dict) and "pending" in b:
        rows.append(["batch fan-out efficiency", f"pending ({b['pending']})", "", ""])
    return rows, targets


def markdown(r: dict[str, Any]) -> str:
    rows, targets = summary_rows(r)
    m, v = r["machine"], r["versions"]
    out = [f"# Benchmark results ({r['date']})", "",
           f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Linux {m['kernel']}; "
           f"load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end.",
           f"Command: `{r['command']}` ({r['duration_seconds']:.0f} s of measurement).",
           "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
           f"Driver HTTP client, one keep-alive request to a constant endpoint: p50 "
           f"{r['driver_client_ms']['p50']:.3f} ms (each raw call of a floor includes about this much)."
           if r.get("driver_client_ms") else "", "",
           "| metric | ours (Rust) | reference (FastAPI) | ratio |", "|---|---|---|---|"]
    out += [f"| {' | '.join(row)} |" for row in rows]
    out += ["", "| target | measured | target | verdict |", "|---|---|---|---|"]
    out += [f"| {' | '.join(row)} |" for row in targets]
    if r.get("pending"):
        out += ["", "Pending: " + ", ".join(f"{k} ({v})" for k, v in r["pending"].items())]
    errors = {k: v["error"] for k, v in r.items() if isinstance(v, dict) and "error" in v}
    if errors:
        out += ["", "Sections that failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items())]
    return "\n".join(out) + "\n"


CHART = r'''
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
data = json.load(open(sys.argv[1]))
fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
colors = {"chat_miss": "#c0392b", "chat_nocache": "#e67e22", "chat_hit": "#27ae60", "reference": "#2c3e50"}
labels = {"chat_miss": "Rust chat, cache miss", "chat_nocache": "Rust chat, cache bypassed",
          "chat_hit": "Rust chat, cache hit", "reference": "FastAPI + Mangum reference"}
for name, samples in data["overhead"].items():
    xs = np.sort(np.array(samples))
    ys = np.arange(1, len(xs) + 1) / len(xs)
    left.plot(xs, ys, label=f"{labels.get(name, name)} (p50 {np.percentile(xs, 50):.1f} ms)", color=colors.get(name))
    right.hist(xs, bins=np.linspace(-10, 60, 141), alpha=0.55, label=labels.get(name, name), color=colors.get(name))
left.set_xlabel("warm overhead above the floor (ms): latency minus the same calls made raw")
left.set_ylabel("fraction of invocations")
left.set_xscale("symlog", linthresh=1)
left.grid(True, alpha=0.3)
left.legend(loc="lower right", fontsize=8)
left.set_title("Cumulative distribution")
right.set_xlabel("warm overhead above the floor (ms)")
right.set_ylabel("invocations")
right.set_title("Histogram (-10..60 ms)")
right.legend(fontsize=8)
fig.suptitle(data["title"], fontsize=10)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
'''


def write_results(r: dict[str, Any], plan: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    overhead = {}
    for scenario, w in (r.get("warm") or {}).items():
        if isinstance(w, dict) and "overhead_samples_ms" in w:
            overhead[scenario] = w.pop("overhead_samples_ms")
    (RESULTS / "results.json").write_text(json.dumps(r, indent=2, default=str) + "\n")
    (RESULTS / "latency-samples.json").write_text(json.dumps(overhead) + "\n")
    text = markdown(r)
    (RESULTS / "results.md").write_text(text)
    if overhead:
        data = STATE / "chart.json"
        title = (f"Warm overhead per invocation under the Runtime Interface Emulator, {r['date']}, "
                 f"{r['machine']['cpu']} x{r['machine']['cores']}, mock upstream {MOCK_LATENCY_MS} ms")
        data.write_text(json.dumps({"overhead": overhead, "title": title}))
        script = STATE / "chart.py"
        script.write_text(CHART)
        result = subprocess.run([plan["tools_python"], str(script), str(data), str(RESULTS / "latency.png")],
                                capture_output=True, text=True)
        if result.returncode != 0:
            say(f"chart failed: {result.stderr[-1000:]}")
    print(text, flush=True)
    say(f"results in {RESULTS.relative_to(ROOT)}/ (results.json, results.md, latency.png)")


# ============================================================================================


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmarks: the Rust functions vs the FastAPI reference.")
    sub = parser.add_subparsers(dest="mode")
    m = sub.add_parser("measure", help="(internal) run the measurements inside devstack")
    m.add_argument("--plan", required=True)
    parser.add_argument("--iterations", type=int, default=1000, help="warm invocations per scenario (>= 1000)")
    parser.add_argument("--cold-starts", type=int, default=11, help="cold starts per function (>= 10)")
    parser.add_argument("--inproc-iterations", type=int, default=20000, help="in-process requests per scenario")
    parser.add_argument("--stream-runs", type=int, default=30, help="measured streams")
    parser.add_argument("--stream-watch", choices=("release", "stack"), default="release",
                        help="this run's release `stream` behind `cargo lambda watch --only-lambda-apis`, "
                             "or the stack's own watch (debug build)")
    parser.add_argument("--skip-package", action="store_true", help="skip the zip builds")
    parser.add_argument("--merge-packages", action="store_true",
                        help="merge the sizes saved by the last --packages-only into the last results")
    parser.add_argument("--reuse-build", action="store_true",
                        help="measure the release binaries copied by the previous run instead of building")
    parser.add_argument("--packages-only", action="store_true",
                        help="only build the zips and merge their sizes into the last results")
    parser.add_argument("--only", default="", help="comma-separated sections: inproc,round_trips,cold,init_roots,warm,rss,stream,batch")
    parser.add_argument("--quick", action="store_true", help="a short validation run (not for publishing)")
    args = parser.parse_args(argv)
    try:
        if args.mode == "measure":
            return measure(args)
        if args.quick:
            args.iterations, args.cold_starts, args.inproc_iterations, args.stream_runs = 100, 3, 2000, 5
        return outer(args)
    except BenchError as exc:
        say(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
