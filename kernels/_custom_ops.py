"""Registering an op's Triton launchers as torch custom ops (torch.ops.igpt.*), shared by every kernel module.

A custom op is opaque to torch.compile: dynamo records one call (shapes from the fake implementation) instead of
tracing the autotuner and the launches, so a model on the kernels compiles with fullgraph=True.

The ops live in one process-wide table, and this package can be imported twice under two names: `python -m pytest`
puts the repository root on sys.path, and a library that probes for PyPI's `kernels` package (transformers does)
then imports this folder again as `kernels`. Re-registering from that copy would repoint torch.ops.igpt.* at the
copy's launchers (and its own `launch_counts`), so only `igpt_kernels` registers over an existing op; any other copy
uses the op that is there.
"""
from __future__ import annotations

import torch

_NAMESPACE = "igpt"


def _registered(name: str):
    try:
        return getattr(getattr(torch.ops, _NAMESPACE), name)
    except AttributeError:
        return None


def custom_op(name: str, impl, *, fake, backward=None, setup_context=None):
    """torch.ops.igpt.<name> running `impl` (its type hints give the schema; no input is mutated), with `fake` for
    meta/fake tensors and, if given, the autograd formula `backward` / `setup_context`."""
    existing = _registered(name)
    if existing is not None and not impl.__module__.startswith("igpt_kernels."):
        return existing
    op = torch.library.custom_op(f"{_NAMESPACE}::{name}", impl, mutates_args=())
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return op
