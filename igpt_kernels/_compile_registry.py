"""The ahead-of-time compile registry: what `python -m igpt_kernels._compile` builds for every Triton kernel.

`entries()` lists one KernelEntry per @triton.jit kernel (see _compile.KernelEntry for the fields): the argument types
the runtime launches it with, the configs its autotuner (or fixed launch plan) may pick per target, and the
specialisations (dtype, head dim, flags) the entry points can reach. The config tables themselves stay with the
kernels (_attention_triton.py, _decode_triton.py, _norm_triton.py, _embedding_triton.py); this module only reads them,
on demand, so importing it imports no triton. A new kernel adds its entries to `entries()`.
"""
from __future__ import annotations

import importlib

from ._compile import KernelConfig, KernelEntry

# Specialisations the sweep compiles; tests/test_attention_compile.py checks they span what attention() accepts.
COMPILE_DTYPES = ("fp16", "bf16", "fp32")
COMPILE_HEAD_DIMS = (16, 32, 64, 96, 128)
# The widths iGPT uses (tiny 256 / s 512 / m 1024 / l 1536 / xl 3072) land in these norm row buckets.
COMPILE_BLOCK_C = (256, 512, 1024, 2048, 4096)
# Embedding modes (from_pixels, ar, bert): pixels or ids x AR / BERT / neither.
COMPILE_EMBEDDING_MODES = tuple((px, ar, bert) for px in (True, False)
                                for ar, bert in ((True, False), (False, True), (False, False)))

_ELEMENT_SIZE = {"fp16": 2, "bf16": 2, "fp32": 4}
# Attention config groups are compiled at their widest head dim, causal with a key mask.
_ATTENTION_REPRESENTATIVE = {"d64": ("fp16", 64), "d128": ("fp16", 128), "fp32": ("fp32", 128)}


def _kernels(name):
    """The Triton kernel module igpt_kernels.<name> (imports triton)."""
    return importlib.import_module(f"igpt_kernels.{name}")


def _tensor_cores(spec):
    return spec["dtype"] in ("fp16", "bf16")


def _pointers(spec, names):
    """{name: pointer type} for data tensors in the spec's dtype; names given as (name, type) keep their own type."""
    ptr = "*" + spec["dtype"]
    return dict(n if isinstance(n, tuple) else (n, ptr) for n in names)


def _entry(name, module, kernel, arguments, configs, config_cases, specialisations, **extra):
    return KernelEntry(name=name, kernel=lambda: getattr(_kernels(module), kernel), arguments=arguments,
                       configs=configs, config_cases=config_cases, specialisations=specialisations, **extra)


def _single_config_entry(name, module, kernel, arguments, config, specialisations, representative, **extra):
    """An entry launched at one config whatever the target and spec, compiled at `representative`."""
    return _entry(name, module, kernel, arguments, configs=lambda arch, spec: [config()],
                  config_cases=lambda arch: [(config(), representative)], specialisations=specialisations, **extra)


# ------------------------------------------------------------------------------------------------------------------
# Attention (main kernels and split-KV decode)
# ------------------------------------------------------------------------------------------------------------------
def _strides(prefix, row):
    # Strides as the JIT specialises them for contiguous-in-D tensors with D a multiple of 16: stride_d == 1 becomes
    # a constexpr (vectorised loads), the others are known to be divisible by 16.
    return {f"stride_{prefix}b": "i32:16", f"stride_{prefix}h": "i32:16", f"stride_{prefix}{row}": "i32:16",
            f"stride_{prefix}d": 1}


def _shape_constexprs(spec):
    d = spec["head_dim"]
    return {"HEAD_DIM": d, "BLOCK_D": max(16, 1 << (d - 1).bit_length())}


def _qkv_arguments(spec, cfg, pointers, scalars):
    """Arguments of a kernel that reads Q, K, V (strided) and the key mask: pointers, strides, scalars, constexprs."""
    args = _pointers(spec, ("Q", "K", "V", ("KEY_MASK", "*u8")) + pointers)
    args.update(_strides("q", "m"), **_strides("k", "n"), **_strides("v", "n"), stride_mb="i32", stride_mn=1)
    args.update(scalars)
    args.update(_shape_constexprs(spec), CAUSAL=spec["causal"], HAS_MASK=spec["key_mask"], **cfg.meta_dict())
    return args


