"""The ZO step allocates no tensor-sized temporaries, and computes exactly what the plain tensor ops give."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from conftest import make_tiny_llama
from zo_trainer.engine import ZOEngine, perturbation_seed, projected_gradient
from zo_trainer.methods import MeZO, SparseMeZO
from zo_trainer.training_args import ZOTrainingArguments

IDS = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(1))


def build(
    optim: str, model, weight_decay: float = 0.0, scheme: int = ZOEngine.NOISE_SCHEME, threads: int = 1
) -> ZOEngine:
    sparsity = {"zo_sparsity": 0.5} if optim == "sparse_mezo" else {}
    args = ZOTrainingArguments(output_dir="unused", optim=optim, report_to="none", **sparsity)
    method = (MeZO if optim == "mezo" else SparseMeZO)(args)
    targets = method.targets(model)
    for target in targets:
        target.weight_decay = weight_decay
    engine = ZOEngine(targets, num_noise_threads=threads)
    engine.noise_scheme = scheme
    if method.sparsity > 0:
        engine.set_thresholds(method.sparsity, select=method.is_sparsified)
    return engine


def loss(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss


def reference_step(model, engine: ZOEngine, seed: int, eps: float, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One ZO step with the textbook ops: a bool mask |t| <= threshold, ``addcmul`` with it, ``t + t * mask * decay``
    (the engine's ops before they were rewritten to avoid temporaries); z from ``engine.noise``."""
    targets = {t.name: t for t in engine.targets}
    params = dict(model.named_parameters())
    original = {name: params[name].data.clone() for name in targets}
    masks = {name: None if t.threshold is None else original[name].abs() <= t.threshold for name, t in targets.items()}
    losses = []
    for signed_eps in (eps, -eps):
        with torch.no_grad():
            for name, target in targets.items():
                z = engine.noise(target, seed)
                mask = masks[name]
                if mask is None:
                    shifted = original[name].add(z, alpha=signed_eps)
                else:
                    shifted = original[name].addcmul(z, mask, value=signed_eps)
                params[name].data.copy_(shifted)
            losses.append(loss(model))
            for name in targets:
                params[name].data.copy_(original[name])
    coefficient = lr * float(projected_gradient(*losses, eps))
    with torch.no_grad():
        for name, target in targets.items():
            tensor, mask, z = params[name].data, masks[name], engine.noise(target, seed)
            if mask is None:
                tensor.add_(z, alpha=-coefficient)
                tensor.mul_(1.0 - lr * target.weight_decay)
            else:
                tensor.addcmul_(z, mask, value=-coefficient)
                tensor.add_(tensor * mask, alpha=-lr * target.weight_decay)
    return losses[0], losses[1]


# Schemes 2-5 apply z block by block (here 256-entry blocks over 3 threads); scheme 1 (replay of old runs) whole.
@pytest.mark.parametrize(
    "scheme, block, threads",
    [(1, None, 1), (2, None, 1), (2, 256, 3), (3, None, 1), (3, 256, 3), (5, None, 1), (5, 256, 3)],
)
@pytest.mark.parametrize("optim", ["mezo", "sparse_mezo"])
@pytest.mark.parametrize("bias", [False, True])  # A bias is perturbed while its weight's copy is read: own buffer.
def test_steps_equal_the_plain_tensor_ops_bit_for_bit(optim, scheme, block, threads, bias, monkeypatch):
    if block is not None:
        monkeypatch.setattr(ZOEngine, "NOISE_BLOCK", block)
    model = make_tiny_llama(96, max_position_embeddings=64, attention_bias=bias).eval()
    reference = copy.deepcopy(model)
    engine = build(optim, model, weight_decay=0.1, scheme=scheme, threads=threads)
    reference_engine = build(optim, reference, weight_decay=0.1, scheme=scheme)
    eps, lr = 1e-2, 0.5  # Large enough that every step moves the weights (and the masks) visibly.
    for step in range(3):
        seed = perturbation_seed(0, step)
        with engine.perturbed(seed, eps):
            plus = loss(model)
        with engine.perturbed(seed, -eps):
            minus = loss(model)
        engine.update([seed], [lr * float(projected_gradient(plus, minus, eps))], lr=lr)
        assert (plus, minus) == reference_step(reference, reference_engine, seed, eps, lr)
    changed = 0
    for (name, value), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, expected), name
        changed += not torch.equal(
            value, make_tiny_llama(96, max_position_embeddings=64, attention_bias=bias).state_dict()[name]
        )
    assert changed  # The steps did train.


@pytest.mark.parametrize("scheme", [1, 2, 3, 5])
@pytest.mark.parametrize("optim", ["mezo", "sparse_mezo"])
def test_a_step_allocates_nothing_tensor_sized_after_the_first(optim, scheme):
    # The matrices (128 x 64 and larger) dwarf one short row's activations, so any tensor-sized temporary shows.
    model = make_tiny_llama(96, hidden_size=128, intermediate_size=256, max_position_embeddings=64).eval()
    ids = IDS[:1, :6]
    engine = build(optim, model, weight_decay=0.1, scheme=scheme)
    smallest = min(t.get().numel() * t.get().element_size() for t in engine.targets if t.get().dim() == 2)

    def step(index: int) -> None:
        seed = perturbation_seed(0, index)
        with engine.perturbed(seed, 1e-3):
            plus = loss(model, ids)
        with engine.perturbed(seed, -1e-3):
            minus = loss(model, ids)
        engine.update([seed], [1e-3 * float(projected_gradient(plus, minus, 1e-3))], lr=1e-3)

    step(0)  # Allocates the scratch buffers.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step(1)
    largest = max(event.cpu_memory_usage for event in profiler.events())
    assert 0 < largest < smallest / 2, f"an allocation of {largest} bytes (smallest target: {smallest} bytes)"
