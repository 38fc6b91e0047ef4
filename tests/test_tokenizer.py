"""Tokenizers: GPT-2 ids match the reference, encode/decode round trips, padding ids are skipped, clear errors."""
import numpy as np
import pytest

from mesh_transformer import tokenizer as tok_mod
from mesh_transformer.tokenizer import ByteTokenizer, Tokenizer, TokenizerError, get_tokenizer

MIXED = "Hello world! naïve café — 日本語 テキスト, emoji 🙂👍🏽\n\ttabs  and  spaces . , ; Ünïcödé\u00a0end"


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer_dir):
    return get_tokenizer(str(gpt2_tokenizer_dir))


# ----- GPT-2 BPE -----
def test_gpt2_hello_world(gpt2):
    assert isinstance(gpt2, Tokenizer)
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.eos_token_id == 50256
    assert gpt2.vocab_size == 50257


def test_gpt2_round_trip_and_batch(gpt2):
    ids = gpt2.encode(MIXED)
    assert gpt2.decode(ids) == MIXED
    assert gpt2.decode(np.asarray(ids, dtype=np.int32)) == MIXED
    texts = [MIXED, "", "Hello world", " leading space"]
    assert gpt2.encode_batch(texts) == [gpt2.encode(t) for t in texts]
    assert gpt2.encode_batch([]) == []


def test_gpt2_endoftext_is_special_and_padding_skipped(gpt2):
    assert gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]
    # ids 50257..50399 pad GPT-J's vocab: decode drops them
    assert gpt2.decode([15496, 50300, 995, 50399]) == "Hello world"


def test_gpt2_found_by_name_and_cached(gpt2_tokenizer_dir, monkeypatch):
    monkeypatch.setenv(tok_mod.ENV_DIR, str(gpt2_tokenizer_dir))
    a = get_tokenizer("gpt2")
    assert a.encode("Hello world") == [15496, 995]
    assert get_tokenizer(gpt2_tokenizer_dir) is a  # same resolved folder -> same cached instance


# ----- byte tokenizer -----
def test_byte_round_trip_and_batch():
    t = get_tokenizer("byte")
    assert isinstance(t, ByteTokenizer) and isinstance(t, Tokenizer)
    assert (t.eos_token_id, t.vocab_size, t.name) == (256, 257, "byte")
    assert t.encode("Hi") == [72, 105]
    ids = t.encode(MIXED)
    assert max(ids) < 256
    assert t.decode(ids) == MIXED
    assert t.decode(np.asarray(ids)) == MIXED
    assert t.encode_batch([MIXED, "", "x"]) == [t.encode(MIXED), [], [120]]
    assert t.encode("<|endoftext|>") == list(b"<|endoftext|>")  # plain bytes; callers split documents first


def test_byte_decode_skips_padding_and_bad_bytes():
    t = get_tokenizer("byte")
    assert t.decode([72, 300, 105, 1023, -1]) == "Hi"  # ids >= 257 pad a model vocab
    assert t.decode([72, 256, 105]) == "H<|endoftext|>i"
    assert t.decode([0xE6, 0x97]) == "\ufffd"  # a cut multi-byte char decodes with errors="replace"


# ----- errors -----
def test_missing_folder_error(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(TokenizerError) as e:
        get_tokenizer(str(missing))
    msg = str(e.value)
    assert str(missing) in msg and "--tokenizer /path/to/folder" in msg and "vocab.json" in msg
    assert "merges.txt" in msg and "tokenizer" in msg


def test_folder_without_merges(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"lacks merges\.txt.*--tokenizer"):
        get_tokenizer(tmp_path)


def test_bad_env_dir_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(tok_mod.ENV_DIR, str(tmp_path / "gone"))
    with pytest.raises(TokenizerError, match=tok_mod.ENV_DIR):
        get_tokenizer("gpt2")


def test_unknown_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerError, match="--tokenizer /path/to/folder"):
        get_tokenizer("no-such-org/no-such-tokenizer-xyz")


def test_model_folder_with_tokenizer_json_loads_through_auto_tokenizer(tmp_path):
    """A folder with only tokenizer.json (+ tokenizer_config.json), as Llama 3 / Qwen2.5 / Mistral ship: loaded with
    AutoTokenizer, EOS from its special tokens, round trips; a damaged tokenizer.json is named."""
    from helpers import write_bpe_tokenizer
    texts = ["Input:\n12 + 34\nTarget:\n<scratch>\n1 2 + 3 4 , C: 0\n</scratch>\n4 6"] * 20
    write_bpe_tokenizer(tmp_path / "tok", texts, vocab_size=300)
    assert not (tmp_path / "tok" / "vocab.json").exists()
    tok = get_tokenizer(str(tmp_path / "tok"))
    assert tok.vocab_size >= 257 and tok.decode([tok.eos_token_id]) == "<|endoftext|>"
    text = "Input:\n98 + 7\nTarget:\nünïcode ok"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode())  # merges were learned
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        get_tokenizer(str(tmp_path / "bad"))
