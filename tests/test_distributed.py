"""slothai under PyTorch's FSDP2 (fully_shard) and DDP: 2 gloo ranks on the CPU.

The ranks are spawned processes that meet through a FileStore and talk over the
loopback interface only. Each runs every scenario on a tiny 4-bit Llama built as
users build it (from_pretrained with a BitsAndBytesConfig, get_peft_model), each
rank on its half of every batch (DDP and FSDP2 also in two micro-batches of it,
the gradients synchronised only after the second); the parent trains the same
model in one process on whole batches. Losses and LoRA weights must agree to 1e-4
(relative).
"""
import contextlib
import datetime
import os
import time
import traceback

import pytest
import torch

import slothai
from slothai import qlora
from slothai.ops.nf4_weight import NF4Weight

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

WORLD = 2
BATCH = 4  # global batch: 2 rows per rank
SEQS = [32, 20, 32]  # 3 AdamW steps at two lengths: the compiled runs must not recompile
LR = 1e-3
TIMEOUT_S = 300  # the whole 2-rank run (~55–85 s on 2 cores); a hang fails the test instead of the suite
SCENARIOS = [("ddp", False), ("ddp", True), ("ddp_accumulate", True), ("ddp_lowmem", True), ("ddp_offload", True),
             ("fsdp2", False), ("fsdp2", True), ("fsdp2_accumulate", True), ("fsdp2_units", True),
             ("fsdp2_lowmem", True)]
# compile's arguments where a scenario is not the defaults. On the CPU the host copies keep their
# tensors where they are, so these check the save policies, low_memory's recompute and the
# saved-tensor hooks under DDP's and FSDP2's own hooks; the copies themselves run in the CUDA
# tests of test_training_modes.
COMPILE_KWARGS = {"ddp_lowmem": dict(low_memory=True), "ddp_offload": dict(saves="offload"),
                  "fsdp2_lowmem": dict(low_memory=True)}


def _batches():
    return list(qlora.batches(256, BATCH, SEQS, len(SEQS), "cpu", seed=3))


def _eval_batch():
    return next(qlora.batches(256, 2, [24], 1, "cpu", seed=7))


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def _no_sync(model):
    """No gradient all-reduce (DDP) or reduce-scatter (FSDP2) in this backward: gradients
    accumulate on each rank until a backward outside it."""
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _train_distributed(model, rank, steps, micro=1):
    """AdamW on this rank's rows of each global batch, in `micro` micro-batches (gradients
    synchronised only at the last); returns the global loss per step."""
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    per = BATCH // WORLD
    losses = []
    for ids in steps:
        mine = ids[rank * per:(rank + 1) * per]
        value = 0
        for i, rows in enumerate(mine.chunk(micro)):
            last = i == micro - 1
            with contextlib.nullcontext() if last else _no_sync(model):
                loss = model(input_ids=rows, labels=rows).loss / micro
                loss.backward()
            value = value + loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(value)  # equal rows per rank, every token counted: the mean of the means
        losses.append(value.item() / WORLD)
    return losses


