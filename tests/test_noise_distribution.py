"""``zo_noise="rademacher"``: z with entries +-1 (probability 1/2 each) instead of N(0, 1): from scheme 6 the signs of
the counter-based stream's picks (``counter_noise``), under schemes 1-5 torch generator bits.

Checked here: the values and their balance bit by bit (a sign table fed with biased bits would show), determinism
(seed, step, thread count, blocked / row-blocked / whole-tensor paths), tails of tensors that are not a multiple of
8, 64 or a block, and the user's journey through ``zo-train --zo_noise rademacher`` and ``zo-replay``. Gaussian z,
the default, is covered by tests/test_noise_scheme.py (files without a distribution replay as Gaussian).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from torch import nn

import test_cli
from conftest import make_tiny_llama, state
from test_cli import assert_ok, assert_one_line_error, cli, in_process, tiny_flags
from test_noise_scheme import old_scheme_payload, weights_digest
from zo_trainer.engine import ZOEngine, parameter_targets, perturbation_seed
from zo_trainer.methods import MeZO
from zo_trainer.training_args import ZOTrainingArguments
from zo_trainer.trajectory import TrajectoryError, replay

# test_cli's fixtures, shared: the tiny random Llama saved as a model folder and a small copy of RTE.
tiny_model_dir = test_cli.tiny_model_dir
small_rte_dir = test_cli.small_rte_dir

# 1009 x 991 = 999,919 entries: 15 full 64K blocks and a tail of 16,159, itself not a multiple of 8 or 64.
ROWS, COLS = 1009, 991


class Holder(nn.Module):
    def __init__(self, shape: tuple[int, ...] = (ROWS, COLS), dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype))


def engine_for(module: nn.Module, threads: int | None = 1, distribution: str = "rademacher") -> ZOEngine:
    return ZOEngine(parameter_targets(module, lambda *_: True), num_noise_threads=threads, distribution=distribution)


def assert_balanced_signs(z: torch.Tensor) -> None:
    """Exactly +-1, mean ~0, and every bit of the 64-bit words balanced: the entries at each position mod 64 (one
    bit of each word) have mean ~0 too. ``random_()`` without a range leaves the top bit 0: that column would be +1."""
    flat = z.flatten().double()
    assert torch.equal(flat.abs(), torch.ones_like(flat))
    assert float(flat.square().mean()) == 1.0
    sigma = flat.numel() ** -0.5
    assert abs(float(flat.mean())) < 5 * sigma
    columns = flat[: flat.numel() // 64 * 64].view(-1, 64).mean(0)
    assert float(columns.abs().max()) < 5 * (flat.numel() // 64) ** -0.5, columns
    assert abs(float((flat[1:] * flat[:-1]).mean())) < 5 * sigma  # Neighbours independent.


# 6: the counter stream's signs (new runs); 2: CPU blocks of generator bits; 1: whole-tensor path (CUDA's before scheme
# 6), 4 streams, in pieces.
@pytest.mark.parametrize("scheme", [6, 2, 1])
def test_rademacher_z_is_plus_minus_one_balanced_and_deterministic(scheme, monkeypatch):
    if scheme == 1:  # Pieces of 64 blocks of 256: each of the 4 streams of the tensor is drawn in 16 pieces.
        monkeypatch.setattr(ZOEngine, "NOISE_BLOCK", 256)
    engine = engine_for(Holder())
    engine.noise_scheme = scheme
    (target,) = engine.targets
    seed = perturbation_seed(0, 0)
    z = engine.noise(target, seed)
    assert z.shape == (ROWS, COLS) and z.dtype == torch.float32
    assert_balanced_signs(z)
    assert torch.equal(engine.noise(target, seed), z)  # Same seed, same z.
    other = engine.noise(target, perturbation_seed(0, 1))
    assert_balanced_signs(other)
    assert float((z * other).mean()).__abs__() < 5 * z.numel() ** -0.5  # Another step: an independent z.
    tail = z.flatten()[-(z.numel() % 64) :]  # The last, partial word's entries are drawn like the others.
    assert torch.equal(tail.abs(), torch.ones_like(tail)) and tail.unique().numel() == 2
    # The Gaussian engine on the same seed draws other values: the distribution is part of how z is drawn.
    gaussian = engine_for(Holder(), distribution="gaussian")
    gaussian.noise_scheme = scheme
    assert not torch.equal(gaussian.noise(gaussian.targets[0], seed), z)


@pytest.mark.parametrize("numel", [1, 7, 8, 63, 65, 256 + 13])
@pytest.mark.parametrize("scheme", [6, 2, 1])
def test_short_tensors_and_tails_are_filled(numel, scheme, monkeypatch):
    """Tensors shorter than a byte (8 entries), a word (64) or a block, or a few entries over: every entry, the
    tail's too, is written with +-1 (nothing of ``out``'s old values or of stale scratch is left) and takes both signs."""
    monkeypatch.setattr(ZOEngine, "NOISE_BLOCK", 256)
    engine = engine_for(Holder((numel,)))
    engine.noise_scheme = scheme
    (target,) = engine.targets
    for step in range(20):  # Scratch from a previous (longer or shorter) draw must not leak into the tail.
        z = engine.noise(target, perturbation_seed(3, step), out=torch.full((numel,), 7.0))
        assert torch.equal(z.abs(), torch.ones(numel)), z
    signs = torch.stack([engine.noise(target, perturbation_seed(3, s)) for s in range(400)])
    assert float(signs.mean(0).abs().max()) < 0.25  # Every position, the tail's included, takes both signs.


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_z_is_exactly_plus_minus_one(dtype):
    engine = engine_for(Holder((300, 301), dtype))
    z = engine.noise(engine.targets[0], perturbation_seed(1, 2))
    assert z.dtype == dtype
    assert_balanced_signs(z)


def tiny_model():
    return make_tiny_llama(96, max_position_embeddings=64).eval()


@pytest.mark.parametrize("scheme", [6, 5])
@pytest.mark.parametrize("threads", [1, 3])
def test_row_blocked_embedding_and_lm_head_equal_the_whole_tensor_path(threads, scheme, monkeypatch):
    """As tests/test_engine_rows.py for Gaussian z: the tied embedding looked up from perturbed rows and the lm_head
    multiplied chunk by chunk give the outputs of the whole perturbed tensor, entry for entry."""
    vocab, hidden = 400, 48
    monkeypatch.setattr(ZOEngine, "NOISE_BLOCK", 256)
    monkeypatch.setattr(ZOEngine, "ROW_CHUNK_BYTES", 2 * 256 * 4)
    model = make_tiny_llama(vocab, hidden_size=hidden, max_position_embeddings=64).eval()
    reference = copy.deepcopy(model)
    args = ZOTrainingArguments("unused", optim="mezo", report_to="none", zo_noise="rademacher")
    rows = ZOEngine(MeZO(args).targets(model), threads, distribution="rademacher")
    whole = ZOEngine(MeZO(args).targets(reference), 1, distribution="rademacher")
    rows.noise_scheme = whole.noise_scheme = scheme
    whole.row_blocked = False
    weight = rows.targets[0].get()
    assert rows._row_kind(model.model.embed_tokens, weight) is None  # Grad mode; under no_grad the row paths:
    with torch.no_grad():
        assert rows._row_kind(model.model.embed_tokens, weight) == "embedding"
        assert rows._row_kind(model.lm_head, weight) == "linear"
    ids = torch.randint(0, vocab, (3, 20), generator=torch.Generator().manual_seed(1))
    hidden_states = torch.randn(2, 7, hidden, generator=torch.Generator().manual_seed(2))
    seed = perturbation_seed(0, 3)
    for signed_eps in (1e-2, -1e-2):
        found = []
        for net, engine in ((model, rows), (reference, whole)):
            with torch.no_grad(), engine.perturbed(seed, signed_eps):
                found.append((net.model.embed_tokens(ids), net.lm_head(hidden_states)))
        (embedded, logits), (expected_embedded, expected_logits) = found
        assert torch.equal(embedded, expected_embedded)
        torch.testing.assert_close(logits, expected_logits, rtol=1e-6, atol=1e-6)
        # The perturbation is +-eps exactly (z = +-1): embedding rows moved by eps on every entry.
        plain = torch.nn.functional.embedding(ids, weight)
        torch.testing.assert_close((embedded - plain).abs(), torch.full_like(plain, 1e-2), rtol=1e-3, atol=1e-6)
    assert max(buffer.numel() for buffer in rows._scratch._buffers.values()) < vocab * hidden / 4


def test_an_unknown_distribution_is_refused_in_one_line():
    with pytest.raises(ValueError, match="zo_noise must be one of gaussian, rademacher, got 'uniform'"):
        ZOTrainingArguments("unused", optim="mezo", report_to="none", zo_noise="uniform")
    with pytest.raises(ValueError, match="z distribution 'uniform' is unknown to this zo_trainer"):
        engine_for(Holder((4,)), distribution="uniform")
    payload = {
        "format": "zo_trainer.trajectory",
        "method": "mezo",
        "num_perturbations": 1,
        "noise": {"scheme": 2, "distribution": "uniform"},
        "steps": [],
    }
    with pytest.raises(TrajectoryError, match="z distribution 'uniform' is unknown"):
        replay(tiny_model(), payload)


def test_sparse_mezo_trains_with_rademacher_z(tmp_path, tiny_tokenizer, rte_small):
    from conftest import make_trainer

    model = make_tiny_llama()
    trainer = make_trainer(tmp_path, tiny_tokenizer, rte_small, model, optim="sparse_mezo", zo_noise="rademacher")
    assert trainer.zo_engine.distribution == "rademacher"
    trainer.train()
    base, trained = state(make_tiny_llama()), state(model)
    assert any(not torch.equal(base[k], trained[k]) for k in base)
    assert trainer.zo_engine.noise_config()["distribution"] == "rademacher"


def test_qzo_scales_take_rademacher_steps(tmp_path):
    """QZO's targets are the small fp32 scales of an int4 model (here a tiny one in bnb NF4): each scale moves by
    exactly the update's coefficient, +-1 times it."""
    pytest.importorskip("bitsandbytes")
    from zo_trainer.methods import QZO
    from zo_trainer.quant import load_quantized

    make_tiny_llama(96, hidden_size=64, intermediate_size=128, max_position_embeddings=64).save_pretrained(tmp_path)
    model = load_quantized(tmp_path, "nf4")
    args = ZOTrainingArguments(str(tmp_path), optim="qzo", report_to="none", zo_noise="rademacher")
    engine = ZOEngine(QZO(args).targets(model), distribution=args.zo_noise)
    before = [target.get().clone() for target in engine.targets]
    seed, ids = perturbation_seed(0, 0), torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), engine.perturbed(seed, 1e-3):
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    engine.update([seed], [1e-4])
    assert any(name.endswith("absmax") for name in (t.name for t in engine.targets))
    for target, old in zip(engine.targets, before):
        step = (target.get() - old).abs()
        torch.testing.assert_close(step, torch.full_like(step, 1e-4), rtol=1e-3, atol=1e-8, msg=target.name)


