"""lm-eval parity: eval_harness.py's model (mesh_transformer/lm_eval_adapter.py) against lm-eval's own `hf` model
(HFLM on GPTJForCausalLM, fp32), on one tiny random GPT-J saved as an HF folder with a small byte-level BPE tokenizer
trained here. Four local tasks (lm-eval YAMLs over JSONL files written to a temp dir; nothing is downloaded):
multiple choice, a LAMBADA-style last word (half the words are HF's own greedy continuation, so accuracy is not a
trivial 0), generate_until, and loglikelihood_rolling over documents longer than
the model's seq (so the rolling windows are used). Same per-request log-likelihoods (|diff| < 1e-4), same
accuracies, the same generated text.
"""
import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")

from mesh_transformer.config import load_config  # noqa: E402
from mesh_transformer.hf import save_hf_gptj  # noqa: E402
from mesh_transformer.model import CausalTransformer  # noqa: E402

from helpers import random_params  # noqa: E402

SEQ = 48
WORDS = ("the cat sat on a mat and the dog ran to the red barn while birds sang over green hills near "
         "blue water every morning as old men told long stories of ships stars and quiet towns").split()


def _sentences(rs, n, lo, hi):
    return [" ".join(rs.choice(WORDS, rs.randint(lo, hi))) for _ in range(n)]


def _last_words(hf_dir, tok, contexts):
    """LAMBADA-style (context, last word) pairs; for every other context the word is HF's greedy continuation
    (2 tokens, kept when it tokenizes back to those tokens), so some answers are right and accuracy is not 0."""
    import transformers

    hf = transformers.GPTJForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    for i, ctx in enumerate(contexts):
        word = " " + ctx.split(" ")[-1]
        ctx = " ".join(ctx.split(" ")[:-1])
        if i % 2 == 0:
            ids = torch.tensor([tok.encode(ctx)])
            with torch.no_grad():
                new = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=2,
                                  min_new_tokens=2, pad_token_id=0)[0, ids.shape[1]:].tolist()
            greedy = tok.decode(new)
            if tok.encode(ctx + greedy) == tok.encode(ctx) + new and "\ufffd" not in greedy:
                word = greedy
        out.append({"text": ctx, "target": word})
    return out


