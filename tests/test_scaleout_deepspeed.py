"""DeepSpeed accumulates right and saves whole adapters (issue 11).

accelerate's DeepSpeed backward steps the engine whenever ``sync_gradients`` is True, and the trainer used to leave
it True on every micro-batch, so ZeRO stepped the optimizer grad_accum times per window. ZeRO-3 leaves an empty
tensor in place of every parameter between forwards, so an adapter saved from the model as it stands is empty.

Runs on CPU: DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) over gloo, two processes under torchrun. accelerate
picks no process-group backend for DeepSpeed on a machine without GPUs, so the worker names gloo itself.
"""

import json
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
from lora.train.setup import configure_deepspeed
from test_trainer import setup

TESTS = Path(__file__).parent
TRAIN = dict(packing=False, grad_accum=2, max_steps=3, learning_rate=5e-3, save_every=2)
KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import deepspeed.ops
    # Else DeepSpeed compiles its shared-memory all-reduce for CPU first (about 40 s on a fresh machine); gloo's
    # all-reduce does the same job.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from pathlib import Path
    from accelerate import PartialState
    PartialState(backend="gloo")  # accelerate finds no backend for DeepSpeed without GPUs
    import torch.distributed as dist
    import lora
    from lora.train import Trainer
    from test_trainer import setup

    model, _, examples, cfg = setup(Path({tmp!r}), batch_size=2, **{train!r})
    trainer = Trainer(model, cfg, examples, eval_data=examples[:6])
    assert trainer.deepspeed and trainer.world == 2, (trainer.deepspeed, trainer.world)
    ds = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == {stage} and ds["gradient_accumulation_steps"] == 2, ds
    held = lora.adapter_state_dict(model)[{key!r}]  # what saving the model as it stands would write
    print(f"RANK {{dist.get_rank()}} holds {{tuple(held.shape)}}", flush=True)
    result = trainer.train()
    print(f"RANK {{dist.get_rank()}} eval_loss {{result.eval_loss!r}}", flush=True)
    trainer.save_adapter({out!r})
""")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_two_processes_with_accumulation_trains_evaluates_and_saves_as_one_process(tmp_path, stage):
    model, _, examples, cfg = setup(tmp_path / "single", batch_size=4, **TRAIN)
    single = Trainer(model, cfg, examples, eval_data=examples[:6]).train()
    expected = lora.adapter_state_dict(model)

    # ZeRO-3 keeps parameters under stage3_param_persistence_threshold whole; 0 partitions even this tiny model's
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}))
    script, out = tmp_path / "ds.py", tmp_path / "adapter"
    script.write_text(WORKER.format(tests=str(TESTS), tmp=str(tmp_path / "ds"), train=TRAIN, out=str(out),
                                    stage=stage, key=KEY))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "ACCELERATE_USE_DEEPSPEED": "true",
           "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config), "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # accelerate would then ignore DeepSpeed
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", str(script)], capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the DeepSpeed run hung")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    held = set(re.findall(r"RANK \d holds (\([\d, ]*\))", proc.stdout))
    assert held == {"(0,)" if stage == 3 else str(tuple(expected[KEY].shape))}, proc.stdout
    losses = [float(x) for x in re.findall(r"RANK \d eval_loss ([\d.e+-]+)", proc.stdout)]
    assert len(losses) == 2 and all(abs(x - single.eval_loss) < 1e-6 for x in losses), (losses, single.eval_loss)

    saved = load_file(out / "adapter_model.safetensors")
    final = load_file(tmp_path / "ds" / "out" / "checkpoints" / "step-0000003" / "adapter" /
                      "adapter_model.safetensors")
    assert set(saved) == set(final) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value, atol=1e-6, rtol=0.0, msg=key)
        assert torch.equal(final[key], saved[key]), key


def test_gradients_sync_only_on_the_last_micro_batch_of_a_window(tmp_path):
    """What makes DeepSpeed step once per window: accelerate steps its engine on backward iff sync_gradients."""
    model, _, examples, cfg = setup(tmp_path, batch_size=1, grad_accum=3, max_steps=2)
    trainer = Trainer(model, cfg, examples)
    seen, backward = [], trainer.accelerator.backward

    def record(loss, **kwargs):
        seen.append(trainer.accelerator.sync_gradients)
        backward(loss, **kwargs)

    trainer.accelerator.backward = record
    trainer.train()
    assert seen == [False, False, True] * 2
    assert trainer.accelerator.sync_gradients  # put back for whatever runs next


def test_the_deepspeed_plugin_takes_accumulation_batch_and_clipping_from_the_train_config():
    class Plugin:
        deepspeed_config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                            "gradient_accumulation_steps": 8, "gradient_clipping": "auto"}

    class Accelerator:
        state = type("State", (), {"deepspeed_plugin": Plugin()})()
        num_processes = 2
        gradient_accumulation_steps = 1

    acc = Accelerator()
    configure_deepspeed(acc, lora.TrainConfig(batch_size=3, grad_accum=4, max_grad_norm=0.5))
    ds = acc.state.deepspeed_plugin.deepspeed_config
    # an accelerate config file's 8 would make the engine divide every loss by 8 and step on its own count
    assert ds["gradient_accumulation_steps"] == 4 and acc.gradient_accumulation_steps == 4
    assert ds["train_micro_batch_size_per_gpu"] == 3 and "train_batch_size" not in ds
    assert ds["gradient_clipping"] == 0.5 and ds["zero_allow_untested_optimizer"] is True
    configure_deepspeed(acc, lora.TrainConfig(max_grad_norm=None))
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed's "no clipping"
