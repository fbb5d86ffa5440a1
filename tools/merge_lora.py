"""Merge a LoRA adapter into its base GLM and write a plain checkpoint.

    python tools/merge_lora.py --model_name_or_path BASE --lora_path ADAPTER --output_dir OUT

OUT gets config.json, model_state.pdparams and BASE's tokenizer files; it loads with
GLMForConditionalGeneration.from_pretrained (ours or PaddleNLP's) and no adapter.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from glm.cli.arguments import ArgumentParser, switch  # noqa: E402
from glm.cli.console import LOG_LEVELS, configure_logging  # noqa: E402
from glm.cli.process import command  # noqa: E402
from glm.lora_merge import merge_lora_checkpoint  # noqa: E402


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", required=True, help="base checkpoint dir the adapter was trained on")
    parser.add_argument("--lora_path", required=True, help="adapter dir (lora_config.json + lora_model_state.pdparams)")
    parser.add_argument("--output_dir", required=True, help="new (or empty) directory for the merged checkpoint")
    parser.add_argument("--force", type=switch, nargs="?", const=True, default=False,
                        help="merge an adapter recorded for another same-shaped base (--force, or --force true)")
    parser.add_argument("--log_level", default="warning", choices=LOG_LEVELS, help="PaddleNLP's log lines (info: loading)")
    with command(also=(OSError,)):  # an OSError: e.g. a full disk while writing
        args = parser.parse_args(argv)
        configure_logging(["--log_level", args.log_level])
        merge_lora_checkpoint(args.model_name_or_path, args.lora_path, args.output_dir, args.force)
    print(f"merged {args.lora_path} into {args.model_name_or_path}: {args.output_dir}")


if __name__ == "__main__":
    main()
