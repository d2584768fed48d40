#!/usr/bin/env python3
"""`sam` with working `--docker-network host`, for SAM local runs against services on 127.0.0.1.

    python infra/sam_host_network.py [--extra-env FILE.json] <sam arguments...>
    e.g. python infra/sam_host_network.py local invoke ChatFunction -e events/health.json \
             --docker-network host --config-env local

SAM CLI 1.170 accepts `--docker-network host` but still creates the container on the default
bridge (upstream aws-sam-cli issues #4236 and #3609; PR #7278 is unmerged), so a function in it
cannot reach the DynamoDB emulator or the mock LLM listening on the host's loopback. This wrapper
imports samcli, patches three things, and runs its CLI unchanged otherwise:

1. ``Container.create``: for network "host", create the container with ``network_mode="host"``
   and tell the runtime interface emulator to listen on SAM's chosen host port
   (``--runtime-interface-emulator-address 127.0.0.1:<rapid_port_host>``) and to serve the
   runtime API on a free port of its own (``--runtime-api-address``): with a shared network
   namespace, two containers would otherwise both bind 8080 and 9001.
2. ``ContainerCollection.create`` (docker-py): drop the published ports, which Docker refuses
   together with host networking.
3. ``EnvironmentVariables.resolve``: with ``--extra-env FILE``, add that JSON object's variables
   to every function's environment. SAM passes only variables the template declares, and the
   emulator endpoints (``AWS_ENDPOINT_URL_DYNAMODB``, ``AWS_ENDPOINT_URL_SSM``) have no place in a
   production template.

The patches are written against aws-sam-cli 1.170.0 (pinned in infra/requirements.txt). Any
other version, or a missing patched name, stops the wrapper with a message instead of silently
running a SAM that ignores the host network.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

SAM_VERSION = "1.170.0"
RIE_SUFFIX = "aws-lambda-rie"
HOST = "host"


def fail(message: str) -> None:
    print(f"sam_host_network: {message}", file=sys.stderr)
    sys.exit(2)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(owner: Any, name: str, where: str) -> Any:
    value = getattr(owner, name, None)
    if value is None:
        fail(f"{where}.{name} is missing: this wrapper was written for aws-sam-cli {SAM_VERSION}; "
             "update it for the installed version")
    return value


def patch(extra_env: dict[str, str]) -> None:
    try:
        import samcli
        from docker.models.containers import ContainerCollection
        from samcli.local.docker import container as container_module
        from samcli.local.lambdafn import env_vars as env_module
    except ImportError as exc:
        fail(f"cannot import samcli/docker ({exc}); run infra/bootstrap.sh and use .venv/bin/python")
    if samcli.__version__ != SAM_VERSION:
        fail(f"aws-sam-cli {samcli.__version__} is installed, this wrapper patches {SAM_VERSION}")

    container_cls = require(container_module, "Container", "samcli.local.docker.container")
    original_create = require(container_cls, "create", "Container")
    # Attributes the patch reads or sets; they are assigned in Container.__init__.
    for attribute in ("_container_opts", "_entrypoint", "rapid_port_host", "network_id"):
        if attribute not in container_cls.__init__.__code__.co_names and not hasattr(container_cls, attribute):
            fail(f"Container no longer has `{attribute}`: update this wrapper for aws-sam-cli {samcli.__version__}")

    def create(self: Any, context: Any) -> Any:
        if self.network_id == HOST:
            self._container_opts = {**(self._container_opts or {}), "network_mode": HOST}
            entrypoint = list(self._entrypoint or [])
            if not entrypoint or not str(entrypoint[0]).endswith(RIE_SUFFIX):
                fail(f"unexpected container entrypoint {entrypoint!r}: expected SAM's {RIE_SUFFIX}")
            if "--runtime-interface-emulator-address" not in entrypoint:
                entrypoint[1:1] = [
                    "--runtime-interface-emulator-address", f"127.0.0.1:{self.rapid_port_host}",
                    "--runtime-api-address", f"127.0.0.1:{free_port()}",
                ]
            self._entrypoint = entrypoint
        return original_create(self, context)

    container_cls.create = create

    original_collection_create = require(ContainerCollection, "create", "docker ContainerCollection")

    def collection_create(self: Any, image: Any, command: Any = None, **kwargs: Any) -> Any:
        if kwargs.get("network_mode") == HOST:
            kwargs.pop("ports", None)
        return original_collection_create(self, image, command, **kwargs)

    ContainerCollection.create = collection_create

    if extra_env:
        env_cls = require(env_module, "EnvironmentVariables", "samcli.local.lambdafn.env_vars")
        original_resolve = require(env_cls, "resolve", "EnvironmentVariables")

        def resolve(self: Any) -> dict[str, str]:
            return {**original_resolve(self), **extra_env}

        env_cls.resolve = resolve


def main(argv: list[str]) -> int:
    extra_env: dict[str, str] = {}
    if argv[:1] == ["--extra-env"]:
        if len(argv) < 2:
            fail("--extra-env needs a JSON file")
        try:
            loaded = json.loads(Path(argv[1]).read_text())
        except (OSError, ValueError) as exc:
            fail(f"cannot read {argv[1]}: {exc}")
        if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
            fail(f"{argv[1]} must be a JSON object of strings")
        extra_env = loaded
        argv = argv[2:]
    patch(extra_env)
    from samcli.cli.main import cli

    sys.argv = ["sam", *argv]
    return cli()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
