"""History: bit-exact replay of ZOSGD runs, fused (FedKSeed) replay, merging, the binary format
(version 2 with its checksum; version 1 still read), validation before any write, and the
layout check."""

from __future__ import annotations

import math
import struct
import zlib

import pytest
import torch

from fedkseed import ParamSet, reference
from fedkseed.zo import ZOSGD
from fedkseed.zo.history import MAGIC, History
from fedkseed.zo.passes import Entry

SHAPES = [(9, 7), (13,), (2, 3, 5), (64, 3)]


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> ParamSet:
    g = torch.Generator().manual_seed(seed)
    names = ["w0", "b0.bias", "w1", "w2"]
    return ParamSet([(n, (0.1 * torch.randn(s, generator=g)).to(dtype)) for n, s in zip(names, SHAPES)])


def train(pset: ParamSet, steps: int, nan_at: int | None = None, **kwargs) -> ZOSGD:
    opt = ZOSGD(pset, **{"lr": 0.05, "eps": 1e-3, "seed": 4, **kwargs})
    for t in range(steps):

        def closure(t=t):
            if t == nan_at:
                return math.nan
            return sum(((x.float() - 0.05) ** 2).mean() for x in pset.tensors)

        opt.step(closure)
    return opt


@pytest.mark.parametrize(
    "dtype,kwargs",
    [
        (torch.float32, {}),
        (torch.float32, {"weight_decay": 0.3, "dist": "rademacher"}),
        (torch.float32, {"candidates": [1, 2, 3]}),  # seeds repeat
        (torch.float32, {"fuse": False, "weight_decay": 0.2}),
        (torch.bfloat16, {"rounding": "stochastic", "weight_decay": 0.1}),
        (torch.float16, {"rounding": "stochastic"}),
    ],
)
def test_replay_reproduces_trained_weights_bit_for_bit(dtype, kwargs):
    trained, replayed = make_params(dtype), make_params(dtype)
    opt = train(trained, 12, nan_at=5, **kwargs)
    skipped = opt.history.entries[5]
    assert skipped.seeds == () and skipped.decays == (1.0,)  # the skipped step is recorded
    opt.history.apply_(replayed)
    for a, b in zip(trained.tensors, replayed.tensors):
        assert torch.equal(a, b)


