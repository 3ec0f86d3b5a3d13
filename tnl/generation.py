"""Generation: the recurrent form of the token mixer, chunked prefill, sampling.

Per layer and sequence the attention state is S [B, H, K, d] (K = d, or 2d with LRPE-d's cos and
sin halves), kept in fp32:
    prefill, a chunk of C tokens from position p:   o = attn_intra(chunk) + lambda^(i+1) f(q_i) S
                                                     S <- lambda^C S + sum_i lambda^(C-1-i) f(k_i)^T v_i
    decode, one token at position p:                 S <- lambda S + f(k)^T v ;  o = f(q) S
f(x) = LRPE(silu(x)) at absolute positions. Both run in lightgen: the chunk kernel with a state in
and out, and its decode step kernel, which updates the state in place. Only powers lambda^j with
j >= 0 appear, so nothing overflows at any length, and a new token costs the same time and memory
whatever came before.

On a GPU the decode loop can replay one step of the whole model from a CUDA graph (DecodeGraph, generate's
cuda_graph): a step is a few hundred small kernels, which Python launches slower than the GPU runs them, and a
linear-attention step has the same shapes and addresses at every token (its states are of fixed size and updated
in place), so one capture serves the whole generation.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

# generate(cuda_graph=None) captures the decode step when more tokens than this are asked (a capture costs a few
# eager steps)
GRAPH_MIN_TOKENS = 8


@dataclass
class TNLCache:
    """Per-layer attention states and the position of the next token: one int for every sequence, or a tensor [B]
    (ragged prompts, prefill_ragged: each sequence at its own)."""
    states: list = field(default_factory=list)
    position: int | torch.Tensor = 0

    @classmethod
    def empty(cls, num_layers: int) -> "TNLCache":
        return cls(states=[None] * num_layers)

    @property
    def fresh(self) -> bool:
        """Nothing read into it yet."""
        return isinstance(self.position, int) and self.position == 0 and all(s is None for s in self.states)


def recurrent_step(step, q, k, v, state, position: int | torch.Tensor):
    """One token per sequence at `position` (an int, or one per sequence [B]): q, k, v [B, H, d] raw projections ->
    (o [B, H, d] fp32, state).

    step(q, k, v, state, position=) is the layer's lightgen decode step (the fused kernel on a GPU or
    under Triton's interpreter, lightgen's PyTorch reference elsewhere); it updates `state` in place."""
    return step(q, k, v, state, position=position).float(), state


def chunk_with_state(attend, q, k, v, state, start: int, **packed):
    """A chunk of tokens at positions start.. with the state of those before it, in one kernel call.

    attend(q, k, v, **states) is the layer's lightgen attention, which takes the incoming state and
    returns the outgoing one. q, k, v [B, C, H, d] -> (o [B, C, H, d] fp32, new state). packed: cu_seqlens, for
    ragged prompts packed in one row (B = 1; state None, start 0): the new state is one per prompt."""
    o, new_state = attend(q, k, v, initial_state=state, output_final_state=True, offset=start, **packed)
    return o.float(), new_state


# ---- the model-level loop --------------------------------------------------------------------

@torch.no_grad()
def prefill(model, input_ids, cache: TNLCache | None = None, chunk_size: int | None = None,
            all_logits: bool = False):
    """Read a prompt chunk by chunk into the cache. Returns (logits, cache): logits of the last
    token [B, V], or of every prompt token [B, N, V] with all_logits=True."""
    chunk_size = chunk_size or model.config.prefill_chunk_size
    cache = cache if cache is not None else TNLCache.empty(model.config.num_layers)
    pieces = []
    for begin in range(0, input_ids.shape[1], chunk_size):
        hidden = model.hidden_states(input_ids[:, begin:begin + chunk_size], cache=cache)
        pieces.append(hidden if all_logits else hidden[:, -1:])
    return model.lm_head(torch.cat(pieces, dim=1) if all_logits else pieces[-1][:, -1]), cache


@torch.no_grad()
def prefill_ragged(model, prompts):
    """Read prompts of different lengths (1-D LongTensors, each at least one token) into a fresh cache in one packed
    call (the kernels' cu_seqlens: no padding, each prompt attends to itself). Returns (logits of each prompt's last
    token [S, V], cache of S sequences, each at the position after its prompt)."""
    lengths = [len(p) for p in prompts]
    offsets = torch.tensor([0, *lengths], device=prompts[0].device).cumsum(0).to(torch.int32)
    cache = TNLCache.empty(model.config.num_layers)
    hidden = model.hidden_states(torch.cat(list(prompts))[None], cache=cache, cu_seqlens=offsets)
    return model.lm_head(hidden[0, (offsets[1:] - 1).long()]), cache


class DecodeGraph:
    """One decode step of the whole model, model(tokens [B, 1], cache) -> the logits [B, V], captured in a CUDA graph
    and replayed per token. While it lives, cache.position is a device tensor [B] that the graph advances (the
    kernels read LRPE positions from it); close() gives the cache back its int position where it had one.

    The capture runs under autocast as the caller does, without autocast's cast cache (a cast cached during a
    capture would be freed while the graph still reads it); a model kept in bf16 casts nothing."""

    @torch.no_grad()
    def __init__(self, model, cache: TNLCache, batch: int):
        if any(s is None for s in cache.states):
            raise ValueError("cache: a CUDA-graph decode continues a prefilled cache (every layer's state present)")
        device = cache.states[0].device
        self.cache, self._given = cache, cache.position
        position = torch.as_tensor(cache.position, dtype=torch.long, device=device).expand(batch).clone()
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        # warm up on a copy (compiles the kernels, picks cuBLAS's plans; the copy's states take the updates)
        scratch = TNLCache([s.clone() for s in cache.states], position.clone())
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), _without_cast_cache(device):
            model(self.tokens, cache=scratch)
        torch.cuda.current_stream(device).wait_stream(side)
        cache.position = position
        self.graph = torch.cuda.CUDAGraph()
        try:
            with _without_cast_cache(device), torch.cuda.graph(self.graph):
                self.logits = model(self.tokens, cache=cache)[:, -1]  # (advances position in place)
        except BaseException:
            cache.position = self._given  # (a capture runs nothing: the states are as they were)
            raise

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] -> logits [B, V] (the graph's own buffer: read it before the next call)."""
        self.tokens.copy_(tokens[:, None])
        self.graph.replay()
        return self.logits

    def close(self) -> None:
        if not isinstance(self._given, torch.Tensor):
            self.cache.position = int(self.cache.position[0])
        self.graph = None


