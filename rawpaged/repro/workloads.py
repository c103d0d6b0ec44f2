"""Request streams: the paper's ShareGPT, Alpaca, chatbot and shared-prefix translation workloads.

    lengths = load_lengths("sharegpt", data_dir)         # LengthSource: input/output length pools
    wl = make_workload(lengths, num_requests=500, rate=2.0, seed=0)
    wl.requests[i]: arrival (s), prompt_len, output_len, n, beam_width, prefix_len
    prompt_token_ids(wl, i)                              # deterministic ids below SIM_VOCAB

What each source draws (every length is an OPT token count unless said otherwise):
  sharegpt  inputs: the 1000 real ShareGPT first-turn prompts of sharegpt_prompts_1000.json,
            tokenized with OPT's GPT-2 tokenizer (mean 199); outputs: the real response lengths of
            sharegpt_multiturn_lengths.csv (LLaMA-2 tokens, mean 439; that file has no prompts to
            pair them with). Each pool is scaled to the paper's mean (x 161.31/mean and
            x 337.99/mean, rounded, at least 1 token); a request draws an input and an output
            independently, uniformly, and is redrawn while input + output > max_len (2048).
  alpaca    the first 200 Alpaca records (alpaca_200.json): input = instruction (+ "\\n" + input),
            output = the reference output, both OPT-tokenized (means 19.39 / 49.81), kept as real
            pairs and scaled to the paper's means (19.31 / 58.45); a request draws one pair.
  chatbot   sharegpt_multiturn_lengths.csv as is (LLaMA-2 tokens): the prompt is the last 1024
            tokens of the conversation (min(prefill, 1024)), the output at most 1024 tokens
            (the paper's section 6.5).
  translate WMT16 En-De is not in the shared data: source sentences are drawn lognormal (median
            32 tokens, sigma 0.5, clipped to 4..256) and the German output is 1.2x the source;
            every prompt starts with the same few-shot prefix (80 tokens one-shot, 341 five-shot,
            the paper's figure 16).
Arrivals are a Poisson process: inter-arrival gaps Exp(1)/rate from their own seeded stream, so
the same requests arrive in the same order at every rate (only the time scale changes).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from rawpaged.errors import RawpagedError

PAPER_MEANS = {"sharegpt": (161.31, 337.99), "alpaca": (19.31, 58.45)}
FILES = {
    "sharegpt_prompts": "workloads/sharegpt_prompts_1000.json",
    "sharegpt_lengths": "workloads/sharegpt_multiturn_lengths.csv",
    "alpaca": "workloads/alpaca_200.json",
    "opt_tokenizer": "tokenizers/opt-gpt2/tokenizer.json",
}
CHAT_CONTEXT = 1024
PREFIX_TOKENS = {"one-shot": 80, "five-shot": 341}


@dataclass(frozen=True)
class Request:
    arrival: float
    prompt_len: int              # tokens, prefix included
    output_len: int
    n: int = 1                   # parallel samples
    beam_width: int = 0          # 0: no beam search
    prefix_len: int = 0          # leading tokens shared by every request of the workload


@dataclass
class LengthSource:
    """Pools of input and output lengths, and how they were made."""
    name: str
    inputs: np.ndarray
    outputs: np.ndarray
    paired: bool                 # draw (inputs[i], outputs[i]) together, else independently
    description: str
    prefix_len: int = 0

    def scaled(self, factor: int) -> "LengthSource":
        """Every length divided by `factor` (rounded up): the small-scale real-mode workloads."""
        if factor == 1:
            return self
        div = lambda a: np.maximum(1, -(-a // factor))  # noqa: E731
        return replace(self, inputs=div(self.inputs), outputs=div(self.outputs),
                       prefix_len=-(-self.prefix_len // factor),
                       description=self.description + f"; every length / {factor} (rounded up)")


@dataclass
class Workload:
    name: str
    requests: list[Request]
    rate: float                  # requests/s (inf: all at time 0)
    seed: int
    description: str
    prefix_len: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def mean_input(self) -> float:
        return float(np.mean([r.prompt_len for r in self.requests]))

    @property
    def mean_output(self) -> float:
        return float(np.mean([r.output_len for r in self.requests]))


# -- sources ---------------------------------------------------------------------------------------

def _file(data_dir: Path, key: str) -> Path:
    path = Path(data_dir) / FILES[key]
    if not path.is_file():
        raise RawpagedError(f"workload file not found: {path} (set --data to the shared data folder)")
    return path


def _scale_to_mean(values: np.ndarray, target: float) -> np.ndarray:
    return np.maximum(1, np.rint(values * (target / values.mean()))).astype(np.int64)


def _opt_tokenizer(data_dir: Path):
    import tokenizers
    return tokenizers.Tokenizer.from_file(str(_file(data_dir, "opt_tokenizer")))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RawpagedError(f"cannot read workload file {path}: {e}") from None


def _token_lengths(tok, texts: list[str]) -> np.ndarray:
    return np.array([len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)], dtype=np.int64)


def _multiturn(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    path = _file(data_dir, "sharegpt_lengths")
    try:
        with path.open() as f:
            rows = list(csv.DictReader(f))
        pre = np.array([int(r["num_prefill_tokens"]) for r in rows], dtype=np.int64)
        dec = np.array([int(r["num_decode_tokens"]) for r in rows], dtype=np.int64)
    except (OSError, KeyError, ValueError) as e:
        raise RawpagedError(f"cannot read workload file {path}: {e}") from None
    return pre, dec


def load_lengths(name: str, data_dir: str | Path, prefix: str = "one-shot") -> LengthSource:
    data_dir = Path(data_dir)
    if name == "sharegpt":
        prompts = _read_json(_file(data_dir, "sharegpt_prompts"))
        texts = [c["conversations"][0]["value"] for c in prompts]
        raw_in = _token_lengths(_opt_tokenizer(data_dir), texts)
        _, raw_out = _multiturn(data_dir)
        mi, mo = PAPER_MEANS["sharegpt"]
        return LengthSource(name, _scale_to_mean(raw_in, mi), _scale_to_mean(raw_out, mo), paired=False,
                            description=f"ShareGPT: {len(raw_in)} real prompts (OPT tokens, mean "
                                        f"{raw_in.mean():.1f}) x {mi / raw_in.mean():.3f}; {len(raw_out)} real "
                                        f"response lengths (LLaMA-2 tokens, mean {raw_out.mean():.1f}) x "
                                        f"{mo / raw_out.mean():.3f}; drawn independently")
    if name == "alpaca":
        records = _read_json(_file(data_dir, "alpaca"))
        tok = _opt_tokenizer(data_dir)
        raw_in = _token_lengths(tok, [r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
                                      for r in records])
        raw_out = np.maximum(1, _token_lengths(tok, [r["output"] for r in records]))
        mi, mo = PAPER_MEANS["alpaca"]
        return LengthSource(name, _scale_to_mean(raw_in, mi), _scale_to_mean(raw_out, mo), paired=True,
                            description=f"Alpaca: {len(records)} real (instruction, output) pairs, OPT tokens "
                                        f"(means {raw_in.mean():.2f} / {raw_out.mean():.2f}) x "
                                        f"{mi / raw_in.mean():.3f} / {mo / raw_out.mean():.3f}")
    if name == "chatbot":
        pre, dec = _multiturn(data_dir)
        return LengthSource(name, np.minimum(pre, CHAT_CONTEXT), np.minimum(np.maximum(dec, 1), CHAT_CONTEXT),
                            paired=True, description=f"chatbot: {len(pre)} ShareGPT conversations (LLaMA-2 "
                                                     f"tokens), prompt = last {CHAT_CONTEXT} tokens, output <= "
                                                     f"{CHAT_CONTEXT}")
    if name == "translate":
        if prefix not in PREFIX_TOKENS:
            raise RawpagedError(f"unknown prefix {prefix!r}: choose from {', '.join(PREFIX_TOKENS)}")
        rng = np.random.default_rng(20231023)
        src = np.clip(np.rint(rng.lognormal(math.log(32), 0.5, 4096)), 4, 256).astype(np.int64)
        plen = PREFIX_TOKENS[prefix]
        return LengthSource(f"translate-{prefix}", src + plen, np.rint(src * 1.2).astype(np.int64), paired=True,
                            prefix_len=plen,
                            description=f"translation (synthetic, WMT16 absent): source lognormal median 32 "
                                        f"tokens sigma 0.5 in 4..256, output 1.2x source, {prefix} prefix of "
                                        f"{plen} tokens shared by every prompt")
    raise RawpagedError(f"unknown workload {name!r}: choose from sharegpt, alpaca, chatbot, translate")


# -- streams ---------------------------------------------------------------------------------------

def poisson_arrivals(num: int, rate: float, seed: int) -> np.ndarray:
    """Arrival times of a Poisson process (rate inf: everything at 0)."""
    if rate <= 0:
        raise RawpagedError(f"request rate must be positive, got {rate}")
    if math.isinf(rate):
        return np.zeros(num)
    gaps = np.random.default_rng([seed, 1]).exponential(1.0, num)
    return np.cumsum(gaps) / rate


def make_workload(src: LengthSource, num_requests: int, rate: float, seed: int = 0, *, max_len: int = 2048,
                  n: int = 1, beam_width: int = 0) -> Workload:
    """`num_requests` requests drawn from `src` (see the module docstring), seeded."""
    if num_requests < 1:
        raise RawpagedError(f"num_requests must be at least 1, got {num_requests}")
    if not (src.inputs + (src.outputs if src.paired else src.outputs.min()) <= max_len).any():
        raise RawpagedError(f"no {src.name} request fits in max_len={max_len}")
    rng = np.random.default_rng([seed, 0])
    lengths = []
    while len(lengths) < num_requests:
        i = int(rng.integers(len(src.inputs)))
        o = i if src.paired else int(rng.integers(len(src.outputs)))
        p, out = int(src.inputs[i]), int(src.outputs[o])
        if p + out <= max_len:                      # redraw what the model cannot hold
            lengths.append((p, out))
    arrivals = poisson_arrivals(num_requests, rate, seed)
    reqs = [Request(float(t), p, o, n=n, beam_width=beam_width, prefix_len=src.prefix_len)
            for t, (p, o) in zip(arrivals, lengths)]
    return Workload(src.name, reqs, rate, seed, src.description, prefix_len=src.prefix_len)


def with_rate(wl: Workload, rate: float) -> Workload:
    """The same requests arriving at another rate (common random numbers across a rate sweep)."""
    arrivals = poisson_arrivals(len(wl.requests), rate, wl.seed)
    return replace(wl, rate=rate, requests=[replace(r, arrival=float(t)) for r, t in zip(wl.requests, arrivals)])


def prompt_token_ids(wl: Workload, index: int, vocab: int) -> list[int]:
    """Request `index`'s prompt: the workload's shared prefix, then ids seeded by (seed, index)."""
    r = wl.requests[index]
    prefix = np.random.default_rng([wl.seed, 2]).integers(0, vocab, r.prefix_len)
    rest = np.random.default_rng([wl.seed, 3, index]).integers(0, vocab, r.prompt_len - r.prefix_len)
    return np.concatenate([prefix, rest]).astype(np.int64).tolist()
