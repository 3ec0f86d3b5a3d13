"""TNLForCausalLM: embeddings, TransNormerLLM blocks, final SRMSNorm, LM head; save / load.

    model = TNLForCausalLM(TNLConfig.preset("tiny"))
    logits = model(input_ids)                       # [B, N, vocab], parallel form (lightgen kernel)
    loss = model.loss(input_ids, targets)           # mean cross-entropy, fp32
    loss = model.loss(ids, targets, cu_seqlens=cu)  # packed documents, each attending to itself alone
    out = model.generate(input_ids, 50, top_k=20)   # recurrent decoding, see tnl.generation
    model.save_pretrained("run"); TNLForCausalLM.from_pretrained("run")
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import generation
from .config import TNLConfig
from .layers import SRMSNorm, TNLBlock

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class TNLForCausalLM(nn.Module):
    def __init__(self, config: TNLConfig):
        super().__init__()
        if not isinstance(config, TNLConfig):
            raise TypeError(f"config: expected a TNLConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TNLBlock(config, i) for i in range(config.num_layers))
        self.final_norm = SRMSNorm(config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.embed_scale = math.sqrt(config.hidden_size) if config.scale_embedding else 1.0
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # activation checkpointing: in training each block keeps only its input for the backward and
        # recomputes the rest there (long sequences: a 1B block keeps ~100 KB per token otherwise)
        self.gradient_checkpointing = False

    def _init_weights(self, module):
        # the released code: every Linear and Embedding ~ N(0, init_std); LRPE theta keeps its init
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids, cache: generation.TNLCache | None = None, cu_seqlens=None):
        """input_ids [B, N] -> logits [B, N, vocab]. With a cache the tokens continue the cached
        sequence (chunked prefill for N > 1, the recurrent step for N == 1) and the cache advances.
        cu_seqlens (int32 [S + 1], B = 1): input_ids holds S documents back to back (their offsets, as
        flash-attn's), and each attends only to itself, from LRPE position 0 (the kernels' packed sequences:
        a pack with a long document runs at the speed of one long sequence). With a fresh cache, the prefill of S
        prompts of different lengths (generation.prefill_ragged): the cache then holds S sequences, each at its
        own position."""
        return self.lm_head(self.hidden_states(input_ids, cache, cu_seqlens))

    def hidden_states(self, input_ids, cache: generation.TNLCache | None = None, cu_seqlens=None):
        """forward without the lm head: the final norm's output [B, N, hidden] (a prefill takes the logits of its
        last tokens only, where [N, vocab] of a long prompt and a large vocabulary would be big)."""
        if cu_seqlens is not None and cache is not None and not cache.fresh:
            raise ValueError("cu_seqlens: packed prompts fill a fresh cache (generation.prefill_ragged); a cache in "
                             "use takes one sequence per batch row")
        x = self.embed_tokens(input_ids) * self.embed_scale
        for block in self.layers:
            if self.gradient_checkpointing and cache is None and torch.is_grad_enabled():
                x = checkpoint(block, x, None, cu_seqlens, use_reentrant=False)
            else:
                x = block(x, cache, cu_seqlens)
        if cache is not None and cu_seqlens is not None:
            cache.position = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # each prompt's next position
        elif cache is not None:
            cache.position += input_ids.shape[1]  # (in place on a position tensor: a CUDA graph of a step advances it)
        return self.final_norm(x)

    def loss(self, input_ids, targets, cu_seqlens=None):
        """Mean next-token cross-entropy; targets[:, t] is the token after input_ids[:, t]. cu_seqlens: packed
        documents (see forward); a document's last target is the caller's choice (the next document's first
        token, or an ignored index: -100, cross_entropy's default)."""
        logits = self(input_ids, cu_seqlens=cu_seqlens)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def generate(self, input_ids, max_new_tokens, **kwargs):
        """See tnl.generation.generate."""
        return generation.generate(self, input_ids, max_new_tokens, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- save / load ---------------------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        """Write config.json and model.safetensors (tied weights are stored once)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_FILE)
        save_model(self, str(directory / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, directory, device=None, dtype=None) -> "TNLForCausalLM":
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name}: not found (expected a save_pretrained folder)")
        model = cls(TNLConfig.load(directory / CONFIG_FILE))
        missing, unexpected = load_model(model, str(directory / WEIGHTS_FILE), strict=True)
        return model.to(device=device, dtype=dtype)
