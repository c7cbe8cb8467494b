"""Eager Decoder: shapes, the AR shift and causality, BERT masking, features, sampling, serialisation, bad input."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from igpt import Decoder, FusedDecoder, IGPTConfig
from igpt.model import (ONEDNN_BF16_NEEDS, IGPTOutput, onednn_available, onednn_packed_linears, onednn_supports,
                        random_bert_mask)

torch.set_num_threads(2)


def tiny(**kw):
    base = dict(n_layer=2, n_embd=32, n_head=4, resolution=4)
    return IGPTConfig(**{**base, **kw})


def randomized(model: Decoder, seed=0) -> Decoder:
    """Fill every parameter with random values: the zero-initialised head would hide most mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def ids_for(cfg, B=2, seed=0):
    return torch.randint(0, cfg.vocab_size, (B, cfg.n_ctx), generator=torch.Generator().manual_seed(seed))


def test_init_follows_reference():
    cfg = IGPTConfig.preset("tiny")
    model = Decoder(cfg)
    assert model.num_params() == cfg.num_params()
    assert torch.all(model.lm_head.weight == 0)
    assert abs(model.wpe.weight.std().item() - 0.01) < 0.002
    assert abs(model.wte.weight.std().item() - 0.02) < 0.003
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 1 / math.sqrt(cfg.n_embd)) < 0.01
    proj_std = 1 / math.sqrt(cfg.n_embd * cfg.n_layer)
    assert abs(model.blocks[0].attn.proj.weight.std().item() - proj_std) < 0.2 * proj_std
    ids = ids_for(cfg, B=1)
    # zero logits at init: the first loss is exactly ln(512)
    assert model.loss(ids).item() == pytest.approx(math.log(512), abs=1e-5)


def test_state_dict_keys_follow_design():
    cfg = tiny(bias=True, n_classes=3)
    sd = Decoder(cfg).state_dict()
    C, V = cfg.n_embd, cfg.vocab_size
    expected = {"wte.weight": (V, C), "sos": (C,), "wpe.weight": (cfg.n_ctx, C), "ln_f.weight": (C,),
                "lm_head.weight": (V, C), "clf_head.weight": (3, C), "clf_head.bias": (3,)}
    for i in range(cfg.n_layer):
        expected.update({
            f"blocks.{i}.ln_1.weight": (C,), f"blocks.{i}.ln_2.weight": (C,),
            f"blocks.{i}.attn.qkv.weight": (3 * C, C), f"blocks.{i}.attn.qkv.bias": (3 * C,),
            f"blocks.{i}.attn.proj.weight": (C, C), f"blocks.{i}.attn.proj.bias": (C,),
            f"blocks.{i}.mlp.fc.weight": (4 * C, C), f"blocks.{i}.mlp.fc.bias": (4 * C,),
            f"blocks.{i}.mlp.proj.weight": (C, 4 * C), f"blocks.{i}.mlp.proj.bias": (C,),
        })
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert not any(k.endswith("bias") and "clf" not in k for k in Decoder(tiny()).state_dict())


def test_ar_causality_and_shift():
    cfg = tiny()
    model = randomized(Decoder(cfg)).eval()
    ids = ids_for(cfg)
    base = model(ids)
    assert base.shape == (2, cfg.n_ctx, cfg.vocab_size)
    for t in (0, 5, cfg.n_ctx - 2):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
        out = model(changed)
        # logits[:, <= t] only see ids[:, < t] (logits[:, t] predicts ids[:, t]) ...
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=0)
        # ... and the next position does see ids[:, t]: this catches a missing SOS shift
        assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4


def test_ar_first_position_depends_only_on_sos():
    cfg = tiny()
    model = randomized(Decoder(cfg)).eval()
    a, b = ids_for(cfg, seed=1), ids_for(cfg, seed=2)
    torch.testing.assert_close(model(a)[:, 0], model(b)[:, 0], rtol=0, atol=0)
    with torch.no_grad():
        model.sos.add_(1.0)
    assert (model(a)[:, 0] - model(b)[:, 0]).abs().max() == 0  # still equal to each other
    assert model.loss(a).requires_grad


