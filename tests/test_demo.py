"""`python -m pysparse demo`: it runs, and the numbers it prints are the ones the issue asks for."""
import json
import math
import re
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")

from pysparse import demo
from pysparse.__main__ import main


def table_rows(text):
    """{(method, sparsity): cells} from the demo's table (the method column is 24 characters wide)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method"))
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith("MLP rows:"):
            break
        cells = dict(zip(demo.COLUMNS[1:], line[24:].split()))
        rows[line[:24].strip(), cells["sparsity"]] = cells
    return rows


def percent(cell):
    return float(cell.rstrip("%")) / 100


def check_common(rows):
    """Checks every row must pass; returns the accuracies of the dense MLP and the dense CNN."""
    dense = {key: percent(rows[key, "0.00"]["fine-tuned"]) for key in ("dense", "CNN dense")}
    for (method, sparsity), cells in rows.items():
        if method in dense:
            continue
        if method.startswith("CNN"):
            assert cells["zeros"] == "-"                                              # channels removed, not zeroed
            baseline = dense["CNN dense"]
        else:
            assert float(cells["zeros"]) == pytest.approx(float(sparsity), abs=0.002)  # masks held through Adam
            baseline = dense["dense"]
        assert float(cells["packed err"]) < 1e-5            # packed == masked dense; CNN: reloaded == pruned
        assert float(cells["vs dense"]) == pytest.approx(100 * (percent(cells["fine-tuned"]) - baseline), abs=0.02)
    return dense["dense"], dense["CNN dense"]


def check_speeds(rows, numbers):
    """Every speed cell is the ratio of the two median times the demo measured (its --json numbers), printed to 3
    significant digits; dense rows read 1x. (No bound on the ratio itself: timings on a shared machine vary.)"""
    timed = {(v["method"], f"{v['sparsity']:.2f}"): v for v in numbers["variants"]}
    timed["CNN prune_channels L2", "0.50"] = numbers["cnn"]
    assert set(timed) | {("dense", "0.00"), ("CNN dense", "0.00")} == set(rows)
    for key, cells in rows.items():
        for b in ("b=360", "b=1"):
            if key not in timed:
                assert cells[f"speed {b}"] == "1x"
                continue
            seconds = timed[key]["seconds"]
            assert seconds["dense"][b] > 0 and seconds["pruned"][b] > 0
            speed = seconds["dense"][b] / seconds["pruned"][b]
            assert math.isfinite(speed) and timed[key]["speed"][b] == pytest.approx(speed, rel=1e-12)
            assert cells[f"speed {b}"] == f"{speed:.3g}x"


def check_group_lasso(text, rows):
    """The group-lasso row prunes at a threshold gamma the 90% of 16x16 blocks the penalty shrank."""
    cells = rows["block 16x16 group lasso", "0.90"]
    gamma = float(re.search(r"prune_\(threshold=gamma\) at gamma=([\d.e+-]+)", text).group(1))
    assert gamma > 0 and float(cells["zeros"]) == pytest.approx(0.9, abs=0.002)
    return percent(cells["one-shot"]), percent(cells["fine-tuned"])


def check_cnn(text, rows):
    """The channel-pruned CNN has about a quarter of the dense CNN's parameters (half the channels on both sides of
    most weights), and a state dict to match; returns its accuracy."""
    before, after = (int(n.replace(",", "")) for n in re.search(r"params ([\d,]+) -> ([\d,]+)", text).groups())
    assert after < 0.3 * before
    pruned, dense = rows["CNN prune_channels L2", "0.50"], rows["CNN dense", "0.00"]
    assert float(pruned["KiB packed"]) < 0.3 * float(dense["KiB packed"])
    return percent(pruned["fine-tuned"])


def test_demo_smoke_runs_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pysparse", "demo", "--smoke", "--json", str(tmp_path / "d.json")],
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert set(rows) == {("dense", "0.00"), ("block 16x16 L1", "0.80"), ("block 16x16 group lasso", "0.90"),
                         ("channel L2", "0.50"), ("CNN dense", "0.00"), ("CNN prune_channels L2", "0.50")}
    check_speeds(rows, json.loads((tmp_path / "d.json").read_text()))
    check_group_lasso(proc.stdout, rows)
    dense, cnn_dense = check_common(rows)
    assert dense > 0.9 and cnn_dense > 0.9
    assert percent(rows["block 16x16 L1", "0.80"]["fine-tuned"]) > 0.85
    assert check_cnn(proc.stdout, rows) > 0.85


def test_cli_needs_a_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2 and "demo" in capsys.readouterr().err


@pytest.mark.slow
def test_full_demo_meets_the_accuracy_targets():
    lines = []
    results = demo.run(out=lines.append)
    text = "\n".join(lines)
    rows = table_rows(text)
    check_speeds(rows, json.loads(json.dumps(demo.results_json(results))))
    dense, cnn_dense = check_common(rows)
    assert dense > 0.95 and cnn_dense > 0.95
    check_cnn(text, rows)
    assert float(rows["CNN prune_channels L2", "0.50"]["vs dense"]) >= -2.0      # issue 5: within 2 points at 50%
    cnn = results["cnn"]
    assert sum(p.numel() for p in cnn["reloaded"].parameters()) == cnn["report"].params_after
    for norm in ("L1", "L2"):
        assert float(rows[f"block 16x16 {norm}", "0.80"]["vs dense"]) >= -1.5    # issue 4's target at 80%
        assert (f"block 16x16 {norm}", "0.90") in rows and (f"block 16x16 {norm} gradual", "0.90") in rows
    assert ("channel L2", "0.80") in rows
    one_shot, tuned = check_group_lasso(text, rows)                              # issue 21's targets (seed 0)
    assert one_shot >= percent(rows["block 16x16 L2", "0.90"]["one-shot"]) + 0.20
    assert tuned >= percent(rows["block 16x16 L2", "0.90"]["fine-tuned"]) - 0.005
    assert "Sparsity report" in text and "Sensitivity of the dense model" in text
    assert results["sensitivity"].baseline == pytest.approx(dense, abs=1e-4)