def test_fused_replay_is_close_and_uses_fewer_passes():
    trained, fused = make_params(), make_params()
    opt = train(trained, 20)
    assert len(opt.history.passes()) == 41  # +eps, then two passes per step (next seed fused)
    opt.settle()  # take back the next step's +eps: the logical weights
    assert len(opt.history.passes()) == 42 and len(opt.history.passes(fused=True)) == 1
    opt.history.apply_(fused, fused=True)
    for a, b in zip(trained.tensors, fused.tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert not torch.equal(a, b) or a.numel() < 20  # rounding differs: not bit-identical


def test_fused_replay_keeps_decayed_entries_as_their_own_passes():
    h = History()
    for seed, alpha, decay in [(1, 0.1, 1.0), (2, 0.2, 1.0), (3, 0.3, 0.75), (4, 0.4, 1.0)]:
        h.record(seed, alpha, decay)
    got = [(p.seeds, {d for _, d in p.coefficients}) for p in h.passes(fused=True)]
    assert got == [((1, 2), {1.0}), ((3,), {1.0, 0.75}), ((4,), {1.0})]


def test_merged_sums_per_seed_and_matches_replay():
    h = History()
    for seed, alpha in [(7, 0.25), (9, -0.5), (7, 0.5), (2**64 - 1, 1.0)]:
        h.record(seed, alpha)
    m = h.merged()
    assert m.entries == [Entry((), (s,), ((a,),), (1.0,)) for s, a in [(7, 0.75), (9, -0.5), (2**64 - 1, 1.0)]]
    a, b = make_params(), make_params()
    h.apply_(a)
    m.apply_(b)
    for x, y in zip(a.tensors, b.tensors):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_merged_refuses_weight_decay():
    h = History()
    h.record(1, 0.1)
    h.record(2, 0.1, 0.99)
    with pytest.raises(ValueError, match="decay"):
        h.merged()


# ------------------------------------------------------------------------------------ format
def layout_bytes(pset: ParamSet) -> int:
    return sum(2 + len(n) + 1 + 8 * len(s) + 1 + 2 + 1 for n, s, _ in pset.layout())


def test_save_load_round_trip_is_compact_and_atomic(tmp_path):
    pset = make_params()
    opt = train(pset, 10, nan_at=4, weight_decay=0.2, rounding="stochastic")
    path = tmp_path / "run.fkh"
    opt.history.save(path)
    opt.history.save(path)  # overwrite in place
    data = path.read_bytes()
    # header 40, layout, 30 bytes a step (26 for the skipped one: no coefficient), CRC 4
    assert data.startswith(MAGIC) and data[4:6] == b"\x02\x00"
    assert len(data) == 40 + layout_bytes(pset) + 30 * 9 + 26 + 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.fkh"]  # no temporary left
    loaded = History.load(path)
    assert loaded == opt.history and loaded.entries == opt.history.entries
    assert (loaded.eps, loaded.rounding_key, loaded.fingerprint, loaded.dist, loaded.layout, loaded.classes) == (
        opt.history.eps,
        opt.history.rounding_key,
        pset.fingerprint(),
        opt.history.dist,
        pset.layout(),
        [1, 0, 1, 1],
    )


def small_file() -> bytes:
    h = History.for_params(make_params(), eps=1e-3)
    h.add(Entry((5,), (5,), ((0.5,),), (0.96875,), next_seed=6))
    h.add(Entry((6,), (), ((),), (1.0,), perturbed=True, aborted=1))
    return h.to_bytes()


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda d: d[:-1], "checksum"),
        (lambda d: d[:20], "shorter"),
        (lambda d: b"PKL!" + d[4:], "magic"),
        (lambda d: d[:4] + b"\x09\x00" + d[6:], "format version 9"),
        (lambda d: d[:6] + b"\x07\x00" + d[8:], "stream v7"),
        (lambda d: d + b"\x00", "checksum"),
    ],
)
def test_load_rejects_corrupt_files(tmp_path, corrupt, match):
    path = tmp_path / "h.fkh"
    path.write_bytes(corrupt(small_file()))
    with pytest.raises(ValueError, match=match):
        History.load(path)


def test_every_single_bit_flip_is_detected():
    data = small_file()
    for i in range(8 * len(data)):
        flipped = bytearray(data)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(ValueError):
            History.from_bytes(bytes(flipped))


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["alpha", "decay"])
def test_load_rejects_non_finite_coefficients_even_with_a_valid_checksum(bad, field):
    body = small_file()[:-4]
    value = struct.pack("<f", 0.5 if field == "alpha" else 0.96875)
    assert body.count(value) == 1
    with pytest.raises(ValueError, match=r"entry 0: coefficient or decay .* not a finite float32"):
        History.from_bytes(with_crc(body.replace(value, struct.pack("<f", bad))))


def test_apply_validates_every_entry_before_touching_any_weight():
    opt = train(make_params(), 6)
    good = opt.history.entries[4]
    opt.history.entries[4] = good._replace(alphas=((math.nan,),))  # bypassing add()
    target = make_params()
    before = target.state()
    with pytest.raises(ValueError, match="entry 4: coefficient"):
        opt.history.apply_(target)
    opt.history.entries[4] = good._replace(perturbed=False)  # breaks the fused chain
    with pytest.raises(ValueError, match=r"entry 3 fused seed .* but entry 4 does not start perturbed"):
        opt.history.apply_(target)
    assert all(torch.equal(a, b) for a, b in zip(target.tensors, before))


