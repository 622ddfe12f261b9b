"""Each benchmark topic's headline: its ratio against its named peer, read back from the topic's JSON.

``python -m minillm.gpu_check`` prints these in its one-screen summary. A function here takes the ``results`` of a
``<topic>-<device>.json`` and returns ``{label: number}``; a topic without one shows its top-level numbers
(``key_numbers``). Not a topic itself: it has no ``main``.
"""

from __future__ import annotations

from typing import Any


def _longest(rows: list[dict], impl: str, length: str) -> list[dict]:
    """`impl`'s rows at its largest `length` (one per other setting, e.g. per head dim)."""
    rows = [r for r in rows if r["impl"] == impl]
    return [r for r in rows if r[length] == max(r[length] for r in rows)]


def roofline_headline(r: dict) -> dict[str, Any]:
    h = {"matmul TFLOP/s": r["measured_flops"] / 1e12, "bandwidth GB/s": r["measured_bandwidth"] / 1e9,
         "decode step / measured bandwidth": r["decode_step_batch1"]["bandwidth"] / r["measured_bandwidth"]}
    if r["peak"]:  # a GPU with a datasheet entry
        h["matmul / peak FLOP/s"] = r["measured_flops"] / r["peak"]["flops"]
        h["bandwidth / peak"] = r["measured_bandwidth"] / r["peak"]["bandwidth"]
    return h


def attention_headline(r: dict) -> dict[str, Any]:
    impl = "flash" if any(row["impl"] == "flash" for row in r["rows"]) else "online"  # flash is timed on GPUs only
    return {f"{impl} / sdpa speed, D={row['D']} T={row['T']}": row["ratio_to_sdpa"]
            for row in _longest(r["rows"], impl, "T")}


def kvcache_headline(r: dict) -> dict[str, Any]:
    i = r["context_lens"].index(max(r["context_lens"]))
    return {f"no-cache / cache time, S={r['context_lens'][i]}": r["ratio"][i]}


def paged_headline(r: dict) -> dict[str, Any]:
    impl = "paged" if any(row["impl"] == "paged" for row in r["rows"]) else "paged_ref"  # the kernel: GPUs only
    (row,) = _longest(r["rows"], impl, "S")
    h = {f"{impl} / sdpa time, S={row['S']}": row["time_ratio_to_sdpa"]}
    if "fraction_of_peak_bandwidth" in row:
        h[f"{impl} / peak bandwidth"] = row["fraction_of_peak_bandwidth"]
    return h


def quant_headline(r: dict) -> dict[str, Any]:
    decode = [row for row in r["rows"] if row["M"] == min(row["M"] for row in r["rows"])]
    row = max(decode, key=lambda row: row["N"] * row["K"])
    return {f"{name} / torch matmul speed, {row['N']}x{row['K']} M={row['M']}": row[f"{name}_speedup"]
            for name in ("int8", f"int4-g{r['group_size']}")}


def prune_headline(r: dict) -> dict[str, Any]:
    row = max(r["linear"], key=lambda row: (row["M"], row["K"] * row["N"]))
    (decode,) = [d for d in r["decode"] if d["variant"] == "heads + MLP"]
    return {f"2:4 ({row['impl']}) / dense speed, M={row['M']} K={row['K']} N={row['N']}": row["speedup"],
            "heads + MLP pruned / dense decode speed": decode["speedup"]}


def engine_headline(r: dict) -> dict[str, Any]:
    h: dict[str, Any] = {f"continuous / {k.removeprefix('minillm_continuous_vs_')} tokens/s": v
                         for k, v in r["throughput_ratios"].items()}
    h.update({f"{name} error": s["error"] for name, s in r["systems"].items() if "error" in s})
    return h


def distill_headline(r: dict) -> dict[str, Any]:
    h: dict[str, Any] = {}
    for row in r["students"]:
        kd, ce = row["runs"]["logit distillation"], row["runs"]["next-token"]
        h[f"{row['student']}: recovered by logit distillation, {r['steps']} steps"] = kd["recovered"]
        h[f"{row['student']}: recovered by next-token"] = ce["recovered"]
        h[f"{row['student']}: next-token / distilled perplexity"] = ce["perplexities"][-1] / kd["perplexities"][-1]
    return h


