"""Run reports: what a run (or a whole output) holds, why images failed, how fast it went, and what it found.

``report()`` gathers plain data; ``to_text()`` and ``to_html()`` present it. The HTML page is self-contained: its two
histograms (top labels, top-1 scores) are SVG pictures embedded as data URIs, with no script and nothing to fetch.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from pipeline.manifest import Manifest
from pipeline.query import QueryError, connect
from pipeline.runs import OutputLocation
from pipeline.tables import read_manifests

SCORE_BINS = 10
TOP_LABELS = 20


def report(output: str | OutputLocation, run_id: str | None = None, storage_options: dict | None = None) -> dict:
    """Counts, error reasons, throughput and time per stage, top labels and the score distribution.

    For one run (``run_id``: its own rows) or for the whole output (the ``latest`` view: one row per image).
    """
    location = output if isinstance(output, OutputLocation) else OutputLocation.open(output, storage_options)
    manifests = read_manifests(location)
    if run_id is not None:
        manifests = [m for m in manifests if m.run_id == run_id]
        if not manifests:
            raise QueryError(f"no committed run {run_id!r} in {location.url()}")
    with connect(location) as db:
        rows = "(SELECT * FROM predictions WHERE run_id = $run)" if run_id else "latest"
        params = {"run": run_id} if run_id else {}

        def fetch(sql: str) -> list[tuple]:
            return db.execute(sql.format(rows=rows), params).fetchall()

        total, ok = fetch("SELECT count(*), count(*) FILTER (status = 'ok') FROM {rows}")[0]
        reasons = fetch(
            "SELECT regexp_extract(error, '^([^:(]+)', 1) AS kind, count(*) AS n, min(error) AS example "
            "FROM {rows} WHERE status = 'error' GROUP BY kind ORDER BY n DESC, kind"
        )
        labels = fetch(
            f"SELECT label, count(*) AS n FROM {{rows}} WHERE status = 'ok' GROUP BY label "
            f"ORDER BY n DESC, label LIMIT {TOP_LABELS}"
        )
        bins = dict(
            fetch(
                f"SELECT least(floor(score * {SCORE_BINS}), {SCORE_BINS - 1})::INT AS bin, count(*) "
                "FROM {rows} WHERE status = 'ok' GROUP BY bin"
            )
        )
        quantiles = fetch("SELECT quantile_cont(score, [0.1, 0.5, 0.9]), avg(score) FROM {rows} WHERE status = 'ok'")[0]
    return {
        "output": location.url(),
        "scope": f"run {run_id}" if run_id else f"latest result of every image ({len(manifests)} runs)",
        "images": total,
        "ok": ok,
        "error": total - ok,
        "error_reasons": [{"reason": r.strip(), "count": n, "example": e} for r, n, e in reasons],
        "top_labels": [{"label": label, "count": n} for label, n in labels],
        "score_histogram": [
            {"from": b / SCORE_BINS, "to": (b + 1) / SCORE_BINS, "count": bins.get(b, 0)} for b in range(SCORE_BINS)
        ],
        "score_quantiles": dict(zip(("p10", "p50", "p90"), quantiles[0] or [None] * 3, strict=True))
        | {"mean": quantiles[1]},
        "runs": [_run_summary(m) for m in manifests],
    }


def _run_summary(manifest: Manifest) -> dict[str, Any]:
    return {
        "run_id": manifest.run_id,
        "mode": manifest.plan.mode,
        "committed_at": manifest.committed_at,
        "images": manifest.counts.rows,
        "wall_seconds": manifest.wall_seconds,
        "images_per_second": manifest.images_per_second,
        "stage_seconds": {k: v.get("seconds") for k, v in manifest.stage_seconds.items()},
    }


def to_text(data: dict) -> str:
    lines = [
        f"{data['output']}: {data['scope']}",
        f"images  {data['images']} ({data['ok']} ok, {data['error']} failed)",
    ]
    if data["error_reasons"]:
        lines.append("errors  " + ", ".join(f"{r['reason']} {r['count']}" for r in data["error_reasons"]))
    q = data["score_quantiles"]
    if q["p50"] is not None:
        lines.append(f"top-1 score  p10 {q['p10']:.2f}  median {q['p50']:.2f}  p90 {q['p90']:.2f}")
    if data["top_labels"]:
        lines.append("labels  " + ", ".join(f"{x['label']} {x['count']}" for x in data["top_labels"][:10]))
    for run in data["runs"]:
        stages = _stages(run)
        rate = f"{run['images_per_second']:.1f} images/s" if run["images_per_second"] else "-"
        lines.append(f"run {run['run_id']} ({run['mode']}): {run['images']} images, {rate}; {stages}")
    return "\n".join(lines)


def _stages(run: dict) -> str:
    return ", ".join(f"{name} {seconds:.1f}s" for name, seconds in run["stage_seconds"].items() if seconds is not None)


def to_html(data: dict) -> str:
    """A self-contained page: tables, and the two histograms as embedded SVG pictures."""
    labels = _bars([(x["label"], x["count"]) for x in data["top_labels"]], "Top-1 labels", horizontal=True)
    scores = _bars(
        [(f"{b['from']:.1f}", b["count"]) for b in data["score_histogram"]], "Top-1 scores", horizontal=False
    )
    e = html.escape
    reasons = "".join(
        f"<tr><td>{e(r['reason'])}</td><td>{r['count']}</td><td><code>{e(r['example'])}</code></td></tr>"
        for r in data["error_reasons"]
    )
    runs = "".join(
        f"<tr><td>{e(r['run_id'])}</td><td>{e(r['mode'])}</td><td>{r['images']}</td>"
        f"<td>{r['images_per_second'] or ''}</td><td>{e(_stages(r))}</td></tr>"
        for r in data["runs"]
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>resnet-pipeline report</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left}}code{{font-size:12px}}</style></head><body>
<h1>resnet-pipeline report</h1>
<p>{e(data["output"])}: {e(data["scope"])}</p>
<p><b>{data["images"]}</b> images: {data["ok"]} ok, {data["error"]} failed</p>
<h2>Labels and scores</h2>
<img alt="histogram of top-1 labels" src="{labels}">
<img alt="histogram of top-1 scores" src="{scores}">
<h2>Errors</h2><table><tr><th>reason</th><th>images</th><th>example</th></tr>{reasons}</table>
<h2>Runs</h2><table>
<tr><th>run</th><th>mode</th><th>images</th><th>images/s</th><th>time per stage</th></tr>{runs}</table>
</body></html>
"""


