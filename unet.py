"""U-Net variants used by the five scripts.

UNet: Ronneberger et al. 2015, with configurable width and depth, transposed-convolution or bilinear
upsampling, dropout placement ("every" block between its two convolutions, "bottleneck" only, or "none"),
optional deep supervision (auxiliary heads on decoder stages, upsampled to full size by nearest neighbour),
access to the last encoder stage's features, and Monte Carlo dropout passes that repeat only what follows a
bottleneck dropout (mc_decoder, for common.mc_dropout).

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
    has no dropout, so MC-dropout sampling may run encode() once and the decoder T times (common.mc_dropout),
    and of the decoder only what depends on the dropout mask (mc_decoder).
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
            if str(s) in self.aux:  # nearest, as the DSAL authors' Keras UpSampling2D (and deterministic on CUDA,
                # where bilinear's backward is not)
                aux.append(F.interpolate(self.aux[str(s)](x), size=feats[0].shape[-2:], mode="nearest"))
        out = self.head(x)
        return (out, aux) if self.ds_stages else out

    def forward(self, x):
        return self.decode(self.encode(x))

    def features(self, x):
        """Last encoder stage (bottleneck) features, e.g. (B, 512, 16, 16) at width 32, 256x256 input."""
        return self.encode(x)[-1]

    def mc_decoder(self, memory_format=torch.contiguous_format):
        """Monte Carlo dropout's decoder passes (common.mc_passes calls this once per mc_dropout call, then
        encode() once per batch): with dropout only at the bottleneck, only what depends on the dropout mask
        is repeated. Each decoder stage's first convolution reads cat(up(h), skip), and a convolution of
        concatenated channels is the sum of the convolutions of each part, so the skip half (fixed by the
        encoder) is computed once per batch; BatchNorm (eval, an affine map) is folded into the decoder's
        convolutions (fold_batchnorm), once here; auxiliary heads are skipped. Same numbers as decode() up to
        float rounding, and the same dropout masks under the same seed.

        Returns passes_of(feats) -> forward: feats = encode(x) of one batch; forward(r) the logits of r passes,
        (r x B, out_ch, H, W). None where the decoder is not this class's own, unchanged (a subclass overrides
        encode, decode, Up or Block; dropout in the decoder blocks; a convolution this does not split), and
        the caller runs decode() instead. memory_format: the model's (common.memory_format)."""
        if type(self).decode is not UNet.decode or type(self).encode is not UNet.encode:
            return None
        fmt = memory_format
        stages = []
        for up, blk in zip(self.ups, self.dec):
            ok = (type(up).forward is Up.forward and type(blk).forward is Block.forward
                  and isinstance(blk.drop, nn.Identity))
            for conv, bn in ((blk.conv1, blk.bn1), (blk.conv2, blk.bn2)):
                ok = ok and conv.groups == 1 and conv.padding_mode == "zeros" and (
                    isinstance(bn, nn.Identity) or (isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None))
            if not ok:
                return None
            (w1, b1), (w2, b2) = fold_batchnorm(blk.conv1, blk.bn1), fold_batchnorm(blk.conv2, blk.bn2)
            c = blk.conv1.in_channels // 2  # conv1 reads cat([up(h), skip]): up(h) is the first half
            w_up, w_skip = w1[:, :c].contiguous(memory_format=fmt), w1[:, c:].contiguous(memory_format=fmt)
            stages.append((up, blk.conv1, w_up, w_skip, b1, blk.conv2, w2.contiguous(memory_format=fmt), b2))

        def conv(cv, inp, w, b):  # cv's convolution with other weights
            return F.conv2d(inp, w, b, cv.stride, cv.padding, cv.dilation)

        def passes_of(feats):
            # the skip halves of the first convolutions, from the encoder: the same for every pass
            skips = [conv(conv1, feats[-2 - s], w_skip, None) for s, (_, conv1, _, w_skip, *_) in enumerate(stages)]

            def forward(r):  # r passes: the bottleneck repeated r times, dropout, the decoder
                h = feats[-1].repeat(r, 1, 1, 1).contiguous(memory_format=fmt) if r > 1 else feats[-1]
                h = self.bottleneck_drop(h)
                for (up, conv1, w_up, _, b1, conv2, w2, b2), skip in zip(stages, skips):
                    z = conv(conv1, up(h), w_up, b1)
                    z.unflatten(0, (r, -1)).add_(skip)  # + the skip half, the same for every pass
                    h = conv(conv2, z.relu_(), w2, b2).relu_()
                return self.head(h)
            return forward
        return passes_of


