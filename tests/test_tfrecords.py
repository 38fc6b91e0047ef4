"""TFRecord codec (vs real TensorFlow, both ways), index files, and TFRecordLoader (shapes, wrap-around, one
validation pass, exact resume, clear errors)."""
import json
import logging
import os

import numpy as np
import pytest

from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (pytest fixtures; tests/ is on sys.path)
from tfrecord_utils import records as R
from tfrecord_utils.loader import TFRecordLoader

EDGE_VALUES = [0, 1, 127, 128, 255, 256, 16383, 16384, 50256, 2**31 - 1, 2**40, 2**63 - 1, -1, -128, -2**63]


@pytest.fixture(scope="module")
def tf():
    try:
        import tensorflow as tf
    except Exception as e:  # ImportError, or a broken install
        pytest.skip(f"tensorflow not importable ({type(e).__name__}: {e}); the TF cross-checks need it")
    return tf


# ---------------------------------------------------------------------------------------------------------------
# Codec
# ---------------------------------------------------------------------------------------------------------------
def test_crc32c_known_value_and_python_fallback_agree():
    assert R.crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    data = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    assert R.crc32c_python(data) == R.crc32c(data)
    assert R.crc32c_python(b"") == R.crc32c(b"") == 0


def test_example_roundtrip_edge_values():
    feats = {"text": EDGE_VALUES, "loss_mask": [i % 2 for i in range(len(EDGE_VALUES))], "empty": []}
    out = R.decode_example(R.encode_example(feats))
    assert sorted(out) == ["empty", "loss_mask", "text"]
    for k, v in feats.items():
        assert out[k].dtype == np.int64
        np.testing.assert_array_equal(out[k], np.asarray(v, dtype=np.int64))


def test_token_example_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="loss_mask has 2 values but tokens has 3"):
        R.token_example([1, 2, 3], [1, 1])


def _write_ours(path, rows, masks=None):
    return R.write_token_records(path, rows, masks)


def test_ours_is_byte_identical_to_tensorflow_serialization(tf):
    tokens, mask = EDGE_VALUES, [1] * len(EDGE_VALUES)
    ex = tf.train.Example(features=tf.train.Features(feature={
        "text": tf.train.Feature(int64_list=tf.train.Int64List(value=tokens)),
        "loss_mask": tf.train.Feature(int64_list=tf.train.Int64List(value=mask))}))
    assert R.token_example(tokens, mask) == ex.SerializeToString(deterministic=True)


def test_ours_written_tensorflow_reads(tf, tmp_path):
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 50400, 33) for _ in range(5)] + [np.asarray(EDGE_VALUES)]
    masks = [rng.integers(0, 2, len(r)) for r in rows]
    for with_mask in (True, False):
        path = str(tmp_path / f"ours_{with_mask}.tfrecords")
        assert _write_ours(path, rows, masks if with_mask else None) == len(rows)
        got = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
        assert len(got) == len(rows)
        for ex, row, m in zip(got, rows, masks):
            feat = ex.features.feature
            assert list(feat["text"].int64_list.value) == [int(x) for x in row]
            if with_mask:
                assert list(feat["loss_mask"].int64_list.value) == [int(x) for x in m]
            else:
                assert "loss_mask" not in feat