_MAIN_SCALARS = dict(N_HEADS="i32", N_Q="i32", N_K="i32", qk_scale="fp32", sm_scale="fp32", TUNE_N_Q="i32",
                     TUNE_N_K="i32")
_BWD_POINTERS = ("DO", ("LSE", "*fp32"), ("DELTA", "*fp32"))


def _fwd_arguments(spec, cfg):
    return {**_qkv_arguments(spec, cfg, ("O", ("LSE", "*fp32")), _MAIN_SCALARS), **_strides("o", "m")}


def _dkdv_arguments(spec, cfg):
    args = _qkv_arguments(spec, cfg, _BWD_POINTERS + ("DK", "DV", ("DQ_ACC", "*fp32")), _MAIN_SCALARS)
    return {**args, **_strides("do", "m"), "ATOMIC_DQ": spec["atomic_dq"]}


def _dq_arguments(spec, cfg):
    return {**_qkv_arguments(spec, cfg, _BWD_POINTERS + ("DQ",), _MAIN_SCALARS), **_strides("do", "m")}


def _preprocess_arguments(spec, cfg):
    args = _pointers(spec, ("O", "DO", ("DELTA", "*fp32")))
    args.update(N_HEADS="i32", N_Q="i32", **_strides("o", "m"), **_strides("do", "m"), **_shape_constexprs(spec))
    return {**args, **cfg.meta_dict()}


def _split_arguments(spec, cfg):
    # N_Q and N_K are not specialised (do_not_specialize); a split is a multiple of BLOCK_N >= 16 keys
    scalars = dict(N_HEADS="i32", N_Q="i32", N_K="i32", KEYS_PER_SPLIT="i32:16", qk_scale="fp32")
    return _qkv_arguments(spec, cfg, (("ACC", "*fp32"), ("M", "*fp32"), ("L", "*fp32")), scalars)


def _combine_arguments(spec, cfg):
    args = _pointers(spec, (("ACC", "*fp32"), ("M", "*fp32"), ("L", "*fp32"), "O", ("LSE", "*fp32")))
    args.update(_strides("o", "m"), N_HEADS="i32", N_Q="i32", N_SPLITS="i32")
    return {**args, **_shape_constexprs(spec), **cfg.meta_dict()}


def _attention_specs(extra_axes=()):
    """Every dtype x head dim x causal x key mask, times each (name, values) axis in extra_axes."""
    def specs():
        out = []
        for dtype in COMPILE_DTYPES:
            for head_dim in COMPILE_HEAD_DIMS:
                for causal in (False, True):
                    for key_mask in (False, True):
                        base = {"dtype": dtype, "head_dim": head_dim, "causal": causal, "key_mask": key_mask}
                        if not extra_axes:
                            out.append(base)
                        for name, values in extra_axes:
                            out += [{**base, name: value} for value in values]
        return out
    return specs


def _head_specs():
    return [{"dtype": dt, "head_dim": d} for dt in COMPILE_DTYPES for d in COMPILE_HEAD_DIMS]


def _tile_config(table_entry):
    bm, bn, w, s, maxnreg = _kernels("_attention_triton").unpack_entry(table_entry)
    return KernelConfig((("BLOCK_M", bm), ("BLOCK_N", bn)), w, s, maxnreg)


def _attention_entry(name, kind, arguments, mma_tile, extra_axes=()):
    """A main attention kernel: the autotuner's tile group for the call (CONFIG_TABLES[kind]), every config of every
    group compiled at the group's representative spec (with each extra axis at its last value)."""
    def configs(arch, spec):
        tk = _kernels("_attention_triton")
        group = tk.tile_group(spec["head_dim"], _ELEMENT_SIZE[spec["dtype"]])
        return [_tile_config(e) for e in tk.CONFIG_TABLES[kind][arch][group]]

    def config_cases(arch):
        out = []
        for group, table in _kernels("_attention_triton").CONFIG_TABLES[kind][arch].items():
            dtype, head_dim = _ATTENTION_REPRESENTATIVE[group]
            spec = {"dtype": dtype, "head_dim": head_dim, "causal": True, "key_mask": True,
                    **{axis: values[-1] for axis, values in extra_axes}}
            out += [(_tile_config(e), spec) for e in table]
        return out

    return _entry(name, "_attention_triton", f"attn_{kind}_kernel" if kind == "fwd" else f"attn_bwd_{kind}_kernel",
                  arguments, configs, config_cases, _attention_specs(extra_axes),
                  mma_rows=lambda cfg: cfg.meta_dict()[mma_tile], uses_tensor_cores=_tensor_cores)


