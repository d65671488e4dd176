"""The FedKSeed wire format: uploads, downloads and the delta file, as compact checked bytes
(normative description: docs/formats.md#wire).

Every message is framed the same way (little-endian throughout)::

    "FKS" | kind (1 B: "U" upload, "P" per-step upload, "D" download, "T" seed table / delta
    file) | u8 version | body | u32 CRC-32 of everything before it

(fields and framing through :mod:`fedkseed.binio`), and the decoder checks magic, kind,
version, CRC and that the body ends exactly where the CRC begins, so a truncated, padded or
corrupted message is rejected (``WireError``) before any of it is used. Integers in bodies are
unsigned LEB128 varints. Decoders take the K the reader expects and refuse another before
reading further, refuse a step count above ``MAX_STEPS``, and allocate only in proportion to
the message's length: no field can make them reserve memory the bytes do not back. A decoder's
peak memory is a small multiple of the message (index sets and schedules are decoded in
fixed-size chunks; tests/fed/test_fuzz.py measures it).

Bodies (``index set`` and ``values`` are defined below):

    upload    client id | round | K | steps | f32 mean train loss | index set | values
    per-step  client id | round | K | steps | f32 mean train loss | skipped steps (index set
    upload      over [0, steps)) | values (one per step, in schedule order; 0 when skipped)
    download  round | since | K | index set | values | n | n schedule indices (bit-packed)
    table     K | u64 pool seed | f32 lr | u8 dist tag | round | 32 B base fingerprint
              | index set | values

An *index set* is a sorted set of seed indices < K in the smallest of four forms: u8 0 +
count + gap varints (sparse), u8 1 + a K-bit bitmap (dense), u8 2 (all K), or, in uploads
only, u8 3: "the distinct seeds of my schedule for this round", which the server derives
itself (a client normally reports every seed it used, so its indices cost nothing). *Values* are
float32 numbers, one per index: u8 0 + raw float32, or u8 1 + i8 exponent e + float16 codes
h with value = float32(h) * 2^e (``quantize``); the encoder refuses values the chosen form
would change, so a decoded value is always bit-identical to the one encoded.
Schedule indices (FedKSeed-Pro: the seed indices the server drew for the client) are packed
with bit_length(K - 1) bits each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .. import binio
from .. import stream as S
from ..checks import check_int

MAGIC = b"FKS"
# The wire version also names the stream its messages replay under: wire version 1 is defined over
# stream v1. A new stream version must come with a new wire version (bumping the stream alone
# fails here, at import), so a reader refuses deltas and messages of another stream.
WIRE_VERSION_OF_STREAM = {1: 1}
VERSION = WIRE_VERSION_OF_STREAM[S.STREAM_VERSION]
KIND_UPLOAD, KIND_STEPS, KIND_DOWNLOAD, KIND_TABLE = b"U", b"P", b"D", b"T"
PRECISIONS = ("fp16", "fp32")
FP16_LIMIT = 32768.0  # largest |value| * 2^-e a float16 code may carry (headroom below 65504)
MAX_K = 1 << 24  # the most candidate seeds a run may have (FedSpec and SeedPool check it too)
# The most local steps a message may count (an upload's steps, a download's Pro schedule): far
# above any real run (the paper's tau is 200), it bounds what a schedule decodes to (8 MiB).
MAX_STEPS = 1 << 20
_CHUNK = 1 << 16  # entries per chunk when unpacking bits (a multiple of 8: chunks start on a byte)
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
MIN_EXPONENT = -126
_VALUES_F32, _VALUES_F16 = 0, 1
_SET_LIST, _SET_BITMAP, _SET_ALL, _SET_SCHEDULE = 0, 1, 2, 3
_DIST_NAMES = {tag: name for name, tag in S.DISTRIBUTIONS.items()}


class WireError(ValueError):
    """A message that is malformed, truncated, corrupted or out of range."""


# ------------------------------------------------------------------------------ quantisation
def fp16_exponent(max_abs: float, floor: int = MIN_EXPONENT) -> int:
    """The smallest e >= ``floor`` with max_abs * 2^-e <= FP16_LIMIT (2^e stays a normal
    float32, so scaling by it is exact)."""
    e = floor if max_abs == 0 else math.ceil(math.log2(max_abs / FP16_LIMIT))
    while max_abs * 2.0**-e > FP16_LIMIT:  # guard log2 rounding
        e += 1
    return max(e, floor)


def quantize(values: np.ndarray, precision: str, exponent: int = 0) -> np.ndarray:
    """float32 values as ``precision`` carries them: fp32 rounds to float32; fp16 rounds
    value * 2^-exponent to float16 (round to nearest even) and scales back, exactly."""
    x = np.asarray(values, dtype=np.float64)
    if precision == "fp32":
        return x.astype(np.float32)
    if precision != "fp16":
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    codes = (x * 2.0**-exponent).astype(np.float16)
    return codes.astype(np.float32) * np.float32(2.0**exponent)


# ------------------------------------------------------------------------------------ frame
class _Writer(binio.Writer):
    """A message of ``kind`` under construction, its frame header written."""

    def __init__(self, kind: bytes) -> None:
        super().__init__(MAGIC, kind, bytes([VERSION]))


def _open(data: object, kinds: bytes, what: str) -> tuple[binio.Reader, bytes]:
    """A reader positioned at the body of a message of one of ``kinds``, and its kind, once its
    magic, kind, version and CRC are checked."""
    r = binio.Reader(data, WireError, what)
    r.open(MAGIC, len(MAGIC) + 2 + binio.CRC.size, "a fedkseed wire message")
    kind = bytes(r.take(1))
    if kind not in [kinds[i : i + 1] for i in range(len(kinds))]:
        raise r.error(f"message kind {kind!r}, expected one of {kinds!r}")
    version = r.u8()
    if version != VERSION:
        raise r.error(f"unsupported version {version} (this build reads {VERSION})")
    r.unseal()
    return r, kind


# ------------------------------------------------------------------------- index sets, values
def _check_k(k: int, what: str, expected: int | None = None) -> int:
    if expected is not None and k != expected:
        raise WireError(f"{what}: K = {k}, the run has K = {expected}")
    if not 1 <= k <= MAX_K:
        raise WireError(f"{what}: K = {k} is outside [1, {MAX_K}]")
    return k


def _expected_k(k: object) -> int:
    return check_int("expected K", k, 1, MAX_K)


def _write_indices(w: _Writer, indices: np.ndarray, k: int, implied: np.ndarray | None = None) -> None:
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx[0] < 0 or idx[-1] >= k or np.any(np.diff(idx) <= 0)):
        raise ValueError("indices must be strictly increasing and in [0, K)")
    if implied is not None and np.array_equal(idx, implied):
        w.raw(bytes([_SET_SCHEDULE]))
        return
    if idx.size == k:
        w.raw(bytes([_SET_ALL]))
        return
    sparse = binio.Writer()
    sparse.varint(int(idx.size))
    previous = -1
    for i in idx.tolist():
        sparse.varint(i - previous - 1)
        previous = i
    listed = sparse.getvalue()
    if len(listed) <= (k + 7) // 8:
        w.raw(bytes([_SET_LIST]) + listed)
    else:
        bits = np.zeros(k, dtype=np.uint8)
        bits[idx] = 1
        w.raw(bytes([_SET_BITMAP]) + np.packbits(bits, bitorder="little").tobytes())


def _check_steps(steps: int, what: str) -> int:
    if steps > MAX_STEPS:
        raise WireError(f"{what}: {steps} steps is more than {MAX_STEPS} (MAX_STEPS)")
    return steps


def _values_follow(r: binio.Reader, count: int, per_index: int = 0) -> None:
    """Refuse ``count`` indices the rest of the message cannot back: their values follow (a form
    byte and at least 2 bytes each), plus ``per_index`` bytes each still to be read."""
    r.need(1 + (2 + per_index) * count)


def _read_indices(r: binio.Reader, k: int, implied: np.ndarray | None = None) -> np.ndarray:
    form = r.u8()
    if form == _SET_SCHEDULE:
        if implied is None:
            raise r.error("refers to a seed schedule the reader does not know")
        return np.asarray(implied, dtype=np.int64)
    if form == _SET_ALL:
        _values_follow(r, k)
        return np.arange(k, dtype=np.int64)
    if form == _SET_BITMAP:
        return _read_bitmap(r, k)
    if form != _SET_LIST:
        raise r.error(f"unknown index-set form {form}")
    count = r.varint()
    if count > k:
        raise r.error(f"{count} indices for K = {k}")
    _values_follow(r, count, per_index=1)  # one gap byte at least per index
    out = np.empty(count, dtype=np.int64)
    previous = -1
    for n in range(count):
        previous += r.varint() + 1
        if previous >= k:
            raise r.error(f"seed index {previous} >= K = {k}")
        out[n] = previous
    return out


def _read_bitmap(r: binio.Reader, k: int) -> np.ndarray:
    """A K-bit bitmap's set indices: counted first (so their values must follow before any
    index is built), then unpacked chunk by chunk into the result."""
    bitmap = np.frombuffer(r.take((k + 7) // 8), dtype=np.uint8)
    if k % 8 and bitmap[-1] >> (k % 8):
        raise r.error(f"bitmap sets bits past K = {k}")
    step = _CHUNK // 8
    count = sum(int(_POPCOUNT[bitmap[i : i + step]].sum(dtype=np.int64)) for i in range(0, bitmap.size, step))
    _values_follow(r, count)
    out = np.empty(count, dtype=np.int64)
    filled = 0
    for i in range(0, bitmap.size, step):
        found = np.flatnonzero(np.unpackbits(bitmap[i : i + step], bitorder="little")) + 8 * i
        out[filled : filled + found.size] = found
        filled += found.size
    return out


def _write_values(w: _Writer, values: np.ndarray, precision: str, exponent: int) -> None:
    v = np.asarray(values, dtype=np.float32)
    if not np.isfinite(v).all():
        raise ValueError("values must be finite")
    if precision == "fp32":
        w.raw(bytes([_VALUES_F32]) + v.astype("<f4").tobytes())
        return
    if not MIN_EXPONENT <= exponent <= 127:
        raise ValueError(f"exponent {exponent} is outside [{MIN_EXPONENT}, 127]")
    codes = (v.astype(np.float64) * 2.0**-exponent).astype(np.float16)
    if not np.array_equal(codes.astype(np.float32) * np.float32(2.0**exponent), v):
        raise ValueError("values are not on the float16 grid of this exponent: quantize() them first")
    w.pack("Bb", _VALUES_F16, exponent)
    w.raw(codes.astype("<f2").tobytes())


def _read_values(r: binio.Reader, count: int) -> np.ndarray:
    form = r.u8()
    if form == _VALUES_F32:
        values = np.frombuffer(r.take(4 * count), dtype="<f4").astype(np.float32)
    elif form == _VALUES_F16:
        (exponent,) = r.unpack("b")
        if exponent < MIN_EXPONENT:
            raise r.error(f"exponent {exponent} < {MIN_EXPONENT}")
        values = np.frombuffer(r.take(2 * count), dtype="<f2").astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught just below
            values *= np.float32(2.0**exponent)  # in place: no second array of the values
    else:
        raise r.error(f"unknown value form {form}")
    if not np.isfinite(values).all():
        raise r.error("non-finite value")
    return values


def _write_packed(w: _Writer, indices: np.ndarray, k: int) -> None:
    width = max(1, (k - 1).bit_length())
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= k):
        raise ValueError("schedule indices must be in [0, K)")
    if idx.size > MAX_STEPS:
        raise ValueError(f"a schedule holds at most {MAX_STEPS} (MAX_STEPS) entries, got {idx.size}")
    w.varint(int(idx.size))
    for start in range(0, idx.size, _CHUNK):  # each chunk is whole bytes: _CHUNK is a multiple of 8
        # each entry's 32 bits LSB first, cut to ``width`` bits: width <= 24 for K <= 2^24
        words = idx[start : start + _CHUNK].astype("<u4").view(np.uint8).reshape(-1, 4)
        bits = np.unpackbits(words, axis=1, bitorder="little")[:, :width]
        w.raw(np.packbits(bits.reshape(-1), bitorder="little").tobytes())


def _read_packed(r: binio.Reader, k: int) -> np.ndarray:
    width = max(1, (k - 1).bit_length())
    count = _check_steps(r.varint(), f"{r.what}: schedule")
    raw = np.frombuffer(r.take((count * width + 7) // 8), dtype=np.uint8)
    out = np.empty(count, dtype=np.int64)
    for start in range(0, count, _CHUNK):  # chunk starts are whole bytes: _CHUNK is a multiple of 8
        n = min(_CHUNK, count - start)
        chunk = raw[start * width // 8 : ((start + n) * width + 7) // 8]
        bits = np.unpackbits(chunk, bitorder="little")[: n * width].reshape(n, width)
        words = np.zeros((n, 32), dtype=np.uint8)
        words[:, :width] = bits
        out[start : start + n] = np.packbits(words, axis=1, bitorder="little").view("<u4").reshape(n)
    if count and out.max() >= k:
        raise r.error(f"schedule index {int(out.max())} >= K = {k}")
    return out


# -------------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class Upload:
    """A client's round result: per-seed sums of its projected gradients."""

    client_id: int
    round: int
    k: int
    steps: int
    loss: float  # mean training loss over the steps (NaN when every step was skipped)
    indices: np.ndarray  # int64, strictly increasing, < k
    values: np.ndarray  # float32, finite, one per index


