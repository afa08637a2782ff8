"""Step time of two CPU processes (DDP over gloo) against one, at the same global batch.

    python bench/ddp_speed.py                      # small Llama (hidden 256, 4 layers), 16 rows x 128 tokens/step
    python bench/ddp_speed.py --hidden 64 --steps 10

Runs itself three times: as one process with batch_size 2b on all cores and on one thread, and under torchrun as
two processes with batch_size b (ACCELERATE_USE_CPU: gloo) and cores / 2 threads each. Prints seconds per
optimizer step (the first two steps are warm-up and not counted) and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=args.seq_len))
    lora.inject(model, lora.LoraConfig(r=8, alpha=16))
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "targets": ids[1:] + [-100]}
            for ids in torch.randint(3, 512, (args.global_batch * (args.steps + 2), args.seq_len), generator=g).tolist()]
    times: list[float] = []

    def clock(trainer, step, metrics):
        times.append(time.perf_counter())

    cfg = lora.TrainConfig(output_dir=args.out, batch_size=args.global_batch // args.processes, grad_accum=1,
                           max_steps=args.steps + 2, seq_len=args.seq_len, packing=False, log_every=1000,
                           precision="fp32", warmup_ratio=0.0)
    trainer = lora.Trainer(model, cfg, rows, callbacks=[clock])
    assert trainer.world == args.processes, (trainer.world, args.processes)
    trainer.train()
    if trainer.accelerator.is_main_process:
        per_step = (times[-1] - times[1]) / (len(times) - 2)  # steps 3.. : after warm-up
        print("RESULT " + json.dumps({"processes": args.processes, "seconds_per_step": per_step}), flush=True)


def run(args: argparse.Namespace, processes: int, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ACCELERATE_USE_CPU": "true"}
    with tempfile.TemporaryDirectory() as out:
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in (("hidden", args.hidden), ("layers", args.layers),
                 ("seq_len", args.seq_len), ("global_batch", args.global_batch), ("steps", args.steps))]
        flags += ["--worker", f"--processes={processes}", f"--out={out}"]
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] \
            if processes == 2 else [sys.executable]
        proc = subprocess.run(launch + [__file__, *flags], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])["seconds_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    cores = os.cpu_count() or 2
    one_all = run(args, 1, cores)  # one process on all the cores
    one_single = run(args, 1, 1)  # one process on one core: what each of the two DDP processes has
    two = run(args, 2, max(1, cores // 2))
    print(f"cores: {cores}, model: hidden {args.hidden} x {args.layers} layers, global batch "
          f"{args.global_batch} rows x {args.seq_len} tokens, {args.steps} timed steps")
    print(f"1 process, {cores} threads (batch_size {args.global_batch}):      {one_all * 1000:8.1f} ms/step")
    print(f"1 process, 1 thread (batch_size {args.global_batch}):       {one_single * 1000:8.1f} ms/step")
    print(f"2 processes, {max(1, cores // 2)} thread(s) each (batch_size {args.global_batch // 2}): "
          f"{two * 1000:8.1f} ms/step")
    print(f"ratio 2-process / 1-process step time: {two / one_all:.2f} (against {cores} threads), "
          f"{two / one_single:.2f} (against 1 thread)")


if __name__ == "__main__":
    main()
