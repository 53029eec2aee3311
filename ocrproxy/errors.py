"""Errors the proxy makes itself, each knowing its HTTP status and OpenAI error shape.

The tree is deliberately shallow::

    ProxyError                      500 server_error
    ├── BadRequest                  400 invalid_request_error (code: invalid_path for a
    │   │                               non-canonical path, invalid_header for a non-ASCII
    │   │                               Authorization)
    │   └── InvalidImage            400 invalid_request_error / invalid_image
    ├── Unauthorized                401 invalid_request_error / invalid_api_key
    ├── NotFound                    404 invalid_request_error
    ├── MethodNotAllowed            405 invalid_request_error
    ├── BodyTimeout                 408 invalid_request_error / body_timeout
    ├── PayloadTooLarge             413 invalid_request_error / payload_too_large
    ├── Overloaded                  503 server_error / overloaded (+ Retry-After)
    ├── UpstreamError               502 upstream_error / bad_gateway
    │   └── UpstreamTimeout         504 upstream_error / gateway_timeout
    └── OcrFailed                   502 upstream_error / ocr_failed

Errors relayed from an upstream are never wrapped: their status and body reach the client as
they were sent. Only what the proxy decides itself is rendered from this tree: as
``{"error": {"message", "type", "param", "code"}}`` here, or in another dialect's shape by
that dialect (``Dialect.error_body``: Anthropic's ``{"type": "error", "error": {...}}``).
"""

from __future__ import annotations

import orjson
from aiohttp import web


class ProxyError(Exception):
    """Base of every error the proxy renders itself."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, dict[str, str | None]]:
        """The OpenAI-shaped error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.body())

    def to_response(
        self, headers: dict[str, str] | None = None, body: bytes | None = None
    ) -> web.Response:
        """The error as a response: OpenAI's shape, or ``body`` (another dialect's)."""
        return web.Response(
            status=self.status,
            body=self.to_bytes() if body is None else body,
            content_type="application/json",
            headers=headers,
        )


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class InvalidImage(BadRequest):
    code = "invalid_image"


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class BodyTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "body_timeout"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Overloaded(ProxyError):
    """The process holds as many request bytes as it may: the client should retry shortly."""

    status = 503
    code = "overloaded"
    retry_after_s = 1

    def to_response(
        self, headers: dict[str, str] | None = None, body: bytes | None = None
    ) -> web.Response:
        retry = {"Retry-After": str(self.retry_after_s), **(headers or {})}
        return super().to_response(retry, body)


class UpstreamError(ProxyError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "gateway_timeout"


class OcrFailed(ProxyError):
    status = 502
    type = "upstream_error"
    code = "ocr_failed"