def _decode_split_config(arch, spec):
    td = _kernels("_decode_triton")
    block_n, num_warps, num_stages = td.decode_config(arch, _ELEMENT_SIZE[spec["dtype"]], spec["head_dim"])
    return KernelConfig((("BLOCK_M", td.BLOCK_M), ("BLOCK_N", block_n)), num_warps, num_stages)


def _decode_split_cases(arch):
    # One config per (target, dtype group, head dim): the config cases are the specialisations causal with a key
    # mask, once per dtype group (bf16 shares fp16's configs).
    specs = [s for s in _attention_specs()() if s["causal"] and s["key_mask"] and s["dtype"] != "bf16"]
    return [(_decode_split_config(arch, s), s) for s in specs]


def _attention_entries():
    def preprocess_config():
        return KernelConfig((("BLOCK_M", _kernels("_attention_triton").PREPROCESS_BLOCK_M),), 4, 1)

    def combine_config():
        td = _kernels("_decode_triton")
        return KernelConfig((("BLOCK_M", td.BLOCK_M),), td.COMBINE_WARPS, 1)

    widest = {"dtype": "fp32", "head_dim": 128}
    return [
        _attention_entry("attention.fwd", "fwd", _fwd_arguments, "BLOCK_M"),
        # dK/dV: the program's keys are the M operand
        _attention_entry("attention.bwd_dkdv", "dkdv", _dkdv_arguments, "BLOCK_N", (("atomic_dq", (False, True)),)),
        _attention_entry("attention.bwd_dq", "dq", _dq_arguments, "BLOCK_M"),
        _single_config_entry("attention.bwd_preprocess", "_attention_triton", "attn_bwd_preprocess_kernel",
                             _preprocess_arguments, preprocess_config, _head_specs, widest),
        _entry("attention.decode_split", "_decode_triton", "attn_decode_split_kernel", _split_arguments,
               configs=lambda arch, spec: [_decode_split_config(arch, spec)], config_cases=_decode_split_cases,
               specialisations=_attention_specs(),
               mma_rows=lambda cfg: cfg.meta_dict()["BLOCK_M"],  # below wgmma's 64 rows: mma.sync on sm_90 too
               uses_tensor_cores=_tensor_cores),
        _single_config_entry("attention.decode_combine", "_decode_triton", "attn_decode_combine_kernel",
                             _combine_arguments, combine_config, _head_specs, widest),
    ]


# ------------------------------------------------------------------------------------------------------------------
# Norm
# ------------------------------------------------------------------------------------------------------------------
def _norm_fwd_arguments(spec, cfg):
    args = _pointers(spec, ("X", "R", "W", "Y", "H", ("RSTD", "*fp32")))
    return {**args, "stride_x": "i32:16", "stride_r": "i32:16", "stride_y": "i32:16", "stride_h": "i32:16",
            "N_COLS": "i32", "eps": "fp32", "HAS_RESIDUAL": spec["residual"], **cfg.meta_dict()}


def _norm_bwd_arguments(spec, cfg):
    args = _pointers(spec, ("DY", "DH_OUT", "H", "W", ("RSTD", "*fp32"), "DX", "DR", ("DG_PARTIAL", "*fp32")))
    return {**args, "stride_dy": "i32:16", "stride_dho": "i32:16", "stride_h": "i32:16", "stride_dx": "i32:16",
            "stride_dr": "i32:16", "N_ROWS": "i32", "N_COLS": "i32", "HAS_DH_OUT": spec["residual"],
            "HAS_RESIDUAL": spec["residual"], **cfg.meta_dict()}


