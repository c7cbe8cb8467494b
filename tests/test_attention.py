"""attention(): input validation, CPU dispatch, the torch reference, and GPU checks (numerics, bit-identity).

Kernel numerics on CPU run through the interpreter in tests/interpret/test_attention.py; compile checks for sm_80 /
sm_90 in tests/test_attention_compile.py.
"""
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from igpt_kernels import attention, attention_reference
from igpt_kernels.attention import MAX_HEAD_DIM, launch_counts

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def qkv(b=2, h=2, n_q=8, n_k=8, d=16, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, n, d, generator=gen).to(device=device, dtype=dtype) for n in (n_q, n_k, n_k)]


# ---------------------------------------------------------------------------------------------------------------
# Validation: wrong dtype/type -> TypeError, wrong shape/device/value -> ValueError; messages say what to do.
# ---------------------------------------------------------------------------------------------------------------
def _bad(**overrides):
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v, "causal": True, "key_mask": None, "sm_scale": None, "deterministic": False}
    args.update(overrides)
    return args


def _call(args):
    return attention(args["q"], args["k"], args["v"], causal=args["causal"], key_mask=args["key_mask"],
                     sm_scale=args["sm_scale"], deterministic=args["deterministic"])


q0, k0, v0 = qkv()
TYPE_ERRORS = {
    "q_float64": (_bad(q=q0.double(), k=k0.double(), v=v0.double()), r"float64.*float16, bfloat16 and float32"),
    "q_int": (_bad(q=q0.long()), r"int64"),
    "mixed_dtypes": (_bad(k=k0.half()), r"share one dtype"),
    "q_not_tensor": (_bad(q=q0.numpy()), r"q must be a torch.Tensor"),
    "causal_none": (_bad(causal=None), r"causal must be True or False"),
    "causal_int": (_bad(causal=1), r"causal must be True or False"),
    "deterministic_str": (_bad(deterministic="yes"), r"deterministic must be True or False"),
    "mask_float": (_bad(key_mask=torch.ones(2, 8)), r"key_mask must have dtype torch.bool"),
    "mask_list": (_bad(key_mask=[[True] * 8] * 2), r"key_mask must be a bool torch.Tensor"),
    "scale_tensor": (_bad(sm_scale=torch.tensor(0.5)), r"sm_scale must be a Python float"),
}
VALUE_ERRORS = {
    "q_3d": (_bad(q=q0[0]), r"q must be 4-D \[B, H, N, D\]"),
    "kv_shapes_differ": (_bad(v=v0[:, :, :4]), r"k and v must have the same shape"),
    "head_dim_differs": (_bad(k=k0[..., :8], v=v0[..., :8]), r"must agree on B, H and D"),
    "heads_differ": (_bad(k=k0[:, :1], v=v0[:, :1]), r"must agree on B, H and D"),
    "nq_gt_nk": (_bad(k=k0[:, :, :4], v=v0[:, :, :4]), r"Nq = 8 > Nk = 4.*Nq <= Nk"),
    "no_keys": (_bad(k=k0[:, :, :0], v=v0[:, :, :0]), r"Nk = 0"),
    "head_dim_too_big": (_bad(**dict(zip("qkv", qkv(d=MAX_HEAD_DIM * 2)))), r"head dim D = 256.*1 <= D <= 128"),
    "mask_shape": (_bad(key_mask=torch.ones(2, 7, dtype=torch.bool)), r"key_mask must have shape \[B, Nk\] = \[2, 8\]"),
    "mask_3d": (_bad(key_mask=torch.ones(2, 1, 8, dtype=torch.bool)), r"key_mask must have shape"),
    "scale_zero": (_bad(sm_scale=0.0), r"sm_scale must be a finite positive number.*1/sqrt\(D\)"),
    "scale_nan": (_bad(sm_scale=float("nan")), r"finite positive"),
    "scale_negative": (_bad(sm_scale=-1.0), r"finite positive"),
}


@pytest.mark.parametrize("name", TYPE_ERRORS)
def test_type_errors(name):
    args, message = TYPE_ERRORS[name]
    with pytest.raises(TypeError, match=message):
        _call(args)


