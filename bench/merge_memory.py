"""Peak memory and time of merging an adapter into the 135M default model: the streaming export with and without
its read-back check, a q8_0 GGUF likewise, and the in-memory route.

    .venv/bin/python bench/merge_memory.py --adapter adapters/sft

Each route runs in a fresh process; its peak resident memory (ru_maxrss) is read when it exits, and its wall time
includes Python's start and imports. "imports only" is the floor every route pays (Python, torch, transformers).
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ROUTES = {
    "imports only": "import torch, transformers, lora, lora.export",
    "streaming, no check (lora merge --no-verify)":
        "from lora.export import export_merged; export_merged({model!r}, {adapter!r}, {out!r}, verify=False)",
    "streaming + read-back check (lora merge)":
        "from lora.export import export_merged; export_merged({model!r}, {adapter!r}, {out!r})",
    "q8_0 GGUF, no check (--no-verify)": "from lora.export import export_gguf; "
                                        "export_gguf({model!r}, {out!r} + '.gguf', {adapter!r}, 'q8_0', verify=False)",
    "q8_0 GGUF + read-back check": "from lora.export import export_gguf; "
                                  "export_gguf({model!r}, {out!r} + '.gguf', {adapter!r}, 'q8_0')",
    "in memory (load, merge_and_unload, save_pretrained)": (
        "import lora; m, t = lora.load_model({model!r}); lora.load_adapter(m, {adapter!r}); "
        "lora.merge_and_unload(m).save_pretrained({out!r}); t.save_pretrained({out!r})"),
}


def peak_rss(code: str) -> tuple[int, float]:
    """Peak RSS in bytes and wall seconds of a fresh Python process running ``code`` (it reports its own
    ru_maxrss, in KiB)."""
    report = "; import resource; print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code + report], check=True, capture_output=True, text=True).stdout
    return int(out.rsplit("PEAK", 1)[1]) * 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", default=str(ROOT / "adapters" / "sft"))
    args = parser.parse_args()
    from lora.export import resolve_base_folder

    folder = resolve_base_folder(args.model)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(f"base weights on disk: {size / 1e6:.0f} MB ({folder})")
    print("| route | peak RSS | minus imports | wall time |")
    print("|---|---|---|---|")
    floor = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, code) in enumerate(ROUTES.items()):
            rss, seconds = peak_rss(code.format(model=args.model, adapter=args.adapter, out=f"{tmp}/out{i}"))
            floor = floor or rss
            print(f"| {name} | {rss / 1e6:.0f} MB | {(rss - floor) / 1e6:.0f} MB | {seconds:.1f} s |")


if __name__ == "__main__":
    main()
