#!/usr/bin/env python3
"""Local DynamoDB tables, derived from template.yaml (the only place tables are defined).

Every ``AWS::DynamoDB::Table`` resource of the SAM template is created in the emulator with the
template's key schema, attribute definitions, secondary indexes, billing mode and TTL setting.
Local names are ``<prefix>-<logical id without the "Table" suffix, lowercased>``, e.g.
``ConversationsTable`` -> ``local-conversations``.

The environment variables that carry table names to the functions are read from the template as
well: every ``Globals.Function.Environment.Variables`` entry (and any per-function one) whose value
is ``!Ref <a table>``.  Other ``!Ref <parameter>`` entries resolve to the parameter's default, so
a local env file mirrors what a deployment would see.

Commands (the endpoint comes from ``--endpoint`` or ``AWS_ENDPOINT_URL_DYNAMODB``):
    tables.py create   create missing tables (existing ones are checked, not recreated)
    tables.py check    verify that the emulator's tables match the template
    tables.py env      print KEY=value lines for the table variables (no endpoint needed)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEMPLATE = ROOT / "template.yaml"
DEFAULT_PREFIX = "local"
TABLE_TYPE = "AWS::DynamoDB::Table"
FUNCTION_TYPES = ("AWS::Serverless::Function", "AWS::Lambda::Function")


class TemplateError(Exception):
    """The template cannot be turned into local tables."""


def load_template(path: str | os.PathLike[str] = DEFAULT_TEMPLATE) -> dict[str, Any]:
    """Parse a CloudFormation/SAM template, keeping short-form intrinsics (!Ref, !GetAtt, ...).

    cfn-lint's decoder turns ``!Ref X`` into ``{"Ref": "X"}`` (and so on), which a plain YAML
    loader would reject.  The result is converted to plain dicts and lists.
    """
    try:
        from cfnlint.decode import decode
    except ImportError as exc:
        raise TemplateError(
            f"cfn-lint is not importable ({exc}); run infra/bootstrap.sh and use .venv/bin/python"
        ) from exc
    template, matches = decode(str(path))
    if matches or template is None:
        problems = "; ".join(str(m) for m in matches) or "unknown error"
        raise TemplateError(f"cannot parse {path}: {problems}")
    # The decoder's node classes carry line marks; a JSON round trip gives plain containers.
    return json.loads(json.dumps(template))


def local_table_name(logical_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    base = logical_id[: -len("Table")] if logical_id.endswith("Table") and logical_id != "Table" else logical_id
    return f"{prefix}-{base.lower()}"


def table_resources(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Logical id -> Properties of every DynamoDB table in the template, in template order."""
    resources = template.get("Resources") or {}
    return {
        logical_id: resource.get("Properties") or {}
        for logical_id, resource in resources.items()
        if isinstance(resource, dict) and resource.get("Type") == TABLE_TYPE
    }