@pytest.mark.parametrize("name", VALUE_ERRORS)
def test_value_errors(name):
    args, message = VALUE_ERRORS[name]
    with pytest.raises(ValueError, match=message):
        _call(args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device mismatch needs a second device")
def test_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device"):
        attention(q.cuda(), k, v, causal=True)
    with pytest.raises(ValueError, match=r"key_mask.to\(q.device\)"):
        attention(q.cuda(), k.cuda(), v.cuda(), causal=True, key_mask=torch.ones(2, 8, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------
# CPU dispatch and the reference
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(INTERPRET, reason="under TRITON_INTERPRET=1 CPU tensors go to the Triton kernel")
def test_cpu_tensors_use_the_reference():
    q, k, v = qkv()
    before = dict(launch_counts)
    out = attention(q, k, v, causal=True)
    assert dict(launch_counts) == before, "a Triton kernel was launched for CPU tensors outside the interpreter"
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True))


def test_import_does_not_import_triton():
    code = "import sys, igpt_kernels; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


def test_works_without_triton_installed():
    # Simulate an environment without triton: the package imports and the CPU path runs.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, igpt_kernels\n"
        "q = torch.randn(1, 1, 4, 8)\n"
        "out = igpt_kernels.attention(q, q, q, causal=True)\n"
        "assert torch.isfinite(out).all()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_sdpa(causal):
    q, k, v = qkv(n_q=5, n_k=9, dtype=torch.float64)
    mask = torch.rand(2, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, -1] = True  # every row keeps a key, so SDPA (which gives NaN for empty rows) is comparable
    allowed = mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(5, 9, dtype=torch.bool).tril(diagonal=9 - 5)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(attention_reference(q, k, v, causal=causal, key_mask=mask), expected)


def test_reference_causal_is_bottom_right_aligned():
    q, k, v = qkv(b=1, h=1, n_q=3, n_k=6, d=4, dtype=torch.float64)
    out = attention_reference(q, k, v, causal=True)
    for i in range(3):  # query i sees keys 0 .. Nk - Nq + i
        visible = 6 - 3 + i + 1
        row = torch.softmax(q[0, 0, i] @ k[0, 0, :visible].T / 2.0, -1) @ v[0, 0, :visible]
        torch.testing.assert_close(out[0, 0, i], row)


def test_reference_empty_rows_give_zero_and_zero_grads():
    q, k, v = (t.requires_grad_() for t in qkv(dtype=torch.float64))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1] = False
    out = attention_reference(q, k, v, causal=True, key_mask=mask)
    out.sum().backward()
    assert (out[1] == 0).all()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and (t.grad[1] == 0).all()


def test_reference_gradcheck():
    q, k, v = (t.requires_grad_() for t in qkv(b=1, h=1, n_q=3, n_k=5, d=4, dtype=torch.float64))
    mask = torch.tensor([[False, True, True, False, True]])
    assert torch.autograd.gradcheck(lambda a, b, c: attention_reference(a, b, c, causal=True, key_mask=mask),
                                    (q, k, v))


