"""Chat with a qwen2_moe model, streaming tokens and printing tokens/s: `qwen2-moe-hf chat` (qwen2_moe_hf/chat.py).

    python examples/chat.py                      # the embedded demo model (made once, offline, then cached)
    python examples/chat.py --model PATH_OR_ID   # a real checkpoint, e.g. Qwen/Qwen1.5-MoE-A2.7B-Chat
    python examples/chat.py --prompt "..."       # one question, no interactive loop

`python examples/chat.py --help` lists the sampling flags; /reset and /exit work in the chat.
"""

import sys

from qwen2_moe_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["chat", *sys.argv[1:]]))
