"""TNL speed (issue 5): training tokens/s against a Llama of the same size, and decoding latency.

    PYTHONPATH=$PWD python -m tools.bench_tnl --config 385m --checkpoint --json tnl_bench.json

Training: at each context length the batch is --tokens-per-batch / context rows, so every row
trains on the same number of tokens; a step is forward + loss + backward + AdamW step. Reported per
model: tokens/s (median step over --steps after --warmup steps), peak GPU memory, the speed relative
to the model's own speed at the first context, and TNL / Llama. TNL runs lightgen's kernels on a GPU;
Llama (tools/llama_baseline.py) runs torch SDPA restricted to its FlashAttention-2 backend. On a GPU
both run under autocast (--dtype); on the CPU in fp32. --checkpoint recomputes each block's
activations in the backward, for both models alike. It is needed for the 385M config at 65,536
tokens per batch on an 80 GB GPU: under bf16 autocast a layer keeps about 54 KB per token for the
backward in TNL and 62 KB in Llama (counted on the CPU with saved-tensor hooks), 85 and 97 GB over 24 layers;
with --checkpoint, 4 KB (the block's input) plus one block at a time.

Generation (TNL only): a random prompt of each --gen-contexts length is read by the model's chunked
prefill (tnl.generation.prefill), then --gen-tokens tokens are decoded greedily, one recurrent step
each, batch 1; reported: ms per token (median) and the ratio to the first context, for steps called from
Python and (on a GPU) replayed from a CUDA graph (tnl.generation.DecodeGraph, generate(cuda_graph=True)).

Every row runs on its own: one that runs out of memory (or fails) is reported as such and the others
still run. A table goes to stdout, everything to --json.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext

import torch
from torch import nn

from tnl import TNLConfig, TNLForCausalLM, generation
from tools import measure
from tools.llama_baseline import LlamaConfig, LlamaForCausalLM

MODELS = ("tnl", "llama")


def parse_args(argv=None):
    p = measure.parser("bench_tnl", __doc__.splitlines()[0], contexts="2048,8192,32768,65536", tokens_per_batch=65536)
    p.add_argument("--models", default="tnl,llama", help="which to train: tnl, llama or both")
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing per block (both models)")
    p.add_argument("--gen-contexts", default="1024,65536", help="prompt lengths for decoding ('' skips it)")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens decoded (and timed) per prompt")
    args = p.parse_args(argv)
    args.contexts = measure.parse_ints(args.contexts, "--contexts", allow_empty=True)
    args.gen_contexts = measure.parse_ints(args.gen_contexts, "--gen-contexts", allow_empty=True)
    args.models = measure.names_list(args.models, "models", MODELS)
    measure.check_common(args, positive=("tokens_per_batch", "steps", "gen_tokens"))
    for context in args.contexts:
        if args.tokens_per_batch % context:
            raise ValueError(f"--contexts: {context} does not divide --tokens-per-batch={args.tokens_per_batch} "
                             "(every row trains on the same number of tokens)")
    return args


# ---- models --------------------------------------------------------------------------------------

def tnl_config(args) -> TNLConfig:
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    return TNLConfig.preset(args.config, **overrides)


def build(name: str, config: TNLConfig) -> nn.Module:
    return TNLForCausalLM(config) if name == "tnl" else LlamaForCausalLM(LlamaConfig.matching(config))


def parameter_counts(config: TNLConfig) -> dict:
    with torch.device("meta"):  # shapes only: nothing is allocated
        return {name: build(name, config).num_parameters() for name in MODELS}


def flash_only(device: torch.device, amp_dtype) -> bool:
    """Llama's SDPA is limited to FlashAttention-2 on a GPU in bf16 / fp16 (no silent fallback to
    another backend); FlashAttention has no fp32, and the CPU none of it."""
    return device.type == "cuda" and amp_dtype is not None


def attention_backend(name: str, device: torch.device, amp_dtype):
    if name == "llama" and flash_only(device, amp_dtype):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    return nullcontext()


# ---- training ------------------------------------------------------------------------------------

def train_row(name: str, config: TNLConfig, context: int, args, device, amp_dtype) -> dict:
    batch = args.tokens_per_batch // context
    measure.reset_peak_memory(device)
    torch.manual_seed(args.seed)
    with device:
        model = build(name, config)
    model.gradient_checkpointing = args.checkpoint  # both models: each block keeps only its input
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x, y = measure.random_tokens(batch, context, config.vocab_size, device, args.seed)

    def step():
        with measure.autocast(device, amp_dtype):
            loss = model.loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    with attention_backend(name, device, amp_dtype):
        for _ in range(args.warmup):  # the first step compiles the Triton kernels for this shape
            step()
        seconds = [measure.timed(step, device)[0] for _ in range(args.steps)]
    step_s = measure.median(seconds)
    return {"batch": batch, "step_ms": step_s * 1e3, "tokens_per_s": batch * context / step_s,
            "peak_gb": measure.peak_memory_gb(device)}


def add_ratios(rows: list[dict], models: list[str]) -> None:
    """Each model's speed relative to its own at the first context, and TNL / Llama per context."""
    def speed(row, name):
        return row.get(name, {}).get("tokens_per_s")

    for name in models:
        base = speed(rows[0], name) if rows else None
        for row in rows:
            if base and speed(row, name):
                row[name]["vs_first_context"] = speed(row, name) / base
    for row in rows:
        if speed(row, "tnl") and speed(row, "llama"):
            row["tnl_over_llama"] = speed(row, "tnl") / speed(row, "llama")


