"""`python -m pysparse demo`: it runs, and the numbers it prints are the ones the issue asks for."""
import re
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")

from pysparse import demo  # noqa: E402
from pysparse.__main__ import main  # noqa: E402


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
        for b in ("speed b=360", "speed b=1"):
            assert 0 < float(cells[b].rstrip("x")) < 1000
        assert float(cells["vs dense"]) == pytest.approx(100 * (percent(cells["fine-tuned"]) - baseline), abs=0.02)
    return dense["dense"], dense["CNN dense"]


def check_cnn(text, rows):
    """The channel-pruned CNN has about a quarter of the dense CNN's parameters (half the channels on both sides of
    most weights), and a state dict to match; returns its accuracy."""
    before, after = (int(n.replace(",", "")) for n in re.search(r"params ([\d,]+) -> ([\d,]+)", text).groups())
    assert after < 0.3 * before
    pruned, dense = rows["CNN prune_channels L2", "0.50"], rows["CNN dense", "0.00"]
    assert float(pruned["KiB packed"]) < 0.3 * float(dense["KiB packed"])
    return percent(pruned["fine-tuned"])


def test_demo_smoke_runs_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "pysparse", "demo", "--smoke"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert set(rows) == {("dense", "0.00"), ("block 16x16 L1", "0.80"), ("channel L2", "0.50"), ("CNN dense", "0.00"),
                         ("CNN prune_channels L2", "0.50")}
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
    assert "Sparsity report" in text and "Sensitivity of the dense model" in text
    assert results["sensitivity"].baseline == pytest.approx(dense, abs=1e-4)
