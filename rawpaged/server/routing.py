"""Which engine replica serves a request (Ray Serve replicas, rawpaged/server/ray_serve.py).

Two policies, as Ray Serve LLM offers them:
  least-loaded  the replica with the fewest requests in flight (Serve probes or caches each
                replica's queue length);
  prefix        the replica that last served the longest prefix of this prompt, so a shared
                prefix (a system prompt, a few-shot header, a conversation's history) lands where
                its KV blocks are already cached (the engine's prefix cache); the least-loaded one
                when no replica has seen it, or when the one that has is `imbalance` requests
                busier than the least-loaded one.

`PrefixTable` is the policy's memory, pure Python: the prompt's text is cut into CHUNK-character
pieces hashed as a chain (each hash covers the whole prefix up to its piece, as the engine's block
hashes do), and each hash remembers the replica it was last routed to (least recently used hashes
are forgotten past `capacity`). `ray_serve.PrefixAffinityRouter` plugs it into Ray Serve's
RequestRouter; it lives in the process holding the handle (the OpenAI ingress), which sees every
request.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Iterable

CHUNK = 64                  # characters per hashed piece (about one 16-token KV block of English)
CAPACITY = 100_000          # hashes remembered
ROUTINGS = ("prefix", "least-loaded")


def prefix_hashes(text: str, chunk: int = CHUNK) -> list[bytes]:
    """Chained hashes of text's whole chunks: hash i covers text[:(i + 1) * chunk]."""
    out, h = [], b""
    for i in range(len(text) // chunk):
        h = hashlib.blake2b(h + text[i * chunk:(i + 1) * chunk].encode("utf-8", "surrogatepass"),
                            digest_size=16).digest()
        out.append(h)
    return out


class PrefixTable:
    def __init__(self, capacity: int = CAPACITY, chunk: int = CHUNK):
        self.capacity, self.chunk = capacity, chunk
        self.owner: OrderedDict[bytes, Any] = OrderedDict()       # hash -> replica, least recent first

    def match(self, text: str, replicas: Iterable) -> tuple[Any | None, int]:
        """(the live replica holding the longest prefix of text, how many chunks it holds)."""
        live = set(replicas)
        best, n = None, 0
        for i, h in enumerate(prefix_hashes(text, self.chunk)):
            r = self.owner.get(h)
            if r is None:
                break
            if r in live:
                best, n = r, i + 1
        return best, n

    def record(self, text: str, replica) -> None:
        for h in prefix_hashes(text, self.chunk):
            self.owner[h] = replica
            self.owner.move_to_end(h)
        while len(self.owner) > self.capacity:
            self.owner.popitem(last=False)

    def forget(self, replica) -> None:
        for h in [h for h, r in self.owner.items() if r == replica]:
            del self.owner[h]


def route_text(body: Any) -> str | None:
    """The text a request's prefix is matched on: the completion prompt (the first one of a list),
    or the chat messages' contents in order. None: nothing to match (least-loaded)."""
    if not isinstance(body, dict):
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                             # a batch of prompts: the first one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):                       # token ids
        return " ".join(map(str, prompt[:4096]))
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if isinstance(content, str):
                parts.append(f"{m.get('role', '')}:{content}\n")
        return "".join(parts) or None
    return None
