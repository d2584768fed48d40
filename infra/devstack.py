#!/usr/bin/env python3
"""Local stack for the gateway: DynamoDB emulator, tables, mock LLM and `cargo lambda watch`.

    python infra/devstack.py up  [--port 9000] [--dynamodb-port 8000] [--mock-port 8081]
        Developer mode, in the foreground: builds the workspace, starts everything on the given
        ports (falling back to free ones when taken), prints the function URLs, a dev API key and
        a curl to paste, and runs until Ctrl-C / SIGTERM.  State lives in .stack/.
        With OPENAI_API_KEY set, no mock is started and the functions talk to OPENAI_BASE_URL
        (default https://api.openai.com/v1) with that key; --mock-llm forces the mock.

    python infra/devstack.py run [options] -- <command...>
        Test mode: the same stack on free ports with a temporary state dir (always with the mock
        LLM), then runs the command with the stack's environment plus GW_* variables, stops
        everything and exits with the command's exit code.
        With --services-only, cargo lambda watch is not started (infra/sam-local.sh runs the
        functions under SAM local instead).
        --function-env NAME=VALUE (repeatable, both modes) sets or overrides a variable of the
        functions' environment, e.g. RUST_LOG=debug; the command also gets GW_DYNAMODB_PID,
        GW_WATCH_PID and GW_LOG_DIR for tests that disturb or inspect the stack (make reliability).

Every process the stack starts gets its own process group; this script also registers as a
child subreaper, so anything they spawn stays in its process tree.  On exit (normal, failure,
Ctrl-C or SIGTERM) exactly that tree is stopped: SIGTERM, then SIGKILL after a grace period.
Nothing outside it is ever signalled.

Only the Python standard library and boto3 (plus infra/tables.py, which uses cfn-lint's
template decoder) are used.  When started by a Python outside .venv it runs infra/bootstrap.sh
if needed and re-executes itself with .venv/bin/python.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import fcntl
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any, Callable, TextIO

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
VENV_BIN = VENV / "bin"
TEMPLATE = ROOT / "template.yaml"
FUNCTIONS = ("chat", "stream", "analyze", "batch")
MOCK_BINARY = "mock-llm"
REEXEC_MARK = "GW_DEVSTACK_REEXEC"
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
LOG_TAIL_LINES = 50
STOP_GRACE_SECONDS = 5.0
# Variables of the caller's shell that would point the local AWS SDK somewhere else.
SCRUBBED_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)


class StackError(Exception):
    """A step of the stack failed; the message says which and what to do."""


class Stop(BaseException):
    """SIGTERM/SIGHUP received (SIGINT arrives as KeyboardInterrupt)."""


def say(message: str) -> None:
    print(f"devstack: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Environment and prerequisites


def ensure_venv(argv: list[str]) -> None:
    """Make sure the pinned tools exist and that this script runs on .venv's Python."""
    if not (VENV_BIN / "python").exists():
        say(".venv is missing: running infra/bootstrap.sh")
        result = subprocess.run(["bash", str(ROOT / "infra" / "bootstrap.sh")], cwd=ROOT)
        if result.returncode != 0:
            raise StackError("infra/bootstrap.sh failed (see above)")
    if Path(sys.prefix).resolve() != VENV.resolve():
        if os.environ.get(REEXEC_MARK):
            raise StackError(f"re-executed with {VENV_BIN / 'python'} but still not inside .venv")
        os.environ[REEXEC_MARK] = "1"
        os.execv(str(VENV_BIN / "python"), [str(VENV_BIN / "python"), str(Path(__file__).resolve()), *argv])


def check_prerequisites() -> None:
    missing = []
    if shutil.which("cargo") is None:
        missing.append("`cargo` is not on PATH: install Rust with rustup")
    for tool in ("cargo-lambda", "python"):
        if not (VENV_BIN / tool).exists():
            missing.append(f"{VENV_BIN / tool} not found: run infra/bootstrap.sh")
    if not TEMPLATE.exists():
        missing.append(f"{TEMPLATE} not found")
    try:
        import boto3  # noqa: F401
        import cfnlint  # noqa: F401
    except ImportError as exc:
        missing.append(f"Python package missing in .venv ({exc}): run infra/bootstrap.sh")
    if missing:
        raise StackError("; ".join(missing))


