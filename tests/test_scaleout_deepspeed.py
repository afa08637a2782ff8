"""DeepSpeed accumulates right (issue 11): accelerate's DeepSpeed backward steps the engine whenever
``sync_gradients`` is True, and the trainer used to leave it True on every micro-batch, so ZeRO stepped the
optimizer grad_accum times per window.

Runs on CPU: DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) over gloo, two processes under torchrun. accelerate
picks no process-group backend for DeepSpeed on a machine without GPUs, so the worker names gloo itself.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora
from lora.trainer import Trainer, _configure_deepspeed
from test_trainer import setup

TESTS = Path(__file__).parent
TRAIN = dict(packing=False, grad_accum=2, max_steps=3, learning_rate=5e-3)

WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from accelerate import PartialState
    PartialState(backend="gloo")  # accelerate finds no backend for DeepSpeed without GPUs
    from safetensors.torch import save_file
    import lora
    from lora.trainer import Trainer
    from test_trainer import setup

    model, _, examples, cfg = setup(Path({tmp!r}), batch_size=2, **{train!r})
    trainer = Trainer(model, cfg, examples)
    assert trainer.deepspeed and trainer.world == 2, (trainer.deepspeed, trainer.world)
    ds = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_accumulation_steps"] == 2, ds
    trainer.train()
    if trainer.accelerator.is_main_process:
        save_file({{k: v.contiguous() for k, v in lora.adapter_state_dict(model).items()}}, {out!r})
""")


def test_zero2_on_two_processes_with_accumulation_matches_one_process(tmp_path):
    model, _, examples, cfg = setup(tmp_path / "single", batch_size=4, **TRAIN)
    Trainer(model, cfg, examples).train()
    single = lora.adapter_state_dict(model)

    script, out = tmp_path / "ds.py", tmp_path / "ds.safetensors"
    script.write_text(WORKER.format(tests=str(TESTS), tmp=str(tmp_path / "ds"), train=TRAIN, out=str(out)))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "ACCELERATE_USE_DEEPSPEED": "true",
           "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # accelerate would then ignore DeepSpeed
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", str(script)], capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the DeepSpeed run hung")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = load_file(out)
    assert set(ds) == set(single)
    for key, value in single.items():
        torch.testing.assert_close(ds[key], value, atol=1e-6, rtol=0.0, msg=key)


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
    _configure_deepspeed(acc, lora.TrainConfig(batch_size=3, grad_accum=4, max_grad_norm=0.5))
    ds = acc.state.deepspeed_plugin.deepspeed_config
    # an accelerate config file's 8 would make the engine divide every loss by 8 and step on its own count
    assert ds["gradient_accumulation_steps"] == 4 and acc.gradient_accumulation_steps == 4
    assert ds["train_micro_batch_size_per_gpu"] == 3 and "train_batch_size" not in ds
    assert ds["gradient_clipping"] == 0.5 and ds["zero_allow_untested_optimizer"] is True
    _configure_deepspeed(acc, lora.TrainConfig(max_grad_norm=None))
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed's "no clipping"
