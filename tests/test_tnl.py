"""tnl: TransNormerLLM on lightgen. CPU, tiny configs, short sequences.

Pass with and without TRITON_INTERPRET=1: with it, the model's attention runs lightgen's Triton
kernels under the interpreter (sequences <= 64 tokens there); without it, the PyTorch reference.
Two tests that need long sequences or many steps drop the variable for their duration (they test
the model's recurrent form and the training loop, not the kernels).
"""
import copy
import json
import math

import pytest
import torch
from helpers import train_step_keeping

import lightgen
from lightgen import reference
from tnl import TNLConfig, TNLForCausalLM, data, generation
from tnl.layers import SRMSNorm, decay_slopes, lrpe_theta_init


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors: a second thread only adds synchronisation, and thrashes when the cores are shared
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_interpreter(monkeypatch):
    """The attention's PyTorch reference path instead of kernels in Triton's interpreter."""
    monkeypatch.setenv("LIGHTGEN_CPU_REFERENCE", "1")


def make_model(seed=0, **overrides):
    # a larger init than training's 0.02 so that attention moves the logits visibly
    torch.manual_seed(seed)
    return TNLForCausalLM(TNLConfig.preset("tiny", **{"init_std": 0.1, **overrides})).eval()


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


# ---- config ------------------------------------------------------------------------------------

def test_config_json_round_trip(tmp_path):
    cfg = TNLConfig.preset("tiny", vocab_size=300, lrpe_layers=[0, 1], slope_schedule="paper",
                           gate_act="sigmoid", tie_word_embeddings=True)
    assert TNLConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "c.json")
    assert TNLConfig.load(tmp_path / "c.json") == cfg
    assert json.loads(cfg.to_json())["lrpe_layers"] == [0, 1]


@pytest.mark.parametrize("name, sizes", [
    ("385m", (1024, 24, 8, 2816)), ("1b", (2048, 16, 16, 5632)), ("7b", (4096, 30, 32, 11008))])
def test_presets(name, sizes):
    cfg = TNLConfig.preset(name, vocab_size=64000)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.glu_dim) == sizes
    assert cfg.head_dim == 128 and cfg.vocab_size == 64000


@pytest.mark.parametrize("overrides, field", [
    (dict(num_heads=3), "num_heads"),
    (dict(hidden_size=48), "num_heads"),  # head dim 24: not a kernel size
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_layers=True), "num_layers"),
    (dict(lrpe_layers=[2]), "lrpe_layers"),
    (dict(slope_schedule="alibi"), "slope_schedule"),
    (dict(gate_act="tanh"), "gate_act"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(scale_embedding="yes"), "scale_embedding"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        TNLConfig.preset("tiny", **overrides)


def test_config_rejects_unknown_fields_and_presets():
    with pytest.raises(ValueError, match="hidden_dim"):
        TNLConfig.from_dict({"hidden_dim": 64})
    with pytest.raises(ValueError, match="preset"):
        TNLConfig.preset("13b")


# ---- layers ------------------------------------------------------------------------------------

def test_srmsnorm_has_no_parameters_and_unit_rms():
    norm = SRMSNorm(1e-6)
    assert list(norm.parameters()) == []
    y = norm(torch.randn(3, 5, 64) * 7)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3, 5), rtol=1e-4, atol=1e-4)


def test_decay_slopes_schedules():
    base = torch.tensor(lightgen.tnl_slopes(4))
    released = TNLConfig.preset("tiny", hidden_size=128, num_heads=4, num_layers=3)
    torch.testing.assert_close(decay_slopes(released, 0), base * (1 + 1e-5))
    torch.testing.assert_close(decay_slopes(released, 1), base * (0.5 + 1e-5))
    torch.testing.assert_close(decay_slopes(released, 2), base * 1e-5)
    one_layer = TNLConfig.preset("tiny", num_layers=1)
    torch.testing.assert_close(decay_slopes(one_layer, 0), torch.tensor(lightgen.tnl_slopes(2)))
    paper = TNLConfig.preset("tiny", hidden_size=128, num_heads=4, num_layers=2, slope_schedule="paper")
    torch.testing.assert_close(decay_slopes(paper, 0), torch.tensor([2.0, 4.0, 6.0, 8.0]) * 0.5)
    torch.testing.assert_close(decay_slopes(paper, 1), torch.zeros(4))


