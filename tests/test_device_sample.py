"""device_sample.py end to end (in-process, tiny model): HF folder in, greedy text out equal to HF generate's;
prompts from stdin; a random init, with a warning, when the config names no checkpoint; one-line errors."""
import io
import json

import jax
import pytest

import device_sample
from mesh_transformer.cli_util import run_main
from mesh_transformer.hf import save_hf_gptj
from mesh_transformer.model import CausalTransformer
from mesh_transformer.tokenizer import get_tokenizer

TINY = dict(layers=2, d_model=64, n_heads=4, n_vocab=260, seq=64, pe_rotary_dims=8, compute_dtype="float32",
            tokenizer="byte")


def test_hf_folder_greedy_matches_hf_generate(tmp_path, capsys, monkeypatch):
    model = CausalTransformer(TINY)
    params = jax.jit(model.init)(jax.random.PRNGKey(3))
    save_hf_gptj(model.config, params, str(tmp_path / "hf"), eos_token_id=256)
    prompts = ["hello there", "ab"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(prompts) + "\n\n"))
    argv = ["--hf", str(tmp_path / "hf"), "--tokenizer", "byte", "--compute-dtype", "float32", "--temperature", "0",
            "--max-new-tokens", "6", "--jsonl", "--batch-size", "2"]
    assert run_main(device_sample.main, argv) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # reference: HF greedy on the same folder, prompt by prompt (no padding), EOS 256 ends a row as ours does
    torch = pytest.importorskip("torch")
    from transformers import GPTJForCausalLM

    hf = GPTJForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    tok = get_tokenizer("byte")
    want = []
    for text in prompts:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            new = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                              eos_token_id=256, pad_token_id=256)[0, ids.shape[1]:].tolist()
        want.append(tok.decode([i for i in new if i != 256]))
    assert [o["completion"] for o in out] == want
    assert [o["prompt"] for o in out] == [0, 1]


def test_random_init_warns_and_errors_are_one_line(capsys):
    argv = ["--config", "tiny", "--prompt", "abc", "--max-new-tokens", "3", "--num-samples", "2",
            "--temperature", "1", "--stop", "\\n"]
    assert run_main(device_sample.main, argv) == 0
    captured = capsys.readouterr()
    assert "RANDOMLY INITIALISED" in captured.err
    assert captured.out.count("=== prompt 0, sample") == 2
    assert run_main(device_sample.main, ["--prompt", "x"]) == 1
    assert "error: pass --config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        device_sample.parse_args(["--help"])