def _write_tasks(folder, rs, hf_dir, tok):
    """Four task YAMLs over JSONL files in `folder`."""
    def jsonl(name, rows):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    mc = [{"question": q, "choices": list(rs.choice(WORDS, 3, replace=False)), "label": int(rs.randint(3))}
          for q in _sentences(rs, 12, 3, 8)]
    lam = _last_words(hf_dir, tok, _sentences(rs, 12, 4, 10))
    gen = [{"question": q, "answer": str(rs.choice(WORDS))} for q in _sentences(rs, 6, 2, 6)]
    # 40-60 words: 100+ tokens, more than SEQ, so several rolling windows per document
    roll = [{"text": t} for t in _sentences(rs, 4, 40, 60)] + [{"text": "a short one"}]
    common = "dataset_path: json\ntest_split: test\n"
    specs = {
        "local_mc": (mc, "output_type: multiple_choice\ndoc_to_text: \"Q: {{question}}\\nA:\"\n"
                         "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
                         "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
        "local_lambada": (lam, "output_type: loglikelihood\n"
                               "doc_to_text: \"{{text}}\"\ndoc_to_target: \"{{target}}\"\n"
                               "metric_list:\n  - metric: perplexity\n  - metric: acc\n"),
        "local_gen": (gen, "output_type: generate_until\ndoc_to_text: \"Q: {{question}}\\nA:\"\n"
                           "doc_to_target: \" {{answer}}\"\n"
                           "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  do_sample: false\n  max_gen_toks: 6\n"
                           "metric_list:\n  - metric: exact_match\n"),
        "local_rolling": (roll, "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
                                "doc_to_target: \"{{text}}\"\n"
                                "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                                "  - metric: bits_per_byte\n"),
    }
    for name, (rows, body) in specs.items():
        data = jsonl(name, rows)
        (folder / f"{name}.yaml").write_text(f"task: {name}\n{common}dataset_kwargs:\n  data_files:\n"
                                             f"    test: {data}\n{body}")
    return list(specs)


def _train_bpe(folder, rs):
    """A byte-level BPE of ~300 tokens (EOS <|endoftext|> = 0), saved as a GPT-2 tokenizer folder."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_sentences(rs, 300, 3, 20), vocab_size=300, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(folder))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    rs = np.random.RandomState(0)
    hf_dir = root / "hf"
    hf_dir.mkdir()
    _train_bpe(hf_dir, rs)
    from mesh_transformer.tokenizer import get_tokenizer
    tok = get_tokenizer(str(hf_dir))
    assert tok.eos_token_id == 0 and 256 < tok.vocab_size <= 320
    cfg = load_config(dict(layers=2, d_model=64, n_heads=4, n_vocab=320, seq=SEQ, pe_rotary_dims=8,
                           compute_dtype="float32", tokenizer=str(hf_dir)))
    params = random_params(CausalTransformer(cfg), seed=4)
    # logits of a plausible scale, not one-hot, and no favourite token; tokens that decode to no printable text
    # (single bytes of multi-byte characters) made unlikely, so generations are words whose differences show
    params["projection/lm_head"]["w"] *= 0.3
    unprintable = [i for i in range(tok.vocab_size) if not tok.decode([i]).isprintable() or "\ufffd" in tok.decode([i])]
    params["projection/lm_head"]["b"][:] = 0.0
    params["projection/lm_head"]["b"][unprintable] = -6.0
    params["projection/lm_head"]["b"][tok.vocab_size:] = -6.0
    save_hf_gptj(cfg, params, str(hf_dir), eos_token_id=0)
    tasks_dir = root / "tasks"
    tasks_dir.mkdir()
    names = _write_tasks(tasks_dir, rs, str(hf_dir), tok)
    return dict(hf_dir=str(hf_dir), tasks_dir=str(tasks_dir), names=names, root=root)


def _evaluate(model, setup):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=setup["tasks_dir"], include_defaults=False)
    return lm_eval.simple_evaluate(model=model, tasks=setup["names"], num_fewshot=0, task_manager=tm,
                                   log_samples=True, bootstrap_iters=0)


def _responses(results, task):
    """Per request, in document order: the raw model answers (floats for scores, text for generations)."""
    out = []
    for doc in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        for resp in doc["resps"]:
            out.append(resp[0])
    return out


@pytest.fixture(scope="module")
def both(setup):
    from lm_eval.models.huggingface import HFLM

    from mesh_transformer.lm_eval_adapter import MeshTransformerLM

    import argparse

    from mesh_transformer.loading import sampler_from_args
    ns = argparse.Namespace(config=None, ckpt=None, ckpt_step=None, hf=setup["hf_dir"], tokenizer=None,
                            cores_per_replica=2, compute_dtype="float32", seed=0)
    sampler, tok = sampler_from_args(ns)
    ours = _evaluate(MeshTransformerLM(sampler, tok, batch_size=8), setup)
    hf = HFLM(pretrained=setup["hf_dir"], tokenizer=setup["hf_dir"], device="cpu", dtype="float32", batch_size=4,
              max_length=SEQ)
    ref = _evaluate(hf, setup)
    return ours, ref


@pytest.mark.parametrize("task", ["local_mc", "local_lambada", "local_rolling"])
def test_loglikelihoods_match_hflm(both, task):
    ours, ref = both
    a, b = _responses(ours, task), _responses(ref, task)
    assert len(a) == len(b) > 0
    ll_a = np.array([x[0] if isinstance(x, (list, tuple)) else x for x in a], np.float64)
    ll_b = np.array([x[0] if isinstance(x, (list, tuple)) else x for x in b], np.float64)
    diff = np.abs(ll_a - ll_b).max()
    print(f"\n{task}: {len(a)} requests, max |loglik ours - HFLM| = {diff:.2e}; "
          f"ours {ours['results'][task]}, HFLM {ref['results'][task]}")
    assert diff < 1e-4
    if task != "local_rolling":
        assert [x[1] for x in a] == [x[1] for x in b]  # is_greedy
    for metric, value in ref["results"][task].items():
        if metric.endswith("stderr,none") or not isinstance(value, float):
            continue
        if "acc" in metric:
            assert ours["results"][task][metric] == value, metric
        else:
            assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), metric


def test_rolling_documents_span_several_windows(setup):
    from mesh_transformer.tokenizer import get_tokenizer
    tok = get_tokenizer(setup["hf_dir"])
    lines = open(os.path.join(setup["tasks_dir"], "local_rolling.jsonl")).read().splitlines()
    lengths = [len(tok.encode(json.loads(line)["text"])) for line in lines]
    assert max(lengths) > 2 * SEQ, lengths


def test_generate_until_matches_hflm(both):
    ours, ref = both
    a, b = _responses(ours, "local_gen"), _responses(ref, "local_gen")
    print(f"\nlocal_gen: ours {a}\nHFLM {b}")
    assert a == b and len(a) == 6
    assert ours["results"]["local_gen"]["exact_match,none"] == ref["results"]["local_gen"]["exact_match,none"]


def test_eval_harness_cli(setup, tmp_path, capsys):
    import eval_harness
    from mesh_transformer.cli_util import run_main

    out = tmp_path / "res.json"
    argv = ["--hf", setup["hf_dir"], "--compute-dtype", "float32", "--include-path", setup["tasks_dir"],
            "--tasks", "local_mc,local_lambada", "--limit", "4", "--batch-size", "4", "--bootstrap-iters", "0",
            "--output-path", str(out), "--log-samples"]
    assert run_main(eval_harness.main, argv) == 0
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"local_mc", "local_lambada"}
    assert (tmp_path / "samples_local_mc.jsonl").exists()
    assert "local_mc" in capsys.readouterr().out
    assert run_main(eval_harness.main, ["--hf", setup["hf_dir"], "--tasks", "no_such_task",
                                        "--include-path", setup["tasks_dir"]]) == 1
    assert "error: unknown lm-eval task(s) no_such_task" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_harness.parse_args(["--help"])
