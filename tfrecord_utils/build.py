"""Text files -> packed token sequences -> one `{name}_{n_sequences}.tfrecords` file and an index `{name}.index`.

The library behind `create_finetune_tfrecords.py`; follows that script of mesh-transformer-jax (the later version,
as STaR ships it):
  1. input files (sorted; shuffled with the seed unless preserve_data_order) are read as texts: a .txt / .xz file is
     one text, a .jsonl / .jsonl.zst line is one text (its "text" field);
  2. texts are split into documents on the literal `<|endoftext|>` (empty pieces dropped), optionally normalized
     (ftfy NFKC, wikitext detokenizer), tokenized, and each followed by EOS;
  3. documents are shuffled, concatenated and cut into sequences of seq_len + 1 tokens; the trailing partial
     sequence is dropped (its token count is logged); the sequences are shuffled;
  4. with n_repack_epochs > 1, step 3 repeats on a reshuffle of the documents (with preserve_data_order: the previous
     epoch's stream, its trailing tokens first, is cut again at shifted boundaries) and the results are appended.

Differences from the original: min_unique_tokens filters documents, as its help text says (the original filtered the
packed sequences); the tokenizer and seq_len are options (GPT-2 / 2049 tokens were fixed); the optional
"completion" loss mask (below); .tar.gz archives are not read (lm_dataformat is not a dependency).

Completion loss mask (the rule the STaR README promises: learn only the completion after the last `A:` /
`Target:`): per document, mask = 1 on the tokens that start after the document's LAST ':' character, up to and
including its EOS, and 0 before. The boundary is found at the character level and mapped to tokens, so a BPE token
that contains the ':' (e.g. GPT-2's ":)") is 0. A document without ':' is learned whole (counted and logged).
"""
from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import random
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from tfrecord_utils.records import TFRecordWriter, is_url, open_binary, token_example, write_index

log = logging.getLogger(__name__)

EOT_TEXT = "<|endoftext|>"
ACCEPTED_EXTENSIONS = (".txt", ".jsonl", ".jsonl.zst", ".xz")  # .xz: xz-compressed text (.jsonl.xz: jsonl)
LOSS_MASK_MODES = ("none", "completion")
TOKENIZE_BATCH = 512  # documents per encode_batch call


class InputError(ValueError):
    """Input data that cannot be used; the message names the file (and line) and what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
def _accepted(path: str) -> bool:
    return str(path).endswith(ACCEPTED_EXTENSIONS)


def find_input_files(input_path: Union[str, os.PathLike]) -> list[str]:
    """The input files: `input_path` itself, or the files with an accepted extension directly in that folder."""
    input_path = os.fspath(input_path)
    accepted = ", ".join(ACCEPTED_EXTENSIONS)
    if is_url(input_path):
        if not _accepted(input_path):
            raise InputError(f"input file {input_path} must end with one of {accepted} (folders are read only "
                             "when local)")
        return [input_path]
    if os.path.isdir(input_path):
        names = sorted(os.listdir(input_path))
        files = [os.path.join(input_path, n) for n in names
                 if _accepted(n) and os.path.isfile(os.path.join(input_path, n))]
        if not files:
            raise InputError(f"input folder {input_path} holds no files ending with {accepted} "
                             f"({len(names)} entries, none accepted); nothing written")
        if len(files) < len(names):
            log.info("input folder %s: ignoring %d entries without an accepted extension (%s)", input_path,
                     len(names) - len(files), accepted)
        return files
    if os.path.isfile(input_path):
        if not _accepted(input_path):
            raise InputError(f"input file {input_path} must end with one of {accepted}; nothing written")
        return [input_path]
    raise InputError(f"input path {input_path} does not exist")


def _jsonl_texts(lines: Iterator[str], path: str) -> Iterator[str]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}, line {lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise InputError(f"{path}, line {lineno}: expected a JSON object with a string field \"text\"")
        yield row["text"]


def read_texts(path: str) -> Iterator[str]:
    """The texts of one input file: the whole file for .txt/.xz, the "text" of each line for .jsonl/.jsonl.zst."""
    try:
        with open_binary(path) as raw:
            if path.endswith(".zst"):
                import zstandard

                stream = zstandard.ZstdDecompressor().stream_reader(raw)
            elif path.endswith(".xz"):
                import lzma

                stream = lzma.open(raw)
            else:
                stream = raw
            text = io.TextIOWrapper(stream, encoding="utf-8")
            if path.endswith((".jsonl", ".jsonl.zst", ".jsonl.xz")):
                yield from _jsonl_texts(text, path)
            else:
                yield text.read()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a block)") from None
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise InputError(f"{path}: cannot read it ({type(e).__name__}: {e}); is it really {os.path.splitext(path)[1]}?"
                         ) from None


def split_documents(text: str, treat_eot_as_text: bool = False) -> list[str]:
    """Split a text on the literal <|endoftext|> (as the original does), dropping empty pieces."""
    if treat_eot_as_text:
        return [text] if text else []
    return [d for d in text.split(EOT_TEXT) if d]


def wikitext_detokenizer(string: str) -> str:
    """Undo wikitext-103's tokenization (verbatim from the original script)."""
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    # double brackets
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


# ---------------------------------------------------------------------------------------------------------------
# Tokens and loss masks
# ---------------------------------------------------------------------------------------------------------------
def completion_mask(text: str, tokens: Sequence[int], tokenizer) -> np.ndarray:
    """int32 [len(tokens)]: 1 on the tokens of `text` that start after its last ':', 0 before; all 1 without ':'.

    Token i starts after the colon iff tokens[:i] already hold the colon, i.e. iff decode(tokens[:i]) starts with
    text[:colon + 1]. (A prefix that ends inside a multi-byte character decodes to U+FFFD there, never to ':', so
    the test is exact.) It is monotone in i, so we bisect: ~log2(len) decodes.
    """
    n = len(tokens)
    colon = text.rfind(":")
    if colon < 0:
        return np.ones(n, dtype=np.int32)
    head = text[:colon + 1]
    tokens = list(tokens)
    if not tokenizer.decode(tokens).startswith(head):
        raise ValueError(f"tokenizer {tokenizer!r} does not decode this document back to its text, so the loss mask "
                         f"cannot be placed: {text[:200]!r}...")
    lo, hi = 0, n  # invariant: decode(tokens[:lo]) lacks the colon, decode(tokens[:hi]) holds it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tokenizer.decode(tokens[:mid]).startswith(head):
            hi = mid
        else:
            lo = mid
    mask = np.zeros(n, dtype=np.int32)
    mask[hi:] = 1
    return mask


@dataclass
class Documents:
    """Tokenized documents, each ending with EOS (and starting with BOS for tokenizers that have one); masks[i] is
    None unless a loss mask was asked for."""
    tokens: list[np.ndarray] = field(default_factory=list)  # int32 [len_i]
    masks: list[Optional[np.ndarray]] = field(default_factory=list)  # int32 [len_i] or None
    n_without_colon: int = 0
    n_below_min_unique: int = 0


def tokenize_documents(texts: Sequence[str], tokenizer, loss_mask: str = "none", min_unique_tokens: int = 0,
                       verbose: bool = False, out: Optional[Documents] = None) -> Documents:
    """Tokenize documents ([BOS] + text + EOS each, BOS when the tokenizer's template has one), drop those with <
    min_unique_tokens distinct tokens, add loss masks."""
    if loss_mask not in LOSS_MASK_MODES:
        raise ValueError(f"loss_mask must be one of {LOSS_MASK_MODES}, got {loss_mask!r}")
    docs = out if out is not None else Documents()
    eos = tokenizer.eos_token_id
    bos = getattr(tokenizer, "bos_token_id", None)  # Llama 2/3, Mistral: each document starts with BOS (unlearned)
    head = [] if bos is None else [bos]
    for start in range(0, len(texts), TOKENIZE_BATCH):
        batch = list(texts[start:start + TOKENIZE_BATCH])
        for text, ids in zip(batch, tokenizer.encode_batch(batch)):
            if min_unique_tokens > 0 and len(set(ids)) < min_unique_tokens:
                docs.n_below_min_unique += 1
                if verbose:
                    log.info("excluding a document with %d unique tokens: %r", len(set(ids)), text[:1000])
                continue
            docs.tokens.append(np.asarray(head + list(ids) + [eos], dtype=np.int32))
            if loss_mask == "completion":
                docs.n_without_colon += ":" not in text
                mask = np.append(completion_mask(text, ids, tokenizer), np.int32(1))  # EOS is learned
                docs.masks.append(np.concatenate([np.zeros(len(head), np.int32), mask]))
            else:
                docs.masks.append(None)
    return docs


def pack(tokens: Sequence[np.ndarray], masks: Optional[Sequence[np.ndarray]], seq_len: int
         ) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray, Optional[np.ndarray]]:
    """Concatenate and cut into rows of seq_len + 1: (seqs [n, seq_len+1], masks or None, trailing, trailing mask)."""
    width = seq_len + 1
    flat = np.concatenate(tokens) if len(tokens) else np.zeros(0, dtype=np.int32)
    n = len(flat) // width
    flat_mask = np.concatenate(masks) if masks is not None and len(masks) else None
    seqs = flat[:n * width].reshape(n, width)
    seq_masks = flat_mask[:n * width].reshape(n, width) if flat_mask is not None else None
    return seqs, seq_masks, flat[n * width:], (flat_mask[n * width:] if flat_mask is not None else None)


# ---------------------------------------------------------------------------------------------------------------
# The whole build
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class BuildResult:
    tfrecord_path: str
    index_path: str
    n_files: int
    n_documents: int  # after min_unique_tokens
    n_tokens: int  # of those documents, one EOS each included (one epoch)
    n_sequences: int  # over all repack epochs
    n_dropped_tokens: int  # trailing tokens dropped, over all repack epochs
    n_docs_without_colon: int  # with loss_mask="completion": documents learned whole
    n_docs_below_min_unique: int


def _join(folder: str, name: str) -> str:
    return posixpath.join(folder, name) if is_url(folder) else os.path.join(folder, name)


def build_tfrecords(input_path: Union[str, os.PathLike], name: str, output_dir: Union[str, os.PathLike] = "", *,
                    seq_len: int = 2048, tokenizer="gpt2", loss_mask: str = "none",
                    normalize_with_ftfy: bool = False, normalize_with_wikitext_detokenize: bool = False,
                    min_unique_tokens: int = 0, n_repack_epochs: int = 1, seed: int = 10,
                    preserve_data_order: bool = False, treat_eot_as_text: bool = False,
                    verbose: bool = False) -> BuildResult:
    """Read, tokenize, pack and write `{output_dir}/{name}_{n_sequences}.tfrecords` + `{output_dir}/{name}.index`.

    `tokenizer` is a spec for `get_tokenizer` ("gpt2", "byte", a folder) or a tokenizer object. Raises InputError
    (nothing written) for missing/unsupported inputs, malformed jsonl, or too little text for one sequence.
    """
    if seq_len < 1 or n_repack_epochs < 1:
        raise ValueError(f"seq_len and n_repack_epochs must be >= 1, got {seq_len} and {n_repack_epochs}")
    if loss_mask not in LOSS_MASK_MODES:
        raise ValueError(f"loss_mask must be one of {LOSS_MASK_MODES}, got {loss_mask!r}")
    if isinstance(tokenizer, (str, os.PathLike)):
        from mesh_transformer.tokenizer import get_tokenizer

        tokenizer = get_tokenizer(tokenizer)
    rng = random.Random(seed)
    files = find_input_files(input_path)
    if not preserve_data_order:
        rng.shuffle(files)
    log.info("reading %d input file(s) with tokenizer %r, seq_len %d, loss mask %s", len(files), tokenizer, seq_len,
             loss_mask)

    docs = Documents()
    for path in tqdm(files, desc="reading/tokenizing files", unit="file", mininterval=1):
        texts = []
        for text in read_texts(path):
            for doc in split_documents(text, treat_eot_as_text):
                if normalize_with_ftfy:
                    import ftfy

                    doc = ftfy.fix_text(doc, normalization="NFKC")
                if normalize_with_wikitext_detokenize:
                    doc = wikitext_detokenizer(doc)
                texts.append(doc)
        tokenize_documents(texts, tokenizer, loss_mask, min_unique_tokens, verbose, out=docs)
    if docs.n_below_min_unique:
        log.info("excluded %d documents with fewer than %d unique tokens", docs.n_below_min_unique, min_unique_tokens)
    if loss_mask == "completion" and docs.n_without_colon:
        log.warning("%d of %d documents have no ':'; they are learned whole (loss mask all ones)",
                    docs.n_without_colon, len(docs.tokens))
    n_tokens = int(sum(len(t) for t in docs.tokens))

    order = list(range(len(docs.tokens)))
    masks_on = loss_mask != "none"
    all_seqs, all_masks, n_dropped = [], [], 0
    seqs = seq_masks = trailing = trailing_mask = None
    for epoch in range(n_repack_epochs):
        if epoch == 0 or not preserve_data_order:
            if not preserve_data_order:
                rng.shuffle(order)  # document level
            seqs, seq_masks, trailing, trailing_mask = pack(
                [docs.tokens[i] for i in order], [docs.masks[i] for i in order] if masks_on else None, seq_len)
            n_dropped += len(trailing) if not preserve_data_order else 0
        else:  # same order, boundaries shifted: the previous epoch's trailing tokens go first
            seqs, seq_masks, trailing, trailing_mask = pack(
                [trailing, seqs.ravel()], [trailing_mask, seq_masks.ravel()] if masks_on else None, seq_len)
        if not preserve_data_order:
            perm = list(range(len(seqs)))
            rng.shuffle(perm)
            seqs = seqs[perm]
            seq_masks = seq_masks[perm] if masks_on else None
        all_seqs.append(seqs)
        all_masks.append(seq_masks)
        if verbose:
            log.info("repack epoch %d: %d sequences, %d trailing tokens", epoch, len(seqs), len(trailing))
    if preserve_data_order:
        n_dropped = len(trailing)  # each epoch's trailing tokens start the next one; only the last are lost
    log.info("dropped %d tokens of trailing data (less than one sequence of %d tokens)", n_dropped, seq_len + 1)

    n_sequences = int(sum(len(s) for s in all_seqs))
    if n_sequences == 0:
        raise InputError(f"{input_path}: {len(docs.tokens)} documents give {n_tokens} tokens, fewer than one sequence "
                         f"of seq_len + 1 = {seq_len + 1}; nothing written (use a smaller --seq-len or more data)")

    output_dir = os.fspath(output_dir) or "."
    if not is_url(output_dir):
        os.makedirs(output_dir, exist_ok=True)
    record_name = f"{name}_{n_sequences}.tfrecords"
    record_path, index_path = _join(output_dir, record_name), _join(output_dir, f"{name}.index")
    with TFRecordWriter(record_path) as writer, tqdm(total=n_sequences, desc="writing", unit="seq",
                                                     mininterval=1) as bar:
        for seqs, seq_masks in zip(all_seqs, all_masks):
            for i in range(len(seqs)):
                writer.write(token_example(seqs[i], seq_masks[i] if seq_masks is not None else None))
                bar.update()
    write_index(index_path, [record_name])  # relative to the index's folder, so the pair can move together

    result = BuildResult(record_path, index_path, len(files), len(docs.tokens), n_tokens, n_sequences, n_dropped,
                         docs.n_without_colon, docs.n_below_min_unique)
    log.info("wrote %s and %s: %d documents, %d tokens, %d sequences of %d tokens, %d tokens dropped%s",
             record_path, index_path, result.n_documents, n_tokens, n_sequences, seq_len + 1, n_dropped,
             f", {docs.n_without_colon} documents without ':' learned whole" if loss_mask == "completion" else "")
    return result
