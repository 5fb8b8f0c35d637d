"""Schemathesis hooks (loaded through SCHEMATHESIS_HOOKS by tests/test_schemathesis.py)."""

import schemathesis


@schemathesis.hook
def filter_body(ctx, body) -> bool:
    """In a multipart form, a field given as an empty list is not sent at all, and a one-item list is
    sent as that item: the server cannot tell either from a valid form, so such "invalid" cases prove
    nothing. Lists of two or more are sent as repeated fields, which the server refuses, and stay."""
    if not isinstance(body, dict):
        return True
    return not any(isinstance(value, list) and len(value) < 2 for value in body.values())
