"""The ``lora`` command: ``lora train RECIPE``, ``lora eval``, ``lora info``, ``lora generate``, ``lora merge``,
``lora export gguf``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import USER_ERRORS, one_line
from .models import DEFAULT_MODEL


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


def _export_gguf(args: argparse.Namespace) -> None:
    from .export import export_base_and_adapter_gguf, export_gguf, write_modelfile

    out = Path(args.out)
    verify = not args.no_verify
    if args.adapter_only:
        if not args.adapter:
            raise ValueError("--adapter-only needs --adapter DIR")
        adapter_file = export_base_and_adapter_gguf(args.model, args.adapter, out, args.dtype,
                                                    check_base=not args.no_check_base, verify=verify)
        print(f"base {out} and adapter {adapter_file} written{'' if verify else ', not checked (--no-verify)'}")
    else:
        export_gguf(args.model, out, args.adapter, args.dtype, check_base=not args.no_check_base, verify=verify)
        adapter_file = None
        print(f"{out} written ({args.dtype}{', adapter merged' if args.adapter else ''}"
              f"{'' if verify else ', not checked (--no-verify)'})")
    modelfile = write_modelfile(args.model, out, args.temperature, adapter_file)
    print(f"{modelfile} written. Run it with Ollama:\n  cd {out.parent} && ollama create my-model -f Modelfile "
          f"&& ollama run my-model")


def _train(args: argparse.Namespace) -> None:
    """A recipe, exactly as its script in a clone runs it (``python recipes/NAME.py``): the same settings, help and
    errors (one line, exit status 1), through the same :func:`lora.recipe.run`."""
    from .recipe import run
    from .recipes import load, names

    if args.recipe is None:
        raise ValueError(f"lora train needs a recipe: lora train RECIPE [--config FILE.yaml] [key=value ...], "
                         f"RECIPE one of {', '.join(names())}")
    run(load(args.recipe).main, args.settings)


def _train_usage() -> str:
    from .recipes import load, names, summary

    lines = ["usage: lora train RECIPE [--config FILE.yaml] [key=value ...]", "",
             "Runs a training recipe (as python recipes/RECIPE.py does in a clone). `lora train RECIPE --help` lists "
             "its settings with their defaults.", "", "recipes:"]
    lines += [f"  {name:<10} {summary(load(name))}" for name in names()]
    lines += ["  FILE.py    a recipe of your own: a module that defines main(argv)"]
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> None:
    from .evaluation import data_metrics, data_table, lm_eval_tasks, load_for_eval, require_lm_eval, task_scores, \
        task_table
    from .recipe import write_json_atomically

    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if not args.data and not tasks:
        raise ValueError("nothing to evaluate: give --data FILE.jsonl (exact match and perplexity) and/or --tasks "
                         "T1,T2 (lm-evaluation-harness tasks)")
    if tasks:
        require_lm_eval()  # before the model is loaded
    model, tokenizer = load_for_eval(args.model, args.adapter, args.merge, check_base=not args.no_check_base)
    report = {"model": args.model, "adapter": args.adapter, "merged": args.merge, "data": [], "tasks": {}}
    for path in args.data or []:
        metrics = data_metrics(model, tokenizer, path, args.max_length, args.max_new_tokens, args.batch_size)
        report["data"].append(metrics)
        print(data_table(metrics))
    if tasks:
        results = lm_eval_tasks(model, tokenizer, tasks, args.include_path, args.num_fewshot, args.limit,
                                args.batch_size)
        report["tasks"] = task_scores(results)
        report["n_shot"], report["versions"] = results.get("n-shot", {}), results.get("versions", {})
        print(task_table(results))
    write_json_atomically(args.out, report)
    print(f"results written to {args.out}")


def _info(args: argparse.Namespace) -> None:
    import json

    from .info import describe, render

    info = describe(args.path)
    print(json.dumps(info, indent=2) if args.json else render(info))


def _data_inspect(args: argparse.Namespace) -> None:
    from .data import inspect_data
    from .models import load_model

    _, tokenizer = load_model(args.model)
    print(inspect_data(args.source, tokenizer, format=args.format, columns=args.columns, max_length=args.max_length,
                       show=args.show, mask_prompt=not args.no_mask_prompt))


NO_VERIFY_HELP = ("skip the check of what was written (by default it is read back, and its logits on a few fixed "
                  "prompts are compared with the base + adapter's before it replaces an earlier output). The check "
                  "loads the model twice, one copy after the other, in float32: about 4 bytes per parameter, twice "
                  "that while transformers reads a GGUF")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    # the recipe reads its own arguments (and its own --help), exactly as its script does
    train = commands.add_parser("train", add_help=False, help="train with a recipe (sft, classify, pretrain, dpo, "
                                                              "...): lora train RECIPE [--config F.yaml] key=value")
    train.add_argument("recipe", nargs="?", help="a recipe name, or the path of a .py file with main(argv)")
    train.add_argument("settings", nargs=argparse.REMAINDER, help="--config FILE.yaml and key=value settings")
    train.set_defaults(run=_train)

    ev = commands.add_parser("eval", help="exact match and perplexity on a data file, and lm-evaluation-harness tasks",
                             description="Evaluate a model, with an adapter applied (or merged: --merge), on data "
                                         "files and on lm-evaluation-harness tasks; prints tables and writes JSON.")
    ev.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded name, HF folder or .gguf (default "
                                                           f"{DEFAULT_MODEL})")
    ev.add_argument("--adapter", help="adapter folder to apply (ours or PEFT's)")
    ev.add_argument("--merge", action="store_true", help="merge the adapter into the weights first (plain layers, as "
                                                         "an exported model runs)")
    ev.add_argument("--data", action="append", metavar="FILE",
                    help="JSONL data: perplexity, and exact match for prompts with answers (repeatable)")
    ev.add_argument("--max-length", type=int, default=512, help="longest example in tokens, for --data (longer "
                                                                "ones are truncated)")
    ev.add_argument("--max-new-tokens", type=int, default=None,
                    help="tokens generated per prompt for exact match (default: the longest answer plus 4)")
    ev.add_argument("--tasks", help="lm-eval tasks, comma-separated (lm-eval's registry, or --include-path)")
    ev.add_argument("--include-path", help="a folder of lm-eval task YAML files of your own")
    ev.add_argument("--num-fewshot", type=int, default=None, help="examples per prompt (default: the task's)")
    ev.add_argument("--limit", type=float, default=None, help="documents per task (a count, or a fraction < 1)")
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--out", default="eval_results.json", help="the JSON file of results (default "
                                                               "eval_results.json)")
    ev.add_argument("--no-check-base", action="store_true",
                    help="apply the adapter even if its base-model fingerprint does not match --model")
    ev.set_defaults(run=_eval)

    info = commands.add_parser("info", help="what an adapter folder, GGUF file or model folder holds, and which "
                                            "readers take an adapter")
    info.add_argument("path", help="an adapter folder, a .gguf file, or a Hugging Face model folder")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=_info)

    data = commands.add_parser("data", help="look at training data as the recipes read it")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    inspect = data_commands.add_parser(
        "inspect", help="the detected format, stats, and the first examples with the trained tokens marked [[...]]")
    inspect.add_argument("source", help="a data file (JSONL, JSON, CSV/TSV, Parquet, text), a folder or glob of "
                                        "them, or a folder written by datasets' save_to_disk")
    inspect.add_argument("--model", default=DEFAULT_MODEL, help=f"whose tokenizer and chat template to use "
                                                                f"(default {DEFAULT_MODEL})")
    inspect.add_argument("--format", default=None, help="read the records as this format (default: detected)")
    inspect.add_argument("--columns", default=None, help="our field names for your columns, e.g. "
                                                         "prompt:question,completion:answer")
    inspect.add_argument("--max-length", type=int, default=None, help="cut examples (and text windows) to this")
    inspect.add_argument("--show", type=int, default=3, help="how many examples to print (default 3)")
    inspect.add_argument("--no-mask-prompt", action="store_true", help="show the loss on every token, as "
                                                                       "mask_prompt=False trains")
    inspect.set_defaults(run=_data_inspect)

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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"] and argv[1:2] in (["-h"], ["--help"]):  # the train parser leaves --help to the recipe
        print(_train_usage())
        return 0
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as e:
        print(f"lora {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
