"""The loss curve a run leaves in its output folder (``loss_curve.png``)."""

from __future__ import annotations

from pathlib import Path


def plot_loss_curve(history: list[dict], path: Path) -> None:
    """Train loss per step, and the eval loss where it was measured, as a PNG at ``path``; for a run on a reward
    (GRPO), the mean reward of the sampled completions per step and the held-out reward, on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["loss"] for h in history], label="train loss")
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    if any("reward" in h for h in history):
        right = ax.twinx()
        rewarded = [h for h in history if "reward" in h]
        right.plot([h["step"] for h in rewarded], [h["reward"] for h in rewarded], color="tab:green",
                   label="reward (sampled)")
        held_out = [h for h in history if "eval_reward" in h]
        if held_out:
            right.plot([h["step"] for h in held_out], [h["eval_reward"] for h in held_out], "s-",
                       color="tab:red", label="held-out reward")
        right.set_ylabel("reward")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
