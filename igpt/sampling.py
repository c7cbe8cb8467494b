"""Sampling with a KV cache: `Sampler(model).generate(n, ...)` (what `Decoder.generate` runs) and
`compile_sampler(model)`, the same sampler with its one-token step under torch.compile.

The sampler owns the cache and its dtype, the linears' weight casts and oneDNN packing during sampling, and the
compiled step with its check that the weights it froze are still the model's. `Sampler(model, use_cache=False)` is
the reference the cache is checked against: a full forward over the whole prefix for every token. Both draw every
token through `draw`, so one seed gives both the same tokens wherever their logits round alike (fp32 on CPU).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from igpt import cpu


class KVCache:
    """Keys and values of every layer for incremental decoding; filled left to right."""

    def __init__(self, n_layer: int, batch: int, n_head: int, n_ctx: int, head_dim: int, device, dtype):
        shape = (batch, n_head, n_ctx, head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]  # read only up to length
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0  # tokens already cached (the same for every layer once a forward pass finished)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k/v for `layer`; returns all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def attend(self, layer: int, q, k, v, attention, causal: bool) -> torch.Tensor:
        """attention(q, keys, values, causal) over everything cached for `layer` once k/v are appended, in the
        cache's dtype: an fp32 cache under autocast is attended in fp32 (autocast would cast it all at every call)."""
        k, v = self.append(layer, k, v)
        if q.dtype == k.dtype:
            return attention(q, k, v, causal)
        with torch.autocast(q.device.type, enabled=False):
            return attention(q.to(k.dtype), k, v, causal)


@contextlib.contextmanager
def linear_weights_cast(model: nn.Module, dtype: torch.dtype):
    """Within the block every nn.Linear of `model` holds a `dtype` copy of its weight (a plain tensor): the cast that
    autocast makes at every call, made once, because a compiled decode step would otherwise re-cast every weight at
    every token (eager autocast caches its casts; a compiled graph cannot). The same values: autocast's cast is this
    `.to(dtype)`."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = [m.weight for m in linears]
    try:
        for m, w in zip(linears, weights):
            m._parameters["weight"] = w.detach().to(dtype)  # in place in the dict: parameter order is kept
        yield
    finally:
        for m, w in zip(linears, weights):
            m._parameters["weight"] = w


def decode_token(model, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits [B, 1, V] after feeding one drawn token per image [B, 1] at the next position of the cache."""
    # drawn tokens are in range by construction: no range check, so the step has no host sync
    return model.decode(model.embed(ids, pos_offset=cache.length, shift=False, check_ids=False), cache)


