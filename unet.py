"""U-Net variants used by the five scripts.

UNet: Ronneberger et al. 2015, with configurable width and depth, transposed-convolution or bilinear
upsampling, dropout placement ("every" block between its two convolutions, "bottleneck" only, or "none"),
optional deep supervision (auxiliary heads on decoder stages, upsampled to full size) and access to the
last encoder stage's features.

At width 64, depth 4 (5 encoder stages, 4 decoder stages), transposed convolutions: about 31.0 M
parameters, the CEAL paper's "around 31 million" (Sec. 1.2).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """conv3x3 -> BN -> ReLU -> [dropout] -> conv3x3 -> BN -> ReLU."""

    def __init__(self, c_in, c_out, dropout=0.0, batchnorm=True):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batchnorm)
        self.bn1 = norm(c_out)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=not batchnorm)
        self.bn2 = norm(c_out)

    def forward(self, x):
        x = self.drop(F.relu(self.bn1(self.conv1(x))))
        return F.relu(self.bn2(self.conv2(x)))


class Up(nn.Module):
    """Upsample by 2 and halve the channels: ConvTranspose2d, or bilinear + 1x1 convolution."""

    def __init__(self, c_in, mode="transpose"):
        super().__init__()
        if mode == "transpose":
            self.up = nn.ConvTranspose2d(c_in, c_in // 2, 2, stride=2)
        elif mode == "bilinear":
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                    nn.Conv2d(c_in, c_in // 2, 1))
        else:
            raise ValueError(f"upsampling must be 'transpose' or 'bilinear', not {mode!r}")

    def forward(self, x):
        return self.up(x)


class UNet(nn.Module):
    """U-Net. forward(x) -> logits (B, out_ch, H, W); with deep_supervision, (logits, [aux logits...]).

    encode(x) -> list of the encoder stages' outputs (the last is the bottleneck, "last encoder stage");
    decode(feats) -> logits. With dropout_at="bottleneck" (the public CEAL code's placement) the encoder
    has no dropout, so MC-dropout sampling may run encode() once and decode() T times (common.mc_dropout).
    """

    def __init__(self, in_ch=3, out_ch=1, width=64, depth=4, up="transpose", dropout=0.0, dropout_at="every",
                 batchnorm=True, deep_supervision=(), ):
        super().__init__()
        if dropout_at not in ("every", "bottleneck", "none"):
            raise ValueError(f"dropout_at must be every|bottleneck|none, not {dropout_at!r}")
        self.depth, self.dropout_at = depth, dropout_at if dropout > 0 else "none"
        p_block = dropout if self.dropout_at == "every" else 0.0
        chans = [width * 2 ** i for i in range(depth + 1)]
        self.enc = nn.ModuleList([Block(in_ch if i == 0 else chans[i - 1], chans[i], p_block, batchnorm)
                                  for i in range(depth + 1)])
        self.bottleneck_drop = nn.Dropout(dropout) if self.dropout_at == "bottleneck" else nn.Identity()
        self.ups = nn.ModuleList([Up(chans[i + 1], up) for i in reversed(range(depth))])
        self.dec = nn.ModuleList([Block(2 * chans[i], chans[i], p_block, batchnorm) for i in reversed(range(depth))])
        self.head = nn.Conv2d(chans[0], out_ch, 1)
        # Deep supervision: 1x1 heads on the chosen decoder stages (0 = lowest resolution, depth-1 = last).
        self.ds_stages = tuple(deep_supervision)
        self.aux = nn.ModuleDict({str(s): nn.Conv2d(chans[depth - 1 - s], out_ch, 1) for s in self.ds_stages})
        self.feature_channels = chans[-1]

    def encode(self, x):
        feats = []
        for i, block in enumerate(self.enc):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            feats.append(x)
        return feats

    def decode(self, feats):
        x = self.bottleneck_drop(feats[-1])
        aux = []
        for s, (up, block) in enumerate(zip(self.ups, self.dec)):
            x = block(torch.cat([up(x), feats[-2 - s]], dim=1))
            if str(s) in self.aux:
                aux.append(F.interpolate(self.aux[str(s)](x), size=feats[0].shape[-2:], mode="bilinear",
                                         align_corners=False))
        out = self.head(x)
        return (out, aux) if self.ds_stages else out

    def forward(self, x):
        return self.decode(self.encode(x))

    def features(self, x):
        """Last encoder stage (bottleneck) features, e.g. (B, 512, 16, 16) at width 32, 256x256 input."""
        return self.encode(x)[-1]


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
