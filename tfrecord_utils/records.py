"""TFRecord files of token sequences, and index files, without TensorFlow.

mesh-transformer-jax stores training data as TFRecord files holding one `tf.train.Example` per sequence, with an
int64 list feature `"text"` of seq + 1 tokens (inputs `[:-1]`, targets `[1:]`). We add an optional int64 feature
`"loss_mask"` of the same length (1 = a token to learn). TensorFlow is ~1.5 GB and absent on GPU boxes, so this
module writes and reads the two layers by hand; tests check both directions against real TensorFlow.

TFRecord framing (tensorflow/core/lib/io/record_writer.cc), little-endian, per record:
    uint64 length | uint32 masked_crc32c(length bytes) | data[length] | uint32 masked_crc32c(data)
    masked_crc32c(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8   (mod 2**32; crc32c is Castagnoli)

The protobuf messages we need (tensorflow/core/example/{example,feature}.proto), with field numbers:
    Example   { Features features = 1; }
    Features  { map<string, Feature> feature = 1; }   a map is a repeated entry message { key = 1; value = 2; }
    Feature   { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    Int64List { repeated int64 value = 1 [packed = true]; }
Wire format: every field is a varint key `(field_number << 3) | wire_type`, then its value; wire types are 0 varint,
1 fixed64, 2 length-delimited (varint length + bytes), 5 fixed32. int64 values are varints (negatives take 10 bytes).
We write packed int64 lists (as TF does); the reader also accepts unpacked ones, and decodes float/bytes lists.

Index files: one data-file path per line; relative paths are relative to the index file's folder; absolute paths and
URLs (`gs://...`) are taken as they are. Files open through `smart_open`, so `gs://` works wherever it is installed.
"""
from __future__ import annotations

import logging
import os
import posixpath
import re
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import smart_open

log = logging.getLogger(__name__)

TEXT_KEY = "text"  # the token feature, as mesh-transformer-jax names it
MASK_KEY = "loss_mask"  # our addition
ArrayLike = Union[Sequence[int], np.ndarray]


class RecordFormatError(ValueError):
    """A TFRecord file or tf.train.Example that is corrupt or not what we expect; the message names file and record."""


# ---------------------------------------------------------------------------------------------------------------
# CRC32C (Castagnoli). google-crc32c (a dependency of google-cloud-storage) is C; the table fallback is ~1 MB/s.
# ---------------------------------------------------------------------------------------------------------------
def _make_crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # 0x82F63B78: the reversed Castagnoli polynomial
        table.append(c)
    return table


_CRC_TABLE = _make_crc_table()


def crc32c_python(data: bytes) -> int:
    """Table-driven CRC32C in pure Python: the fallback, and a cross-check of the C one in tests."""
    crc = 0xFFFFFFFF
    for b in bytes(data):
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


try:
    import google_crc32c

    def crc32c(data: bytes) -> int:
        return google_crc32c.value(bytes(data))
except ImportError:  # pragma: no cover - only where google-crc32c is missing
    crc32c = crc32c_python


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 and add a constant (a CRC of data holding CRCs is weak otherwise)."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------------------
# Protobuf varints
# ---------------------------------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    """One non-negative int as a varint: 7 bits per byte, low bits first, high bit set on all but the last byte."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it) of the varint at buf[pos]; raises on truncation."""
    value = shift = 0
    while pos < end:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise RecordFormatError("varint longer than 10 bytes")
    raise RecordFormatError("truncated varint")


