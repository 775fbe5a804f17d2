"""``python -m pysparse frontier``: how much faster a model gets while it still does its job.

For each pattern x sparsity: the best one-shot criterion, distillation from the dense model for a fixed step budget
(through packed trainable layers where that is measured faster; the points on the Pareto front of a sweep then get
the full budget), held-out quality, and the end-to-end speedup measured in the same process. Writes a table, JSON
and a PNG; ``--quality`` / ``--agreement`` pick the fastest point that keeps both; ``--point PATTERN,SPARSITY --save
PATH`` runs one point with the full recipe and saves the packed model with :func:`pysparse.save`.
"""
from __future__ import annotations

import argparse
import importlib.util
import os

import torch

from .patterns import DEFAULT_PATTERNS, DEFAULT_SPARSITIES, parse_pattern, parse_point
from .report import choose, format_table, pareto_front, plot_frontier, write_json

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("minilm", "digits-mlp"), default="minilm")
    parser.add_argument("--patterns", default=",".join(DEFAULT_PATTERNS),
                        help="comma-separated: unstructured, N:M (2:4), BHxBW (16x1, 32x32)")
    parser.add_argument("--sparsities", default=",".join(map(str, DEFAULT_SPARSITIES)))
    parser.add_argument("--steps", type=int, default=200, help="distillation steps of each sweep point")
    parser.add_argument("--full-steps", type=int, default=0,
                        help="steps for the points on the sweep's Pareto front, run again (0: none)")
    parser.add_argument("--criteria", default="magnitude,wanda,sparsegpt",
                        help="one-shot criteria tried at each point (the best on a validation split is kept)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="first distil the dense model with a group-lasso penalty of this strength over the "
                             "pattern's groups (the article's method), then prune it")
    parser.add_argument("--penalty-steps", type=int, default=None, help="steps of the penalised run (default: --steps)")
    parser.add_argument("--quality", type=float, default=None, help="least mean cosine (digits: accuracy)")
    parser.add_argument("--agreement", type=float, default=None, help="least nearest-neighbour agreement")
    parser.add_argument("--point", default=None, help="PATTERN,SPARSITY: run this one point (e.g. 16x1,0.7)")
    parser.add_argument("--save", default=None, help="with --point: pysparse.save the packed model here")
    parser.add_argument("--train-sentences", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="frontier", help="file stem: writes OUT.json and OUT.png")
    parser.add_argument("--append", action="store_true",
                        help="keep the points already in OUT.json and add this run's (a frontier built in parts)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--progress", action="store_true", help="tqdm bars during distillation")


def _sweep(args) -> list[tuple]:
    if args.point is not None:
        return [parse_point(args.point)]
    sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    bad = [s for s in sparsities if not 0 < s < 1]
    if bad:
        raise ValueError(f"--sparsities must be fractions in (0, 1), got {bad}")
    points = []
    for name in args.patterns.split(","):
        pattern = parse_pattern(name)
        fixed = pattern.fixed_sparsity()
        points += [(pattern, fixed)] if fixed is not None else [(pattern, s) for s in sparsities]
    return points


def _earlier_points(path: str, model: str) -> list[dict]:
    """The points of an earlier run of the same model written to ``path`` (none when it does not exist)."""
    import json

    if not os.path.exists(path):
        return []
    with open(path) as f:
        earlier = json.load(f)
    if earlier.get("options", {}).get("model") != model:
        raise SystemExit(f"--append: {path} holds points of model {earlier.get('options', {}).get('model')!r}, "
                         f"not {model!r}")
    return earlier["points"]


def main(args: argparse.Namespace) -> int:
    from ..bench.environment import collect
    from .recipe import CRITERIA, run_point
    from .workloads import build_workload

    try:
        sweep = _sweep(args)
        criteria = tuple(c.strip() for c in args.criteria.split(",") if c.strip())
        unknown = [c for c in criteria if c not in CRITERIA]
        if unknown or not criteria:
            raise ValueError(f"--criteria must name some of {CRITERIA}, got {args.criteria!r}")
        if args.save and args.point is None:
            raise ValueError("--save needs --point (it saves that one point's model)")
        if args.alpha is not None and not args.alpha > 0:
            raise ValueError(f"--alpha must be > 0, got {args.alpha}")
        if args.steps < 0 or args.full_steps < 0:
            raise ValueError(f"--steps and --full-steps must be >= 0, got {args.steps} and {args.full_steps}")
        if not args.no_plot and importlib.util.find_spec("matplotlib") is None:  # before minutes of work, not after
            raise ValueError("the plot needs matplotlib: pip install 'torch-pysparse[bench]' (or pass --no-plot)")
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = build_workload(args.model, seed=args.seed, train_sentences=args.train_sentences)
    steps = args.full_steps if args.point is not None and args.full_steps else args.steps
    earlier = _earlier_points(args.out + ".json", work.name) if args.append else []
    points, models = [], []
    for pattern, sparsity in sweep:
        print(f"[frontier] {work.name}: {pattern.name} at {sparsity:.0%}, {steps} steps", flush=True)
        record, sparse = run_point(work, pattern, sparsity, steps=steps, criteria=criteria, progress=args.progress,
                                   alpha=args.alpha, penalty_steps=args.penalty_steps or steps)
        points.append(record)
        models.append(sparse)
        print(format_table([record], quality_name=work.quality_name, chosen=None, front=[]), flush=True)
    if args.point is None and args.full_steps > steps:
        for i in pareto_front(points):
            p = points[i]
            print(f"[frontier] front point {p['pattern']} at {p['sparsity']:.0%}: {args.full_steps} steps",
                  flush=True)
            record, _ = run_point(work, parse_pattern(p["pattern"]), p["sparsity"], steps=args.full_steps,
                                  criteria=(p["criterion"],), progress=args.progress)
            points.append(record)
    if args.save:
        from ..io import save
        save(models[0], args.save)
        print(f"saved the packed model to {args.save} (pysparse.load into a fresh {work.name} gives it back)")
    points = earlier + points
    chosen = choose(points, quality=args.quality, agreement=args.agreement)
    env = collect("cpu")
    dense = work.evaluate(work.teacher)
    print()
    print(f"{work.describe}; {env['cpu']}, ISA {env['cpu_isa']}, {env['threads']} threads; dense model: "
          f"{work.quality_name} {dense['cosine']:.4f}")
    print(format_table(points, quality_name=work.quality_name, chosen=chosen,
                       front=pareto_front(points)))
    if args.quality is not None or args.agreement is not None:
        print("chosen: " + ("none keeps the quality asked for" if chosen is None else
                            f"{points[chosen]['pattern']} at {points[chosen]['sparsity']:.0%}, "
                            f"{points[chosen]['speedup']:.2f}x"))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    options = {k: v for k, v in vars(args).items() if k != "command"}
    write_json(args.out + ".json", machine=env, points=points, chosen=chosen, options=options, dense=dense)
    if not args.no_plot:
        plot_frontier(args.out + ".png", points, quality_name=work.quality_name, chosen=chosen,
                      title=f"{work.describe}\n{env['cpu']}, {env['threads']} threads")
    print(f"wrote {args.out}.json" + ("" if args.no_plot else f" and {args.out}.png"))
    return 0
