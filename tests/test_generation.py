"""slothai's generate() on patched tiny 4-bit QLoRA models (slothai/generation), against
transformers' own generate and the unpatched model's training forward.

Every model is built as users build them (from_pretrained with a BitsAndBytesConfig,
get_peft_model with task_type="CAUSAL_LM") and called as TRL calls it, through
PeftModelForCausalLM.generate. LoRA B is drawn non-zero, so the adapter moves the logits.
On the CPU the decode step runs uncaptured (compile modes tested apart); the CUDA tests at
the end record and replay its CUDA graphs.
"""
import contextlib
import copy
import dataclasses
import pickle
import warnings

import pytest
import torch

import slothai
from slothai import qlora
from slothai.generation import CALLS
from slothai.patching.causal_lm import CAUSAL_LM_FAMILIES
from training_checks import cast_adapters, draw_lora_b

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

PAD = 0
LORA_STD = 0.3  # LoRA B large enough that the adapter changes the greedy tokens


def _config(family):
    """The family's tiny config; sliding windows short enough that the tests' sequences
    pass them (Gemma 3: a sliding and a full-attention layer)."""
    config = qlora.make_config("tiny", family)
    if family in ("mistral", "gemma2", "gemma3_text", "qwen2", "qwen3"):
        config.sliding_window = 5
    if family == "gemma3_text":
        config.layer_types = ["sliding_attention", "full_attention"]
    if family in ("qwen2", "qwen3"):
        config.use_sliding_window, config.max_window_layers = True, 1
        config.layer_types = ["full_attention", "sliding_attention"]
    return config


def _build(family="llama", tmp_path=None, seed=0):
    from transformers import AutoModelForCausalLM

    path = None
    if family != "llama" and tmp_path is not None:
        torch.manual_seed(seed)
        path = str(tmp_path / family)
        AutoModelForCausalLM.from_config(_config(family), dtype=torch.float32).save_pretrained(path)
    model = qlora.build("tiny", family, path=path, seed=seed)
    draw_lora_b(model, std=LORA_STD)
    return model


def _patched(model, **options):
    slothai.patch(model)
    slothai.generation.configure(model, strict=True, **options)
    return model


def _left_padded(rows=3, length=7, pads=(0, 2, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for r, n in enumerate(pads[:rows]):
        mask[r, :n] = 0
        ids[r, :n] = PAD
    return ids, mask


class _unpatched:
    """The model unpatched for a while (transformers' own generate and forward on the
    same weights); patched again after, with its generation options."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.options = dataclasses.asdict(slothai.generation.configure(self.model))
        slothai.unpatch(self.model)
        return self.model

    def __exit__(self, *exc):
        slothai.patch(self.model)
        slothai.generation.configure(self.model, **self.options)


def _transformers_generate(model, **kwargs):
    with _unpatched(model):
        return model.generate(**kwargs)


def _calls(prefix="slothai"):
    return sum(n for how, n in CALLS.items() if how.startswith(prefix))


@pytest.fixture(scope="module")
def llama():
    return _patched(_build("llama"))


@pytest.mark.parametrize("family", sorted(CAUSAL_LM_FAMILIES))
def test_greedy_equals_transformers_on_every_family(family, tmp_path):
    # A left-padded batch with an attention mask, 12 new tokens: past every sliding
    # window (5 slots), the default EOS id stopping rows (pad = EOS, as transformers sets).
    model = _patched(_build(family, tmp_path))
    ids, mask = _left_padded()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    before = _calls()
    got = model.generate(**kw)
    assert _calls() == before + 1
    torch.testing.assert_close(got, _transformers_generate(model, **kw), rtol=0, atol=0)


def _forward_logits(model, sequences, mask=None):
    """The unpatched model's training forward over the whole sequences: [rows, len, vocab]."""
    with _unpatched(model), torch.no_grad():
        if mask is None:
            return model(input_ids=sequences).logits
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return model(input_ids=sequences, attention_mask=mask, position_ids=positions).logits


def _assert_step_logits_match_forward(model, ids, mask, new=8, **kw):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         eos_token_id=None, pad_token_id=PAD, return_dict_in_generate=True, output_logits=True, **kw)
    seq, prompt = out.sequences, ids.shape[1]
    assert seq.shape == (ids.shape[0], prompt + new) and len(out.logits) == new
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], new, dtype=mask.dtype)], 1)
    want = _forward_logits(model, seq, full_mask)
    for t, got in enumerate(out.logits):
        torch.testing.assert_close(got, want[:, prompt - 1 + t].float(), rtol=1e-4, atol=1e-4, msg=f"step {t}")
    return out