def _worker(rank, path, out):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from slothai.distributed import adapter_state_dict, fully_shard_layers
    from slothai.compiling.regions import compiled_layers

    store = dist.FileStore(os.path.join(out, "store"), WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))  # fully_shard's default is the GPU where there is one
    t0 = time.perf_counter()

    def log(msg):
        with open(os.path.join(out, f"log{rank}.txt"), "a") as f:
            f.write(f"{time.perf_counter() - t0:6.1f} s  {msg}\n")

    try:
        results = {}
        for kind, compiled in SCENARIOS:
            log(f"{kind} compiled={compiled}")
            torch._dynamo.reset()
            model = slothai.patch(qlora.build(path=path))
            if kind.startswith("ddp"):
                if compiled:
                    slothai.compile(model, backend="aot_eager", **COMPILE_KWARGS.get(kind, {}))
                model = DDP(model)
            elif kind == "fsdp2_units":  # the units accelerate's FSDP2 plugin (1.15) makes: the head is
                _shard_as_accelerate_does(model, mesh)  # gathered only by a forward of its own unit
                slothai.compile(model, backend="aot_eager")
            else:  # fsdp2, fsdp2_accumulate, fsdp2_lowmem
                fully_shard_layers(model, mesh=mesh)
                seen = []  # the NF4 weight a patched LoRA layer reads after FSDP's all-gather (eager: a
                if not compiled:  # hook on one layer only would give the compiled layers two sets of guards)
                    q = model.base_model.model.model.layers[0].self_attn.q_proj
                    q.register_forward_pre_hook(lambda m, a: seen.append((type(m.base_layer.weight).__name__,
                                                                          tuple(m.base_layer.weight.shape))))
                if compiled:
                    slothai.compile(model, backend="aot_eager", **COMPILE_KWARGS.get(kind, {}))
            with slothai.compile_report() as report:
                losses = _train_distributed(model, rank, _batches(), micro=2 if kind.endswith("_accumulate") else 1)
            ids = _eval_batch()
            with torch.no_grad():
                eval_loss = model(input_ids=ids, labels=ids).loss.item()
            inner = model.module if kind.startswith("ddp") else model
            lora = adapter_state_dict(inner)
            key = f"{kind}{'+compile' if compiled else ''}"
            results[key] = dict(losses=losses, eval_loss=eval_loss, lora=lora,
                                graph_breaks=report.graph_breaks, compilations=report.compilations,
                                recompiles=report.recompiles)
            if kind == "fsdp2" and not compiled:
                shard = next(p for p in inner.parameters() if isinstance(getattr(p, "_local_tensor", None), NF4Weight))
                results[key]["nf4_shard_rows"] = (shard._local_tensor.shape[0], shard.shape[0])
                results[key]["unsharded_seen"] = seen
                if rank == 0:  # the adapter, gathered on every rank, saved by one
                    inner.save_pretrained(os.path.join(out, "adapter"), state_dict=lora)
                dist.barrier()
        log("fsdp2 odd")  # down_proj's rows do not split into blocks: kept whole on every rank
        model = fully_shard_layers(slothai.patch(qlora.build(path=os.path.join(os.path.dirname(path), "odd"))),
                                   mesh=mesh)
        down = model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight
        results["fsdp2_odd"] = dict(losses=_train_distributed(model, rank, _batches()), lora=adapter_state_dict(model),
                                    down=type(down).__name__)
        log("trainer ddp")
        results["trainer_ddp"] = _trainer_run(path, os.path.join(out, f"trainer{rank}"), rank)
        log("wrong order")
        try:  # fully_shard before patch: slothai's error; torch < 2.13's fully_shard fails on the uint8 weights itself
            slothai.patch(fully_shard_layers(qlora.build(path=path), mesh=mesh))
        except RuntimeError as e:
            results["wrong_order"] = str(e)
        try:  # CUDA graphs cannot hold FSDP2's gathered weights: refused before compiling anything
            slothai.compile(fully_shard_layers(slothai.patch(qlora.build(path=path)), mesh=mesh), cudagraphs=True)
        except ValueError as e:
            results["cudagraphs"] = str(e)
        # Compiled with CUDA graphs, then sharded: the first call says so (before compiling anything).
        compiled_first = slothai.compile(slothai.patch(qlora.build(path=path)), cudagraphs=True)
        fully_shard_layers(compiled_first, mesh=mesh)
        try:
            compiled_first(input_ids=_eval_batch(), labels=_eval_batch())
        except RuntimeError as e:
            results["compiled_then_sharded"] = str(e)
        # CUDA graphs by compile's default (as on a CUDA model), then sharded, as transformers'
        # Trainer and accelerate shard: off at the first call, which runs and matches.
        default_first = slothai.compile(slothai.patch(qlora.build(path=path)), backend="aot_eager")
        regions = [layer.forward for layer in compiled_layers(default_first)]
        for region in regions:  # what compile's default gives a model on CUDA
            region.kwargs = {**region.kwargs, "options": {"triton.cudagraphs": True}}
            region.options = {**region.options, "bucket": True}
        fully_shard_layers(default_first, mesh=mesh)
        loss = default_first(input_ids=_eval_batch(), labels=_eval_batch()).loss
        results["default_then_sharded"] = dict(
            loss=loss.item(), settled=[("options" in r.kwargs, r.options["bucket"]) for r in regions])
        log("done")
        if rank == 0:
            torch.save(results, os.path.join(out, "results.pt"))
    except BaseException:
        with open(os.path.join(out, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _shard_as_accelerate_does(model, mesh):
    """accelerate 1.15's `fsdp2_prepare_model` on an untied PEFT model: each decoder
    layer, the input embeddings, the tail unit [final norm, lm_head] (its final-norm
    search looks at the children of PeftModel's `model`, the CausalLM, and finds none:
    the head alone), kept gathered after forward, then the root."""
    from torch.distributed.fsdp import fully_shard

    from slothai.patching.causal_lm import decoder_layers

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    causal_lm = model.get_base_model()
    fully_shard(causal_lm.model.embed_tokens, mesh=mesh)
    fully_shard([causal_lm.lm_head], mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)


def _trainer_data():
    return [{"input_ids": ids[0], "labels": ids[0]} for ids in qlora.batches(256, 1, [24], 12, "cpu", seed=5)]


def _trainer_run(path, out, rank=None):
    """transformers' Trainer on the patched model: 12 rows, 3 steps of 4 (2 per rank under DDP),
    in order, so one process and two see the same global batches."""
    from transformers import Trainer, TrainingArguments

    from slothai.distributed import adapter_state_dict

    if rank is not None:  # accelerate reads the ranks from the environment and reuses our process group
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT="29511")  # not dialled: the group exists already
    model = slothai.patch(qlora.build(path=path))
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH // (WORLD if rank is not None else 1),
                             max_steps=3, learning_rate=LR, report_to=[], use_cpu=True, save_strategy="no",
                             train_sampling_strategy="sequential", logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_trainer_data())
    result = trainer.train()
    return dict(loss=result.training_loss, lora=adapter_state_dict(model),
                wrapped=type(trainer.model_wrapped).__name__)