@dataclass(frozen=True)
class StepUpload:
    """A FedKSeed-Pro client's round result: the projected gradient g of every local step, in
    the order of the schedule the server drew (which names each step's seed)."""

    client_id: int
    round: int
    k: int
    steps: int
    loss: float  # mean training loss over the steps (NaN when every step was skipped)
    skipped: np.ndarray  # int64 step indices whose loss was not finite: they record nothing
    values: np.ndarray  # float32[steps], finite; 0 at skipped steps


@dataclass(frozen=True)
class Download:
    """What a client needs before training in ``round``: the seed-table entries that changed
    after round ``since`` (the table state it holds), and the Pro schedule when there is one."""

    round: int
    since: int
    k: int
    indices: np.ndarray
    values: np.ndarray
    schedule: np.ndarray  # int64 seed indices, one per local step; empty: the client draws


@dataclass(frozen=True)
class Table:
    """The delta file: the whole published seed table and what it is relative to."""

    k: int
    pool_seed: int
    lr: float  # float32 value
    dist: str
    round: int
    fingerprint: str  # ParamSet.fingerprint() of the base model (hex sha256)
    indices: np.ndarray
    values: np.ndarray


def encode_upload(u: Upload, precision: str = "fp16", implied: np.ndarray | None = None) -> bytes:
    """The upload message; fp16 quantises the values (the decoded ones are what counts).
    ``implied``: the sorted distinct seeds of the client's schedule (its indices then take one
    byte when they are exactly those)."""
    values = np.asarray(u.values, dtype=np.float64)
    if len(values) != len(u.indices):
        raise ValueError(f"{len(u.indices)} indices but {len(values)} values")
    w = _Writer(KIND_UPLOAD)
    _write_header(w, u)
    _write_indices(w, u.indices, u.k, implied)
    _write_quantized(w, values, precision)
    return w.sealed()


