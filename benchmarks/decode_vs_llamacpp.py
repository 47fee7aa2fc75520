"""Whole-model batch-1 CPU decode against llama.cpp: `qwen2-moe-hf bench --vs-llamacpp` (qwen2_moe_hf/bench_llamacpp.py,
where the options and the method are described), runnable from a source checkout.

    python benchmarks/decode_vs_llamacpp.py [--layers 4] [--quick] [--workdir DIR] [--rows NAME ...] [--json F]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen2_moe_hf.bench_llamacpp import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