def _spawn(path, out):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(path, out), nprocs=WORLD, join=False, start_method="spawn")
    return ctx


def _join(ctx, out):
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"2-rank run still going after {TIMEOUT_S} s")
    except Exception:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        errors = [f"{f}:\n" + open(os.path.join(out, f)).read() for f in sorted(os.listdir(out))
                  if f.startswith(("error", "log"))]
        raise AssertionError("distributed run failed:\n" + "\n".join(errors)) from None


def _save_odd(path):
    """The tiny Llama with intermediate 160: down_proj's rows (160 inputs) do not split
    into whole 64-blocks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", **{**qlora.SHAPES["tiny"], "intermediate_size": 160,
                                           "max_position_embeddings": 256})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario on 2 ranks, and the one-process reference, once for the module."""
    root = tmp_path_factory.mktemp("dist")
    path, out = str(root / "ckpt"), str(root / "out")
    os.makedirs(out)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(qlora.make_config("tiny"), dtype=torch.float32).save_pretrained(path)
    _save_odd(str(root / "odd"))
    t0 = time.perf_counter()
    ctx = _spawn(path, out)
    ref = slothai.patch(qlora.build(path=path))  # while the ranks start: the one-process run
    ref_losses = [loss for loss, _, _ in qlora.train(ref, _batches(), lr=LR)]
    ids = _eval_batch()
    with torch.no_grad():
        ref_eval = ref(input_ids=ids, labels=ids).loss.item()
    odd = slothai.patch(qlora.build(path=str(root / "odd")))  # (bitsandbytes 0.50.2's CPU dequantize is wrong here)
    odd_losses = [loss for loss, _, _ in qlora.train(odd, _batches(), lr=LR)]
    _join(ctx, out)
    results = torch.load(os.path.join(out, "results.pt"))
    print(f"2-rank run: {time.perf_counter() - t0:.1f} s")
    return dict(results=results, ref_losses=ref_losses, ref_lora=_lora(ref), ref_eval=ref_eval, path=path, out=out,
                odd_losses=odd_losses, odd_lora=_lora(odd))


