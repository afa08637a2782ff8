"""FSDP2 on two CPU processes (gloo): a checkpoint's adapter is saved whole, never as shards (issue 11).

accelerate turns FSDP on only for GPU-like process groups (its state.py leaves MULTI_CPU out), so the Trainer's
FSDP path cannot run on CPU; torch's FSDP2 itself can. The worker shards a LoRA model with ``fully_shard`` as
accelerate's FSDP2 does (each decoder layer, then the root) and saves through the Trainer's own code path.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora
from conftest import make_llama, randomize_adapters

TESTS = Path(__file__).parent

WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    import lora
    from lora.checkpoint import is_sharded, whole_parameters
    from conftest import make_llama, randomize_adapters

    dist.init_process_group("gloo")
    model = make_llama(seed=0)
    lora.inject(model, lora.LoraConfig(r=4, alpha=8))
    randomize_adapters(model, seed=3)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert is_sharded(model)
    shard = lora.adapter_state_dict(model)[{key!r}]
    print(f"RANK {{dist.get_rank()}} shard {{type(shard).__name__}} {{tuple(shard.to_local().shape)}}", flush=True)
    with whole_parameters(model):  # every process gathers
        if dist.get_rank() == 0:
            lora.save_adapter(model, {out!r})
    assert type(model.model.layers[0].self_attn.q_proj.lora_A["default"].weight).__name__ == "DTensor"  # resharded
    dist.barrier()
    dist.destroy_process_group()
""")

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_an_fsdp2_sharded_adapter_is_saved_whole(tmp_path):
    reference = make_llama(seed=0)
    lora.inject(reference, lora.LoraConfig(r=4, alpha=8))
    randomize_adapters(reference, seed=3)
    expected = lora.adapter_state_dict(reference)

    script, out = tmp_path / "fsdp.py", tmp_path / "adapter"
    script.write_text(WORKER.format(tests=str(TESTS), out=str(out), key=KEY))
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", str(script)], capture_output=True, text=True, timeout=180,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail("the FSDP run hung")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # what a save without gathering would have written: half of lora_A (r=4 rows) on each process
    # the two ranks print at once, so their lines may share one line of the captured output
    shards = sorted(re.findall(r"RANK \d shard \w+ \(\d+, \d+\)", proc.stdout))
    assert shards == ["RANK 0 shard DTensor (2, 16)", "RANK 1 shard DTensor (2, 16)"], proc.stdout
    saved = load_file(out / "adapter_model.safetensors")
    assert set(saved) == set(expected)
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key