def _encode_packed_int64(values: np.ndarray) -> bytes:
    """Many int64s as concatenated varints, vectorized (a 2049-token record would be ~2k Python calls otherwise)."""
    v = np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)  # negatives: two's complement -> 10 bytes
    nbytes = np.ones(v.shape, dtype=np.int64)
    for k in range(1, 10):  # one byte per started group of 7 bits
        nbytes += (v >> np.uint64(7 * k)) != 0
    starts = np.cumsum(nbytes) - nbytes
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    for k in range(10):
        sel = nbytes > k
        if not sel.any():
            break
        byte = ((v[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        byte |= np.where(nbytes[sel] > k + 1, 0x80, 0).astype(np.uint8)  # continuation bit
        out[starts[sel] + k] = byte
    return out.tobytes()


def _decode_packed_int64(payload: bytes) -> np.ndarray:
    """Concatenated varints -> int64 array, vectorized: a byte < 0x80 ends a varint."""
    b = np.frombuffer(payload, dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, dtype=np.int64)
    if b[-1] & 0x80:
        raise RecordFormatError("truncated packed int64 list")
    ends = np.flatnonzero(b < 0x80)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 10:
        raise RecordFormatError("varint longer than 10 bytes in packed int64 list")
    shift = (np.arange(b.size) - np.repeat(starts, lengths)) * 7  # bit offset of each byte within its varint
    parts = (b & 0x7F).astype(np.uint64) << shift.astype(np.uint64)
    return np.add.reduceat(parts, starts).view(np.int64)  # groups don't overlap, so + is |


# ---------------------------------------------------------------------------------------------------------------
# tf.train.Example
# ---------------------------------------------------------------------------------------------------------------
def _len_field(field: int, payload: bytes) -> bytes:
    """A length-delimited (wire type 2) field."""
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def encode_example(features: Mapping[str, ArrayLike]) -> bytes:
    """Serialize {name: int64 values} as a tf.train.Example (keys sorted, lists packed), as TF's SerializeToString."""
    entries = []
    for key in sorted(features):
        values = np.asarray(features[key])
        if values.ndim != 1 or not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.bool_)
                                    or values.size == 0):
            raise TypeError(f"feature {key!r}: expected a 1-D list of ints, got dtype {values.dtype} "
                            f"shape {values.shape}")
        int64_list = _len_field(1, _encode_packed_int64(values)) if values.size else b""  # empty: field omitted
        feature = _len_field(3, int64_list)  # Feature.int64_list = 3
        entries.append(_len_field(1, _len_field(1, key.encode("utf-8")) + _len_field(2, feature)))  # map entry
    return _len_field(1, b"".join(entries))  # Example.features = 1 { Features.feature = 1 (repeated entries) }


def _iter_fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of each field of the message in buf[start:end].

    value: an int (wire type 0), a (start, end) slice of buf (type 2), or raw bytes (types 1, 5). Types 3/4 (groups,
    long deprecated) are an error.
    """
    pos = start
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos, end)
        elif wire == 2:
            n, pos = _read_varint(buf, pos, end)
            if pos + n > end:
                raise RecordFormatError(f"field {field}: length {n} runs past the end of its message")
            value, pos = (pos, pos + n), pos + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if pos + n > end:
                raise RecordFormatError(f"field {field}: fixed-size value runs past the end of its message")
            value, pos = buf[pos:pos + n], pos + n
        else:
            raise RecordFormatError(f"field {field}: unsupported wire type {wire}")
        yield field, wire, value


def _decode_feature(buf: bytes, start: int, end: int) -> Union[np.ndarray, list]:
    """A Feature message -> int64 array, float32 array, or list of bytes (whichever kind it holds)."""
    result: Union[np.ndarray, list] = np.zeros(0, dtype=np.int64)  # a Feature with no kind set: empty
    for kind, wire, value in _iter_fields(buf, start, end):
        if wire != 2 or kind not in (1, 2, 3):
            continue  # unknown field: skip, as protobuf does
        s, e = value
        if kind == 3:  # Int64List
            chunks, loose = [], []
            for f, w, v in _iter_fields(buf, s, e):
                if f == 1 and w == 2:  # packed
                    chunks.append(_decode_packed_int64(buf[v[0]:v[1]]))
                elif f == 1 and w == 0:  # unpacked: one varint per value; >= 2**63 means negative
                    loose.append(v - (1 << 64) if v >= 1 << 63 else v)
            if loose:
                chunks.append(np.asarray(loose, dtype=np.int64))
            result = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
        elif kind == 2:  # FloatList
            chunks = []
            for f, w, v in _iter_fields(buf, s, e):
                if f == 1 and w == 2:
                    chunks.append(np.frombuffer(buf[v[0]:v[1]], dtype="<f4"))
                elif f == 1 and w == 5:
                    chunks.append(np.frombuffer(v, dtype="<f4"))
            result = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, dtype=np.float32)
        else:  # BytesList
            result = [bytes(buf[v[0]:v[1]]) for f, w, v in _iter_fields(buf, s, e) if f == 1 and w == 2]
    return result


def decode_example(data: bytes) -> dict[str, Union[np.ndarray, list]]:
    """Parse a serialized tf.train.Example -> {name: int64 array | float32 array | list of bytes}."""
    data = bytes(data)
    out: dict[str, Union[np.ndarray, list]] = {}
    for field, wire, value in _iter_fields(data, 0, len(data)):
        if field != 1 or wire != 2:
            continue
        for f, w, entry in _iter_fields(data, *value):  # Features: repeated map entries
            if f != 1 or w != 2:
                continue
            key, feature = "", (0, 0)
            for ef, ew, ev in _iter_fields(data, *entry):
                if ef == 1 and ew == 2:
                    key = data[ev[0]:ev[1]].decode("utf-8")
                elif ef == 2 and ew == 2:
                    feature = ev
            out[key] = _decode_feature(data, *feature)
    return out


def token_example(tokens: ArrayLike, loss_mask: Optional[ArrayLike] = None) -> bytes:
    """One training sequence as a serialized Example: "text" = tokens, and "loss_mask" when given."""
    features = {TEXT_KEY: tokens}
    if loss_mask is not None:
        if len(loss_mask) != len(tokens):
            raise ValueError(f"loss_mask has {len(loss_mask)} values but tokens has {len(tokens)}")
        features[MASK_KEY] = loss_mask
    return encode_example(features)


def parse_token_example(data: bytes, where: str = "record") -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(tokens int64 [n], loss_mask int64 [n] or None) of a serialized Example; `where` names it in errors."""
    try:
        features = decode_example(data)
    except RecordFormatError as e:
        raise RecordFormatError(f"{where}: malformed tf.train.Example: {e}") from None
    if TEXT_KEY not in features:
        raise RecordFormatError(f"{where}: no {TEXT_KEY!r} feature (found {sorted(features)})")
    tokens, mask = features[TEXT_KEY], features.get(MASK_KEY)
    for key, arr in ((TEXT_KEY, tokens), (MASK_KEY, mask)):
        if arr is not None and not (isinstance(arr, np.ndarray) and arr.dtype == np.int64):
            raise RecordFormatError(f"{where}: feature {key!r} is not an int64 list")
    if mask is not None and len(mask) != len(tokens):
        raise RecordFormatError(f"{where}: {MASK_KEY!r} has {len(mask)} values but {TEXT_KEY!r} has {len(tokens)}")
    return tokens, mask


# ---------------------------------------------------------------------------------------------------------------
# TFRecord files
# ---------------------------------------------------------------------------------------------------------------
def is_url(path: str) -> bool:
    return "://" in str(path)


def open_binary(path: str, mode: str = "rb") -> BinaryIO:
    """Open a local path or URL without smart_open's guess-the-compression-from-the-extension.

    A missing file is a FileNotFoundError for URLs too (GCS raises google.api_core's NotFound, a 404)."""
    try:
        return smart_open.open(str(path), mode, compression=smart_open.compression.NO_COMPRESSION)
    except Exception as e:
        if not isinstance(e, FileNotFoundError) and (type(e).__name__ == "NotFound" or getattr(e, "code", 0) == 404):
            raise FileNotFoundError(f"{path} does not exist ({e})") from e
        raise


class TFRecordWriter:
    """Write records to `path`; local files appear atomically (temp file in the same folder, then os.replace).

        with TFRecordWriter(path) as w:
            w.write(token_example(tokens, mask))

    On an exception inside the `with`, a local temp file is removed and `path` is left untouched. URLs (gs://) are
    written through smart_open, which uploads when the file closes.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = os.fspath(path)
        self.n_records = 0
        if is_url(self.path):
            self._tmp = None
            self._f = open_binary(self.path, "wb")
        else:
            folder, base = os.path.split(os.path.abspath(self.path))
            self._tmp = os.path.join(folder, f".{base}.tmp-{os.getpid()}")
            self._f = open(self._tmp, "wb")

    def write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._f.write(header + struct.pack("<I", masked_crc32c(header)))
        self._f.write(record)
        self._f.write(struct.pack("<I", masked_crc32c(record)))
        self.n_records += 1

    def close(self, commit: bool = True) -> None:
        if self._f is None:
            return
        f, self._f = self._f, None
        if self._tmp is None:
            f.close()
            return
        try:
            if commit:
                f.flush()
                os.fsync(f.fileno())
            f.close()
            if commit:
                os.replace(self._tmp, self.path)
        finally:
            if os.path.exists(self._tmp):
                os.remove(self._tmp)

    def __enter__(self) -> "TFRecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(commit=exc_type is None)


def read_tfrecord(path: Union[str, os.PathLike], verify: bool = True) -> Iterator[bytes]:
    """Yield the records of a TFRecord file (local or URL); with `verify`, check both CRCs of every record."""
    path = os.fspath(path)
    with open_binary(path) as f:
        i = 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise RecordFormatError(f"{path}: record {i} (0-based): truncated header ({len(header)} of 12 bytes)")
            (length,), (length_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if verify and masked_crc32c(header[:8]) != length_crc:
                raise RecordFormatError(f"{path}: record {i} (0-based): length CRC mismatch (not a TFRecord file, "
                                        "or corrupt)")
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                raise RecordFormatError(f"{path}: record {i} (0-based): truncated (file ends inside the record)")
            if verify and masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                raise RecordFormatError(f"{path}: record {i} (0-based): data CRC mismatch (corrupt file); rebuild it "
                                        f"with create_finetune_tfrecords.py")
            yield data
            i += 1


def write_token_records(path: Union[str, os.PathLike], sequences: Iterable[ArrayLike],
                        loss_masks: Optional[Iterable[ArrayLike]] = None) -> int:
    """Write one Example per sequence (with a "loss_mask" feature when masks are given); returns the record count."""
    with TFRecordWriter(path) as w:
        masks = iter(loss_masks) if loss_masks is not None else None
        for tokens in sequences:
            w.write(token_example(tokens, next(masks) if masks is not None else None))
        return w.n_records


def read_token_records(path: Union[str, os.PathLike], verify: bool = True
                       ) -> Iterator[tuple[np.ndarray, Optional[np.ndarray]]]:
    """Yield (tokens, loss_mask or None) per record of a file written by `write_token_records` (or by TF)."""
    path = os.fspath(path)
    for i, data in enumerate(read_tfrecord(path, verify=verify)):
        yield parse_token_example(data, where=f"{path}: record {i} (0-based)")


# ---------------------------------------------------------------------------------------------------------------
# Index files
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexEntry:
    path: str  # resolved: relative entries joined to the index file's folder
    line: int  # 1-based line number in the index file, for error messages
    index_path: str


def resolve_entry(index_path: str, entry: str) -> str:
    """An index line -> the path to open: URLs and absolute paths as is, others relative to the index's folder."""
    if is_url(entry) or os.path.isabs(entry):
        return entry
    if is_url(index_path):
        return posixpath.join(posixpath.dirname(index_path), entry)
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(index_path)), entry))


