"""Vision Transformers: v3's fixed sin-cos position embedding and frozen patch projection, a MoCo v3
run on a ViT, its evaluation, and an export that timm's VisionTransformer loads strictly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moco.config import ConfigError, load_config
from moco.exporters import export_checkpoint as export
from moco.methods import build_method
from moco.models.vit import VIT_ARCHS, VisionTransformer, default_patch_size, sincos_position_embedding
from moco.pretrained import load_pretrained
from moco.train import pretrain
from tests.tiny import tiny_config

V3_VIT = ["model.method=moco_v3", "model.arch=vit_tiny", "model.patch_size=4", "model.m_schedule=cosine",
          "optim.optimizer=adamw", "optim.lr=1e-4", "optim.weight_decay=0.1", "moco_v3.mlp_dim=32",
          "moco_v3.projector_layers=3", "moco_v3.predictor_last_bn=true", "model.dim=16", "model.bn_splits=1"]


def test_sincos_position_embedding_by_its_formula() -> None:
    grid, width = 3, 8
    pos = sincos_position_embedding(grid, width)
    assert pos.shape == (1, 1 + grid * grid, width) and torch.equal(pos[0, 0], torch.zeros(width))
    row, col = 1, 2  # patch (1, 2) is token 1 + 1*3 + 2
    token = pos[0, 1 + row * grid + col]
    omega = [10000 ** (-i / 2) for i in range(2)]  # width/4 = 2 frequencies
    expected = ([math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
                + [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega])
    torch.testing.assert_close(token, torch.tensor(expected))


def test_the_patch_projection_stays_frozen_and_position_embedding_fixed() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer("vit_tiny", image_size=16, patch_size=4, in_channels=1, num_classes=8)
    frozen = {n: p.detach().clone() for n, p in vit.named_parameters() if "patch_embed" in n or n == "pos_embed"}
    trainable = [p for p in vit.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        loss = vit(torch.randn(4, 1, 16, 16)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, before in frozen.items():
        assert torch.equal(dict(vit.named_parameters())[name], before), name  # bit-identical after steps
    assert not torch.equal(vit.blocks[0].attn.qkv.weight, VisionTransformer(
        "vit_tiny", image_size=16, patch_size=4, in_channels=1, num_classes=8).blocks[0].attn.qkv.weight)


def test_vit_sizes_and_patch_defaults() -> None:
    assert {a: VIT_ARCHS[a][0] for a in VIT_ARCHS} == {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}
    assert (default_patch_size(28), default_patch_size(32), default_patch_size(224)) == (4, 4, 16)
    with pytest.raises(ConfigError, match="model.patch_size: data.image_size=28 must be a multiple of the patch size"):
        load_config(None, ["model.arch=vit_tiny", "model.patch_size=5"])


def test_v3_on_a_vit_trains_evaluates_and_exports_to_timm(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    config = load_config(tiny_config(tmp_path), V3_VIT + ["optim.epochs=1"])
    method = build_method(config, channels=1)
    assert method.encoder_q.patch_embed.proj.weight.requires_grad is False
    assert len([m for m in method.encoder_q.fc if isinstance(m, torch.nn.Linear)]) == 3  # the ViT projector
    result = pretrain(config)
    assert math.isfinite(result.final_loss)
    checkpoint = result.run_dir / "checkpoint_last.pth"
    pretrained = load_pretrained(checkpoint)
    assert (pretrained.spec.family, pretrained.spec.arch, pretrained.spec.patch_size) == ("vit", "vit_tiny", 4)
    x = torch.rand(2, 1, 8, 8)
    features = pretrained.backbone()(x)
    assert features.shape == (2, 192)  # the class token

    out = export(checkpoint, "timm", tmp_path / "vit.pth")
    state = torch.load(out, weights_only=True)
    kwargs = json.loads((tmp_path / "vit.pth.json").read_text())["timm_kwargs"]
    model = timm.models.vision_transformer.VisionTransformer(**kwargs)
    model.load_state_dict(state, strict=True)
    model.eval()
    torch.testing.assert_close(model(x), features, rtol=1e-4, atol=1e-4)  # the same function, in timm


def test_knn_linear_probe_and_fine_tuning_run_on_a_vit_checkpoint(tmp_path: Path) -> None:
    from moco.cli import main

    config = load_config(tiny_config(tmp_path), V3_VIT + ["optim.epochs=1", "train.test_knn=false"])
    checkpoint = str(pretrain(config).run_dir / "checkpoint_last.pth")
    out = tmp_path / "eval"
    assert main(["knn", checkpoint, "--k", "5", "--output-dir", str(out)]) == 0
    assert main(["lincls", checkpoint, "--epochs", "2", "--lr", "0.1", "--output-dir", str(out)]) == 0
    assert main(["finetune", checkpoint, "--steps", "2", "--fractions", "0.5", "--init", "moco", "--lr", "0.01",
                 "--val-size", "8", "--output-dir", str(out)]) == 0
    lincls = json.loads((out / "lincls.json").read_text())
    assert lincls["provenance"]["encoder"]["family"] == "vit" and 0 <= lincls["rows"][0]["top1"] <= 100
