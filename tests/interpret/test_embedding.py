"""Fused palette embedding through the Triton interpreter (run: TRITON_INTERPRET=1 python -m pytest tests/interpret).

Quantized ids must equal the reference rule exactly (ties and near ties included); h and every gradient must be
within twice plain torch's error (plus a small atol) of a float64 reference. Every test checks, through
`launch_counts`, that the Triton kernels ran rather than the CPU reference.
"""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from igpt_kernels import palette_embedding, palette_embedding_reference, quantize_reference
from igpt_kernels.embedding import launch_counts

# The tie / near-tie constructions live with the default-suite tests (which also check that they are meaningful).
_spec = importlib.util.spec_from_file_location("_tie_cases", Path(__file__).parents[1] / "test_norm_embedding.py")
_ties = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ties)

DTYPES = [torch.float32, torch.float16]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3}
MODES = ["ar", "bert", "neither"]


def _launched(before, name):
    return launch_counts[name] - before.get(name, 0)


def _setup(b, n, v, c, dtype, mode, *, seed, n_positions=None):
    gen = torch.Generator().manual_seed(seed)
    wte = torch.randn(v, c, generator=gen)
    wpe = torch.randn(n_positions or n + 5, c, generator=gen)
    sos = torch.randn(c, generator=gen)
    centres = torch.rand(v, 3, generator=gen) * 2 - 1
    pixels = torch.randint(0, 256, (b, n, 3), dtype=torch.uint8, generator=gen)
    dh = torch.randn(b, n, c, generator=gen).to(dtype)
    mask = torch.rand(b, n, generator=gen) > 0.5 if mode == "bert" else None
    return wte, wpe, sos, centres, pixels, dh, mask


def _run(fn, x, wte, wpe, sos, centres, mask, dh, dtype, mode, pos_offset):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (wte, wpe, sos)]
    kwargs = {"sos": leaves[2]} if mode == "ar" else {"bert_mask": mask} if mode == "bert" else {}
    h, ids = fn(x, leaves[0], leaves[1], centres=centres, pos_offset=pos_offset, **kwargs)
    h.backward(dh.to(dtype))
    grads = [leaves[0].grad, leaves[1].grad] + ([leaves[2].grad] if mode == "ar" else [])
    return h.detach(), ids, grads


def check_against_reference(b, n, v, c, dtype, mode, *, from_pixels, pos_offset, seed=0):
    # n_positions = max(N + 5, p0 + N): offsets near the end use the last position of wpe.
    wte, wpe, sos, centres, pixels, dh, mask = _setup(b, n, v, c, dtype, mode, seed=seed,
                                                      n_positions=max(n + 5, pos_offset + n))
    x = pixels if from_pixels else quantize_reference(pixels, centres)
    before = dict(launch_counts)
    h, ids, grads = _run(palette_embedding, x, wte, wpe, sos, centres, mask, dh, dtype, mode, pos_offset)
    for name in ("embed_fwd", "embed_bwd_wte", "embed_bwd_wpe"):
        assert _launched(before, name) == 1, f"{name}: the Triton kernel did not run"
    h_exact, ids_exact, grads_exact = _run(palette_embedding_reference, x, wte, wpe, sos, centres, mask, dh,
                                           torch.float64, mode, pos_offset)
    h_plain, _, grads_plain = _run(palette_embedding_reference, x, wte, wpe, sos, centres, mask, dh, dtype, mode,
                                   pos_offset)
    assert ids.dtype == torch.int64 and torch.equal(ids, ids_exact), "quantized ids differ from the rule"
    assert h.dtype == dtype
    for name, got, ref, base in zip(("h", "dwte", "dwpe", "dsos"), [h] + grads, [h_exact] + grads_exact,
                                    [h_plain] + grads_plain):
        assert got.dtype == dtype and got.shape == ref.shape, name
        err = (got.double() - ref).abs().max().item()
        base_err = (base.double() - ref).abs().max().item()
        bound = 2 * base_err + ATOL[dtype] * max(1.0, ref.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3g} > 2 x plain torch {base_err:.3g} + atol"


# V = 40 spans three 16-centre tiles (the last one ragged); N = 21 three 8-token tiles; C = 96 / 200 three / seven
# 32-column tiles with a ragged tail at 200.
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("c", [96, 200])
@pytest.mark.parametrize("from_pixels", [True, False], ids=["pixels", "ids"])
@pytest.mark.parametrize("mode", MODES)
def test_grid(mode, from_pixels, c, dtype):
    check_against_reference(2, 21, 40, c, dtype, mode, from_pixels=from_pixels, pos_offset=3, seed=c)


# bf16 under the interpreter relies on igpt_kernels._interpreter_compat (casts rounded to nearest even).
ATOL[torch.bfloat16] = 1e-3