def read_index(index_path: Union[str, os.PathLike]) -> list[IndexEntry]:
    """The entries of an index file (blank lines skipped); raises if it lists nothing."""
    index_path = os.fspath(index_path)
    if not is_url(index_path) and not os.path.isfile(index_path):
        raise FileNotFoundError(f"index file {index_path} does not exist; fix the path (config 'train_set' / "
                                f"'val_set') or make it with create_finetune_tfrecords.py")
    with open_binary(index_path) as f:
        lines = f.read().decode("utf-8").splitlines()
    entries = [IndexEntry(resolve_entry(index_path, line.strip()), n, index_path)
               for n, line in enumerate(lines, start=1) if line.strip()]
    if not entries:
        raise ValueError(f"index file {index_path} lists no files (it should hold one TFRecord path per line)")
    return entries


def check_entries_exist(entries: Sequence[IndexEntry]) -> None:
    """Raise FileNotFoundError naming the index, line and path of the first missing local file. URLs are not
    checked here (that would need a network round trip per file); a missing one fails when it is opened."""
    for e in entries:
        if not is_url(e.path) and not os.path.isfile(e.path):
            raise FileNotFoundError(f"index file {e.index_path}, line {e.line}: data file {e.path} does not exist")


_COUNT_RE = re.compile(r"_(\d+)\.tfrecords$")