def test_bert_is_bidirectional_without_shift():
    cfg = tiny(objective="bert")
    model = randomized(Decoder(cfg)).eval()
    ids = ids_for(cfg)
    base = model(ids)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % cfg.vocab_size
    assert (model(changed)[:, 0] - base[:, 0]).abs().max() > 1e-4  # a later token changes an earlier output
    # no shift: the embedding at t is wte[ids[t]] + wpe[t]
    h0 = model(ids, return_hidden=True).hidden_states[0]
    torch.testing.assert_close(h0, model.wte(ids) + model.wpe.weight[: cfg.n_ctx])


def test_bert_masked_tokens_are_zeroed_and_loss_only_on_masked():
    cfg = tiny(objective="bert")
    model = randomized(Decoder(cfg))
    ids = ids_for(cfg)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, [1, 6, 9]] = True
    h0 = model(ids, bert_mask=mask, return_hidden=True).hidden_states[0]
    torch.testing.assert_close(h0[mask], model.wpe.weight[: cfg.n_ctx].expand(2, -1, -1)[mask])
    # the masked token's identity cannot leak into the output
    other = ids.clone()
    other[mask] = (other[mask] + 7) % cfg.vocab_size
    torch.testing.assert_close(model(ids, bert_mask=mask), model(other, bert_mask=mask), rtol=0, atol=0)
    # loss = mean CE over masked positions only; gradient reaches logits only there
    logits = model(ids, bert_mask=mask)
    expected = torch.nn.functional.cross_entropy(logits[mask], ids[mask])
    torch.testing.assert_close(model.loss(ids, mask), expected)
    probe = logits.detach().requires_grad_(True)
    torch.nn.functional.cross_entropy(probe[mask], ids[mask]).backward()
    assert torch.all(probe.grad[~mask] == 0) and torch.all(probe.grad[mask].abs().sum(-1) > 0)


def test_bert_loss_gradient_flows_only_from_masked_positions():
    cfg = tiny(objective="bert")
    model = randomized(Decoder(cfg))
    ids = ids_for(cfg, B=1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 3] = True
    model.loss(ids, mask).backward()
    # the lm_head gradient is the outer product over masked rows only: rank one here
    assert torch.linalg.matrix_rank(model.lm_head.weight.grad).item() == 1


