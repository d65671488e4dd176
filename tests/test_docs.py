"""The normative docs cannot drift from the code: their known-answer tables are recomputed from the
reference, and every `docs/X.md#anchor` cited anywhere in the repository resolves."""

from __future__ import annotations

import pathlib
import re
import struct

import pytest
import torch

from fedkseed import reference as R
from fedkseed import seeds

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPEC = (ROOT / "docs" / "stream-spec.md").read_text()
SEEDS_DOC = (ROOT / "docs" / "seed-derivation.md").read_text()
SEED_NAMES = {"`0`": 0, "`1`": 1, "`0x0123456789ABCDEF`": 0x0123456789ABCDEF, "`2^64 - 1`": 2**64 - 1}


def _bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end)]


def test_philox_words_table():
    rows = re.findall(r"^\| (`[^`]+`) \| (\d) \| `([0-9a-f ]+)` \| `([0-9a-f ]+)` \|$", SPEC, re.M)
    assert len(rows) >= 4
    for seed, tag, block0, block1 in rows:
        words = R.philox(SEED_NAMES[seed], torch.tensor([0, 1]), int(tag))
        for block, expected in ((0, block0), (1, block1)):
            assert [int(w[block]) for w in words] == [int(v, 16) for v in expected.split()], (seed, tag, block)


def test_gaussian_table():
    rows = re.findall(r"^\| (`[^`]+`) \|(.*)$", _section(SPEC, "Gaussian `z(s, i)`", "Rademacher `z(s, i)`"), re.M)
    checked = 0
    for seed, cells in rows:
        if seed not in SEED_NAMES:
            continue
        for i, value in enumerate(re.findall(r"`([0-9a-f]{8})`", cells)):
            assert _bits(R.noise(SEED_NAMES[seed], 1, i).item()) == int(value, 16), (seed, i)
            checked += 1
    assert checked >= 8


def test_rademacher_table():
    section = _section(SPEC, "Rademacher `z(s, i)`", "Large indices")
    rows = re.findall(r"^\| (`[^`]+`) \| ([+-]) \| ([+-]) \| ([+-]) \| ([+-]) \| ([+-]) \| ([+-]) \|$", section, re.M)
    assert rows
    for seed, *signs in rows:
        for i, sign in zip([0, 1, 31, 32, 127, 128], signs):
            assert R.noise(SEED_NAMES[seed], 1, i, "rademacher").item() == (1.0 if sign == "+" else -1.0)


def test_large_index_table():
    section = _section(SPEC, "Large indices", "Building blocks")
    rows = re.findall(r"^\| `([^`]+)` \| `([0-9a-f]{8})` \([^)]*\) \| ([+-]) \|$", section, re.M)
    assert rows
    for index_text, gaussian, sign in rows:
        index = _index(index_text)
        assert _bits(R.noise(42, 1, index).item()) == int(gaussian, 16), index_text
        assert R.noise(42, 1, index, "rademacher").item() == (1.0 if sign == "+" else -1.0), index_text


def _index(text: str) -> int:
    """'2^63 + 5' style index expressions of the tables."""
    total = 0
    for sign, term in re.findall(r"([+-]?)\s*([^+-]+)", text.replace(" ", "")):
        base, _, exp = term.partition("^")
        value = int(base) ** int(exp) if exp else int(base)
        total += -value if sign == "-" else value
    return total


def test_conversion_table():
    section = _section(SPEC, "Narrowing conversion (float32", "Stochastic rounding: ")
    f32, f16 = r"`([0-9a-f]{8})`(?: / `([0-9a-f]{8})`)?", r"`([0-9a-f]{4})`(?: / `([0-9a-f]{4})`)?"
    pattern = rf"^\| {f32} \| {f16} \| {f16} \|"
    rows = re.findall(pattern, section, re.M)
    assert len(rows) >= 10
    for x1, x2, b1, b2, h1, h2 in rows:
        for x, bf16, fp16 in ((x1, b1, h1), (x2, b2, h2)):
            if not x:
                continue
            value = torch.tensor([int(x, 16)], dtype=torch.int64).to(torch.int32).view(torch.float32)
            assert R.f32_to_bf16_bits(value).item() == int(bf16, 16), x
            assert R.f32_to_f16_bits(value).item() == int(fp16, 16), x


def test_projection_table():
    inputs = {
        "A": ([((torch.arange(10000) % 13 - 6).float() / 8)], [0]),
        "B": ([torch.ones(5000, dtype=torch.bfloat16)], [2**32 - 1000]),
    }
    section = SPEC[SPEC.index('<a id="projection"></a>') :]
    rows = re.findall(r"^\| ([AB]) \| (gaussian|rademacher) \| (`[^`]+`) \| `([0-9a-f]{16})` \|", section, re.M)
    assert len(rows) >= 8
    for name, dist, seed, expected in rows:
        tensors, offsets = inputs[name]
        value = R.project(tensors, offsets, [SEED_NAMES[seed]], dist).item()
        assert struct.unpack("<Q", struct.pack("<d", value))[0] == int(expected, 16), (name, dist, seed)


def test_derive_seed_table():
    rows = re.findall(r"^\| `derive_seed\(([^`]*)\)`[^|]*\| `(0x[0-9a-f]+)` \|$", SEEDS_DOC, re.M)
    assert len(rows) >= 8
    for args, expected in rows:
        domain, *words = (a.strip() for a in args.split(","))
        assert seeds.derive_seed(domain.strip("\"'"), *(_index(w) for w in words)) == int(expected, 16), args


def test_every_domain_is_documented():
    for name, person in seeds.DOMAINS.items():
        assert f"`{name}`" in SEEDS_DOC and person.decode() in SEEDS_DOC, name


def _anchors(markdown: str) -> set[str]:
    explicit = set(re.findall(r'<a id="([^"]+)"', markdown))
    headings = {
        re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.*)$", markdown, re.M)
    }
    return explicit | headings


SOURCES = ("*.py", "*.md", "fedkseed/**/*.py", "csrc/**/*.*", "tests/*.py", "tools/*.py", "benchmarks/*.py", "docs/*")
CITED = sorted(
    {
        (str(path.relative_to(ROOT)), doc, anchor)
        for pattern in SOURCES
        for path in ROOT.glob(pattern)
        if path.is_file()
        for doc, anchor in re.findall(r"docs/([a-z-]+\.md)#([A-Za-z0-9_-]+)", path.read_text(errors="replace"))
    }
)


@pytest.mark.parametrize(("source", "doc", "anchor"), CITED)
def test_cited_anchor_exists(source, doc, anchor):
    target = ROOT / "docs" / doc
    assert target.exists(), f"{source} cites missing docs/{doc}"
    assert anchor in _anchors(target.read_text()), f"{source} cites docs/{doc}#{anchor}, which has no such anchor"
