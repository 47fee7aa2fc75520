"""`qwen2-moe-hf` command line.

    qwen2-moe-hf chat [--model M] [--temperature T --top-p P ...]   # streamed terminal chat (default: demo model)
    qwen2-moe-hf serve --model M [transformers serve options]   # OpenAI-compatible server (transformers 5.x)
    qwen2-moe-hf env                  # versions, and which expert-dispatch backends run here (and why not)
    qwen2-moe-hf bench [--quick] [--plot F.png] [--json F]   # MoE block and decode speed on this machine
    qwen2-moe-hf bench --vs-llamacpp [--layers 4] [--quick] ...   # whole-model decode vs llama.cpp, same weights
    qwen2-moe-hf build-ext [cpu] [cuda]   # build the compiled ops ahead of time
    qwen2-moe-hf quantize --method rtn --bits 4 --group-size 128 SRC DST   # write a GPTQ checkpoint
"""

import argparse
import sys
from typing import List, Optional

import torch
import transformers

from . import __version__, chat, compat, env_report, serve
from . import bench, bench_llamacpp
from .gptq.quantize import quantize_checkpoint
from .kernels.build import main as build_main


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen2-moe-hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    chat.add_arguments(sub.add_parser("chat", help="chat in the terminal, streamed (default: the demo model)",
                                      description=chat.__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    serve.add_arguments(sub.add_parser("serve", help="transformers serve (OpenAI-compatible) with this plugin's "
                                                      "classes; other options go to it", add_help=False,
                                       description=serve.__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter))
    sub.add_parser("env", help="versions and available MoE backends")
    bench.add_arguments(sub.add_parser("bench", help="MoE block and decode speed here, bf16 and int4, vs the built-in "
                                                     "and the memory floor", description=bench.__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter))
    build = sub.add_parser("build-ext", help="build the C++ / CUDA ops now instead of on first use")
    build.add_argument("kinds", nargs="*", choices=["cpu", "cuda"], default=[])
    quant = sub.add_parser("quantize", help="quantize a full-precision qwen2_moe checkpoint to GPTQ (AutoGPTQ layout)")
    quant.add_argument("src", help="folder of the full-precision checkpoint (safetensors)")
    quant.add_argument("dst", help="folder to write the GPTQ checkpoint to")
    quant.add_argument("--method", default="rtn", choices=["rtn"], help="round to nearest (no calibration data)")
    quant.add_argument("--bits", type=int, default=4, choices=[4, 8])
    quant.add_argument("--group-size", type=int, default=128, help="inputs per scale; -1: one group per row")
    quant.add_argument("--asym", action="store_true", help="asymmetric zeros (default: symmetric, like Qwen's)")
    quant.add_argument("--format", default="gptq", choices=["gptq", "gptq_v2"], dest="checkpoint_format")
    quant.add_argument("--max-shard-size", default="2GB")
    quant.add_argument("--no-progress", action="store_true")
    quant.add_argument("--overwrite", action="store_true",
                       help="replace DST if it exists and is not empty (it is replaced only once the new one is done)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and "--vs-llamacpp" in argv:  # its own options (and --help) from here on
        argv.remove("--vs-llamacpp")
        return bench_llamacpp.main(argv[1:], prog="qwen2-moe-hf bench --vs-llamacpp")
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        return serve.run(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    if args.command == "chat":
        return chat.run(args)
    if args.command == "bench":
        return bench.run(args)
    if args.command == "quantize":
        try:
            quantize_checkpoint(args.src, args.dst, bits=args.bits, group_size=args.group_size, sym=not args.asym,
                                method=args.method, checkpoint_format=args.checkpoint_format,
                                max_shard_size=args.max_shard_size, progress=not args.no_progress,
                                overwrite=args.overwrite)
        except (ValueError, OSError) as exc:  # bad arguments or files: CheckpointError, GPTQFormatError, ...
            parser.exit(2, f"qwen2-moe-hf quantize: error: {exc}\n")
        except KeyboardInterrupt:
            parser.exit(130, f"qwen2-moe-hf quantize: interrupted; {args.dst} was not written\n")
        print(f"wrote {args.dst}")
        return 0

    if args.command == "env":
        print(f"qwen2_moe_hf {__version__} | transformers {transformers.__version__} | torch {torch.__version__} "
              f"| builtin qwen2_moe in transformers: {compat.HAS_BUILTIN_QWEN2_MOE}")
        for name, state in env_report().items():
            print(f"  {name:7s} {state}")
        return 0
    return build_main(args.kinds)


if __name__ == "__main__":
    sys.exit(main())
