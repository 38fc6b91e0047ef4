"""Tokenizers: GPT-2 BPE or a model folder's tokenizer.json from local files, and a built-in byte tokenizer for tiny
models.

GPT-J uses GPT-2's BPE (EOS `<|endoftext|>` = 50256; the model's vocab of 50400 is padding). mesh-transformer-jax
fetched it with `GPT2TokenizerFast.from_pretrained("gpt2")`, which needs the internet; our machines are often offline
and an offline hub call can stall, so "gpt2" is looked up on disk first, in a fixed and short order:
  1. a folder named by the spec itself (`./gpt2`),
  2. the folder in `$STAR_TOKENIZER_DIR`,
  3. `../shared/data/gpt2_tokenizer` beside the repository root,
  4. the Hugging Face cache (`local_files_only=True`),
  5. the hub, only when `HF_HUB_OFFLINE=0` says we are online;
and otherwise fails with a `TokenizerError` that says how to pass a folder.

Two traps of transformers 5 this module exists to avoid: `GPT2TokenizerFast(vocab_file=, merges_file=)` silently
builds an EMPTY vocab (we use `from_pretrained(folder)` and check the result), and the default decode may "clean up"
spaces before punctuation, which breaks encode -> decode round trips (we turn it off).

A folder holding a `tokenizer.json` (the form Llama 3, Qwen2/2.5 and Mistral folders ship) is loaded with
`AutoTokenizer.from_pretrained(folder, local_files_only=True)`, so each family's own tokenizer class and special
tokens apply; a folder with only vocab.json + merges.txt is GPT-2's BPE.

The byte tokenizer (id = UTF-8 byte value, EOS = 256, vocab 257) needs no files, so tests and tiny demo models run
anywhere. Both satisfy the `Tokenizer` protocol below, which is all other modules rely on.
"""
from __future__ import annotations

import functools
import os
import pathlib
from typing import Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np

EOT_TEXT = "<|endoftext|>"  # GPT-2's document separator, as text
GPT2_EOS = 50256
ENV_DIR = "STAR_TOKENIZER_DIR"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_GPT2_DIR = REPO_ROOT.parent / "shared" / "data" / "gpt2_tokenizer"
BPE_FILES = ("vocab.json", "merges.txt")
HOW_TO_FIX = ("pass a folder holding GPT-2's vocab.json and merges.txt, or a model's tokenizer.json, with "
              "`--tokenizer /path/to/folder` "
              f"(or the config key \"tokenizer\", or ${ENV_DIR}), or use `--tokenizer byte` for the built-in "
              "byte tokenizer")

Ids = Union[Sequence[int], np.ndarray]


class TokenizerError(ValueError):
    """No usable tokenizer for a spec; the message names what was tried and how to pass a folder."""


@runtime_checkable
class Tokenizer(Protocol):
    eos_token_id: int  # 50256 for GPT-2, 256 for byte
    bos_token_id: Optional[int]  # the token a prompt starts with (Llama 2/3, Mistral), None when there is none
    vocab_size: int  # ids in [0, vocab_size) are real tokens; model vocabs may be larger (padding)
    name: str  # "byte", or the folder / hub id the BPE came from

    def encode(self, text: str) -> list[int]: ...  # no EOS appended

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Ids) -> str: ...  # skips ids outside [0, vocab_size)


def _as_id_list(ids: Ids, vocab_size: int) -> list[int]:
    """A 1-D list or array of ids -> python ints, dropping padding ids (>= vocab_size) and negatives."""
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"decode takes one sequence of ids (1-D); got shape {arr.shape}")
    return [int(i) for i in arr if 0 <= i < vocab_size]


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte value (0..255), EOS = 256. For tiny models; no files needed.

    `<|endoftext|>` in the text is encoded as its 13 plain bytes (callers split documents on it first); EOS decodes to
    the text `<|endoftext|>`, as GPT-2's decode does, so both tokenizers print documents the same way.
    """

    name = "byte"
    eos_token_id = 256
    bos_token_id = None
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Ids) -> str:
        out, chunk = [], bytearray()
        for i in _as_id_list(ids, self.vocab_size):
            if i == self.eos_token_id:
                out.append(chunk.decode("utf-8", errors="replace") + EOT_TEXT)
                chunk = bytearray()
            else:
                chunk.append(i)
        return "".join(out) + chunk.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A `transformers` fast tokenizer (GPT-2 BPE, or a model folder's tokenizer.json) behind the `Tokenizer`
    protocol."""

    def __init__(self, hf_tokenizer, name: str):
        self.hf = hf_tokenizer
        self.name = name
        self.vocab_size = len(hf_tokenizer)  # base vocab + added tokens (GPT-J's hub tokenizer adds 143)
        eos = hf_tokenizer.eos_token_id
        if eos is None:
            eos = hf_tokenizer.convert_tokens_to_ids(EOT_TEXT)
        if self.vocab_size <= 256 or eos is None:  # the empty-vocab trap gives 1 token
            raise TokenizerError(f"tokenizer from {name} looks broken: {self.vocab_size} tokens, EOS id {eos} "
                                 f"(is vocab.json empty or not GPT-2's?); {HOW_TO_FIX}")
        self.eos_token_id = int(eos)
        self.hf.model_max_length = int(1e30)  # we chunk long documents ourselves; silence HF's length warning
        # BOS as the tokenizer's own template adds it (Llama 2/3, Mistral: yes; GPT-2, Qwen2: no). encode() never
        # adds it; the places that start a sequence (sampler prompts, STaR's training rows, the server) do.
        plain = hf_tokenizer.encode("a", add_special_tokens=False)
        templated = hf_tokenizer.encode("a", add_special_tokens=True)
        bos = hf_tokenizer.bos_token_id
        self.bos_token_id = int(bos) if bos is not None and templated == [bos] + plain else None

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.hf(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Ids) -> str:
        return self.hf.decode(_as_id_list(ids, self.vocab_size), clean_up_tokenization_spaces=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_token_id})"


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def _folder(folder: pathlib.Path, origin: str) -> "HFTokenizer":
    """The tokenizer of a folder: its tokenizer.json through AutoTokenizer, else GPT-2's BPE files."""
    if (folder / "tokenizer.json").is_file():
        return _load_auto(str(folder.resolve()))
    return _load_folder(str(_check_folder(folder, origin)))