def encode_step_upload(u: StepUpload, precision: str = "fp16") -> bytes:
    """The per-step upload message (kind "P"): one value per step in schedule order."""
    values = np.asarray(u.values, dtype=np.float64)
    if len(values) != u.steps:
        raise ValueError(f"{u.steps} steps but {len(values)} values")
    skipped = np.asarray(u.skipped, dtype=np.int64)
    if np.any(values[skipped] != 0):
        raise ValueError("a skipped step must carry the value 0")
    w = _Writer(KIND_STEPS)
    _write_header(w, u)
    _write_indices(w, skipped, u.steps)
    _write_quantized(w, values, precision)
    return w.sealed()


def _write_header(w: _Writer, u: Upload | StepUpload) -> None:
    for value in (u.client_id, u.round, u.k, u.steps):
        w.varint(value)
    w.pack("f", u.loss)


def _write_quantized(w: _Writer, values: np.ndarray, precision: str) -> None:
    exponent = 0
    if precision == "fp16":
        exponent = fp16_exponent(float(np.abs(values).max()) if values.size else 0.0)
    _write_values(w, quantize(values, precision, exponent), precision, exponent)


def decode_upload(data: bytes, k: int, schedules: Mapping[int, np.ndarray] | None = None) -> Upload | StepUpload:
    """An upload of either kind ("U": per-seed sums, "P": per-step values) for a run with
    ``k`` seeds. ``schedules``: client id -> that client's seed schedule this round, for "U"
    uploads that refer to it (index-set form 3)."""
    k = _expected_k(k)
    r, kind = _open(data, KIND_UPLOAD + KIND_STEPS, "upload")
    client_id, round_, k_sent, steps = (r.varint() for _ in range(4))
    _check_k(k_sent, "upload", k)
    _check_steps(steps, "upload")
    (loss,) = r.unpack("f")
    if kind == KIND_STEPS:
        r.need(2 * steps)  # the values: 2 bytes per step at least
        skipped = _read_indices(r, steps) if steps else _read_empty_set(r)
        values = _read_values(r, steps)
        r.done()
        if np.any(values[skipped] != 0):
            raise r.error("a skipped step carries a non-zero value")
        return StepUpload(client_id, round_, k, steps, loss, skipped, values)
    schedule = schedules.get(client_id) if schedules is not None else None
    indices = _read_indices(r, k, None if schedule is None else np.unique(schedule))
    values = _read_values(r, len(indices))
    r.done()
    return Upload(client_id, round_, k, steps, loss, indices, values)


