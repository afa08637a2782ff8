"""The installed package, as a user gets it: a wheel built from the repository's files (what a fresh clone holds),
installed into a new virtual environment, and `lora train sft` run from an empty folder, with the bundled data.

Close to `pip install .` in a new venv, within a test's time: the wheel is built and installed without its
dependencies, which the new environment takes from this one's site-packages (torch and the rest are not
reinstalled); nothing of the repository is on its path, so the `lora` it runs is the installed one.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import make_char_tokenizer, make_llama_for

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the new environment's bin folder, the wheel) built from a copy of the files a clone of the repository has
    (tracked, plus new files git does not ignore), so the build leaves nothing in the working tree."""
    tmp = tmp_path_factory.mktemp("install")
    listed = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout
    clone = tmp / "clone"
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():  # a file deleted from the work tree but not yet from git's index is left out
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", tmp / "wheels", clone)
    wheel = next((tmp / "wheels").glob("lora-*.whl"))
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    # this environment's packages (torch, transformers, ...) as a plain path entry: its own .pth files, among them
    # the editable install of this repository, are not run, so only the wheel's lora can be imported
    site = Path(run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
                .stdout.strip())
    (site / "host_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps",
        "--no-index", wheel)
    return venv / "bin", wheel


def test_the_wheel_holds_every_subpackage_and_the_bundled_data(installed):
    _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("lora", "lora/data", "lora/train", "lora/export", "lora/recipes"):
        assert f"{package}/__init__.py" in names, package
    for data in ("extract_train.jsonl", "extract_eval.jsonl", "spam_train.jsonl", "notes_train.jsonl",
                 "prefs_train.jsonl", "README.md"):
        assert f"lora/recipes/data/{data}" in names, data
    assert not any(n.startswith(("tests/", "recipes/", "bench/")) for n in names)


def test_lora_train_sft_runs_from_an_empty_folder_after_install(installed, tmp_path):
    bin_dir, _ = installed
    tok = make_char_tokenizer()
    make_llama_for(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    where = run(bin_dir / "python", "-c", "import lora, lora.recipes; print(lora.__file__); print(lora.recipes.DATA)",
                cwd=empty, env=env).stdout.split()
    assert all(str(bin_dir.parent) in line for line in where), where  # the installed copy, not the repository's
    # the embedded model takes ~8 s a step and minutes of exact match on this CPU: a tiny model stands in for it,
    # and everything else is the recipe's default (the bundled data, found inside the installed package)
    proc = run(bin_dir / "lora", "train", "sft", "max_steps=2", f"model={tmp_path / 'model'}",
               "eval_max_new_tokens=2", cwd=empty, env=env)
    adapter = empty / "adapters" / "sft"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    metrics = json.loads((empty / "runs" / "sft" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["adapter"] == "adapters/sft"
    card = (adapter / "README.md").read_text()
    assert "extract_train.jsonl" in card and "| train_examples | 1000 |" in card and "| steps | 2 of 2 |" in card
    assert "adapter saved to adapters/sft" in proc.stdout
    helped = run(bin_dir / "lora", "train", "sft", "--help", cwd=empty, env=env).stdout
    assert f"train_file (str) = '{where[1]}/extract_train.jsonl'" in helped
