"""iGPT — Generative Pretraining from Pixels, with fused Triton kernels under a thin PyTorch model."""
from igpt.config import IGPTConfig
from igpt.model import Decoder, FusedDecoder, IGPTOutput
from igpt.palette import Palette

__all__ = ["IGPTConfig", "Decoder", "FusedDecoder", "IGPTOutput", "Palette"]
__version__ = "0.1.0"
