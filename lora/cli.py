"""The ``lora`` command: ``lora generate`` (training runs through the recipe scripts in ``recipes/``)."""

from __future__ import annotations

import argparse
import sys

from .models import DEFAULT_MODEL


def _generate(args: argparse.Namespace) -> None:
    from .adapter_io import load_adapter
    from .generate import generate
    from .models import load_model

    model, tokenizer = load_model(args.model)
    if args.adapter:
        load_adapter(model, args.adapter)
    text = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="sample text from a model, optionally with an adapter")
    gen.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded name, HF folder or .gguf (default "
                                                            f"{DEFAULT_MODEL})")
    gen.add_argument("--adapter", help="adapter folder to apply (ours or PEFT's)")
    gen.add_argument("--prompt", required=True, help="the user's message (framed by the chat template)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
    gen.add_argument("--top-k", type=int, default=50, help="0 means no limit")
    gen.add_argument("--top-p", type=float, default=0.95, help="1.0 means no limit")
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(run=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ValueError as e:  # our errors already say what is wrong and how to fix it
        print(f"lora {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
