"""Gaussian z of z scheme 3 (``zo_trainer.counter_noise``): the compiled kernel gives the bits of the torch-ops
reference, entry i depends only on (key, i) (so chunks and threads change nothing), the values are a unit-variance
Gaussian, and without the C extension the same z comes from the reference."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch

from zo_trainer import counter_noise
from zo_trainer.counter_noise import counter_normal_, counter_normal_reference, normal_table

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
KEY = 0x7FFF_1234_5678_9ABC


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "start,numel",
    [(0, 1), (0, 7), (3, 10), (1, 2), (2, 1), (65536, 65536), (5, 100_003), ((1 << 33) + 1, 50)],
)
def test_the_c_fill_gives_the_reference_bits(dtype, start, numel):
    drawn = counter_normal_(torch.empty(numel, dtype=dtype), KEY, start)
    assert torch.equal(drawn, counter_normal_reference(numel, KEY, start, dtype))


def test_entries_depend_on_their_index_only():
    """Cut anywhere (word boundaries or not), the pieces make up the whole draw: chunks and threads change no bit."""
    whole = counter_normal_(torch.empty(10_000), KEY, 40)
    cuts = [0, 1, 2, 7, 64, 65, 4097, 9_998, 10_000]
    pieces = [counter_normal_(torch.empty(b - a), KEY, 40 + a) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(pieces), whole)
    assert torch.equal(counter_normal_(torch.empty(100, 100), KEY, 40).view(-1), whole[:10_000])


def test_z_is_a_unit_gaussian_and_keys_give_unrelated_streams():
    z = counter_normal_(torch.empty(1 << 22, dtype=torch.float64), KEY)
    assert abs(float(z.mean())) < 3e-3 and abs(float(z.var()) - 1) < 3e-3
    assert abs(float(z.pow(4).mean()) - 3) < 0.03  # Gaussian kurtosis (Rademacher: 1, uniform: 1.8).
    assert float(z.abs().max()) <= float(normal_table(torch.float64).abs().max())
    for q, expected in ((0.5, 0.0), (0.8413, 1.0), (0.9772, 2.0)):
        assert abs(float(z.quantile(q)) - expected) < 0.01
    other = counter_normal_(torch.empty(1 << 22, dtype=torch.float64), KEY + 1)
    assert abs(float((z * other).mean())) < 3e-3  # Neighbouring keys: uncorrelated.
    lanes = z.view(-1, 4)  # The four 16-bit lanes of one word are independent too.
    assert all(abs(float((lanes[:, 0] * lanes[:, k]).mean())) < 5e-3 for k in (1, 2, 3))
    assert abs(float((z[1:] * z[:-1]).mean())) < 3e-3


def test_the_table_is_pinned():
    """The 65,536 values in fp32 (torch's ndtri in float64): a change would change every scheme-3 run's z."""
    table = normal_table(torch.float32)
    assert table.numel() == 1 << 16 and torch.equal(table, -table.flip(0))
    digest = hashlib.sha256(table.numpy().tobytes()).hexdigest()
    assert digest == "8babbcaf96568f10165a1eab530c0e5c92d04de96761b6dbb3dadfa94baba37f"


def test_the_c_fill_is_built_and_used():
    """CI installs with a C compiler: the extension must be there (else the tests above compared the reference with
    itself)."""
    assert counter_noise._fills() is not None


def test_without_the_extension_the_reference_draws_the_same_z(monkeypatch):
    expected = counter_normal_(torch.empty(5_000, dtype=torch.bfloat16), KEY, 12)
    monkeypatch.setitem(sys.modules, "zo_trainer._counter_noise", None)  # Its import now raises ImportError.
    counter_noise._fills.cache_clear()
    try:
        with pytest.warns(UserWarning, match="C extension .* is not built"):
            drawn = counter_normal_(torch.empty(5_000, dtype=torch.bfloat16), KEY, 12)
        assert torch.equal(drawn, expected)
    finally:
        counter_noise._fills.cache_clear()
