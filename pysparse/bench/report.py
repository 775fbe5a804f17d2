"""Results as a table (stdout), JSON (everything, with the environment) and CSV (one row per point)."""
from __future__ import annotations

import csv
import json
import math

from .environment import describe

# (header, key, format) per mode; speedups are dense time / variant time, measured in the same run.
_COMMON_TAIL = [("dense ms", "dense_ms", "{:.4g}"), ("pysparse ms", "pysparse_ms", "{:.4g}"),
                ("torch ms", "torch_sparse_ms", "{:.4g}"), ("pysparse", "ratio_vs_dense", "{:.2f}x"),
                ("torch", "torch_sparse_ratio_vs_dense", "{:.2f}x"), ("ideal", "ideal", "{:.1f}x")]
COLUMNS = {
    "layer": [("shape", "shape", "{}"), ("M", "m", "{}"), ("block", "block", "{}"), ("sparsity", "sparsity", "{:.2f}"),
              ("density", "density", "{:.3f}"), *_COMMON_TAIL, ("rel err", "rel_err", "{:.1e}")],
    "model": [("model", "model", "{}"), ("batch", "batch", "{}"), ("block", "block", "{}"),
              ("sparsity", "sparsity", "{:.2f}"), ("density", "density", "{:.3f}"), *_COMMON_TAIL,
              ("dense/s", "dense_per_s", "{:.4g}"), ("pysparse/s", "pysparse_per_s", "{:.4g}"),
              ("MiB params", "param_bytes", "mib"), ("MiB packed", "packed_bytes", "mib"),
              ("rel err", "rel_err", "{:.1e}")],
}
# With --compare deepsparse, after torch's ratio: DeepSparse's time, its speedup over dense and its error.
_DEEPSPARSE = [("DS ms", "deepsparse_ms", "{:.4g}"), ("DeepSparse", "deepsparse_ratio_vs_dense", "{:.2f}x"),
               ("DS err", "deepsparse_rel_err", "{:.1e}")]
# Environment fields repeated in every CSV row, so that a CSV alone still says where it was measured.
_CSV_ENV = ("date", "cpu", "cpu_isa", "threads", "torch", "pysparse", "deepsparse", "gpu", "cuda", "load_average")


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if fmt == "mib":
        return f"{value / 2**20:.2f}"
    return fmt.format(value)


def columns_of(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(header, key, format) of the table of ``rows`` (all of one mode)."""
    columns = list(COLUMNS[rows[0]["mode"]])
    if any("deepsparse_ms" in row for row in rows):
        at = [key for _, key, _ in columns].index("torch_sparse_ratio_vs_dense") + 1
        columns[at:at] = _DEEPSPARSE
    return columns


def _verdict(row: dict) -> str:
    if row["correct"]:
        return ""
    return " UNCHECKED" if row.get("check_note") else " WRONG"


def format_table(rows: list[dict], env: dict) -> str:
    """A fixed-width table of ``rows`` (all of one mode) with a header line naming the machine."""
    columns = columns_of(rows)
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        cells.append([_cell(row.get(key), fmt) + (_verdict(row) if key == "rel_err" else "")
                      for _, key, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [f"{rows[0]['dtype']} on {rows[0]['device']}: {describe(env)}"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    model = rows[0]["mode"] == "model"
    lines.append(f"pysparse / torch{' / DeepSparse' if 'DS ms' in cells[0] else ''}: speedup over dense PyTorch "
                 "(dense time / its time, median after warm-up, same process); > 1 is faster. ideal: 1 / density, "
                 "the work that is left" + (" in the pruned layers (an upper bound: the rest of the model is not "
                                            "pruned)." if model else "."))
    if model:
        lines.append("rel err: max |sparse - dense| / max |dense(x) - dense(x')|, x' other inputs: the error "
                     "against the part of the output the input decides.")
    for r in rows:
        if "rel_err_float32" in r:
            lines.append(f"{r['block']} {r['sparsity']:.2f}: rel err above {r['tolerance']:g} against dense "
                         f"{r['dtype']}; against the float32 model pysparse is {r['rel_err_float32']:.1e} off and "
                         f"dense {r['dtype']} {r['dense_rel_err_float32']:.1e}"
                         + (" (as precise: accepted)" if r["correct"] else ""))
    for name, key in (("torch", "torch_sparse_note"), ("DeepSparse", "deepsparse_note")):
        lines += [f"{name} '-': {note}" for note in sorted({r[key] for r in rows if r.get(key)})]
    wrong = sum(not r["correct"] and not r.get("check_note") for r in rows)
    if wrong:
        lines.append(f"{wrong} of {len(rows)} points gave a WRONG pysparse result (not timed)")
    unchecked = [r for r in rows if r.get("check_note")]
    if unchecked:
        lines.append(f"{len(unchecked)} of {len(rows)} points UNCHECKED (pysparse not timed): "
                     + "; ".join(sorted({r["check_note"] for r in unchecked})))
    return "\n".join(lines)


def _finite(value):
    """JSON has no NaN/inf: missing or unbounded numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path, rows: list[dict], env: dict, options: dict) -> None:
    with open(path, "w") as f:
        json.dump(_finite({"environment": env, "options": options, "rows": rows}), f, indent=1, allow_nan=False)
        f.write("\n")


def write_csv(path, rows: list[dict], env: dict) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    env_keys = [k for k in _CSV_ENV if k in env]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys + [f"env_{k}" for k in env_keys])
        for row in rows:
            values = [_finite(row.get(k)) for k in keys] + [env[k] for k in env_keys]
            writer.writerow(["" if v is None else " ".join(map(str, v)) if isinstance(v, list) else v
                             for v in values])