def test_random_bert_mask_rate():
    m = random_bert_mask((64, 1024), generator=torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and abs(m.float().mean().item() - 0.15) < 0.01


def test_hidden_states_and_features_definition():
    cfg = tiny(n_layer=3)
    model = randomized(Decoder(cfg)).eval()
    ids = ids_for(cfg)
    out = model(ids, return_hidden=True)
    assert isinstance(out, IGPTOutput) and len(out.hidden_states) == cfg.n_layer + 1
    # by hand: f^l = mean_t(ln_1 of block l (h^l)), f^L = mean_t(ln_f(h^L))
    h = out.hidden_states
    expected = [model.blocks[l].ln_1(h[l]).mean(1) for l in range(cfg.n_layer)] + [model.ln_f(h[-1]).mean(1)]
    feats = model.features(ids)
    assert feats.shape == (cfg.n_layer + 1, 2, cfg.n_embd)
    torch.testing.assert_close(feats, torch.stack(expected))
    torch.testing.assert_close(model.features(ids, layers=[2, 0]), torch.stack([expected[2], expected[0]]))
    # h^L is raw (not normed); the logits come from ln_f(h^L)
    torch.testing.assert_close(out.logits, model.lm_head(model.ln_f(h[-1])))
    with pytest.raises(ValueError, match="layers"):
        model.features(ids, layers=[cfg.n_layer + 1])


def test_mlp_inference_runs_quick_gelu_in_place_bit_identical_to_training():
    from igpt.model import MLP, quick_gelu, quick_gelu_

    x = torch.randn(3, 5, 64, dtype=torch.float64) * 4
    assert torch.equal(quick_gelu_(x.clone()), quick_gelu(x))
    torch.testing.assert_close(quick_gelu(x), x * torch.sigmoid(1.702 * x), rtol=1e-12, atol=1e-12)
    mlp = MLP(tiny())
    x = torch.randn(2, 7, tiny().n_embd, requires_grad=True)
    trained = mlp(x)  # autograd path: out of place
    with torch.no_grad():
        assert torch.equal(mlp(x), trained)
    trained.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_classifier_head():
    cfg = tiny(n_classes=5)
    model = randomized(Decoder(cfg))
    ids = ids_for(cfg)
    out = model(ids, return_classes=True)
    torch.testing.assert_close(out.class_logits, model.clf_head(model.ln_f(model(ids, return_hidden=True)
                                                                          .hidden_states[-1]).mean(1)))
    with pytest.raises(ValueError, match="classifier"):
        Decoder(tiny())(ids, return_classes=True)


@pytest.mark.parametrize("prompt_len", [0, 5])
def test_generate_with_cache_matches_teacher_forcing(prompt_len):
    cfg = tiny()
    model = randomized(Decoder(cfg)).double().eval()
    prompt = ids_for(cfg, B=3)[:, :prompt_len]
    g = torch.Generator().manual_seed(0)
    tokens = model.generate(3, prompt=prompt, generator=g)
    assert tokens.shape == (3, cfg.n_ctx) and tokens.dtype == torch.long
    assert torch.equal(tokens[:, :prompt_len], prompt)
    # replaying the same draws against uncached teacher-forced logits gives the same tokens
    g = torch.Generator().manual_seed(0)
    replay = tokens.clone()
    for t in range(prompt_len, cfg.n_ctx):
        probs = torch.softmax(model(replay)[:, t], dim=-1)
        replay[:, t] = torch.multinomial(probs, 1, generator=g).squeeze(1)
    assert torch.equal(replay, tokens)


@pytest.mark.parametrize("model_cls", [Decoder, FusedDecoder])
@pytest.mark.parametrize("prefill", [1, 6])
def test_cached_teacher_forced_logits_match_the_full_forward(model_cls, prefill):
    """Prefill `prefill` positions in one pass, then feed the true tokens one at a time through the KV cache: the
    logits of every position equal the uncached full forward within 1e-5 in fp32."""
    from igpt.model import KVCache

    cfg = tiny()
    model = randomized(model_cls(cfg)).eval()
    ids = ids_for(cfg, B=2)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(cfg.n_layer, 2, cfg.n_head, cfg.n_ctx, cfg.head_dim, "cpu", torch.float32)
        # the AR input at position t is SOS (t = 0) or ids[t-1]: the shifted prefix, as generate() feeds it
        cached = [model._decode_step(model.embed(ids[:, :prefill]), cache)]
        for t in range(prefill, cfg.n_ctx):
            x = model.embed(ids[:, t - 1:t], pos_offset=t, shift=False)
            cached.append(model._decode_step(x, cache))
    cached = torch.cat(cached, dim=1)
    assert cached.shape == full.shape
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
    # generate's prompt pass computes the last position's output only; its cache must serve the next steps the same
    with torch.no_grad():
        cache = KVCache(cfg.n_layer, 2, cfg.n_head, cfg.n_ctx, cfg.head_dim, "cpu", torch.float32)
        last = model._decode_step(model.embed(ids[:, :prefill]), cache, last_only=True)
        after = model._decode_step(model.embed(ids[:, prefill - 1:prefill], pos_offset=prefill, shift=False), cache)
    assert last.shape == (2, 1, cfg.vocab_size) and cache.length == prefill + 1
    torch.testing.assert_close(torch.cat([last, after], 1), full[:, prefill - 1:prefill + 1], rtol=0, atol=1e-5)


def test_generate_top_k_and_errors():
    cfg = tiny()
    model = randomized(Decoder(cfg)).eval()
    tokens = model.generate(2, top_k=1)  # greedy: deterministic
    assert torch.equal(tokens, model.generate(2, top_k=1))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(1, temperature=0)
    with pytest.raises(ValueError, match="AR"):
        Decoder(tiny(objective="bert")).generate(1)


@pytest.mark.parametrize("n_keys", [1, 97, 900])
def test_one_query_attention_on_cpu_matches_float64_within_sdpa_error(n_keys):
    """Decoding's one-query CPU attention (two batched products over the cache's strided slice) against a float64
    reference: its error is at most 2x that of fp32 SDPA (+1e-6), and sdpa_attention takes it for one query."""
    from igpt.model import KVCache, one_query_attention, sdpa_attention

    torch.manual_seed(0)
    cache = KVCache(1, 2, 4, 1024, 32, "cpu", torch.float32)
    k, v = cache.append(0, torch.randn(2, 4, n_keys, 32) * 3, torch.randn(2, 4, n_keys, 32))  # views, as decoding
    q = torch.randn(2, 4, 1, 32) * 3
    assert not k.is_contiguous() or n_keys == 1024
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    ours = one_query_attention(q, k, v)
    sdpa_err = (F.scaled_dot_product_attention(q, k, v).double() - expected).abs().max().item()
    assert ours.shape == q.shape
    assert (ours.double() - expected).abs().max().item() <= 2 * sdpa_err + 1e-6
    assert torch.equal(sdpa_attention(q, k, v, causal=True), ours)


def spy_on_cache_dtypes(monkeypatch):
    """Makes igpt.model.KVCache a subclass that records the dtype of every cache created: (the class, the dtypes)."""
    import igpt.model

    dtypes = []

    class Spy(igpt.model.KVCache):
        def __init__(self, *args):
            super().__init__(*args)
            dtypes.append(self.k[0].dtype)

    monkeypatch.setattr(igpt.model, "KVCache", Spy)
    return Spy, dtypes


def test_generate_under_autocast_on_cpu_attends_in_fp32_and_casts_weights_once(monkeypatch):
    """Under bf16 autocast on CPU the cache stays fp32 and decoding attends in fp32, outside autocast (CPU attention
    with one query is ~3x slower in bf16), and the linear weights are cast once per generate call."""
    import igpt.model

    Spy, dtypes = spy_on_cache_dtypes(monkeypatch)
    seen = set()  # (q dtype, k dtype, autocast on) of every attention call under autocast
    sdpa = igpt.model.sdpa_attention

    def attention_spy(q, k, v, causal):
        if dtypes:
            seen.add((q.dtype, k.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, causal)

    monkeypatch.setattr(igpt.model, "sdpa_attention", attention_spy)
    cfg = tiny()
    model = randomized(Decoder(cfg)).eval()
    params = dict(model.named_parameters())
    prompt = ids_for(cfg)[:, :5]
    model.generate(2, prompt=prompt)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = model.generate(2, prompt=prompt, generator=torch.Generator().manual_seed(0))
        # generate casts the linear weights once (linear_weights_cast); autocast casting them at every call draws the
        # same tokens
        cache = Spy(cfg.n_layer, 2, cfg.n_head, cfg.n_ctx, cfg.head_dim, "cpu", torch.float32)
        with torch.no_grad():
            per_call = model._sample(prompt, cache, 1.0, None, torch.Generator().manual_seed(0))
    assert dtypes == [torch.float32, torch.float32, torch.float32]
    assert seen == {(torch.float32, torch.float32, False)}
    assert tokens.shape == (2, cfg.n_ctx) and torch.equal(tokens[:, :5], prompt)
    assert torch.equal(tokens, per_call)
    assert list(model.named_parameters()) == list(params.items())  # the same Parameter objects, in the same order


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
    import igpt.model

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
        igpt.model.onednn_linear(model[1].weight)
    decoder = randomized(Decoder(tiny())).eval()
    prompt = ids_for(decoder.cfg)[:, :3]

    def sample():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return decoder.generate(2, prompt=prompt, generator=torch.Generator().manual_seed(0))
    tokens = sample()
    monkeypatch.setattr(igpt.model, "onednn_packed_linears", lambda m: igpt.model.contextlib.nullcontext())
    assert torch.equal(tokens, sample())


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(37, 64), (3, 37, 64)])
def test_linear_trains_through_onednn_with_f_linear_results(shape, bias):
    """igpt.model.Linear (fp32, CPU): the oneDNN op runs, and its output and gradients (input, weight, bias) match
    float64 F.linear as closely as fp32 nn.Linear does; two runs are bit-identical."""
    from igpt.model import Linear

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
    import igpt.model
    from igpt.model import Linear

    torch.manual_seed(0)
    layer, x = Linear(16, 8), torch.randn(4, 16)
    monkeypatch.setattr(igpt.model, "DTensor", torch.nn.Parameter)  # every weight looks like a DTensor
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
    model = randomized(Decoder(tiny()))
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