def test_gla_wiring():
    model = make_model()
    mixers = [block.token_mixer for block in model.layers]
    # theta: learnable, only where LRPE is on (layer 0 by default), 10000^(-2i/(H d)) as [H, d]
    assert isinstance(mixers[0].theta, torch.nn.Parameter) and mixers[1].theta is None
    expected = 10000.0 ** (-2.0 / 64 * torch.arange(64.0)).reshape(2, 32)
    torch.testing.assert_close(mixers[0].theta.detach(), expected)
    torch.testing.assert_close(lrpe_theta_init(2, 32), expected)
    # slopes: a buffer, not a parameter, not saved (rebuilt from the config)
    names = dict(model.named_parameters())
    assert not any("slopes" in n for n in names) and not any("slopes" in n for n in model.state_dict())
    torch.testing.assert_close(mixers[0].slopes, decay_slopes(model.config, 0))
    model.to(torch.bfloat16)  # the rates stay fp32: bf16 would round them by up to 0.4%
    assert mixers[0].qkvu_proj.weight.dtype == torch.bfloat16 and mixers[0].slopes.dtype == torch.float32
    # the exact lightgen variant
    assert mixers[0].attn.variant == lightgen.Variant.parse(
        "decay=constant,causal,lrpe=d,phi=silu,dk=32,dv=32,scale=1")
    assert mixers[1].attn.variant == lightgen.Variant.parse(
        "decay=constant,causal,lrpe=none,phi=silu,dk=32,dv=32,scale=1")


def test_tied_and_untied_heads():
    tied = make_model(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    untied = make_model()
    assert untied.lm_head.weight is not untied.embed_tokens.weight


# ---- parallel form vs recurrent form -----------------------------------------------------------

def recurrent_logits(model, ids, prompt_len, chunk):
    """Prompt through chunked prefill, then every later token through the recurrent step."""
    with torch.no_grad():
        logits, cache = generation.prefill(model, ids[:, :prompt_len], chunk_size=chunk, all_logits=True)
        steps = [model(ids[:, t:t + 1], cache=cache) for t in range(prompt_len, ids.shape[1])]
    assert cache.position == ids.shape[1]
    return torch.cat([logits, *steps], dim=1)


def test_parallel_matches_recurrent_over_240_tokens(no_interpreter):
    model = make_model(lrpe_layers=[0])  # layer 0 with LRPE, layer 1 without
    ids = torch.randint(0, 256, (2, 240), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        parallel = model(ids)
    recurrent = recurrent_logits(model, ids, prompt_len=40, chunk=16)  # chunks 16, 16, 8, then 200 steps
    assert rel_err(recurrent, parallel) < 1e-5
    torch.testing.assert_close(recurrent, parallel, rtol=1e-4, atol=1e-4)
    # the attention matters: other decay rates give other logits
    model.layers[0].token_mixer.slopes.mul_(4)
    with torch.no_grad():
        assert rel_err(model(ids), parallel) > 1e-3


def test_parallel_kernel_matches_recurrent_short():
    """48 tokens: under TRITON_INTERPRET=1 the parallel side is lightgen's Triton kernel."""
    model = make_model(lrpe_layers=[0, 1])
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        parallel = model(ids)
    recurrent = recurrent_logits(model, ids, prompt_len=20, chunk=8)
    assert rel_err(recurrent, parallel) < 2e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="4096 decode steps need a GPU")
def test_generation_matches_parallel_over_4096_steps_bf16():
    """bf16 on the GPU: a 512-token prompt in chunks of 200, then 4096 tokens through the step kernel,
    against one parallel forward; within the bf16 kernel tolerance (a CPU proxy with the reference
    attention in bf16 measured 9e-3)."""
    from lightgen.verify import TOLERANCE

    model = make_model(lrpe_layers=[0]).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 256, (2, 512 + 4096), generator=torch.Generator().manual_seed(7)).cuda()
    with torch.no_grad():
        parallel = model(ids)
    recurrent = recurrent_logits(model, ids, prompt_len=512, chunk=200)
    tol = TOLERANCE[torch.bfloat16]
    assert rel_err(recurrent[:, 512:], parallel[:, 512:]) < tol
    assert rel_err(recurrent[:, -256:], parallel[:, -256:]) < tol  # no drift by the end


