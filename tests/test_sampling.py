"""The sampler (igpt/sampling.py): the KV cache's dtype under autocast, the linears' casts and packing during
sampling, the compiled step and its frozen-weights check, the uncached reference sampler. Cached decoding against the
full forward: test_model.py."""
import contextlib

import pytest
import torch
from test_model import ids_for, randomized, tiny

import igpt.cpu
import igpt.model
import igpt.sampling
from igpt import Decoder
from igpt.cpu import onednn_available
from igpt.sampling import KVCache, Sampler, compile_sampler, weights_fingerprint

torch.set_num_threads(2)


def spy_on_cache_dtypes(monkeypatch):
    """Makes igpt.sampling.KVCache a subclass that records the dtype of every cache created: (the class, the dtypes)."""
    dtypes = []

    class Spy(igpt.sampling.KVCache):
        def __init__(self, *args):
            super().__init__(*args)
            dtypes.append(self.k[0].dtype)

    monkeypatch.setattr(igpt.sampling, "KVCache", Spy)
    return Spy, dtypes


def test_generate_under_autocast_on_cpu_attends_in_fp32_and_casts_weights_once(monkeypatch):
    """Under bf16 autocast on CPU the cache stays fp32 and decoding attends in fp32, outside autocast (CPU attention
    with one query is ~3x slower in bf16), and the linear weights are cast once per generate call."""

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
            per_call = Sampler(model).sample(prompt, cache, 1.0, None, torch.Generator().manual_seed(0))
    assert dtypes == [torch.float32, torch.float32, torch.float32]
    assert seen == {(torch.float32, torch.float32, False)}
    assert tokens.shape == (2, cfg.n_ctx) and torch.equal(tokens[:, :5], prompt)
    assert torch.equal(tokens, per_call)
    assert list(model.named_parameters()) == list(params.items())  # the same Parameter objects, in the same order



def test_generate_on_cpu_multiplies_through_packed_onednn_weights_unless_compiled(monkeypatch):
    packed = []
    monkeypatch.setattr(igpt.cpu, "onednn_packed_linears", lambda m: packed.append(m) or contextlib.nullcontext())
    model = randomized(Decoder(tiny())).eval()
    model.generate(1, prompt=ids_for(model.cfg)[:1, :3])
    assert packed == [model, model]  # the prompt pass, then the decode steps
    sampler = Sampler(model)
    sampler.compiled = True  # what compile_sampler(freeze=False) sets: Inductor then picks the GEMMs
    sampler.generate(1, prompt=ids_for(model.cfg)[:1, :3])
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

    sampler = compile_sampler(model)
    before = draws(sampler)
    assert all(torch.equal(a, b) for a, b in zip(draws(eager), before))
    if onednn_available():  # the frozen graph multiplies through weights Inductor packed for oneDNN
        cache = KVCache(cfg.n_layer, 2, cfg.n_head, cfg.n_ctx, cfg.head_dim, "cpu", torch.float32)
        with torch.no_grad():
            model.decode(model.embed(prompt), cache)
            sampler.decode_token(prompt[:, :1], cache)
            with torch.profiler.profile() as prof:
                sampler.decode_token(prompt[:, :1], cache)
        ops = {e.name for e in prof.events()}
        assert "mkldnn::_linear_pointwise" in ops and not ops & {"aten::mm", "aten::linear", "igpt::onednn_linear"}
    with torch.no_grad():
        for m in (model, eager):
            m.lm_head.weight.mul_(-2)  # in place, as an optimizer step would
    with pytest.raises(RuntimeError, match="compile_sampler"):
        sampler.generate(2, prompt=prompt)
    sampler = compile_sampler(model)
    after = draws(sampler)
    assert all(torch.equal(a, b) for a, b in zip(draws(eager), after))
    assert not all(torch.equal(a, b) for a, b in zip(before, after))


def test_frozen_sampler_under_bf16_autocast_caches_bf16_and_draws_like_eager(monkeypatch):
    """Under bf16 autocast a frozen compiled sampler caches keys and values in bf16 (its fused loops read half the
    bytes; eager CPU decoding keeps an fp32 cache) and draws nearly what eager bf16 sampling draws."""
    import copy

    _, cache_dtypes = spy_on_cache_dtypes(monkeypatch)
    cfg = tiny()
    eager = randomized(Decoder(cfg)).eval()
    model = compile_sampler(copy.deepcopy(eager))
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
        before = weights_fingerprint(model)
        change()
        assert weights_fingerprint(model) != before




@pytest.mark.parametrize("speedups", [False, True])
def test_uncached_sampler_draws_exactly_the_cached_tokens(monkeypatch, speedups):
    """Sampler(use_cache=False) runs a full forward over the prefix per token and draws through the same `draw` with
    the same generator: on CPU in fp32 the very tokens of the cached sampler, whole images and completions, with and
    without top-k (also with the CPU speed-ups the sample command applies)."""
    cfg = tiny(resolution=16)  # 256 tokens: hundreds of draws per image, each of which a rounding flip would change
    model = randomized(Decoder(cfg), seed=1).eval()
    if speedups:
        igpt.cpu.apply_cpu_speedups(model)
    prompts = ids_for(cfg, B=4, seed=1)
    cases = [(0, None), (cfg.n_ctx // 2, None), (cfg.n_ctx // 2, 16), (cfg.n_ctx - 8, 4)]  # (prompt length, top_k)
    if speedups:
        cases = cases[1:3]
    cached = [Sampler(model).generate(4, prompt=prompts[i:i + 1, :P], top_k=k,
                                      generator=torch.Generator().manual_seed(i)) for i, (P, k) in enumerate(cases)]

    def no_cache(*args):
        raise AssertionError("the uncached sampler built a KV cache")

    monkeypatch.setattr(igpt.sampling, "KVCache", no_cache)
    forwards = []
    model.register_forward_hook(lambda m, args, out: forwards.append(args[0].shape[1]))
    uncached = [Sampler(model, use_cache=False).generate(4, prompt=prompts[i:i + 1, :P], top_k=k,
                                                          generator=torch.Generator().manual_seed(i))
                for i, (P, k) in enumerate(cases)]
    for i, ((P, _), a, b) in enumerate(zip(cases, cached, uncached)):
        assert a.shape == (4, cfg.n_ctx) and torch.equal(a[:, :P], prompts[i:i + 1, :P].expand(4, -1))
        assert torch.equal(a, b)
        assert len(set(map(tuple, a[:, P:].tolist()))) == 4  # four different completions: the draws are random
    assert forwards == [t + 1 for P, _ in cases for t in range(P, cfg.n_ctx)]  # a full forward over 0..t per token


def test_uncached_sampler_cannot_be_compiled():
    with pytest.raises(ValueError, match="use_cache=False"):
        Sampler(randomized(Decoder(tiny())), compile=True, use_cache=False)