def test_logits_of_every_token_equal_the_training_forward(llama):
    # batch 1 without padding (compared with model(sequences).logits as it is), a
    # left-padded batch, the adapter disabled (PEFT's disable_adapter, GRPO's reference),
    # and after an optimizer step changed the adapter in place.
    model = llama
    ids, mask = _left_padded()
    out = model.generate(input_ids=ids[:1], max_new_tokens=8, do_sample=False, eos_token_id=None,
                         return_dict_in_generate=True, output_logits=True)
    want = _forward_logits(model, out.sequences)
    for t, got in enumerate(out.logits):
        torch.testing.assert_close(got, want[:, 6 + t], rtol=1e-4, atol=1e-4)
    with_adapter = _assert_step_logits_match_forward(model, ids, mask)
    with model.disable_adapter():
        base = _assert_step_logits_match_forward(model, ids, mask)
    assert not torch.equal(base.sequences, with_adapter.sequences)  # the adapter matters here
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loss = model(input_ids=out.sequences, labels=out.sequences).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    after = _assert_step_logits_match_forward(model, ids, mask)
    assert not all(torch.equal(a, b) for a, b in zip(after.logits, with_adapter.logits))
    assert model.training  # generate puts every module's mode back


def test_sampling_options_apply_transformers_processors(llama):
    # Temperature, top-k, top-p, min-p and a repetition penalty: each step's scores equal
    # transformers' processors (built by its own generate for these options) applied to the
    # same raw logits and the sequence so far; each token is one the scores allow.
    model = llama
    ids, mask = _left_padded()
    options = dict(do_sample=True, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, pad_token_id=PAD,
                         return_dict_in_generate=True, output_scores=True, output_logits=True, **options)
    from transformers import GenerationConfig
    from transformers.generation.logits_process import LogitsProcessorList

    head = model.get_base_model()
    config = GenerationConfig(**options, eos_token_id=None, pad_token_id=PAD)
    processors = head._get_logits_processor(generation_config=config, input_ids_seq_length=ids.shape[1],
                                            encoder_input_ids=ids, logits_processor=LogitsProcessorList(),
                                            device="cpu", model_kwargs={"attention_mask": mask})
    names = [type(p).__name__ for p in processors]
    assert names[0] == "RepetitionPenaltyLogitsProcessor" and len(names) == 5, names
    prompt = ids.shape[1]
    for t, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        want = processors(out.sequences[:, :prompt + t], logits.clone())
        torch.testing.assert_close(scores, want, rtol=0, atol=0, msg=f"step {t}")
        token = out.sequences[:, prompt + t]
        assert torch.isfinite(scores.gather(1, token[:, None])).all()


def test_seeded_sampling_draws_from_the_same_distribution_as_transformers(llama):
    # 2048 draws of the first new token of one prompt (top-k 8): the same distribution
    # as transformers' draws and as the scores say (total variation < 0.06, about 3x what
    # 2048 draws leave); on the CPU a seed even draws the same tokens.
    model = llama
    ids = _left_padded(rows=1)[0]
    n = 2048
    kw = dict(input_ids=ids, max_new_tokens=1, do_sample=True, temperature=0.9, top_k=8, num_return_sequences=n,
              eos_token_id=None, pad_token_id=PAD)
    torch.manual_seed(3)
    out = model.generate(**kw, return_dict_in_generate=True, output_scores=True)
    torch.manual_seed(3)
    want = _transformers_generate(model, **kw)
    got_tokens, want_tokens = out.sequences[:, -1], want[:, -1]
    probs = out.scores[0][0].softmax(-1)
    got_freq = torch.bincount(got_tokens, minlength=probs.numel()).float() / n
    want_freq = torch.bincount(want_tokens, minlength=probs.numel()).float() / n
    assert (probs > 0).sum() == 8
    assert 0.5 * (got_freq - want_freq).abs().sum() < 0.06
    assert 0.5 * (got_freq - probs).abs().sum() < 0.06
    assert (got_tokens == want_tokens).float().mean() > 0.95


