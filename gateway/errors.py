"""The gateway's one table from exception class to HTTP status, and the JSON error response.

The runtime's protocol has the table for what both sides share (bad JSON, validation, 404, 503 ...);
this one adds what only the gateway raises: authentication, the registry's input errors and Redis
being away. A class found in neither table (a plain `ValueError` from a bug included) is an internal
error: a JSON 500 that says nothing of internals, logged with its traceback.
"""

from __future__ import annotations

import logging

from redis.exceptions import RedisError
from starlette.responses import JSONResponse

from kold.gateway.names import InvalidNameError
from kold.gateway.registry import ConflictError, FunctionNotFoundError, InvalidSpecError
from kold.runtime.protocol import APIError, ErrorBody, ErrorResponse, UnavailableError, error_body, status_for

log = logging.getLogger("kold.gateway.errors")


class AuthenticationError(APIError):
    """No API key, or one the registry does not know: 401, which OpenAI's SDK raises as
    AuthenticationError (403 would be PermissionDeniedError, for a valid key that may not do this)."""

    code = "invalid_api_key"


class PermissionDeniedError(APIError):
    """A valid key whose scope does not cover this request: 403 (the SDK's PermissionDeniedError)."""

    code = "insufficient_scope"


# exception class -> (status, OpenAI error type, code); looked up along the MRO before the protocol's table
GATEWAY_ERRORS: dict[type[BaseException], tuple[int, str, str | None]] = {
    AuthenticationError: (401, "authentication_error", "invalid_api_key"),
    PermissionDeniedError: (403, "permission_error", "insufficient_scope"),
    InvalidNameError: (400, "invalid_request_error", "invalid_name"),
    InvalidSpecError: (400, "invalid_request_error", "invalid_value"),
    FunctionNotFoundError: (404, "invalid_request_error", "model_not_found"),
    ConflictError: (409, "invalid_request_error", "conflict"),
    RedisError: (503, "service_unavailable_error", "registry_unavailable"),
}


def _gateway_row(exc: BaseException) -> tuple[int, str, str | None] | None:
    for cls in type(exc).__mro__:
        if cls in GATEWAY_ERRORS:
            return GATEWAY_ERRORS[cls]
    return None


def status_of(exc: BaseException) -> int:
    row = _gateway_row(exc)
    return row[0] if row is not None else status_for(exc)[0]


def error_response(exc: BaseException) -> JSONResponse:
    """`exc` as OpenAI's error body with its status; Retry-After on 503s, WWW-Authenticate on 401s."""
    row = _gateway_row(exc)
    headers: dict[str, str] = {}
    if row is not None:
        status, kind, code = row
        if isinstance(exc, RedisError):
            message = "the function registry (Redis) is unreachable; try again shortly"
            headers["Retry-After"] = "1"
        else:
            message = exc.message if isinstance(exc, APIError) else str(exc)
        param = exc.param if isinstance(exc, APIError) else None
        body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    else:
        status, body = error_body(exc)
        if isinstance(exc, UnavailableError):
            headers["Retry-After"] = str(exc.retry_after)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status >= 500 and not isinstance(exc, APIError | RedisError):
        log.error("internal error: %s", type(exc).__name__, exc_info=exc)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers or None)