def _environment_blocks(template: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = []
    globals_fn = (template.get("Globals") or {}).get("Function") or {}
    blocks.append(((globals_fn.get("Environment") or {}).get("Variables")) or {})
    for resource in (template.get("Resources") or {}).values():
        if isinstance(resource, dict) and resource.get("Type") in FUNCTION_TYPES:
            props = resource.get("Properties") or {}
            blocks.append(((props.get("Environment") or {}).get("Variables")) or {})
    return blocks


def _ref_target(value: Any) -> str | None:
    if isinstance(value, dict) and set(value) == {"Ref"} and isinstance(value["Ref"], str):
        return value["Ref"]
    return None


def table_env(template: dict[str, Any], prefix: str = DEFAULT_PREFIX) -> dict[str, str]:
    """Env var -> local table name, for every function env var that is ``!Ref <table>``."""
    tables = table_resources(template)
    mapping: dict[str, str] = {}
    for block in _environment_blocks(template):
        for key, value in block.items():
            target = _ref_target(value)
            if target in tables:
                name = local_table_name(target, prefix)
                if mapping.get(key, name) != name:
                    raise TemplateError(f"{key} refers to different tables in different functions")
                mapping[key] = name
    return mapping


def template_env(template: dict[str, Any], prefix: str = DEFAULT_PREFIX) -> dict[str, str]:
    """All Globals.Function environment variables resolvable locally.

    Table references become local table names, parameter references become the parameter's
    default, literal strings and numbers are kept; anything else (e.g. !GetAtt) is skipped.
    """
    tables = table_resources(template)
    parameters = template.get("Parameters") or {}
    globals_fn = (template.get("Globals") or {}).get("Function") or {}
    variables = ((globals_fn.get("Environment") or {}).get("Variables")) or {}
    env: dict[str, str] = {}
    for key, value in variables.items():
        target = _ref_target(value)
        if target in tables:
            env[key] = local_table_name(target, prefix)
        elif target in parameters and "Default" in parameters[target]:
            env[key] = str(parameters[target]["Default"])
        elif isinstance(value, bool):
            env[key] = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            env[key] = str(value)
    return env


def _literal(value: Any, where: str) -> Any:
    """Reject intrinsic functions where the emulator needs a concrete value."""
    if isinstance(value, dict):
        if len(value) == 1 and (next(iter(value)) == "Ref" or next(iter(value)).startswith("Fn::")):
            raise TemplateError(f"{where}: intrinsic function {value} cannot be resolved locally")
        return {k: _literal(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_literal(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def create_table_request(logical_id: str, props: dict[str, Any], prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """Build the CreateTable request for one template table (TTL is a separate call)."""
    where = f"Resources.{logical_id}.Properties"
    for required in ("KeySchema", "AttributeDefinitions"):
        if required not in props:
            raise TemplateError(f"{where}.{required} is missing")
    billing = _literal(props.get("BillingMode", "PROVISIONED"), f"{where}.BillingMode")
    request: dict[str, Any] = {
        "TableName": local_table_name(logical_id, prefix),
        "KeySchema": _literal(props["KeySchema"], f"{where}.KeySchema"),
        "AttributeDefinitions": _literal(props["AttributeDefinitions"], f"{where}.AttributeDefinitions"),
        "BillingMode": billing,
    }
    if billing == "PROVISIONED":
        request["ProvisionedThroughput"] = _literal(
            props.get("ProvisionedThroughput") or {"ReadCapacityUnits": 5, "WriteCapacityUnits": 5},
            f"{where}.ProvisionedThroughput",
        )
    for kind in ("GlobalSecondaryIndexes", "LocalSecondaryIndexes"):
        if props.get(kind):
            indexes = []
            for i, index in enumerate(_literal(props[kind], f"{where}.{kind}")):
                entry = {k: index[k] for k in ("IndexName", "KeySchema", "Projection") if k in index}
                if kind == "GlobalSecondaryIndexes" and billing == "PROVISIONED":
                    entry["ProvisionedThroughput"] = index.get(
                        "ProvisionedThroughput", request["ProvisionedThroughput"]
                    )
                if set(entry) < {"IndexName", "KeySchema", "Projection"}:
                    raise TemplateError(f"{where}.{kind}[{i}] lacks IndexName, KeySchema or Projection")
                indexes.append(entry)
            request[kind] = indexes
    stream = props.get("StreamSpecification")
    if stream:
        spec = _literal(stream, f"{where}.StreamSpecification")
        request["StreamSpecification"] = {"StreamEnabled": True, "StreamViewType": spec["StreamViewType"]}
    return request


def ttl_spec(logical_id: str, props: dict[str, Any]) -> dict[str, Any] | None:
    spec = props.get("TimeToLiveSpecification")
    if not spec:
        return None
    spec = _literal(spec, f"Resources.{logical_id}.Properties.TimeToLiveSpecification")
    return {"AttributeName": spec["AttributeName"], "Enabled": bool(spec.get("Enabled", False))}


def dynamodb_client(endpoint: str | None = None):
    """A boto3 DynamoDB client for the local emulator (refuses to run without an endpoint)."""
    import boto3

    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_DYNAMODB")
    if not endpoint:
        raise TemplateError(
            "no emulator endpoint: pass --endpoint or set AWS_ENDPOINT_URL_DYNAMODB "
            "(refusing to create tables in a real AWS account)"
        )
    return boto3.client(
        "dynamodb",
        endpoint_url=endpoint,
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID") or "local",
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or "local",
    )


def _normalize_indexes(indexes: list[dict[str, Any]] | None) -> dict[str, tuple]:
    return {
        ix["IndexName"]: (
            tuple((k["AttributeName"], k["KeyType"]) for k in ix["KeySchema"]),
            ix["Projection"].get("ProjectionType"),
            tuple(sorted(ix["Projection"].get("NonKeyAttributes", []))),
        )
        for ix in indexes or []
    }


def differences(request: dict[str, Any], ttl: dict[str, Any] | None, described: dict[str, Any],
                described_ttl: dict[str, Any]) -> list[str]:
    """What differs between a template table and the emulator's DescribeTable/DescribeTimeToLive."""
    diffs = []

    def keys(schema):
        return [(k["AttributeName"], k["KeyType"]) for k in schema]

    if keys(request["KeySchema"]) != keys(described["KeySchema"]):
        diffs.append(f"KeySchema {described['KeySchema']} != {request['KeySchema']}")
    want_attrs = {(a["AttributeName"], a["AttributeType"]) for a in request["AttributeDefinitions"]}
    have_attrs = {(a["AttributeName"], a["AttributeType"]) for a in described["AttributeDefinitions"]}
    if want_attrs != have_attrs:
        diffs.append(f"AttributeDefinitions {sorted(have_attrs)} != {sorted(want_attrs)}")
    have_billing = (described.get("BillingModeSummary") or {}).get("BillingMode", "PROVISIONED")
    if have_billing != request["BillingMode"]:
        diffs.append(f"BillingMode {have_billing} != {request['BillingMode']}")
    for kind in ("GlobalSecondaryIndexes", "LocalSecondaryIndexes"):
        want, have = _normalize_indexes(request.get(kind)), _normalize_indexes(described.get(kind))
        if want != have:
            diffs.append(f"{kind} {have} != {want}")
    if ttl is not None:
        status = described_ttl.get("TimeToLiveStatus", "DISABLED")
        enabled = status in ("ENABLED", "ENABLING")
        if enabled != ttl["Enabled"] or (enabled and described_ttl.get("AttributeName") != ttl["AttributeName"]):
            diffs.append(f"TTL {described_ttl} != {ttl}")
    return diffs


def create_tables(client, template: dict[str, Any], prefix: str = DEFAULT_PREFIX,
                  log=lambda msg: print(msg, file=sys.stderr)) -> list[str]:
    """Create every template table that does not exist yet; verify the ones that do.

    Returns the local table names.  Raises TemplateError when an existing table differs.
    """
    names = []
    for logical_id, props in table_resources(template).items():
        request = create_table_request(logical_id, props, prefix)
        ttl = ttl_spec(logical_id, props)
        name = request["TableName"]
        try:
            client.create_table(**request)
            client.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
            log(f"tables: created {name}")
        except client.exceptions.ResourceInUseException:
            log(f"tables: {name} already exists")
        if ttl is not None:
            current = client.describe_time_to_live(TableName=name)["TimeToLiveDescription"]
            enabled = current.get("TimeToLiveStatus") in ("ENABLED", "ENABLING")
            if enabled != ttl["Enabled"]:
                client.update_time_to_live(TableName=name, TimeToLiveSpecification=ttl)
        problems = check_table(client, logical_id, props, prefix)
        if problems:
            raise TemplateError(
                f"table {name} differs from template.yaml ({'; '.join(problems)}); "
                "restart the emulator or delete the table"
            )
        names.append(name)
    return names


def check_table(client, logical_id: str, props: dict[str, Any], prefix: str = DEFAULT_PREFIX) -> list[str]:
    request = create_table_request(logical_id, props, prefix)
    try:
        described = client.describe_table(TableName=request["TableName"])["Table"]
    except client.exceptions.ResourceNotFoundException:
        return ["table does not exist"]
    described_ttl = client.describe_time_to_live(TableName=request["TableName"])["TimeToLiveDescription"]
    return differences(request, ttl_spec(logical_id, props), described, described_ttl)


def format_env(env: dict[str, str]) -> str:
    return "".join(f"{key}={value}\n" for key, value in env.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Create the template's DynamoDB tables in the local emulator.")
    parser.add_argument("command", choices=["create", "check", "env"])
    parser.add_argument("--template", default=str(DEFAULT_TEMPLATE), help="SAM template (default: template.yaml)")
    parser.add_argument("--prefix", default=os.environ.get("GW_TABLE_PREFIX", DEFAULT_PREFIX),
                        help="local table name prefix (default: local)")
    parser.add_argument("--endpoint", help="emulator URL (default: $AWS_ENDPOINT_URL_DYNAMODB)")
    args = parser.parse_args(argv)
    try:
        template = load_template(args.template)
        if args.command == "env":
            sys.stdout.write(format_env(table_env(template, args.prefix)))
            return 0
        client = dynamodb_client(args.endpoint)
        if args.command == "create":
            create_tables(client, template, args.prefix)
            return 0
        failed = False
        for logical_id, props in table_resources(template).items():
            problems = check_table(client, logical_id, props, args.prefix)
            name = local_table_name(logical_id, args.prefix)
            print(f"{name}: {'ok' if not problems else '; '.join(problems)}")
            failed |= bool(problems)
        return 1 if failed else 0
    except TemplateError as exc:
        print(f"tables: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
