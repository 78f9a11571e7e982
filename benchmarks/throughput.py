"""Train-step throughput of mimkit MAE vs Hugging Face ViTMAE (same config, alternating), printed as JSON.

    python benchmarks/throughput.py                                   # full: ViT-B/16 bs16 + tiny bs256, fp32 + bf16
    python benchmarks/throughput.py --configs tiny_bs256 --dtypes bf16 --rounds 1 --steps 2   # quick

Same as `mimkit bench`; the logic lives in mimkit.commands.bench (see its docstring for how memory is
measured).
"""

import argparse
import sys

from mimkit.commands.bench import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