def count_records(path: str) -> int:
    """Whole records in a local TFRecord file, from the length headers only (a seek per record); raises
    RecordFormatError naming the file and record when it ends inside a record."""
    size = os.path.getsize(path)
    n = pos = 0
    with open(path, "rb") as f:
        while pos < size:
            header = f.read(12)
            if len(header) < 12:
                raise RecordFormatError(f"{path}: record {n} (0-based): truncated header ({len(header)} of 12 "
                                        f"bytes): the file was cut short; rebuild it (create_finetune_tfrecords.py)")
            (length,) = struct.unpack("<Q", header[:8])
            pos += 12 + length + 4
            if pos > size:
                raise RecordFormatError(f"{path}: record {n} (0-based): truncated (the file ends inside the record): "
                                        f"the file was cut short; rebuild it (create_finetune_tfrecords.py)")
            f.seek(pos)
            n += 1
    return n


def check_record_count(entry: "IndexEntry") -> None:
    """A local data file named `..._{N}.tfrecords` must hold exactly N records (URLs are not checked: that would
    read the whole file)."""
    m = _COUNT_RE.search(os.path.basename(entry.path))
    if is_url(entry.path) or not m or not os.path.isfile(entry.path):
        return
    want = int(m.group(1))
    try:
        got = count_records(entry.path)
    except RecordFormatError as e:
        raise RecordFormatError(f"index file {entry.index_path}, line {entry.line}: {e}") from None
    if got != want:
        raise RecordFormatError(f"index file {entry.index_path}, line {entry.line}: data file {entry.path} holds {got} "
                                f"records but its name says {want}: it was cut short or rewritten; rebuild it "
                                f"with create_finetune_tfrecords.py (or rename it if it is complete)")


def write_index(index_path: Union[str, os.PathLike], paths: Sequence[str]) -> None:
    """Write an index file (one path per line), atomically for local paths."""
    index_path = os.fspath(index_path)
    text = "".join(f"{p}\n" for p in paths)
    if is_url(index_path):
        with smart_open.open(index_path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    folder, base = os.path.split(os.path.abspath(index_path))
    tmp = os.path.join(folder, f".{base}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, index_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
