"""Plain-text and markdown tables for run summaries."""

from __future__ import annotations

from typing import Sequence

# (key, header, format) for the usual summary columns
SUMMARY_COLUMNS = [
    ("strategy", "method", "{}"), ("width", "W", "{}"), ("problems", "n", "{}"),
    ("accuracy", "acc", "{:.3f}"), ("kv_mean", "KV mean", "{:.0f}"), ("kv_peak", "KV peak", "{}"),
    ("kv_blocks_mean", "blocks mean", "{:.1f}"), ("kv_blocks_peak", "blocks peak", "{}"),
    ("generated_tokens_mean", "gen tok/prob", "{:.0f}"), ("tokens_per_s", "tok/s", "{:.1f}"),
    ("problems_per_s", "prob/s", "{:.3f}"), ("select_s", "select s", "{:.2f}"),
]


def cell(value, fmt: str) -> str:
    """`value` formatted by `fmt`; "-" for None, str(value) where the format does not apply."""
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]] = SUMMARY_COLUMNS,
                 markdown: bool = False) -> str:
    """Rows as an aligned text table (numbers right-aligned) or a markdown table."""
    headers = [h for _, h, _ in columns]
    cells = [[cell(r.get(k), f) for k, _, f in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_num(r.get(k)) for r in rows) for k, _, _ in columns]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def _is_num(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
