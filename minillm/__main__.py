"""Command line: ``python -m minillm generate|chat|serve|bench|course|doctor``.

    python -m minillm generate "What is the capital of France?"     # one answer, with tokens/s
    python -m minillm chat                                          # streaming chat in the terminal (lectures)
    python -m minillm serve --port 8000                             # an OpenAI-compatible server (minillm/serve)
    python -m minillm chat --server http://127.0.0.1:8000           # the chat, through that server
    python -m minillm bench attention                               # benchmarks (see minillm/bench)
    python -m minillm course build                                  # solutions/ -> exercises/
    python -m minillm doctor                                        # what this machine offers
"""

from __future__ import annotations

import argparse
import sys
import time


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="embedded name, .gguf file, HF folder or hub id")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: per device)")
    parser.add_argument("--kv-cache", default="paged", choices=["none", "contiguous", "paged"])
    parser.add_argument("--quantization", default=None, help="int8, int4 or int4-awq")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def _build(args):
    import minillm

    llm = minillm.LLM(args.model, device=args.device, dtype=args.dtype, kv_cache=args.kv_cache,
                      quantization=args.quantization)
    params = minillm.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p, seed=args.seed)
    return llm, params


def generate(args) -> None:
    llm, params = _build(args)
    prompt = [{"role": "user", "content": args.prompt}] if not args.raw else args.prompt
    print(f"{args.model} on {llm.device} ({str(llm.dtype).removeprefix('torch.')}), kv_cache={llm.kv_cache}")
    seq = llm.add_request(prompt, params)[0]
    start = time.perf_counter()
    while not seq.is_finished:  # LLM.stream does the same; here we also want the token count
        before = len(seq.text)
        llm.engine.step()
        print(seq.text[before:], end="", flush=True)
    elapsed = time.perf_counter() - start
    num_tokens = len(seq.output_token_ids)
    print(f"\n\n[{num_tokens} tokens in {elapsed:.2f} s: {num_tokens / elapsed:.1f} tokens/s, "
          f"time to first token {seq.first_token_time - seq.arrival_time:.2f} s]")


def chat(args) -> None:
    from minillm.serve.chat import LocalChat, RemoteChat, chat_loop

    if args.server:
        backend = RemoteChat(args.server, args.max_tokens, args.temperature, args.seed)
    else:
        llm, params = _build(args)
        backend = LocalChat(llm, params, args.model)
    chat_loop(backend)


def serve(args) -> None:
    from minillm.serve.app import serve as run_server

    llm, _ = _build(args)
    print(f"serving {args.model} on {llm.device} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    run_server(llm, args.served_model_name or args.model, host=args.host, port=args.port,
               max_pending_requests=args.max_pending_requests, default_max_tokens=args.max_tokens)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from minillm.bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "course":
        from minillm.course import main as course_main

        return course_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m minillm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate an answer to one prompt, streaming")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    _engine_args(gen)
    chat_parser = sub.add_parser("chat", help="interactive streaming chat")
    _engine_args(chat_parser)
    chat_parser.add_argument("--server", default=None, help="talk to a running `minillm serve` at this URL instead")
    server = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (FastAPI + uvicorn)")
    _engine_args(server)
    server.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    server.add_argument("--max-pending-requests", type=int, default=256,
                        help="requests in flight before new ones get 429 (a bounded queue)")
    sub.add_parser("bench", help="benchmarks: python -m minillm bench --help")
    sub.add_parser("course", help="course tooling: python -m minillm course --help")
    sub.add_parser("doctor", help="print what this machine offers minillm")
    args = parser.parse_args(argv)
    if args.command == "generate":
        generate(args)
    elif args.command == "chat":
        chat(args)
    elif args.command == "serve":
        serve(args)
    elif args.command == "doctor":
        import minillm

        minillm.doctor()


if __name__ == "__main__":
    sys.exit(main())
