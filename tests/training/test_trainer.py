"""The trainer end to end on the CPU, for a few steps: every component, the Karlo export, and resuming."""

from pathlib import Path

import pytest
import torch

from training import train
from training.evaluate import COMPONENT_CLASSES, reference_pipelines


def test_trains_exports_and_resumes(tmp_path, capsys):
    torch.set_num_threads(1)
    out, work = tmp_path / "model", tmp_path / "work"
    args = [
        "--out",
        str(out),
        "--work",
        str(work),
        "--preset",
        "smoke",
        "--log-every",
        "1",
        "--budget-scale",
        "100",
    ]
    train.main(args + ["--max-steps", "2"])
    assert {p.name for p in out.iterdir()} >= set(COMPONENT_CLASSES)
    for name in train.COMPONENTS:
        assert (work / f"{name}.ckpt").exists() and "loss" in (work / f"{name}.log").read_text()
    capsys.readouterr()

    # (--budget-scale: only --max-steps stops a run, however loaded the machine.)
    # A second run picks every component up from its checkpoint and goes on.
    train.main(args + ["--max-steps", "3", "--components", "decoder,super_res"])
    log = capsys.readouterr().out
    assert "[decoder] resumed at step 2" in log and "[super_res] resumed at step 2" in log
    assert "[decoder] step 3 " in log

    # The export runs in diffusers' reference pipeline.
    t2i, _ = reference_pipelines(out)
    image = t2i(
        "a red circle",
        generator=torch.Generator().manual_seed(0),
        prior_num_inference_steps=2,
        decoder_num_inference_steps=2,
        super_res_num_inference_steps=2,
        output_type="np",
    ).images
    assert image.shape == (1, 128, 128, 3)


def test_fine_tune_starts_from_the_given_weights(tmp_path, capsys):
    """--init-from: each component starts from a trained model's weights (here: the shipped toy model)."""
    import shutil

    from diffusers import UNet2DModel

    from training.evaluate import load_components

    torch.set_num_threads(1)
    shipped = Path(__file__).resolve().parents[2] / "models" / "shapes-toy"
    out = tmp_path / "model"
    shutil.copytree(shipped, out)  # the fine-tune reads the model's own CLIP from --out
    common = ["--out", str(out), "--work", str(tmp_path / "work"), "--init-from", str(shipped)]
    upsampler_recipe = ["--super-res-colour-error", "0.04", "--super-res-shape-error", "0.3"]
    upsampler_recipe += ["--super-res-loss", "l1", "--super-res-focus", "995,495"]
    upsampler_recipe += ["--super-res-rounding", "0.5", "--super-res-small-share", "0.75"]
    train.main(
        common
        + ["--preset", "smoke", "--components", "super_res", "--max-steps", "1", "--log-every", "1"]
        + upsampler_recipe
    )
    assert "initialised super_res_first from" in capsys.readouterr().out
    before = UNet2DModel.from_pretrained(shipped / "super_res_first").state_dict()
    after = load_components(out)["super_res_first"].state_dict()
    # the mid-block attention is dropped (the upsampler is convolution-only); every other weight is carried
    # over, and one small step from the shipped weights leaves them close, but moved
    attention = sorted(k for k in before if k.startswith("mid_block.attentions."))
    assert sorted(set(before) - set(after)) == attention
    assert set(after) <= set(before)
    diffs = [(after[k] - before[k]).abs().max().item() for k in after]
    assert 0 < max(diffs) < 0.05
    with pytest.raises(SystemExit):  # CLIP defines the space the prior and decoder work in: never fine-tuned
        train.main(common + ["--components", "clip"])


def test_fine_tune_refuses_weights_of_another_model_size(tmp_path):
    from unclip.tiny import make_tiny_model

    tiny = make_tiny_model(tmp_path / "tiny")  # its upsampler: other channels, 64 px
    with pytest.raises(SystemExit, match="super_res_first does not match"):
        train.main(
            ["--out", str(tmp_path / "model"), "--work", str(tmp_path / "work"), "--init-from", str(tiny)]
            + ["--preset", "smoke", "--components", "super_res", "--max-steps", "1"]
        )