def test_generate_on_cpu_multiplies_through_packed_onednn_weights_unless_compiled(monkeypatch):
    import igpt.model

    packed = []
    monkeypatch.setattr(igpt.model, "onednn_packed_linears",
                        lambda m: packed.append(m) or igpt.model.contextlib.nullcontext())
    model = randomized(Decoder(tiny())).eval()
    model.generate(1, prompt=ids_for(model.cfg)[:1, :3])
    assert packed == [model, model]  # the prompt pass, then the decode steps
    model.sampler_compiled = True  # what compile_sampler(freeze=False) sets: Inductor then picks the GEMMs
    model.generate(1, prompt=ids_for(model.cfg)[:1, :3])
    assert packed == [model, model, model]  # the prompt pass only


def test_compiled_sampler_draws_the_eager_tokens_and_refuses_changed_frozen_weights():
    """compile_sampler (weights frozen into the graph on CPU): one compiled decode step for every cache length, the
    same draws as eager; after the weights change, generate refuses the stale graph until compile_sampler() again,
    which then draws what the eager model with the new weights draws."""
    import copy

    cfg = tiny()
    model = randomized(Decoder(cfg)).eval()
    eager = copy.deepcopy(model)
    prompt = ids_for(cfg)[:, :3]

    def draws(m):
        return [m.generate(2, prompt=prompt[:, :p], generator=torch.Generator().manual_seed(p)) for p in (3, 1)]

    model.compile_sampler()
    before = draws(model)
    assert all(torch.equal(a, b) for a, b in zip(draws(eager), before))
    if onednn_available():  # the frozen graph multiplies through weights Inductor packed for oneDNN
        from igpt.model import KVCache

        cache = KVCache(cfg.n_layer, 2, cfg.n_head, cfg.n_ctx, cfg.head_dim, "cpu", torch.float32)
        with torch.no_grad():
            model._decode_step(model.embed(prompt), cache)
            model._decode_token(prompt[:, :1], cache)
            with torch.profiler.profile() as prof:
                model._decode_token(prompt[:, :1], cache)
        ops = {e.name for e in prof.events()}
        assert "mkldnn::_linear_pointwise" in ops and not ops & {"aten::mm", "aten::linear", "igpt::onednn_linear"}
    with torch.no_grad():
        for m in (model, eager):
            m.lm_head.weight.mul_(-2)  # in place, as an optimizer step would
    with pytest.raises(RuntimeError, match="compile_sampler"):
        model.generate(2, prompt=prompt)
    model.compile_sampler()
    after = draws(model)
    assert all(torch.equal(a, b) for a, b in zip(draws(eager), after))
    assert not all(torch.equal(a, b) for a, b in zip(before, after))


