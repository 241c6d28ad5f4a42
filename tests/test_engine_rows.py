"""Row-blocked perturbation of the embedding and the vocab projection (z scheme 2, CPU): the embedding is looked up
from perturbed copies of the rows the batch reads, the lm_head multiplies chunk by chunk, so no perturbed copy of
either exists. ``engine.row_blocked = False`` is the whole-tensor path, the reference here."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.zo_bench.common import EngineClock
from conftest import make_tiny_llama
from zo_trainer.engine import ZOEngine, perturbation_seed, projected_gradient
from zo_trainer.methods import MeZO
from zo_trainer.optim import ZOOptimizer
from zo_trainer.step import zo_step
from zo_trainer.training_args import ZOTrainingArguments

# Hidden 48 with 256-entry blocks: rows straddle block ends. Ids repeat, and leave most rows unread.
VOCAB, HIDDEN, BLOCK = 400, 48, 256
IDS = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))


def tiny(tied: bool = True):
    return make_tiny_llama(VOCAB, hidden_size=HIDDEN, max_position_embeddings=64, tie_word_embeddings=tied).eval()


def build(optim: str, model, row_blocked: bool, threads: int = 1):
    """MeZO's targets; ``masked``: with Sparse-MeZO's masks on every tensor, the embedding included (Sparse-MeZO
    itself leaves the embedding frozen, so only this reaches the row paths with a mask)."""
    args = ZOTrainingArguments(output_dir="unused", optim="mezo", report_to="none", learning_rate=0.5, zo_eps=1e-2)
    method = MeZO(args)
    engine = ZOEngine(method.targets(model), num_noise_threads=threads)
    engine.row_blocked = row_blocked
    if optim == "masked":
        engine.set_thresholds(0.5)
        assert engine.targets[0].threshold is not None
    return engine, method, args


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 256 entries; lm_head chunks of 2 blocks, 10 2/3 rows of 48: rows are cut and carried over."""
    monkeypatch.setattr(ZOEngine, "NOISE_BLOCK", BLOCK)
    monkeypatch.setattr(ZOEngine, "ROW_CHUNK_BYTES", 2 * BLOCK * 4)