def test_several_eos_ids_pad_and_min_new_tokens_stop_as_transformers(llama):
    # EOS ids chosen among the tokens greedy decoding emits, so rows finish at different
    # steps; min_new_tokens holds the EOS back at first; a repetition penalty reads the
    # sequence so far. Same tokens and the same stopping length as transformers.
    model = llama
    ids, mask = _left_padded(rows=4, pads=(0, 1, 3, 5))
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=PAD,
                  repetition_penalty=1.2)
    new = model.generate(**common, eos_token_id=None)[:, ids.shape[1]:].tolist()
    # Row r's EOS: its token at step 2 + 2r or later that no row emits in the first two steps
    # (there min_new_tokens would change the path), so each row ends by then, whatever the weights.
    early = {tok for row in new for tok in row[:2]}
    eos = [next(tok for tok in row[2 + 2 * r:] if tok not in early) for r, row in enumerate(new)]
    kw = dict(common, eos_token_id=eos, min_new_tokens=2)
    got = model.generate(**kw)
    want = _transformers_generate(model, **kw)
    assert got.shape == want.shape and got.shape[1] < ids.shape[1] + 16, (got.shape, want.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_num_return_sequences_and_dict_output_as_transformers(llama):
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    model = llama
    ids, mask = _left_padded(rows=2)
    # sampling from the top token only (transformers refuses num_return_sequences greedy)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=1, num_return_sequences=3,
              eos_token_id=None, pad_token_id=PAD, return_dict_in_generate=True, output_scores=True,
              output_logits=True)
    got, want = model.generate(**kw), _transformers_generate(model, **kw)
    assert type(got) is type(want) is GenerateDecoderOnlyOutput
    torch.testing.assert_close(got.sequences, want.sequences, rtol=0, atol=0)
    for name in ("scores", "logits"):
        g, w = getattr(got, name), getattr(want, name)
        assert isinstance(g, tuple) and len(g) == len(w) == 6
        for a, b in zip(g, w):
            assert a.shape == b.shape == (6, 256) and a.dtype == b.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert isinstance(plain, torch.Tensor)


def test_what_it_does_not_cover_runs_transformers_generate_with_one_warning(llama):
    model = llama
    ids, mask = _left_padded(rows=2)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False)
    before = _calls("transformers: generation mode beam_search")
    slothai.generation.configure(model, strict=False)
    try:
        with pytest.warns(UserWarning, match="beam_search"):
            got = model.generate(**kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.generate(**kw)  # said once
    finally:
        slothai.generation.configure(model, strict=True)
    assert _calls("transformers: generation mode beam_search") == before + 2
    torch.testing.assert_close(got, _transformers_generate(model, **kw), rtol=0, atol=0)


def test_trl_style_call_takes_disable_compile_and_a_generation_config(llama):
    # GRPOTrainer without vLLM: generate(input_ids, attention_mask, generation_config=
    # GenerationConfig(..., disable_compile=True)) on the PEFT model, no grad.
    from transformers import GenerationConfig

    model = llama
    ids, mask = _left_padded()
    config = GenerationConfig(max_new_tokens=5, do_sample=True, pad_token_id=PAD, bos_token_id=1, eos_token_id=[2],
                              temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
                              cache_implementation=None, disable_compile=True)
    before = _calls()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert _calls() == before + 1 and out.shape[0] == 3 and out.shape[1] <= ids.shape[1] + 5


@pytest.mark.parametrize("family", sorted(CAUSAL_LM_FAMILIES))
def test_decode_step_compiles_whole_without_a_graph_break(family, tmp_path, compile_counters):
    # compile="full": the step under torch.compile(fullgraph=True) — a host read of a
    # device value would break it (or raise): greedy and sampling with every option, on
    # every family (Dynamo alone: backend "eager").
    model = _patched(_build(family, tmp_path), compile="full", backend="eager")
    ids, mask = _left_padded()
    for kw in (dict(do_sample=False), dict(do_sample=True, temperature=0.8, top_k=30, top_p=0.9, min_p=0.02,
                                           repetition_penalty=1.1, min_new_tokens=2)):
        want = _transformers_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=6, **kw) \
            if not kw["do_sample"] else None
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **kw)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert dict(compile_counters["graph_break"]) == {}
    assert compile_counters["stats"]["unique_graphs"] == 2  # one step per sampling rule


