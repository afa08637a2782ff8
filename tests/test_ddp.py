"""Two CPU processes (DDP over gloo) train to the same adapter as one process with the same global batch: 2
processes x batch_size 2 x grad_accum 2 = 1 process x batch_size 4 x grad_accum 2.

Launched with torchrun: on CPU, `accelerate launch` starts one process unless MPI is set up, while `Accelerator`
reads torchrun's environment and, told to use the CPU (ACCELERATE_USE_CPU), runs DDP over gloo, as it does over
NCCL under `accelerate launch` on GPUs.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

import lora
from lora.trainer import Trainer

TESTS = Path(__file__).parent

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from safetensors.torch import save_file
    import lora
    from lora.trainer import Trainer
    from test_trainer import setup

    model, _, examples, cfg = setup(Path({tmp!r}), packing=False, batch_size=2, grad_accum=2, max_steps=3,
                                    learning_rate=5e-3)
    trainer = Trainer(model, cfg, examples)
    assert trainer.world == 2, trainer.world
    trainer.train()
    if trainer.accelerator.is_main_process:
        save_file({{k: v.contiguous() for k, v in lora.adapter_state_dict(model).items()}}, {out!r})
""")


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    from test_trainer import setup

    model, _, examples, cfg = setup(tmp_path / "single", packing=False, batch_size=4, grad_accum=2, max_steps=3,
                                    learning_rate=5e-3)
    Trainer(model, cfg, examples).train()
    single = lora.adapter_state_dict(model)

    script = tmp_path / "ddp.py"
    out = tmp_path / "ddp.safetensors"
    script.write_text(SCRIPT.format(tests=str(TESTS), tmp=str(tmp_path / "ddp"), out=str(out)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_file(out)
    assert set(ddp) == set(single)
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, atol=1e-6, rtol=1e-5)
