"""OpenAI's side of the server: request bodies checked strictly by type, the sampling settings
they ask for, and errors in OpenAI's JSON shape."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from trainlab.chat.config import SamplingConfig
from trainlab.chat.serve.engine import Limits
from trainlab.config import ConfigError


class ApiError(Exception):
    """An error in OpenAI's JSON shape, with its HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# Request bodies, checked strictly by type (pydantic in strict mode): "stream": "false" is
# not a boolean, "n": true and "n": 1.0 are not integers, NaN is no number. Fields OpenAI's
# clients may send that mean nothing here (user, logprobs, ...) are ignored.
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Number = Union[StrictInt, FiniteFloat]


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[StrictStr] = None
    stream: StrictBool = False
    n: StrictInt = 1
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    top_k: Optional[StrictInt] = None
    repetition_penalty: Optional[Number] = None
    seed: Optional[StrictInt] = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    stop_at: Optional[StrictStr] = None


class CompletionRequest(Request):
    prompt: Union[StrictStr, list[StrictStr]] = ""


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatRequest(Request):
    messages: list[Message]


def parse_request(body: dict, chat: bool) -> Request:
    """The body as a request, or a 400 in OpenAI's shape naming the first field that is wrong."""
    try:
        return (ChatRequest if chat else CompletionRequest).model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ())]
        # a union names each of its branches in the location: the field is what matters
        field = loc[0] if loc else None
        where = ".".join(x for x in loc if not x[:1].isupper() and "[" not in x) or field or "body"
        raise ApiError(400, f"{where}: {err.get('msg', 'invalid')}", param=field) from None


def sampling_from(req: Request, limits: Limits, stop_at: str) -> tuple[SamplingConfig, list[str]]:
    """The request's sampling settings (OpenAI's names, plus top_k, repetition_penalty and
    stop_at), each checked as the CLI flag of the same meaning is."""
    if req.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    max_tokens = 256 if req.max_tokens is None else req.max_tokens
    if max_tokens < 1 or max_tokens > limits.max_tokens_cap:
        raise ApiError(400, f"max_tokens must be 1..{limits.max_tokens_cap}", param="max_tokens")
    stops = req.stop or []
    stops = [stops] if isinstance(stops, str) else stops
    if len(stops) > 4 or not all(stops):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
    values = {"temperature": 0.8 if req.temperature is None else float(req.temperature),
              "top_p": 1.0 if req.top_p is None else float(req.top_p), "top_k": req.top_k or 0,
              "repetition_penalty": 1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
              "max_new_tokens": max_tokens, "stop_at": req.stop_at or stop_at, "seed": req.seed}
    try:
        return SamplingConfig(**values), stops
    except ConfigError as e:
        raise ApiError(400, str(e), param=e.field) from None
