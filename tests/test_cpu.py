"""CPU speed-ups (igpt/cpu.py): oneDNN linears for training, packed oneDNN weights for inference, in-place
quick-GELU; each keeps the results of the plain model."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from test_model import ids_for, randomized, tiny

import igpt.cpu
from igpt import Decoder
from igpt.cpu import (ONEDNN_BF16_NEEDS, InferenceMLP, apply_cpu_speedups, onednn_available, onednn_packed_linears,
                      onednn_supports, quick_gelu_)
from igpt.cpu import OneDNNLinear as Linear

torch.set_num_threads(2)


def test_mlp_inference_runs_quick_gelu_in_place_bit_identical_to_training():
    from igpt.model import MLP, quick_gelu

    x = torch.randn(3, 5, 64, dtype=torch.float64) * 4
    assert torch.equal(quick_gelu_(x.clone()), quick_gelu(x))
    torch.testing.assert_close(quick_gelu(x), x * torch.sigmoid(1.702 * x), rtol=1e-12, atol=1e-12)
    mlp = apply_cpu_speedups(MLP(tiny()))
    assert isinstance(mlp, InferenceMLP)
    x = torch.randn(2, 7, tiny().n_embd, requires_grad=True)
    trained = mlp(x)  # autograd path: out of place
    with torch.no_grad():
        assert torch.equal(mlp(x), trained)
    trained.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()



NEEDS_ONEDNN_BF16 = pytest.mark.skipif(
    onednn_available() and not onednn_supports(torch.bfloat16),
    reason=f"oneDNN bf16 needs {ONEDNN_BF16_NEEDS}; this CPU has {torch.backends.cpu.get_cpu_capability()} "
           "(its F.linear fallback: test_bf16_linears_fall_back_to_f_linear_where_onednn_cannot_run_bf16)")


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.float32, False),
                                        pytest.param(torch.bfloat16, True, marks=NEEDS_ONEDNN_BF16)])
def test_onednn_packed_linears_compute_the_linear_and_restore_the_modules(dtype, bias):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=bias), torch.nn.Linear(96, 32, bias=bias)).to(dtype)
    params = list(model.parameters())
    with torch.no_grad():
        for x in (torch.randn(4, 1, 64, dtype=dtype), torch.randn(3, 37, 64, dtype=dtype)):  # a decode step, a prompt
            expected = model(x)
            with onednn_packed_linears(model):
                assert all("forward" in m.__dict__ for m in model)
                with onednn_packed_linears(model):  # nested: a no-op that leaves the outer packing in place
                    pass
                assert all("forward" in m.__dict__ for m in model)
                got = model(x)
            assert got.dtype == dtype
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(got, expected, **tol)
    assert all("forward" not in m.__dict__ for m in model) and list(model.parameters()) == params
    with onednn_packed_linears(model), pytest.raises(RuntimeError, match="no_grad"):
        model(torch.randn(2, 64, dtype=dtype))  # the packed weights carry no gradient: refused, not silently wrong
    with onednn_packed_linears(model.double()):  # not a oneDNN dtype: F.linear stays
        assert all("forward" not in m.__dict__ for m in model)


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
def test_bf16_linears_fall_back_to_f_linear_where_onednn_cannot_run_bf16(cpu_without_onednn_bf16, monkeypatch):
    """On a CPU without oneDNN bf16 (AVX2 only; simulated on any CPU): packing leaves bf16 linears to F.linear with
    F.linear's results, bf16 sampling runs and draws what it draws unpacked, and onednn_linear says what is missing."""
    assert not onednn_supports(torch.bfloat16) and onednn_supports(torch.float32)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8).bfloat16())
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model[1](x)
        with onednn_packed_linears(model):
            assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__
            assert torch.equal(model[1](x), expected)
    with pytest.raises(TypeError, match="AVX512-BW.*AVX2.*onednn_supports"):
        igpt.cpu.onednn_linear(model[1].weight)
    decoder = randomized(Decoder(tiny())).eval()
    prompt = ids_for(decoder.cfg)[:, :3]

    def sample():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return decoder.generate(2, prompt=prompt, generator=torch.Generator().manual_seed(0))
    tokens = sample()
    monkeypatch.setattr(igpt.cpu, "onednn_packed_linears", lambda m: contextlib.nullcontext())
    assert torch.equal(tokens, sample())


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(37, 64), (3, 37, 64)])
def test_linear_trains_through_onednn_with_f_linear_results(shape, bias):
    """igpt.cpu.OneDNNLinear (fp32, CPU): the oneDNN op runs, and its output and gradients (input, weight, bias) match
    float64 F.linear as closely as fp32 nn.Linear does; two runs are bit-identical."""
    torch.manual_seed(0)
    ours = Linear(64, 96, bias=bias)
    plain = torch.nn.Linear(64, 96, bias=bias)
    plain.load_state_dict(ours.state_dict())
    reference = torch.nn.Linear(64, 96, bias=bias).double()
    reference.load_state_dict(ours.state_dict())
    x, grad = torch.randn(shape), torch.randn(*shape[:-1], 96)

    def run(layer):  # output, input gradient, parameter gradients, in float64
        x_ = x.to(layer.weight.dtype).clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        y = layer(x_)
        y.backward(grad.to(y.dtype))
        return [t.detach().double() for t in (y, x_.grad, *(p.grad for p in layer.parameters()))]

    got, base, expected = run(ours), run(plain), run(reference)
    for g, b, e in zip(got, base, expected):
        assert (g - e).abs().max() <= 2 * (b - e).abs().max() + 1e-6
    assert all(torch.equal(a, b) for a, b in zip(got, run(ours)))
    graph = torch.export.export(ours, (x,)).graph
    assert any("onednn_linear" in str(n.target) for n in graph.nodes)


def test_linear_leaves_autocast_bf16_float64_and_dtensor_weights_to_f_linear(monkeypatch):
    torch.manual_seed(0)
    layer, x = Linear(16, 8), torch.randn(4, 16)
    monkeypatch.setattr(igpt.cpu, "DTensor", torch.nn.Parameter)  # every weight looks like a DTensor
    assert not any("onednn_linear" in str(n.target) for n in torch.export.export(layer, (x,)).graph.nodes)
    monkeypatch.undo()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        assert got.dtype == torch.bfloat16 and torch.equal(got, F.linear(x, layer.weight, layer.bias))
    layer, x = layer.double(), x.double()
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    for layer, x in ((layer.double(), x), (layer.bfloat16(), x.bfloat16())):
        graph = torch.export.export(layer, (x,)).graph
        assert not any("onednn_linear" in str(n.target) for n in graph.nodes), x.dtype


def test_compiled_training_step_matches_eager_with_onednn_linears():
    """torch.compile(fullgraph) keeps the oneDNN linear as one op, forward and backward: the loss and every gradient
    agree with the eager model."""
    model = apply_cpu_speedups(randomized(Decoder(tiny())))
    ids = ids_for(model.cfg)
    grads = []
    for loss_fn in (model.loss, torch.compile(model.loss, fullgraph=True)):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(ids)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
    for compiled, eager in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


