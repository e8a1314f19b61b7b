"""Generate text conditioned on an image, with and without xmodal's image K/V cache.

Legend: ``b`` batch, ``t`` text tokens, ``n`` image tokens from the vision encoder, ``l``
resampled image tokens (latents), ``D`` text width, ``E`` image width, ``V`` vocabulary.

A tiny, randomly initialised Flamingo-style decoder: a token embedding, decoder layers made of
PyTorch parts (causal self-attention with its own text K/V cache, an MLP), and every
``xattn_every`` layers an :class:`xmodal.GatedCrossAttentionBlock` that lets the text attend to
the image, which a :class:`xmodal.PerceiverResampler` has first shrunk to ``l`` tokens.

Both decodings below keep the usual *text* K/V cache. They differ only in the image:

* **without the image cache** every decoding step passes the image features, so the resampler
  runs again and every block projects the image keys and values again -- what OpenFlamingo and
  HF Idefics do;
* **with the image cache** the resampler runs once and each block's keys/values are projected
  once (:meth:`GatedCrossAttentionBlock.encode_image`) and passed as ``image_kv=`` at every
  step.

The weights are random, so the text is gibberish; the point is that both decodings produce the
same tokens, and how long each takes::

    python examples/generate.py                 # 32 tokens, 576 image tokens
    python examples/generate.py --image-tokens 1601 --new-tokens 32
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal import GatedCrossAttentionBlock, ImageKV, PerceiverResampler


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 512  # V
    dim: int = 256  # D, the text width
    depth: int = 4  # decoder layers
    num_heads: int = 8  # heads of self- and cross-attention
    num_kv_heads: int = 2  # K/V heads of the cross-attention (GQA)
    xattn_every: int = 2  # a gated cross-attention block before every 2nd layer
    image_dim: int = 512  # E, the width of the vision encoder's features
    num_latents: int = 64  # l, image tokens after the resampler
    resampler_depth: int = 2
    max_len: int = 256  # longest prompt + generation

    @classmethod
    def tiny(cls) -> TinyConfig:
        """A test-sized model: every width <= 64."""
        return cls(
            vocab_size=64,
            dim=32,
            depth=2,
            num_heads=4,
            num_kv_heads=2,
            xattn_every=1,
            image_dim=24,
            num_latents=4,
            resampler_depth=1,
            max_len=32,
        )


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with a text K/V cache (plain PyTorch)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, cache: list[Tensor] | None) -> Tensor:
        """``x`` ``(b, t, D)``: the new tokens; ``cache``: ``[]`` or ``[keys, values]`` of the
        earlier tokens, ``(b, h, t', d)`` each, extended in place."""
        b, t, dim = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, dim // self.num_heads).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, h, t, d)
        past = 0
        if cache is not None:
            if cache:
                past = cache[0].shape[2]
                k = torch.cat([cache[0], k], dim=2)  # (b, h, t' + t, d)
                v = torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        # new token s (at position past + s) sees every position <= past + s
        causal = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)  # (b, h, t, d)
        return self.out(y.transpose(1, 2).reshape(b, t, dim))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, cache: list[Tensor] | None) -> Tensor:
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class TinyVLM(nn.Module):
    """A decoder LM with gated cross-attention to a resampled image (random weights)."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.pos = nn.Embedding(c.max_len, c.dim)
        self.resampler = PerceiverResampler(
            c.image_dim,
            depth=c.resampler_depth,
            num_latents=c.num_latents,
            num_heads=c.num_heads,
            head_dim=c.image_dim // c.num_heads,
            ff_mult=2,
        )
        self.layers = nn.ModuleList(DecoderLayer(c.dim, c.num_heads) for _ in range(c.depth))
        # Open gates (a trained model's are open; zero-initialised ones would ignore the image).
        self.xattn = nn.ModuleDict(
            {
                str(j): GatedCrossAttentionBlock(
                    c.dim,
                    c.image_dim,
                    num_heads=c.num_heads,
                    head_dim=c.dim // c.num_heads,
                    num_kv_heads=c.num_kv_heads,
                    gate_init=1.0,
                )
                for j in range(0, c.depth, c.xattn_every)
            }
        )
        self.norm = nn.LayerNorm(c.dim)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)

    def resample(self, image: Tensor) -> Tensor:
        """``(b, n, E)`` vision features -> ``(b, l, E)`` media tokens."""
        return self.resampler(image).flatten(1, 2)  # (b, 1, l, E) -> (b, l, E)

    def encode_image(self, image: Tensor) -> dict[str, ImageKV]:
        """Resample once and project each block's image keys/values once: the image cache."""
        media = self.resample(image)  # (b, l, E)
        return {j: block.encode_image(media) for j, block in self.xattn.items()}

    def forward(
        self,
        tokens: Tensor,
        *,
        start: int,
        text_cache: list[list[Tensor]],
        image: Tensor | None = None,
        image_kv: dict[str, ImageKV] | None = None,
    ) -> Tensor:
        """Logits ``(b, t, V)`` for ``tokens`` ``(b, t)`` at positions ``start..start+t-1``.

        Pass the raw ``image`` ``(b, n, E)`` (resampled and projected here, every call) or the
        ``image_kv`` from :meth:`encode_image`.
        """
        t = tokens.shape[1]
        x = self.embed(tokens) + self.pos(torch.arange(start, start + t, device=tokens.device))
        media = None if image is None else self.resample(image)  # (b, l, E)
        for j, layer in enumerate(self.layers):
            if str(j) in self.xattn:  # a gated cross-attention block before this layer
                kv = None if image_kv is None else image_kv[str(j)]
                x = self.xattn[str(j)](x, media, image_kv=kv)  # (b, t, D)
            x = layer(x, text_cache[j])
        return self.lm_head(self.norm(x))  # (b, t, V)


