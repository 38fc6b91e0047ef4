"""create_finetune_tfrecords: completion loss mask (hand-checked), packing, and the CLI end to end on real files."""
import json
import lzma
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (pytest fixtures; tests/ is on sys.path)

from mesh_transformer.tokenizer import get_tokenizer
from tfrecord_utils.build import (InputError, build_tfrecords, completion_mask, find_input_files, tokenize_documents,
                                  wikitext_detokenizer)
from tfrecord_utils.loader import TFRecordLoader
from tfrecord_utils.records import read_index, read_token_records

REPO = pathlib.Path(__file__).resolve().parents[1]
BYTE = get_tokenizer("byte")
EOS = BYTE.eos_token_id


# ---------------------------------------------------------------------------------------------------------------
# Completion loss mask
# ---------------------------------------------------------------------------------------------------------------
def _learned(doc, tok):
    docs = tokenize_documents([doc], tok, loss_mask="completion")
    tokens, mask = docs.tokens[0], docs.masks[0]
    assert tokens[-1] == tok.eos_token_id and len(mask) == len(tokens) and mask.dtype == np.int32
    return tokens[mask == 1].tolist(), docs


def test_completion_mask_star_example_byte():
    learned, docs = _learned("Q: 2+2?\nA: 4.", BYTE)
    assert learned == list(b" 4.") + [EOS]  # exactly " 4." and the EOS
    assert docs.n_without_colon == 0
    assert docs.masks[0].tolist() == [0] * len("Q: 2+2?\nA:") + [1] * 4


def test_completion_mask_multibyte_and_edge_cases_byte():
    assert _learned("é: ü€", BYTE)[0] == list(" ü€".encode()) + [EOS]
    assert _learned("Q: ends with colon:", BYTE)[0] == [EOS]  # empty completion: only EOS is learned
    learned, docs = _learned("no colon here", BYTE)
    assert learned == list(b"no colon here") + [EOS] and docs.n_without_colon == 1
    learned, _ = _learned("Input:\n1 + 2\nTarget:\n<scratch>\n3\n</scratch>\n3\n", BYTE)
    assert bytes(learned[:-1]).decode() == "\n<scratch>\n3\n</scratch>\n3\n"


def test_completion_mask_gpt2(gpt2_tokenizer_dir):
    tok = get_tokenizer(str(gpt2_tokenizer_dir))
    learned, _ = _learned("Q: 2+2?\nA: 4.", tok)
    assert tok.decode(learned) == " 4.<|endoftext|>"
    cqa = ("Q: What do people use to absorb extra ink from a fountain pen?\nAnswer Choices:\n(a) shirt pocket\n"
           "(b) blotter\nA: The answer must be used to absorb extra ink. Therefore, the answer is blotter (b).")
    assert tok.decode(_learned(cqa, tok)[0]) == (" The answer must be used to absorb extra ink. Therefore, the answer "
                                                 "is blotter (b).<|endoftext|>")
    # GPT-2 has a "::" token: the token holding the last ':' is not learned, even though it starts before it
    text = "Q: a\nA:: b"
    ids = tok.encode(text)
    assert [tok.decode([i]) for i in ids][-2:] == ["::", " b"]
    assert completion_mask(text, ids, tok).tolist()[-2:] == [0, 1]
    # multi-byte characters split across BPE tokens around the colon
    assert tok.decode(_learned("x 🎉:🎉 ü", tok)[0]) == "🎉 ü<|endoftext|>"


