import os

# Triton reads TRITON_INTERPRET when it is first imported; without a GPU its kernels can only run interpreted.
if os.environ.get("TRITON_INTERPRET") is None:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass
