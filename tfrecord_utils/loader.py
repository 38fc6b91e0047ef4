"""Batches of token sequences from the TFRecord files of an index file, with exactly resumable state.

Follows mesh-transformer-jax's `tfrecord_loader.TFRecordNewInputs` (files in index order, a state of the files used
so far, train loops forever, validation makes one pass), without TensorFlow, and with three changes:
  - records stream across file (and, in training, epoch) boundaries: a batch may take the tail of one file and the
    head of the next, so no record is lost at a file's end (the original reshaped per file and crashed there);
  - the state adds `record_idx`, the records already taken from the current file, so a loader restored from a
    state yields exactly the batches the uninterrupted one would have yielded next;
  - each record may carry a `loss_mask` (all ones when it has none).

Shapes: GA = gradient-accumulation steps, B = sequences per step, T = seq + 1 tokens per record.
A batch is {"tokens": int32 [GA, B, T], "loss_mask": int32 [GA, B, T]}; `batch_shape` may have any number of axes.

State (JSON-able, saved in checkpoints' meta.json as "train_loader"):
    {"used": [data files fully consumed this epoch], "file_idx": position of the current file in this epoch's file
     order, "record_idx": records already taken from it, "epoch": full passes completed}
`file_idx` is authoritative; `used` is kept for humans and checked against the index on restore. A state of the
original code ({"used", "file_idx"} without "record_idx", where file_idx counted batches of the first unused file) is
accepted and converted, with a warning.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from tfrecord_utils.records import (IndexEntry, RecordFormatError, check_entries_exist, check_record_count,
                                    parse_token_example, read_index, read_tfrecord)

log = logging.getLogger(__name__)


def _shuffle_buffer(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle a stream through a buffer of `size` items (deterministic for a given rng seed)."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = item
    for j in rng.permutation(len(buf)):
        yield buf[j]


class TFRecordLoader:
    """Iterate over batches of the sequences in the files listed by `index_path`.

    Args:
      index_path: an index file (one TFRecord path per line; relative paths are relative to its folder).
      batch_shape: leading shape of a batch, e.g. (GA, B); its product is the records per batch. An int is (B,).
      seq: sequence length; records must hold seq + 1 tokens. None: taken from the first record.
      train: True loops forever over the files (restarting in index order); False makes one pass and then stops,
        dropping an incomplete last batch (logged).
      shuffle: shuffle the file order every epoch and the records inside each file through a buffer of
        `shuffle_buffer` records, seeded by (seed, epoch, file); resuming replays the current file's shuffle. The
        original did not shuffle here (create_finetune_tfrecords.py shuffles when it writes), so the default is off.
      state: a `get_state()` result to resume from.
      verify_crc: check every record's CRCs.
      n_vocab: when given, every token id must lie in [0, n_vocab) (the model's vocabulary); an id outside fails
        with the index file, data file, record and id named, before the batch reaches the model (a model fed ids
        >= n_vocab trains to NaN).

    Each local data file is checked when it is first opened: a name ending in `_{N}.tfrecords` (what
    create_finetune_tfrecords.py writes) must hold exactly N whole records, so a file cut short is refused before
    any of its records is used.

    Missing local files named by the index raise FileNotFoundError (index file, line, path) here; `gs://` files are
    checked when they are opened.
    """

    def __init__(self, index_path: Union[str, os.PathLike], batch_shape: Union[int, Sequence[int]],
                 seq: Optional[int] = None, train: bool = True, shuffle: bool = False, shuffle_buffer: int = 10_000,
                 seed: int = 0, state: Optional[dict] = None, verify_crc: bool = True, n_vocab: Optional[int] = None,
                 rows: Optional[Sequence[int]] = None):
        self.index_path = os.fspath(index_path)
        self.batch_shape = (int(batch_shape),) if np.ndim(batch_shape) == 0 else tuple(int(b) for b in batch_shape)
        if not self.batch_shape or min(self.batch_shape) < 1:
            raise ValueError(f"batch_shape must be positive ints, got {batch_shape}")
        self.batch_records = math.prod(self.batch_shape)
        self.rows = (0, self.batch_shape[-1]) if rows is None else (int(rows[0]), int(rows[1]))
        if not 0 <= self.rows[0] < self.rows[1] <= self.batch_shape[-1]:
            raise ValueError(f"rows {rows} must be a range inside 0 .. {self.batch_shape[-1]}")
        if seq is not None and seq < 1:
            raise ValueError(f"seq must be >= 1, got {seq}")
        self.seq = seq
        self.train, self.shuffle, self.seed, self.verify_crc = train, shuffle, seed, verify_crc
        self.n_vocab = n_vocab
        self._counted: set = set()  # data files whose record count was checked
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.shuffle_buffer = shuffle_buffer
        self.entries: list[IndexEntry] = read_index(self.index_path)
        check_entries_exist(self.entries)

        self._reader: Optional[Iterator] = None  # (record number in file, bytes) of the current file
        self._epoch = self._file_pos = self._record_idx = 0
        self._used: list[str] = []
        self._records_this_epoch = 0
        self._whole_epoch_seen = True  # did this epoch start at its beginning? (to detect an index of empty files)
        if state is not None:
            self.set_state(state)

    # ---- state ----------------------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        """Positions in the index of this epoch's files, in reading order."""
        if not self.shuffle:
            return list(range(len(self.entries)))
        return [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.entries))]

    def get_state(self) -> dict[str, Any]:
        """Where the next batch starts; pass it to `set_state` (or the `state` argument) to resume exactly there."""
        return {"used": list(self._used), "file_idx": self._file_pos, "record_idx": self._record_idx,
                "epoch": self._epoch}

    def set_state(self, state: dict) -> None:
        self._close_reader()
        state = dict(state)
        if "file_idx" not in state:
            raise ValueError(f"loader state needs 'file_idx' (and 'record_idx'); got keys {sorted(state)}")
        used = list(state.get("used", []))
        if "record_idx" not in state:
            state = self._from_original_state(used, int(state["file_idx"]))
        epoch, file_pos, record_idx = int(state.get("epoch", 0)), int(state["file_idx"]), int(state["record_idx"])
        if not 0 <= file_pos <= len(self.entries) or record_idx < 0 or epoch < 0:
            raise ValueError(f"loader state {state} does not fit index {self.index_path} "
                             f"({len(self.entries)} files)")
        order = self._order(epoch)
        expected = [self.entries[i].path for i in order[:file_pos]]
        if used != expected:
            log.warning("loader state for %s lists used files %s, but file_idx %d implies %s; the index changed? "
                        "resuming at file_idx %d, record %d", self.index_path, used, file_pos, expected, file_pos,
                        record_idx)
        self._epoch, self._file_pos, self._record_idx, self._used = epoch, file_pos, record_idx, expected
        self._records_this_epoch = 0
        self._whole_epoch_seen = file_pos == 0 and record_idx == 0

    def _from_original_state(self, used: list[str], batch_in_file: int) -> dict:
        """mesh-transformer-jax's {"used", "file_idx"}: it resumed with the first file not in `used`, skipping its
        batches 0..file_idx (so batch file_idx + 1 came next)."""
        used_set = {os.path.normpath(u) if "://" not in u else u for u in used}
        file_pos = next((k for k, e in enumerate(self.entries) if e.path not in used_set), len(self.entries))
        record_idx = (batch_in_file + 1) * self.batch_records if file_pos < len(self.entries) else 0
        log.warning("converting an original mesh-transformer-jax loader state (used %d files, batch %d): resuming at "
                    "file %d, record %d", len(used), batch_in_file, file_pos, record_idx)
        return {"epoch": 0, "file_idx": file_pos, "record_idx": record_idx}

    def reset(self) -> None:
        """Back to the first record of the first epoch (e.g. for another validation pass)."""
        self.set_state({"used": [], "file_idx": 0, "record_idx": 0, "epoch": 0})

    # ---- records --------------------------------------------------------------------------------------------------
    def _records_of(self, entry: IndexEntry) -> Iterator[tuple[int, bytes]]:
        try:
            yield from enumerate(read_tfrecord(entry.path, verify=self.verify_crc))
        except OSError as e:  # most likely a gs:// path that does not exist (local ones were checked up front)
            raise FileNotFoundError(f"index file {entry.index_path}, line {entry.line}: cannot read data file "
                                    f"{entry.path}: {e}") from e

    def _open_reader(self) -> None:
        pos = self._order(self._epoch)[self._file_pos]
        entry = self.entries[pos]
        if entry.path not in self._counted:
            check_record_count(entry)
            self._counted.add(entry.path)
        reader = self._records_of(entry)
        if self.shuffle:
            reader = _shuffle_buffer(reader, self.shuffle_buffer,
                                     np.random.default_rng([self.seed, self._epoch, self._file_pos]))
        if self._record_idx:  # resuming inside this file: replay it up to where we were
            skipped = sum(1 for _ in itertools.islice(reader, self._record_idx))
            if skipped < self._record_idx:
                raise ValueError(f"loader state says {self._record_idx} records of {entry.path} were used, but it "
                                 f"holds only {skipped}; was the file rewritten?")
        self._reader = reader

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()  # closes the file
            self._reader = None

    def _next_record(self, decode: bool = True) -> Optional[tuple[np.ndarray, Optional[np.ndarray]]]:
        """The next (tokens, mask or None), advancing the state; None at the end of a validation pass. decode False:
        steps over the record (another process's row) and returns ()."""
        while True:
            if self._reader is None:
                if self._file_pos >= len(self.entries):
                    if not self.train:
                        return None
                    if self._whole_epoch_seen and self._records_this_epoch == 0:
                        raise ValueError(f"index file {self.index_path}: its files hold no records")
                    self._epoch += 1
                    self._file_pos, self._record_idx, self._used = 0, 0, []
                    self._records_this_epoch, self._whole_epoch_seen = 0, True
                self._open_reader()
            item = next(self._reader, None)
            if item is None:  # end of this file
                self._close_reader()
                self._used.append(self.entries[self._order(self._epoch)[self._file_pos]].path)
                self._file_pos, self._record_idx = self._file_pos + 1, 0
                continue
            self._record_idx += 1
            self._records_this_epoch += 1
            return self._parse(*item) if decode else ()

    def _parse(self, record_no: int, data: bytes) -> tuple[np.ndarray, Optional[np.ndarray]]:
        path = self.entries[self._order(self._epoch)[self._file_pos]].path
        where = f"{path}: record {record_no} (0-based)"
        tokens, mask = parse_token_example(data, where=where)
        if self.seq is None:
            if len(tokens) < 2:
                raise RecordFormatError(f"{where} has {len(tokens)} tokens; a record needs seq + 1 >= 2")
            self.seq = len(tokens) - 1
            log.info("%s: seq = %d (from the first record)", self.index_path, self.seq)
        if len(tokens) != self.seq + 1:
            raise RecordFormatError(f"{where} has {len(tokens)} tokens, expected {self.seq + 1} (seq {self.seq} + 1); "
                                    f"was it written with another --seq-len?")
        if self.n_vocab is not None and tokens.size and (tokens.max() >= self.n_vocab or tokens.min() < 0):
            bad = int(tokens.max()) if tokens.max() >= self.n_vocab else int(tokens.min())
            pos = int(np.argmax((tokens >= self.n_vocab) | (tokens < 0)))
            raise RecordFormatError(f"index file {self.index_path}: {where}: token id {bad} at position {pos} is "
                                    f"outside the model's vocabulary [0, n_vocab={self.n_vocab}); was the data "
                                    f"made with another tokenizer? Rebuild it with the config's tokenizer, or set "
                                    f"n_vocab in the config")
        return tokens, mask

    # ---- batches --------------------------------------------------------------------------------------------------
    def __iter__(self) -> "TFRecordLoader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows, masks = [], []
        lo, hi, width = self.rows[0], self.rows[1], self.batch_shape[-1]
        for r in range(self.batch_records):
            mine = lo <= r % width < hi
            record = self._next_record(decode=mine)
            if record is None:
                if r:
                    log.info("%s: end of the validation pass; dropping the incomplete last batch (%d of %d records)",
                             self.index_path, r, self.batch_records)
                raise StopIteration
            if mine:
                rows.append(record[0])
                masks.append(record[1])
        shape = self.batch_shape[:-1] + (hi - lo, self.seq + 1)
        tokens = np.stack(rows).astype(np.int32).reshape(shape)  # [GA, B, T] (B = hi - lo rows of this process)
        mask = np.ones((len(rows), self.seq + 1), dtype=np.int32)  # records without a mask learn everything
        for i, m in enumerate(masks):
            if m is not None:
                mask[i] = m
        return {"tokens": tokens, "loss_mask": mask.reshape(shape)}  # [GA, B, T] each

    def get_samples(self) -> dict[str, np.ndarray]:
        """The next batch (the original loader's name for it)."""
        return next(self)

    def close(self) -> None:
        self._close_reader()

    def __enter__(self) -> "TFRecordLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"TFRecordLoader({self.index_path!r}, batch_shape={self.batch_shape}, seq={self.seq}, "
                f"train={self.train}, shuffle={self.shuffle}, files={len(self.entries)}, state={self.get_state()})")
