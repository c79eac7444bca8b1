"""The run report: one dict of facts, rendered as JSON (--report) or as a terminal summary."""

from __future__ import annotations

import json
import os
from collections import defaultdict

from onnxopt import __version__, io
from onnxopt.analysis import ModelStats
from onnxopt.pass_base import PassRecord
from onnxopt.validate import ValidationReport


def build(
    *,
    input_path: str,
    output_path: str | None,
    preset: str,
    passes: list[str],
    target: str,
    before: ModelStats,
    after: ModelStats,
    records: list[PassRecord],
    validation: ValidationReport | None,
    seconds: dict[str, float],
    quantization: dict | None = None,
    sensitivity: dict | None = None,
    factorization: dict | None = None,
) -> dict:
    latency = validation.latency_ms if validation else {}
    return {
        "onnxopt": __version__,
        "input": input_path,
        "output": output_path,
        "preset": preset,
        "passes": passes,
        "target": target,
        "before": {**before.to_json(), "latency_ms": latency.get("a")},
        "after": {**after.to_json(), "latency_ms": latency.get("b")},
        "pass_runs": [_record_json(r) for r in records],
        "skipped": [
            {"pass": r.name, "node": s.node, "op": s.op, "reason": s.reason} for r in records for s in r.skipped
        ],
        "errors": [{"pass": r.name, "step": r.step, "error": r.error} for r in records if r.error],
        "factorization": factorization,
        "quantization": quantization,
        "sensitivity": sensitivity,
        "validation": validation.to_json() if validation else None,
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
    }


def _record_json(r: PassRecord) -> dict:
    return {
        "pass": r.name,
        "step": r.step,
        "modified": r.modified,
        "changes": r.stats,
        "seconds": round(r.seconds, 5),
        "nodes_before": r.nodes_before,
        "nodes_after": r.nodes_after,
    }


def write_json(report: dict, path: str | os.PathLike) -> None:
    """Write atomically, like models: never a half-written report."""
    io.write_atomic(path, json.dumps(report, indent=2, sort_keys=False) + "\n")


def render(report: dict) -> str:
    """The terminal summary: totals, nodes by op, passes, validation."""
    b, a = report["before"], report["after"]
    lines = [f"onnxopt {report['onnxopt']}: {report['input']} -> {report['output'] or '(not written)'}"
             f"  [{report['preset']}, target {report['target']}]", ""]
    lines += _table(
        ["", "before", "after", "change"],
        [
            ["nodes", _n(b["nodes"]), _n(a["nodes"]), _pct(b["nodes"], a["nodes"])],
            ["params", _n(b["params"]), _n(a["params"]), _pct(b["params"], a["params"])],
            ["MACs", _n(b["macs"]), _n(a["macs"]), _pct(b["macs"], a["macs"])],
            ["file size", _bytes(b["size_bytes"]), _bytes(a["size_bytes"]), _pct(b["size_bytes"], a["size_bytes"])],
            ["latency (ORT)", _ms(b["latency_ms"]), _ms(a["latency_ms"]), _ratio(b["latency_ms"], a["latency_ms"])],
        ],
    )
    ops = sorted(set(b["nodes_by_op"]) | set(a["nodes_by_op"]))
    changed = [[op, str(b["nodes_by_op"].get(op, 0)), str(a["nodes_by_op"].get(op, 0))] for op in ops
               if b["nodes_by_op"].get(op, 0) != a["nodes_by_op"].get(op, 0)]
    if changed:
        lines += ["", "nodes by op (changed only):"] + _table(["op", "before", "after"], changed)
    lines += ["", *_render_passes(report)]
    if report.get("factorization"):
        lines += ["", *_render_factorization(report["factorization"])]
    if report.get("quantization"):
        lines += ["", *_render_quantization(report["quantization"])]
    if report.get("sensitivity"):
        lines += ["", *_render_sensitivity(report["sensitivity"])]
    if report["validation"]:
        lines += ["", *_render_validation(report["validation"])]
    return "\n".join(lines)


def _render_passes(report: dict) -> list[str]:
    runs = report["pass_runs"]
    if not runs:
        return ["passes: none run"]
    totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    seconds: dict[str, float] = defaultdict(float)
    for r in runs:
        seconds[r["pass"]] += r["seconds"]
        for k, v in r["changes"].items():
            totals[r["pass"]][k] += v
    rounds = max(r["step"] for r in runs)
    rows = [[name, ", ".join(f"{k} {v}" for k, v in totals[name].items()) or "-", f"{seconds[name] * 1e3:.1f} ms"]
            for name in dict.fromkeys(r["pass"] for r in runs)]
    out = [f"passes ({rounds} round{'s' if rounds > 1 else ''} to a fixed point):"]
    out += _table(["pass", "changes", "time"], rows)
    for s in report["skipped"][:20]:
        out.append(f"  skipped {s['op']} {s['node']!r} in {s['pass']}: {s['reason']}")
    if len(report["skipped"]) > 20:
        out.append(f"  ... {len(report['skipped']) - 20} more skipped nodes in the JSON report")
    for e in report["errors"]:
        out.append(f"  pass {e['pass']} failed and was undone (a bug, please report): {e['error']}")
    return out