def test_tensorflow_written_ours_reads(tf, tmp_path):
    rng = np.random.default_rng(2)
    rows = [rng.integers(0, 50400, 17).tolist() for _ in range(4)] + [EDGE_VALUES]
    path = str(tmp_path / "tf.tfrecords")
    with tf.io.TFRecordWriter(path) as w:
        for i, row in enumerate(rows):
            feature = {"text": tf.train.Feature(int64_list=tf.train.Int64List(value=row)),
                       "other": tf.train.Feature(float_list=tf.train.FloatList(value=[0.5, 2.0])),
                       "name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"doc", b""]))}
            if i % 2 == 0:
                mask = [int(i % 3 == 0)] * len(row)
                feature["loss_mask"] = tf.train.Feature(int64_list=tf.train.Int64List(value=mask))
            w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    got = list(R.read_token_records(path))
    assert len(got) == len(rows)
    for i, ((tokens, mask), row) in enumerate(zip(got, rows)):
        assert tokens.tolist() == row
        if i % 2 == 0:
            assert mask.tolist() == [int(i % 3 == 0)] * len(row)
        else:
            assert mask is None
    full = R.decode_example(next(iter(R.read_tfrecord(path))))  # other feature kinds decode too
    assert full["other"].tolist() == [0.5, 2.0] and full["name"] == [b"doc", b""]


def _unpacked_example(values):
    """Example{text: Int64List with UNPACKED values} built by hand (one key-0x08 varint per value)."""
    int64_list = b"".join(R._varint(0x08) + R._varint(v & (2**64 - 1)) for v in values)
    feature = R._len_field(3, int64_list)
    entry = R._len_field(1, b"text") + R._len_field(2, feature)
    return R._len_field(1, R._len_field(1, entry))


def test_unpacked_int64_lists_are_accepted(tf):
    data = _unpacked_example([5, 300, -7, 2**62])
    assert R.decode_example(data)["text"].tolist() == [5, 300, -7, 2**62]
    assert list(tf.train.Example.FromString(data).features.feature["text"].int64_list.value) == [5, 300, -7, 2**62]


def test_corrupt_and_truncated_files_are_reported(tmp_path):
    path = str(tmp_path / "x.tfrecords")
    _write_ours(path, [[1, 2, 3]] * 3)
    raw = bytearray(open(path, "rb").read())
    one = len(raw) // 3
    bad = bytearray(raw)
    bad[one + 14] ^= 0xFF  # a data byte of record 1
    open(path, "wb").write(bytes(bad))
    with pytest.raises(R.RecordFormatError, match=r"record 1 \(0-based\): data CRC mismatch"):
        list(R.read_tfrecord(path))
    assert len(list(R.read_tfrecord(path, verify=False))) == 3
    open(path, "wb").write(bytes(raw[:-2]))
    with pytest.raises(R.RecordFormatError, match=r"record 2 \(0-based\): truncated"):
        list(R.read_tfrecord(path))


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "a.tfrecords"
    with pytest.raises(RuntimeError):
        with R.TFRecordWriter(path) as w:
            w.write(R.token_example([1, 2]))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temp file


def test_index_resolution(tmp_path):
    (tmp_path / "sub").mkdir()
    idx = tmp_path / "sub" / "data.index"
    idx.write_text("a.tfrecords\n\n../b.tfrecords\n/abs/c.tfrecords\ngs://bucket/d.tfrecords\n")
    entries = R.read_index(idx)
    assert [e.path for e in entries] == [str(tmp_path / "sub" / "a.tfrecords"), str(tmp_path / "b.tfrecords"),
                                         "/abs/c.tfrecords", "gs://bucket/d.tfrecords"]
    assert [e.line for e in entries] == [1, 3, 4, 5]
    assert R.resolve_entry("gs://bucket/x/y.index", "z.tfrecords") == "gs://bucket/x/z.tfrecords"


# ---------------------------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------------------------
SEQ = 7


def _dataset(tmp_path, sizes=(5, 3), masked=(False, True)):
    """Files of records whose first token is a global record id (0, 1, 2, ...); returns the index path."""
    names, gid = [], 0
    for f, (n, with_mask) in enumerate(zip(sizes, masked)):
        rows = [[gid + r] + [f * 1000 + r] * SEQ for r in range(n)]
        masks = [[0] * 3 + [1] * (SEQ - 2) for _ in range(n)] if with_mask else None
        gid += n
        name = f"part{f}_{n}.tfrecords"
        R.write_token_records(tmp_path / name, rows, masks)
        names.append(name)
    R.write_index(tmp_path / "data.index", names)
    return str(tmp_path / "data.index")


def _ids(batch):
    return batch["tokens"][..., 0].ravel().tolist()


def test_loader_shapes_and_masks(tmp_path):
    index = _dataset(tmp_path)
    loader = TFRecordLoader(index, batch_shape=(2, 3), seq=SEQ)
    b = next(loader)
    assert b["tokens"].shape == b["loss_mask"].shape == (2, 3, SEQ + 1)
    assert b["tokens"].dtype == b["loss_mask"].dtype == np.int32
    assert _ids(b) == [0, 1, 2, 3, 4, 5]
    assert (b["loss_mask"].reshape(6, -1)[:5] == 1).all()  # file 0 has no mask: all ones
    assert b["loss_mask"].reshape(6, -1)[5].tolist() == [0] * 3 + [1] * (SEQ - 2)  # file 1's mask
    assert TFRecordLoader(index, batch_shape=4).get_samples()["tokens"].shape == (4, SEQ + 1)  # seq inferred


def test_loader_train_wraps_around_forever(tmp_path):
    loader = TFRecordLoader(_dataset(tmp_path), batch_shape=(1, 3), seq=SEQ, train=True)
    got = [i for _ in range(6) for i in _ids(next(loader))]
    assert got == [i % 8 for i in range(18)]  # 8 records, batches span files and epochs
    assert loader.get_state()["epoch"] == 2


def test_loader_validation_single_pass(tmp_path, caplog):
    loader = TFRecordLoader(_dataset(tmp_path), batch_shape=(3,), seq=SEQ, train=False)
    with caplog.at_level(logging.INFO, logger="tfrecord_utils.loader"):
        batches = list(loader)
    assert [_ids(b) for b in batches] == [[0, 1, 2], [3, 4, 5]]
    assert "dropping the incomplete last batch (2 of 3 records)" in caplog.text
    with pytest.raises(StopIteration):
        next(loader)
    loader.reset()
    assert _ids(next(loader)) == [0, 1, 2]


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_resume_from_state_is_exact(tmp_path, shuffle):
    index = _dataset(tmp_path, sizes=(5, 3, 4), masked=(False, True, False))
    kw = dict(batch_shape=(1, 3), seq=SEQ, shuffle=shuffle, shuffle_buffer=2, seed=3)
    reference = TFRecordLoader(index, **kw)
    stream = [next(reference) for _ in range(14)]  # > 3 epochs of 12 records
    if shuffle:
        assert [i for b in stream[:4] for i in _ids(b)] != list(range(12))
        assert sorted(i for b in stream[:4] for i in _ids(b)) == list(range(12))
    for k in range(0, 10):
        a = TFRecordLoader(index, **kw)
        for _ in range(k):
            next(a)
        state = json.loads(json.dumps(a.get_state()))  # as it is stored in meta.json
        b = TFRecordLoader(index, **kw, state=state)
        for j in range(k, k + 4):
            expect, got = stream[j], next(b)
            np.testing.assert_array_equal(got["tokens"], expect["tokens"])
            np.testing.assert_array_equal(got["loss_mask"], expect["loss_mask"])
    a.set_state({"used": [], "file_idx": 0, "record_idx": 0})
    np.testing.assert_array_equal(next(a)["tokens"], stream[0]["tokens"])


def test_loader_state_contents(tmp_path):
    index = _dataset(tmp_path)
    loader = TFRecordLoader(index, batch_shape=(6,), seq=SEQ)
    next(loader)
    state = loader.get_state()
    assert state == {"used": [str(tmp_path / "part0_5.tfrecords")], "file_idx": 1, "record_idx": 1, "epoch": 0}


def test_loader_accepts_original_state(tmp_path):
    index = _dataset(tmp_path)
    # mesh-transformer-jax resumed after batch `file_idx` of the first unused file
    loader = TFRecordLoader(index, batch_shape=(2,), seq=SEQ, state={"used": [], "file_idx": 0})
    assert _ids(next(loader)) == [2, 3]
    used = [str(tmp_path / "part0_5.tfrecords")]
    loader = TFRecordLoader(index, batch_shape=(1,), seq=SEQ, state={"used": used, "file_idx": 1})
    assert _ids(next(loader)) == [7]


def test_loader_wrong_length_record(tmp_path):
    rows = [[0] * (SEQ + 1), [1] * (SEQ + 1), [2] * (SEQ - 1)]
    R.write_token_records(tmp_path / "bad.tfrecords", rows)
    R.write_index(tmp_path / "bad.index", ["bad.tfrecords"])
    loader = TFRecordLoader(tmp_path / "bad.index", batch_shape=(3,), seq=SEQ)
    with pytest.raises(R.RecordFormatError) as e:
        next(loader)
    msg = str(e.value)
    assert str(tmp_path / "bad.tfrecords") in msg and "record 2 (0-based)" in msg
    assert f"has {SEQ - 1} tokens, expected {SEQ + 1}" in msg


def test_loader_missing_file_names_index_and_line(tmp_path):
    _dataset(tmp_path)
    idx = tmp_path / "broken.index"
    idx.write_text("part0_5.tfrecords\npart1_3.tfrecords\nnot_there.tfrecords\n")
    with pytest.raises(FileNotFoundError) as e:
        TFRecordLoader(idx, batch_shape=(1,))
    msg = str(e.value)
    assert str(idx) in msg and "line 3" in msg and str(tmp_path / "not_there.tfrecords") in msg


def test_loader_empty_index_and_empty_files(tmp_path):
    (tmp_path / "empty.index").write_text("\n\n")
    with pytest.raises(ValueError, match="lists no files"):
        TFRecordLoader(tmp_path / "empty.index", batch_shape=(1,))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TFRecordLoader(tmp_path / "nope.index", batch_shape=(1,))
    R.write_token_records(tmp_path / "none.tfrecords", [])
    R.write_index(tmp_path / "none.index", ["none.tfrecords"])
    with pytest.raises(ValueError, match="hold no records"):
        next(TFRecordLoader(tmp_path / "none.index", batch_shape=(1,), train=True))
    assert list(TFRecordLoader(tmp_path / "none.index", batch_shape=(1,), train=False)) == []


def test_library_does_not_import_tensorflow():
    import subprocess
    import sys

    code = ("import sys, tfrecord_utils, tfrecord_utils.build, tfrecord_utils.loader; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=60)
    assert out.returncode == 0, out.stderr


def test_gcs_paths_roundtrip_and_missing_file(gcs_bucket):
    """gs:// data and index through smart_open (on the local GCS emulator); a missing gs:// file is reported with
    its index line when it is opened."""
    root = f"gs://{gcs_bucket}/data"
    rows = [[r] * (SEQ + 1) for r in range(4)]
    R.write_token_records(f"{root}/part.tfrecords", rows, [[1] * (SEQ + 1)] * 4)
    R.write_index(f"{root}/train.index", ["part.tfrecords"])
    batches = list(TFRecordLoader(f"{root}/train.index", batch_shape=(2,), seq=SEQ, train=False))
    assert [_ids(b) for b in batches] == [[0, 1], [2, 3]]
    R.write_index(f"{root}/broken.index", ["part.tfrecords", "gone.tfrecords"])
    loader = TFRecordLoader(f"{root}/broken.index", batch_shape=(2,), seq=SEQ, train=False)
    assert _ids(next(loader)) == [0, 1]
    next(loader)
    with pytest.raises(FileNotFoundError, match=rf"broken\.index, line 2: cannot read data file {root}/gone"):
        next(loader)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        R.read_index(f"{root}/no.index")