def test_frozen_sampler_under_bf16_autocast_caches_bf16_and_draws_like_eager(monkeypatch):
    """Under bf16 autocast a frozen compiled sampler caches keys and values in bf16 (its fused loops read half the
    bytes; eager CPU decoding keeps an fp32 cache) and draws nearly what eager bf16 sampling draws."""
    import copy

    _, cache_dtypes = spy_on_cache_dtypes(monkeypatch)
    cfg = tiny()
    eager = randomized(Decoder(cfg)).eval()
    model = copy.deepcopy(eager).compile_sampler()
    prompt = ids_for(cfg)[:, :3]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = eager.generate(2, prompt=prompt, generator=torch.Generator().manual_seed(0))
        b = model.generate(2, prompt=prompt, generator=torch.Generator().manual_seed(0))
    assert cache_dtypes == [torch.float32, torch.bfloat16]
    assert b.shape == a.shape and torch.equal(b[:, :3], prompt)
    assert (a == b).float().mean() >= 0.9  # bf16 rounding in another place may flip a rare draw


def test_weights_fingerprint_sees_optimizer_steps_loads_and_moves():
    """What a frozen compiled sampler checks before it runs: any in-place write, load or .to() changes it."""
    model = randomized(Decoder(tiny()))
    model.loss(ids_for(model.cfg)).backward()
    changes = [torch.optim.SGD(model.parameters(), lr=0.1).step, lambda: model.load_state_dict(model.state_dict()),
               lambda: model.to(torch.float64)]
    for change in changes:
        before = model._weights_fingerprint()
        change()
        assert model._weights_fingerprint() != before