# ---------------------------------------------------------------------------------------------------------------
# Deterministic mode's fixed tile configs (the launches themselves: tests/interpret/test_attention.py)
# ---------------------------------------------------------------------------------------------------------------
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@needs_triton
def test_fixed_config_is_a_pure_function_of_arch_dtype_and_head_dim():
    import random

    from triton.backends.nvidia.compiler import CUDAOptions

    from igpt_kernels import _attention_triton as tk

    calls = [(kind, arch, d, dtype.itemsize) for kind in tk.CONFIG_TABLES for arch in (80, 90)
             for dtype in (torch.float16, torch.bfloat16, torch.float32) for d in range(1, MAX_HEAD_DIM + 1)]
    first = {call: tk.fixed_config(*call) for call in calls}
    random.Random(0).shuffle(calls)  # another call history gives the same answers
    assert {call: tk.fixed_config(*call) for call in calls} == first
    per_group = {}
    for (kind, arch, d, size), config in first.items():
        group = tk.tile_group(d, size)
        entry = tk.unpack_entry(tk.CONFIG_TABLES[kind][arch][group][0])
        got = (config["BLOCK_M"], config["BLOCK_N"], config["num_warps"], config["num_stages"], config.get("maxnreg"))
        assert got == entry, f"{kind} sm_{arch} {group} D={d}: {config} is not the group's first entry {entry}"
        # Launch options a plain kernel[grid](...) accepts (triton raises KeyError on unknown ones).
        assert set(config) - {"BLOCK_M", "BLOCK_N"} <= set(CUDAOptions.__dataclass_fields__), config
        per_group.setdefault((kind, arch, group), set()).add(tuple(sorted(config.items())))
    assert {key[2] for key in per_group} == set(tk.TILE_GROUPS)
    assert all(len(configs) == 1 for configs in per_group.values()), "one config per (arch, group, kernel)"
    assert any("maxnreg" in c for c in first.values()), "no entry carries maxnreg: that branch goes untested"
    for kind, entry in tk.INTERPRET_CONFIGS.items():  # arch None: the interpreter's one config
        assert tk.fixed_config(kind, None, 64, 2) == dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), entry))


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------
GPU_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _gpu_numerics_cases():
    # The first GPU session has minutes: iGPT's head dims (64 for S, 128 for M, 96 for L) in bf16 and fp16 on ragged
    # shapes run by default; the rest of the grid is marked slow (gpu_session.sh runs it in a second call).
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in (16, 32, 64, 96, 128):
            for n_q, n_k in ((97, 97), (1024, 1024), (1, 300), (7, 1030)):
                for causal, key_mask in ((False, False), (True, False), (False, True), (True, True)):
                    first = (dtype != torch.float32 and d in (64, 96, 128) and (n_q, n_k) != (1024, 1024)
                             and causal != key_mask) or (dtype == torch.float32 and d == 64 and n_q == 97)
                    yield pytest.param(causal, key_mask, n_q, n_k, d, dtype, marks=() if first else pytest.mark.slow,
                                       id=f"{str(dtype)[6:]}-d{d}-{n_q}x{n_k}-causal{int(causal)}-mask{int(key_mask)}")


@pytest.mark.gpu
@pytest.mark.parametrize("causal,key_mask,n_q,n_k,d,dtype", list(_gpu_numerics_cases()))
def test_gpu_against_float64(causal, key_mask, n_q, n_k, d, dtype):
    b, h = 2, 3
    deterministic = d in (32, 96)  # both backward variants, without doubling the grid
    gen = torch.Generator().manual_seed(n_q + d)
    q, k, v, do = (torch.randn(b, h, n, d, generator=gen).to(dtype) for n in (n_q, n_k, n_k, n_q))
    mask = (torch.rand(b, n_k, generator=gen) > 0.25).cuda() if key_mask else None

    def run(fn, dt, device, **kw):
        leaves = [t.to(device=device, dtype=dt).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, causal=causal, key_mask=None if mask is None else mask.to(device), **kw)
        out.backward(do.to(device=device, dtype=dt))
        return [out.detach()] + [t.grad for t in leaves]

    before = dict(launch_counts)
    fused = run(attention, dtype, "cuda", deterministic=deterministic)
    assert launch_counts["attn_fwd"] == before.get("attn_fwd", 0) + 1
    exact = run(attention_reference, torch.float64, "cuda")
    plain = run(attention_reference, dtype, "cuda")
    for name, got, ref, base in zip(("out", "dq", "dk", "dv"), fused, exact, plain):
        err = (got.double() - ref).abs().max().item()
        bound = 2 * (base.double() - ref).abs().max().item() + GPU_ATOL[dtype]
        assert err <= bound, f"{name}: {err:.3g} > {bound:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_deterministic_grads_are_bit_identical(causal, dtype):
    q, k, v = qkv(b=4, h=8, n_q=1024, n_k=1024, d=64, dtype=dtype, device="cuda")
    do = torch.randn_like(q)
    mask = torch.rand(4, 1024, device="cuda") > 0.1

    def grads():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, causal=causal, key_mask=mask, deterministic=True).backward(do)
        return [t.grad for t in leaves]

    first = grads()
    for _ in range(10):
        for a, b in zip(first, grads()):
            assert torch.equal(a, b), "deterministic=True gradients differ between runs"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_gpu_deterministic_mode_never_autotunes(dtype, monkeypatch):
    # The plain kernels launch at fixed_config with real launch options (num_warps, num_stages, maxnreg).
    from triton.runtime.autotuner import Autotuner

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"autotuner of {self.fn.__name__} entered in deterministic mode")

    monkeypatch.setattr(Autotuner, "run", refuse)
    q, k, v = (t.requires_grad_() for t in qkv(b=2, h=2, n_q=300, n_k=300, d=64, dtype=dtype, device="cuda"))
    out = attention(q, k, v, causal=True, deterministic=True)
    out.backward(torch.ones_like(out))
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), ref, atol=5e-3 if dtype == torch.float16 else 1e-5, rtol=0)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.gpu
def test_gpu_fully_masked_rows():
    q, k, v = (t.requires_grad_() for t in qkv(n_q=33, n_k=65, d=64, dtype=torch.float16, device="cuda"))
    mask = torch.ones(2, 65, dtype=torch.bool, device="cuda")
    mask[1] = False
    out = attention(q, k, v, causal=True, key_mask=mask)
    out.float().sum().backward()
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all() and (t[1] == 0).all()


