"""The `rawpaged` command: generate, convert, serve, repro.

Errors a user can cause print one line (`rawpaged: error: ...`) and exit non-zero, no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

import rawpaged
from rawpaged.engine.config import EngineConfig
from rawpaged.errors import RawpagedError
from rawpaged.hub import use_demo_model_if_unset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rawpaged", description="PagedAttention LLM serving without PyTorch")
    parser.add_argument("--version", action="version", version=f"rawpaged {rawpaged.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt")
    EngineConfig.add_cli_args(gen)
    gen.add_argument("prompt", nargs="*", help="prompt text (several prompts run as one batch); none: BOS only")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")

    conv = sub.add_parser("convert", help="convert checkpoints into rawpaged-ready Hugging Face directories")
    csub = conv.add_subparsers(dest="format", required=True)
    l2c = csub.add_parser("llama2c", help="llama2.c checkpoint (.bin) + tokenizer.bin")
    l2c.add_argument("checkpoint")
    l2c.add_argument("--tokenizer", required=True)
    l2c.add_argument("-o", "--output", required=True)
    l2c.add_argument("--force", action="store_true", help="replace an existing output directory")
    hf = csub.add_parser("hf", help="Hugging Face directory with PyTorch .bin or safetensors weights")
    hf.add_argument("source")
    hf.add_argument("-o", "--output", required=True)
    hf.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    hf.add_argument("--max-shard-size", default="2GB")
    hf.add_argument("--force", action="store_true", help="replace an existing output directory")
    hf.add_argument("--quiet", action="store_true", help="no progress bar")
    hf.add_argument("--max-expansion", type=float, default=None, metavar="N",
                    help="refuse output larger than N times the source weight files (default 4): "
                         "expanded views can make a tiny file describe gigabytes")

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    srv.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                     help="the model to serve (as --model; vllm serve's form)")
    EngineConfig.add_cli_args(srv)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None)
    srv.add_argument("--served-model-name", default=None)
    srv.add_argument("--chat-template", default=None,
                     help="Jinja chat template: a file, or the template text itself")
    srv.add_argument("--log-level", default="info")
    srv.add_argument("--log-format", default="text", choices=["text", "json"],
                     help="json: one JSON object per line, for log shippers")
    srv.add_argument("--log-stats-interval", type=float, default=5.0, metavar="S",
                     help="seconds between engine log lines while busy (0: none)")
    srv.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                     help="at SIGTERM, seconds the requests in flight get to finish")
    dp = srv.add_argument_group("replicas on Ray Serve (docs/distributed.md)")
    dp.add_argument("--ray", action="store_true",
                    help="serve through Ray Serve (RAY_ADDRESS's cluster, or a local one): one OpenAI endpoint "
                         "in front of --data-parallel-size engine replicas")
    dp.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="N",
                    help="engine replicas (each a whole engine, tensor-parallel or not); needs --ray")
    dp.add_argument("--routing", default="prefix", choices=["prefix", "least-loaded"],
                    help="which replica takes a request: the one that served the longest prefix of its "
                         "prompt (its KV is cached there), else the least loaded; or always the least loaded")
    lim = srv.add_argument_group("limits (docs/server.md)")
    lim.add_argument("--max-body-bytes", type=int, default=None, help="request body size (default 16 MiB): 413")
    lim.add_argument("--max-prompt-chars", type=int, default=None,
                     help="characters per prompt, checked before tokenizing (default 32 x max_model_len)")
    lim.add_argument("--body-timeout", type=float, default=None, metavar="S",
                     help="seconds for a request body to arrive (default 60): 408")
    lim.add_argument("--header-timeout", type=float, default=None, metavar="S",
                     help="seconds for a request's headers to arrive (default 10): connection closed")
    lim.add_argument("--timeout-keep-alive", type=int, default=None, metavar="S",
                     help="seconds an idle keep-alive connection stays open (default 5)")
    lim.add_argument("--max-header-bytes", type=int, default=None, help="request head size (default 16 KiB): 400")
    lim.add_argument("--limit-concurrency", type=int, default=None,
                     help="connections + requests before new requests get 503 (default: from the open-file limit)")

    rep = sub.add_parser("repro", help="re-run the PagedAttention paper's experiments (simulated and real), "
                                       "write CSVs, PNGs and REPORT.md")
    from rawpaged.repro.cli import add_arguments as add_repro_arguments
    add_repro_arguments(rep)
    return parser


def cmd_generate(a: argparse.Namespace) -> int:
    import logging

    from rawpaged import LLM, SamplingParams

    logging.basicConfig(level=logging.INFO, format="rawpaged: %(message)s")

    try:
        params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                                top_k=a.top_k, n=a.n, seed=a.seed, ignore_eos=a.ignore_eos, stop=a.stop)
    except ValueError as e:
        raise RawpagedError(str(e)) from None
    llm = LLM(**vars(EngineConfig.from_cli_args(a)))
    if a.prompt:
        outs = llm.generate(a.prompt, params)
    else:
        bos = llm.tokenizer.bos_token_id
        if bos is None:
            raise RawpagedError("no prompt given and the tokenizer has no BOS token to start from")
        outs = llm.generate(None, params, prompt_token_ids=[[bos]])
    status = 0
    for out in outs:
        if out.error:
            print(f"rawpaged: error: {out.error}", file=sys.stderr)
            status = 1
            continue
        if a.json:
            print(json.dumps({"prompt": out.prompt, "prompt_token_ids": out.prompt_token_ids,
                              "outputs": [{"text": o.text, "token_ids": o.token_ids,
                                           "finish_reason": o.finish_reason} for o in out.outputs]}))
        else:
            for o in out.outputs:
                print((out.prompt or "") + o.text)
    return status


def cmd_convert(a: argparse.Namespace) -> int:
    if a.format == "llama2c":
        from rawpaged.convert.llama2c import convert_llama2c
        out = convert_llama2c(a.checkpoint, a.tokenizer, a.output, force=a.force)
    else:
        from rawpaged.convert.hf import convert_hf
        out = convert_hf(a.source, a.output, dtype=a.dtype, max_shard_size=a.max_shard_size,
                         force=a.force, progress=not a.quiet, max_expansion=a.max_expansion)
    print(f"wrote {out}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    if a.data_parallel_size < 1:
        raise RawpagedError(f"--data-parallel-size must be at least 1, got {a.data_parallel_size}")
    if a.data_parallel_size > 1 and not a.ray:
        raise RawpagedError("--data-parallel-size > 1 runs replicas on Ray Serve: add --ray")
    try:
        if a.ray:
            from rawpaged.server.ray_serve import run_ray_serve as run
        else:
            from rawpaged.server.app import run_server as run
    except ImportError as e:
        extra = "ray" if a.ray else "server"
        raise RawpagedError(f"this needs the '{extra}' extra (pip install 'rawpaged[{extra}]'): {e}") from None
    return run(a)


def cmd_repro(a: argparse.Namespace) -> int:
    from rawpaged.repro.cli import run
    return run(a)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "model_tag", None) is not None:       # `rawpaged serve MODEL`
            if args.model is not None and args.model != args.model_tag:
                raise RawpagedError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
            args.model = args.model_tag
        use_demo_model_if_unset(args)    # hub.py: no --model means the packaged demo model, said on stderr
        return {"generate": cmd_generate, "convert": cmd_convert, "serve": cmd_serve,
                "repro": cmd_repro}[args.command](args)
    except RawpagedError as e:
        print(f"rawpaged: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