def fold_batchnorm(conv, bn):
    """(weight, bias) in float32 of conv followed by bn in eval mode, as one convolution: BatchNorm in eval
    mode is the affine map y = s * z + t, s = gamma / sqrt(running_var + eps), t = beta - s * running_mean.
    bn may be nn.Identity (the convolution's own weight and bias)."""
    w = conv.weight.float()
    b = torch.zeros(conv.out_channels, device=w.device) if conv.bias is None else conv.bias.float()
    if isinstance(bn, nn.BatchNorm2d):
        s = (bn.running_var.float() + bn.eps).rsqrt() * (1 if bn.weight is None else bn.weight.float())
        b = (b - bn.running_mean.float()) * s + (0 if bn.bias is None else bn.bias.float())
        w = w * s[:, None, None, None]
    return w, b


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------
# U-Net with a ResNet-18 encoder (region_uncertainty.py; papers/region_uncertainty.md, Sec. IV-C)
# ----------------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016), named as torchvision names it: conv1, bn1, conv2, bn2 and, where
    the channel count (or stride) changes, downsample.0 (1x1 convolution) and downsample.1 (BatchNorm)."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18Encoder(nn.Module):
    """ResNet-18 without its classifier, in plain torch, with torchvision's module names (conv1, bn1,
    layer1.0.conv1, ..., layer4.1.bn2), so a torchvision resnet18 state dict loads with its fc.* keys left
    out. width 64 is ResNet-18 itself (stages of 64, 64, 128, 256, 512 channels); other widths scale it."""

    def __init__(self, in_ch=3, width=64):
        super().__init__()
        c = [width, width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(in_ch, c[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(c[0], c[1]), BasicBlock(c[1], c[1]))
        self.layer2 = nn.Sequential(BasicBlock(c[1], c[2], 2), BasicBlock(c[2], c[2]))
        self.layer3 = nn.Sequential(BasicBlock(c[2], c[3], 2), BasicBlock(c[3], c[3]))
        self.layer4 = nn.Sequential(BasicBlock(c[3], c[4], 2), BasicBlock(c[4], c[4]))
        self.channels = c
        for m in self.modules():  # torchvision's initialisation of ResNet
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        """The stages a U-Net skips from: stem (H/2), layer1 (H/4), layer2 (H/8), layer3 (H/16), layer4 (H/32)."""
        x0 = self.relu(self.bn1(self.conv1(x)))
        x1 = self.layer1(self.maxpool(x0))
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        return [x0, x1, x2, x3, self.layer4(x3)]


def bilinear_up2(x):
    """Bilinear x2 upsampling of (B, C, H, W), align_corners=False, from slices: along each axis
    out[2i] = 0.75 x[i] + 0.25 x[i-1] and out[2i+1] = 0.75 x[i] + 0.25 x[i+1], the edges clamped. The same
    numbers as F.interpolate(x, scale_factor=2, mode="bilinear") (tested), with a backward made of slices and
    sums, which is deterministic on CUDA, where F.interpolate's bilinear backward is not."""
    for d in (2, 3):
        n = x.shape[d]
        prev = torch.cat([x.narrow(d, 0, 1), x.narrow(d, 0, n - 1)], d)
        nxt = torch.cat([x.narrow(d, 1, n - 1), x.narrow(d, n - 1, 1)], d)
        x = torch.stack([0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt], d + 1).flatten(d, d + 1)
    return x


def upsample2x(x):
    """Bilinear x2: F.interpolate, or bilinear_up2 on CUDA under --deterministic
    (torch.use_deterministic_algorithms, which raises on F.interpolate's bilinear backward there)."""
    if x.is_cuda and torch.are_deterministic_algorithms_enabled():
        return bilinear_up2(x).contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def conv_bn_relu(c_in, c_out, k):
    """Convolution, then BatchNorm ("batch normalization is added after each convolution layer"), ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class ResNetUNet(nn.Module):
    """U-Net with a ResNet-18 encoder (region paper, Sec. IV-C): "before each increase in the number of filters
    in the U-Net architecture, 1x1 convolutions are incorporated, and batch normalization is added after each
    convolution layer". The decoder is not described further; this one follows the common public ResNet-18
    U-Net layout (usuyama/pytorch-unet): a 1x1 convolution on every encoder stage before it is concatenated
    (where the channel count grows), bilinear x2 upsampling (upsample2x), a 3x3 convolution after each concatenation, a
    two-convolution full-resolution branch on the input, and BatchNorm after every convolution.

    Same interface as UNet: forward(x) -> logits (B, out_ch, H, W); encode(x) -> list of features (the last
    is layer4, the bottleneck); decode(feats) -> logits; features(x); dropout_at; feature_channels. Input is
    in [0, 1]; with mean/std given (ImageNet's for pretrained weights) the model normalises it itself, so
    training, prediction and MC dropout all see the same normalisation. Dropout, when p > 0, sits on the
    bottleneck only, so MC dropout may run the encoder once and the decoder T times (common.mc_dropout);
    region_uncertainty.py gives it dropout only for --strategy mc-dropout (the paper's network has none).
    H and W must be multiples of 32."""

    def __init__(self, in_ch=3, out_ch=1, width=64, dropout=0.0, mean=None, std=None):
        super().__init__()
        self.dropout_at = "bottleneck" if dropout > 0 else "none"
        self.encoder = ResNet18Encoder(in_ch, width)
        c = self.encoder.channels                                          # 64, 64, 128, 256, 512 at width 64
        self.skip1x1 = nn.ModuleList([conv_bn_relu(ci, ci, 1) for ci in c])  # 1x1 before each concatenation
        self.bottleneck_drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        d = [2 * c[0], 2 * c[2], c[3], c[4]]                              # decoder widths: 128, 256, 256, 512
        self.up = nn.ModuleList([conv_bn_relu(c[3] + c[4], d[3], 3),       # H/16: 256 + 512 -> 512
                                 conv_bn_relu(c[2] + d[3], d[2], 3),       # H/8:  128 + 512 -> 256
                                 conv_bn_relu(c[1] + d[2], d[1], 3),       # H/4:   64 + 256 -> 256
                                 conv_bn_relu(c[0] + d[1], d[0], 3)])      # H/2:   64 + 256 -> 128
        self.full0 = conv_bn_relu(in_ch, width, 3)                          # full-resolution branch
        self.full1 = conv_bn_relu(width, width, 3)
        self.full2 = conv_bn_relu(width + d[0], width, 3)                   # H: 128 + 64 -> 64
        self.head = nn.Conv2d(width, out_ch, 1)
        mean, std = mean if mean is not None else [0.0] * in_ch, std if std is not None else [1.0] * in_ch
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)  # not in checkpoints
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.feature_channels = c[4]

    def encode(self, x):
        x = (x - self.mean) / self.std
        full = self.full1(self.full0(x))
        return [full] + self.encoder(x)

    def decode(self, feats):
        full, skips = feats[0], feats[1:]
        x = self.skip1x1[4](self.bottleneck_drop(skips[4]))
        for s, conv in zip((3, 2, 1, 0), self.up):
            x = upsample2x(x)
            x = conv(torch.cat([x, self.skip1x1[s](skips[s])], dim=1))
        x = upsample2x(x)
        return self.head(self.full2(torch.cat([x, full], dim=1)))

    def forward(self, x):
        return self.decode(self.encode(x))

    def features(self, x):
        """layer4 output (B, 8 x width, H/32, W/32): 512 channels at width 64."""
        return self.encode(x)[-1]

    def load_torchvision_resnet18(self, state_dict):
        """Load a torchvision resnet18 state dict (ImageNet weights saved locally) into the encoder; fc.* is
        ignored, a "module." prefix is stripped. Raises ValueError naming the missing, unexpected or
        mis-shaped keys (e.g. a --width other than 64)."""
        if isinstance(state_dict, dict) and "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
            state_dict = state_dict["state_dict"]
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        own = self.encoder.state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in sd and sd[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise ValueError("not a torchvision resnet18 state dict for this encoder: "
                             + "; ".join(part for part in (
                                 f"{len(missing)} missing key(s), e.g. {missing[:3]}" if missing else "",
                                 f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}" if unexpected else "",
                                 f"shape mismatch, e.g. {shapes[:2]} (ImageNet weights need --width 64 and 3 "
                                 f"input channels)" if shapes else "") if part))
        self.encoder.load_state_dict(sd, strict=True)