# ---------------------------------------------------------------------------------------------------------------
# Packing (in process)
# ---------------------------------------------------------------------------------------------------------------
def _write(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def _stream(docs):
    return [t for d in docs for t in list(d.encode()) + [EOS]]


def test_pack_preserve_order_and_drop_trailing(tmp_path):
    docs = ["first doc: a", "second: bb", "third: ccc"]
    _write(tmp_path / "in", {"a.txt": "<|endoftext|>".join(docs) + "<|endoftext|>"})
    res = build_tfrecords(tmp_path / "in", "t", tmp_path / "out", seq_len=9, tokenizer="byte",
                          loss_mask="completion", preserve_data_order=True)
    stream = _stream(docs)
    n = len(stream) // 10
    assert (res.n_documents, res.n_tokens, res.n_sequences, res.n_dropped_tokens) == (3, len(stream), n,
                                                                                       len(stream) - 10 * n)
    assert os.path.basename(res.tfrecord_path) == f"t_{n}.tfrecords"
    assert [e.path for e in read_index(res.index_path)] == [res.tfrecord_path]
    got = list(read_token_records(res.tfrecord_path))
    assert [t for tokens, _ in got for t in tokens.tolist()] == stream[:10 * n]
    mask = [m for _, mask in got for m in mask.tolist()]
    expect = []
    for d in docs:
        k = d.rfind(":") + 1
        expect += [0] * k + [1] * (len(d.encode()) - k + 1)
    assert mask == expect[:10 * n]
    assert sorted(os.listdir(tmp_path / "out")) == ["t.index", f"t_{n}.tfrecords"]  # no temp files left


def test_shuffle_is_seeded_and_repack_epochs(tmp_path):
    docs = [f"doc {i}: " + "xyz"[i % 3] * (i % 7 + 3) for i in range(40)]
    _write(tmp_path / "in", {"a.jsonl": "".join(json.dumps({"text": d}) + "\n" for d in docs)})

    def build(out, **kw):
        res = build_tfrecords(tmp_path / "in", "s", tmp_path / out, seq_len=15, tokenizer="byte", **kw)
        return res, [t.tolist() for t, m in read_token_records(res.tfrecord_path)]

    _, a = build("o1", seed=1)
    _, b = build("o2", seed=1)
    _, c = build("o3", seed=2)
    r0, plain = build("o4", preserve_data_order=True)
    assert a == b and a != c and a != plain and all(m is None for _, m in read_token_records(r0.tfrecord_path))
    _, two = build("o5", seed=1, n_repack_epochs=2)
    assert two[:len(a)] == a and len(two) > len(a)  # epoch 2 is another shuffle of the same documents
    rp, two_plain = build("o6", preserve_data_order=True, n_repack_epochs=2)
    stream = _stream(docs)
    width, n1 = 16, len(stream) // 16
    second = (stream[n1 * width:] + stream[:n1 * width])  # epoch 2: epoch 1's trailing tokens first
    assert two_plain[:n1] == plain and [t for s in two_plain[n1:] for t in s] == second[:len(second) // 16 * 16]
    assert rp.n_dropped_tokens == len(second) % 16


def test_output_to_gcs(tmp_path, gcs_bucket):
    docs = ["Q: 1?\nA: one.", "Q: 2?\nA: two."] * 3
    _write(tmp_path / "in", {"a.txt": "<|endoftext|>".join(docs)})
    res = build_tfrecords(tmp_path / "in", "g", f"gs://{gcs_bucket}/out", seq_len=7, tokenizer="byte",
                          loss_mask="completion", preserve_data_order=True)
    assert res.index_path == f"gs://{gcs_bucket}/out/g.index"
    batches = list(TFRecordLoader(res.index_path, batch_shape=(1,), seq=7, train=False))
    assert len(batches) == res.n_sequences
    assert [t for b in batches for t in b["tokens"].ravel().tolist()] == _stream(docs)[:8 * res.n_sequences]


def test_min_unique_tokens_drops_documents(tmp_path):
    _write(tmp_path / "in", {"a.txt": "aaaaaaaaaaaaaaaaaaaa<|endoftext|>abcdefghij klmnop<|endoftext|>"})
    res = build_tfrecords(tmp_path / "in", "m", tmp_path / "out", seq_len=4, tokenizer="byte",
                          min_unique_tokens=5, preserve_data_order=True)
    assert res.n_documents == 1 and res.n_docs_below_min_unique == 1
    assert res.n_tokens == len("abcdefghij klmnop") + 1


def test_input_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("x")
    with pytest.raises(InputError, match=r"empty holds no files ending with \.txt, \.jsonl, \.jsonl\.zst, \.xz"):
        find_input_files(tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        find_input_files(tmp_path / "nope")
    _write(tmp_path / "bad", {"a.jsonl": '{"text": "ok"}\n{"text": broken\n'})
    with pytest.raises(InputError, match=r"a\.jsonl, line 2: not valid JSON"):
        build_tfrecords(tmp_path / "bad", "b", tmp_path / "out", seq_len=4, tokenizer="byte")
    _write(tmp_path / "nofield", {"a.jsonl": '{"txt": "ok"}\n'})
    with pytest.raises(InputError, match=r"line 1: expected a JSON object with a string field \"text\""):
        build_tfrecords(tmp_path / "nofield", "b", tmp_path / "out", seq_len=4, tokenizer="byte")
    _write(tmp_path / "short", {"a.txt": "tiny"})
    with pytest.raises(InputError, match="fewer than one sequence"):
        build_tfrecords(tmp_path / "short", "b", tmp_path / "out", seq_len=64, tokenizer="byte")
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_wikitext_detokenizer():
    assert wikitext_detokenizer("1 @,@ 000 people , he said . = = Title = =") == "1,000 people, he said. == Title =="


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "create_finetune_tfrecords.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_cli_help_explains_every_flag():
    out = _cli("--help")
    assert out.returncode == 0
    for flag in ["input_path", "name", "--output-dir", "--normalize-with-ftfy", "--normalize-with-wikitext-detokenize",
                 "--min-unique-tokens", "--treat-eot-as-text", "--n-repack-epochs", "--seed", "--preserve-data-order",
                 "--verbose", "--seq-len", "--tokenizer", "--loss-mask"]:
        assert flag in out.stdout, flag
    assert "completion" in out.stdout and ".jsonl.zst" in out.stdout


def test_cli_end_to_end(tmp_path):
    import zstandard

    docs = {
        "a.txt": ["Q: 2+2?\nA: 4.", "Q: 3+5?\nA: 8."],
        "b.jsonl": ["Input:\n1 2 + 3 4\nTarget:\n4 6", "Q: capital of France?\nA: Paris."],
        "c.jsonl.zst": ["x: y", "no colon in this one at all"],
        "d.xz": ["Q: last?\nA: yes, the last one."],
    }
    files = {
        "a.txt": "<|endoftext|>".join(docs["a.txt"]) + "<|endoftext|>",
        "b.jsonl": "".join(json.dumps({"text": d}) + "\n" for d in docs["b.jsonl"]),
        "c.jsonl.zst": zstandard.ZstdCompressor().compress(json.dumps({"text": "<|endoftext|>".join(
            docs["c.jsonl.zst"])}).encode() + b"\n"),
        "d.xz": lzma.compress(docs["d.xz"][0].encode()),
        "ignored.md": "not read",
    }
    _write(tmp_path / "in", files)
    out = _cli(tmp_path / "in", "demo", "--output-dir", tmp_path / "out", "--tokenizer", "byte", "--seq-len", 32,
               "--loss-mask", "completion", "--preserve-data-order")
    assert out.returncode == 0, out.stderr
    all_docs = [d for name in sorted(docs) for d in docs[name]]
    stream = _stream(all_docs)
    n = len(stream) // 33
    record = tmp_path / "out" / f"demo_{n}.tfrecords"
    assert sorted(os.listdir(tmp_path / "out")) == ["demo.index", record.name]
    assert (tmp_path / "out" / "demo.index").read_text() == f"{record.name}\n"
    assert f"{len(all_docs)} documents, {len(stream)} tokens, {n} sequences" in out.stderr
    assert f"{len(stream) - 33 * n} tokens dropped" in out.stderr
    assert "1 of 7 documents have no ':'" in out.stderr

    batches = list(TFRecordLoader(tmp_path / "out" / "demo.index", batch_shape=(1, 1), seq=32, train=False))
    assert len(batches) == n
    assert [t for b in batches for t in b["tokens"].ravel().tolist()] == stream[:33 * n]
    learned = bytes(t for b in batches for t, m in zip(b["tokens"].ravel(), b["loss_mask"].ravel())
                    if m and t != EOS)
    assert b" 4." in learned and b"Q:" not in learned and b"Target" not in learned

    out2 = _cli(tmp_path / "in", "shuf", "--output-dir", tmp_path / "out2", "--tokenizer", "byte", "--seq-len", 32)
    assert out2.returncode == 0, out2.stderr
    assert (tmp_path / "out2" / "shuf.index").exists()
    got = list(read_token_records(next((tmp_path / "out2").glob("shuf_*.tfrecords"))))
    assert all(m is None for _, m in got) and all(len(t) == 33 for t, _ in got)


def test_cli_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    out = _cli(tmp_path / "empty", "x", "--output-dir", tmp_path / "out", "--tokenizer", "byte")
    assert out.returncode == 1
    assert f"input folder {tmp_path / 'empty'} holds no files ending with .txt, .jsonl, .jsonl.zst, .xz" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()
    _write(tmp_path / "bad", {"a.jsonl": '{"text": "fine"}\n\n{"text": 1\n'})
    out = _cli(tmp_path / "bad", "x", "--output-dir", tmp_path / "out", "--tokenizer", "byte")
    assert out.returncode == 1 and f"{tmp_path / 'bad' / 'a.jsonl'}, line 3: not valid JSON" in out.stderr
    assert not (tmp_path / "out").exists()


def test_documents_start_with_bos_for_a_tokenizer_that_has_one(tmp_path):
    """Llama 2/3 / Mistral tokenizers: each document is BOS + text + EOS, BOS unlearned in completion mode; a
    tokenizer without BOS (byte, GPT-2) is unchanged."""
    from helpers import write_bpe_tokenizer
    from mesh_transformer.tokenizer import get_tokenizer
    from tfrecord_utils.build import tokenize_documents

    write_bpe_tokenizer(tmp_path / "tok", ["Q: two plus two?\nA: four."] * 20, vocab_size=300, bos=True)
    tok = get_tokenizer(str(tmp_path / "tok"))
    docs = tokenize_documents(["Q: two plus two?\nA: four."], tok, loss_mask="completion")
    ids = tok.encode("Q: two plus two?\nA: four.")
    assert list(docs.tokens[0]) == [tok.bos_token_id] + ids + [tok.eos_token_id]
    assert docs.masks[0][0] == 0 and docs.masks[0][-1] == 1 and len(docs.masks[0]) == len(docs.tokens[0])
    plain = tokenize_documents(["abc"], get_tokenizer("byte"))
    assert list(plain.tokens[0]) == [97, 98, 99, 256]
