"""Hugging Face `ImageGPT` <-> `Decoder` weight conversion, and the conversion command.

    python -m igpt.convert --from-hf openai/imagegpt-small --out runs/igpt-s    # HF dir or hub id -> our run dir
    python -m igpt.convert --to-hf runs/demo --out hf/demo                      # our weights -> a transformers dir

HF layout differences handled here: `Conv1D` weights are stored [in, out] (transposed vs nn.Linear), q|k|v are one
`c_attn`, the start-of-sequence vector is row 512 of `transformer.wte` (vocab 513), the classifier is `score` (no bias).
HF input ids are `[512] + ids[:, :-1]`; with those, HF logits equal ours. (TF1 checkpoints need TensorFlow: out of scope.)
The palette is the processor's `clusters` (preprocessor_config.json); its quantisation matches `Palette.quantize`
except at floating-point ties. Its resize differs from our data pipeline: the processor resizes the whole image to
R x R with PIL bilinear (aspect ratio not kept, no crop), ours resizes the shorter side with a box filter and crops;
`--resize hf` on igpt.probe reproduces the processor's (igpt.sources.resize_hf).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from igpt import cli
from igpt.config import IGPTConfig
from igpt.model import Decoder

# our block parameter -> (HF block parameter, stored transposed)
_BLOCK_MAP = {
    "ln_1.weight": "ln_1.weight",
    "ln_2.weight": "ln_2.weight",
    "attn.qkv": "attn.c_attn",
    "attn.proj": "attn.c_proj",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}
_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


def config_from_hf(hf_config, n_classes: int | None = None, bias: bool = False) -> IGPTConfig:
    """IGPTConfig for an HF `ImageGPTConfig`; rejects options our model does not implement."""
    c = hf_config
    problems = []
    if c.vocab_size < 2:
        problems.append(f"vocab_size={c.vocab_size}")
    if getattr(c, "activation_function", "quick_gelu") != "quick_gelu":
        problems.append(f"activation_function={c.activation_function!r} (iGPT uses quick_gelu)")
    if getattr(c, "n_inner", None) not in (None, 4 * c.n_embd):
        problems.append(f"n_inner={c.n_inner} (iGPT uses 4 * n_embd)")
    if getattr(c, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if not getattr(c, "scale_attn_weights", True):
        problems.append("scale_attn_weights=False")
    if getattr(c, "add_cross_attention", False):
        problems.append("add_cross_attention=True")
    side = math.isqrt(c.n_positions)
    if side * side != c.n_positions:
        problems.append(f"n_positions={c.n_positions} is not a square image")
    if problems:
        raise ValueError("this ImageGPT config cannot be represented by igpt.Decoder: " + ", ".join(problems))
    return IGPTConfig(n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head, resolution=side,
                      vocab_size=c.vocab_size - 1, objective="ar", bias=bias, n_classes=n_classes,
                      norm_eps=c.layer_norm_epsilon)


def hf_config_kwargs(cfg: IGPTConfig) -> dict:
    """Keyword arguments for `transformers.ImageGPTConfig` matching `cfg` (dropout off: iGPT has none)."""
    return dict(vocab_size=cfg.vocab_size + 1, n_positions=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                n_head=cfg.n_head, activation_function="quick_gelu", layer_norm_epsilon=cfg.norm_eps,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                **({"num_labels": cfg.n_classes} if cfg.n_classes else {}))


def from_hf(hf_model, bias: bool | None = None) -> Decoder:
    """`Decoder` from an `ImageGPTForCausalImageModeling` or `ImageGPTForImageClassification`.

    bias=None keeps the HF linear-layer biases exactly when any of them is non-zero (checkpoints converted from the
    reference code carry all-zero biases, which are dropped); bias=False with non-zero biases is an error, never a
    silent drop."""
    cfg, state = convert_hf_model(hf_model, bias)
    model = Decoder(cfg)
    model.load_state_dict(state)
    return model


def convert_hf_model(hf_model, bias: bool | None = None) -> tuple[IGPTConfig, dict]:
    """(IGPTConfig, our state_dict) of an HF ImageGPT model; `bias` as for `from_hf`."""
    sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
    bias_keys = [k for k in sd if k.startswith("transformer.h.") and k.endswith(".bias") and ".attn.bias" not in k
                 and ".masked_bias" not in k]
    nonzero = [k for k in bias_keys if sd[k].abs().max() > 0]
    if bias is None:
        bias = bool(nonzero)
    elif not bias and nonzero:
        raise ValueError(f"the HF model has non-zero biases ({nonzero[:3]}...); convert with bias=True or None")
    n_classes = sd["score.weight"].shape[0] if "score.weight" in sd else None
    cfg = config_from_hf(hf_model.config, n_classes=n_classes, bias=bias)
    return cfg, state_dict_from_hf(sd, cfg)


def state_dict_from_hf(sd: dict, cfg: IGPTConfig) -> dict:
    V = cfg.vocab_size
    out = {
        "wte.weight": sd["transformer.wte.weight"][:V],
        "sos": sd["transformer.wte.weight"][V],
        "wpe.weight": sd["transformer.wpe.weight"],
        "ln_f.weight": sd["transformer.ln_f.weight"],
    }
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    else:  # a classification model carries no generative head; keep ours at its zero init
        out["lm_head.weight"] = torch.zeros(V, cfg.n_embd, dtype=sd["transformer.wte.weight"].dtype)
    if cfg.n_classes:
        out["clf_head.weight"] = sd["score.weight"]
        out["clf_head.bias"] = torch.zeros(cfg.n_classes, dtype=sd["score.weight"].dtype)
    for i in range(cfg.n_layer):
        for ours, theirs in _BLOCK_MAP.items():
            src = f"transformer.h.{i}.{theirs}"
            if ours in _LINEARS:
                out[f"blocks.{i}.{ours}.weight"] = sd[f"{src}.weight"].t()
                if cfg.bias:
                    out[f"blocks.{i}.{ours}.bias"] = sd[f"{src}.bias"]
            else:
                out[f"blocks.{i}.{ours}"] = sd[src]
    return {k: v.contiguous().clone() for k, v in out.items()}


def to_hf(decoder: Decoder, classifier: bool = False) -> dict:
    """HF state_dict for `ImageGPTForCausalImageModeling` (or, with classifier=True,
    `ImageGPTForImageClassification`) built with `ImageGPTConfig(**hf_config_kwargs(decoder.cfg))`."""
    cfg = decoder.cfg
    sd = {k: v.detach() for k, v in decoder.state_dict().items()}
    out = {
        "transformer.wte.weight": torch.cat([sd["wte.weight"], sd["sos"][None]], dim=0),
        "transformer.wpe.weight": sd["wpe.weight"],
        "transformer.ln_f.weight": sd["ln_f.weight"],
    }
    if classifier:
        if not cfg.n_classes:
            raise ValueError("classifier=True needs a model with a classifier head (IGPTConfig(n_classes=...))")
        if sd["clf_head.bias"].abs().max() > 0:
            raise ValueError("HF ImageGPTForImageClassification has no classifier bias, but this model's "
                             "clf_head.bias is non-zero; export the generative model instead (classifier=False)")
        out["score.weight"] = sd["clf_head.weight"]
    else:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        for ours, theirs in _BLOCK_MAP.items():
            dst = f"transformer.h.{i}.{theirs}"
            if ours in _LINEARS:
                w = sd[f"blocks.{i}.{ours}.weight"]
                out[f"{dst}.weight"] = w.t()
                out[f"{dst}.bias"] = sd[f"blocks.{i}.{ours}.bias"] if cfg.bias else w.new_zeros(w.shape[0])
            else:
                out[f"{dst}"] = sd[f"blocks.{i}.{ours}"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def hf_input_ids(ids: torch.Tensor, vocab_size: int = 512) -> torch.Tensor:
    """HF ImageGPT input ids for our token ids: the SOS id (= vocab_size, HF's last row) then ids[:, :-1]."""
    sos = torch.full_like(ids[:, :1], vocab_size)
    return torch.cat([sos, ids[:, :-1]], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# transformers directories (what `save_pretrained` writes, what the hub serves)

HF_MODEL_TYPE = "imagegpt"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # in order of preference: safetensors holds no pickle
PROCESSOR_NAME = "preprocessor_config.json"


def is_hf_dir(path: Path) -> bool:
    """True for a directory whose config.json says model_type "imagegpt" (a transformers save_pretrained)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == HF_MODEL_TYPE
    except (json.JSONDecodeError, AttributeError, OSError):
        return False  # not ours to judge: the iGPT config loader reports it


def load_hf_dir(path: Path):
    """(IGPTConfig, our state_dict, Palette or None) of a transformers ImageGPT directory; the classification
    variant (config.json architectures) gets our classifier head. model.safetensors is preferred; a directory with
    only pytorch_model.bin is read by transformers' weights-only unpickler (tensors only, no code runs)."""
    import transformers

    path = Path(path)
    weights = next((path / n for n in HF_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{path} has an ImageGPT config.json but no {' or '.join(HF_WEIGHTS)}: copy the "
                                "weights file beside it (sharded checkpoints are not supported)")
    archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    cls = (transformers.ImageGPTForImageClassification if "ImageGPTForImageClassification" in archs
           else transformers.ImageGPTForCausalImageModeling)
    try:
        hf_model = cls.from_pretrained(path, use_safetensors=weights.suffix == ".safetensors")
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{weights}: transformers could not load it as {cls.__name__} "
                         f"({type(e).__name__}: {e})") from e
    cfg, state = convert_hf_model(hf_model)
    return cfg, state, hf_palette(path)


def hf_palette(path: Path):
    """Palette from the processor's clusters in preprocessor_config.json beside the weights (None without one)."""
    from igpt.palette import Palette

    config = Path(path) / PROCESSOR_NAME
    if not config.is_file():
        return None
    clusters = json.loads(config.read_text()).get("clusters")
    return None if clusters is None else Palette.from_hf(clusters)


def save_hf(decoder: Decoder, path) -> Path:
    """A transformers directory for `decoder`: ImageGPTForImageClassification when it has a classifier head, else
    ImageGPTForCausalImageModeling, plus an ImageGPTImageProcessor whose clusters are the attached palette."""
    import transformers

    if decoder.palette is None:
        raise ValueError("the model has no palette (palette.npy beside its weights), which the HF processor needs "
                         "as its clusters; attach one with model.attach_palette(Palette.load(FILE))")
    cfg = decoder.cfg
    classifier = bool(cfg.n_classes)
    hf_cfg = transformers.ImageGPTConfig(**hf_config_kwargs(cfg))
    cls = transformers.ImageGPTForImageClassification if classifier else transformers.ImageGPTForCausalImageModeling
    hf_model = cls(hf_cfg).eval()
    hf_model.load_state_dict(to_hf(decoder, classifier=classifier), strict=True)
    path = Path(path)
    hf_model.save_pretrained(path)
    R = cfg.resolution
    processor = image_processor_class()(clusters=decoder.palette.centres.cpu().numpy(),
                                                       size={"height": R, "width": R})
    processor.save_pretrained(path)
    return path


def image_processor_class():
    """transformers' PIL ImageGPT image processor: `ImageGPTImageProcessorPil` from v5, `ImageGPTImageProcessor` before."""
    import transformers

    return getattr(transformers, "ImageGPTImageProcessorPil", None) or transformers.ImageGPTImageProcessor


def main(argv=None):
    p = cli.parser(__doc__)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="SRC", default=None,
                     help="a transformers ImageGPT directory or hub id (e.g. openai/imagegpt-small) -> our format")
    way.add_argument("--to-hf", metavar="RUN_DIR", default=None,
                     help="our weights (anything --checkpoint takes) -> a transformers directory")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    if args.from_hf is not None:
        model = Decoder.from_pretrained(args.from_hf)
        out = model.save_pretrained(args.out)
        what = "palette.npy" if model.palette is not None else "no palette (no preprocessor_config.json clusters)"
        print(f"wrote {out}: model.safetensors, config.json, {what}", flush=True)
    else:
        out = save_hf(Decoder.from_pretrained(args.to_hf), args.out)
        print(f"wrote {out}: transformers weights + config.json, {PROCESSOR_NAME} (palette as clusters)", flush=True)
    return out


if __name__ == "__main__":
    cli.run(main)