def _check_folder(folder: pathlib.Path, origin: str) -> pathlib.Path:
    """`folder` if it holds vocab.json and merges.txt; otherwise a TokenizerError naming it, what is missing, the fix."""
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder {folder} ({origin}) does not exist; {HOW_TO_FIX}")
    missing = [f for f in BPE_FILES if not (folder / f).is_file()]
    if missing:
        raise TokenizerError(f"tokenizer folder {folder} ({origin}) lacks {' and '.join(missing)}; {HOW_TO_FIX}")
    return folder.resolve()


@functools.lru_cache(maxsize=None)
def _load_folder(folder: str) -> HFTokenizer:
    from transformers import GPT2TokenizerFast  # heavy import, only when BPE is asked for

    # from_pretrained(folder), NOT GPT2TokenizerFast(vocab_file=, merges_file=): the latter gives an empty vocab.
    try:
        hf = GPT2TokenizerFast.from_pretrained(folder)
    except TokenizerError:
        raise
    except Exception as e:  # a damaged vocab.json / merges.txt / tokenizer.json: json or tokenizers errors
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise TokenizerError(f"tokenizer folder {folder} could not be loaded ({type(e).__name__}: {detail}); one of "
                             f"its files (vocab.json, merges.txt, tokenizer.json) is damaged: copy them again from "
                             f"the original tokenizer") from None
    return HFTokenizer(hf, name=folder)


@functools.lru_cache(maxsize=None)
def _load_auto(folder: str) -> HFTokenizer:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # a damaged tokenizer.json / tokenizer_config.json
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise TokenizerError(f"tokenizer folder {folder} could not be loaded ({type(e).__name__}: {detail}); its "
                             f"tokenizer.json or tokenizer_config.json is damaged: copy them again from the model's "
                             f"folder") from None
    return HFTokenizer(hf, name=folder)


@functools.lru_cache(maxsize=None)
def _load_hub(repo_id: str, local_files_only: bool) -> HFTokenizer:
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(repo_id, local_files_only=local_files_only), name=repo_id)


def _online() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "1") == "0"  # offline unless explicitly told otherwise


def _looks_like_path(spec: str) -> bool:
    return os.path.isabs(spec) or spec.startswith((".", "~")) or os.path.exists(spec)


def _from_hub(repo_id: str, tried: list[str]) -> HFTokenizer:
    """The HF cache (never the network), then the hub when online; a TokenizerError listing `tried` otherwise."""
    attempts = [True, False] if _online() else [True]
    for local_only in attempts:
        try:
            return _load_hub(repo_id, local_only)
        except TokenizerError:
            raise
        except Exception as e:  # HF raises OSError / ValueError / hub errors, depending on version and cause
            tried.append(f"{'HF cache' if local_only else 'hub'} {repo_id!r}: {type(e).__name__}")
    if not _online():
        tried.append("the hub (skipped: offline; set HF_HUB_OFFLINE=0 to allow downloads)")
    raise TokenizerError(f"no tokenizer found for {repo_id!r}; tried {'; '.join(tried)}. To fix: {HOW_TO_FIX}")


def get_tokenizer(spec: Union[str, os.PathLike] = "gpt2") -> Tokenizer:
    """A tokenizer for `spec`: "byte"; "gpt2" (found locally, see the module docstring); a folder; or a hub id.

    Loaded tokenizers are cached by their resolved folder / hub id, so every caller shares one instance.
    """
    spec = os.fspath(spec)
    if spec == "byte":
        return _BYTE
    if os.path.isdir(spec):
        return _folder(pathlib.Path(spec), "given folder")
    if _looks_like_path(spec):
        return _folder(pathlib.Path(spec).expanduser(), "given folder")
    if spec == "gpt2":
        if os.environ.get(ENV_DIR):  # set explicitly: a bad value is an error, not a reason to look elsewhere
            return _load_folder(str(_check_folder(pathlib.Path(os.environ[ENV_DIR]).expanduser(), f"${ENV_DIR}")))
        if (SHARED_GPT2_DIR / BPE_FILES[0]).is_file():
            return _load_folder(str(_check_folder(SHARED_GPT2_DIR, "shared data")))
        tried = ["folder ./gpt2 (absent)", f"${ENV_DIR} (unset)", f"{SHARED_GPT2_DIR} (absent)"]
        return _from_hub("gpt2", tried)
    return _from_hub(spec, [f"folder ./{spec} (absent)"])


_BYTE = ByteTokenizer()