@contextmanager
def _without_cast_cache(device):
    kind = device.type
    if not torch.is_autocast_enabled(kind):
        yield
        return
    with torch.autocast(kind, dtype=torch.get_autocast_dtype(kind), cache_enabled=False):
        yield


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
    """Pick the next token per row of logits [B, V]."""
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already hold top_p of the mass (the first stays)
        drop = torch.cumsum(probs, dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_generate_args(input_ids, max_new_tokens, temperature, top_k, top_p, cuda_graph) -> torch.device:
    """Raise on a bad argument; returns the prompts' device."""
    if isinstance(input_ids, (list, tuple)):  # ragged prompts
        if not input_ids or not all(isinstance(p, torch.Tensor) and p.dim() == 1 and p.dtype == torch.long
                                    for p in input_ids):
            raise ValueError("input_ids: expected a LongTensor [batch, length] or a non-empty list of 1-D "
                             "LongTensors (prompts of different lengths)")
        if min(len(p) for p in input_ids) < 1:
            raise ValueError("input_ids: every prompt needs at least one token")
        if len({p.device for p in input_ids}) > 1:
            raise ValueError("input_ids: the prompts are on different devices")
    elif not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids: expected a LongTensor of shape [batch, length] or a list of 1-D LongTensors")
    elif input_ids.shape[1] < 1:
        raise ValueError("input_ids: the prompt needs at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an int >= 0")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: expected > 0 (use greedy=True for argmax)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: expected a positive int or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r}: expected a number in (0, 1] or None")
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph={cuda_graph!r}: expected True, False or None (on a GPU past {GRAPH_MIN_TOKENS} "
                         "new tokens)")
    device = input_ids[0].device if isinstance(input_ids, (list, tuple)) else input_ids.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True: the prompts are on {device}; CUDA graphs need a CUDA device")
    return device


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, greedy=False,
             do_sample=None, eos_token_id=None, generator=None, cuda_graph=False):
    """Prompt [B, N] -> [B, N + new]: chunked parallel prefill, then one recurrent step per token. Prompts of
    different lengths, a list of 1-D LongTensors: one packed prefill (prefill_ragged), then the steps of all of them
    at once, each at its own position; returns a list, each prompt followed by its new tokens.

    greedy=True (or do_sample=False) takes the argmax; otherwise samples with temperature, top_k,
    top_p. Rows that produced eos_token_id are padded with it; generation stops once all have.

    cuda_graph: replay each decode step from a CUDA graph (DecodeGraph; the same kernels, so the same tokens).
    True: always (an error where the model cannot be captured); None: on a CUDA device when more than
    GRAPH_MIN_TOKENS tokens are asked, falling back to eager steps with a warning where the model cannot be
    captured; False (the default until the graph has run on a GPU: session 31 got none): eager steps."""
    device = _check_generate_args(input_ids, max_new_tokens, temperature, top_k, top_p, cuda_graph)
    ragged = isinstance(input_ids, (list, tuple))
    if do_sample is not None:
        greedy = not do_sample
    if cuda_graph is None:
        cuda_graph = "auto" if device.type == "cuda" and max_new_tokens > GRAPH_MIN_TOKENS else False
    logits, cache = prefill_ragged(model, input_ids) if ragged else prefill(model, input_ids)
    new = _decode(model, logits, cache, max_new_tokens, temperature, top_k, top_p, greedy, eos_token_id, generator,
                  cuda_graph)
    if ragged:
        return [torch.cat([prompt, row]) for prompt, row in zip(input_ids, new)]
    return torch.cat([input_ids, new], dim=1)


def _decode(model, logits, cache, max_new_tokens, temperature, top_k, top_p, greedy, eos_token_id, generator,
            cuda_graph):
    """generate's tokens after the prompt [B, new], from the logits of each prompt's last token [B, V]."""
    tokens = [logits.new_empty(logits.shape[0], 0, dtype=torch.long)]
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    graph = _decode_graph(model, cache, logits.shape[0], cuda_graph) if max_new_tokens > 1 else None
    try:
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, greedy, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            tokens.append(nxt[:, None])
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits = graph(nxt) if graph is not None else model(nxt[:, None], cache=cache)[:, -1]
    finally:
        if graph is not None:
            graph.close()
    return torch.cat(tokens, dim=1)


def _decode_graph(model, cache, batch, cuda_graph) -> DecodeGraph | None:
    """generate's DecodeGraph: None for eager steps; cuda_graph="auto" falls back to them where capture fails."""
    if not cuda_graph:
        return None
    try:
        return DecodeGraph(model, cache, batch)
    except Exception as e:  # noqa: BLE001 (any capture failure: the eager loop computes the same)
        if cuda_graph is True:
            raise
        warnings.warn(f"generate: the decode step could not be captured in a CUDA graph ({type(e).__name__}: "
                      f"{e}); decoding eagerly (cuda_graph=False skips the attempt)", RuntimeWarning, stacklevel=3)
        return None
