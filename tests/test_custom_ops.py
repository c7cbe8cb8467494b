"""The Triton path as torch custom ops (torch.ops.igpt.*), checked where the kernels cannot run (CPU, no
interpreter): registration, the fake implementations' shapes/dtypes/devices, and that dynamo traces a FusedDecoder
whose ops take the Triton path into one graph of custom ops. tests/interpret/test_custom_ops.py runs them."""
import importlib
import os
import subprocess
import sys

import pytest
import torch
from fused_parity import randomized_pair, tiny_config
from torch._subclasses.fake_tensor import FakeTensorMode

import igpt.cpu

# igpt_kernels.attention etc. are also the names of the entry-point functions: fetch the modules themselves.
KERNEL_MODULES = [importlib.import_module(f"igpt_kernels.{name}") for name in ("attention", "norm", "embedding")]

OPS = ("attention_fwd", "attention_bwd", "norm_fwd", "norm_bwd", "palette_embedding_fwd", "palette_embedding_bwd")


def test_ops_are_registered_without_importing_triton():
    code = ("import sys, torch, igpt_kernels; "
            f"assert all(hasattr(torch.ops.igpt, n) for n in {OPS!r}); "
            "assert 'triton' not in sys.modules, 'import igpt_kernels imported triton'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", OPS)
def test_schema_is_functional(name):
    schema = getattr(torch.ops.igpt, name).default._schema
    assert not any(a.is_write for a in schema.arguments if a.alias_info), schema


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # fake CUDA tensors need no GPU
def test_fake_attention(device):
    with FakeTensorMode():
        q = torch.empty(2, 3, 5, 16, dtype=torch.float16, device=device)
        k = v = torch.empty(2, 3, 7, 16, dtype=torch.float16, device=device)
        mask = torch.empty(2, 7, dtype=torch.bool, device=device)
        o, lse = torch.ops.igpt.attention_fwd(q, k, v, mask, True, 0.25, False)
        dq, dk, dv = torch.ops.igpt.attention_bwd(o, q, k, v, o, lse, None, True, 0.25, True)
    assert (o.shape, o.dtype, o.device.type) == ((2, 3, 5, 16), torch.float16, device)
    assert o.transpose(1, 2).is_contiguous()  # [B, N, H, D] memory: the output projection reads it as a view
    assert (lse.shape, lse.dtype, lse.device.type) == ((2, 3, 5), torch.float32, device)
    assert [(t.shape, t.dtype, t.device.type) for t in (dq, dk, dv)] == [
        ((2, 3, 5, 16), torch.float16, device), ((2, 3, 7, 16), torch.float16, device),
        ((2, 3, 7, 16), torch.float16, device)]


