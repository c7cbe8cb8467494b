"""Registering an op's Triton launchers as torch custom ops (torch.ops.igpt.*), shared by every kernel module.

A custom op is opaque to torch.compile: dynamo records one call (shapes from the fake implementation) instead of
tracing the autotuner and the launches, so a model on the kernels compiles with fullgraph=True.
"""
from __future__ import annotations

import torch

_NAMESPACE = "igpt"


def custom_op(name: str, impl, *, fake, backward=None, setup_context=None):
    """torch.ops.igpt.<name> running `impl` (its type hints give the schema; no input is mutated), with `fake` for
    meta/fake tensors and, if given, the autograd formula `backward` / `setup_context`."""
    op = torch.library.custom_op(f"{_NAMESPACE}::{name}", impl, mutates_args=())
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return op
