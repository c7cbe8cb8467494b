"""Eager Decoder: shapes, the AR shift and causality, BERT masking, features, cached decoding and generate,
serialisation, bad input. CPU speed-ups: test_cpu.py; the sampler itself: test_sampling.py."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from igpt import Decoder, FusedDecoder, IGPTConfig
from igpt.model import IGPTOutput, random_bert_mask
from igpt.sampling import KVCache

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
    cfg = tiny()
    model = randomized(model_cls(cfg)).eval()
    ids = ids_for(cfg, B=2)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(cfg.n_layer, 2, cfg.n_head, cfg.n_ctx, cfg.head_dim, "cpu", torch.float32)
        # the AR input at position t is SOS (t = 0) or ids[t-1]: the shifted prefix, as generate() feeds it
        cached = [model.decode(model.embed(ids[:, :prefill]), cache)]
        for t in range(prefill, cfg.n_ctx):
            x = model.embed(ids[:, t - 1:t], pos_offset=t, shift=False)
            cached.append(model.decode(x, cache))
    cached = torch.cat(cached, dim=1)
    assert cached.shape == full.shape
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
    # generate's prompt pass computes the last position's output only; its cache must serve the next steps the same
    with torch.no_grad():
        cache = KVCache(cfg.n_layer, 2, cfg.n_head, cfg.n_ctx, cfg.head_dim, "cpu", torch.float32)
        last = model.decode(model.embed(ids[:, :prefill]), cache, last_only=True)
        after = model.decode(model.embed(ids[:, prefill - 1:prefill], pos_offset=prefill, shift=False), cache)
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
    from igpt.model import one_query_attention, sdpa_attention

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

