"""The ZO engine on tiny random models: exactness, sparsity, seeding, and the estimator itself."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from conftest import make_tiny_llama
from zo_trainer.engine import ZOEngine, kth_smallest, parameter_targets, perturbation_seed, projected_gradient
from zo_trainer.methods import MeZO, SparseMeZO
from zo_trainer.training_args import ZOTrainingArguments


def tiny_llama(dtype=torch.float32, seed=0) -> LlamaForCausalLM:
    return make_tiny_llama(
        96, dtype, seed, max_position_embeddings=64, pad_token_id=None, bos_token_id=1, eos_token_id=2
    ).eval()


def zo_args(optim="mezo", **kwargs) -> ZOTrainingArguments:
    return ZOTrainingArguments(output_dir="unused", optim=optim, report_to="none", **kwargs)


def lm_loss(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


IDS = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_perturb_restore_is_bit_exact_and_update_matches(dtype):
    model = tiny_llama(dtype)
    engine = ZOEngine(MeZO(zo_args()).targets(model))
    before = snapshot(model)
    seed = perturbation_seed(0, 5)
    base = lm_loss(model, IDS)
    for _ in range(3):  # Many perturb/restore cycles: no drift at all.
        with engine.perturbed(seed, 1e-2):
            plus = lm_loss(model, IDS)
        with engine.perturbed(seed, -1e-2):
            minus = lm_loss(model, IDS)
    assert plus != base and minus != base  # The perturbation reached the forward.
    for key, value in snapshot(model).items():
        assert torch.equal(value, before[key]), key
    # The step changes the weights by exactly what the update alone gives.
    expected = {t.name: t.get().clone().add_(engine.noise(t, seed), alpha=-0.5) for t in engine.targets}
    engine.update([seed], [0.5])
    for target in engine.targets:
        assert torch.equal(target.get(), expected[target.name]), target.name


def test_perturbed_forward_equals_forward_of_shifted_weights():
    model = tiny_llama()
    engine = ZOEngine(MeZO(zo_args()).targets(model))
    seed, eps = perturbation_seed(1, 2), 1e-3
    shifted = copy.deepcopy(model)
    shifted_engine = ZOEngine(MeZO(zo_args()).targets(shifted))
    with torch.no_grad():
        for target in shifted_engine.targets:
            target.get().add_(shifted_engine.noise(target, seed), alpha=eps)
    with engine.perturbed(seed, eps):
        perturbed_loss = lm_loss(model, IDS)
    assert torch.equal(perturbed_loss, lm_loss(shifted, IDS))


def test_tied_embedding_is_one_target_perturbed_consistently():
    model = tiny_llama()
    targets = MeZO(zo_args()).targets(model)
    tied = [t for t in targets if t.name == "model.embed_tokens.weight"]
    assert len(tied) == 1 and len(tied[0].modules) == 2  # embed_tokens and lm_head.
    assert not any(t.name == "lm_head.weight" for t in targets)
    assert sum(t.numel for t in targets) == sum(p.numel() for p in model.parameters())


def test_same_seed_same_weights_and_global_rng_untouched():
    results = []
    for _ in range(2):
        model = tiny_llama()
        engine = ZOEngine(MeZO(zo_args()).targets(model))
        state = torch.random.get_rng_state()
        for step in range(3):
            seed = perturbation_seed(42, step)
            with engine.perturbed(seed, 1e-3):
                lp = lm_loss(model, IDS)
            with engine.perturbed(seed, -1e-3):
                lm = lm_loss(model, IDS)
            engine.update([seed], [1e-3 * float(projected_gradient(lp, lm, 1e-3))])
        assert torch.equal(torch.random.get_rng_state(), state)
        results.append(snapshot(model))
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key])
    other = tiny_llama()
    engine = ZOEngine(MeZO(zo_args()).targets(other))
    engine.update([perturbation_seed(43, 0)], [1e-3])
    assert not torch.equal(
        snapshot(other)["model.layers.0.mlp.up_proj.weight"], results[0]["model.layers.0.mlp.up_proj.weight"]
    )


def test_seeds_are_distinct_per_step_and_direction():
    seeds = {perturbation_seed(s, step, k) for s in range(3) for step in range(50) for k in range(3)}
    assert len(seeds) == 450
    assert perturbation_seed(7, 3, 1) == perturbation_seed(7, 3, 1)


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_sparse_mezo_updates_only_small_magnitude_entries(sparsity):
    model = tiny_llama()
    method = SparseMeZO(zo_args("sparse_mezo", zo_sparsity=sparsity))
    engine = ZOEngine(method.targets(model))
    names = {t.name for t in engine.targets}
    assert names and all(".layers." in n and n.endswith("proj.weight") for n in names)
    engine.set_thresholds(method.sparsity)
    before = snapshot(model)
    seed = perturbation_seed(0, 0)
    with engine.perturbed(seed, 1e-2):
        lm_loss(model, IDS)
    engine.update([seed], [1e-2])
    after = snapshot(model)
    for key in before:
        changed = before[key] != after[key]
        if key not in names:
            assert not changed.any(), f"{key} is not a Sparse-MeZO target but changed"
            continue
        magnitude = before[key].abs()
        threshold = dict((t.name, t.threshold) for t in engine.targets)[key]
        # Changed entries are exactly the small-magnitude ones, at the requested fraction.
        assert torch.equal(changed, magnitude <= threshold)
        assert abs(changed.float().mean().item() - (1 - sparsity)) < 0.01
        assert magnitude[changed].max() <= magnitude[~changed].min()
    assert abs(engine.pop_mask_fraction() - (1 - sparsity)) < 0.01


def test_thresholds_match_quantile():
    model = tiny_llama()
    engine = ZOEngine(SparseMeZO(zo_args("sparse_mezo")).targets(model))
    engine.set_thresholds(0.8)
    for target in engine.targets:
        magnitudes = target.get().abs().flatten().sort().values
        k = math.ceil(0.2 * magnitudes.numel())  # The smallest 20% take part: exactly k entries.
        assert target.threshold == magnitudes[k - 1].item()
    with pytest.raises(ValueError, match="zo_sparsity"):
        engine.set_thresholds(1.0)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def kth_cases():
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(100_003, generator=generator).mul_(0.02)
    yield "bf16 weights (many ties)", weights.to(torch.bfloat16).abs().float()
    yield "fp16 weights with subnormals", torch.cat([weights, weights * 1e-4]).to(torch.float16).abs().float()
    yield "fp32 with zeros", torch.cat([weights.abs(), torch.zeros(5000)])
    yield "wide range", torch.logspace(-40, 38, 4097).flip(0)
    yield "one value repeated", torch.full((300,), 0.25)
    # Bit patterns 0 .. 3 * 2^16: the smallest subnormals, spanning the first three high-bit buckets.
    yield (
        "subnormals",
        torch.arange(0, 3 << 16, 7, dtype=torch.int32)[torch.randperm(28087, generator=generator)].view(torch.float32),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_kth_smallest_is_kthvalue(device):
    for name, values in kth_cases():
        n = values.numel()
        for k in sorted({1, 2, n // 5, n // 2, math.ceil(0.2 * n), n - 1, n}):
            expected = float(values.kthvalue(k).values)
            assert kth_smallest(values.to(device), k) == expected, (name, k)
    with pytest.raises(ValueError, match="k must be"):
        kth_smallest(torch.ones(4), 5)


class Quadratic(nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.layer = nn.Linear(dim, 1, bias=False, dtype=torch.float64)
        self.x = torch.randn(256, dim, generator=generator, dtype=torch.float64)
        self.y = self.x @ torch.randn(dim, generator=generator, dtype=torch.float64)

    def forward(self):
        return ((self.layer(self.x).squeeze(-1) - self.y) ** 2).mean()


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])  # --zo_noise: both estimates are unbiased.
def test_projected_gradient_is_directional_derivative_and_descends(distribution):
    model = Quadratic()
    engine = ZOEngine(parameter_targets(model, lambda *_: True), distribution=distribution)
    (target,) = engine.targets
    model.layer.weight.requires_grad_(True)
    model().backward()
    true_gradient = model.layer.weight.grad.clone()
    model.layer.weight.requires_grad_(False)
    estimates, true_derivatives = [], []
    for k in range(20):
        seed = perturbation_seed(0, 0, k)
        with engine.perturbed(seed, 1e-3):
            plus = model()
        with engine.perturbed(seed, -1e-3):
            minus = model()
        estimates.append(float(projected_gradient(plus, minus, 1e-3)))
        true_derivatives.append(float((true_gradient * engine.noise(target, seed)).sum()))
    # Central differences are exact on a quadratic: g = <grad, z>.
    assert estimates == pytest.approx(true_derivatives, rel=1e-6, abs=1e-9)
    # The averaged update direction correlates with the true gradient.
    direction = sum(g * engine.noise(target, perturbation_seed(0, 0, k)) for k, g in enumerate(estimates))
    cosine = torch.nn.functional.cosine_similarity(direction.flatten(), true_gradient.flatten(), dim=0)
    assert cosine > 0.4  # ~ sqrt(n / dim) = 0.56 expected for 20 directions in 64 dims.
    start = float(model())
    for step in range(300):
        seed = perturbation_seed(1, step)
        with engine.perturbed(seed, 1e-3):
            plus = model()
        with engine.perturbed(seed, -1e-3):
            minus = model()
        engine.update([seed], [0.01 * float(projected_gradient(plus, minus, 1e-3))])
    assert float(model()) < 0.2 * start


def test_engine_allocates_no_model_sized_memory_after_first_step():
    model = tiny_llama()
    engine = ZOEngine(MeZO(zo_args()).targets(model))
    seed = perturbation_seed(0, 0)
    with engine.perturbed(seed, 1e-3):
        lm_loss(model, IDS)
    engine.update([seed], [1e-3])
    tied = [t.numel for t in engine.targets if len(t.modules) > 1]
    untied = [t.numel for t in engine.targets if len(t.modules) == 1]
    assert tied, "the tiny Llama ties its embeddings"
    # Scratch in total: the tied embedding's perturbed copy (alive for the whole forward, reused by the
    # update) plus one buffer for the largest other layer; nothing model-sized.
    assert sum(b.numel() for b in engine._scratch._buffers.values()) <= max(tied) + max(untied)
    assert all(p.grad is None for p in model.parameters())
