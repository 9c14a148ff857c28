"""One loader for every tool: our checkpoints (DDP or not), the reference's .pth.tar, plain state dicts."""

import pickle
import warnings
from pathlib import Path

import pytest
import torch

from moco.models import backbone_features
from moco.pretrained import CheckpointFormatError, EncoderSpec, load_pretrained
from tests.eval_helpers import save_reference_checkpoint, save_tiny_moco_checkpoint


@pytest.mark.parametrize("ddp_prefix", [False, True])
def test_our_checkpoint_gives_encoder_q_backbone_and_its_options(tmp_path: Path, ddp_prefix: bool) -> None:
    path, model = save_tiny_moco_checkpoint(tmp_path, ddp_prefix)
    pretrained = load_pretrained(path)
    assert pretrained.source == "moco"
    assert pretrained.spec == EncoderSpec("resnet18", (4, 8, 8, 8), True, 1, "mlp", 128, stem_stride=1)
    assert pretrained.config["model"]["widths"] == [4, 8, 8, 8]
    # Different from the key encoder, so the test would notice the wrong encoder being taken.
    with torch.no_grad():
        for p in model.encoder_k.parameters():
            p.add_(1.0)
    images = torch.randn(6, 1, 28, 28)
    model.eval()
    torch.testing.assert_close(pretrained.backbone()(images), backbone_features(model.encoder_q, images))
    torch.testing.assert_close(pretrained.encoder()(images), model.encoder_q(images))


def test_reference_pth_tar_loads_without_key_editing(tmp_path: Path) -> None:
    path = tmp_path / "moco_v2_200ep_pretrain.pth.tar"
    model = save_reference_checkpoint(path, "resnet50", mlp=True, widths=(8, 8, 8, 8))
    pretrained = load_pretrained(path)
    assert pretrained.source == "reference" and pretrained.config is None
    assert pretrained.spec == EncoderSpec("resnet50", (8, 8, 8, 8), False, 3, "mlp", 128)
    images = torch.randn(2, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(pretrained.backbone()(images), backbone_features(model.encoder_q, images))


def test_v1_linear_head_and_plain_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "v1.pth.tar"
    model = save_reference_checkpoint(path, "resnet18", mlp=False, small_images=True, in_channels=1, widths=(4, 8, 8, 8))
    assert load_pretrained(path).spec.head == "linear"
    plain = tmp_path / "plain.pth"
    torch.save({k: v for k, v in model.encoder_q.state_dict().items() if not k.startswith("fc.")}, plain)
    pretrained = load_pretrained(plain)
    assert pretrained.source == "state_dict" and pretrained.spec.head == "none"
    images = torch.randn(2, 1, 28, 28)
    model.eval()
    torch.testing.assert_close(pretrained.backbone()(images), backbone_features(model.encoder_q, images))


def test_unsafe_or_foreign_files_are_one_line_errors(tmp_path: Path) -> None:
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "extra": Path("/tmp")}, unsafe)  # needs arbitrary unpickling
    with pytest.raises(CheckpointFormatError, match="weights_only=True"):
        load_pretrained(unsafe)
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {"module.linear.weight": torch.zeros(2, 2)}}, foreign)
    with pytest.raises(CheckpointFormatError, match="no ResNet or ViT encoder weights"):
        load_pretrained(foreign)
    not_torch = tmp_path / "model.pkl"
    not_torch.write_bytes(pickle.dumps({"model": 1}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the one-line error, without torch's pickle-protocol warning first
        with pytest.raises(CheckpointFormatError):
            load_pretrained(not_torch)


def test_stem_stride_comes_from_the_stored_config(tmp_path: Path) -> None:
    # The stride of the small stem leaves no trace in the weights: a stride-2 encoder must not be
    # rebuilt with stride 1 (it would run, at the wrong resolution, and give other features).
    path, model = save_tiny_moco_checkpoint(tmp_path, extra=["model.stem_stride=2"])
    pretrained = load_pretrained(path)
    assert pretrained.spec.stem_stride == 2
    images = torch.randn(4, 1, 28, 28)
    model.eval()
    torch.testing.assert_close(pretrained.backbone()(images), backbone_features(model.encoder_q, images))
