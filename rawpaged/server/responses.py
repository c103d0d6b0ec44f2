"""RequestOutputs -> OpenAI response bodies, stream chunks, usage and logprobs.

Completions:  {"object": "text_completion", "choices": [{"index", "text", "logprobs", "finish_reason"}], ...}
              logprobs = {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
Chat:         {"object": "chat.completion", "choices": [{"index", "message", "logprobs", "finish_reason"}]}
              logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}
Chunks carry the same choices with a `text` (completions) or a `delta` (chat) instead.
"""
from __future__ import annotations

import json

# NOTE: JSON has no -Infinity; a logprob of -inf (a token masked out) is sent as this, as vLLM does.
MIN_LOGPROB = -9999.0


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _lp(v: float | None) -> float | None:
    return None if v is None else max(float(v), MIN_LOGPROB)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenText:
    """The text of one token as it reads in context.

    NOTE: decoding a token alone is wrong for SentencePiece (the decoder strips a leading space
    from the first token) and for byte pieces; decoding it after a few tokens of left context and
    taking the difference gives the text it adds where it stands.
    """

    CONTEXT = 4

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def pieces(self, context: list[int], ids: list[int]) -> list[str]:
        """The text each of `ids` adds after `context` (and the ids before it)."""
        out, ctx = [], list(context[-self.CONTEXT:])
        for tid in ids:
            out.append(self.piece(ctx, tid))
            ctx = (ctx + [tid])[-self.CONTEXT:]
        return out

    def piece(self, context: list[int], tid: int) -> str:
        ctx = list(context[-self.CONTEXT:])
        before, full = self._decode(ctx), self._decode(ctx + [tid])
        return full[len(before):] if full.startswith(before) else self._decode([tid])


def _ranked(lps: dict[int, float], limit: int | None = None) -> list[tuple[int, float]]:
    items = sorted(lps.items(), key=lambda kv: kv[1], reverse=True)
    return items if limit is None else items[:limit]


# -- completions ------------------------------------------------------------------------------
def completion_logprobs(tt: TokenText, context: list[int], token_ids: list[int], logprobs: list | None,
                        offset: int) -> dict:
    """OpenAI's legacy logprobs for `token_ids` (generated after `context`), text offsets from `offset`.

    `logprobs[i]` is the engine's {token id: logprob} for token i: the chosen token plus the top-N
    asked for (all of them are reported, best first, as vLLM does), or None (no logprob known:
    the first prompt token).
    """
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    ctx = list(context)
    logprobs = logprobs or []
    for i, tid in enumerate(token_ids):
        lps = logprobs[i] if i < len(logprobs) else None
        piece = tt.piece(ctx, tid)
        out["tokens"].append(piece)
        out["token_logprobs"].append(_lp(lps.get(tid)) if lps else None)
        out["top_logprobs"].append({tt.piece(ctx, a): _lp(v) for a, v in _ranked(lps)} if lps else None)
        out["text_offset"].append(offset)
        offset += len(piece)
        ctx = (ctx + [tid])[-TokenText.CONTEXT:]
    return out


def merge_logprobs(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None,
                      stop_reason=None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def completion_body(rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": use}


def completion_chunk(rid: str, created: int, model: str, choice: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


# -- chat -------------------------------------------------------------------------------------
def chat_logprobs(tt: TokenText, context: list[int], token_ids: list[int], logprobs: list | None,
                  top: int) -> dict:
    content = []
    ctx = list(context)
    logprobs = logprobs or []
    for i, tid in enumerate(token_ids):
        lps = logprobs[i] if i < len(logprobs) else {}
        piece = tt.piece(ctx, tid)
        content.append({"token": piece, "logprob": _lp(lps.get(tid)), "bytes": list(piece.encode("utf-8")),
                        "top_logprobs": [{"token": p, "logprob": _lp(v), "bytes": list(p.encode("utf-8"))}
                                         for a, v in _ranked(lps, top) for p in (tt.piece(ctx, a),)]})
        ctx = (ctx + [tid])[-TokenText.CONTEXT:]
    return {"content": content}


def chat_choice(index: int, text: str | None, logprobs: dict | None, finish_reason: str | None, stop_reason=None,
                tool_calls: list[dict] | None = None) -> dict:
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls        # [{"id", "type": "function", "function": {"name", "arguments"}}]
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def chat_body(rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": use}


def chat_chunk(rid: str, created: int, model: str, choices: list[dict], use: dict | None = None) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


def chat_delta_choice(index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None,
                      stop_reason=None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}