def test_compiled_decode_step_takes_lora_a_as_a_fused_reduction():
    # In a compiled decode step (one token a row, no grad) LoRA's A(x) is a reduction that
    # inductor fuses with x's producer, not a GEMM of its own: the step's graph (the one
    # "full" compiles; prefills run eager) holds the LM head's linear only, not also one
    # per projection (1 + 7 x layers); the tokens are transformers'.
    linears = []

    def backend(gm, inputs):
        linears.append(sum(n.op == "call_function" and n.target is torch._C._nn.linear for n in gm.graph.nodes))
        return gm

    model, ref = _patched(_build("llama"), compile="full", backend=backend), _build("llama")
    ids, mask = _left_padded()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(model.generate(**kw), ref.generate(**kw), rtol=0, atol=0)
    assert linears == [1], linears


@pytest.mark.parametrize("mode", ["full", "regional"])
def test_inductor_step_takes_q_k_v_and_gate_up_as_one_4bit_op_each(mode):
    # Compiled by inductor (CPU here), the decode step's 4-bit products that share x
    # are one nf4_linear_group each (generation/grouping.py): per layer q/k/v and
    # gate/up grouped, o and down alone -- 4 ops where there were 7 -- with
    # transformers' tokens. "full": the whole step's code; "regional" (CUDA's default):
    # the one layer function every layer runs.
    import re

    from torch._inductor.utils import run_and_get_code

    model, ref = _patched(_build("llama"), compile=mode, backend="inductor"), _build("llama")
    ids, mask = _left_padded()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    out, code = run_and_get_code(lambda: model.generate(**kw))
    torch.testing.assert_close(out, ref.generate(**kw), rtol=0, atol=0)
    step = code[-1]
    calls = re.findall(r"= torch\.ops\.slothai\.(nf4_linear_group|nf4_linear)\.default\(", step)
    layers = model.config.num_hidden_layers if mode == "full" else 1
    assert calls == ["nf4_linear_group", "nf4_linear"] * 2 * layers, calls


def test_regional_mode_compiles_one_layer_for_all_layers(compile_counters):
    # compile="regional" (CUDA's default): every decoder layer runs one compiled
    # function, its cache slots as arguments — one compilation for the decode step and,
    # with compile_prefill=True, one for prefills of any prompt length, whatever the
    # number of layers.
    model, ref = _patched(_build("llama"), compile="regional", backend="eager", compile_prefill=True), \
        _build("llama")
    for length in (7, 9, 12):
        ids, mask = _left_padded(length=length)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        torch.testing.assert_close(model.generate(**kw), ref.generate(**kw), rtol=0, atol=0)
    assert dict(compile_counters["graph_break"]) == {}
    assert compile_counters["stats"]["unique_graphs"] == 2, dict(compile_counters["stats"])


def test_regional_mode_with_eager_prefills_compiles_the_decode_step_alone(compile_counters):
    # compile_prefill=False (the default): prefills of every length run the layers eager
    # (through the same cache), the decode step is the one compiled function; the tokens
    # are transformers'.
    model, ref = _patched(_build("llama"), compile="regional", backend="eager"), _build("llama")
    for length in (7, 12):
        ids, mask = _left_padded(length=length)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        torch.testing.assert_close(model.generate(**kw), ref.generate(**kw), rtol=0, atol=0)
    assert dict(compile_counters["graph_break"]) == {}
    assert compile_counters["stats"]["unique_graphs"] == 1, dict(compile_counters["stats"])


def test_regional_generation_interleaved_with_compiled_training(compile_counters):
    # GRPO's pattern on a slothai.compile'd model: train, generate (regional mode), train.
    # Generation does not touch the training layers' compiled code (no recompile there),
    # the layers get their training forward back, and the tokens are transformers'.
    model = slothai.compile(_patched(_build("llama"), compile="regional", backend="eager"), backend="aot_eager")
    ref = _build("llama")
    forwards = [layer.forward for layer in model.get_base_model().model.layers]
    ids, mask = _left_padded()
    with slothai.compile_report() as report:
        for step in range(2):
            qlora.train(model, [ids], lr=1e-2)
            qlora.train(ref, [ids], lr=1e-2)
            kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            torch.testing.assert_close(model.generate(**kw), ref.generate(**kw), rtol=0, atol=0)
    assert [layer.forward for layer in model.get_base_model().model.layers] == forwards
    assert report.recompiles == [] and report.graph_breaks == [], [r["reason"] for r in report.recompiles]
    assert report.region_calls["compiled"] == 4, report  # two training steps x two layers


