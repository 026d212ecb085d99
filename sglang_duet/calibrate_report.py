"""The calibration's data, report and offline refit, without torch (`calibrate.py` measures).

A device run (`python -m sglang_duet.calibrate ...`) saves the sweep's points (<out>.points.json)
and the model-step rows (<out>.report.json); `refit` rebuilds the calibration file from them on
any machine: the curves from the points, the step terms fitted to the rows (cost_model/fit.py),
optionally with the whole-GPU rows of benchmark/step_latency.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sglang_duet.cost_model import fit as step_fit
from sglang_duet.cost_model.hardware import Curve, Curves, HardwareSpec, write_calibration
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.models.config import ModelConfig


@dataclass
class SizePoint:
    requested: int
    granted: int
    flops: float  # best of the GEMM sweep, FLOP/s
    bandwidth: float  # copy, bytes read + written per second
    gemm: list = field(default_factory=list)  # [(M, N, K, FLOP/s)]


@dataclass
class Row:
    kind: str  # decode | prefill
    sms: int
    batch: int
    tokens: int  # decode: context per request; prefill: prompt length
    measured_ms: float
    before_ms: float = 0.0
    after_ms: float = 0.0
    held_out_ms: float | None = None  # by a fit that never saw this SM count
    held_out_shape_ms: float | None = None  # by a fit that never saw this (kind, batch, tokens)

    @property
    def before_err(self) -> float:
        return (self.before_ms - self.measured_ms) / self.measured_ms

    @property
    def after_err(self) -> float:
        return (self.after_ms - self.measured_ms) / self.measured_ms


class CalibrationRefused(SystemExit):
    pass


def curves(points: list[SizePoint]) -> tuple[list, list]:
    """[(granted SMs, value)] sorted and deduplicated (the best value per granted count)."""
    best_c: dict[int, float] = {}
    best_b: dict[int, float] = {}
    for p in points:
        best_c[p.granted] = max(best_c.get(p.granted, 0.0), p.flops)
        best_b[p.granted] = max(best_b.get(p.granted, 0.0), p.bandwidth)
    return sorted(best_c.items()), sorted(best_b.items())


def predict(rows: list[Row], cfg, spec: HardwareSpec, dtype_bytes: int, attr: str) -> None:
    cm = CostModel(cfg, spec, dtype_bytes=dtype_bytes)
    for r in rows:
        shape = [(1, r.tokens)] * r.batch if r.kind == "decode" else [(r.tokens, 0)]
        sms = None if r.sms >= spec.total_sms else r.sms
        setattr(r, attr, cm.batch_time(shape, sms) * 1e3)


def fit_rows(rows: list[Row], cfg, base: HardwareSpec, cal: HardwareSpec, dtype_bytes: int,
             extra_rows=()) -> "step_fit.Evaluation":
    """Fit the step terms on `cal`'s curves to the measured rows (plus `extra_rows`, e.g. the
    step-latency benchmark's whole-GPU rows); fill each row's before / after / held-out times."""
    step_rows = [step_fit.StepRow(r.kind, r.sms, r.batch, r.tokens, r.measured_ms, "calibrate") for r in rows]
    ev = step_fit.evaluate(step_rows + list(extra_rows), CostModel(cfg, cal, dtype_bytes),
                           CostModel(cfg, base, dtype_bytes))
    for i, r in enumerate(rows):
        r.before_ms, r.after_ms = ev.before_ms[i], ev.fit.predicted_ms[i]
        r.held_out_ms, r.held_out_shape_ms = ev.held_out_size_ms[i], ev.held_out_shape_ms[i]
    return ev


def extra_rows_report(ev: "step_fit.Evaluation", n_own: int) -> list[dict]:
    """The fit's rows beyond the calibration's own (step-latency rows), as report rows."""
    out = []
    for i in range(n_own, len(ev.fit.rows)):
        r = ev.fit.rows[i]
        row = Row(r.kind, r.sms, r.batch, r.tokens, r.measured_ms, ev.before_ms[i], ev.fit.predicted_ms[i],
                  ev.held_out_size_ms[i], ev.held_out_shape_ms[i])
        out.append(dict(row_dict(row), source=r.source))
    return out


def row_dict(r: Row) -> dict:
    return dict(asdict(r), before_err=r.before_err, after_err=r.after_err)


# ---- output ---------------------------------------------------------------------------------------------

def _pct(pred, measured) -> str:
    return "" if pred is None else f"{100 * (pred - measured) / measured:+.1f}%"


def _fit_markdown(rep: dict) -> list[str]:
    fit = rep.get("fit") or {}
    lines = [""]
    if fit.get("params"):
        lines += ["Step terms fitted to the model-step rows (cost_model/fit.py; bounded non-negative least "
                  "squares on relative errors):", "", "| term | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in fit["params"].items()]
    else:
        why = f" (the fit failed: {fit['error']})" if fit.get("error") else ""
        lines.append(f"Step terms not fitted{why}: the base file's terms with the measured curves.")
    rows = list(rep["rows"]) + list(rep.get("extra_rows") or [])
    lines += ["", "Before: the shipped estimates. After: the fit, in sample. Held out: predicted by a refit that "
              "never saw the row's SM count (size) or its (kind, batch, tokens) on any size (shape).", "",
              "| kind | SMs | batch | ctx / tokens | source | measured ms | before ms | before err | after ms "
              "| after err | held out (size) | held out (shape) |",
              "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["measured_ms"]
        lines.append(f"| {r['kind']} | {r['sms']} | {r['batch']} | {r['tokens']} | {r.get('source', 'calibrate')} | "
                     f"{m:.3f} | {r['before_ms']:.3f} | {_pct(r['before_ms'], m)} | {r['after_ms']:.3f} | "
                     f"{_pct(r['after_ms'], m)} | {_pct(r.get('held_out_ms'), m)} | "
                     f"{_pct(r.get('held_out_shape_ms'), m)} |")
    dev = fit.get("device_run") or {}
    if dev.get("median_abs_error_after") is not None:
        lines += ["", f"The device run's own calibration (curves + a launch overhead of "
                  f"{dev['launch_overhead_s']:.3g} s fitted on its decode rows): median absolute error "
                  f"{100 * dev['median_abs_error_after']:.1f}% on its rows."]
    summ = fit.get("summary") or {}
    mb, ma = rep["median_abs_error_before"], rep["median_abs_error_after"]
    if summ:
        def f(k):
            v = summ.get(k)
            return "n/a" if v is None else f"{100 * v:.1f}%"
        lines += ["", f"Median absolute error: before {f('median_abs_error_before')}, "
                  f"after {f('median_abs_error_in_sample')} (in sample, max {f('max_abs_error_in_sample')}), "
                  f"held out {f('median_abs_error_held_out_sm_count')} (leave one SM count out) and "
                  f"{f('median_abs_error_held_out_shape')} (leave one shape out); {summ['rows']} rows."]
    elif mb is not None:
        lines += ["", f"Median absolute error: before {100 * mb:.1f}%, after {100 * ma:.1f}%."]
    return lines


def report_markdown(rep: dict) -> str:
    lines = [f"# Calibration: {rep['device']} ({rep['partition_backend']} partitions)", "",
             f"Written to `{rep['out']}` (base `{rep['base']}`){' — QUICK smoke run, not for use' if rep['quick'] else ''}.",
             "", "| requested SMs | granted | GEMM TFLOP/s (best of sweep) | copy GB/s (read + write) |",
             "|---:|---:|---:|---:|"]
    for p in rep["sizes"]:
        lines.append(f"| {p['requested']} | {p['granted']} | {p['flops'] / 1e12:.2f} | {p['bandwidth'] / 1e9:.1f} |")
    if rep.get("sources"):
        lines += ["", "Refit offline from: " + ", ".join(f"{k} `{v}`" for k, v in rep["sources"].items() if v) + "."]
    lines += _fit_markdown(rep)
    rows = [c for c in rep.get("contention") or [] if "decode_sms" in c]
    if rows:
        lines += ["", "Two lanes at once (decode beside back-to-back prefills on the other SMs):", "",
                  "| S_d | S_p | decode alone ms | beside prefill ms | x | prefill alone ms | beside decode ms | x |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in rows:
            lines.append(f"| {c['decode_sms']} | {c['prefill_sms']} | {c['decode_alone_ms']:.3f} | "
                         f"{c['decode_beside_prefill_ms']:.3f} | {c['decode_slowdown']:.2f} | "
                         f"{c['prefill_alone_ms']:.1f} | {c['prefill_beside_decode_ms']:.1f} | "
                         f"{c['prefill_slowdown']:.2f} |")
    for c in rep.get("contention") or []:
        if "error" in c:
            lines += ["", f"Contention measurement failed: {c['error']}"]
    return "\n".join(lines) + "\n"


def base_ref(hardware: str, out: Path) -> str:
    p = Path(hardware)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return os.path.relpath(p.resolve(), out.resolve().parent)
    return hardware


def step_latency_rows(path: str | None, total_sms: int) -> list:
    """benchmark/step_latency.py's whole-GPU rows, for the fit (none without --step-latency)."""
    if not path:
        return []
    return step_fit.rows_from_step_latency(read_json(path, "--step-latency"), total_sms)