@pytest.mark.parametrize("key", ["ddp", "ddp+compile", "ddp_accumulate+compile", "ddp_lowmem+compile",
                                 "ddp_offload+compile", "fsdp2", "fsdp2+compile", "fsdp2_accumulate+compile",
                                 "fsdp2_units+compile", "fsdp2_lowmem+compile"])
def test_two_ranks_match_one_process(runs, key):
    got = runs["results"][key]
    for a, b in zip(got["losses"], runs["ref_losses"]):
        assert abs(a - b) <= 1e-4 * abs(b), (key, got["losses"], runs["ref_losses"])
    assert set(got["lora"]) == set(runs["ref_lora"]) and len(got["lora"]) == 2 * 7 * 2  # 2 layers x 7 x (A, B)
    for name, want in runs["ref_lora"].items():
        assert _rel(got["lora"][name], want) <= 1e-4, (key, name)
    assert abs(got["eval_loss"] - runs["ref_eval"]) <= 1e-4 * abs(runs["ref_eval"])
    if key.endswith("+compile"):  # every decoder layer from one graph, no break, no recompile across lengths
        assert got["graph_breaks"] == [] and got["compilations"] == 1 and got["recompiles"] == [], got


def test_fsdp2_trains_rows_that_do_not_split_as_one_process(runs):
    # fully_shard_layers keeps down_proj (160 inputs: not whole 64-blocks) whole on each rank
    # and shards the rest; training matches one process.
    got = runs["results"]["fsdp2_odd"]
    assert got["down"] == "Params4bit"
    for a, b in zip(got["losses"], runs["odd_losses"]):
        assert abs(a - b) <= 1e-4 * abs(b), (got["losses"], runs["odd_losses"])
    assert set(got["lora"]) == set(runs["odd_lora"])
    for name, want in runs["odd_lora"].items():
        assert _rel(got["lora"][name], want) <= 1e-4, name


def test_trainer_ddp_matches_one_process(runs):
    got = runs["results"]["trainer_ddp"]
    want = _trainer_run(runs["path"], os.path.join(runs["out"], "trainer"))
    assert got["wrapped"] == "DistributedDataParallel"
    assert abs(got["loss"] - want["loss"]) <= 1e-4 * abs(want["loss"]), (got["loss"], want["loss"])
    for name, w in want["lora"].items():
        assert _rel(got["lora"][name], w) <= 1e-4, name


def test_fsdp2_shards_the_4bit_weights(runs):
    local_rows, rows = runs["results"]["fsdp2"]["nf4_shard_rows"]
    assert local_rows * WORLD == rows
    # Forward gets the whole weight back as 4-bit codes (an NF4Weight), never dense.
    assert runs["results"]["fsdp2"]["unsharded_seen"] == [("NF4Weight", (64, 64))] * (len(SEQS) + 1)