class _StandInGraph:
    """Replays by running the step again: what a CUDA graph's replay computes."""

    def __init__(self, step):
        self.step = step

    def replay(self):
        self.step()

    def reset(self):
        pass


class _StandInRecorder:
    """decode.CudaRecorder on the CPU: the warm-up runs the step for real (as on a GPU,
    where it moves the session's state on), capturing runs nothing."""

    def available(self, device):
        return True

    @contextlib.contextmanager
    def on(self, device):
        yield

    def synchronize(self):
        pass

    def rng_state(self):
        return torch.get_rng_state()

    def set_rng_state(self, state):
        torch.set_rng_state(state)

    def warm_up(self, step, n):
        for _ in range(n):
            step()

    def capture(self, step):
        return _StandInGraph(step)


def test_graph_recording_logic_on_the_cpu(llama, monkeypatch):
    # The recording and replaying bookkeeping with a stand-in for torch.cuda: the state
    # the warm-up moves on is put back (tokens, logits and seeded draws equal to the
    # uncaptured step's), one graph per state (recorded, then replayed; an in-place LoRA
    # update replays, disable_adapter and a new Parameter record their own), at most
    # MAX_GRAPHS kept.
    from slothai.generation import decode

    model = llama
    ids, mask = _left_padded()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=7, eos_token_id=None, pad_token_id=PAD,
              return_dict_in_generate=True, output_logits=True)
    sampled = dict(do_sample=True, top_p=0.9, temperature=0.8, repetition_penalty=1.2, output_scores=True)

    def run(**extra):
        torch.manual_seed(5)
        return model.generate(**kw, **extra)

    def same(a, b):
        torch.testing.assert_close(a.sequences, b.sequences, rtol=0, atol=0)
        for x, y in zip(a.logits, b.logits):
            torch.testing.assert_close(x, y, rtol=0, atol=0)

    want_greedy, want_sampled = run(do_sample=False), run(**sampled)
    slothai.generation.release(model)
    monkeypatch.setattr(decode.Engine, "recorder", _StandInRecorder())
    CALLS.clear()
    same(run(do_sample=False), want_greedy)
    same(run(do_sample=False), want_greedy)
    same(run(**sampled), want_sampled)
    same(run(**sampled), want_sampled)
    assert CALLS == {"slothai, graph recorded": 2, "slothai, graph replayed": 2}, CALLS
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(1.5)
    run(do_sample=False)
    assert CALLS["slothai, graph replayed"] == 3, CALLS
    with model.disable_adapter():
        run(do_sample=False)
    layer = model.get_base_model().model.layers[0].mlp.up_proj
    layer.lora_B["default"].weight = torch.nn.Parameter(layer.lora_B["default"].weight.detach() * 1.0)
    run(do_sample=False)
    assert CALLS["slothai, graph recorded"] == 4, CALLS
    (session,) = model.get_base_model()._slothai_generation.sessions.values()
    assert len(session.graphs) == decode.MAX_GRAPHS == 4
    run(do_sample=True)  # a fifth state: the least recently used graph goes
    assert len(session.graphs) == 4 and CALLS["slothai, graph recorded"] == 5, CALLS
    slothai.generation.release(model)


def test_cache_is_reused_across_calls_and_given_back(llama):
    model = llama
    slothai.generation.release(model)
    assert slothai.generation.memory_bytes(model) == 0
    ids, mask = _left_padded()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    engine = model.get_base_model()._slothai_generation
    (session,) = engine.sessions.values()
    keys = session.kv.keys[0]
    held = slothai.generation.memory_bytes(model)
    assert held > 0
    model.generate(input_ids=ids[:, 1:], attention_mask=mask[:, 1:], max_new_tokens=6, do_sample=False)
    (again,) = engine.sessions.values()
    assert again is session and again.kv.keys[0] is keys  # same bucket: same cache
    assert slothai.generation.memory_bytes(model) == held
    slothai.generation.release(model)
    assert slothai.generation.memory_bytes(model) == 0 and not engine.sessions


