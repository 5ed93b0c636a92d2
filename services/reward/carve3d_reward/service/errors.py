"""The service's error answer: every non-200 is JSON ``{"error", "detail", "request_id"}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from ..errors import InvalidInputError


class APIError(Exception):
    """An answer other than 200, with a machine-readable code and a sentence for people."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}

    @classmethod
    def from_input_error(cls, exc: InvalidInputError) -> APIError:
        """A grid that cannot be used, as the whole request's answer (400, 413 or 415 by its type)."""
        return cls(exc.status, exc.code, str(exc))


def error_body(code: str, detail: str, request_id: str) -> dict[str, str]:
    return {"error": code, "detail": detail, "request_id": request_id}


def error_response(
    status: int, code: str, detail: str, request_id: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        error_body(code, detail, request_id),
        status_code=status,
        headers={**(headers or {}), "X-Request-Id": request_id},
    )