# Made with the engine of git 4779070 (session 14: Rademacher z from torch generator bits under scheme 5, the default
# then) by replaying ``rademacher_payload``; the engine of the commit that added scheme 6 gave the same digests.
SCHEME_5_RADEMACHER_DIGESTS = {
    "mezo": "eb1abe236518af401ef93abe37c6de4d4287dbc6fed11a310e781942d6c85319",
    "sparse_mezo": "e6f820a7b49592b0ca2c3ca70565c626bfe4649b9375e578830e181d27ecba60",
}


def rademacher_payload(optim: str, scheme: int) -> dict:
    """A trajectory of 3 steps x 2 perturbations with Rademacher z drawn by ``scheme`` (blocks of 1024 entries)."""
    payload = old_scheme_payload(optim)
    payload["version"] = 3
    payload["noise"] = {**payload["noise"], "scheme": scheme, "distribution": "rademacher", "block": 1024}
    return payload


@pytest.mark.parametrize("optim", ["mezo", "sparse_mezo"])
def test_a_scheme_5_rademacher_run_replays_as_before_and_scheme_6_draws_other_z(optim):
    """Runs of the engine before scheme 6 replay (and resume) bit for bit: their Rademacher z is still generator bits."""
    model = tiny_model()
    assert replay(model, rademacher_payload(optim, 5)).noise_scheme == 5
    assert weights_digest(model) == SCHEME_5_RADEMACHER_DIGESTS[optim]
    other = tiny_model()
    assert replay(other, rademacher_payload(optim, 6)).noise_scheme == 6
    assert weights_digest(other) != SCHEME_5_RADEMACHER_DIGESTS[optim]


