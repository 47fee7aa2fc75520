"""`qwen2-moe-hf` command line.

    qwen2-moe-hf env                  # versions, and which expert-dispatch backends run here (and why not)
    qwen2-moe-hf build-ext [cpu] [cuda]   # build the compiled ops ahead of time
"""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="qwen2-moe-hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions and available MoE backends")
    build = sub.add_parser("build-ext", help="build the C++ / CUDA ops now instead of on first use")
    build.add_argument("kinds", nargs="*", choices=["cpu", "cuda"], default=[])
    args = parser.parse_args(argv)

    if args.command == "env":
        import torch
        import transformers

        import qwen2_moe_hf
        from qwen2_moe_hf import compat

        print(f"qwen2_moe_hf {qwen2_moe_hf.__version__} | transformers {transformers.__version__} "
              f"| torch {torch.__version__} | builtin qwen2_moe in transformers: {compat.HAS_BUILTIN_QWEN2_MOE}")
        for name, state in qwen2_moe_hf.env_report().items():
            print(f"  {name:7s} {state}")
        return 0
    from qwen2_moe_hf.moe.extension import main as build_main

    return build_main(args.kinds)


if __name__ == "__main__":
    sys.exit(main())