def base_env() -> dict[str, str]:
    """The caller's environment with .venv/bin first on PATH and foreign AWS settings removed."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV and k != REEXEC_MARK}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("VIRTUAL_ENV", None)
    env["VIRTUAL_ENV"] = str(VENV)
    return env


_PLAIN_ENV_VALUE = re.compile(r"[A-Za-z0-9_./:@,+=%-]*")


def env_line(key: str, value: str) -> str:
    """`KEY=value`; a value with spaces or other special characters (a PEM given with
    `--function-env`) in single quotes, which dotenv parsers take literally."""
    if "\n" in value or "\r" in value:
        raise StackError(f"env value of {key} contains a newline")
    if _PLAIN_ENV_VALUE.fullmatch(value):
        return f"{key}={value}\n"
    if "'" in value:
        raise StackError(f"env value of {key} contains both special characters and a single quote")
    return f"{key}='{value}'\n"


def write_env_file(path: Path, values: dict[str, str]) -> None:
    lines = "".join(env_line(key, value) for key, value in values.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds secrets
    with os.fdopen(fd, "w") as f:
        f.write(lines)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Processes


def enable_subreaper() -> bool:
    """Adopt orphaned descendants (Linux), so nothing we start escapes our process tree."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_CHILD_SUBREAPER = 36
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _proc_table() -> dict[int, tuple[int, int, str, str]]:
    """pid -> (ppid, pgid, state, start time) for every process visible in /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after the last ')'.
        fields = raw[raw.rfind(")") + 2 :].split()
        try:
            table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0], fields[19])
        except (IndexError, ValueError):
            continue
    return table


def descendants(root_pid: int, table: dict[int, tuple[int, int, str, str]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _pgid, _state, _start) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class Child:
    """A process started by the stack, in its own session, its output pumped into a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str],
                 echo: TextIO | None = None, fail_pattern: str | None = None) -> None:
        self.name = name
        self._fail_regex = re.compile(fail_pattern) if fail_pattern else None
        self.failure: str | None = None  # first output line matching fail_pattern
        self.argv = argv
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w", encoding="utf-8", errors="replace")
        self._echo = echo
        self._cond = threading.Condition()
        self._lines: list[str] = []
        self._eof = False
        try:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        except OSError as exc:
            self._log.close()
            raise StackError(f"cannot start {name} ({shlex.join(argv)}): {exc}") from exc
        self._pump = threading.Thread(target=self._pump_output, name=f"pump-{name}", daemon=True)
        self._pump.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump_output(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", errors="replace")
            self._log.write(line)
            self._log.flush()
            if self._echo is not None:
                try:
                    self._echo.write(f"[{self.name}] {line}")
                    self._echo.flush()
                except (OSError, ValueError):
                    pass
            if self._fail_regex is not None and self.failure is None and self._fail_regex.search(line):
                self.failure = line.strip()
            with self._cond:
                if len(self._lines) < 1000:  # only start-up lines are ever searched
                    self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()
        self._log.close()

    def exit_status(self) -> int | None:
        """The exit code if the process has ended, without reaping it (its pid stays reserved)."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.proc.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self._lines)
                if self._eof:
                    status = self.exit_status()
                    raise StackError(f"{self.name} exited (status {status}) before printing its address")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StackError(f"{self.name} did not print its address within {timeout:.0f} s")
                self._cond.wait(min(remaining, 0.5))

    def tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return list(deque(f, maxlen=lines))
        except OSError:
            return []


def stop_tree(children: list[Child], grace: float = STOP_GRACE_SECONDS) -> None:
    """Stop the given children, their process groups and every descendant of this process.

    Only processes in this script's own tree (children, their groups, and orphans adopted as
    subreaper) are signalled, and each is identified by pid plus start time, so a recycled pid
    is never hit.
    """
    me = os.getpid()
    table = _proc_table()
    targets = {pid: table[pid][3] for pid in descendants(me, table) if table[pid][2] != "Z"}
    ours = {c.pid for c in children}
    # A child's pid is still reserved (at worst as a zombie) until Popen reaps it, so its
    # process group id cannot belong to anyone else yet.
    groups = {c.pid for c in children if c.proc.returncode is None}

    def alive(pid: int) -> bool:
        entry = _proc_table_entry(pid)
        return entry is not None and entry[3] == targets[pid] and entry[2] != "Z"

    def signal_all(sig: int) -> None:
        for child in children:
            if child.pid in groups:
                try:
                    os.killpg(child.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        for pid in list(targets):
            if alive(pid):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap_adopted(ours)
        if not any(alive(pid) for pid in targets):
            break
        time.sleep(0.05)
    else:
        leftover = [pid for pid in targets if alive(pid)]
        if leftover:
            say(f"processes still running after {grace:.0f} s, killing: {leftover}")
            signal_all(signal.SIGKILL)
    for child in children:
        try:
            child.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            say(f"{child.name} (pid {child.pid}) did not exit")
        child._pump.join(timeout=2)
    _reap_adopted(ours)


def kill_subtree(pid: int) -> None:
    """SIGKILL a (not yet reaped) child of ours and all its descendants."""
    table = _proc_table()
    for target in [pid, *descendants(pid, table)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(target, signal.SIGKILL)


def _proc_table_entry(pid: int) -> tuple[int, int, str, str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return int(fields[1]), int(fields[2]), fields[0], fields[19]


def _reap_adopted(ours: set[int]) -> None:
    """Collect exited orphans this process adopted as subreaper (never the Popen children)."""
    me = os.getpid()
    for pid, (ppid, _pgid, state, _start) in _proc_table().items():
        if ppid == me and state == "Z" and pid not in ours:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


# --------------------------------------------------------------------------------------------
# Ports and readiness


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Like the servers themselves: connections in TIME_WAIT do not make a port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_port(preferred: int, what: str) -> int:
    """The preferred port if it is free (0 means any), else a free one."""
    if preferred and port_is_free(preferred):
        return preferred
    port = free_port()
    if preferred:
        say(f"port {preferred} for {what} is taken, using {port}")
    return port


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wait_http(url: str, timeout: float, alive: Callable[[], None]) -> int:
    """Wait until `url` answers with any HTTP status; `alive` raises if a needed process died."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while True:
        alive()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StackError(f"{url} did not answer within {timeout:.0f} s ({last_error})")
        try:
            with _NO_PROXY.open(url, timeout=max(1.0, remaining)) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(getattr(exc, "reason", exc))
            time.sleep(0.3)