@torch.inference_mode()
def generate(
    model: TinyVLM, prompt: Tensor, image: Tensor, *, new_tokens: int = 32, use_cache: bool = True
) -> tuple[Tensor, float]:
    """Greedy decoding of ``new_tokens`` after ``prompt`` ``(b, t)``, looking at ``image``.

    Returns ``(tokens, seconds)``: the prompt followed by the new tokens, ``(b, t + new)``, and
    the wall time of the whole generation (image encoding included).
    """
    model.eval()
    begin = time.perf_counter()
    text_cache: list[list[Tensor]] = [[] for _ in model.layers]
    image_kv = model.encode_image(image) if use_cache else None
    image_arg = None if use_cache else image

    tokens = prompt
    logits = model(prompt, start=0, text_cache=text_cache, image=image_arg, image_kv=image_kv)
    for step in range(new_tokens):
        next_token = logits[:, -1].argmax(dim=-1, keepdim=True)  # (b, 1)
        position = tokens.shape[1]
        tokens = torch.cat([tokens, next_token], dim=1)  # (b, t + step + 1)
        if step + 1 < new_tokens:  # the last token needs no forward
            logits = model(
                next_token,
                start=position,
                text_cache=text_cache,
                image=image_arg,
                image_kv=image_kv,
            )
    return tokens, time.perf_counter() - begin


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--image-tokens", type=int, default=576, help="n, from the vision encoder")
    parser.add_argument("--tiny", action="store_true", help="test-sized model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    config = TinyConfig.tiny() if args.tiny else TinyConfig()
    if args.new_tokens + 8 > config.max_len:
        parser.error(f"--new-tokens must be at most {config.max_len - 8}")
    model = TinyVLM(config).eval()
    image = torch.randn(1, args.image_tokens, config.image_dim)  # stand-in vision features
    prompt = torch.randint(config.vocab_size, (1, 8))

    generate(model, prompt, image, new_tokens=2)  # warm-up
    uncached, t_uncached = generate(
        model, prompt, image, new_tokens=args.new_tokens, use_cache=False
    )
    cached, t_cached = generate(model, prompt, image, new_tokens=args.new_tokens, use_cache=True)
    same = torch.equal(cached, uncached)

    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {params / 1e6:.1f}M parameters, {len(model.xattn)} gated cross-attention blocks, "
        f"image {args.image_tokens} tokens -> {config.num_latents} latents; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"prompt:   {prompt[0].tolist()}")
    print(f"no cache: {uncached[0, prompt.shape[1] :].tolist()}")
    print(f"cache:    {cached[0, prompt.shape[1] :].tolist()}")
    per = 1e3 / max(args.new_tokens, 1)
    print(f"without image cache: {t_uncached:.3f} s ({t_uncached * per:.1f} ms/token)")
    print(f"with image cache:    {t_cached:.3f} s ({t_cached * per:.1f} ms/token)")
    print(f"speed-up: {t_uncached / t_cached:.2f}x; tokens identical: {same}")
    if not same:
        raise SystemExit("the cached and uncached decodings differ")
    return {
        "tokens": cached,
        "seconds_uncached": t_uncached,
        "seconds_cached": t_cached,
        "identical": same,
        "speedup": t_uncached / t_cached if t_cached > 0 else math.inf,
    }


if __name__ == "__main__":
    main()