def _read_empty_set(r: binio.Reader) -> np.ndarray:
    """The index set over zero steps (what a writer emits for an empty range: form 2, "all")."""
    form = r.u8()
    if form not in (_SET_ALL, _SET_LIST) or (form == _SET_LIST and r.varint() != 0):
        raise r.error("a set over zero steps must be empty")
    return np.zeros(0, dtype=np.int64)


def encode_download(d: Download, precision: str, exponent: int) -> bytes:
    """The download message; ``values`` must already be on ``precision``'s grid."""
    w = _Writer(KIND_DOWNLOAD)
    for value in (d.round, d.since, d.k):
        w.varint(value)
    _write_indices(w, d.indices, d.k)
    _write_values(w, d.values, precision, exponent)
    _write_packed(w, d.schedule, d.k)
    return w.sealed()


def decode_download(data: bytes, k: int) -> Download:
    """A download for a run with ``k`` seeds."""
    k = _expected_k(k)
    r, _ = _open(data, KIND_DOWNLOAD, "download")
    round_, since, k_sent = (r.varint() for _ in range(3))
    _check_k(k_sent, "download", k)
    if since >= round_:
        raise r.error(f"since = {since} must precede round = {round_}")
    indices = _read_indices(r, k)
    values = _read_values(r, len(indices))
    schedule = _read_packed(r, k)
    r.done()
    return Download(round_, since, k, indices, values, schedule)