def test_copies_pickles_unpatch_and_the_switch(llama, tmp_path):
    model = llama
    ids, mask = _left_padded()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    twin = copy.deepcopy(model)
    assert not twin.get_base_model()._slothai_generation.sessions  # a copy starts with no cache
    loaded = pickle.loads(pickle.dumps(model))
    before = _calls()
    for m in (twin, loaded):
        torch.testing.assert_close(m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False),
                                   model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3,
                                                  do_sample=False))
    assert _calls() == before + 4
    fresh = _build("llama")
    slothai.patch(fresh, generate=False)
    fresh.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    slothai.unpatch(twin)
    twin.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert _calls() == before + 4  # transformers' own generate for both


# ---------------------------------------------------------------------------
# CUDA: the decode step recorded and replayed as CUDA graphs (named "graphs", so that
# device_run.sh's memory-checker step leaves them out, as CONTRIBUTING.md says of graph
# tests). A replay runs the kernels
# the uncaptured step runs, so its tokens and logits are the uncaptured ones bit for bit;
# against the unpatched training forward they agree to bf16's rounding.

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _cuda_model(dtype=torch.bfloat16, **options):
    model = qlora.build("tiny", device="cuda", dtype=dtype)
    draw_lora_b(model, std=LORA_STD)
    return _patched(model, **options)


def _cuda_generate(model, ids, mask, new=12, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, pad_token_id=PAD,
                          return_dict_in_generate=True, output_logits=True,
                          **{"do_sample": False, "eos_token_id": None, **kw})


def _uncaptured(model, ids, mask, **kw):
    """The same call with the step run uncaptured (cudagraphs=False)."""
    options = dataclasses.asdict(slothai.generation.configure(model))
    slothai.generation.configure(model, cudagraphs=False)
    try:
        return _cuda_generate(model, ids, mask, **kw)
    finally:
        slothai.generation.configure(model, **options)


def _exact_forward_logits(model, sequences, mask):
    """The unpatched training forward over `sequences` with every product in fp32: a copy
    whose 4-bit layers compute in fp32 and whose bf16 / fp16 weights are fp32 (the same
    values) -- the logits that bf16 rounding departs from."""
    with _unpatched(model):
        exact = copy.deepcopy(model)
    for module in exact.modules():
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = torch.float32
    with torch.no_grad():
        for p in exact.parameters():
            if p.dtype in (torch.bfloat16, torch.float16):
                p.data = p.data.float()
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return exact(input_ids=sequences, attention_mask=mask, position_ids=positions).logits.float()


def _assert_matches_training_forward(model, out, ids, mask):
    """A half-precision model's generated logits, each step, as near the exact (fp32)
    forward over the same sequences as the half-precision training forward is: within 3x
    its largest error over those steps. bf16 alone puts them all a bf16 step or two of the
    largest logit away (CPU, tiny Llama, 12 steps, 2026-12-06: the training forward 0.0141 at
    its worst, transformers' own generate 0.0118, slothai's 0.0195, against logits of
    ~0.61 at most), so comparing with the training forward itself to a few bf16 steps failed on
    rounding alone; a wrong mask, position or weight is off by the logits' own size."""
    prompt, new = ids.shape[1], len(out.logits)
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], out.sequences.shape[1] - prompt, dtype=mask.dtype,
                                            device=mask.device)], 1)
    steps = slice(prompt - 1, prompt - 1 + new)
    exact = _exact_forward_logits(model, out.sequences, full_mask)[:, steps]
    train = _forward_logits(model, out.sequences, full_mask)[:, steps].float()
    ours = torch.stack([logits.float() for logits in out.logits], 1)
    bound = 3 * float((train - exact).abs().max())
    for t in range(new):
        err = float((ours[:, t] - exact[:, t]).abs().max())
        assert err <= bound, f"step {t}: {err:.4g} from the exact logits, bound {bound:.4g} (3x the bf16 forward's)"


