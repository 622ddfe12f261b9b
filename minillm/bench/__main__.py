"""``python -m minillm.bench <topic> [args]``: run one benchmark, or ``all`` of them.

A topic is a module ``minillm/bench/<topic>.py`` that defines ``main(argv: list[str]) -> None``; it is found here
without being registered. Every topic accepts at least ``--out DIR`` and ``--device`` (see
``common.make_parser``) and writes ``<topic>-<device>.json`` and ``.png`` into ``benchmarks/results/``, so
``all --out DIR`` passes the same arguments to each topic in course order.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import traceback
from types import ModuleType

import minillm.bench

# Course order for `all` and `--help`; topics not listed here follow in alphabetical order.
COURSE_ORDER = ("roofline", "attention", "kvcache", "paged", "engine", "quant", "prune", "distill", "spec", "serve")
NOT_TOPICS = {"common"}


def find_topics() -> dict[str, ModuleType | Exception]:
    """Benchmark modules in course order: name -> module defining main(argv), or the error its import raised.

    A module that imports but has no `main` is a helper, not a topic, and is left out. A module that fails to
    import stays in, with its error, so that one broken benchmark is reported instead of hiding all the others.
    """
    names = [
        m.name
        for m in pkgutil.iter_modules(minillm.bench.__path__)
        if not m.name.startswith("_") and m.name not in NOT_TOPICS
    ]
    names.sort(key=lambda n: (COURSE_ORDER.index(n) if n in COURSE_ORDER else len(COURSE_ORDER), n))
    topics: dict[str, ModuleType | Exception] = {}
    for name in names:
        try:
            module = importlib.import_module(f"minillm.bench.{name}")
        except Exception as e:  # any import-time error: report it per topic (see docstring)
            topics[name] = e
            continue
        if callable(getattr(module, "main", None)):
            topics[name] = module
    return topics


def usage(topics: dict[str, ModuleType | Exception]) -> str:
    lines = ["usage: python -m minillm.bench <topic> [--out DIR] [--device DEVICE] [topic options]", "", "topics:"]
    for name, topic in topics.items():
        if isinstance(topic, Exception):
            summary = f"(cannot import: {type(topic).__name__}: {topic})"
        else:
            summary = ((topic.__doc__ or "").strip().splitlines() or [""])[0]
        lines.append(f"  {name:<10} {summary}")
    lines.append(f"  {'all':<10} every topic above, in this order, with the same arguments")
    lines.append("")
    lines.append("`python -m minillm.bench <topic> --help` lists that topic's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    topics = find_topics()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(topics))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "all":
        failed = []
        for name, topic in topics.items():
            print(f"== {name} ==", flush=True)
            try:
                if isinstance(topic, Exception):
                    raise topic
                topic.main(list(rest))
            except Exception:  # keep going: one broken benchmark should not hide the others' results
                traceback.print_exc()
                failed.append(name)
        if failed:
            print(f"failed: {', '.join(failed)}", file=sys.stderr)
            return 1
        return 0
    if name not in topics:
        print(f"unknown topic {name!r}; available: {', '.join(topics) or 'none yet'}, all", file=sys.stderr)
        return 2
    topic = topics[name]
    if isinstance(topic, Exception):
        raise topic
    topic.main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
