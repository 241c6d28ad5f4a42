"""How z is drawn (``ZOEngine.noise_scheme``): new runs use scheme 6 (CPU blocks drawn where they are used, Gaussian z
from a counter-based stream of 8-bit picks, Rademacher z its signs), runs of schemes 2-5 replay with their scheme; files written before schemes
were recorded replay and resume with scheme 1, bit for bit."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from conftest import make_tiny_llama, make_trainer, state
from zo_trainer.engine import ZOEngine, perturbation_seed
from zo_trainer.methods import MeZO
from zo_trainer.training_args import ZOTrainingArguments
from zo_trainer.trajectory import FORMAT, TrajectoryError, load_trajectory, replay


def tiny_model():
    return make_tiny_llama(96, max_position_embeddings=64).eval()


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def old_scheme_payload(optim: str) -> dict:
    """A trajectory as zo_trainer wrote it before z schemes were recorded ("noise" without "scheme"). The chunked
    threshold is lowered so the tiny model's larger tensors take the 4-stream path and the small ones the 1-stream."""
    method_args = {"weight_decay": 0.1, **({"zo_sparsity": 0.5} if optim == "sparse_mezo" else {})}
    return {
        "format": FORMAT,
        "version": 1,
        "method": optim,
        "method_args": method_args,
        "num_perturbations": 2,
        "noise": {"cpu_chunks": 4, "cpu_chunked_min_numel": 1024},
        "thresholds": None,
        "global_step": 3,
        "steps": [
            {
                "global_step": step + 1,
                "seeds": [perturbation_seed(5, step, k) for k in range(2)],
                "projected_gradients": [0.3 * (step + 1), -0.7],
                "lr": 0.05,
            }
            for step in range(3)
        ],
    }


# Made with the engine of git 56a52fe (scheme 1, the only one then) by /work/notes/issue11/make_old_scheme_fixture.py.
OLD_SCHEME_DIGESTS = {
    "mezo": "9bb58b9f19258378d33433794b337cee0dba82227dd61634a2ff07c6192ca9e0",
    "sparse_mezo": "985b6e7bdda7b1ee047a66a7f01dc737b85772365931d367797cf1e99fe397f7",
}


@pytest.mark.parametrize("optim", ["mezo", "sparse_mezo"])
def test_a_scheme_1_trajectory_replays_to_the_weights_the_old_engine_gave(optim):
    model = tiny_model()
    engine = replay(model, old_scheme_payload(optim))
    assert engine.noise_scheme == 1
    assert weights_digest(model) == OLD_SCHEME_DIGESTS[optim]
    # The scheme decides z: the same steps drawn with scheme 2 give other weights.
    payload = old_scheme_payload(optim)
    payload["noise"]["scheme"] = 2
    other = tiny_model()
    replay(other, payload)
    assert weights_digest(other) != OLD_SCHEME_DIGESTS[optim]


def test_an_unknown_scheme_is_refused_in_one_line():
    payload = old_scheme_payload("mezo")
    payload["noise"]["scheme"] = 99
    with pytest.raises(TrajectoryError, match="z was drawn with scheme 99, unknown to this zo_trainer"):
        replay(tiny_model(), payload)


@pytest.mark.parametrize("scheme", [2, 3, 5, 6])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_z_does_not_depend_on_the_thread_count(distribution, scheme, monkeypatch):
    monkeypatch.setattr(ZOEngine, "NOISE_BLOCK", 256)  # Many blocks per tensor of the tiny model.
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    results = []
    for threads in (1, 3):
        model = tiny_model()
        args = ZOTrainingArguments("unused", optim="mezo", report_to="none", zo_noise=distribution)
        engine = ZOEngine(MeZO(args).targets(model), threads, distribution=args.zo_noise)
        engine.noise_scheme, engine.CHEAP_DRAW_THREADS = scheme, 0  # Cheap draws too over all the noise threads.
        assert engine.num_noise_threads == threads
        assert engine.noise_config()["distribution"] == distribution
        seed = perturbation_seed(0, 0)
        noise = [engine.noise(target, seed) for target in engine.targets]
        with engine.perturbed(seed, 1e-2), torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        engine.update([seed, perturbation_seed(0, 1)], [1e-2, -3e-3])
        results.append((noise, loss, state(model)))
    (noise_a, loss_a, weights_a), (noise_b, loss_b, weights_b) = results
    assert all(torch.equal(a, b) for a, b in zip(noise_a, noise_b)) and torch.equal(loss_a, loss_b)
    assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)
    z = noise_a[0].flatten()  # The 96 x 32 embedding: 12 blocks, each its own stream.
    assert not torch.equal(z[:256], z[256:512])
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1
    if distribution == "rademacher":
        assert all(torch.equal(z.abs(), torch.ones_like(z)) for z in noise_a)
        # The update moved each entry by +-(1e-2 - 3e-3) or +-(1e-2 + 3e-3): both z's entries are +-1.
        moved = (weights_a["model.norm.weight"] - state(tiny_model())["model.norm.weight"]).abs()
        small, large = torch.isclose(moved, torch.tensor(7e-3)), torch.isclose(moved, torch.tensor(1.3e-2))
        assert torch.all(small | large) and small.any() and large.any()


# With optimizer.pt the ZO state comes from it; without (--save_only_model), from zo_trajectory.json.
@pytest.mark.parametrize("optimizer_file", [True, False])
def test_new_runs_record_scheme_6_and_an_old_checkpoint_resumes_with_scheme_1(
    optimizer_file, tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory, monkeypatch
):
    with monkeypatch.context() as patch:  # The uninterrupted run of the old scheme, and its first half.
        patch.setattr(ZOEngine, "NOISE_SCHEME", 1)
        full = tiny_llama_factory()
        make_trainer(tmp_path / "a", tiny_tokenizer, rte_small, full, max_steps=4).train()
        first = make_trainer(
            tmp_path / "b",
            tiny_tokenizer,
            rte_small,
            tiny_llama_factory(),
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
        )
        first.train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"
    # Make the checkpoint what the old code wrote: no scheme in the trajectory, no "noise" in optimizer.pt.
    trajectory = json.loads((checkpoint / "zo_trajectory.json").read_text())
    assert trajectory["noise"]["scheme"] == 1
    del trajectory["noise"]["scheme"]
    (checkpoint / "zo_trajectory.json").write_text(json.dumps(trajectory))
    if optimizer_file:
        optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=False)
        del optimizer_state["noise"]
        torch.save(optimizer_state, checkpoint / "optimizer.pt")
    else:
        (checkpoint / "optimizer.pt").unlink()
        (checkpoint / "scheduler.pt").unlink()
    resumed = tiny_llama_factory(seed=123)
    trainer = make_trainer(
        tmp_path / "b", tiny_tokenizer, rte_small, resumed, max_steps=4, save_strategy="steps", save_steps=2
    )
    assert trainer.zo_engine.noise_scheme == 6  # A new run's default...
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.zo_engine.noise_scheme == 1  # ...but the checkpoint's run drew z with scheme 1.
    expected = state(full)
    for key, value in state(resumed).items():
        assert torch.equal(value, expected[key]), key
    assert load_trajectory(tmp_path / "b" / "out")["noise"]["scheme"] == 1
    fresh = make_trainer(tmp_path / "c", tiny_tokenizer, rte_small, tiny_llama_factory(), max_steps=1)
    fresh.train()
    assert load_trajectory(tmp_path / "c" / "out")["noise"]["scheme"] == 6