def _bars(items: list[tuple[str, int]], title: str, horizontal: bool) -> str:
    """A bar chart as an SVG data URI."""
    e = html.escape
    peak = max((n for _, n in items), default=0) or 1
    if horizontal:
        height = 30 + 18 * len(items)
        bars = "".join(
            f'<text x="195" y="{42 + 18 * i}" text-anchor="end">{e(name[:28])}</text>'
            f'<rect x="200" y="{30 + 18 * i}" width="{300 * n / peak:.1f}" height="14" fill="#4a7ab5"/>'
            f'<text x="{205 + 300 * n / peak:.1f}" y="{42 + 18 * i}">{n}</text>'
            for i, (name, n) in enumerate(items)
        )
        width = 560
    else:
        height, width = 260, 60 + 44 * len(items)
        bars = "".join(
            f'<rect x="{50 + 44 * i}" y="{220 - 180 * n / peak:.1f}" width="38" height="{180 * n / peak:.1f}" '
            f'fill="#4a7ab5"/><text x="{69 + 44 * i}" y="{215 - 180 * n / peak:.1f}" text-anchor="middle">{n}</text>'
            f'<text x="{50 + 44 * i}" y="238">{e(name)}</text>'
            for i, (name, n) in enumerate(items)
        )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="12"><text x="10" y="18" font-weight="bold">{e(title)}</text>{bars}</svg>'
    )
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