def spec_headline(r: dict) -> dict[str, Any]:
    h: dict[str, Any] = {}
    for row in r["rows"]:
        if row["adaptive"]:
            h[f"{row['workload']}, batch {row['batch']}, {row['proposer']} k={row['k']} (adaptive): speedup"] = (
                row["speedup"])
    always = [row for row in r["rows"] if not row["adaptive"] and row["proposer"] == "ngram"]
    for workload in sorted({row["workload"] for row in always}):
        best = max((row for row in always if row["workload"] == workload), key=lambda row: row["speedup"])
        h[f"{workload}, batch 1, ngram: best k"] = best["k"]
        h[f"{workload}, batch 1, ngram: best speedup"] = best["speedup"]
    return h


def decode_headline(r: dict) -> dict[str, Any]:
    h: dict[str, Any] = {f"batch 1 decode: {k.replace('_vs_', ' / ')}": v for k, v in r["batch1_ratios"].items()}
    for row in r["batch_sweep"]:
        if row["batch_size"] in (1, max(x["batch_size"] for x in r["batch_sweep"])):
            h[f"{row['system']} batch {row['batch_size']}: fraction of roofline"] = row["fraction_of_roofline"]
    h.update({k: v for k, v in r["same_tokens"].items()})
    if isinstance(r.get("fused_kernels"), list):
        h.update({f"fused {row['kernel']} / unfused speed, {row['num_tokens']} token(s)": row["speedup"]
                  for row in r["fused_kernels"] if row["num_tokens"] == 1})
    h.update({f"{name} error": s["error"] for name, s in r["batch1"].items() if "error" in s})
    return h


def tp_headline(r: dict) -> dict[str, Any]:
    h: dict[str, Any] = {}
    for part in ("cpu", "gpu"):
        rows = r[part].get("rows", [])
        for row in rows[1:]:
            W = row["world_size"]
            h[f"{part} W={W} / W=1 decode tokens/s"] = row["speedup"]
            h[f"{part} W={W}: collectives / compute time"] = row["comm_to_compute"]
            if part == "gpu":
                h[f"gpu W={W}: scaling efficiency"] = row["scaling_efficiency"]
        if len(rows) > 1:
            row = rows[-1]
            h[f"{part} W={row['world_size']}: all-reduce bytes/token measured / predicted"] = (
                row["allreduce_bytes_per_token"] / row["allreduce_bytes_per_token_predicted"])
            h[f"{part}: same tokens as W=1"] = all(x["same_tokens_as_world_size_1"] for x in rows)
    if "skipped" in r["gpu"]:
        h["gpu sweep skipped"] = r["gpu"]["skipped"]
    return h


def serve_headline(r: dict) -> dict[str, Any]:
    h: dict[str, Any] = {}
    if r["max_goodput_ratio"] is not None:
        h[f"continuous / {r['peer']} max goodput"] = r["max_goodput_ratio"]
    for name, s in r["systems"].items():
        h[f"{name}: max goodput req/s"] = s["max_goodput"]
        h[f"{name}: knee req/s"] = s["knee_rate"]
        h.update({f"{name} {row['rate']:g} req/s error": row["error"] for row in s["rows"] if "error" in row})
    h.update({f"{name} error": e for name, e in r["errors"].items()})
    return h


def key_numbers(r: dict) -> dict[str, Any]:
    """For a topic without a headline function: its top-level numbers."""
    return {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


HEADLINES = {"roofline": roofline_headline, "attention": attention_headline, "kvcache": kvcache_headline,
             "paged": paged_headline, "quant": quant_headline, "prune": prune_headline, "distill": distill_headline,
             "engine": engine_headline, "spec": spec_headline, "decode": decode_headline, "tp": tp_headline,
             "serve": serve_headline}
