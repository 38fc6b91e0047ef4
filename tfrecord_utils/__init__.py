"""TFRecord files of token sequences (written and read without TensorFlow), index files, and the batch loader.

    records.py  TFRecord framing + tf.train.Example codec, token records, index files
    loader.py   TFRecordLoader: batches {"tokens", "loss_mask"} [GA, B, seq+1] with exactly resumable state
    build.py    text files -> packed token sequences (+ completion loss mask) -> one .tfrecords file + index
"""
from tfrecord_utils.loader import TFRecordLoader
from tfrecord_utils.records import (MASK_KEY, TEXT_KEY, IndexEntry, RecordFormatError, TFRecordWriter,
                                    check_entries_exist, decode_example, encode_example, parse_token_example,
                                    read_index, read_token_records, read_tfrecord, token_example, write_index,
                                    write_token_records)

__all__ = [
    "TFRecordLoader", "MASK_KEY", "TEXT_KEY", "IndexEntry", "RecordFormatError", "TFRecordWriter",
    "check_entries_exist", "decode_example", "encode_example", "parse_token_example", "read_index",
    "read_token_records", "read_tfrecord", "token_example", "write_index", "write_token_records",
]
