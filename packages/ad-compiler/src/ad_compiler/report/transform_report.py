"""The per-transform report (report.json rows) and its table form."""

from collections.abc import Mapping
from typing import Any


def report_rows(history: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per transform that ran or was skipped: stage, matches, seconds, status and why."""
    rows = []
    for name, info in history.items():
        if info.error and not info.skipped:
            status = "failed"
        elif info.skipped:
            status = "skipped"
        else:
            status = "applied"
        why = info.error if info.error else info.reason
        rows.append(
            {
                "transform": name,
                "stage": info.stage,
                "status": status,
                "matches": info.num_matches,
                "seconds": round(info.seconds, 4),
                "reason": why,
            }
        )
    return rows


def report_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of `report_rows`."""
    headers = ["transform", "stage", "status", "matches", "seconds", "reason"]
    cells = [[str(r.get(h) if r.get(h) is not None else "") for h in headers] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    widths[-1] = min(widths[-1], 60)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*(c[:60] if i == len(c) - 1 else c for i, c in enumerate(row))) for row in cells]
    return "\n".join(lines)
