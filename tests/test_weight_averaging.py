"""`fit(ema_decay=...)`: an exponential moving average of the weights is what gets validated, saved and resumed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_speed_options import ToySet, toy_model
from weakseg.config import PipelineCfg, load_config
from weakseg.io import CheckpointError
from weakseg.runs import StageContext, stage_fingerprint
from weakseg.train.loop import fit, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Killed(Exception):
    pass


def train(tmp_path, ema_decay: float, kill_at_call: int = 0, checkpoint_every: int = 0):
    """3 epochs x 4 steps of SGD on the toy set. -> (weights after each step, weights each validate() saw, model.pt).

    `kill_at_call`: raise in the loss of that call (1-based), as a killed process would stop mid-epoch."""
    ctx = StageContext(PipelineCfg(runs_dir=str(tmp_path), name="toy"), "toy", torch.device("cpu"))
    ctx.out.mkdir(parents=True, exist_ok=True)
    model = toy_model()
    trajectory, validated, calls = [], [], [0]

    def loss_fn(m, batch):
        calls[0] += 1
        if calls[0] == kill_at_call:
            raise Killed
        if calls[0] > 1:  # the weights the previous step produced
            trajectory.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return F.cross_entropy(m(batch[0]), batch[1])

    def validate(m):
        validated.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        return {"val_loss": -len(validated)}  # every epoch is better: model.pt = the last epoch's weights

    try:
        fit(ctx, model, ToySet(), loss_fn, torch.optim.SGD(model.parameters(), lr=0.5), epochs=3, batch_size=8,
            seed=0, validate=validate, checkpoint_every=checkpoint_every, ema_decay=ema_decay)
    finally:
        ctx.close()
    trajectory.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return trajectory, validated, load_checkpoint(ctx.out / "model.pt")["model"]


def test_ema_weights_are_the_decayed_average_of_every_steps_weights_and_are_what_is_validated_and_saved(tmp_path):
    decay = 0.6
    trajectory, validated, saved = train(tmp_path, decay)
    assert len(trajectory) == 12 and len(validated) == 3
    expected = dict(trajectory[0])  # the first step copies
    per_epoch = []
    for step, weights in enumerate(trajectory[1:], start=2):
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in weights}  # the toy has no int buffers
        if step % 4 == 0:
            per_epoch.append(expected)
    for seen, want in zip(validated, per_epoch):
        for k in want:
            torch.testing.assert_close(seen[k], want[k])
    for k in per_epoch[-1]:
        torch.testing.assert_close(saved[k], per_epoch[-1][k])
    # ... and they are not the trained weights (which fit leaves in the model)
    assert not torch.allclose(saved["0.weight"], trajectory[-1]["0.weight"])


def test_without_ema_the_trained_weights_are_saved(tmp_path):
    trajectory, validated, saved = train(tmp_path, 0.0)
    for k in trajectory[-1]:
        torch.testing.assert_close(saved[k], trajectory[-1][k])
        torch.testing.assert_close(validated[-1][k], trajectory[-1][k])


def test_a_killed_run_resumes_with_its_average_and_ends_as_an_uninterrupted_one(tmp_path):
    _, _, uninterrupted = train(tmp_path / "whole", 0.6, checkpoint_every=1)
    with pytest.raises(Killed):
        train(tmp_path / "killed", 0.6, kill_at_call=7, checkpoint_every=1)  # mid-epoch 2
    _, _, resumed = train(tmp_path / "killed", 0.6, checkpoint_every=1)
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k])


def test_a_checkpoint_without_an_average_cannot_resume_an_averaging_run(tmp_path):
    with pytest.raises(Killed):
        train(tmp_path, 0.0, kill_at_call=7, checkpoint_every=1)
    with pytest.raises(CheckpointError, match=r"last\.pt: written without ema_decay"):
        train(tmp_path, 0.6, checkpoint_every=1)


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_decay_outside_zero_one_is_refused(tmp_path, decay):
    with pytest.raises(ValueError, match="ema_decay must be in"):
        train(tmp_path, decay)


def test_ema_decay_is_part_of_train_segs_fingerprint_only_once_set():
    base = load_config(None)
    ema = load_config(None, ["train_seg.ema_decay=0.999"])
    assert stage_fingerprint(ema, "train-seg") != stage_fingerprint(base, "train-seg")
    assert stage_fingerprint(ema, "masks") == stage_fingerprint(base, "masks")
