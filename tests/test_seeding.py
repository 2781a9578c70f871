"""seeding.key: the one seed-mixing rule, with the sampling keys' values unchanged."""
import random

import torch

from dar_fast.seeding import class_seed, key, noise_seed, splitmix64, uniforms

M64, M63 = (1 << 64) - 1, (1 << 63) - 1


def test_sampling_keys_keep_their_values():
    """noise_seed and the FID's random classes were splitmix64(splitmix64(seed) ^ id) mod 2**63: key() is that."""
    rng = random.Random(7)
    for _ in range(2000):
        seed, i = rng.randint(-(1 << 63), (1 << 63) - 1), rng.randint(0, 1 << 40)
        old = splitmix64(splitmix64(seed & M64) ^ (i & M64)) & M63
        assert key(seed, i) == noise_seed(seed, i) == old
        assert class_seed(seed, i) == splitmix64(splitmix64((seed ^ 0x5DEECE66D) & M64) ^ i) & M63


def test_data_order_keeps_its_value():
    """The epoch permutation's generator seed was splitmix64 chained over (seed, epoch, 0), mod 2**63."""
    for seed, epoch in [(0, 0), (5, 3), (-1, 7)]:
        old = splitmix64(splitmix64(splitmix64(seed & M64) ^ epoch) ^ 0) & M63
        assert key(seed, epoch, 0) == old


def test_key_range_streams_and_uniforms():
    ks = {key(1, "augment", e, i) for e in range(3) for i in range(100)}
    assert len(ks) == 300 and all(0 <= k <= M63 for k in ks)
    assert key(1, "augment", 0) != key(1, "code-augment", 0) != key(1, 0)
    torch.Generator().manual_seed(key(-5, "x"))            # always a valid generator seed
    u = uniforms(4, 3, "augment", 0, 9)
    assert u == uniforms(4, 3, "augment", 0, 9) and len(set(u)) == 4 and all(0.0 <= x < 1.0 for x in u)
    many = [x for i in range(2000) for x in uniforms(2, 0, "augment", 0, i)]
    assert abs(sum(many) / len(many) - 0.5) < 0.02
