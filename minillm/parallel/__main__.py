"""Chat with the embedded model split over several processes.

    python -m minillm.parallel --tp 2 "What is tensor parallelism?"      # spawns the workers itself
    torchrun --nproc-per-node 2 -m minillm.parallel "What is ...?"        # one rank per torchrun process

Under torchrun every process runs this same script: ``LLM(...)`` on ranks > 0 serves rank 0's steps and returns
once rank 0 closes its LLM, so only the driver (``llm.is_driver``) generates and prints.
"""

from __future__ import annotations

import argparse
import os

import minillm


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minillm.parallel", description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", nargs="*", default=["What is tensor parallelism? Answer in one sentence."])
    parser.add_argument("--tp", type=int, default=int(os.environ.get("WORLD_SIZE", 2)), help="tensor parallel size")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    llm = minillm.LLM(args.model, tensor_parallel_size=args.tp)
    if not llm.is_driver:
        return
    with llm:
        chats = [[{"role": "user", "content": p}] for p in args.prompts]
        for prompt, out in zip(args.prompts, llm.generate(chats, minillm.SamplingParams(max_tokens=args.max_tokens))):
            print(f"> {prompt}\n{out.text.strip()}\n")
        tp = llm.stats()["tensor_parallel"]
        comm = tp["communication"]
        print(f"{tp['world_size']} ranks ({tp['backend']}): {comm['all_reduce_calls']} all-reduces, "
              f"{comm['all_gather_calls']} all-gathers, {comm['seconds']:.2f} s in collectives on rank 0")


if __name__ == "__main__":
    main()
