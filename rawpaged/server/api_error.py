"""ApiError: what a client receives as {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations


class ApiError(Exception):
    """An error the client receives as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        # NOTE: one line: the message is also the reason in the server's log line.
        message = " ".join(str(message).split("\n")) if message else "error"
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers: dict[str, str] | None = None      # e.g. Connection: close for 408 / 413

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _shown(value) -> str:
    """A client's value as quoted in a message: its repr, cut short."""
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."