def test_apply_refuses_other_params_before_touching_them():
    opt = train(make_params(), 3)
    other = ParamSet([("w0", torch.randn(9, 7)), ("b", torch.randn(5))])
    before = other.state()
    with pytest.raises(ValueError, match=r"tensor 1 is 'b0.bias' \(13,\) float32 in the history but 'b' \(5,\)"):
        opt.history.apply_(other)
    assert all(torch.equal(a, b) for a, b in zip(other.tensors, before))


def test_record_validates():
    h = History()
    with pytest.raises(ValueError):
        h.record(-1, 0.1)
    with pytest.raises(ValueError, match="finite"):
        h.record(1, math.inf)
    with pytest.raises(ValueError, match="fingerprint"):
        History(fingerprint="abc")
    with pytest.raises(ValueError, match="probe seeds but the history has no eps"):
        h.add(Entry((1,), (1,), ((0.5,),), (1.0,)))
    with pytest.raises(ValueError, match="entry 0 starts perturbed"):
        History(eps=1e-3).add(Entry((1,), (1,), ((0.5,),), (1.0,), perturbed=True))
    assert len(h) == 0


# -------------------------------------------------------------------------- format 1 still read
def v1_file(pset: ParamSet, eps: float | None, records, dist_tag: int = 0) -> bytes:
    """A format-1 file, written from docs/formats.md#history by hand."""
    flags = 1 | (2 if eps is not None else 0)
    header = struct.pack(
        "<4sHHBB32sdQQ", b"FKSH", 1, 1, dist_tag, flags, bytes.fromhex(pset.fingerprint()), eps or 0.0, 0, len(records)
    )
    return header + b"".join(struct.pack("<Qff", *r) for r in records)


def naive_pass(pset: ParamSet, seed: int, alpha: float, decay: float | None = None) -> None:
    for x, offset, flag in zip(pset.tensors, pset.offsets, pset.decay_mask):
        y = x.reshape(-1).float()
        if decay is not None and flag:
            y = y * torch.tensor(decay, dtype=torch.float32)
        z = reference.noise(seed, x.numel(), offset, "gaussian")
        x.copy_((y + torch.tensor(alpha, dtype=torch.float32) * z).to(x.dtype).reshape(x.shape))


def test_format_1_files_replay_as_they_were_trained():
    """Format 1 restored every tensor with eps*d + alpha (decay on decayed tensors only): its
    files replay with that arithmetic, bit for bit against a naive replay."""
    eps, records = 1e-3, [(11, -0.25, 1.0), (12, 0.125, 0.96875), (13, 0.0, 1.0)]
    pset, naive = make_params(), make_params()
    h = History.from_bytes(v1_file(pset, eps, records))
    assert h.legacy and h.eps == eps and h.layout is None and len(h) == 3
    h.apply_(pset)
    for seed, alpha, decay in records:
        naive_pass(naive, seed, eps)
        naive_pass(naive, seed, -2 * eps)
        naive_pass(naive, seed, eps * decay + alpha, decay if decay != 1.0 else None)
    assert all(torch.equal(a, b) for a, b in zip(pset.tensors, naive.tensors))
    merged = History.from_bytes(v1_file(pset, None, [(7, 0.5, 1.0)]))
    merged.apply_(pset)
    naive_pass(naive, 7, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(pset.tensors, naive.tensors))
    assert History.from_bytes(h.to_bytes()) == h  # re-saved as format 2, still legacy
    with pytest.raises(ValueError, match="fingerprint"):
        h.apply_(ParamSet([("w", torch.randn(3))]))


def test_format_1_example_of_the_docs_reads():
    example = bytes.fromhex(
        "464b5348 0100 0100 00 03"
        + "cd" * 32
        + "fca9f1d24d62503f"
        + "00" * 8
        + "0100000000000000"
        + "7b00000000000000 000000bf 0000803f"
    )
    h = History.from_bytes(example)
    assert (h.eps, h.fingerprint, h.entries) == (1e-3, "cd" * 32, [Entry((123,), (123,), ((-0.5,),), (1.0,))])