def test_save_and_load_round_trip(tmp_path):
    cfg = tiny(bias=True, n_classes=3)
    model = randomized(Decoder(cfg))
    model.save_pretrained(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["bias"] is True
    loaded = Decoder.from_pretrained(tmp_path / "run")
    assert loaded.cfg == cfg
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    again = Decoder.from_pretrained(tmp_path / "run" / "model.safetensors")
    assert torch.equal(again.wte.weight, model.wte.weight)
    assert not list((tmp_path / "run").glob("*.tmp"))  # atomic writes leave no temporaries


def test_corrupt_or_mismatched_checkpoint_errors(tmp_path):
    model = Decoder(tiny())
    run = model.save_pretrained(tmp_path / "run")
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors"):
        Decoder.from_pretrained(run)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Decoder.from_pretrained(tmp_path)
    other = Decoder(tiny(n_embd=64)).state_dict()
    with pytest.raises(ValueError, match="wrong shapes"):
        model.load_state_dict(other)
    (run / "config.json").write_text('{"n_layer": 2, "bogus": 1}')
    Decoder(tiny()).save_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text('{"n_layer": 2, "bogus": 1}')
    with pytest.raises(ValueError, match="bogus"):
        Decoder.from_pretrained(tmp_path / "ok")


def test_bad_inputs():
    cfg = tiny()
    model = Decoder(cfg)
    ids = ids_for(cfg)
    with pytest.raises(TypeError, match="integer"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"0\.\.511"):
        model(ids.masked_fill(ids == ids[0, 0], 512))
    with pytest.raises(ValueError, match=r"0\.\.511"):
        model(ids - 1000)
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, cfg.n_ctx + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        model(ids[0])
    with pytest.raises(ValueError, match="objective='bert'"):
        model(ids, bert_mask=torch.zeros_like(ids, dtype=torch.bool))
    bert = Decoder(tiny(objective="bert"))
    with pytest.raises(TypeError, match="bool"):
        bert(ids, bert_mask=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="shape"):
        bert(ids, bert_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bert_mask"):
        bert.loss(ids)
    with pytest.raises(ValueError, match="palette"):
        model(pixels=torch.zeros(2, cfg.n_ctx, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_autocast_bf16_cpu_runs():
    cfg = tiny()
    model = randomized(Decoder(cfg))
    ids = ids_for(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(ids)
    loss.backward()
    assert torch.isfinite(loss) and model.wte.weight.grad is not None