def draw(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """One token per image [n, 1] from next-token logits [n, V]: temperature, top-k, then the softmax."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


def weights_fingerprint(model: nn.Module) -> list:
    # _version counts in-place writes (optimizer steps, load_state_dict's copy_), data_ptr .to() and .data swaps
    return [(name, p.data_ptr(), p._version) for name, p in model.named_parameters()]


class Sampler:
    """Draws token images from an AR `model` with a KV cache: the prompt in one eager pass, then one token per step.

    compile=True puts the one-token step under torch.compile (`options` go to it); the cache length is a dynamic
    size, so one graph serves every position, and the first `generate` pays the compile (about a minute on a 2-core
    CPU). freeze (default: on CPU) compiles with the weights frozen into the graph (`cpu.frozen_weights`): their
    autocast casts fold away and the CPU linears multiply through weights packed for oneDNN; the graph then holds the
    weights of its first call, and `generate` refuses to run it once a parameter has changed (build a new sampler).
    Without freezing the compiled step reads the live weights, through Inductor's own GEMMs.
    use_cache=False samples without a cache: every token runs the model over the whole prefix (`sample_uncached`).
    """

    def __init__(self, model: nn.Module, compile: bool = False, freeze: bool | None = None, use_cache: bool = True,
                 **options):
        if compile and not use_cache:
            raise ValueError("compile=True compiles the cached decode step: it cannot be combined with use_cache=False")
        self.model = model
        self.use_cache = use_cache
        self.compiled = compile  # the decode steps leave the GEMMs to Inductor: no packing around them
        self.frozen = compile and (model.wte.weight.device.type == "cpu" if freeze is None else freeze)
        self._frozen_weights = None  # the weights the frozen graph holds, once its first call compiled it
        self._step = None
        if compile:
            if not options.keys() & {"backend"}:
                options["backend"] = _own_inductor(options.pop("mode", None), options.pop("options", None))
            self._step = torch.compile(decode_token, dynamic=True, **options)

    def decode_token(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One step: `decode_token` eager, or compiled (frozen: the weights of the first call)."""
        if self._step is None:
            return decode_token(self.model, ids, cache)
        if not self.frozen:
            return self._step(self.model, ids, cache)
        if self._frozen_weights is None:  # the first call compiles: the weights it freezes are today's
            self._frozen_weights = weights_fingerprint(self.model)
        with cpu.frozen_weights():
            return self._step(self.model, ids, cache)

    def check_weights(self) -> None:
        """Raises if the frozen graph holds weights the model no longer has."""
        if self._frozen_weights is not None and weights_fingerprint(self.model) != self._frozen_weights:
            raise RuntimeError("the weights changed since the compiled sampler froze them into its graph (an optimizer "
                               "step, load_state_dict, .to()): call compile_sampler(model) again to recompile it")

    @torch.no_grad()
    def generate(self, n: int, prompt: torch.Tensor | None = None, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample n images' tokens [n, n_ctx]; the prompt (ids [n or 1, P]) is encoded in one pass. Full softmax at
        temperature 1 unless told otherwise."""
        model, cfg = self.model, self.model.cfg
        if cfg.objective != "ar":
            raise ValueError("generate needs an AR model (objective='ar')")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
            raise ValueError(f"top_k must be in 1..{cfg.vocab_size}, got {top_k}")
        device, N = model.wte.weight.device, cfg.n_ctx
        if prompt is None:
            prompt = torch.zeros(n, 0, dtype=torch.long, device=device)
        model.check_ids(prompt, max_len=N - 1)
        if prompt.shape[0] not in (1, n):
            raise ValueError(f"prompt batch {prompt.shape[0]} must be 1 or n={n}")
        prompt = prompt.to(device).expand(n, -1)
        autocast = torch.is_autocast_enabled(device.type)
        cast = torch.get_autocast_dtype(device.type) if autocast else None
        if not self.use_cache:  # every step is a prompt pass: its linears
            return self.sample_uncached(prompt, temperature, top_k, generator, cpu.inference_linears(model, cast))
        # Under autocast keys and values leave their linear in the autocast dtype. On GPU, and in a frozen graph
        # (whose fused loops read half the bytes), they are cached in it; eager CPU decoding keeps the weights'
        # dtype, because PyTorch's one-query CPU attention is slower in bf16 than the casts cost.
        cache_dtype = cast if cast is not None and (device.type != "cpu" or self.frozen) else model.wte.weight.dtype
        cache = KVCache(cfg.n_layer, n, cfg.n_head, N, cfg.head_dim, device, cache_dtype)
        if self.frozen:  # its graph has cast and packed the weights itself
            self.check_weights()
            decode_linears = contextlib.nullcontext()
        else:
            decode_linears = cpu.inference_linears(model, cast, pack=not self.compiled)
        return self.sample(prompt, cache, temperature, top_k, generator, cpu.inference_linears(model, cast),
                           decode_linears)

    def sample(self, prompt, cache: KVCache, temperature: float, top_k: int | None, generator,
               prompt_linears=contextlib.nullcontext(), decode_linears=contextlib.nullcontext()) -> torch.Tensor:
        """The draws of `generate` for a checked prompt [n, P] into an empty `cache`, the linears of the prompt pass
        and of the decode steps set up by the given contexts."""
        model, (n, P), N = self.model, prompt.shape, self.model.cfg.n_ctx
        out = torch.empty(n, N, dtype=torch.long, device=prompt.device)
        out[:, :P] = prompt
        # Step 0 feeds SOS and the prompt (the AR shift of prompt + one placeholder), so its last position predicts
        # token P; every later step feeds the token just drawn at its own position.
        with prompt_linears:
            # generate checked the prompt's ids: no second range check (a host sync) here
            x = model.embed(torch.cat([prompt, prompt.new_zeros(n, 1)], dim=1), check_ids=False)
            logits = model.decode(x, cache, last_only=True)
        with decode_linears:
            for t in range(P, N):
                token = draw(logits[:, -1], temperature, top_k, generator)  # [n, 1]
                out[:, t] = token.squeeze(1)
                if t + 1 < N:
                    logits = self.decode_token(token, cache)
        return out

    def sample_uncached(self, prompt, temperature: float, top_k: int | None, generator,
                        linears=contextlib.nullcontext()) -> torch.Tensor:
        """The draws of `generate` for a checked prompt [n, P] without a cache: token t from a full forward over
        tokens 0..t, the same `draw` on its last logits (the reference the cached sampler is checked against)."""
        model, (n, P), N = self.model, prompt.shape, self.model.cfg.n_ctx
        out = torch.zeros(n, N, dtype=torch.long, device=prompt.device)  # past the prompt: placeholders, as cached
        out[:, :P] = prompt
        with linears:
            for t in range(P, N):
                # logits[:, t] depend on ids[:, :t] only (the AR shift is inside), so out[:, t] is a placeholder
                logits = model(out[:, :t + 1])[:, -1]
                out[:, t] = draw(logits, temperature, top_k, generator).squeeze(1)
        return out


def compile_sampler(model: nn.Module, freeze: bool | None = None, **options) -> Sampler:
    """`Sampler(model, compile=True, ...)`: the one-token step under torch.compile (see Sampler). Call it again after
    the weights change: each sampler compiles its own graph."""
    return Sampler(model, compile=True, freeze=freeze, **options)


def _own_inductor(mode: str | None, options: dict | None):
    """Inductor as a backend object of this sampler's own: dynamo keys the graphs of a function by backend, so a new
    sampler never reuses a graph frozen with older weights (at most torch._dynamo.config.recompile_limit graphs of the
    step per process; past it dynamo runs the step eagerly, with a warning)."""
    import torch._inductor
    from torch._inductor.compile_fx import compile_fx

    patches = {**(torch._inductor.list_mode_options(mode) if mode else {}), **(options or {})}
    return lambda gm, example_inputs: compile_fx(gm, example_inputs, config_patches=patches)
