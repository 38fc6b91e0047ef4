"""Convert text files into the TFRecord training format (one .tfrecords file + an index file).

Same interface as mesh-transformer-jax's script, plus --seq-len, --tokenizer and --loss-mask; the work is done by
tfrecord_utils.build.build_tfrecords.

    python create_finetune_tfrecords.py data/star_iter1/ star_iter1 --output-dir data/tfrecords \
        --seq-len 1536 --loss-mask completion
"""
import argparse
import sys

from mesh_transformer import run_lock
from mesh_transformer.cli_util import ERRORS_EPILOG, check_output_dir, remove_if_empty, run_main, setup_logging
from tfrecord_utils.build import ACCEPTED_EXTENSIONS, LOSS_MASK_MODES, build_tfrecords

DESCRIPTION = f"""\
Convert a text dataset into the training data format the model expects.

Input: one file, or a folder whose files ending with {", ".join(ACCEPTED_EXTENSIONS)} are all read (not recursively):
  .txt / .xz        the whole file is one text (.xz: xz-compressed)
  .jsonl / .jsonl.zst  one JSON object per line; its "text" field is one text (.zst: zstandard-compressed)
Each text is split into documents on the literal string '<|endoftext|>' (unless --treat-eot-as-text); each document
is tokenized and followed by the tokenizer's EOS; documents are shuffled (seed --seed), concatenated and cut into
sequences of --seq-len + 1 tokens (the trailing partial sequence is dropped), and the sequences are shuffled.

Output, in --output-dir: {{name}}_{{n_sequences}}.tfrecords (one tf.train.Example per sequence: int64 feature
"text", and "loss_mask" with --loss-mask completion) and {{name}}.index listing it (the loader reads the index).
The output folder is checked (created, writable) before any input is read, and one process at a time writes a
given name there ({{name}}.lock).
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION, epilog=ERRORS_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input_path", help="an input file, or a folder holding the input files (see above)")
    p.add_argument("name", help="output name: writes {name}_{n_sequences}.tfrecords and {name}.index")
    p.add_argument("--output-dir", default="", help="output folder, created if missing; a gs:// URL works too "
                                                    "(default: the current folder)")

    fmt = p.add_argument_group("tokens and sequences")
    fmt.add_argument("--seq-len", type=int, default=2048,
                     help="model context length; each record holds SEQ_LEN + 1 tokens (default: 2048, GPT-J's)")
    fmt.add_argument("--tokenizer", default="gpt2",
                     help='"gpt2" (GPT-2 BPE, found locally, EOS 50256), "byte" (UTF-8 bytes, EOS 256), or a folder '
                          "holding vocab.json and merges.txt (default: gpt2)")
    fmt.add_argument("--loss-mask", choices=LOSS_MASK_MODES, default="none",
                     help="none: no mask is written, every token is learned. completion: also write a "
                          "\"loss_mask\" feature that is 1 only on each document's completion, the tokens after its "
                          "last ':' (e.g. after 'A:' or 'Target:') up to and including EOS; documents without ':' are "
                          "learned whole (default: none)")

    clean = p.add_argument_group("data cleaning")
    clean.add_argument("--normalize-with-ftfy", action="store_true", help="fix text with ftfy (NFKC normalization)")
    clean.add_argument("--normalize-with-wikitext-detokenize", action="store_true",
                       help="undo wikitext-103's tokenization (' @-@ ' -> '-', ' , ' -> ', ', ...)")
    clean.add_argument("--min-unique-tokens", type=int, default=0,
                       help="exclude repetitive documents made of fewer than MIN_UNIQUE_TOKENS distinct tokens (they "
                            "can produce large gradients); <= 0 disables; 200 is a good value (default: 0)")
    clean.add_argument("--treat-eot-as-text", action="store_true",
                       help="do not split on '<|endoftext|>': keep it as text inside a document")

    shuf = p.add_argument_group("shuffling and packing")
    shuf.add_argument("--n-repack-epochs", type=int, default=1,
                      help="repeat the data N times, each shuffled and packed differently; set it to the number of "
                           "epochs you will train (default: 1)")
    shuf.add_argument("--seed", type=int, default=10, help="random seed for all shuffling (default: 10)")
    shuf.add_argument("--preserve-data-order", action="store_true",
                      help="no shuffling: files in name order, documents and sequences in input order")

    misc = p.add_argument_group("miscellaneous")
    misc.add_argument("--verbose", action="store_true",
                      help="log more, e.g. the documents removed by --min-unique-tokens and per-epoch counts")
    args = p.parse_args(argv)
    if args.seq_len < 1:
        p.error(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.n_repack_epochs < 1:
        p.error(f"--n-repack-epochs must be >= 1, got {args.n_repack_epochs}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    output_dir = args.output_dir or "."
    # the destination first: an unusable output folder fails before the corpus is read and tokenized
    existed = check_output_dir(output_dir, "--output-dir")
    try:
        _build(args, output_dir)
    except BaseException:
        if not existed:  # nothing half-made is left behind: not even the folder
            remove_if_empty(output_dir)
        raise
    return 0


def _build(args, output_dir: str) -> None:
    with run_lock.acquire(output_dir, owner="create_finetune_tfrecords.py",
                          what=f"output {args.name} in --output-dir {output_dir}", name=f"{args.name}.lock"):
        build_tfrecords(args.input_path, args.name, args.output_dir, seq_len=args.seq_len, tokenizer=args.tokenizer,
                        loss_mask=args.loss_mask, normalize_with_ftfy=args.normalize_with_ftfy,
                        normalize_with_wikitext_detokenize=args.normalize_with_wikitext_detokenize,
                        min_unique_tokens=args.min_unique_tokens, n_repack_epochs=args.n_repack_epochs,
                        seed=args.seed, preserve_data_order=args.preserve_data_order,
                        treat_eot_as_text=args.treat_eot_as_text, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(run_main(main))