# ---- generation ----------------------------------------------------------------------------------

@torch.no_grad()
def generation_row(model, context: int, args, device, amp_dtype) -> dict:
    prompt, _ = measure.random_tokens(1, context, model.config.vocab_size, device, args.seed)
    with measure.autocast(device, amp_dtype):
        prefill_s, (logits, cache) = measure.timed(lambda: generation.prefill(model, prompt), device)
        token = generation.sample_next(logits, greedy=True)
        row = {"prefill_tokens_per_s": context / prefill_s,
               **_decode_times(lambda t: model(t[:, None], cache=cache)[:, -1], token, args, device, "")}
        if device.type == "cuda":  # the same steps replayed from a CUDA graph (generate(cuda_graph=True))
            try:
                graph = generation.DecodeGraph(model, cache, 1)
            except Exception as e:  # noqa: BLE001 (the eager times stand; the JSON says why the graph did not run)
                row["graph_error"] = f"{type(e).__name__}: {e}"
            else:
                row.update(_decode_times(graph, token, args, device, "graph_"))
                graph.close()
    return row


def _decode_times(step, token, args, device, prefix: str) -> dict:
    """ms per greedy token of step(tokens [B]) -> logits [B, V] (median and max over --gen-tokens after --warmup)."""
    seconds = []
    for i in range(args.warmup + args.gen_tokens):
        elapsed, token = measure.timed(lambda: generation.sample_next(step(token), greedy=True), device)
        if i >= args.warmup:
            seconds.append(elapsed)
    return {f"{prefix}ms_per_token": measure.median(seconds) * 1e3, f"{prefix}max_ms_per_token": max(seconds) * 1e3}


def run_generation(config: TNLConfig, args, device, amp_dtype) -> list[dict]:
    torch.manual_seed(args.seed)
    with device:
        model = build("tnl", config).eval()
    # compile the prefill kernels (state in and out) on a short prompt, so no row times compilation
    warm, _ = measure.random_tokens(1, 2 * config.prefill_chunk_size, config.vocab_size, device, args.seed)
    with torch.no_grad(), measure.autocast(device, amp_dtype):
        generation.prefill(model, warm)
    rows = []
    for context in args.gen_contexts:
        row = {"context": context, **measure.guarded(lambda: generation_row(model, context, args, device, amp_dtype),
                                                     device)}
        rows.append(row)
        print(f"  generation, context {context}: {_cell(row, 'ms_per_token', '.2f')} ms/token"
              + (f", {_cell(row, 'graph_ms_per_token', '.2f')} from a CUDA graph" if "graph_ms_per_token" in row else ""),
              file=sys.stderr)
    for prefix in ("", "graph_"):  # eager steps, then replays
        base = rows[0].get(f"{prefix}ms_per_token") if rows else None
        for row in rows:
            if base and row.get(f"{prefix}ms_per_token"):
                row[f"{prefix}vs_first_context"] = row[f"{prefix}ms_per_token"] / base
    return rows


def issue_targets(result: dict) -> list[dict]:
    """Issue 5's targets, where the rows they need ran: TNL keeps 90% of its speed at the longest
    context, is at least as fast as Llama at the shortest, and decodes within 10% of its latency at
    the shortest prompt."""
    train, gen, found = result["training"], result["generation"], []

    def add(what, value, target, met):
        found.append({"what": what, "value": value, "target": target, "met": met})

    if len(train) > 1 and "vs_first_context" in train[-1].get("tnl", {}):
        value = train[-1]["tnl"]["vs_first_context"]
        add(f"TNL tokens/s at {train[-1]['context']} / at {train[0]['context']}", value, ">= 0.90", value >= 0.90)
    if train and "tnl_over_llama" in train[0]:
        value = train[0]["tnl_over_llama"]
        add(f"TNL / Llama tokens/s at {train[0]['context']}", value, ">= 1.00", value >= 1.0)
    if len(gen) > 1 and "vs_first_context" in gen[-1]:
        value = gen[-1]["vs_first_context"]
        add(f"TNL ms/token at {gen[-1]['context']} / at {gen[0]['context']}", value, "<= 1.10", value <= 1.10)
    return found