def outputs(model, engine: ZOEngine, seed: int, signed_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding's and the lm_head's outputs under ``+-eps z``, and that the weights come back untouched."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    hidden = torch.randn(2, 7, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), engine.perturbed(seed, signed_eps):
        embedded, logits = model.model.embed_tokens(IDS), model.lm_head(hidden)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    return embedded, logits


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("optim", ["mezo", "masked"])
def test_perturbed_rows_equal_the_whole_tensor_path(optim, tied, threads, small_blocks):
    model = tiny(tied)
    rows, _, _ = build(optim, model, row_blocked=True, threads=threads)
    reference = copy.deepcopy(model)
    whole, _, _ = build(optim, reference, row_blocked=False)
    seed = perturbation_seed(0, 3)
    for signed_eps in (1e-2, -1e-2):
        embedded, logits = outputs(model, rows, seed, signed_eps)
        expected_embedded, expected_logits = outputs(reference, whole, seed, signed_eps)
        assert torch.equal(embedded, expected_embedded)  # Same elementwise op per entry: bit for bit.
        # 16-row chunks: BLAS may sum in another order than for the whole matrix (seen: equal, here and on SmolLM2).
        torch.testing.assert_close(logits, expected_logits, rtol=1e-6, atol=1e-6)
        unperturbed = torch.nn.functional.linear(torch.randn(2, 7, HIDDEN, generator=torch.Generator().manual_seed(2)),
                                                 model.lm_head.weight)  # fmt: skip
        assert (logits - unperturbed).abs().max() > 1e-3  # The lm_head was perturbed at all.
    largest = max(buffer.numel() for buffer in rows._scratch._buffers.values())
    assert largest < VOCAB * HIDDEN / 4  # No perturbed copy of the embedding or lm_head was made.
    # The lm_head's matmuls ran inside the hook, in the module's place: timed apart as module work (not engine work).
    assert rows.module_seconds > 0 and whole.module_seconds == 0


def test_engine_clock_leaves_the_module_work_of_the_hooks_out(small_blocks):
    """zo-bench's EngineClock times the hooks and the update, less the vocab projection's matmuls the row path runs
    in the module's place (forward work a plain forward does too), which it reports apart."""
    model = tiny(False)
    engine, _, _ = build("mezo", model, row_blocked=True)
    clock = EngineClock(engine)
    hidden = torch.randn(2, 7, HIDDEN, generator=torch.Generator().manual_seed(2))
    started = time.perf_counter()
    with torch.no_grad(), engine.perturbed(perturbation_seed(0, 1), 1e-2):
        model.lm_head(hidden)
    outside = time.perf_counter() - started
    inside = clock.lap()
    assert clock.last_module_seconds == engine.module_seconds > 0
    assert 0 < inside and inside + clock.last_module_seconds <= outside
    assert clock.lap() == 0 and clock.last_module_seconds == 0  # Nothing ran since.


def test_small_lm_head_and_other_paths_are_the_whole_tensor_path(small_blocks, monkeypatch):
    model = tiny()
    engine, _, _ = build("mezo", model, row_blocked=True)
    embed, head = model.model.embed_tokens, model.lm_head
    weight = engine.targets[0].get()
    with torch.no_grad():
        assert engine._row_kind(embed, weight) == "embedding"
        assert engine._row_kind(head, weight) == "linear"
        monkeypatch.setattr(ZOEngine, "ROW_CHUNK_BYTES", weight.numel() * weight.element_size())
        assert engine._row_kind(head, weight) is None  # Fits one chunk: the full matmul, bit for bit as before.
        engine.noise_scheme = 1  # Replay of scheme-1 runs draws z whole.
        assert engine._row_kind(embed, weight) is None
    assert engine._row_kind(embed, weight) is None  # Grad mode.


@pytest.mark.parametrize("optim", ["mezo", "masked"])
def test_zo_steps_give_the_same_losses_and_updates(optim, small_blocks):
    """Whole steps through ``zo_step`` and ``ZOOptimizer``: losses equal to float noise, weights likewise."""
    models = [tiny(), tiny()]
    runs = []
    for model, row_blocked in zip(models, (True, False)):
        engine, method, args = build(optim, model, row_blocked)
        # A small lr: each coefficient is a difference of near-equal losses over 2 eps, so one ulp of a loss (the row
        # path's chunked matmuls may round otherwise than the whole matmul; seen on an AMD EPYC host) moves every
        # weight by lr * ulp / (2 eps) * z. At lr 0.5 the steps drove the weights to ~100 and that was 2e-3.
        optimizer = ZOOptimizer(engine, method, lr=1e-3, num_perturbations=2, max_skipped_steps=3)
        losses = []
        for step in range(3):
            loss = zo_step(engine, optimizer, lambda m=model: m(input_ids=IDS, labels=IDS).loss,
                           eps=args.zo_eps, num_perturbations=2, seed=7, step=step)  # fmt: skip
            optimizer.step()
            losses.append(float(loss))
        runs.append(losses)
    assert runs[0] == pytest.approx(runs[1], rel=1e-6, abs=0)
    for (name, value), expected in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)
    moved = (models[0].lm_head.weight - tiny().lm_head.weight).abs().max()
    assert moved > 100 * 1e-6  # The steps did train, by far more than the tolerance.


@pytest.mark.parametrize("row_blocked", [True, False])
@pytest.mark.parametrize("optim", ["mezo", "masked"])
def test_no_perturbed_copy_of_the_embedding_is_allocated(optim, row_blocked, monkeypatch):
    # 16384 x 64 tied embedding (4 MiB) with real-sized blocks and a 256 KiB lm_head chunk: every other tensor
    # (the layers, logits of 6 tokens, the chunk) is below a quarter of it. The whole-tensor path shows it is seen.
    monkeypatch.setattr(ZOEngine, "ROW_CHUNK_BYTES", 1 << 18)
    model = make_tiny_llama(16384, hidden_size=64, intermediate_size=128, max_position_embeddings=64).eval()
    ids = IDS[:1, :6]
    engine, _, _ = build(optim, model, row_blocked)
    embedding_bytes = model.lm_head.weight.numel() * 4

    def step(index: int) -> None:
        seed = perturbation_seed(0, index)
        with torch.no_grad():
            with engine.perturbed(seed, 1e-3):
                plus = model(input_ids=ids, labels=ids).loss
            with engine.perturbed(seed, -1e-3):
                minus = model(input_ids=ids, labels=ids).loss
        engine.update([seed], [1e-3 * float(projected_gradient(plus, minus, 1e-3))], lr=1e-3)

    step(0)  # Allocates the scratch buffers (the whole-tensor path: a perturbed copy of the embedding).
    engine._scratch._buffers.clear()  # Allocated again in the next step if that path needs a tensor-sized one.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step(1)
    largest = max(event.cpu_memory_usage for event in profiler.events())
    if row_blocked:
        assert 0 < largest < embedding_bytes / 4, f"an allocation of {largest} bytes (embedding: {embedding_bytes})"
    else:
        assert largest >= embedding_bytes


