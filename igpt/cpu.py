"""CPU speed-ups, applied to a model from outside (as `parallelize` applies FSDP): `apply_cpu_speedups(model)`.

- fp32 CPU linears multiply through oneDNN (`OneDNNLinear`, the custom op `igpt::onednn_linear`): F.linear is MKL's
  sgemm, which is slow on AMD CPUs and small batches (CONTRIBUTING.md, "CPU matmuls").
- Inference MLPs run quick-GELU in place (`InferenceMLP`): fresh [B, N, 4C] pages cost more than the math on CPU.
- No-grad passes can multiply through weights packed once for oneDNN (`onednn_packed_linears`, `inference_linears`).
- A compiled decode step can freeze its weights into the graph (`frozen_weights`), so Inductor packs them for oneDNN.
The model itself (igpt/model.py) knows none of this: every speed-up keeps its results (bit-identical, or the same
products summed in another order: fp32 results can differ in the last bits).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from igpt.model import MLP, quick_gelu

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # builds without torch.distributed
    DTensor = ()  # isinstance(x, ()) is False


def onednn_available() -> bool:
    """oneDNN's packed-weight linear (what torch.compile's CPU weight freezing emits) is in this PyTorch build."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported"))


ONEDNN_LINEAR = onednn_available()  # read by OneDNNLinear.forward (a constant, so torch.compile traces no build checks)
# What torch's oneDNN bf16 check asks of the CPU; AVX2-only CPUs (e.g. AMD Zen 3) have none of it.
ONEDNN_BF16_NEEDS = "AVX512-BW/VL/DQ, AVX-NE-CONVERT or AMX"


def onednn_supports(dtype: torch.dtype) -> bool:
    """oneDNN's linear runs `dtype` on this CPU: fp32 wherever the build has oneDNN, bf16 only where the CPU has
    ONEDNN_BF16_NEEDS (`torch.ops.mkldnn._is_mkldnn_bf16_supported`; elsewhere oneDNN's bf16 weight reorder raises).
    `torch.backends.cpu.get_cpu_capability()` cannot tell: it says "AVX2" also on CPUs with AVX-NE-CONVERT."""
    if not onednn_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def _onednn_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) through oneDNN; `weight` dense [out, in] or packed by `_reorder_linear_weight`. The
    one place that calls the op (no fused activation)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


# ----------------------------------------------------------------------------------------------------------------------
# Training: oneDNN linears (dense weights)


@torch.library.custom_op("igpt::onednn_linear", mutates_args=())
def onednn_linear_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T through oneDNN's matmul (dense weight, no packing), differentiable: the input gradient goes
    through oneDNN too, the weight gradient through torch.mm (MKL), the faster engine for each on the CPUs measured.
    A custom op, so that torch.compile keeps it as one call instead of lowering it to MKL's sgemm."""
    return _onednn_matmul(x.contiguous(), weight.contiguous())


@onednn_linear_op.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _onednn_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _onednn_linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = onednn_linear_op(grad, weight.t().contiguous()) if ctx.needs_input_grad[0] else None
    grad_w = grad.reshape(-1, grad.shape[-1]).t().mm(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w


onednn_linear_op.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup)


class OneDNNLinear(nn.Linear):
    """nn.Linear whose fp32 CPU matmuls run through `onednn_linear_op`. Everything else (autocast, bf16, float64, GPU,
    DTensor weights, builds without oneDNN) calls F.linear, and so do inference graphs being compiled: Inductor
    cannot lower the op with a frozen weight, and packs frozen weights for oneDNN itself (`frozen_weights`)."""

    def forward(self, x):
        w = self.weight
        if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
                and not isinstance(w, DTensor) and not torch.is_autocast_enabled("cpu")
                and ONEDNN_LINEAR and (torch.is_grad_enabled() or not torch.compiler.is_compiling())):
            y = onednn_linear_op(x, w)
            return y if self.bias is None else y + self.bias
        return F.linear(x, w, self.bias)


def quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    """quick_gelu in place, for inference: the same three ops, bit-identical, without two fresh [B, N, 4C] buffers."""
    return F.silu(x.mul_(1.702), inplace=True).div_(1.702)


class InferenceMLP(MLP):
    """MLP whose quick-GELU runs in place where autograd saves nothing (no grad, or an input that needs none)."""

    def forward(self, x):
        h = self.fc(x)
        return self.proj(quick_gelu(h) if torch.is_grad_enabled() and h.requires_grad else quick_gelu_(h))


def apply_cpu_speedups(model: nn.Module) -> nn.Module:
    """In place: every nn.Linear of `model` becomes a `OneDNNLinear`, every MLP an `InferenceMLP` (the class only:
    parameters, state_dict keys and results stay). Harmless off the CPU (both fall back there). Returns `model`."""
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
        elif type(m) is MLP:
            m.__class__ = InferenceMLP
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Inference: packed oneDNN weights, frozen compiled graphs


def onednn_linear(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x -> F.linear(x, weight, bias) through oneDNN, `weight` [out, in] packed once now (a snapshot: later changes to
    the weight are not seen). Inference only. Needs `onednn_supports(weight.dtype)`."""
    if not onednn_supports(weight.dtype):
        why = (f"oneDNN bf16 needs {ONEDNN_BF16_NEEDS}, this CPU has {torch.backends.cpu.get_cpu_capability()}"
               if onednn_available() else "this PyTorch build has no oneDNN linear")
        raise TypeError(f"oneDNN cannot run a {weight.dtype} linear ({why}): check onednn_supports(dtype) first and "
                        "use F.linear where it is False")
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    bias = None if bias is None else bias.detach().to(packed.dtype)

    def forward(x):
        if torch.is_grad_enabled():  # the packed copy is no Parameter: gradients would silently skip the weights
            raise RuntimeError("packed oneDNN linears are for inference: run the model under torch.no_grad()")
        # autocast has no rule for the oneDNN op: cast the input to the weight's dtype, as autocast would
        return _onednn_matmul(x.to(packed.dtype), packed, bias)
    return forward


@contextlib.contextmanager
def onednn_packed_linears(model: nn.Module):
    """Within the block every CPU nn.Linear of `model` with an fp32 or bf16 weight multiplies through oneDNN, its
    weight packed once into oneDNN's blocked layout. Other linears (float64, GPU), bf16 on CPUs where oneDNN cannot
    run it (`onednn_supports`) and builds without oneDNN keep F.linear."""
    dtypes = {dtype for dtype in (torch.float32, torch.bfloat16) if onednn_supports(dtype)}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.device.type == "cpu"
               and m.weight.dtype in dtypes and "forward" not in m.__dict__]  # (not packed yet: nesting is a no-op)
    try:
        for m in linears:
            m.forward = onednn_linear(m.weight, m.bias)  # an instance attribute wins over the class's forward
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)


@contextlib.contextmanager
def inference_linears(model: nn.Module, autocast_dtype: torch.dtype | None = None, pack: bool = True):
    """No-grad inference (sampling, probe features): under autocast (`autocast_dtype`) the linear weights are cast
    once (`linear_weights_cast`), and with `pack` the CPU ones multiply through packed oneDNN weights."""
    from igpt.sampling import linear_weights_cast

    with contextlib.ExitStack() as stack:
        if autocast_dtype is not None:
            stack.enter_context(linear_weights_cast(model, autocast_dtype))
        if pack:
            stack.enter_context(onednn_packed_linears(model))
        yield


def frozen_weights():
    """Around a torch.compile'd call: the graph compiled within takes the parameters as constants (Inductor's weight
    freezing), so casts fold away and CPU linears multiply through weights it packed for oneDNN. The flag is read
    while the graph is compiled, inside the first call; `torch.compile(options={"freezing": True})` did not set it."""
    import torch._inductor.config

    return torch._inductor.config.patch(freezing=True)
