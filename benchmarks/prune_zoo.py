"""Channel pruning across every torchvision classification model: pysparse vs Torch-Pruning, side by side.

For each constructor in ``torchvision.models.list_models(module=torchvision.models)`` (random init, the smallest
of 64/128/224/299 px the model accepts, batch 1): prune 30% of channels with ``pysparse.prune.prune_channels``
and, when it is installed, with Torch-Pruning's MagnitudePruner (L2, round_to=8, classifier ignored; retried without
round_to if that raises). Reports per model: ran (the pruned model runs, output shape kept), params and FLOPs
before/after, and the totals.

Slow (the full list takes tens of minutes on 2 cores): a script, not a test. Each model runs in its own
subprocess with a time limit, so one crash or hang costs one row.

    python benchmarks/prune_zoo.py [--models resnet18,vit_b_16] [--ratio 0.3] [--timeout 900] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

SIZES = (64, 128, 224, 299)


def _fresh(name):
    import torch
    import torchvision

    torch.manual_seed(0)
    kwargs = {"aux_logits": True, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def _input_for(model):
    import torch

    for s in SIZES:
        x = torch.randn(1, 3, s, s)
        try:
            with torch.no_grad():
                model(x)
            return x
        except Exception:  # noqa: BLE001 - try the next size
            continue
    raise RuntimeError("the model runs at none of the sizes " + str(SIZES))


def _shape(out):
    import torch

    return tuple(out.shape) if isinstance(out, torch.Tensor) else tuple(_shape(o) for o in out)


def _measure(model, x, ref_shape):
    import torch

    from pysparse.bench.models import flops

    model.eval()
    try:
        with torch.no_grad():
            ran = _shape(model(x)) == ref_shape
    except Exception as exc:  # noqa: BLE001
        return {"ran": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {"ran": ran, "params": sum(p.numel() for p in model.parameters()), "flops": flops(model, x)}


def run_one(name: str, tool: str, ratio: float, max_gb: float = 0.0) -> dict:
    import torch
    from torch import nn

    from pysparse.bench.models import flops

    if max_gb > 0:  # a runaway tool fails with MemoryError instead of starving a shared machine
        import resource

        limit = int(max_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    torch.set_num_threads(int(os.environ.get("ZOO_THREADS", "1")))
    model = _fresh(name)
    x = _input_for(model)
    with torch.no_grad():
        ref_shape = _shape(model(x))
    row = {"model": name, "tool": tool, "input": list(x.shape), "params_before": sum(p.numel() for p in
                                                                                      model.parameters()),
           "flops_before": flops(model, x)}
    t0 = time.perf_counter()
    try:
        if tool == "pysparse":
            from pysparse.prune import prune_channels

            model, report = prune_channels(model, x, ratio=ratio, norm="l2", round_to=8, return_report=True)
            row["rolled_back"] = sum(f.status == "rolled back" for f in report.families)
            row["notes"] = len(report.notes)
        else:
            import torch_pruning as tp

            ignored = [m for m in model.modules()
                       if (isinstance(m, nn.Linear) and m.out_features == 1000)
                       or (isinstance(m, nn.Conv2d) and m.out_channels == 1000)]
            heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
            pristine = copy.deepcopy(model)
            try:
                tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                          pruning_ratio=ratio, ignored_layers=ignored, round_to=8,
                                          num_heads=heads).step()
            except Exception as exc:  # noqa: BLE001 - give Torch-Pruning a second chance without round_to
                row["note"] = f"round_to=8 raised {type(exc).__name__}: {str(exc)[:80]}; retried without it"
                model = pristine
                ignored = [m for m in model.modules()
                           if (isinstance(m, nn.Linear) and m.out_features == 1000)
                           or (isinstance(m, nn.Conv2d) and m.out_channels == 1000)]
                heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
                tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                          pruning_ratio=ratio, ignored_layers=ignored,
                                          num_heads=heads).step()
    except Exception as exc:  # noqa: BLE001 - a tool that raises is a row that did not prune
        row.update({"ran": False, "error": f"prune raised {type(exc).__name__}: {str(exc)[:200]}"})
        return row
    row["seconds"] = round(time.perf_counter() - t0, 2)
    after = _measure(model, x, ref_shape)
    row.update({k + ("_after" if k in ("params", "flops") else ""): v for k, v in after.items()})
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="", help="comma-separated names (default: all classification models)")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per model and tool")
    ap.add_argument("--tools", default="pysparse,torch_pruning")
    ap.add_argument("--json", default="bench_out/prune_zoo.json")
    ap.add_argument("--max-gb", type=float, default=0.0, help="address-space limit per model and tool (0: none)")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "TOOL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("ROW " + json.dumps(run_one(args.one[0], args.one[1], args.ratio, args.max_gb)), flush=True)
        return

    import torchvision

    names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    tools = args.tools.split(",")
    if "torch_pruning" in tools:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            print("torch_pruning not installed (pip install torch-pruning==1.6.1): pysparse only")
            tools = [t for t in tools if t != "torch_pruning"]
    rows = []
    done = {}
    if os.path.exists(args.json):  # resume
        with open(args.json) as f:
            rows = json.load(f)["rows"]
        done = {(r["model"], r["tool"]) for r in rows}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    for name in names:
        for tool in tools:
            if (name, tool) in done:
                continue
            try:
                proc = subprocess.run([sys.executable, __file__, "--one", name, tool, "--ratio", str(args.ratio),
                                       "--max-gb", str(args.max_gb)], capture_output=True, text=True,
                                      timeout=args.timeout)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
                row = json.loads(lines[-1][4:]) if lines else {
                    "model": name, "tool": tool, "ran": False, "error": (proc.stderr or "no output")[-300:]}
            except subprocess.TimeoutExpired:
                row = {"model": name, "tool": tool, "ran": False, "error": f"timed out after {args.timeout}s"}
            rows.append(row)
            print(_fmt(row), flush=True)
            with open(args.json, "w") as f:
                json.dump({"ratio": args.ratio, "rows": rows}, f, indent=1)
    print()
    print(summary(rows, [n for n in names], tools))


def _fmt(r):
    if not r.get("ran"):
        return f"{r['model']:<28} {r['tool']:<14} FAILED  {r.get('error', '')[:150]}"
    pb, pa, fb, fa = r["params_before"], r["params_after"], r["flops_before"], r["flops_after"]
    return (f"{r['model']:<28} {r['tool']:<14} ran  params {pb / 1e6:8.2f}M -> {pa / 1e6:8.2f}M ({pa / pb:6.1%})  "
            f"FLOPs {fb / 1e9:7.2f}G -> {fa / 1e9:7.2f}G ({fa / fb if fb else 0:6.1%})  {r.get('seconds', 0):6.1f}s")


def summary(rows, names, tools) -> str:
    lines = [f"{len(names)} models"]
    for tool in tools:
        rs = [r for r in rows if r["tool"] == tool and r["model"] in names]
        ran = [r for r in rs if r.get("ran")]
        smaller = [r for r in ran if r["params_after"] < r["params_before"]]
        failed = [r["model"] for r in rs if not r.get("ran")]
        unpruned = [r["model"] for r in ran if r["params_after"] >= r["params_before"]]
        lines.append(f"{tool}: ran with output shape kept {len(ran)}/{len(rs)}, lost parameters "
                     f"{len(smaller)}/{len(rs)}; failed: {failed or '-'}; ran but unpruned: {unpruned or '-'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