@pytest.mark.gpu
def test_gpu_default_scale():
    q, k, v = qkv(d=64, device="cuda")
    torch.testing.assert_close(attention(q, k, v, causal=False),
                               attention(q, k, v, causal=False, sm_scale=1 / math.sqrt(64)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d", [(torch.float16, 64), (torch.bfloat16, 128), (torch.float32, 64)], ids=str)
def test_gpu_autotuner_picks_within_the_group_and_resets_dq(dtype, d):
    # The multi-config paths the interpreter never runs: the prune keeps the call's group only, and the atomic dQ
    # buffer is zeroed between benchmark trials (else the tuning call's dq would be a multiple of the right one).
    tk = importlib.import_module("igpt_kernels.attention")._kernels()
    arch = tk.config_table_arch(torch.cuda.get_device_capability())
    group = tk.tile_group(d, torch.empty(0, dtype=dtype).element_size())
    q, k, v = qkv(b=2, h=4, n_q=700, n_k=700, d=d, dtype=dtype, device="cuda")
    do = torch.randn_like(q)

    def dq_of_one_call():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, causal=True).backward(do)
        return leaves[0].grad.double()

    for kernel in (tk.attn_fwd, tk.attn_bwd_dkdv):
        assert len(kernel.configs) > 1
        kernel.cache.clear()
    tuned = dq_of_one_call()  # this call benchmarks every config of the group
    cached = dq_of_one_call()
    for kind, kernel in (("fwd", tk.attn_fwd), ("dkdv", tk.attn_bwd_dkdv)):
        best = kernel.best_config
        picked = (best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages)
        assert picked in [tuple(e[:4]) for e in tk.CONFIG_TABLES[kind][arch][group]], (kind, picked)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    attention_reference(*leaves, causal=True).backward(do.double())
    scale = leaves[0].grad.abs().max().item()
    assert (tuned - leaves[0].grad).abs().max().item() <= 2e-2 * scale
    assert (tuned - cached).abs().max().item() <= 2e-2 * scale


def test_short_query_sequences_do_not_tune_tall_query_tiles():
    tk = importlib.import_module("igpt_kernels.attention")._kernels()
    for arch in (80, 90):
        for kind in ("fwd", "dq"):
            for group, entries in tk.CONFIG_TABLES[kind][arch].items():
                configs = [tk.to_triton_config(e) for e in entries]
                for bucket in (16, 32, 64, 128, 1024):
                    kept = tk.fit_query_tiles(configs, bucket)
                    assert kept and all(c in configs for c in kept)
                    heights = {c.kwargs["BLOCK_M"] for c in kept}
                    if min(c.kwargs["BLOCK_M"] for c in configs) <= bucket:
                        assert max(heights) <= bucket, (kind, arch, group, bucket, heights)
                    else:
                        assert heights == {min(c.kwargs["BLOCK_M"] for c in configs)}
                assert len(tk.fit_query_tiles(configs, 1024)) == len(configs)