def read_json(path: str, flag: str):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CalibrationRefused(f"calibrate: {flag} {path}: cannot read it as JSON ({e})") from None


def refit(points_path: str, rows_path: str, out: str | Path, model_config: str, hardware: str | None = None,
          step_latency: str | None = None, dtype_bytes: int = 2) -> dict:
    """The fit again from saved measurements, without a GPU: the curves from the sweep's points
    (<out>.points.json), the rows from a report (<out>.report.json), optionally the step-latency
    benchmark's rows (results.json). `hardware`: the base file (default: the report's). Writes the
    calibration file `out` and returns the report (the device run's format, plus the sources)."""
    try:
        points = [SizePoint(**p) for p in read_json(points_path, "--refit")]
    except TypeError as e:
        raise CalibrationRefused(f"calibrate: --refit {points_path}: not a points file ({e})") from None
    if not points:
        raise CalibrationRefused(f"calibrate: --refit {points_path}: no sweep points")
    report = read_json(rows_path, "--rows")
    hardware = hardware or report.get("base")
    if not hardware:
        raise CalibrationRefused("calibrate: --rows names no base hardware file: pass --hardware")
    spec = HardwareSpec.load(hardware)
    compute_curve, bandwidth_curve = curves(points)
    cal = dataclasses.replace(spec, curves=Curves(Curve(tuple(compute_curve)), Curve(tuple(bandwidth_curve))))
    cfg = ModelConfig.from_path(model_config)
    own = step_fit.rows_from_report(report)
    if not own:
        raise CalibrationRefused(f"calibrate: --rows {rows_path}: no model-step rows to fit")
    rows = [Row(r.kind, r.sms, r.batch, r.tokens, r.measured_ms) for r in own]
    ev = fit_rows(rows, cfg, spec, cal, dtype_bytes, step_latency_rows(step_latency, spec.total_sms))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = base_ref(hardware, out)
    sources = {"points": str(points_path), "rows": str(rows_path), "step_latency": step_latency}
    fit_rep = {"params": ev.fit.params, "summary": ev.summary,
               "device_run": {"launch_overhead_s": report.get("launch_overhead_s"),
                              "median_abs_error_after": report.get("median_abs_error_after")}}
    run_meta = report.get("measured") or {}  # a device run's date, driver, torch (reports since the refit)
    measured = {
        **{k: run_meta[k] for k in ("date", "driver", "torch", "cuda", "exact_grants") if k in run_meta},
        "device": report.get("device"), "partition_backend": report.get("partition_backend"),
        "granted": {int(p.requested): int(p.granted) for p in points},
        "method": "refit (python -m sglang_duet.calibrate --refit) of a device run's sweep points and model-step rows",
        "sources": sources,
        "validation": {"rows": len(rows), "model": cfg.name, **ev.summary},
    }
    write_calibration(out, base, compute_curve, bandwidth_curve, measured, **ev.fit.params)
    HardwareSpec.load(out)  # what we wrote must load
    return {
        "out": str(out), "base": base, "quick": bool(report.get("quick")), "device": report.get("device"),
        "partition_backend": report.get("partition_backend"), "sizes": [asdict(p) for p in points],
        "compute_curve": compute_curve, "bandwidth_curve": bandwidth_curve,
        "launch_overhead_s": ev.fit.params["launch_overhead_s"], "fit": fit_rep, "sources": sources,
        "contention": report.get("contention") or [], "rows": [row_dict(r) for r in rows],
        "extra_rows": extra_rows_report(ev, len(rows)),
        "median_abs_error_before": step_fit.median_abs(r.before_err for r in rows),
        "median_abs_error_after": step_fit.median_abs(r.after_err for r in rows),
    }
