"""`sgp train` under `torchrun --nproc_per_node 2` (gloo, CPU): the gradient each rank applies
is one process's gradient over both ranks' episodes, the ranks stay identical, only rank 0
writes, and a run resumes with another number of processes from the same step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SlicerSGP import cli
from SlicerSGP.cli.train import config_from_args
from SlicerSGP.data import io
from SlicerSGP.training.checkpoints import read_state
from SlicerSGP.training.config import state_path
from SlicerSGP.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "Testing" / "fixtures" / "ddp_train.py"
STEPS = 2


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """Three small labeled volumes with a drifting bright blob (label 1)."""
    root = tmp_path_factory.mktemp("ddp_data")
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:40, :48]
    for c in range(3):
        vol = rng.normal(100, 10, (6, 40, 48)).astype(np.float32)
        lab = np.zeros(vol.shape, np.uint8)
        for k in range(1, 5):
            blob = (yy - 18 - 2 * c) ** 2 + (xx - 14 - 3 * k) ** 2 < 30 + 6 * c
            vol[k][blob] += 80
            lab[k][blob] = 1
        folder = root / f"case{c}"
        folder.mkdir()
        img = sitk.GetImageFromArray(vol)
        img.SetSpacing((0.8, 0.8, 2.5))
        sitk.WriteImage(img, str(folder / "image.nrrd"))
        io.write_segmentation(folder / "labels.seg.nrrd", lab, io.geometry_from_sitk(img),
                              {1: "blob"})
    return root


def train_args(data: Path, out: Path, steps: int) -> list[str]:
    # LoRA + PMA on a frozen (random) base, the layout of a run from pretrained weights.
    return ["train", str(data), "--out", str(out), "--model", "cpu-mini", "--weights", "random",
            "--image-size", "256", "--lora-only", "--lora-rank", "2", "--steps", str(steps),
            "--seq-len", "2", "--top-k", "2", "--lr", "1e-3", "--warmup", "1", "--seed", "5",
            "--refresh-every", "1", "--save-every", "1", "--device", "cpu", "--threads", "1",
            "--quiet"]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(nproc: int, record: Path, watched: Path, argv: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(DRIVER), str(record), str(watched), "--", *argv]
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def grads_close(got: list, want: list, what: str) -> None:
    """Equal within float tolerance, relative to the step's largest gradient (a parameter
    whose gradient is float noise, 1e-13, has no meaningful relative error of its own)."""
    assert len(got) == len(want), what
    scale = max(float(w.abs().max()) for w in want if w is not None)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if w is None:
            assert g is None or not g.any(), f"{what}: parameter {i} has a gradient"
            continue
        assert g is not None, f"{what}: parameter {i} has no gradient"
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * scale,
                                   msg=lambda m, i=i: f"{what}, parameter {i}: {m}")


def test_two_ranks_apply_the_mean_gradient_write_once_and_resume_alone(volumes, tmp_path,
                                                                       monkeypatch):
    out_dir = tmp_path / "run"
    out = out_dir / "ddp.safetensors"
    record = tmp_path / "record"
    torchrun(2, record, out_dir, train_args(volumes, out, STEPS))
    ranks = [torch.load(record / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["rc"] for r in ranks] == [0, 0]
    assert [len(r["grads"]) for r in ranks] == [STEPS, STEPS]

    # Both ranks applied the same gradient at every step and end with identical weights.
    for step in range(STEPS):
        for a, b in zip(ranks[0]["grads"][step], ranks[1]["grads"][step], strict=True):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), step
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)

    # One process over both ranks' episodes, at the weights the ranks had at that step (a
    # trajectory compared over several Adam steps would only measure float chaos).
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    try:
        cfg = config_from_args(cli.build_parser().parse_args(
            train_args(volumes, tmp_path / "ref.safetensors", STEPS)))
        ref = Trainer(cfg, log=lambda *a: None)

        def gradient(step: int, weights: list, ranks_: tuple[int, ...]) -> list:
            with torch.no_grad():
                for p, w in zip(ref.params, weights, strict=True):
                    p.copy_(w)
            ref.step = step
            ref.prepare_step()  # the pool refresh, when due, with these weights
            loss = torch.stack([ref.episode_loss(step, r)[0] for r in ranks_]).mean()
            ref.apply_gradients(loss)
            return [None if p.grad is None else p.grad.clone() for p in ref.params]

        unlike_own_episode = 0
        for step in range(STEPS):
            at = ranks[0]["weights"][step]
            grads_close(ranks[0]["grads"][step], gradient(step, at, (0, 1)), f"step {step}")
            if step == 0:  # a rank applying only its own episode's gradient is told apart
                own = gradient(step, at, (0,))
                unlike_own_episode += sum(
                    g is not None and w is not None and
                    not torch.allclose(g, w, rtol=1e-2, atol=1e-3 * float(w.abs().max()))
                    for g, w in zip(own, ranks[0]["grads"][step], strict=True))
        assert unlike_own_episode > 10, "the two ranks' episodes were alike"

        # Only rank 0 wrote, in the output folder: the checkpoint, its .json, the state.
        assert ranks[1]["operations"] == []
        published = {Path(path).name for event, path in ranks[0]["operations"]
                     if event == "os.rename" and not Path(path).name.startswith(".")}
        assert published == {"ddp.safetensors", "ddp.json", "ddp.state.pt"}
        assert sorted(p.name for p in out_dir.iterdir()) == \
            ["ddp.json", "ddp.safetensors", "ddp.state.pt"]
        state = read_state(state_path(out))
        assert state["step"] == STEPS
        final = dict(zip([id(p) for p in ref.params], ranks[0]["params"], strict=True))
        for name, p in ref.model.named_parameters():
            if id(p) in final:
                assert torch.equal(state["model"][name], final[id(p)]), name

        # One process resumes at the same step, from the ranks' weights, with one episode.
        torchrun(1, tmp_path / "record1", out_dir, train_args(volumes, out, STEPS + 1)
                 + ["--resume"])
        resumed = torch.load(tmp_path / "record1" / "rank0.pt", weights_only=True)
        assert resumed["rc"] == 0 and len(resumed["grads"]) == 1
        assert read_state(state_path(out))["step"] == STEPS + 1
        for got, want in zip(resumed["weights"][0], ranks[0]["params"], strict=True):
            assert torch.equal(got, want)
        ref.load_state(state)  # the pool cache as saved, as the resumed run has it
        grads_close(resumed["grads"][0], gradient(STEPS, ranks[0]["params"], (0,)),
                    "resumed step")
    finally:
        torch.set_num_threads(threads)
