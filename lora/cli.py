"""The ``lora`` command: ``lora generate``, ``lora merge``, ``lora export gguf`` (training runs through the recipe
scripts in ``recipes/``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .models import DEFAULT_MODEL

# Failures the user can act on: our ValueErrors (they say what is wrong and how to fix it), a file that cannot be
# read or written, a NaN stop, Ctrl-C. They print one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, KeyboardInterrupt)


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (Ctrl-C has none of its own)."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return " ".join(str(error).splitlines()) or type(error).__name__


def _generate(args: argparse.Namespace) -> None:
    from .adapter_io import load_adapter
    from .generate import generate
    from .models import load_model

    model, tokenizer = load_model(args.model)
    if args.adapter:
        load_adapter(model, args.adapter, check_base=not args.no_check_base)
    text = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(text)


def _merge(args: argparse.Namespace) -> None:
    from .export import export_merged

    out = export_merged(args.model, args.adapter, args.out, max_shard_bytes=int(args.max_shard_gb * 1024**3),
                        check_base=not args.no_check_base, verify=not args.no_verify)
    if args.no_verify:
        print(f"{out} not checked (--no-verify)")
    print(f"merged model written to {out}  (AutoModelForCausalLM.from_pretrained('{out}') or vLLM)")


def _export_adapter_gguf_checked(args: argparse.Namespace, base_gguf: Path, out: Path) -> Path:
    """The adapter GGUF, written under a temporary name and renamed only once the base GGUF with it applied gives
    the adapter model's logits (or, where the check cannot apply it, once the base GGUF alone was checked)."""
    from .atomic import atomic_file
    from .export import export_adapter_gguf
    from .verify import verify_export

    with atomic_file(out) as tmp:
        export_adapter_gguf(args.model, args.adapter, tmp, check_base=not args.no_check_base)
        print(verify_export(args.model, args.adapter, base_gguf, adapter_gguf=tmp, name=f"{base_gguf} + {out.name}"),
              flush=True)
    return out


def _export_gguf(args: argparse.Namespace) -> None:
    from .export import check_adapter_gguf, export_adapter_gguf, export_gguf, write_modelfile

    out = Path(args.out)
    verify = not args.no_verify
    if args.adapter_only:
        if not args.adapter:
            raise ValueError("--adapter-only needs --adapter DIR")
        check_adapter_gguf(args.model, args.adapter, check_base=not args.no_check_base)  # before `out` is replaced
        export_gguf(args.model, out, None, args.dtype, verify=verify)  # checked against the base alone
        adapter_file = out.with_name(f"{out.stem}.adapter.gguf")
        if verify:
            _export_adapter_gguf_checked(args, out, adapter_file)
        else:
            export_adapter_gguf(args.model, args.adapter, adapter_file, check_base=not args.no_check_base)
        print(f"base {out} and adapter {adapter_file} written{'' if verify else ', not checked (--no-verify)'}")
    else:
        export_gguf(args.model, out, args.adapter, args.dtype, check_base=not args.no_check_base, verify=verify)
        adapter_file = None
        print(f"{out} written ({args.dtype}{', adapter merged' if args.adapter else ''}"
              f"{'' if verify else ', not checked (--no-verify)'})")
    modelfile = write_modelfile(args.model, out, args.temperature, adapter_file)
    print(f"{modelfile} written. Run it with Ollama:\n  cd {out.parent} && ollama create my-model -f Modelfile "
          f"&& ollama run my-model")


NO_VERIFY_HELP = ("skip the check of what was written (by default it is read back, and its logits on a few fixed "
                  "prompts are compared with the base + adapter's before it replaces an earlier output). The check "
                  "loads the model twice, one copy after the other, in float32: about 4 bytes per parameter, twice "
                  "that while transformers reads a GGUF")


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
    gen.add_argument("--no-check-base", action="store_true",
                     help="apply the adapter even if its base-model fingerprint does not match --model (e.g. a "
                          "base GGUF exported in f16 or q8_0, whose rounding the check cannot tell from another base)")
    gen.set_defaults(run=_generate)

    merge = commands.add_parser("merge", help="merge an adapter into the base weights: a Hugging Face folder")
    merge.add_argument("--model", default=DEFAULT_MODEL, help="base: embedded name or HF folder")
    merge.add_argument("--adapter", required=True, help="adapter folder (ours or PEFT's)")
    merge.add_argument("--out", required=True, help="output folder")
    merge.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard (GiB)")
    merge.add_argument("--no-check-base", action="store_true",
                       help="merge even if the adapter's base-model fingerprint does not match --model")
    merge.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    merge.set_defaults(run=_merge)

    export = commands.add_parser("export", help="export for other runtimes")
    formats = export.add_subparsers(dest="format", required=True)
    gguf = formats.add_parser("gguf", help="a GGUF file for llama.cpp / Ollama, and a Modelfile beside it")
    gguf.add_argument("--model", default=DEFAULT_MODEL,
                      help="base: embedded name or HF folder (the README's family table lists what exports)")
    gguf.add_argument("--adapter", help="adapter folder to merge in (or to export alone with --adapter-only)")
    gguf.add_argument("--out", required=True, help="the .gguf file to write")
    gguf.add_argument("--dtype", choices=("f32", "f16", "q8_0"), default="f16")
    gguf.add_argument("--adapter-only", action="store_true",
                      help="write the base and the adapter as separate GGUF files (Ollama's ADAPTER line)")
    gguf.add_argument("--temperature", type=float, default=0.7, help="PARAMETER temperature in the Modelfile")
    gguf.add_argument("--no-check-base", action="store_true",
                      help="export even if the adapter's base-model fingerprint does not match --model")
    gguf.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    gguf.set_defaults(run=_export_gguf)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as e:
        print(f"lora {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