# --------------------------------------------------------------------------------------------
# The stack


class Stack:
    def __init__(self, args: argparse.Namespace, state_dir: Path, test_mode: bool) -> None:
        self.args = args
        self.state_dir = state_dir
        self.logs = state_dir / "logs"
        self.env_file = state_dir / "env"
        self.gw_env_file = state_dir / "gw.env"
        self.test_mode = test_mode
        self.children: list[Child] = []
        self.env = base_env()
        self.prefix: str = args.table_prefix
        self.stack_env: dict[str, str] = {}
        self.gw_env: dict[str, str] = {}
        self.api_key = ""
        self.dev_jwt = ""
        self.watch_port = 0
        self.watch_pid = 0
        self.emulator_pid = 0
        self.mock_url: str | None = None

    # -- steps ---------------------------------------------------------------------------

    def build(self) -> Path:
        if self.args.skip_build:
            say("skipping cargo build (--skip-build)")
        else:
            say("cargo build --workspace --bins (compile errors show here, not as hanging requests)")
            result = subprocess.run(["cargo", "build", "--workspace", "--bins"], cwd=ROOT, env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=sys.stderr)
            if result.returncode != 0:
                raise StackError("cargo build failed (see the errors above)")
        meta = subprocess.run(["cargo", "metadata", "--no-deps", "--format-version", "1"], cwd=ROOT,
                              env=self.env, capture_output=True, text=True)
        if meta.returncode != 0:
            raise StackError(f"cargo metadata failed: {meta.stderr.strip()}")
        target = Path(json.loads(meta.stdout)["target_directory"]) / "debug"
        missing = [b for b in (*FUNCTIONS, MOCK_BINARY) if not (target / b).exists()]
        if missing:
            raise StackError(f"binaries missing from {target} after the build: {', '.join(missing)}")
        return target

    def start(self, name: str, argv: list[str], echo: TextIO | None = None,
              env: dict[str, str] | None = None, fail_pattern: str | None = None) -> Child:
        child = Child(name, argv, self.logs / f"{name}.log", env or self.env, echo, fail_pattern)
        self.children.append(child)
        return child

    def start_emulator(self) -> str:
        port = pick_port(self.args.dynamodb_port, "the DynamoDB emulator")
        child = self.start("dynamodb", [str(VENV_BIN / "python"), str(ROOT / "infra" / "dynamo_emulator.py"),
                                        "--host", "127.0.0.1", "--port", str(port)])
        match = child.wait_for_line(r"dynamodb-emulator listening on (http://\S+)", 30)
        self.emulator_pid = child.pid
        say(f"DynamoDB emulator at {match.group(1)}")
        return match.group(1)

    def create_tables(self, endpoint: str) -> dict[str, str]:
        sys.path.insert(0, str(ROOT / "infra"))
        import tables

        try:
            template = tables.load_template(TEMPLATE)
            client = tables.dynamodb_client(endpoint)
            tables.create_tables(client, template, self.prefix, log=lambda m: None)
            env = tables.template_env(template, self.prefix)
            table_env = tables.table_env(template, self.prefix)
        except tables.TemplateError as exc:
            raise StackError(str(exc)) from exc
        say(f"tables: {', '.join(table_env.values())}")
        self._client = client
        self._table_env = table_env
        return env

    def start_mock(self, binaries: Path) -> str:
        port = pick_port(self.args.mock_port, "the mock LLM")
        child = self.start("mock-llm", [str(binaries / MOCK_BINARY), "--addr", f"127.0.0.1:{port}"])
        match = child.wait_for_line(r"mock-llm listening on http://(\S+?):(\d+)", 30)
        url = f"http://127.0.0.1:{match.group(2)}"
        say(f"mock LLM at {url}")
        return url

    def create_dev_key(self) -> str:
        table = self._table_env.get("API_KEYS_TABLE")
        if table is None:
            raise StackError("template.yaml has no API_KEYS_TABLE: !Ref <table> in Globals.Function.Environment")
        key = f"gwk_dev_{secrets.token_hex(16)}"
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        self._client.put_item(
            TableName=table,
            Item={
                "pk": {"S": hashlib.sha256(key.encode()).hexdigest()},
                "user": {"S": "dev"},
                "tier": {"S": "pro"},
                "created_at": {"S": now.isoformat().replace("+00:00", "Z")},
                "revoked": {"BOOL": False},
            },
        )
        return key

    def mint_dev_jwt(self, binaries: Path, jwt_secret: str) -> str:
        """A 12-hour HS256 token for user `dev` (tier pro), minted by the admin CLI."""
        admin = binaries / "admin"
        if not admin.exists():
            raise StackError(f"{admin} is missing after the build")
        result = subprocess.run(
            [str(admin), "jwt", "mint", "--user", "dev", "--tier", "pro", "--ttl", "12h"],
            env={**self.env, "JWT_SECRET": jwt_secret, "JWT_ALGORITHM": "HS256"},
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise StackError(f"admin jwt mint failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def start_watch(self) -> None:
        argv = [str(VENV_BIN / "cargo-lambda"), "lambda", "watch",
                "--invoke-address", "127.0.0.1", "--invoke-port", str(self.watch_port),
                "--env-file", str(self.env_file)]
        if self.test_mode or self.args.no_reload:
            argv.append("--ignore-changes")
        if self.args.concurrency:
            argv += ["--concurrency", str(self.args.concurrency)]
        # The functions read their settings from the env file only: drop same-named variables
        # of the caller (a real OPENAI_API_KEY, say) from watch's own environment.
        env = {k: v for k, v in self.env.items() if k not in self.stack_env}
        echo = None if self.test_mode else sys.stdout
        # watch runs `cargo run --bin <fn>` on the first request; a compile error there would
        # leave the request hanging, so its output is watched for cargo's failure line.
        watch = self.start("watch", argv, echo=echo, env=env, fail_pattern=r"^error: could not compile")
        self.watch_pid = watch.pid

        def alive() -> None:
            status = watch.exit_status()
            if status is not None:
                raise StackError(f"cargo lambda watch exited with status {status}")
            if watch.failure:
                raise StackError(f"a function failed to compile under cargo lambda watch: {watch.failure}")

        for name in FUNCTIONS:
            url = f"http://127.0.0.1:{self.watch_port}/lambda-url/{name}/health"
            started = time.monotonic()
            status = wait_http(url, self.args.ready_timeout, alive)
            say(f"{name}: GET /health -> {status} ({time.monotonic() - started:.1f} s)")

    def up(self) -> None:
        binaries = self.build()
        endpoint = self.start_emulator()
        template_env = self.create_tables(endpoint)
        use_real = bool(os.environ.get("OPENAI_API_KEY")) and not self.test_mode and not self.args.mock_llm
        if use_real:
            base_url = os.environ.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_BASE_URL
            openai = {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": os.environ["OPENAI_API_KEY"]}
            say(f"OPENAI_API_KEY is set: no mock, the functions call {base_url}")
        else:
            self.mock_url = self.start_mock(binaries)
            openai = {"OPENAI_BASE_URL": f"{self.mock_url}/v1", "OPENAI_API_KEY": "mock-key"}
        self.api_key = self.create_dev_key()
        jwt_secret = secrets.token_hex(32)
        self.dev_jwt = self.mint_dev_jwt(binaries, jwt_secret)
        # Chosen before the env file is written: the chat function names the stream URL.
        self.watch_port = pick_port(self.args.port, "cargo lambda watch")
        functions_url = f"http://127.0.0.1:{self.watch_port}/lambda-url"
        # The mock's fault models live in a test registry, never in the compiled-in one.
        registry = {} if use_real else {"MODEL_REGISTRY_PATH": str(ROOT / "shared" / "models.test.toml")}
        # Test runs use small free-tier quotas and a short upstream timeout so limit and
        # timeout behaviour can be exercised in seconds; pro and enterprise keep the defaults.
        # The stream heartbeat is shorter than that timeout, so a slow first token can show
        # `: ping` comments before the upstream call would time out.
        test_settings = {
            "RATE_LIMIT_FREE_REQUESTS_PER_HOUR": "5",
            "RATE_LIMIT_FREE_TOKENS_PER_MINUTE": "3000",
            "LLM_TIMEOUT_MS": "1000",
            "STREAM_HEARTBEAT_MS": "500",
        } if self.test_mode else {}
        self.stack_env = {
            **template_env,
            "AWS_ENDPOINT_URL_DYNAMODB": endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "local",
            "AWS_SECRET_ACCESS_KEY": "local",
            **openai,
            "JWT_SECRET": jwt_secret,
            "JWT_ALGORITHM": "HS256",
            "RUST_LOG": "info",
            "STREAM_FUNCTION_URL": f"{functions_url}/stream",
            **registry,
            **test_settings,
            # Last, so a test stack can turn on debug logs or switch JWT algorithms.
            **self.function_env_overrides(),
        }
        write_env_file(self.env_file, self.stack_env)
        if getattr(self.args, "services_only", False):
            say("--services-only: not starting cargo lambda watch")
        else:
            self.start_watch()
        self.gw_env = {
            "GW_FUNCTIONS_URL": functions_url,
            **({"GW_MOCK_LLM_URL": self.mock_url} if self.mock_url else {}),
            "GW_DEV_API_KEY": self.api_key,
            "GW_DEV_JWT": self.dev_jwt,
            "GW_TEMPLATE": str(TEMPLATE),
            "GW_STACK_ENV_FILE": str(self.env_file),
            "GW_TABLE_PREFIX": self.prefix,
            # For tests that disturb or inspect the stack itself (reliability suite): the
            # emulator to pause, the process whose descendants are the functions, and the logs.
            "GW_DYNAMODB_PID": str(self.emulator_pid),
            "GW_WATCH_PID": str(self.watch_pid),
            "GW_LOG_DIR": str(self.logs),
        }
        write_env_file(self.gw_env_file, self.gw_env)

    def function_env_overrides(self) -> dict[str, str]:
        """`--function-env NAME=VALUE` pairs, applied over the stack's own function settings."""
        overrides = {}
        for pair in self.args.function_env or []:
            name, sep, value = pair.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise StackError(f"--function-env expects NAME=VALUE, got {pair!r}")
            overrides[name] = value
        return overrides

    def command_env(self) -> dict[str, str]:
        return {**self.env, **self.stack_env, **self.gw_env}

    def monitor(self) -> None:
        """Block until a signal arrives or a child dies."""
        while True:
            for child in self.children:
                status = child.exit_status()
                if status is not None:
                    raise StackError(f"{child.name} exited unexpectedly (status {status})")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.children:
            say("stopping the stack")
            stop_tree(list(reversed(self.children)))

    def print_tails(self) -> None:
        for child in self.children:
            lines = child.tail()
            print(f"----- last {len(lines)} lines of {child.log_path} -----", file=sys.stderr)
            sys.stderr.writelines(lines)
        sys.stderr.flush()


# --------------------------------------------------------------------------------------------
# Commands


def _on_signal(signum: int, _frame: Any) -> None:
    raise Stop(signum)


def _quiet_signals() -> None:
    """During teardown a second Ctrl-C / SIGTERM must not abort the cleanup."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def cmd_up(args: argparse.Namespace) -> int:
    state = ROOT / ".stack"
    state.mkdir(exist_ok=True)
    lock = open(state / "devstack.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StackError(f"another `devstack.py up` is running (lock {state / 'devstack.lock'})")
    for old in (state / "logs").glob("*.log"):
        old.unlink()  # logs of a previous session would be mistaken for this one's
    stack = Stack(args, state, test_mode=False)
    code = 0
    try:
        stack.up()
        base = stack.gw_env["GW_FUNCTIONS_URL"]
        out = sys.stdout
        out.write("\nLocal gateway is up.\n\n")
        for name in FUNCTIONS:
            out.write(f"  {name:8} {base}/{name}/\n")
        out.write(f"\n  DynamoDB   {stack.stack_env['AWS_ENDPOINT_URL_DYNAMODB']}\n")
        out.write(f"  LLM        {stack.stack_env['OPENAI_BASE_URL']}\n")
        out.write(f"  env files  {stack.env_file} (functions), {stack.gw_env_file} (tests)\n")
        out.write(f"  logs       {stack.logs}/\n")
        out.write(f"\n  dev API key: {stack.api_key}\n")
        out.write(f"  dev JWT:     {stack.dev_jwt}\n\n")
        out.write("Try:\n  curl -s -H \"X-API-Key: " + stack.api_key + "\" -H 'content-type: application/json' "
                  f"-d '{{\"message\":\"Hello\"}}' {base}/chat/chat\n\nCtrl-C stops everything.\n")
        out.flush()
        stack.monitor()
    except (KeyboardInterrupt, Stop):
        _quiet_signals()
        say("interrupted")
    except StackError as exc:
        _quiet_signals()
        say(f"error: {exc}")
        stack.print_tails()
        code = 1
    finally:
        _quiet_signals()
        stack.stop()
    return code


def cmd_run(args: argparse.Namespace) -> int:
    command = args.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise StackError("nothing to run: use `devstack.py run -- <command...>`")
    if args.state_dir:
        state = Path(args.state_dir).resolve()
        state.mkdir(parents=True, exist_ok=True)
    else:
        state = Path(tempfile.mkdtemp(prefix="gw-devstack-"))
    stack = Stack(args, state, test_mode=True)
    code = 1
    proc: subprocess.Popen[bytes] | None = None
    interrupted = False
    try:
        stack.up()
        say(f"stack ready at {stack.gw_env['GW_FUNCTIONS_URL']}; running: {shlex.join(command)}")
        try:
            proc = subprocess.Popen(command, env=stack.command_env())
        except OSError as exc:
            raise StackError(f"cannot run {command[0]}: {exc}") from exc
        returncode = proc.wait()
        code = returncode if returncode >= 0 else 128 - returncode
        # A dead stack child makes a passing run suspicious: report it.
        for child in stack.children:
            status = child.exit_status()
            if status is not None:
                say(f"warning: {child.name} exited during the run (status {status})")
                code = code or 1
    except (KeyboardInterrupt, Stop) as exc:
        _quiet_signals()
        interrupted = True
        code = 130 if isinstance(exc, KeyboardInterrupt) else 128 + (exc.args[0] if exc.args else 15)
        if proc is not None and proc.returncode is None:
            # Ctrl-C already reached the command (same process group); forward SIGTERM.
            if isinstance(exc, Stop):
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                say(f"{command[0]} did not stop within 10 s, killing it")
                kill_subtree(proc.pid)
                proc.wait()
        say("interrupted")
    except StackError as exc:
        _quiet_signals()
        say(f"error: {exc}")
        code = 1
    finally:
        _quiet_signals()
        if code != 0 and not interrupted:
            stack.print_tails()
        stack.stop()
        if code == 0 and not args.state_dir and not args.keep_state:
            shutil.rmtree(state, ignore_errors=True)
        else:
            say(f"state and logs kept in {state}")
    return code


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="devstack.py", description="Local stack: DynamoDB emulator, mock LLM, cargo lambda watch.")
    sub = parser.add_subparsers(dest="mode", required=True)

    def common(p: argparse.ArgumentParser, port: int, dynamodb_port: int, mock_port: int) -> None:
        p.add_argument("--port", type=int, default=port,
                       help=f"cargo lambda watch port (default {port or 'free'}; falls back to a free one)")
        p.add_argument("--dynamodb-port", type=int, default=dynamodb_port,
                       help=f"DynamoDB emulator port (default {dynamodb_port or 'free'})")
        p.add_argument("--mock-port", type=int, default=mock_port,
                       help=f"mock LLM port (default {mock_port or 'free'})")
        p.add_argument("--table-prefix", default="local", help="local table name prefix (default local)")
        p.add_argument("--ready-timeout", type=float, default=300.0,
                       help="seconds to wait for each function's /health (first request compiles; default 120)")
        p.add_argument("--concurrency", type=int, default=0,
                       help="cargo lambda watch --concurrency (instances per function; default: watch's own, 1)")
        p.add_argument("--skip-build", action="store_true", help="do not run cargo build first")
        p.add_argument("--function-env", action="append", metavar="NAME=VALUE",
                       help="set or override one variable of the functions' environment, e.g. "
                            "RUST_LOG=debug (repeatable; a PEM may use \\n for its newlines)")

    up = sub.add_parser("up", help="developer mode (foreground, Ctrl-C stops)")
    common(up, 9000, 8000, 8081)
    up.add_argument("--no-reload", action="store_true", help="do not rebuild functions on source changes")
    up.add_argument("--mock-llm", action="store_true", help="use the mock LLM even when OPENAI_API_KEY is set")

    run = sub.add_parser("run", help="test mode: run a command against a fresh stack")
    common(run, 0, 0, 0)
    run.add_argument("--state-dir", help="state directory (default: a new temporary one)")
    run.add_argument("--keep-state", action="store_true", help="keep the temporary state dir after success")
    run.add_argument("--services-only", action="store_true",
                     help="emulator, tables, mock LLM and credentials only, no cargo lambda watch "
                          "(GW_FUNCTIONS_URL then serves nothing; the SAM local tests run the functions)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- command and its arguments")
    args = parser.parse_args(argv)
    args.no_reload = getattr(args, "no_reload", True)
    args.mock_llm = getattr(args, "mock_llm", True)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)  # --help works without the venv
    try:
        ensure_venv(argv)
        check_prerequisites()
    except StackError as exc:
        say(f"error: {exc}")
        return 1
    enable_subreaper()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        return cmd_up(args) if args.mode == "up" else cmd_run(args)
    except StackError as exc:
        say(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