@pytest.mark.parametrize("from_pixels", [True, False], ids=["pixels", "ids"])
@pytest.mark.parametrize("mode", MODES)
def test_bf16(mode, from_pixels):
    check_against_reference(2, 21, 40, 200, torch.bfloat16, mode, from_pixels=from_pixels, pos_offset=3, seed=200)
    # h is one fp32 add of two bf16 values rounded to nearest even, exactly what torch's bf16 add does.
    wte, wpe, sos, centres, pixels, _, mask = (t.bfloat16() if t is not None and t.is_floating_point() else t
                                              for t in _setup(2, 21, 40, 96, torch.float32, mode, seed=5))
    kwargs = {"sos": sos} if mode == "ar" else {"bert_mask": mask} if mode == "bert" else {}
    x = pixels if from_pixels else quantize_reference(pixels, centres.float())
    h, _ = palette_embedding(x, wte, wpe, centres=centres.float(), pos_offset=2, **kwargs)
    h_ref, _ = palette_embedding_reference(x, wte, wpe, centres=centres.float(), pos_offset=2, **kwargs)
    assert torch.equal(h, h_ref)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b,n,pos_offset", [(1, 1, 0), (3, 8, 0), (1, 1, 25), (2, 9, 17)], ids=str)
def test_lengths_and_position_offsets(b, n, pos_offset, mode):
    # Decode steps (N = 1 at an offset), a single full token tile, and a window ending at the last position.
    check_against_reference(b, n, 33, 40, torch.float32, mode, from_pixels=True, pos_offset=pos_offset, seed=n)


@pytest.mark.parametrize("seed", range(3))
def test_quantize_ties_and_near_ties(seed):
    # Exact ties (-> lowest id), ties created by fp32 rounding, and near ties the expanded form or an fma-contracted
    # distance resolve differently: the kernel must follow the rule bit for bit.
    pixels, centres, expected = _ties.tie_cases(n_centres=40, seed=seed)
    wte, wpe = torch.zeros(40, 8), torch.zeros(pixels.shape[1], 8)
    before = dict(launch_counts)
    _, ids = palette_embedding(pixels, wte, wpe, centres=centres)
    assert _launched(before, "embed_fwd") == 1
    assert torch.equal(ids, expected)
    assert torch.equal(ids, quantize_reference(pixels, centres))


def test_quantize_full_palette_random_pixels():
    gen = torch.Generator().manual_seed(7)
    centres = torch.rand(512, 3, generator=gen) * 2 - 1
    pixels = torch.randint(0, 256, (2, 24, 3), dtype=torch.uint8, generator=gen)
    _, ids = palette_embedding(pixels, torch.zeros(512, 8), torch.zeros(24, 8), centres=centres)
    assert torch.equal(ids, quantize_reference(pixels, centres))


def test_strided_inputs():
    # Pixels as a channels-first image permuted to [B, N, 3] (no copy), ids and bert_mask as transposed views.
    gen = torch.Generator().manual_seed(9)
    image = torch.randint(0, 256, (2, 3, 17), dtype=torch.uint8, generator=gen)
    pixels = image.permute(0, 2, 1)
    centres = torch.rand(40, 3, generator=gen) * 2 - 1
    wte, wpe = torch.randn(40, 48, generator=gen), torch.randn(20, 48, generator=gen)
    ids = quantize_reference(pixels, centres).t().contiguous().t()
    mask = (torch.rand(17, 2, generator=gen) > 0.5).t()
    before = dict(launch_counts)
    for x in (pixels, ids):
        h, out_ids = palette_embedding(x, wte, wpe, centres=centres, bert_mask=mask, pos_offset=2)
        h_ref, ids_ref = palette_embedding_reference(x, wte, wpe, centres=centres, bert_mask=mask, pos_offset=2)
        assert torch.equal(out_ids, ids_ref)
        torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    assert _launched(before, "embed_fwd") == 2


def test_no_per_token_distance_tensor_allocated():
    # The fused forward and backward must not materialise the [B, N, V] distances (or anything that large).
    class RecordSizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                # uint8 tensors are the interpreter's byte views of the arguments (and the pixels), not results.
                if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:
                    self.largest = max(self.largest, t.numel())
            return out

    b, n, v, c = 2, 32, 512, 16
    wte, wpe, sos, centres, pixels, dh, _ = _setup(b, n, v, c, torch.float32, "ar", seed=0)
    leaves = [t.requires_grad_() for t in (wte, wpe, sos)]
    with RecordSizes() as rec:
        h, _ = palette_embedding(pixels, *leaves[:2], centres=centres, sos=leaves[2])
        h.backward(dh)
    assert rec.largest > 0, "the recorder saw no tensors: the check would pass vacuously"
    assert rec.largest < b * n * v, f"a tensor of {rec.largest} elements (>= B*N*V = {b * n * v}) was allocated"


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_algorithms_fix_the_wte_gradient_config(deterministic, launch_spy):
    # Under torch.use_deterministic_algorithms(True) d wte (whose BLOCK_R sets the summation order) launches the
    # plain kernel at fixed_config, never through the autotuner; the order-free forward and d wpe stay autotuned.
    from igpt_kernels._embedding_triton import INTERPRET_CONFIGS

    wte, wpe, sos, centres, pixels, dh, _ = _setup(2, 9, 40, 48, torch.float32, "ar", seed=4)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        _run(palette_embedding, pixels, wte, wpe, sos, centres, None, dh, torch.float32, "ar", 0)
    finally:
        torch.use_deterministic_algorithms(previous)
    tuned = ["embed_fwd_kernel", "embed_bwd_wpe_kernel"] + ([] if deterministic else ["embed_bwd_wte_kernel"])
    assert sorted(launch_spy["autotuned"]) == sorted(tuned)
    block_r, block_c, _ = INTERPRET_CONFIGS["bwd_wte"]
    assert ("embed_bwd_wte_kernel", (("BLOCK_C", block_c), ("BLOCK_R", block_r))) in launch_spy["launched"]