@pytest.mark.parametrize("tied", [True, False])
def test_vocab_paths_keep_no_buffer_beside_the_layer_copy(tied, small_blocks):
    """The embedding's rows and the lm_head's chunk go in the layers' perturbed-copy buffer (idle while those modules
    run): after whole steps the scratch is that one buffer and (where z is drawn into a buffer before it is applied) the
    per-thread z blocks, nothing more stays resident."""
    model = tiny(tied)
    engine, method, args = build("mezo", model, row_blocked=True)
    optimizer = ZOOptimizer(engine, method, lr=args.learning_rate, num_perturbations=1, max_skipped_steps=3)
    for step in range(2):
        zo_step(engine, optimizer, lambda: model(input_ids=IDS, labels=IDS).loss,
                eps=args.zo_eps, num_perturbations=1, seed=7, step=step)  # fmt: skip
        optimizer.step()
    vocab = {model.lm_head.weight.data_ptr(), model.model.embed_tokens.weight.data_ptr()}
    largest_layer = max(t.numel for t in engine.targets if t.get().data_ptr() not in vocab)
    chunk = HIDDEN + ZOEngine.ROW_CHUNK_BYTES // 4
    assert largest_layer > max(chunk, IDS.unique().numel() * HIDDEN)  # So a buffer of their own would show below.
    # The update's z block per thread, unless z is applied as it is drawn (scheme 5 on CPU: no z block at all).
    z_block = 0 if engine._applied_as_drawn(model.lm_head.weight) else BLOCK
    assert engine.noise_scheme < 5 or z_block == 0
    assert sum(b.numel() for b in engine._scratch._buffers.values()) == largest_layer + z_block


class ScaledHead(torch.nn.Module):
    """An lm_head inside a module with a target of its own: that target's perturbed copy is alive (in the shared
    buffer) while the lm_head's rows are built, so they must go elsewhere."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.head = head
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, VOCAB))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) * self.scale


def test_lm_head_inside_a_perturbed_module_gets_its_perturbed_weights(small_blocks):
    """Reference: every target set to ``t + eps * z`` by hand (the whole-tensor path cannot serve here, as it puts the
    scale's and the lm_head's copies in the same buffer)."""
    model = tiny(tied=False)
    model.lm_head = ScaledHead(model.lm_head)
    engine, _, _ = build("mezo", model, row_blocked=True)
    seed, eps = perturbation_seed(0, 1), 1e-2
    reference = copy.deepcopy(model)
    with torch.no_grad():
        assert engine._row_kind(model.lm_head.head, model.lm_head.head.weight) == "linear"
        with engine.perturbed(seed, eps):  # The layers run first: the shared buffer fits the scale's copy.
            logits = model(input_ids=IDS).logits
        for target, param in zip(engine.targets, reference.parameters(), strict=True):
            assert target.get().shape == param.shape
            param.add_(engine.noise(target, seed), alpha=eps)
        expected = reference(input_ids=IDS).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("optim", ["mezo", "masked"])
@pytest.mark.parametrize("vocab", [VOCAB, VOCAB + 1])
def test_rows_drawn_alone_give_the_block_paths_bits(vocab, optim, dtype, small_blocks):
    """Scheme 3 draws z of only the rows a batch reads (``_perturbed_rows``) where the block path's ops are whole
    vector pairs; a tensor of 401 x 48 entries (not a multiple of 64) keeps the block path. Both: the whole-tensor
    path's bits, in every dtype."""
    model = make_tiny_llama(vocab, dtype, hidden_size=HIDDEN, max_position_embeddings=64).eval()
    engine, _, _ = build(optim, model, row_blocked=True, threads=3)
    reference = copy.deepcopy(model)
    whole, _, _ = build(optim, reference, row_blocked=False)
    weight = engine.targets[0].get()
    assert engine._rows_drawn_alone(weight) == (vocab == VOCAB)
    seed = perturbation_seed(0, 4)
    for signed_eps in (1e-2, -1e-2):
        with torch.no_grad(), engine.perturbed(seed, signed_eps):
            embedded = model.model.embed_tokens(IDS)
        with torch.no_grad(), whole.perturbed(seed, signed_eps):
            expected = reference.model.embed_tokens(IDS)
        assert torch.equal(embedded, expected)
        assert not torch.equal(embedded, model.model.embed_tokens(IDS))  # Perturbed at all.