@pytest.fixture
def one_rank_mesh(tmp_path):
    """A one-rank gloo process group in this process, and its CPU mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("compiled", [False, True])
def test_fsdp2_on_one_rank_trains_as_one_process(one_rank_mesh, compiled):
    # A one-rank mesh (FSDP code tried on one GPU) takes FSDP2's own path: no all-gather,
    # only an extension's first input copied, and whole storages freed and reallocated
    # between steps; the 4-bit weights must come back intact at every step (they came
    # back as garbage from the second step on, and the first step crashed before that).
    from slothai.distributed import fully_shard_layers

    batches = _batches()
    want = qlora.train(slothai.patch(qlora.build("tiny")), batches, lr=LR)
    model = fully_shard_layers(slothai.patch(qlora.build("tiny")), mesh=one_rank_mesh)
    if compiled:
        slothai.compile(model, backend="aot_eager")
    got = qlora.train(model, batches, lr=LR)
    for (a, _, _), (b, _, _) in zip(got, want):
        assert abs(a - b) <= 1e-5 * abs(b), (got, want)


def test_fully_shard_layers_leaves_the_frozen_root_weights_whole(one_rank_mesh):
    # The embeddings, final norm and a frozen head stay out of FSDP (never all-gathered);
    # every layer's weights, and a trained head, are sharded.
    from torch.distributed.tensor import DTensor

    from slothai.distributed import fully_shard_layers

    frozen = fully_shard_layers(slothai.patch(qlora.build("tiny")), mesh=one_rank_mesh)
    trained = slothai.patch(qlora.build("tiny"))
    trained.base_model.model.lm_head.weight.requires_grad_(True)
    fully_shard_layers(trained, mesh=one_rank_mesh, reshard_after_forward=True)
    for model, head_sharded in ((frozen, False), (trained, True)):
        inner = model.base_model.model
        assert not isinstance(inner.model.embed_tokens.weight, DTensor)
        assert not isinstance(inner.model.norm.weight, DTensor)
        assert isinstance(inner.lm_head.weight, DTensor) == head_sharded
        layer = inner.model.layers[0]
        assert all(isinstance(p, DTensor) for p in layer.parameters())


def test_fully_shard_layers_gives_the_root_its_frozen_weights_to_ignore(monkeypatch):
    # What each fully_shard call gets: the layers every keyword; the root no
    # reshard_after_forward (FSDP2's own root rule) and its frozen weights as ignored_params.
    import torch.distributed.fsdp as fsdp

    from slothai.distributed import fully_shard_layers

    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: calls.append((module, kw)) or module)
    model = fully_shard_layers(slothai.patch(qlora.build("tiny")), reshard_after_forward=True)
    inner = model.base_model.model
    *layers, (root, root_kw) = calls
    assert [m for m, _ in layers] == list(inner.model.layers)
    assert all(kw == {"reshard_after_forward": True, "ignored_params": set()} for _, kw in layers)
    assert root is model and set(root_kw) == {"ignored_params"}
    assert root_kw["ignored_params"] == {inner.model.embed_tokens.weight, inner.model.norm.weight, inner.lm_head.weight}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a model on the CPU sharded onto a GPU")
def test_fully_shard_layers_moves_the_frozen_root_weights_onto_the_mesh_device(tmp_path):
    # FSDP moves only what it manages; the root's frozen weights, left out of it, must
    # follow the layers onto the GPU, and the model trains as one process on the CPU does.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from slothai.distributed import fully_shard_layers

    ids = _batches()[0]
    want = qlora.train(slothai.patch(qlora.build("tiny")), [ids], lr=LR)[0][0]
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = fully_shard_layers(slothai.patch(qlora.build("tiny")), mesh=init_device_mesh("cuda", (1,)))
        inner = model.base_model.model
        assert {p.device.type for p in model.parameters()} == {"cuda"}, inner.model.embed_tokens.weight.device
        got = qlora.train(model, [ids.cuda()], lr=LR)[0][0]
    finally:
        dist.destroy_process_group()
    assert abs(got - want) <= 1e-4 * abs(want), (got, want)


def torch_older_than_2_13():
    return tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13)


def test_patch_after_fully_shard_is_a_clear_error(runs):
    wrong_order = runs["results"]["wrong_order"]
    if torch_older_than_2_13():  # fully_shard cannot shard bitsandbytes' weights there: it raises first
        assert "only Tensors of floating point dtype can require gradients" in wrong_order, wrong_order
    else:
        assert "must be called before torch.distributed.fsdp.fully_shard" in wrong_order
    assert "cudagraphs=True on a model sharded by fully_shard" in runs["results"]["cudagraphs"]
    assert "cudagraphs=True, but the model is sharded by FSDP2" in runs["results"]["compiled_then_sharded"]


def test_cudagraphs_by_default_go_off_when_sharded_after_compile(runs):
    got = runs["results"]["default_then_sharded"]
    assert got["settled"] == [(False, False)] * 2  # both layers: no CUDA graphs, no length buckets
    ref = slothai.patch(qlora.build(path=runs["path"]))
    want = ref(input_ids=_eval_batch(), labels=_eval_batch()).loss.item()
    assert abs(got["loss"] - want) <= 1e-4 * abs(want), (got["loss"], want)


def test_sharded_adapter_save_reloads_in_one_process(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(runs["path"], quantization_config=quant, dtype=torch.float32,
                                                device_map="cpu")
    model = slothai.patch(PeftModel.from_pretrained(base, os.path.join(runs["out"], "adapter")))
    ids = _eval_batch()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    want = runs["results"]["fsdp2"]["eval_loss"]
    assert abs(loss - want) <= 1e-4 * abs(want), (loss, want)


# ---- NF4Weight on its own (one process) ------------------------------------------------------
def _params4bit(out_features, in_features, blocksize=64, nested=True, storage=torch.uint8):
    import bitsandbytes as bnb

    w = torch.randn(out_features, in_features)
    return bnb.nn.Params4bit(w, requires_grad=False, blocksize=blocksize, compress_statistics=nested,
                             quant_type="nf4", quant_storage=storage)._quantize("cpu")


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_nf4_weight_rows_dequantize_bit_identical(nested, storage):
    # 40 x 448, blocksize 64: 7 blocks a row, 280 blocks, so the second-level block
    # boundary (every 256 blocks) falls inside row 36. Split by rows as FSDP does
    # (4 ranks: 10 rows each), every shard dequantizes to bitsandbytes' own rows.
    import bitsandbytes.functional as bnbF

    from slothai.ops.nf4_weight import to_nf4_weight

    p = _params4bit(40, 448, nested=nested, storage=storage)
    want = bnbF.dequantize_4bit(p.data, p.quant_state)
    w = to_nf4_weight(p)
    assert isinstance(w, NF4Weight) and isinstance(w, torch.nn.Parameter) and not w.requires_grad
    assert w.shape == (40, 448) and w.dtype == torch.uint8 and w.codes.data_ptr() == p.data.data_ptr()
    assert torch.equal(slothai.dequantize_nf4(w), want)
    assert torch.equal(slothai.dequantize_nf4(w.with_fp32_scales()), want)
    shards = torch.chunk(w, 4)
    assert [s.shape for s in shards] == [(10, 448)] * 4
    assert torch.equal(torch.cat([slothai.dequantize_nf4(s) for s in shards]), want)
    x = torch.randn(3, 448, requires_grad=True)
    y = slothai.nf4_linear(x, w)
    torch.testing.assert_close(y, x @ want.t(), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 40) @ want, rtol=1e-5, atol=1e-5)


def test_nf4_weight_cache_key_follows_its_metadata():
    # AOT autograd's cache keys a compiled graph on it: equal for equal metadata, in any
    # process; different when what the graph depends on differs.
    from slothai.ops.nf4_weight import to_nf4_weight

    a, b = to_nf4_weight(_params4bit(40, 448)), to_nf4_weight(_params4bit(40, 448))
    assert a._stable_hash_for_caching() == b._stable_hash_for_caching()
    assert a._stable_hash_for_caching() != a.with_fp32_scales()._stable_hash_for_caching()
    assert a._stable_hash_for_caching() != to_nf4_weight(_params4bit(40, 512))._stable_hash_for_caching()


def test_fully_shard_set_up_of_an_nf4_weight_on_torch_before_2_13():
    # torch 2.11's FSDP2 makes each shard `nn.Parameter(dtensor)` (requires_grad=True by
    # default: a uint8 shard raises) and sets requires_grad after; 2.13 passes it. patch
    # wraps FSDP2's set-up so that both work: within it, an integer Parameter is frozen.
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    from slothai.patching.fsdp import integer_parameters_default_to_no_grad
    from slothai.ops.nf4_weight import to_nf4_weight

    w = to_nf4_weight(_params4bit(8, 64))
    with pytest.raises(RuntimeError, match="floating point"):
        torch.nn.Parameter(w.detach())  # what torch 2.11's FSDP2 does with a shard
    with integer_parameters_default_to_no_grad():
        p = torch.nn.Parameter(w.detach())
        assert isinstance(p, NF4Weight) and not p.requires_grad
        assert torch.nn.Parameter(torch.zeros(2)).requires_grad  # floating point: unchanged
    with pytest.raises(RuntimeError, match="floating point"):
        torch.nn.Parameter(w.detach())  # restored on the way out
    model = slothai.patch(qlora.build("tiny"))
    assert getattr(FSDPParam._init_sharded_param, "_slothai", False)
    assert not any(isinstance(p, NF4Weight) for p in model.parameters())  # only fully_shard makes them


def test_fully_shard_moves_an_nf4_weight_to_the_mesh_device():
    # fully_shard moves a tensor-subclass parameter that is not on the mesh's device with
    # `nn.Parameter(t.to(device))` (requires_grad=True by default: a uint8 one raises, seen on
    # a GPU host with the model on the CPU). After patch it moves, frozen; here to "meta".
    from torch.distributed.fsdp._fully_shard import _fsdp_init

    from slothai.ops.nf4_weight import to_nf4_weight

    slothai.patch(qlora.build("tiny"))  # installs the wrapper
    move = _fsdp_init._move_states_to_device
    w = to_nf4_weight(_params4bit(8, 64))
    with pytest.raises(RuntimeError, match="floating point"):
        move.__wrapped__([w], [], torch.device("meta"))
    move([w], [], torch.device("meta"))
    assert isinstance(w, NF4Weight) and w.device.type == "meta" and w.codes.device.type == "meta"
    assert isinstance(w, torch.nn.Parameter) and not w.requires_grad


def test_nf4_weight_answers_for_its_params4bit_and_a_shard_refuses_dense_ops():
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    from slothai.ops.nf4_weight import to_nf4_weight

    p = _params4bit(8, 64)
    w = to_nf4_weight(p)
    # Unsharded: what bitsandbytes-aware code reads and does still works (PEFT, Unsloth, bnb's forward).
    assert w.quant_state is p.quant_state and w.quant_type == "nf4" and w.compress_statistics
    assert torch.equal(w.t(), p.data.t())
    assert torch.equal(bnbF.dequantize_4bit(w.data, w.quant_state), bnbF.dequantize_4bit(p.data, p.quant_state))
    layer = bnb.nn.Linear4bit(64, 8, bias=False, quant_type="nf4")
    layer.weight = w
    x = torch.randn(3, 64)
    torch.testing.assert_close(bnb.nn.Linear4bit.forward(layer, x), slothai.nf4_linear(x, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="cannot be cast"):
        w.to(torch.float32)
    shard = torch.chunk(w, 2)[0]  # a shard has no Params4bit: nothing but what FSDP needs
    assert getattr(shard, "quant_state", None) is None
    with pytest.raises(NotImplementedError, match="does not support"):
        shard + 1


def test_patch_keeps_params4bit_and_ddp_skips_it():
    import bitsandbytes as bnb

    model = qlora.build("tiny")
    ids = torch.randint(0, 256, (2, 10))
    want = model(input_ids=ids, labels=ids).loss
    weights = [p for p in model.parameters() if isinstance(p, bnb.nn.Params4bit)]
    slothai.patch(model)
    assert [p for p in model.parameters() if isinstance(p, bnb.nn.Params4bit)] == weights and len(weights) == 2 * 7
    assert sorted(model._ddp_params_and_buffers_to_ignore) == sorted(
        n for n, p in model.named_parameters() if isinstance(p, bnb.nn.Params4bit))
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, want, rtol=1e-5, atol=1e-6)
    slothai.patch(model)  # idempotent
    slothai.unpatch(model)
    assert [p for p in model.parameters() if isinstance(p, bnb.nn.Params4bit)] == weights
    assert torch.equal(model(input_ids=ids, labels=ids).loss, want)


def _odd_model():
    import tempfile

    with tempfile.TemporaryDirectory() as path:
        _save_odd(path)
        return qlora.build(path=path)


def test_fully_shard_takes_params4bit_and_refuses_rows_that_do_not_split(one_rank_mesh):
    # A direct fully_shard over a layer whose 4-bit weight cannot be sharded by rows raises
    # at sharding time, naming it, before touching any weight; ignored, it stays whole.
    import bitsandbytes as bnb
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = slothai.patch(_odd_model())
    layer = model.base_model.model.model.layers[0]
    before = [type(p) for p in layer.parameters()]
    with pytest.raises(ValueError, match=r"'mlp\.down_proj\.base_layer'.*in_features 160 is not a multiple of its "
                                         r"blocksize 64.*ignored_params.*fully_shard_layers"):
        fully_shard(layer, mesh=one_rank_mesh)
    assert [type(p) for p in layer.parameters()] == before
    layer = model.base_model.model.model.layers[1]  # (torch's fully_shard registered itself on the first)
    down = layer.mlp.down_proj.base_layer.weight
    fully_shard(layer, mesh=one_rank_mesh, ignored_params={down})
    assert isinstance(layer.mlp.down_proj.base_layer.weight, bnb.nn.Params4bit)
    q = layer.self_attn.q_proj.base_layer.weight
    assert isinstance(q, DTensor) and isinstance(q._local_tensor, NF4Weight)


def test_fully_shard_layers_keeps_rows_that_do_not_split_whole(one_rank_mesh):
    import bitsandbytes as bnb
    from torch.distributed.tensor import DTensor

    from slothai.distributed import fully_shard_layers

    batches = _batches()
    want = qlora.train(slothai.patch(_odd_model()), batches, lr=LR)
    model = fully_shard_layers(slothai.patch(_odd_model()), mesh=one_rank_mesh)
    for layer in model.base_model.model.model.layers:
        assert isinstance(layer.mlp.down_proj.base_layer.weight, bnb.nn.Params4bit)
        assert isinstance(layer.mlp.up_proj.base_layer.weight, DTensor)
    got = qlora.train(model, batches, lr=LR)
    for (a, _, _), (b, _, _) in zip(got, want):
        assert abs(a - b) <= 1e-5 * abs(b), (got, want)


def test_nf4_weight_copies_keep_sharing_with_their_params4bit():
    # deepcopy, pickle and torch.save rebuild the weight from a copy of its Params4bit: editing
    # the copy's quant_state (as bitsandbytes-aware code does) moves what slothai's op computes.
    import copy
    import io
    import pickle

    import bitsandbytes.functional as bnbF

    from slothai.ops.nf4_weight import to_nf4_weight

    w = to_nf4_weight(_params4bit(16, 128))
    want = slothai.dequantize_nf4(w)
    buf = io.BytesIO()
    torch.save(w, buf)
    buf.seek(0)
    for other in (copy.deepcopy(w), pickle.loads(pickle.dumps(w)), torch.load(buf, weights_only=False)):
        assert isinstance(other, NF4Weight) and isinstance(other, torch.nn.Parameter)
        assert torch.equal(slothai.dequantize_nf4(other), want)
        other.quant_state.state2.absmax.mul_(2)
        moved = bnbF.dequantize_4bit(other.params4bit.data, other.quant_state)
        assert not torch.equal(moved, want) and torch.equal(slothai.dequantize_nf4(other), moved)
    assert torch.equal(slothai.dequantize_nf4(w), want)
