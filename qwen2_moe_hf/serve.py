"""`qwen2-moe-hf serve`: transformers' own `transformers serve` (OpenAI-compatible HTTP server), run in a process where
the plugin is registered.

    qwen2-moe-hf serve --model Qwen/Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4 --port 8000
    qwen2-moe-hf serve --model PATH --continuous-batching --host 0.0.0.0      # every other option goes to it as is

Endpoints (transformers' server): POST /v1/chat/completions, POST /v1/completions (streaming and not),
GET /v1/models, GET /health. `transformers serve --help` lists the options passed through.

Why a command of ours rather than `transformers serve` alone: the server picks a model class with
`getattr(transformers, config.architectures[0])`, which on 5.x is transformers' built-in Qwen2MoeForCausalLM, not the
class the Auto mappings name after `import qwen2_moe_hf`. Its loader hands a GPTQ-Int4 checkpoint to transformers'
quantizers (which want optimum / gptqmodel and cannot place per-expert int4 tensors: docs/gptq.md).
Here, in this process only, those names are bound to our classes, so every checkpoint loads through our loader.
"""

import argparse
import sys
from typing import List, Optional

import transformers

try:  # transformers 5.x; 4.x has no server and no such check
    from transformers.utils import is_serve_available
except ImportError:
    is_serve_available = None

from .modeling_qwen2_moe import (
    Qwen2MoeForCausalLM,
    Qwen2MoeForQuestionAnswering,
    Qwen2MoeForSequenceClassification,
    Qwen2MoeForTokenClassification,
    Qwen2MoeModel,
)

# The first transformers release tested here that has `transformers serve` (it is part of 5.x).
SERVE_TESTED_VERSION = "5.23.0"
OUR_CLASSES = (Qwen2MoeModel, Qwen2MoeForCausalLM, Qwen2MoeForSequenceClassification, Qwen2MoeForTokenClassification,
               Qwen2MoeForQuestionAnswering)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint folder or hub id to load at start and serve for every request "
                                        "(default: load what each request names, as transformers serve does)")


def serve_available() -> Optional[str]:
    """None when this transformers has `transformers serve` and its serving dependencies; else why not."""
    try:
        from transformers.cli.serve import Serve  # noqa: F401
    except ImportError:
        return (f"transformers {transformers.__version__} has no `transformers serve`; it comes with transformers "
                f"5.x (tested: {SERVE_TESTED_VERSION}): pip install 'transformers[serving]=={SERVE_TESTED_VERSION}'")
    if is_serve_available is not None and not is_serve_available():
        return ("`transformers serve` needs its serving dependencies (fastapi, uvicorn, ...): "
                "pip install 'transformers[serving]'")
    return None


def bind_our_classes() -> None:
    """transformers.Qwen2MoeForCausalLM (and the other heads) -> ours, in this process: the server resolves the
    class by that name. Only `qwen2-moe-hf serve` does this; `import qwen2_moe_hf` leaves transformers' names."""
    for cls in OUR_CLASSES:
        setattr(transformers, cls.__name__, cls)


def run(args: argparse.Namespace, passthrough: List[str]) -> int:
    missing = serve_available()
    if missing is not None:
        print(f"qwen2-moe-hf serve: error: {missing}", file=sys.stderr)
        return 2
    if "-h" in passthrough or "--help" in passthrough:
        print(__doc__.strip() + "\n\nOptions of transformers serve, passed through:\n", flush=True)
    bind_our_classes()
    from transformers.cli.transformers import app

    argv = ["serve", *passthrough]
    if args.model:
        argv.append(args.model)  # transformers serve's FORCE_MODEL
    try:
        app(argv, prog_name="qwen2-moe-hf", standalone_mode=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # click's usage errors: printed as click would, with our program name
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0