def encode_table(t: Table, precision: str, exponent: int) -> bytes:
    w = _Writer(KIND_TABLE)
    w.varint(t.k)
    w.pack("QfB", t.pool_seed, t.lr, S.dist_tag(t.dist))
    w.varint(t.round)
    w.raw(bytes.fromhex(t.fingerprint))
    _write_indices(w, t.indices, t.k)
    _write_values(w, t.values, precision, exponent)
    return w.sealed()


def decode_table(data: bytes, k: int | None = None) -> Table:
    """The seed table / delta file; ``k``: the K the reader expects (None: any valid K, the
    allocation still bounded by the message's length)."""
    r, _ = _open(data, KIND_TABLE, "delta")
    k = _check_k(r.varint(), "delta", None if k is None else _expected_k(k))
    pool_seed, lr = r.unpack("Qf")
    if not (math.isfinite(lr) and lr > 0):
        raise r.error(f"lr = {lr!r} must be finite and > 0")
    tag = r.u8()
    if tag not in _DIST_NAMES:
        raise r.error(f"unknown distribution tag {tag}")
    round_ = r.varint()
    fingerprint = bytes(r.take(32)).hex()
    indices = _read_indices(r, k)
    values = _read_values(r, len(indices))
    r.done()
    return Table(k, pool_seed, lr, _DIST_NAMES[tag], round_, fingerprint, indices, values)


def dense(indices: Sequence[int] | np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """The K-entry float32 table holding ``values`` at ``indices`` and 0 elsewhere."""
    table = np.zeros(k, dtype=np.float32)
    table[np.asarray(indices, dtype=np.int64)] = values
    return table