def test_recurrent_state_is_constant_size():
    model = make_model()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        _, cache = generation.prefill(model, ids, chunk_size=5)
        shapes = [tuple(s.shape) for s in cache.states]
        for t in range(10):
            model(ids[:, t:t + 1], cache=cache)
    # [B, H, K, d]: K = 2d where LRPE-d doubles the features (layer 0), d elsewhere
    assert shapes == [(1, 2, 64, 32), (1, 2, 32, 32)]
    assert [tuple(s.shape) for s in cache.states] == shapes


# ---- generate ----------------------------------------------------------------------------------

def test_greedy_generate_matches_parallel_argmax():
    model = make_model()
    prompt = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, 30, greedy=True)
    assert out.shape == (2, 40) and torch.equal(out[:, :10], prompt)
    with torch.no_grad():
        logits = model(out[:, :-1])
    torch.testing.assert_close(out[:, 10:], logits[:, 9:].argmax(-1), rtol=0, atol=0)
    assert torch.equal(model.generate(prompt, 30, do_sample=False), out)
    assert torch.equal(model.generate(prompt, 30, top_k=1), out)  # top-1 sampling is greedy


def test_one_token_prompt_decodes_from_the_zero_state():
    """No prefill chunk: the first call is already a decode step, on a fresh state."""
    model = make_model()
    prompt = torch.randint(0, 256, (2, 1), generator=torch.Generator().manual_seed(6))
    out = model.generate(prompt, 8, greedy=True)
    with torch.no_grad():
        logits = model(out[:, :-1])
    torch.testing.assert_close(out[:, 1:], logits.argmax(-1), rtol=0, atol=0)


def test_ragged_prompts_generate_as_each_alone():
    """Prompts of different lengths (a list): one packed prefill (cu_seqlens), then the steps of all of them at once,
    each at its own LRPE position; the tokens and each prompt's last logits are those of the prompt run alone. A
    one-token prompt among them, and eos padding per row; the cache they leave is refused for a multi-token chunk."""
    model = make_model(lrpe_layers=[0, 1])
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 256, (n,), generator=gen) for n in (7, 1, 12)]
    out = model.generate(prompts, 9, greedy=True)
    for prompt, row in zip(prompts, out):
        assert torch.equal(row, model.generate(prompt[None], 9, greedy=True)[0])
    logits, cache = generation.prefill_ragged(model, prompts)
    for prompt, last in zip(prompts, logits):
        torch.testing.assert_close(last, model(prompt[None])[0, -1], rtol=1e-4, atol=1e-4)
    assert cache.position.tolist() == [7, 1, 12]
    with pytest.raises(ValueError, match="^cache: its sequences stand at different positions"):
        model(torch.zeros(3, 2, dtype=torch.long), cache=cache)
    eos = int(out[0][8])  # the first prompt's second new token
    stopped = model.generate(prompts, 9, greedy=True, eos_token_id=eos)
    for row, free in zip(stopped, out):
        hits = (free[-9:] == eos).nonzero()
        end = len(free) - 9 + (int(hits[0]) + 1 if len(hits) else 9)
        assert torch.equal(row[:end], free[:end]) and (row[end:] == eos).all()
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        model.generate([prompts[0], prompts[0][:0]], 3)
    with pytest.raises(ValueError, match="list of 1-D LongTensors"):
        model.generate([prompts[0][None]], 3)


