"""Where an op runs, shared by every kernel module.

CUDA tensors run the Triton kernels; CPU tensors run the torch reference, except under TRITON_INTERPRET=1, where the
Triton kernels run on CPU tensors through the interpreter. Each op's Triton module is imported on first use, so
`import igpt_kernels` works where triton is absent.

Whether triton is installed and whether the interpreter is on are decided once, at import: the decision runs inside the
op wrappers that torch.compile traces, and dynamo refuses to trace calls such as importlib.util.find_spec on some torch
versions, which would break every compiled graph at every op.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class TritonDispatch:
    def __init__(self, op: str, triton_module: str):
        self.op = op
        self.triton_module = triton_module  # e.g. "igpt_kernels._norm_triton"
        self._module = None
        self._warned = False

    def kernels(self):
        """The op's Triton kernel module (imported, with triton, on first use)."""
        if self._module is None:
            self._module = importlib.import_module(self.triton_module)
        return self._module

    def use_triton(self, device: torch.device) -> bool:
        if device.type == "cuda":
            if not TRITON_AVAILABLE and not self._warned:
                warnings.warn(f"triton is not installed: {self.op} on CUDA tensors falls back to the (slow) torch "
                              "reference. Install triton for the fused kernels.", RuntimeWarning, stacklevel=3)
                self._warned = True
            return TRITON_AVAILABLE
        return device.type == "cpu" and INTERPRET
