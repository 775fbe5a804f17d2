"""``python -m pysparse <command>``: ``demo`` runs the main job, ``bench`` the benchmarks, ``frontier`` quality
against measured speed after recovery; each command lives in its own module."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pysparse",
                                     description="pysparse: prune, pack and run block-sparse models")
    commands = parser.add_subparsers(dest="command", required=True)
    from . import demo  # light: the demo imports scikit-learn only when it runs
    demo.add_arguments(commands.add_parser("demo", help="train, prune, fine-tune, pack and time an MLP and a "
                                                        "channel-pruned CNN on load_digits (offline, 1-2 minutes on "
                                                        "2 cores)"))
    from . import bench  # light: matplotlib and the model packages are imported only when used
    bench.add_arguments(commands.add_parser("bench", help="sparsity x block size x batch sweep of single layers, or "
                                                          "whole models (--model); table + JSON + CSV + PNG"))
    from . import frontier  # light: the models and the recovery code are imported only when it runs
    frontier.add_arguments(commands.add_parser("frontier", help="quality vs measured speedup after one-shot pruning "
                                                                "and distillation, per pattern x sparsity; table + "
                                                                "JSON + PNG"))
    args = parser.parse_args(argv)
    handlers = {"demo": demo.main, "bench": bench.main, "frontier": frontier.main}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