# ----- the user's journey: zo-train --zo_noise rademacher, then zo-replay ----------------------------------------
def test_zo_train_with_rademacher_z_records_it_and_zo_replay_rebuilds_the_weights(
    tmp_path, tiny_model_dir, small_rte_dir
):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert_ok(cli("zo-train", *tiny_flags(tiny_model_dir, small_rte_dir, out, "--zo_noise", "rademacher")))
    trajectory = json.loads((out / "zo_trajectory.json").read_text())
    assert trajectory["noise"]["distribution"] == "rademacher" and trajectory["version"] == 3
    assert len(trajectory["steps"]) == 2
    assert "- zo_noise: rademacher" in (out / "README.md").read_text()
    assert_ok(cli("zo-replay", "--trajectory", out, "--output_dir", tmp_path / "rebuilt"))
    trained = load_file(str(out / "model.safetensors"))
    rebuilt = load_file(str(tmp_path / "rebuilt" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert trained.keys() == rebuilt.keys() and all(torch.equal(trained[k], rebuilt[k]) for k in trained)
    assert any(not torch.equal(base[k], trained[k]) for k in base)
    # Replayed as Gaussian (what a reader ignoring the distribution would do) the weights differ: it matters.
    trajectory["noise"]["distribution"] = "gaussian"
    with pytest.raises(TrajectoryError, match="Replayed weights do not match"):
        from transformers import AutoModelForCausalLM

        replay(AutoModelForCausalLM.from_pretrained(tiny_model_dir), trajectory)


def test_zo_train_refuses_an_unknown_distribution_in_one_line(tmp_path, tiny_model_dir, small_rte_dir):
    result = cli("zo-train", *tiny_flags(tiny_model_dir, small_rte_dir, tmp_path / "out", "--zo_noise", "uniform"))
    assert_one_line_error(result, 2, "--zo_noise", "invalid choice: 'uniform'")
    assert len(result.stderr.strip().splitlines()) <= 2  # No usage dump.
    assert not (tmp_path / "out").exists()


def test_zo_train_resumes_a_rademacher_run_exactly_and_refuses_to_switch_distribution(
    tmp_path, tiny_model_dir, small_rte_dir, capsys
):
    from safetensors.torch import load_file

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert_ok(
        in_process(capsys, None, *tiny_flags(tiny_model_dir, small_rte_dir, full, "--zo_noise", "rademacher", steps=3))
    )
    shutil.copytree(full / "checkpoint-1", cut / "checkpoint-1")
    resume = ["--resume_from_checkpoint", "true"]
    assert_one_line_error(  # Gaussian z (the default) after rademacher steps would be another run.
        in_process(capsys, None, *tiny_flags(tiny_model_dir, small_rte_dir, cut, *resume, steps=3)),
        2,
        "zo_noise 'rademacher' in the checkpoint, 'gaussian' now",
    )
    assert not (cut / "checkpoint-2").exists()
    flags = tiny_flags(tiny_model_dir, small_rte_dir, cut, *resume, "--zo_noise", "rademacher", steps=3)
    assert_ok(in_process(capsys, None, *flags))
    expected, got = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert json.loads((cut / "zo_trajectory.json").read_text())["noise"]["distribution"] == "rademacher"
