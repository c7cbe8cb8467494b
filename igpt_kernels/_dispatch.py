"""Where an op runs, and the small helpers every kernel module shares.

CUDA tensors run the Triton kernels; CPU tensors run the torch reference, except under TRITON_INTERPRET=1, where the
Triton kernels run on CPU tensors through the interpreter. Each op's Triton module is imported on first use, so
`import igpt_kernels` works where triton is absent. `backend(op, device)` (igpt_kernels.backend) says which of the three
an op uses, without running it.

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
BACKENDS = ("triton", "interpret", "torch")

_OPS: dict[str, TritonDispatch] = {}  # public op name -> its dispatch (the first registered, for attention's two)
_MODULE_NAMES = {"embedding": "palette_embedding"}  # an op may also be named by its module


class TritonDispatch:
    def __init__(self, op: str, triton_module: str):
        self.op = op
        self.triton_module = triton_module  # e.g. "igpt_kernels._norm_triton"
        self._module = None
        self._warned = False
        _OPS.setdefault(op, self)

    def kernels(self):
        """The op's Triton kernel module (imported, with triton, on first use)."""
        if self._module is None:
            self._module = importlib.import_module(self.triton_module)
        return self._module

    def backend(self, device: torch.device) -> str:
        """"triton", "interpret" (the Triton kernels through the interpreter) or "torch" (the reference)."""
        if (device.type == "cuda" and TRITON_AVAILABLE) or (device.type == "cpu" and INTERPRET):
            return "interpret" if INTERPRET else "triton"
        return "torch"

    def use_triton(self, device: torch.device) -> bool:
        if device.type == "cuda" and not TRITON_AVAILABLE and not self._warned:
            warnings.warn(f"triton is not installed: {self.op} on CUDA tensors falls back to the (slow) torch "
                          "reference. Install triton for the fused kernels.", RuntimeWarning, stacklevel=3)
            self._warned = True
        return self.backend(device) != "torch"


def backend(op: str, where) -> str:
    """Which implementation igpt_kernels' `op` runs for tensors on `where` (a tensor, torch.device or device string):
    "triton" (compiled Triton kernels), "interpret" (the Triton kernels through TRITON_INTERPRET=1's interpreter) or
    "torch" (the plain-torch reference in igpt_kernels.reference, e.g. on CPU, or on CUDA without triton).

    op: "attention" (its split-KV decode path included), "norm" or "palette_embedding" (also named "embedding", its
    module). Empty inputs always take the reference whatever this says. Raises TypeError for an argument of the wrong
    type and ValueError for an unknown op.
    """
    if not isinstance(op, str):
        raise TypeError(f"backend: op must be a str, got {type(op).__name__}")
    dispatch = _OPS.get(_MODULE_NAMES.get(op, op))
    if dispatch is None:
        raise ValueError(f"backend: unknown op {op!r}; the ops are {sorted(_OPS)}")
    if isinstance(where, torch.Tensor):
        device = where.device
    elif isinstance(where, (torch.device, str)):
        device = torch.device(where)
    else:
        raise TypeError(f"backend: expected a tensor, torch.device or device string, got {type(where).__name__}")
    return dispatch.backend(device)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids, without importing triton."""
    return -(-a // b)


def config_table_arch(capability_major_minor) -> int:
    """sm_90 gets the Hopper tables; everything else (Ampere, Ada, Blackwell until tuned) the Ampere ones."""
    major, _ = capability_major_minor
    return 90 if major == 9 else 80


def device_arch(device: torch.device) -> int | None:
    """The config table a launch on `device` uses (80 or 90); None under the interpreter or off CUDA."""
    if INTERPRET or device.type != "cuda":
        return None
    return config_table_arch(torch.cuda.get_device_capability(device))
