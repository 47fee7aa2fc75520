"""Hub-layout qwen2_moe checkpoint -> GGUF, and llama.cpp's quantizer on it: qwen2_moe_hf/to_gguf.py, runnable from a
source checkout.

    python benchmarks/to_gguf.py SRC_DIR OUT.gguf [--outtype f16|f32]
    python benchmarks/to_gguf.py --quantize IN.gguf OUT.gguf --type Q4_0|Q4_K_M [--llama-default-embd-output]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen2_moe_hf.to_gguf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
