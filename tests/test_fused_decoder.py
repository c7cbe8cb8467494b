"""FusedDecoder on CPU (the kernels' torch references): a drop-in for Decoder."""
import pytest
import torch

from fused_parity import assert_same_logits_and_grads, random_palette, randomized_pair, tiny_config
from igpt import Decoder, FusedDecoder

torch.set_num_threads(2)


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_matches_decoder_on_cpu(objective):
    cfg = tiny_config(objective=objective)
    eager, fused = randomized_pair(cfg)
    ids = torch.randint(0, 512, (2, cfg.n_ctx), generator=torch.Generator().manual_seed(1))
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.3 if objective == "bert" else None
    assert_same_logits_and_grads(eager, fused, ids, mask)


def test_same_state_dict_and_pixels_path():
    cfg = tiny_config()
    eager, fused = randomized_pair(cfg)
    assert list(eager.state_dict()) == list(fused.state_dict())
    pal = random_palette()
    eager.attach_palette(pal)
    fused.attach_palette(pal)
    pixels = torch.randint(0, 256, (2, cfg.resolution, cfg.resolution, 3), dtype=torch.uint8)
    torch.testing.assert_close(fused(pixels=pixels), eager(pixels=pixels), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(fused.loss(pixels=pixels), eager.loss(pixels=pixels))
    torch.testing.assert_close(fused.features(pixels=pixels), eager.features(pixels=pixels), rtol=1e-5, atol=1e-5)


def test_generate_matches_decoder():
    cfg = tiny_config()
    eager, fused = randomized_pair(cfg)
    a = eager.generate(3, prompt=torch.tensor([[1, 2, 3]]), generator=torch.Generator().manual_seed(0))
    b = fused.generate(3, prompt=torch.tensor([[1, 2, 3]]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_from_pretrained_loads_into_either_class(tmp_path):
    eager, _ = randomized_pair(tiny_config())
    eager.save_pretrained(tmp_path)
    fused = FusedDecoder.from_pretrained(tmp_path)
    assert isinstance(fused, FusedDecoder)
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), fused.state_dict().values()))
    assert type(Decoder.from_pretrained(tmp_path)) is Decoder


def test_fused_pixel_errors():
    cfg = tiny_config()
    _, fused = randomized_pair(cfg)
    with pytest.raises(ValueError, match="palette"):
        fused(pixels=torch.zeros(1, cfg.n_ctx, 3, dtype=torch.uint8))
    fused.attach_palette(random_palette())
    with pytest.raises(ValueError, match="resize"):
        fused(pixels=torch.zeros(1, 5, 5, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        fused(pixels=torch.zeros(1, cfg.n_ctx, 3, dtype=torch.float32))


def test_torch_compile_fullgraph_training_step_on_cpu():
    cfg = tiny_config()
    eager, fused = randomized_pair(cfg)
    ids = torch.randint(0, 512, (2, cfg.n_ctx), generator=torch.Generator().manual_seed(5))
    compiled_loss = torch.compile(fused.loss, fullgraph=True)  # fullgraph: any graph break is an error
    loss = compiled_loss(ids)
    loss.backward()
    eager.loss(ids).backward()
    torch.testing.assert_close(loss, eager.loss(ids), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(fused.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    opt = torch.optim.AdamW(fused.parameters(), lr=1e-2)
    opt.step()
    assert compiled_loss(ids).item() < loss.item()


@pytest.mark.gpu
def test_torch_compile_fullgraph_on_gpu_runs_the_kernels():
    from igpt_kernels.attention import launch_counts as attention_launches

    cfg = tiny_config()
    eager, fused = randomized_pair(cfg)
    eager, fused = eager.cuda(), fused.cuda()
    ids = torch.randint(0, 512, (2, cfg.n_ctx), device="cuda")
    before = sum(attention_launches.values())
    loss = torch.compile(fused.loss, fullgraph=True)(ids)
    loss.backward()
    torch.testing.assert_close(loss, eager.loss(ids), rtol=1e-4, atol=1e-4)
    assert sum(attention_launches.values()) > before


@pytest.mark.gpu
def test_gpu_bf16_autocast_fused_decoder_matches_decoder():
    # bf16 is the training dtype: FusedDecoder's loss and gradients under bf16 autocast are within 2x Decoder's own
    # bf16 error of the fp32 result (plus a little), as the kernels' numerics promise
    cfg = tiny_config(n_layer=2, n_embd=128, n_head=2, resolution=16)
    eager, fused = randomized_pair(cfg)
    eager, fused = eager.cuda(), fused.cuda()
    ids = torch.randint(0, 512, (4, cfg.n_ctx), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def loss_and_grads(model, autocast):
        model.zero_grad()
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss = model.loss(ids)
        loss.backward()
        return [loss.detach().double()] + [p.grad.double() for p in model.parameters() if p.grad is not None]

    exact = loss_and_grads(eager, False)
    plain = loss_and_grads(eager, True)
    got = loss_and_grads(fused, True)
    assert len(got) == len(exact)
    for i, (g, ref, base) in enumerate(zip(got, exact, plain)):
        err, bound = (g - ref).abs().max().item(), 2 * (base - ref).abs().max().item() + 1e-3 * ref.abs().max().item()
        assert err <= bound, f"tensor {i}: {err:.3g} > {bound:.3g}"
