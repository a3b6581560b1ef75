"""The HTML dashboard at `/`: devices, bundles, patches with their accuracy, an SVG sparkline per bundle.
Server-rendered (Jinja2, autoescaped), no JavaScript."""

from __future__ import annotations

from typing import Any, Optional

from jinja2 import Environment
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from zoedge.server.models import Bundle, Device, Patch

ACCURACY_KEYS = ("eval_accuracy", "accuracy", "test_accuracy")
MAX_PATCH_ROWS = 200

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>zoedge fleet</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{margin:0 0 .2em}h2{margin:1.5em 0 .4em}
table{border-collapse:collapse;min-width:40em}th,td{padding:.25em .8em;border-bottom:1px solid #ddd;text-align:left}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}code{font-size:12px}
.kpi{display:inline-block;margin-right:2em}.kpi b{font-size:1.6em;display:block}
.global{background:#eef6ff}svg{vertical-align:middle}
</style></head><body>
<h1>zoedge fleet</h1>
<div><span class="kpi"><b>{{ devices|length }}</b>devices</span><span class="kpi"><b>{{ bundles|length }}</b>bundles</span>
<span class="kpi"><b>{{ n_patches }}</b>patches</span><span class="kpi"><b>{{ total_mb }}</b>MB stored</span></div>
<h2>Bundles</h2>
<table><tr><th>bundle</th><th>model</th><th>patches</th><th>global version</th><th>accuracy over uploads</th></tr>
{% for b in bundles %}<tr><td><code>{{ b.id }}</code></td><td>{{ b.model_id }}</td><td class="n">{{ b.n }}</td>
<td class="n">{{ b.version }}</td><td>{{ b.sparkline|safe }}</td></tr>
{% else %}<tr><td colspan="5">no bundle published yet</td></tr>{% endfor %}</table>
<h2>Devices</h2>
<table><tr><th>name</th><th>device</th><th>registered</th><th>patches</th><th>last upload</th></tr>
{% for d in devices %}<tr><td>{{ d.name }}</td><td><code>{{ d.id }}</code></td><td>{{ d.created }}</td>
<td class="n">{{ d.n }}</td><td>{{ d.last or "—" }}</td></tr>
{% else %}<tr><td colspan="5">no device registered yet</td></tr>{% endfor %}</table>
<h2>Patches{% if n_patches > patches|length %} (latest {{ patches|length }}){% endif %}</h2>
<table><tr><th>uploaded</th><th>patch</th><th>device</th><th>model</th><th>kind</th><th>version</th><th>steps</th>
<th>examples</th><th>accuracy</th><th>bytes</th></tr>
{% for p in patches %}<tr class="{{ p.kind }}"><td>{{ p.created }}</td><td><code>{{ p.id }}</code></td>
<td>{{ p.device }}</td><td>{{ p.model }}</td><td>{{ p.kind }}</td><td class="n">{{ p.version }}</td>
<td class="n">{{ p.steps }}</td><td class="n">{{ p.examples }}</td><td class="n">{{ p.accuracy }}</td>
<td class="n">{{ p.bytes }}</td></tr>
{% else %}<tr><td colspan="10">no patch uploaded yet</td></tr>{% endfor %}</table>
</body></html>
"""

_template = Environment(autoescape=True).from_string(TEMPLATE)


def accuracy(metrics: dict[str, Any]) -> Optional[float]:
    for key in ACCURACY_KEYS:
        v = (metrics or {}).get(key)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def sparkline(values: list[float], width: int = 160, height: int = 28) -> str:
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    step = width / max(1, len(values) - 1)
    pts = " ".join(f"{i * step:.1f},{height - 2 - (v - lo) / span * (height - 4):.1f}" for i, v in enumerate(values))
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
            f"<title>accuracy {lo:.3f} … {hi:.3f}, last {values[-1]:.3f}</title>"
            f'<polyline fill="none" stroke="#1f6feb" stroke-width="1.5" points="{pts}"/></svg> '
            f"{values[-1]:.3f}")


def render(db: Session) -> str:
    names = dict(db.execute(select(Device.id, Device.name)).all())
    models = dict(db.execute(select(Bundle.id, Bundle.model_id)).all())
    per_device = {d: (n, last) for d, n, last in db.execute(
        select(Patch.device_id, func.count(), func.max(Patch.created)).group_by(Patch.device_id)).all()}
    devices = [{"id": d.id, "name": d.name, "created": _when(d.created), "n": per_device.get(d.id, (0, None))[0],
                "last": _when(per_device.get(d.id, (0, None))[1])}
               for d in db.scalars(select(Device).order_by(Device.created))]
    bundles = []
    for b in db.scalars(select(Bundle).order_by(Bundle.created)):
        accs = [a for (m,) in db.execute(select(Patch.metrics).where(Patch.bundle_id == b.id, Patch.kind != "global")
                                         .order_by(Patch.created)).all() if (a := accuracy(m)) is not None]
        version = db.scalar(select(func.coalesce(func.max(Patch.version), 0))
                            .where(Patch.bundle_id == b.id, Patch.kind == "global"))
        n = db.scalar(select(func.count()).select_from(Patch).where(Patch.bundle_id == b.id))
        bundles.append({"id": b.id, "model_id": b.model_id, "n": n, "version": version, "sparkline": sparkline(accs)})
    n_patches = db.scalar(select(func.count()).select_from(Patch)) or 0
    total = int(db.scalar(select(func.coalesce(func.sum(Patch.bytes), 0))) or 0)
    patches = []
    for p in db.scalars(select(Patch).order_by(Patch.created.desc()).limit(MAX_PATCH_ROWS)):
        acc = accuracy(p.metrics)
        patches.append({"id": p.id, "created": _when(p.created), "device": names.get(p.device_id, "global"),
                        "model": models.get(p.bundle_id, p.bundle_id[:12]), "kind": p.kind, "version": p.version,
                        "steps": p.steps, "examples": p.examples, "bytes": p.bytes,
                        "accuracy": "—" if acc is None else f"{acc:.3f}"})
    return _template.render(devices=devices, bundles=bundles, patches=patches, n_patches=n_patches,
                            total_mb=f"{total / 1e6:.2f}")


def _when(t) -> Optional[str]:
    return t.strftime("%Y-%m-%d %H:%M:%S") if t is not None else None
