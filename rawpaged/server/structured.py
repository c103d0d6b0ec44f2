"""The request fields that ask for structured output -> one StructuredOutputsParams.

  response_format   OpenAI's: {"type": "text"} (no constraint), {"type": "json_object"}, or
                    {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}
  guided_json, guided_regex, guided_choice, guided_grammar (+ guided_whitespace_pattern)
                    vLLM's extra parameters (extra_body with the openai client)
  structured_outputs
                    vLLM's newer form: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}

At most one of them may ask for a constraint (400 naming the second). The constraint's own checks
(a schema, regex or grammar the grammar engine refuses) are SamplingParams' validator's; its error is
renamed here to the field the client sent (`Constraint.rename`).
"""
from __future__ import annotations

from dataclasses import dataclass

from rawpaged.sampling_params import StructuredOutputsParams
from rawpaged.server.api_error import ApiError, _shown, bad_request

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# vLLM's guided_decoding_backend values that ask for what this server does anyway (no effect).
BACKENDS = ("auto", "guidance", "llguidance")


@dataclass
class Constraint:
    params: StructuredOutputsParams
    param: str            # the request field it came from (the error's `param`)
    label: str            # how a message names the constraint, e.g. "response_format.json_schema.schema"

    def rename(self, message: str) -> str:
        """SamplingParams' message ("structured_outputs.json is not valid: ...") in the client's terms."""
        prefix = f"structured_outputs.{self.params.kind}"
        return self.label + message[len(prefix):] if message.startswith(prefix) else message


def from_body(body: dict) -> Constraint | None:
    """The request's structured-output constraint, or None; 400 for a malformed or second one."""
    found = [c for c in (_response_format(body), *_guided(body), _structured_outputs(body)) if c is not None]
    if len(found) > 1:
        raise bad_request(f"{found[1].param} cannot be combined with {found[0].param}: ask for one "
                          "structured output", found[1].param)
    constraint = found[0] if found else None
    pattern = body.get("guided_whitespace_pattern")
    if pattern is not None:
        if constraint is None or constraint.params.kind not in ("json", "json_object"):
            raise bad_request("guided_whitespace_pattern applies to JSON output only (guided_json, "
                              "response_format)", "guided_whitespace_pattern")
        constraint.params.whitespace_pattern = pattern
    return constraint


def _response_format(body: dict) -> Constraint | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_request(f"response_format must be an object, got {_shown(fmt)}", "response_format")
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return Constraint(StructuredOutputsParams(json_object=True), "response_format", "response_format")
    if kind != "json_schema":
        raise bad_request(f"response_format.type must be 'text', 'json_object' or 'json_schema', got "
                          f"{_shown(kind)}", "response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("response_format.json_schema must be an object {\"name\", \"schema\", \"strict\"}",
                          "response_format")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request(f"response_format.json_schema.strict must be true or false, got {_shown(strict)}",
                          "response_format")
    schema = spec.get("schema")
    if schema is None:            # NOTE: OpenAI's schema is optional: then any JSON object
        return Constraint(StructuredOutputsParams(json_object=True), "response_format", "response_format")
    return Constraint(StructuredOutputsParams(json=schema, strict=bool(strict)), "response_format",
                      "response_format.json_schema.schema")


def _guided(body: dict) -> list[Constraint | None]:
    backend = body.get("guided_decoding_backend")
    if backend is not None and backend not in BACKENDS:
        raise bad_request(f"guided_decoding_backend {_shown(backend)} is not available: this server's "
                          f"grammar engine is llguidance ({', '.join(map(repr, BACKENDS))} are accepted)",
                          "guided_decoding_backend")
    out = []
    for name, kind in GUIDED.items():
        value = body.get(name)
        if value is not None:
            out.append(Constraint(StructuredOutputsParams(**{kind: value}), name, name))
    return out


def _structured_outputs(body: dict) -> Constraint | None:
    value = body.get("structured_outputs")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request(f"structured_outputs must be an object, got {_shown(value)}", "structured_outputs")
    fields = {k: v for k, v in value.items() if v is not None and v is not False}
    known = set(StructuredOutputsParams.__dataclass_fields__) - {"compiled"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise bad_request(f"structured_outputs has field(s) this server does not take: "
                          f"{', '.join(map(_shown, unknown))}", "structured_outputs")
    try:
        so = StructuredOutputsParams(**fields)
    except TypeError as e:                      # pragma: no cover - fields are checked above
        raise ApiError(400, str(e), param="structured_outputs") from None
    return Constraint(so, "structured_outputs", "structured_outputs")