@pytest.mark.parametrize("with_residual", [False, True])
def test_fake_norm(with_residual):
    with FakeTensorMode():
        x = torch.empty(2, 5, 24, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(24, dtype=torch.bfloat16, device="cuda")
        r = torch.empty_like(x) if with_residual else None
        y, h, rstd = torch.ops.igpt.norm_fwd(x, w, r, 1e-5)
        dx, dr, dw = torch.ops.igpt.norm_bwd(y, h if with_residual else None, h if with_residual else x, w, rstd,
                                             with_residual)
    assert (y.shape, y.dtype, y.device.type) == ((2, 5, 24), torch.bfloat16, "cuda")
    assert h.shape == ((2, 5, 24) if with_residual else (0,)) and h.dtype == torch.bfloat16
    assert (rstd.shape, rstd.dtype) == ((10,), torch.float32)
    assert (dx.shape, dx.dtype) == ((2, 5, 24), torch.bfloat16)
    assert dr.shape == ((2, 5, 24) if with_residual else (0,))
    assert (dw.shape, dw.dtype) == ((24,), torch.bfloat16)


@pytest.mark.parametrize("from_pixels", [False, True])
def test_fake_palette_embedding(from_pixels):
    with FakeTensorMode():
        wte = torch.empty(11, 16, dtype=torch.float16, device="cuda")
        wpe = torch.empty(9, 16, dtype=torch.float16, device="cuda")
        if from_pixels:
            x, centres = torch.empty(2, 5, 3, dtype=torch.uint8, device="cuda"), torch.empty(11, 3, device="cuda")
        else:
            x, centres = torch.empty(2, 5, dtype=torch.int64, device="cuda"), None
        sos = torch.empty(16, dtype=torch.float16, device="cuda")
        h, ids = torch.ops.igpt.palette_embedding_fwd(x, wte, wpe, centres, sos, None, 1)
        dwte, dwpe = torch.ops.igpt.palette_embedding_bwd(h, ids, None, True, 11, 9, 1, True, True)
        _, no_dwpe = torch.ops.igpt.palette_embedding_bwd(h, ids, None, True, 11, 9, 1, True, False)
    assert (h.shape, h.dtype, h.device.type) == ((2, 5, 16), torch.float16, "cuda")
    assert (ids.shape, ids.dtype, ids.device.type) == ((2, 5), torch.int64, "cuda")
    assert (dwte.shape, dwte.dtype) == ((11, 16), torch.float16)
    assert (dwpe.shape, dwpe.dtype) == ((9, 16), torch.float16)
    assert no_dwpe.shape == (0,)


@pytest.fixture
def triton_path(monkeypatch):
    """Entry points take the Triton path on CPU tensors (only traced here, never run)."""
    for module in KERNEL_MODULES:
        monkeypatch.setattr(module, "_use_triton", lambda device: True)


class Loss(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model.loss(ids)


def test_dynamo_traces_the_triton_path_into_one_graph(triton_path):
    cfg = tiny_config()
    _, fused = randomized_pair(cfg)
    igpt.cpu.apply_cpu_speedups(fused)  # and its fp32 CPU linears through the oneDNN op
    ids = torch.randint(0, 512, (2, cfg.n_ctx), generator=torch.Generator().manual_seed(5))
    # strict export = dynamo with fullgraph: a graph break is an error. Fake tensors only: no kernel runs.
    program = torch.export.export(Loss(fused), (ids,), strict=True)
    calls = [str(n.target) for n in program.graph.nodes if str(n.target).startswith("igpt.")]
    linears = [c for c in calls if c == "igpt.onednn_linear.default"]  # fp32 CPU linears (igpt.cpu.OneDNNLinear)
    kernels = [c for c in calls if c not in linears]
    # embedding; per block ln_1, attention, ln_2; ln_f
    assert sorted(kernels) == sorted(["igpt.palette_embedding_fwd.default"] + ["igpt.norm_fwd.default"] * (
        2 * cfg.n_layer + 1) + ["igpt.attention_fwd.default"] * cfg.n_layer), calls
    # per block qkv, proj, fc, proj; lm_head
    assert len(linears) == (4 * cfg.n_layer + 1 if igpt.cpu.ONEDNN_LINEAR else 0)
    # each block's ln_2 adds the attention output to the residual stream inside the norm kernel
    residual_args = [n.args[2] is not None for n in program.graph.nodes if str(n.target) == "igpt.norm_fwd.default"]
    assert residual_args.count(True) == cfg.n_layer, residual_args


def test_fake_training_step_uses_the_backward_ops(triton_path, monkeypatch):
    from torch.fx.experimental.proxy_tensor import make_fx

    # make_fx stands in for the compiler: skip the data-dependent input checks, as compiled code does.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)

    cfg = tiny_config()
    _, fused = randomized_pair(cfg)
    wrapper = Loss(fused)
    params = {k: v.detach().requires_grad_() for k, v in wrapper.named_parameters()}
    ids = torch.randint(0, 512, (2, cfg.n_ctx), generator=torch.Generator().manual_seed(5))

    def step(params, ids):
        loss = torch.func.functional_call(wrapper, params, (ids,))
        return torch.autograd.grad(loss, list(params.values()), allow_unused=True)

    graph = make_fx(step, tracing_mode="fake")(params, ids)
    calls = [str(n.target) for n in graph.graph.nodes if str(n.target).startswith("igpt.")]
    for op, count in (("attention_bwd", cfg.n_layer), ("norm_bwd", 2 * cfg.n_layer + 1), ("palette_embedding_bwd", 1)):
        assert calls.count(f"igpt.{op}.default") == count, calls


def test_the_dispatch_decision_looks_nothing_up_when_called(monkeypatch):
    # use_triton runs inside the traced op wrappers: find_spec / os.environ there can break every compiled graph
    def refuse(*args, **kwargs):
        raise AssertionError("looked up at call time")

    monkeypatch.setattr(importlib.util, "find_spec", refuse)
    monkeypatch.setattr(os.environ, "get", refuse)
    for module in KERNEL_MODULES:
        assert module._use_triton(torch.device("cuda")) is True
        assert module._use_triton(torch.device("cpu")) is False


class OneOp(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _fake_cuda(*shapes_and_dtypes):
    with FakeTensorMode(allow_non_fake_inputs=True):
        return tuple(torch.empty(s, dtype=d, device="cuda") for s, d in shapes_and_dtypes)


@pytest.mark.parametrize("op", ["attention", "attention_decode", "norm", "norm_residual",
                                "palette_embedding"])
def test_each_op_traces_its_cuda_branch_into_one_graph(op):
    # strict export is dynamo with fullgraph=True on fake CUDA tensors: the real dispatch decision, no GPU, no patching
    from igpt_kernels import attention, norm, palette_embedding

    h, fp16 = (2, 5, 32), torch.float16
    cases = {
        "attention": (lambda q, k, v: attention(q, k, v, causal=True),
                      _fake_cuda(((2, 2, 20, 16), fp16), ((2, 2, 23, 16), fp16), ((2, 2, 23, 16), fp16)),
                      "attention_fwd"),
        "attention_decode": (lambda q, k, v: attention(q, k, v, causal=True),
                             _fake_cuda(((2, 2, 1, 16), fp16), ((2, 2, 7, 16), fp16), ((2, 2, 7, 16), fp16)),
                             "attention_decode"),
        "norm": (lambda x, w: norm(x, w, 1e-5), _fake_cuda((h, fp16), ((32,), fp16)), "norm_fwd"),
        "norm_residual": (lambda x, w, r: norm(x, w, 1e-5, residual=r)[0],
                          _fake_cuda((h, fp16), ((32,), fp16), (h, fp16)), "norm_fwd"),
        "palette_embedding": (lambda x, wte, wpe, sos: palette_embedding(x, wte, wpe, sos=sos)[0],
                              _fake_cuda(((2, 5), torch.int64), ((11, 32), fp16), ((9, 32), fp16), ((32,), fp16)),
                              "palette_embedding_fwd"),
    }
    fn, args, expected = cases[op]
    program = torch.export.export(OneOp(fn), args, strict=True)
    calls = [str(n.target) for n in program.graph.nodes if str(n.target).startswith("igpt.")]
    assert calls == [f"igpt.{expected}.default"], calls