def _norm_entries():
    def config(arch, bc):
        return KernelConfig((("BLOCK_C", bc),), _kernels("_norm_triton").NUM_WARPS[arch][bc], 1)

    def config_cases(arch):
        # Every row-width bucket of the table, at the heaviest specialisation (fp32, fused residual).
        return [(config(arch, bc), {"dtype": "fp32", "residual": True, "block_c": bc})
                for bc in _kernels("_norm_triton").NUM_WARPS[arch]]

    def specialisations():
        return [{"dtype": dt, "residual": res, "block_c": bc}
                for dt in COMPILE_DTYPES for res in (False, True) for bc in COMPILE_BLOCK_C]

    return [_entry(f"norm.{kind}", "_norm_triton", f"norm_{kind}_kernel", arguments,
                   configs=lambda arch, spec: [config(arch, spec["block_c"])], config_cases=config_cases,
                   specialisations=specialisations)
            for kind, arguments in (("fwd", _norm_fwd_arguments), ("bwd", _norm_bwd_arguments))]


# ------------------------------------------------------------------------------------------------------------------
# Palette embedding
# ------------------------------------------------------------------------------------------------------------------
def _embed_fwd_arguments(spec, cfg):
    args = _pointers(spec, (("X", "*u8"), ("TABLE", "*fp32"), ("CENTRES", "*fp32"), ("IDS_IN", "*i64"),
                            ("BERT_MASK", "*u8"), "WTE", "WPE", "SOS", "H", ("IDS_OUT", "*i64")))
    return {**args, "stride_xb": "i32", "stride_xn": "i32", "stride_xc": 1, "stride_ib": "i32", "stride_in": 1,
            "stride_mb": "i32", "stride_mn": 1, "stride_wte": "i32:16", "stride_wpe": "i32:16",
            "N": "i32", "V": "i32", "C": "i32:16", "pos_offset": "i32",
            "FROM_PIXELS": spec["from_pixels"], "AR": spec["ar"], "BERT": spec["bert"], **cfg.meta_dict()}


def _embed_bwd_wte_arguments(spec, cfg):
    args = _pointers(spec, ("DH", ("ORDER", "*i64"), ("STARTS", "*i64"), ("COUNTS", "*i64"), "DWTE"))
    return {**args, "stride_dwte": "i32:16", "C": "i32:16", **cfg.meta_dict()}


def _embed_bwd_wpe_arguments(spec, cfg):
    args = _pointers(spec, ("DH", "DWPE"))
    return {**args, "stride_dwpe": "i32:16", "B": "i32", "N": "i32", "C": "i32:16", "pos_offset": "i32",
            **cfg.meta_dict()}


def _embedding_entry(kind, arguments, specialisations, representative):
    """An embedding kernel: every config of CONFIG_TABLES[kind][arch] for every spec, compiled at `representative`."""
    def configs(arch, spec):
        te = _kernels("_embedding_triton")
        return [KernelConfig(tuple(meta.items()), warps, 1)
                for meta, warps in (te.meta_of(kind, e) for e in te.CONFIG_TABLES[kind][arch])]

    return _entry(f"embedding.{kind}", "_embedding_triton", f"embed_{kind}_kernel", arguments, configs,
                  lambda arch: [(cfg, representative) for cfg in configs(arch, representative)], specialisations)


def _embedding_entries():
    def fwd_specs():
        return [{"dtype": dt, "from_pixels": px, "ar": ar, "bert": bert}
                for dt in COMPILE_DTYPES for px, ar, bert in COMPILE_EMBEDDING_MODES]

    def bwd_specs():
        return [{"dtype": dt} for dt in COMPILE_DTYPES]

    # Configs are compiled at the heaviest forward (pixels, BERT mask, fp32) and fp32 gradients.
    return [
        _embedding_entry("fwd", _embed_fwd_arguments, fwd_specs,
                         {"dtype": "fp32", "from_pixels": True, "ar": False, "bert": True}),
        _embedding_entry("bwd_wte", _embed_bwd_wte_arguments, bwd_specs, {"dtype": "fp32"}),
        _embedding_entry("bwd_wpe", _embed_bwd_wpe_arguments, bwd_specs, {"dtype": "fp32"}),
    ]


def entries() -> list[KernelEntry]:
    """Every kernel's compile entry, in table order: attention, split-KV decode, norm, embedding."""
    return _attention_entries() + _norm_entries() + _embedding_entries()
