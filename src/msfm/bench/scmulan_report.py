"""The markdown report of the scMulan benchmark (the tables of docs/benchmarks.md)."""

from __future__ import annotations

from typing import Any

from msfm.bench._machine import fmt

__all__ = ["format_markdown", "input_order"]


def input_order(name: str) -> tuple[int, int]:
    """Sort key of the inputs: the real cells first, then the resampled ones by prompt length."""
    return (0, 0) if name == "real" else (1, int(name[1:]))


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------


def _others(row: dict[str, Any]) -> str:
    """Share of the machine's CPU used by other processes while this row was timed."""
    share = row.get("others_cpu_share")
    return "-" if share is None else f"{100 * share:.0f} %"


def format_markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables (machine line, annotation, agreement, generation, models)."""
    m = results.get("machine", {})
    lines = [
        f"Machine: {m.get('cpu')} ({m.get('cpu_count')} cores, {m.get('cpu_capability')}), torch {m.get('torch')}, "
        f"{m.get('threads')} threads, device {m.get('device')}; load average start {results.get('loadavg_start')}, "
        f"end {results.get('loadavg_end')}; total {results.get('total_s', 0):.0f} s.",
        "",
    ]
    if "matmul_gflops" in results:
        mm = results["matmul_gflops"]
        shape = results.get("matmul_shape", {})
        rates = ", ".join(f"{dt} {fmt(v)} GFLOP/s (m={shape.get(dt, {}).get('m')})" for dt, v in mm.items())
        lines += [
            f"Matmul rate, F.linear([m,1120], [4480,1120]) (int8 = dynamic quantized Linear), best of "
            f"{next(iter(shape.values()), {}).get('repeats')}: {rates}.",
            "",
        ]
    models = results.get("models", {})
    if models:
        lines += ["| preset | parameters | dim x depth (heads) |", "|---|---|---|"]
        for k, v in models.items():
            lines.append(f"| {k} | {v['parameters']:,} | {v['dim']} x {v['depth']} ({v['num_heads']}) |")
        lines.append("")
    ann = results.get("annotation", [])
    if ann:
        lines += [
            "| model | input | prompt words (mean) | mode | precision | batch | cells | cells/s | speed-up vs loop "
            "| GFLOP/cell | GFLOP/s | peak RSS (MB) | other processes' CPU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(
            ann,
            key=lambda r: (
                r["preset"],
                input_order(r["input"]),
                r["mode"] != "loop",
                r["precision"],
                r["batch_size"],
            ),
        ):
            mode = "official-style loop" if r["mode"] == "loop" else "msfm batched"
            prec = {"32": "fp32", "bf16": "bf16 autocast", "int8": "int8 dynamic"}[r["precision"]]
            lines.append(
                f"| {r['preset']} | {r['input']} | {r['mean_prompt_words']:.0f} | {mode} | {prec} | {r['batch_size']} "
                f"| {r['n_cells']} | {fmt(r['cells_per_s'])} | {fmt(r.get('speedup_vs_loop')) if r['mode'] != 'loop' else '1'} "
                f"| {fmt(r['gflop_per_cell'])} | {fmt(r['achieved_gflops'])} | {r['peak_rss_mb']:,.0f} "
                f"| {_others(r)} |"
            )
        lines.append("")
    agree = results.get("agreement", [])
    if agree:
        lines += [
            "| model | input | precision vs fp32 | cells | coarse identical | fine identical | embedding cosine min / mean |",
            "|---|---|---|---|---|---|---|",
        ]
        for a in agree:
            lines.append(
                f"| {a['preset']} | {a['input']} | {a['precision']} | {a['n_cells']} | {a['coarse_identical']:.3f} "
                f"| {a['fine_identical']:.3f} | {a['embedding_cosine']['min']:.5f} / {a['embedding_cosine']['mean']:.5f} |"
            )
        lines.append("")
    summary = results.get("summary", {})
    phys = [
        (preset, inp, e)
        for preset, per_input in summary.items()
        if not preset.startswith("target")
        for inp, e in per_input.items()
        if "flop_ratio_loop_over_batched" in e
    ]
    if phys:
        lines += [
            "| model | input | loop FLOPs / batched FLOPs | batched fp32 rate / loop rate | best speed-up | "
            "bound at fp32 matmul rate | bound at int8 matmul rate |",
            "|---|---|---|---|---|---|---|",
        ]
        for preset, inp, e in phys:
            lines.append(
                f"| {preset} | {inp} | {fmt(e['flop_ratio_loop_over_batched'])} "
                f"| {fmt(e.get('rate_ratio_batched_over_loop_fp32'))} | {fmt(e.get('best_speedup'))} "
                f"| {fmt(e.get('ceiling_speedup_at_fp32_matmul_rate'))} "
                f"| {fmt(e.get('ceiling_speedup_at_int8_matmul_rate'))} |"
            )
        lines.append("")
    target = results.get("summary", {}).get("target_10x_at_368m")
    if target:
        best = ", ".join(f"{k}: {fmt(v)}x" for k, v in target["best_speedup_per_input"].items())
        fp32 = ", ".join(f"{k}: {fmt(v)}x" for k, v in target["fp32_speedup_per_input"].items())
        met = ", ".join(target["met_on_inputs"]) or "none"
        lines += [
            f"Target >= 10x the loop at 368M: best speed-up per input (any precision) {best}; fp32 only {fp32}; "
            f"met on: {met}.",
            "",
        ]
    gen = results.get("generation", [])
    if gen:
        lines += [
            "| model | KV cache | batch | new tokens (max) | tokens/s | ms/step | cache speed-up | identical tokens "
            "(uncached vs cached) | peak RSS (MB) | other processes' CPU |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g in sorted(gen, key=lambda g: (g["preset"], g["batch_size"], not g["use_cache"])):
            lines.append(
                f"| {g['preset']} | {'yes' if g['use_cache'] else 'no'} | {g['batch_size']} | {g['new_tokens']} "
                f"({g['max_new_tokens']}/cell) | {fmt(g['tokens_per_s'])} | {fmt(g['ms_per_step'])} "
                f"| {fmt(g.get('cache_speedup'))} | {fmt(g.get('identical_tokens_vs_cache'))} | {g['peak_rss_mb']:,.0f} "
                f"| {_others(g)} |"
            )
        lines.append("")
    return "\n".join(lines)
