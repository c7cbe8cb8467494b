"""norm() and palette_embedding(): validation, CPU dispatch, the torch references, quantize tie cases, GPU checks.

Kernel numerics on CPU run through the interpreter in tests/interpret/test_norm.py and test_embedding.py; compile
checks for sm_80 / sm_90 in tests/test_norm_embedding_compile.py. The tie/near-tie constructions below are shared with
the interpreter tests (they load this file by path).
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from igpt_kernels import norm, norm_reference, palette_embedding, palette_embedding_reference, quantize_reference
from igpt_kernels.embedding import launch_counts as embed_launches
from igpt_kernels.norm import launch_counts as norm_launches
from igpt_kernels.reference import pixel_to_unit_table

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------------------------
# Quantize tie and near-tie constructions
# ---------------------------------------------------------------------------------------------------------------
def _unit(pixels):
    return pixel_to_unit_table().numpy()[pixels.astype(np.int64)]


def rule_distances(pixels, centres):
    """fp32 distances [P, K] of the rule: every difference, square and sum rounded on its own (numpy never fuses).

    pixels uint8 [P, 3]; centres [K, 3] (one palette) or [P, K, 3] (candidates per pixel).
    """
    d = (_unit(pixels)[:, None, :] - centres.astype(np.float32)).astype(np.float32)
    sq = d * d
    return (sq[..., 0] + sq[..., 1]) + sq[..., 2]


def fma_distances(pixels, centres):
    """What a compiler that contracts to fma computes: fma(db, db, fma(dg, dg, dr*dr)) (fp64, then one rounding)."""
    d = (_unit(pixels)[:, None, :] - centres.astype(np.float32)).astype(np.float32).astype(np.float64)
    s = (d[..., 0] * d[..., 0]).astype(np.float32).astype(np.float64)
    s = (d[..., 1] * d[..., 1] + s).astype(np.float32).astype(np.float64)
    return (d[..., 2] * d[..., 2] + s).astype(np.float32)


def expanded_distances(pixels, centres):
    """The expanded form ||x||^2 - 2 x.c + ||c||^2 in fp32 (what a matmul-based quantizer computes)."""
    u = _unit(pixels)[:, None, :]
    c = np.broadcast_to(centres.astype(np.float32), np.broadcast_shapes(u.shape, centres.shape))
    xc = ((u[..., 0] * c[..., 0] + u[..., 1] * c[..., 1]) + u[..., 2] * c[..., 2]).astype(np.float32)
    cc = ((c[..., 0] * c[..., 0] + c[..., 1] * c[..., 1]) + c[..., 2] * c[..., 2]).astype(np.float32)
    uu = ((u[..., 0] * u[..., 0] + u[..., 1] * u[..., 1]) + u[..., 2] * u[..., 2]).astype(np.float32)
    return ((uu - np.float32(2) * xc) + cc).astype(np.float32)


def tie_palette(n_centres=40, seed=0):
    """(pixels uint8 [P, 3], centres fp32 [V, 3]) whose nearest centres tie exactly or nearly under fp32.

    Per pixel a pair (a < b) of centres is planted next to it:
      * exact ties: u +- delta along one channel, or along two different channels (the same rounded square);
      * rounded ties: c_b = c_a moved by one ulp in one channel, where the exact distances differ (c_b nearer) but
        the fp32 rule distances are equal (-> the lowest id, a);
      * near ties that the expanded form, or an fma-contracted distance, resolve differently from the rule.
    The pairs come from a random permutation of the ids, so some share a 16-centre tile of the interpreter's
    search and some straddle tiles. The other centres are random.
    """
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-1, 1, size=(n_centres, 3)).astype(np.float32)
    free_ids = iter(rng.permutation(n_centres).reshape(-1, 2))
    pixels = []
    delta = np.float32(2.0 ** -9)

    def plant(px, ca, cb):
        a, b = sorted(next(free_ids))
        centres[a], centres[b] = ca, cb
        pixels.append(px)

    # Exact ties. Channel values in (-0.85, 0.85): u +- 2^-9 are exact in fp32.
    for k in range(3):
        px = rng.integers(20, 236, size=3).astype(np.uint8)
        u = _unit(px[None])[0]
        ca, cb = u.copy(), u.copy()
        ca[k] += delta
        cb[k] -= delta
        plant(px, ca, cb)
        ca, cb = u.copy(), u.copy()
        ca[k] += delta
        cb[(k + 1) % 3] -= delta
        plant(px, cb, ca)

    # Rounded ties and near ties, found by a vectorised random search over one-ulp perturbations.
    want = {"rounded": 4, "expanded": 4, "fma": 4}
    for _ in range(100):
        px = rng.integers(0, 256, size=(4096, 3)).astype(np.uint8)
        u = _unit(px)
        ca = np.clip(u + rng.normal(0, 0.02, size=u.shape), -1, 1).astype(np.float32)
        cb = ca.copy()
        k = rng.integers(0, 3)
        cb[:, k] = np.nextafter(ca[:, k], np.where(rng.random(len(ca)) < 0.5, -2, 2).astype(np.float32))
        pair = np.stack([ca, cb], axis=1)  # [P, 2, 3]
        rule = rule_distances(px, pair)
        exact = ((u[:, None, :].astype(np.float64) - pair.astype(np.float64)) ** 2).sum(-1)
        pick = rule.argmin(-1)
        kinds = {"rounded": (rule[:, 0] == rule[:, 1]) & (exact[:, 1] < exact[:, 0]),
                 "expanded": expanded_distances(px, pair).argmin(-1) != pick,
                 "fma": fma_distances(px, pair).argmin(-1) != pick}
        for kind, hits in kinds.items():
            for i in np.flatnonzero(hits)[:want[kind]]:
                plant(px[i], ca[i], cb[i])
                want[kind] -= 1
        if not any(want.values()):
            break
    return np.stack(pixels).astype(np.uint8), centres


def tie_cases(n_centres=40, seed=0):
    """(pixels uint8 [1, P, 3], centres fp32 [V, 3], expected ids) with expected from the numpy rule."""
    pixels, centres = tie_palette(n_centres, seed)
    expected = rule_distances(pixels, centres).argmin(-1)  # numpy argmin: first index of the minimum
    return (torch.from_numpy(pixels)[None], torch.from_numpy(centres), torch.from_numpy(expected)[None])


def test_tie_cases_are_meaningful():
    # The constructed palette must contain exact ties and cases the expanded form and an fma-contracted distance get
    # wrong; otherwise the kernel tests built on it could not fail.
    pixels, centres = tie_palette()
    rule = rule_distances(pixels, centres)
    pick = rule.argmin(-1)
    n_ties = int(((rule == rule.min(-1, keepdims=True)).sum(-1) > 1).sum())
    assert n_ties >= 6, f"only {n_ties} exact fp32 ties"
    assert (expanded_distances(pixels, centres).argmin(-1) != pick).sum() >= 1
    assert (fma_distances(pixels, centres).argmin(-1) != pick).sum() >= 1
    ref = quantize_reference(torch.from_numpy(pixels), torch.from_numpy(centres))
    assert torch.equal(ref, torch.from_numpy(pick)), "quantize_reference disagrees with the numpy rule"


# ---------------------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------------------
def test_pixel_table_is_ieee_division_then_subtraction():
    x = np.arange(256, dtype=np.float32)
    expected = (x / np.float32(127.5)).astype(np.float32) - np.float32(1)
    assert np.array_equal(pixel_to_unit_table().numpy(), expected)
    assert pixel_to_unit_table()[0] == -1 and pixel_to_unit_table()[255] == 1


def test_quantize_reference_ties_go_to_the_lowest_id():
    u = pixel_to_unit_table()[torch.tensor([100, 150, 200])]
    d = 2.0 ** -8
    centres = torch.stack([u + torch.tensor([0.5, 0.5, 0.5]), u + torch.tensor([d, 0, 0]),
                           u - torch.tensor([0, 0, d]), u - torch.tensor([d, 0, 0])]).clamp(-1, 1)
    pixels = torch.tensor([[[100, 150, 200]]], dtype=torch.uint8)
    assert quantize_reference(pixels, centres).item() == 1


def test_norm_reference_formula_and_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64) + 1
    w = torch.randn(7, generator=gen, dtype=torch.float64)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(norm_reference(x, w), expected)
    r = torch.randn_like(x)
    y, h = norm_reference(x, w, residual=r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, norm_reference(x + r, w))
    leaves = [t.clone().requires_grad_() for t in (x, w, r)]
    assert torch.autograd.gradcheck(lambda a, b, c: norm_reference(a, b, 1e-5, c), leaves)


def test_norm_reference_fp16_computes_in_fp32():
    x = torch.full((1, 4), 300.0, dtype=torch.float16)  # x^2 = 90000 overflows fp16: fp32 math must not
    y = norm_reference(x, torch.ones(4, dtype=torch.float16))
    assert torch.isfinite(y).all() and torch.allclose(y.float(), torch.ones(1, 4), atol=1e-3)


def _embedding_weights(v=6, c=4, p=9, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(v, c, generator=gen, dtype=dtype), torch.randn(p, c, generator=gen, dtype=dtype),
            torch.randn(c, generator=gen, dtype=dtype))


def test_palette_embedding_reference_modes():
    wte, wpe, sos = _embedding_weights()
    ids = torch.tensor([[0, 5, 2], [3, 3, 1]])
    h, out_ids = palette_embedding_reference(ids, wte, wpe, pos_offset=2)
    assert out_ids is ids
    torch.testing.assert_close(h[1, 2], wte[1] + wpe[4])
    h, _ = palette_embedding_reference(ids, wte, wpe, sos=sos, pos_offset=1)
    torch.testing.assert_close(h[0, 0], sos + wpe[1])
    torch.testing.assert_close(h[0, 2], wte[5] + wpe[3])
    mask = torch.tensor([[True, False, False], [False, False, True]])
    h, _ = palette_embedding_reference(ids, wte, wpe, bert_mask=mask)
    torch.testing.assert_close(h[0, 0], wpe[0])
    torch.testing.assert_close(h[0, 1], wte[5] + wpe[1])
    torch.testing.assert_close(h[1, 2], wpe[2])


def test_palette_embedding_reference_quantizes_pixels():
    wte, wpe, _ = _embedding_weights()
    centres = torch.rand(6, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    pixels = torch.randint(0, 256, (2, 3, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    h, ids = palette_embedding_reference(pixels, wte, wpe, centres=centres)
    assert torch.equal(ids, quantize_reference(pixels, centres))
    torch.testing.assert_close(h, wte[ids] + wpe[:3])


# ---------------------------------------------------------------------------------------------------------------
# Validation: wrong dtype/type -> TypeError, wrong shape/range/value -> ValueError; messages say what to do.
# ---------------------------------------------------------------------------------------------------------------
def _norm_args(**overrides):
    args = {"x": torch.randn(2, 3, 8), "weight": torch.ones(8), "eps": 1e-5, "residual": None}
    args.update(overrides)
    return args


NORM_TYPE_ERRORS = {
    "x_float64": (_norm_args(x=torch.randn(2, 8, dtype=torch.float64)), r"float64.*float16, bfloat16 and float32"),
    "x_int": (_norm_args(x=torch.ones(2, 8, dtype=torch.int64)), r"int64"),
    "x_numpy": (_norm_args(x=np.ones((2, 8), np.float32)), r"x must be a torch.Tensor"),
    "weight_int": (_norm_args(weight=torch.ones(8, dtype=torch.int32)), r"weight has dtype torch.int32"),
    "residual_dtype": (_norm_args(residual=torch.randn(2, 3, 8).half()), r"residual has dtype.*cast"),
    "eps_tensor": (_norm_args(eps=torch.tensor(1e-5)), r"eps must be a Python float"),
}
NORM_VALUE_ERRORS = {
    "weight_shape": (_norm_args(weight=torch.ones(7)), r"weight must have shape \[C\] = \[8\]"),
    "weight_2d": (_norm_args(weight=torch.ones(1, 8)), r"weight must have shape \[C\]"),
    "scalar_x": (_norm_args(x=torch.tensor(1.0), weight=torch.ones(1)), r"at least one dimension"),
    "too_wide": (_norm_args(x=torch.randn(1, 8193), weight=torch.ones(8193)), r"C = 8193.*1 <= C <= 8192"),
    "residual_shape": (_norm_args(residual=torch.randn(3, 8)), r"residual must have x's shape"),
    "eps_negative": (_norm_args(eps=-1.0), r"eps must be finite and >= 0"),
    "eps_nan": (_norm_args(eps=float("nan")), r"eps must be finite"),
}


@pytest.mark.parametrize("name", NORM_TYPE_ERRORS)
def test_norm_type_errors(name):
    args, message = NORM_TYPE_ERRORS[name]
    with pytest.raises(TypeError, match=message):
        norm(args["x"], args["weight"], args["eps"], residual=args["residual"])


@pytest.mark.parametrize("name", NORM_VALUE_ERRORS)
def test_norm_value_errors(name):
    args, message = NORM_VALUE_ERRORS[name]
    with pytest.raises(ValueError, match=message):
        norm(args["x"], args["weight"], args["eps"], residual=args["residual"])


def _embed_args(**overrides):
    wte, wpe, sos = _embedding_weights(v=8, c=4, p=10, dtype=torch.float32)
    args = {"x": torch.randint(0, 256, (2, 5, 3), dtype=torch.uint8), "wte": wte, "wpe": wpe,
            "centres": torch.zeros(8, 3), "sos": None, "bert_mask": None, "pos_offset": 0}
    args.update(overrides)
    return args


def _embed(args):
    return palette_embedding(args["x"], args["wte"], args["wpe"], centres=args["centres"], sos=args["sos"],
                             bert_mask=args["bert_mask"], pos_offset=args["pos_offset"])


_ids = torch.zeros(2, 5, dtype=torch.int64)
EMBED_TYPE_ERRORS = {
    "x_int32": (_embed_args(x=_ids.int()), r"uint8 RGB pixels \[B, N, 3\] or int64 token ids"),
    "x_float": (_embed_args(x=torch.rand(2, 5, 3)), r"uint8 RGB pixels"),
    "x_list": (_embed_args(x=[[1, 2]]), r"x must be a torch.Tensor"),
    "wte_float64": (_embed_args(wte=torch.zeros(8, 4, dtype=torch.float64)), r"wte has dtype torch.float64"),
    "wpe_dtype": (_embed_args(wpe=torch.zeros(10, 4, dtype=torch.float16)), r"wpe has dtype.*cast wpe"),
    "sos_dtype": (_embed_args(x=_ids, sos=torch.zeros(4, dtype=torch.float16)), r"sos has dtype"),
    "centres_float64": (_embed_args(centres=torch.zeros(8, 3, dtype=torch.float64)), r"centres must be float32"),
    "mask_int": (_embed_args(x=_ids, bert_mask=torch.zeros(2, 5, dtype=torch.int64)), r"bert_mask must have dtype"),
    "pos_offset_float": (_embed_args(pos_offset=1.0), r"pos_offset must be a Python int"),
}
EMBED_VALUE_ERRORS = {
    "sos_and_mask": (_embed_args(x=_ids, sos=torch.zeros(4), bert_mask=torch.zeros(2, 5, dtype=torch.bool)),
                     r"sos .* and bert_mask .* were both given"),
    "no_centres": (_embed_args(centres=None), r"pass centres=\[V, 3\]"),
    "pixels_shape": (_embed_args(x=torch.zeros(2, 5, 4, dtype=torch.uint8)), r"pixels must have shape \[B, N, 3\]"),
    "pixels_4d": (_embed_args(x=torch.zeros(2, 2, 2, 3, dtype=torch.uint8)), r"reshape\(B, H \* W, 3\)"),
    "centres_shape": (_embed_args(centres=torch.zeros(7, 3)), r"centres must have shape \[V, 3\] = \[8, 3\]"),
    "centres_range": (_embed_args(centres=torch.full((8, 3), 1.5)), r"centres must lie in \[-1, 1\]"),
    "centres_255": (_embed_args(centres=torch.full((8, 3), 200.0)), r"colours / 127.5 - 1"),
    "centres_nan": (_embed_args(centres=torch.full((8, 3), float("nan"))), r"NaN or inf"),
    "ids_3d": (_embed_args(x=_ids[..., None]), r"ids must have shape \[B, N\]"),
    "ids_too_big": (_embed_args(x=torch.full((2, 5), 8)), r"ids must lie in 0 .. V - 1 = 7, found 8 .. 8"),
    "ids_negative": (_embed_args(x=torch.full((2, 5), -1)), r"found -1"),
    "wte_shape": (_embed_args(wte=torch.zeros(8, 5)), r"same C"),
    "sos_shape": (_embed_args(x=_ids, sos=torch.zeros(5)), r"sos must have shape \[C\] = \[4\]"),
    "mask_shape": (_embed_args(x=_ids, bert_mask=torch.zeros(2, 4, dtype=torch.bool)), r"bert_mask must have shape"),
    "too_long": (_embed_args(pos_offset=6), r"6 .. 10 must lie in 0 .. n_positions - 1 = 9"),
    "negative_offset": (_embed_args(pos_offset=-1), r"must lie in 0"),
}


@pytest.mark.parametrize("name", EMBED_TYPE_ERRORS)
def test_embedding_type_errors(name):
    args, message = EMBED_TYPE_ERRORS[name]
    with pytest.raises(TypeError, match=message):
        _embed(args)


@pytest.mark.parametrize("name", EMBED_VALUE_ERRORS)
def test_embedding_value_errors(name):
    args, message = EMBED_VALUE_ERRORS[name]
    with pytest.raises(ValueError, match=message):
        _embed(args)


def test_centres_within_rounding_of_the_range_are_accepted():
    # As igpt.palette: palettes written by other tools may exceed +-1 by rounding.
    _embed(_embed_args(centres=torch.full((8, 3), 1.0 + 5e-7)))


# ---------------------------------------------------------------------------------------------------------------
# CPU dispatch
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(INTERPRET, reason="under TRITON_INTERPRET=1 CPU tensors go to the Triton kernels")
def test_cpu_tensors_use_the_references():
    before_n, before_e = dict(norm_launches), dict(embed_launches)
    x, w, r = torch.randn(3, 8), torch.randn(8), torch.randn(3, 8)
    y, h = norm(x, w, residual=r)
    ry, rh = norm_reference(x, w, residual=r)
    assert torch.equal(y, ry) and torch.equal(h, rh)
    args = _embed_args(centres=torch.rand(8, 3) * 2 - 1)
    h, ids = _embed(args)
    rh, rids = palette_embedding_reference(args["x"], args["wte"], args["wpe"], centres=args["centres"])
    assert torch.equal(h, rh) and torch.equal(ids, rids)
    assert dict(norm_launches) == before_n and dict(embed_launches) == before_e, \
        "a Triton kernel was launched for CPU tensors outside the interpreter"


def test_works_without_triton_installed():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, igpt_kernels\n"
        "y = igpt_kernels.norm(torch.randn(2, 8), torch.ones(8))\n"
        "h, ids = igpt_kernels.palette_embedding(torch.zeros(1, 2, 3, dtype=torch.uint8), torch.zeros(4, 8),\n"
        "                                        torch.zeros(3, 8), centres=torch.zeros(4, 3))\n"
        "assert torch.isfinite(y).all() and ids.shape == (1, 2)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_embedding_fixed_config_is_the_first_table_entry():
    from triton.backends.nvidia.compiler import CUDAOptions

    from igpt_kernels import _embedding_triton as tk

    for arch in (80, 90):
        block_r, block_c, warps = tk.CONFIG_TABLES["bwd_wte"][arch][0]
        config = tk.fixed_config("bwd_wte", arch)
        assert config == {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": warps, "num_stages": 1}
        assert set(config) - {"BLOCK_R", "BLOCK_C"} <= set(CUDAOptions.__dataclass_fields__)
    block_r, block_c, warps = tk.INTERPRET_CONFIGS["bwd_wte"]
    assert tk.fixed_config("bwd_wte", None) == {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": warps,
                                                "num_stages": 1}


def test_kernels_do_not_import_igpt():
    code = ("import sys, igpt_kernels, igpt_kernels.norm, igpt_kernels.embedding\n"
            "assert not any(m == 'igpt' or m.startswith('igpt.') for m in sys.modules), 'igpt imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------
GPU_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _max_err(got, ref):
    return (got.double() - ref).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("width", [96, 520, 1536, 3072, 4096])
@pytest.mark.parametrize("residual", [False, True])
def test_gpu_norm_against_float64(residual, width, dtype):
    gen = torch.Generator().manual_seed(width)
    x, r, dy, dh = (torch.randn(3, 333, width, generator=gen) for _ in range(4))
    w = 1 + 0.3 * torch.randn(width, generator=gen)

    def run(fn, dt, device):
        leaves = [t.to(device=device, dtype=dt).requires_grad_() for t in (x, w) + ((r,) if residual else ())]
        out = fn(leaves[0], leaves[1], residual=leaves[2] if residual else None)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [g.to(device=device, dtype=dt) for g in (dy, dh)[:len(outs)]])
        return [o.detach() for o in outs] + [t.grad for t in leaves]

    before = dict(norm_launches)
    fused = run(norm, dtype, "cuda")
    assert norm_launches["norm_bwd"] == before.get("norm_bwd", 0) + 1
    exact, plain = run(norm_reference, torch.float64, "cuda"), run(norm_reference, dtype, "cuda")
    for got, ref, base in zip(fused, exact, plain):
        bound = 2 * _max_err(base, ref) + GPU_ATOL[dtype] * max(1.0, ref.abs().max().item())
        assert _max_err(got, ref) <= bound


@pytest.mark.gpu
def test_gpu_norm_weight_grad_is_bit_identical():
    x = torch.randn(8, 1024, 1536, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1536, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)

    def grads():
        x.grad = w.grad = None
        norm(x, w).backward(dy)
        return x.grad.clone(), w.grad.clone()

    first = grads()
    for _ in range(5):
        assert all(torch.equal(a, b) for a, b in zip(first, grads()))


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(3))
def test_gpu_quantize_matches_the_rule_exactly(seed):
    # Exact ties, rounded ties, and near ties that the expanded form or an fma-contracted distance get wrong: the
    # fused kernel must reproduce the rule bit for bit, plus random pixels against a 512-colour palette.
    pixels, centres, expected = tie_cases(n_centres=512, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    random_px = torch.randint(0, 256, (4, 1024, 3), dtype=torch.uint8, generator=gen)
    wte, wpe = torch.zeros(512, 64, device="cuda"), torch.zeros(1024, 64, device="cuda")
    _, ids = palette_embedding(pixels.cuda(), wte, wpe, centres=centres.cuda())
    assert torch.equal(ids.cpu(), expected)
    _, ids = palette_embedding(random_px.cuda(), wte, wpe, centres=centres.cuda())
    assert torch.equal(ids.cpu(), quantize_reference(random_px, centres))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["ar", "bert", "neither"])
def test_gpu_embedding_against_float64(mode, dtype):
    gen = torch.Generator().manual_seed(0)
    b, n, v, c, p = 4, 1024, 512, 512, 1100
    wte, wpe, sos = torch.randn(v, c, generator=gen), torch.randn(p, c, generator=gen), torch.randn(c, generator=gen)
    centres = torch.rand(v, 3, generator=gen) * 2 - 1
    pixels = torch.randint(0, 256, (b, n, 3), dtype=torch.uint8, generator=gen)
    dh = torch.randn(b, n, c, generator=gen)
    kw = {"sos": sos} if mode == "ar" else {"bert_mask": torch.rand(b, n, generator=gen) > 0.5} if mode == "bert" \
        else {}

    def run(fn, dt):
        leaves = [t.to(device="cuda", dtype=dt).requires_grad_() for t in (wte, wpe, sos)]
        extra = {k: (leaves[2] if k == "sos" else t.cuda()) for k, t in kw.items()}
        h, ids = fn(pixels.cuda(), leaves[0], leaves[1], centres=centres.cuda(), pos_offset=3, **extra)
        h.backward(dh.to(device="cuda", dtype=dt))
        return [h.detach(), ids] + [t.grad for t in leaves[:2] + ([leaves[2]] if mode == "ar" else [])]

    fused, exact, plain = run(palette_embedding, dtype), run(palette_embedding_reference, torch.float64), \
        run(palette_embedding_reference, dtype)
    assert torch.equal(fused[1], exact[1])
    for got, ref, base in zip(fused[:1] + fused[2:], exact[:1] + exact[2:], plain[:1] + plain[2:]):
        bound = 2 * _max_err(base, ref) + GPU_ATOL[dtype] * max(1.0, ref.abs().max().item())
        assert _max_err(got, ref) <= bound


@pytest.mark.gpu
def test_gpu_embedding_grads_are_bit_identical():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 8, (16, 1024), generator=gen).cuda()  # few ids: long segments per wte row
    wte = torch.randn(512, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wpe = torch.randn(1024, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    sos = torch.randn(768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dh = torch.randn(16, 1024, 768, device="cuda", dtype=torch.bfloat16)

    def grads():
        for t in (wte, wpe, sos):
            t.grad = None
        palette_embedding(ids, wte, wpe, sos=sos)[0].backward(dh)
        return [t.grad.clone() for t in (wte, wpe, sos)]

    first = grads()
    for _ in range(5):
        assert all(torch.equal(a, b) for a, b in zip(first, grads()))
