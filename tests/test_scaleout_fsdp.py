"""FSDP2 through accelerate on two CPU processes (gloo) trains as one process does, and saves whole adapters
(issue 11).

accelerate turns FSDP on only for accelerator process groups (its state.py leaves MULTI_CPU out), though torch's
FSDP2 itself runs over gloo. The worker therefore sets up accelerate's CPU state and switches it to FSDP2 before the
Trainer builds its Accelerator; from there on the run takes accelerate's own FSDP2 path (``fully_shard`` of every
decoder layer, then the root) and the Trainer's, unchanged: probes, packed training, evaluation, checkpoints, save,
and resuming from a checkpoint (sharded weights and AdamW moments put back).
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
from lora.train import Trainer
from test_trainer import setup

TESTS = Path(__file__).parent
# 2 processes x batch_size 2 x grad_accum 2 = 1 process x batch_size 4 x grad_accum 2
TRAIN = dict(grad_accum=2, max_steps=3, learning_rate=5e-3, save_every=2)
KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

WORKER = textwrap.dedent("""
    import shutil, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import torch.distributed as dist
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    Accelerator(cpu=True)  # DDP over gloo, switched to FSDP2 below
    for state in (PartialState(), AcceleratorState()):  # AcceleratorState copies PartialState's on every init
        state.distributed_type = DistributedType.FSDP
    AcceleratorState().fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"])

    import lora
    from lora.train.checkpoint import is_sharded
    from lora.train import Trainer
    from test_trainer import setup

    model, _, examples, cfg = setup(Path({tmp!r}), batch_size=2, **{train!r})
    trainer = Trainer(model, cfg, examples, eval_data=examples[:6])
    assert trainer.accelerator.distributed_type == "FSDP" and trainer.world == 2 and trainer.packing
    assert is_sharded(model)
    shard = lora.adapter_state_dict(model)[{key!r}]
    print(f"RANK {{dist.get_rank()}} shard {{type(shard).__name__}} {{tuple(shard.to_local().shape)}}", flush=True)
    result = trainer.train()  # evaluation at the end runs on every process, inside the root's forward
    print(f"RANK {{dist.get_rank()}} eval_loss {{result.eval_loss!r}}", flush=True)
    trainer.save_adapter({out!r})

    # resume the same run from its step-2 checkpoint: sharded weights and AdamW moments back in place
    checkpoints = Path({tmp!r}) / "out" / "checkpoints"
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(checkpoints / "step-0000003")
    dist.barrier()
    model, _, examples, cfg = setup(Path({tmp!r}), batch_size=2, resume=True, **{train!r})
    trainer = Trainer(model, cfg, examples, eval_data=examples[:6])
    assert trainer.train().steps == 3
    trainer.save_adapter({out!r} + "-resumed")
""")


def test_fsdp2_on_two_processes_trains_evaluates_saves_and_resumes_as_one_process(tmp_path):
    model, _, examples, cfg = setup(tmp_path / "single", batch_size=4, **TRAIN)
    single = Trainer(model, cfg, examples, eval_data=examples[:6]).train()
    expected = lora.adapter_state_dict(model)

    script, out = tmp_path / "fsdp.py", tmp_path / "adapter"
    script.write_text(WORKER.format(tests=str(TESTS), tmp=str(tmp_path / "fsdp"), train=TRAIN, key=KEY,
                                    out=str(out)))
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", str(script)], capture_output=True, text=True, timeout=180,
                              env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail("the FSDP run hung")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # what a save without gathering would have written: half of lora_A (r=4 rows) on each process
    # (the two ranks print at once, so their lines may share one line of the captured output)
    shards = sorted(re.findall(r"RANK \d shard \w+ \(\d+, \d+\)", proc.stdout))
    rank, width = expected[KEY].shape
    assert shards == [f"RANK {i} shard DTensor ({rank // 2}, {width})" for i in (0, 1)], proc.stdout
    losses = [float(x) for x in re.findall(r"RANK \d eval_loss ([\d.e+-]+)", proc.stdout)]
    assert len(losses) == 2 and all(abs(x - single.eval_loss) < 1e-6 for x in losses), (losses, single.eval_loss)

    saved = load_file(out / "adapter_model.safetensors")
    final = load_file(tmp_path / "fsdp" / "out" / "checkpoints" / "step-0000003" / "adapter" /
                      "adapter_model.safetensors")  # written by the resumed run
    resumed = load_file(tmp_path / "adapter-resumed" / "adapter_model.safetensors")
    assert set(saved) == set(final) == set(resumed) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value, atol=1e-6, rtol=0.0, msg=key)
        assert torch.equal(resumed[key], saved[key]), key  # resumed from step 2: bit for bit
        assert torch.equal(final[key], saved[key]), key