def test_sampling_is_seeded_and_respects_filters():
    model = make_model()
    prompt = torch.randint(0, 256, (3, 4))
    a = model.generate(prompt, 12, temperature=0.7, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 12, temperature=0.7, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        assert generation.sample_next(logits, top_k=2, generator=g).item() in (1, 2)
        assert generation.sample_next(logits, top_p=0.5, generator=g).item() == 1


def test_generate_stops_at_eos_and_pads():
    model = make_model()
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(5))
    free = model.generate(prompt, 8, greedy=True)
    eos = int(free[0, 6])  # row 0 emits it by its second new token
    out = model.generate(prompt, 8, greedy=True, eos_token_id=eos)
    # each row follows the free run up to its first eos, then holds eos; all rows done -> stop
    ends = []
    for row in range(2):
        hits = (free[row, 5:] == eos).nonzero()
        ends.append(5 + int(hits[0]) + 1 if len(hits) else 13)
    assert out.shape == (2, max(ends))
    for row, end in enumerate(ends):
        assert torch.equal(out[row, :end], free[row, :end])
        assert (out[row, end:] == eos).all()


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=1.5), "top_p"),
])
def test_generate_argument_errors(kwargs, field):
    model = make_model()
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=field):
        model.generate(torch.zeros(1, 2, dtype=torch.long), **kwargs)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)


def test_generate_cuda_graph_argument_errors():
    model = make_model()
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="^cuda_graph='yes': expected True, False or None"):
        model.generate(prompt, 3, cuda_graph="yes")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^cuda_graph=True: the prompts are on cpu"):
            model.generate(prompt, 3, cuda_graph=True)