# ---- report --------------------------------------------------------------------------------------

def _cell(result: dict, key: str, spec: str):
    """A number, or "OOM" / "error" for a row that did not run (its message is in the JSON)."""
    if "error" in result:
        return "OOM" if result["error"] == "OOM" else "error"
    return measure.fmt(result.get(key), spec)


def report(result: dict) -> str:
    env, models = result["environment"], result["models"]
    sizes = ", ".join(f"{m} {n / 1e6:.1f}M" for m, n in result["parameters"].items())
    lines = [f"{env['device']}, {env['date']}; torch {env['torch']}, triton {env['triton']}; "
             f"TNL attention: {env['tnl_attention']}; "
             f"config {result['config_name']} ({sizes} parameters); {result['autocast'] or 'fp32'}; "
             f"{result['tokens_per_batch']:,} tokens per batch" + ("; activation checkpointing" if result["checkpoint"] else "")]
    if result["training"]:
        first = result["training"][0]["context"]
        headers = ["context", "batch"]
        for m in models:
            headers += [f"{m} tok/s", f"{m} speed vs {first}", f"{m} peak GB"]
        if len(models) == 2:
            headers.append("tnl/llama")
        rows = []
        for row in result["training"]:
            cells = [row["context"], row["batch"]]
            for m in models:
                r = row[m]
                cells += [_cell(r, "tokens_per_s", ",.0f"), measure.fmt(r.get("vs_first_context"), ".3f"),
                          measure.fmt(r.get("peak_gb"), ".1f")]
            if len(models) == 2:
                cells.append(measure.fmt(row.get("tnl_over_llama"), ".3f"))
            rows.append(cells)
        lines += ["", "Training (forward + loss + backward + AdamW step):", measure.table(headers, rows)]
    if result["generation"]:
        first = result["generation"][0]["context"]
        rows = [[r["context"], _cell(r, "prefill_tokens_per_s", ",.0f"), _cell(r, "ms_per_token", ".2f"),
                 measure.fmt(r.get("max_ms_per_token"), ".2f"), measure.fmt(r.get("vs_first_context"), ".3f"),
                 measure.fmt(r.get("graph_ms_per_token"), ".3f"), measure.fmt(r.get("graph_vs_first_context"), ".3f")]
                for r in result["generation"]]
        lines += ["", f"TNL generation (batch 1, greedy, {result['gen_tokens']} tokens timed; eager steps, and "
                  "replayed from a CUDA graph):",
                  measure.table(["context", "prefill tok/s", "ms/token", "max ms/token", f"latency vs {first}",
                                 "graph ms/token", f"graph vs {first}"], rows)]
    if result["targets"]:
        lines += ["", "Issue 5 targets:"] + [
            f"  {t['what']}: {t['value']:.3f} (target {t['target']}: {'met' if t['met'] else 'NOT met'})"
            for t in result["targets"]]
    return "\n".join(lines)


def run(args) -> dict:
    device = measure.pick_device(args.device)
    amp_dtype = measure.autocast_dtype(device, args.dtype)
    config = tnl_config(args)
    result = {"environment": measure.environment(device), "config_name": args.config, "config": config.to_dict(),
              "parameters": parameter_counts(config), "models": args.models,
              "autocast": None if amp_dtype is None else args.dtype, "checkpoint": args.checkpoint,
              "llama_attention": "SDPA, FlashAttention-2" if flash_only(device, amp_dtype) else "SDPA, any backend",
              "tokens_per_batch": args.tokens_per_batch, "steps": args.steps, "warmup": args.warmup,
              "gen_tokens": args.gen_tokens, "training": [], "generation": []}
    print(f"parameters: {', '.join(f'{m} {n:,}' for m, n in result['parameters'].items())}", file=sys.stderr)
    for context in args.contexts:
        row = {"context": context, "batch": args.tokens_per_batch // context}
        for name in args.models:
            row[name] = measure.guarded(lambda: train_row(name, config, context, args, device, amp_dtype), device)
            print(f"  {name}, context {context}: {_cell(row[name], 'tokens_per_s', ',.0f')} tokens/s", file=sys.stderr)
        result["training"].append(row)
    add_ratios(result["training"], args.models)
    if args.gen_contexts:
        result["generation"] = run_generation(config, args, device, amp_dtype)
    result["targets"] = issue_targets(result)
    return result


def main(argv=None) -> dict:
    return measure.main("bench_tnl", parse_args, run, report, argv)


if __name__ == "__main__":
    main()
