"""What every rank imports, loaded once by the forkserver the test ranks fork from (harness.py): with spawn each
rank paid for torch, torch._dynamo (torch.optim's step imports it) and DeepSpeed again, 3-5 s per launch."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator at import

import deepspeed  # noqa: E402, F401
import torch  # noqa: E402, F401
import torch._dynamo  # noqa: E402, F401
