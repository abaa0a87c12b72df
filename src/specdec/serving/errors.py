"""Every failure answered as an OpenAI error body, ``{"error": {"message", "type", "param", "code"}}``.

Invalid request fields answer 400 (OpenAI's status), not FastAPI's 422 with its own body; an
unknown route or method keeps its status (404, 405) in the same shape; anything unexpected is a
500 ``server_error``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from specdec.serving.protocol import APIError


def from_validation_error(exc: RequestValidationError) -> APIError:
    """The first invalid field as a 400, ``param`` naming its top-level field as OpenAI does."""
    err: dict[str, Any] = exc.errors()[0]
    loc = [str(part) for part in err.get("loc", ())]
    if loc[:1] == ["body"]:
        loc = loc[1:]
    if err.get("type") == "json_invalid":
        reason = err.get("ctx", {}).get("error") or err.get("msg", "")
        return APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json")
    if not loc or loc[0].isdigit():  # no body, or a body that is not an object
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    where = ".".join(loc)
    return APIError(400, f"invalid value for '{where}': {err.get('msg')}", param=loc[0], code="invalid_value")


def from_http_exception(exc: HTTPException) -> APIError:
    """Starlette's errors (unknown route, wrong method, unreadable body) in OpenAI's shape."""
    if exc.status_code == 400:  # FastAPI could not read the body (bytes that are no text)
        return APIError(400, f"the request body is not valid JSON: {exc.detail}", code="invalid_json")
    kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    return APIError(exc.status_code, str(exc.detail), type=kind)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that keep every error in OpenAI's shape."""

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return JSONResponse(exc.body(), status_code=exc.status)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return await api_error(request, from_validation_error(exc))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        error = from_http_exception(exc)
        return JSONResponse(error.body(), status_code=error.status, headers=exc.headers)

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return await api_error(request, APIError(500, f"internal error: {exc}", type="server_error"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