@pytest.mark.parametrize("adapters", [torch.float32, torch.bfloat16])
def test_bf16_decode_logits_as_near_the_exact_forward_as_the_bf16_training_forward(adapters):
    # The CPU's half-precision check of what the CUDA tests check in their graphs: the
    # decode step's logits (eager here) against the fp32 forward, PEFT's fp32 adapters
    # (whose term the op forms in fp32) and bf16 ones (TRL's cast).
    model = qlora.build("tiny", dtype=torch.bfloat16)
    draw_lora_b(model, std=LORA_STD)
    cast_adapters(model, adapters)
    _patched(model, compile=None)
    ids, mask = _left_padded()
    CALLS.clear()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=PAD, return_dict_in_generate=True, output_logits=True)
    assert CALLS["slothai, no graph (CPU)"] == 1, CALLS  # slothai's decode, not transformers'
    _assert_matches_training_forward(model, out, ids, mask)


def _assert_same(a, b):
    torch.testing.assert_close(a.sequences, b.sequences, rtol=0, atol=0)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@cuda
@pytest.mark.parametrize("compile_mode", [None, "regional"])
def test_cuda_graphs_replay_the_uncaptured_step_and_match_the_training_forward(compile_mode):
    model = _cuda_model(compile=compile_mode)
    ids, mask = (t.cuda() for t in _left_padded())
    CALLS.clear()
    out = _cuda_generate(model, ids, mask)
    assert CALLS["slothai, graph recorded"] == 1, CALLS
    again = _cuda_generate(model, ids, mask)
    assert CALLS["slothai, graph replayed"] == 1, CALLS
    _assert_same(out, again)
    _assert_same(out, _uncaptured(model, ids, mask))
    _assert_matches_training_forward(model, out, ids, mask)


@cuda
def test_cuda_graphs_see_lora_updates_and_adapter_switches():
    # The graph counts first: the reference checks below go through configure() and
    # unpatch / patch, which give every recorded graph back.
    model = _cuda_model()
    ids, mask = (t.cuda() for t in _left_padded())
    CALLS.clear()
    first = _cuda_generate(model, ids, mask)
    with torch.no_grad():  # an optimizer step: in place, same storage
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.1)
    updated = _cuda_generate(model, ids, mask)
    assert CALLS["slothai, graph recorded"] == 1 and CALLS["slothai, graph replayed"] == 1, CALLS
    assert not all(torch.equal(a, b) for a, b in zip(first.logits, updated.logits))
    with model.disable_adapter():  # a graph of its own, recorded with the adapter off
        base = _cuda_generate(model, ids, mask)
    assert CALLS["slothai, graph recorded"] == 2, CALLS
    _assert_same(_cuda_generate(model, ids, mask), updated)  # the adapter's graph again
    assert CALLS["slothai, graph recorded"] == 2 and CALLS["slothai, graph replayed"] == 2, CALLS
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    kept = layer.lora_B["default"].weight
    layer.lora_B["default"].weight = torch.nn.Parameter(kept.detach() + 0.1)
    replaced = _cuda_generate(model, ids, mask)  # a new Parameter: recorded again, not read stale
    assert CALLS["slothai, graph recorded"] == 3, CALLS
    layer.lora_B["default"].weight = kept
    _assert_same(_cuda_generate(model, ids, mask), updated)  # the old Parameter back: its graph
    assert CALLS["slothai, graph recorded"] == 3 and CALLS["slothai, graph replayed"] == 3, CALLS

    _assert_same(updated, _uncaptured(model, ids, mask))
    _assert_matches_training_forward(model, updated, ids, mask)
    with model.disable_adapter():
        _assert_same(base, _uncaptured(model, ids, mask))
        _assert_matches_training_forward(model, base, ids, mask)
    layer.lora_B["default"].weight = torch.nn.Parameter(kept.detach() + 0.1)
    _assert_same(replaced, _uncaptured(model, ids, mask))


