"""Schemathesis hooks of the reliability suite (tests/tests/schemathesis.rs loads this module).

`cargo lambda watch` cannot turn a request whose `application/json` body is not UTF-8 into a
Lambda event: it answers its own 500 without calling the function (a real function URL passes
such a body on base64-encoded). Those cases are skipped here; the functions' answer to them
(400 invalid_json) is tested on the routers in process (functions/*/tests/hardening.rs) and
through watch with a `+json` media type (tests/tests/hostile_input.rs).
"""

import schemathesis


def _is_utf8(value):
    if isinstance(value, (bytes, bytearray)):
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return False
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
    return True


@schemathesis.hook
def filter_body(ctx, body):
    return _is_utf8(body)


@schemathesis.hook
def filter_query(ctx, query):
    # A generated "invalid" value that has no query-string form (an object, a list, null) is
    # dropped by the HTTP client, so the request that goes out is valid and its acceptance is
    # no finding.
    if not query:
        return True
    return all(isinstance(value, (str, int, float, bool)) for value in query.values())