def _render_factorization(f: dict, top: int = 20) -> list[str]:
    out = [f"low-rank factorization ({f['rule']}): {f['layers_factorized']} of {f['layers_considered']} layers, "
           f"params {_n(f['params_before'])} -> {_n(f['params_after'])}"]
    rows = [[x["node"][-40:], x["form"], "x".join(map(str, x["shape"])), f"{x['rank']}/{x['full_rank']}",
             f"{_n(x['macs_before'])} -> {_n(x['macs_after'])}", _f(x["error"], 4)]
            for x in f["layers"] if x["applied"]][:top]
    if rows:
        out += _table(["layer", "form", "weight", "rank", "MACs/row", "out err" if rows else ""], rows)
    left = [x for x in f["layers"] if not x["applied"]]
    for x in left[:5]:
        out.append(f"  left whole {x['op']} {x['node']!r}: {x['reason']}")
    if len(left) > 5 or f["layers_factorized"] > top:
        out.append("  ... the rest in the JSON report")
    alloc = f.get("allocation")
    if alloc and alloc["checks"]:
        passed = [c for c in alloc["checks"] if c["passed"]]
        best = max(passed, key=lambda c: c["macs_saved"], default=None)
        out.append(f"  budget search ({alloc['budget_checked']}, on held-out calibration samples): "
                   f"{len(alloc['checks'])} whole-model checks" +
                   (f", best cosine {_f(best['cosine'], 6)} with {best['layers']} layers" if best else ", none met"))
    return out


def _render_quantization(q: dict) -> list[str]:
    out = [f"int8 ({q['method']} calibration, {q['activation_type']} activations, {q['target']}): "
           f"{q['nodes_quantized']} nodes quantized, {len(q['kept_in_float'])} kept in float"]
    for s in q["kept_in_float"][:10]:
        out.append(f"  float {s['op']} {s['node']!r}: {s['reason']}")
    if len(q["kept_in_float"]) > 10:
        out.append(f"  ... {len(q['kept_in_float']) - 10} more in the JSON report")
    fb = q.get("fallback")
    if fb:
        checks = fb["checks"]
        line = (f"budget fallback on {fb['samples']} samples ({fb['source']}), {fb['budget']}: full int8 cosine "
                f"{_f(checks[0]['cosine'], 6)}; ")
        if not fb["met"]:
            line += f"not met with up to {max(c['float_layers'] for c in checks)} layers in float"
        elif fb["kept_in_float"]:
            last = next(c for c in reversed(checks) if c["float_layers"] == len(fb["kept_in_float"]))
            k = len(fb["kept_in_float"])
            line += f"met with {k} layer{'s' if k > 1 else ''} kept in float (cosine {_f(last['cosine'], 6)})"
        else:
            line += "met, no layer kept in float"
        out.append(line + f"; {len(checks)} whole-model checks")
    return out


def _render_sensitivity(s: dict, top: int = 10) -> list[str]:
    how = ("quantized alone: cost = 1 - cosine" if s["method"] == "one_at_a_time"
           else "all others quantized: cost = cosine gained in float")
    out = [f"sensitivity ({how}) on {s['samples']} samples ({s['source']}), {len(s['layers'])} layers, "
           f"{s['seconds']:.2f} s:"]
    rows = [[c["node"], c["op"], _g(c["cost"]), _f(c["cosine"], 6),
             "-" if c["top1"] is None else f"{100 * c['top1']:.1f}%"] for c in s["layers"][:top]]
    out += _table(["layer", "op", "cost", "cosine", "top-1"], rows) if rows else ["  no layer to measure"]
    if len(s["layers"]) > top:
        out.append(f"  ... {len(s['layers']) - top} more in the JSON report")
    return out


def _render_validation(v: dict) -> list[str]:
    verdict = "PASS" if v["passed"] else "FAIL"
    out = [f"validation on {v['samples']} samples ({v['source']}): {verdict}  ({v['budget']['description']})"]
    rows = []
    for name, m in v["outputs"].items():
        top1 = "-" if m["top1"] is None else f"{100 * m['top1']:.1f}%"
        rows.append([name, _g(m["max_abs"]), _g(m["rel_l2"]), _f(m["cosine"], 6), _db(m["sqnr_db"]), top1])
    return out + _table(["output", "max abs", "rel L2", "cosine", "SQNR", "top-1"], rows)


def render_validation(v: ValidationReport) -> str:
    return "\n".join(_render_validation(v.to_json()))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return ["  " + fmt.format(*header).rstrip()] + ["  " + fmt.format(*map(str, r)).rstrip() for r in rows]


def _n(x) -> str:
    return "-" if x is None else f"{x:,}"


def _pct(b, a) -> str:
    if b is None or a is None or not b:
        return ""
    return f"{100 * (a - b) / b:+.1f}%"


def _ratio(b, a) -> str:
    return "" if not b or not a else f"{a / b:.2f}x"


def _ms(x) -> str:
    return "-" if x is None else f"{x:.3f} ms"


def _bytes(x: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if x < 1024 or unit == "GB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.2f} {unit}"
        x /= 1024
    return str(x)


def _g(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _f(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _db(x) -> str:
    return "inf" if x is None else f"{x:.1f} dB"