def test_decode_graph_falls_back_to_eager_steps_where_capture_fails(monkeypatch):
    """cuda_graph=None decodes eagerly, with a warning, where DecodeGraph fails; True raises."""
    def fails(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(generation, "DecodeGraph", fails)
    with pytest.warns(RuntimeWarning, match="could not be captured in a CUDA graph .RuntimeError: operation not"):
        assert generation._decode_graph(None, None, 2, "auto") is None
    with pytest.raises(RuntimeError, match="operation not permitted"):
        generation._decode_graph(None, None, 2, True)
    assert generation._decode_graph(None, None, 2, False) is None


def test_decode_step_keeps_its_buffers():
    """What a CUDA graph of the decode step relies on (DecodeGraph), checked without a GPU: a step from a static token
    buffer and a position tensor reads and writes the same tensors every time (each layer's state updated in place,
    the position advanced in place) and gives the logits of steps at an int position (LRPE in layer 0)."""
    model = make_model(lrpe_layers=[0])
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, eager = generation.prefill(model, ids[:, :20], chunk_size=8)
        _, static = generation.prefill(model, ids[:, :20], chunk_size=8)
        position, tokens = torch.full((2,), 20), torch.zeros(2, 1, dtype=torch.long)
        static.position, states = position, list(static.states)
        for t in range(20, 30):
            tokens.copy_(ids[:, t:t + 1])
            logits = model(tokens, cache=static)
            torch.testing.assert_close(logits, model(ids[:, t:t + 1], cache=eager), rtol=1e-5, atol=1e-5)
            assert static.position is position and position.tolist() == [t + 1] * 2
            assert all(a is b for a, b in zip(static.states, states))
    for a, b in zip(static.states, eager.states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_graph_replays_the_eager_steps():
    """The decode step replayed from a CUDA graph gives the eager step's logits, states and positions, token after
    token (the full TNL in layer 0: LRPE reads the positions the graph advances), and gives the cache back its int
    position; generate's tokens are the same with and without a graph, for a batch and for ragged prompts."""
    model = make_model(lrpe_layers=[0]).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(8)).cuda()
    with torch.no_grad():
        _, eager = generation.prefill(model, ids[:, :40], chunk_size=16)
        _, graphed = generation.prefill(model, ids[:, :40], chunk_size=16)
        graph = generation.DecodeGraph(model, graphed, batch=2)
        assert graphed.position.tolist() == [40, 40]
        for t in range(40, 60):
            expected = model(ids[:, t:t + 1], cache=eager)[:, -1]
            assert torch.equal(graph(ids[:, t]), expected), t
        graph.close()
    assert graphed.position == eager.position == 60
    for a, b in zip(graphed.states, eager.states):
        assert torch.equal(a, b)
    prompt = ids[:, :7]
    eager = model.generate(prompt, 30, greedy=True, cuda_graph=False)
    assert torch.equal(model.generate(prompt, 30, greedy=True, cuda_graph=True), eager)
    assert torch.equal(model.generate(prompt, 30, greedy=True, cuda_graph=None), eager)
    prompts = [ids[0, :7], ids[1, :1], ids[1, :12]]
    for a, b in zip(model.generate(prompts, 30, greedy=True, cuda_graph=True),
                    model.generate(prompts, 30, greedy=True, cuda_graph=False)):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_graph_under_autocast():
    """An fp32 model under bf16 autocast (as tools/bench_tnl runs it): the capture casts the weights on every replay
    (autocast's cast cache is off while capturing) and decodes as the eager steps do."""
    model = make_model(lrpe_layers=[0]).cuda()
    prompt = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(9)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        graphed = model.generate(prompt, 20, greedy=True, cuda_graph=True)
        eager = model.generate(prompt, 20, greedy=True, cuda_graph=False)
    assert torch.equal(graphed, eager)


# ---- gradients vs a float64 reference ----------------------------------------------------------

class Float64Reference:
    """lightgen.reference.quadratic in float64: the attention of the reference model."""

    def __init__(self, variant):
        self.variant = variant

    def __call__(self, q, k, v, slopes=None, theta=None):
        return reference.quadratic(self.variant, q.double(), k.double(), v.double(), slopes.double(),
                                   None if theta is None else theta.double())


def test_gradients_match_float64_reference():
    model = make_model(lrpe_layers=[0]).train()
    ref = TNLForCausalLM(model.config).train()
    ref.load_state_dict(model.state_dict())
    ref.double()
    for block in ref.layers:
        block.token_mixer.attn = Float64Reference(block.token_mixer.attn.variant)
    ids = torch.randint(0, 256, (2, 49), generator=torch.Generator().manual_seed(4))
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    ref_loss = ref.loss(ids[:, :-1], ids[:, 1:])
    ref_loss.backward()
    # fp32 against float64: the loss to 1e-5 relative, every gradient to 1e-5 relative (Frobenius);
    # measured about 1e-7 and 1e-6
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * ref_loss.item()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None and ref_params[name].grad is not None, name
        assert ref_params[name].grad.norm() > 0, name
        assert rel_err(p.grad, ref_params[name].grad) < 1e-5, name
    assert model.layers[0].token_mixer.theta.grad.abs().sum() > 0  # dθ comes back from the kernel


def test_gradient_checkpointing_keeps_less_and_gives_the_same_gradients(no_interpreter):
    def run(checkpointing):
        model = make_model(lrpe_layers=[0]).train()
        model.gradient_checkpointing = checkpointing
        return train_step_keeping(model, torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(5)))

    loss, grads, kept = run(False)
    loss_ckpt, grads_ckpt, kept_ckpt = run(True)
    assert kept_ckpt < kept / 2  # each block keeps its input only
    # the recomputed blocks do the same arithmetic: equal to rounding
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    for name, g in grads.items():
        assert rel_err(grads_ckpt[name], g) < 1e-6, name


# ---- save / load, torch.compile ----------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip(tmp_path, tie):
    model = make_model(tie_word_embeddings=tie)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = TNLForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tie
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        # tied weights are stored once
        assert sum(k in f.keys() for k in ("lm_head.weight", "embed_tokens.weight")) == (1 if tie else 2)


def test_from_pretrained_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        TNLForCausalLM.from_pretrained(tmp_path)


def test_deepcopy_and_pickle():
    import copy
    import io

    model = make_model()
    ids = torch.randint(0, 256, (1, 16))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(model)(ids), model(ids))
        assert torch.equal(torch.load(buffer, weights_only=False)(ids), model(ids))