@cuda
def test_cuda_graphs_sample_and_stop_at_eos():
    model = _cuda_model()
    ids, mask = (t.cuda() for t in _left_padded(rows=4, pads=(0, 1, 3, 5)))
    free = _cuda_generate(model, ids, mask, new=40).sequences
    eos = [int(free[0, ids.shape[1] + 20]), int(free[2, ids.shape[1] + 3])]
    stopped = _cuda_generate(model, ids, mask, new=40, eos_token_id=eos)
    _assert_same(stopped, _uncaptured(model, ids, mask, new=40, eos_token_id=eos))
    for row in (0, 2):  # finished at an EOS id, then padded
        new = stopped.sequences[row, ids.shape[1]:]
        at = int(torch.isin(new, torch.tensor(eos, device=new.device)).int().argmax())
        assert int(new[at]) in eos and (new[at + 1:] == PAD).all(), new
    options = dict(do_sample=True, top_p=0.9, top_k=50, temperature=0.8, repetition_penalty=1.1)
    torch.manual_seed(0)
    a = _cuda_generate(model, ids, mask, new=40, eos_token_id=eos, **options)
    torch.manual_seed(0)
    b = _cuda_generate(model, ids, mask, new=40, eos_token_id=eos, **options)
    _assert_same(a, b)  # a seed gives the same draws, replay after replay
    _assert_matches_training_forward(model, a, ids, mask)


@cuda
def test_cuda_graphs_and_cache_memory_is_given_back():
    # Given back, and bounded: after a first cycle (which leaves what torch keeps for the
    # process: the compiled kernels, cuBLAS's workspace of the one side stream that warms up
    # and records), two more cycles of two sessions each record their graphs again and give
    # everything back.
    model = _cuda_model()
    ids, mask = (t.cuda() for t in _left_padded())
    for dtype in (torch.float32, torch.bfloat16):  # this stream's cuBLAS workspaces, in `start`
        torch.ones(8, 8, device="cuda", dtype=dtype) @ torch.ones(8, 8, device="cuda", dtype=dtype)

    def cycle():
        for batch in (3, 9):
            rows = ids.repeat(3, 1)[:batch]
            model.generate(input_ids=rows, attention_mask=mask.repeat(3, 1)[:batch], max_new_tokens=20,
                           do_sample=False)
        assert slothai.generation.memory_bytes(model) > 0
        slothai.generation.release(model)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved()

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    start = torch.cuda.memory_reserved()
    before = cycle()
    assert before <= start + (34 << 20), (start, before)  # cuBLAS's workspace: 32 MiB at most (Hopper)
    for _ in range(2):
        assert cycle() <= before + (2 << 20), (before, torch.cuda.memory_reserved())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("mask_form", ["bool", "additive"])
def test_compiled_grouped_decode_attention_equals_float64_attention(mask_form, device, monkeypatch):
    # The decode step's attention as it runs compiled: one query a row, 3 query heads a
    # key/value head, an awkward slot count and head dim, rows seeing different slots;
    # against float64 attention over keys and values repeated per query head (transformers'
    # repeat_kv), not the grouped layout. On CUDA the scores are cuBLAS's bf16 batched
    # product with an fp32 output; on the CPU fp32 operands.
    from slothai.generation import attention

    monkeypatch.setattr(attention, "DECODE_FORM", "matmul32")  # the default (SLOTHAI_DECODE_ATTENTION)
    torch.manual_seed(0)
    rows, kv, groups, slots, d = 3, 2, 3, 37, 24
    q = torch.randn(rows, kv * groups, 1, d, dtype=torch.bfloat16)
    k, v = (torch.randn(rows, kv, slots, d, dtype=torch.bfloat16) for _ in range(2))
    seen = torch.rand(rows, 1, 1, slots) < 0.6
    seen[..., 7] = True
    mask = seen if mask_form == "bool" else (~seen).to(torch.bfloat16) * torch.finfo(torch.bfloat16).min
    scale = 0.3
    kr, vr = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    scores = (q.double() @ kr.transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))
    want = (torch.softmax(scores, -1) @ vr).transpose(1, 2)  # [rows, 1, heads, d], as transformers returns it
    module = torch.nn.Module().eval()
    q, k, v, mask = (t.to(device) for t in (q, k, v, mask))
    compiled = torch.compile(attention.decode_attention, fullgraph=True, backend="eager")
    got, _ = compiled(module, q, k, v, mask, scaling=scale)
    sdpa, _ = attention.decode_attention(module, q, k, v, mask, scaling=scale)  # eager: the SDPA call
    assert got.shape == sdpa.shape == want.shape and got.dtype == torch.bfloat16
    got, sdpa = got.cpu(), sdpa.cpu()
    worst = float((sdpa.double() - want).abs().max())
    err = float((got.double() - want).abs().max())
    assert err <= 1.5 * worst + 1e-3, (err, worst)  # fp32 scores: SDPA's arithmetic