def test_torch_compile_forward():
    # aot_eager: the full dynamo + AOTAutograd trace in ~2 s; inductor also works (~15 s on CPU)
    torch._dynamo.reset()
    model = make_model()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)
    model.train()
    loss = torch.nn.functional.cross_entropy(compiled(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    assert model.layers[0].token_mixer.theta.grad is not None


# ---- data and training -------------------------------------------------------------------------

def test_byte_tokenizer_and_batches():
    tok = data.ByteTokenizer()
    text = "Shall I compare thee to a summer’s day?\n"
    assert tok.decode(tok.encode(text)) == text
    tokens = tok.encode(text * 50)
    train, held_out = data.split(tokens, 0.1)
    assert len(train) + len(held_out) == len(tokens) and len(held_out) == len(tokens) - int(len(tokens) * 0.9)
    x, y = data.random_batch(train, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    batches = list(data.eval_batches(held_out, 2, 3, 8))
    assert len(batches) == 2 and batches[0][0].shape == (3, 8)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, data.eval_batches(held_out, 2, 3, 8)))
    with pytest.raises(ValueError, match="eval_fraction"):
        data.split(tokens, 1.5)



def test_training_loss_falls_and_resumes(tmp_path, corpus_dir, no_interpreter, capsys):
    from tnl import train

    argv = ["--config", "tiny", "--out", str(tmp_path), "--steps", "60", "--batch-size", "8", "--seq-len", "64",
            "--warmup", "10", "--eval-every", "30", "--eval-batches", "4", "--save-every", "30",
            "--max-bytes", "300000", "--data-dir", corpus_dir, "--sample-tokens", "20", "--quiet", "--seed", "0"]
    history = train.train(train.parse_args(argv))
    evals = dict(history["eval"])
    assert sorted(evals) == [0, 30, 60]
    assert evals[0] > 0.95 * math.log(256)  # starts near uniform over bytes
    assert evals[60] < 0.6 * evals[0], evals  # measured about 0.48 (5.56 -> 2.69)
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoint" / "trainer.pt").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["eval"][-1][0] == 60

    resumed = train.train(train.parse_args(argv[:4] + ["--steps", "70", "--resume"] + argv[6:]))
    assert "resumed from" in capsys.readouterr().out
    assert [s for s, _ in resumed["train"]] == list(range(1, 71))
    assert resumed["eval"][:3] == history["eval"] and resumed["eval"][-1][0] == 70


def test_loss_plot(tmp_path, capsys):
    from tnl import train

    history = {"train": [(1, 5.0), (2, 4.0), (3, 3.5)], "eval": [(0, 5.5), (3, 3.6)]}
    written = train.plot(history, tmp_path / "loss.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not written and "matplotlib is not installed" in capsys.readouterr().out
    else:
        assert written and (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_train_argument_errors():
    from tnl import train

    with pytest.raises(ValueError, match="--seq-len"):
        train.parse_args(["--seq-len", "0"])
    with pytest.raises(SystemExit):
        train.parse_args(["--config", "huge"])


# ---- HF transformers (optional) ----------------------------------------------------------------

def test_hf_wrappers(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoConfig, AutoModelForCausalLM

    import tnl.hf

    cfg = tnl.hf.TNLHFConfig(**TNLConfig.preset("tiny", tie_word_embeddings=True).to_dict())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert isinstance(model, tnl.hf.TNLHFForCausalLM)
    ids = torch.randint(0, 256, (2, 16))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 16, 256) and out.loss.item() > 0
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), tnl.hf.TNLHFConfig)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    torch.testing.assert_close(loaded.model.layers[1].token_mixer.slopes, decay_slopes(loaded.model.config, 1))
    with pytest.raises(ValueError, match="num_heads"):
        tnl.hf.TNLHFConfig(num_heads=3)


# ---- output_norm="head": the fused epilogue ----------------------------------------------------

def test_fused_epilogue_matches_the_pytorch_path():
    """output_norm="head": norm and gate inside the kernel give the loss and gradients of the PyTorch
    epilogue (fp32 under the interpreter), for every gate activation. With eps = 1e-2: at the default
    1e-6 a row of o near zero (rms 3e-4 here) makes the norm ill-conditioned, and a 1e-7 difference in
    a layer's input (the two paths round differently) grows to 1e-5 in its output; each kernel's own
    accuracy against float64 is test_epilogue's."""
    for act in ("identity", "silu"):
        model = make_model(output_norm="head", gate_act=act, norm_eps=1e-2).train()
        mixer = model.layers[0].token_mixer
        assert mixer.fused.variant == lightgen.Variant.parse(
            f"decay=constant,causal,lrpe=d,phi=silu,dk=32,dv=32,scale=1,norm=srms,eps=0.01,gate={act}")
        unfused = copy.deepcopy(model)
        for block in unfused.layers:
            block.token_mixer.use_fused = False
        ids = torch.randint(0, 256, (2, 41), generator=torch.Generator().manual_seed(5))
        losses = [m.loss(ids[:, :-1], ids[:, 1:]) for m in (model, unfused)]
        for loss in losses:
            loss.backward()
        assert abs(losses[0].item() - losses[1].item()) < 1e-5 * losses[1].item()
        other = dict(unfused.named_parameters())
        for name, p in model.named_parameters():
            assert rel_err(p.grad, other[name].grad) < 1e-5, name


def test_head_norm_is_per_head_and_row_norm_is_not():
    """The two output norms differ (per head vs the whole row) unless there is one head."""
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        row, head = (make_model(output_norm=norm)(ids) for norm in ("row", "head"))
        assert rel_err(head, row) > 1e-3
        one = [make_model(output_norm=norm, num_heads=1)(ids) for norm in ("row", "head")]
    assert rel_err(one[1], one[0]) < 1e-5


def test_cache_and_sequence_parallel_paths_keep_the_epilogue_in_pytorch():
    """Prefill and decode (states), and the sequence-parallel hook (which adds a state contribution to o
    after the kernel, so the norm must come later), run the plain attention and the epilogue in PyTorch,
    with the fused path's result."""
    model = make_model(output_norm="head", lrpe_layers=[0, 1])
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fused = model(ids)
        assert rel_err(recurrent_logits(model, ids, prompt_len=20, chunk=8), fused) < 2e-5
        seen = []

        def hook(attn, q, k, v, slopes=None, theta=None):
            seen.append(attn.variant)
            return attn(q, k, v, slopes=slopes, theta=theta)

        for block in model.layers:
            block.token_mixer.sequence_parallel = hook
        assert rel_err(model(ids), fused) < 2e-5
    assert len(seen) == 2 and not any(v.epilogue for v in seen)


@pytest.mark.parametrize("output_norm", ["row", "head"])
def test_packed_documents_attend_to_themselves(output_norm):
    """model(ids, cu_seqlens=cu): documents packed in one row each attend only to themselves (LRPE from 0): the
    logits and the gradients of the loss are those of one call per document, with checkpointing too (the fused
    epilogue under output_norm="head")."""
    model = make_model(output_norm=output_norm, lrpe_layers=[0, 1]).train()
    model.gradient_checkpointing = True
    lengths = [20, 0, 37]
    ids = torch.randint(0, 256, (1, sum(lengths) + 1), generator=torch.Generator().manual_seed(8))
    cu = torch.tensor([0, 20, 20, 57], dtype=torch.int32)
    packed = model(ids[:, :-1], cu_seqlens=cu)
    bounds = [(0, 20), (20, 57)]
    alone = torch.cat([model(ids[:, a:b]) for a, b in bounds], 1)
    assert rel_err(packed, alone) < 1e-5
    packed_loss = model.loss(ids[:, :-1], ids[:, 1:], cu_seqlens=cu)
    grads = torch.autograd.grad(packed_loss, list(model.parameters()))
    separate = sum(model.loss(ids[:, a:b], ids[:, a + 1:b + 1]) * (b - a) for a, b in bounds) / 57
    for g, e in zip(grads, torch.autograd.grad(separate, list(model.parameters()))):
        assert rel_err(g, e) < 1e-4
    used = generation.TNLCache.empty(len(model.layers))
    used.position = 3
    with pytest.raises(ValueError, match="^cu_seqlens: packed prompts fill a fresh cache"):
        model(ids[:, :-1], cache=used, cu_seqlens=cu)
    model.layers[0].token_mixer.sequence_parallel = lambda attn, q, k, v, **kw: attn(q, k, v, **kw)
    with pytest.raises(ValueError, match="^cu_seqlens: packed documents are not split across ranks"):
        model(ids[:, :-1], cu_seqlens=cu)
