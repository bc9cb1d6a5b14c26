"""unet.py's models and region_uncertainty.py's augmentation on hand-computed cases: max pooling, bilinear
upsampling, the ResNet-18 blocks (identity and projection shortcuts, the stride on conv1, the stem's max pool),
BatchNorm after every convolution, 1x1 skips, ImageNet normalisation inside the model, the rotation range, the
flips' independence, the colour jitter's formulas, the blur, the dropout's place, BatchNorm folding and the
torchvision weights' layout. Each test was written for a mutant of its rule that the rest of the suite let
through or caught only by the behaviour record (2026-11-27), and was run once against it and failed."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import region_uncertainty as ru
import unet

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------- U-Net
def test_unet_downsamples_by_max_pooling():
    """Ronneberger et al.: 2x2 max pooling between encoder stages. enc[1] reads max_pool2d(enc[0] output)."""
    torch.manual_seed(0)
    m = unet.UNet(1, 1, 2, depth=1).eval()
    seen = {}
    m.enc[1].register_forward_pre_hook(lambda mod, inp: seen.update(x=inp[0]))
    with torch.no_grad():
        feats = m.encode(torch.randn(1, 1, 8, 8))
        assert torch.equal(seen["x"], torch.nn.functional.max_pool2d(feats[0], 2))
        assert not torch.allclose(seen["x"], torch.nn.functional.avg_pool2d(feats[0], 2))


def test_unet_bilinear_up_is_align_corners_false():
    """up="bilinear": x2 bilinear (align_corners=False) then 1x1: the upsampler maps [0, 1] to
    [0, 0.25, 0.75, 1] along an axis (align_corners=True would give 0, 1/3, 2/3, 1)."""
    m = unet.UNet(1, 1, 2, depth=1, up="bilinear")
    ups = m.ups[0].up[0]
    out = ups(torch.tensor([[[[0.0, 1.0]]]]))
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))


# ---------------------------------------------------------------------------------- ResNet-18 U-Net
def test_basic_block_adds_the_identity_shortcut():
    """He et al.: out = relu(bn2(conv2(...)) + x). With conv2's weights zero and eval-mode BN at its initial
    statistics (beta 0), bn2(...) = 0, so the block is relu(x)."""
    blk = unet.BasicBlock(2, 2).eval()
    with torch.no_grad():
        blk.conv2.weight.zero_()
    x = torch.tensor([-1.0, 2.0, 3.0, -4.0]).view(1, 1, 2, 2).repeat(1, 2, 1, 1)
    with torch.no_grad():
        out = blk(x.clone())
    assert torch.allclose(out, x.clamp(min=0))


def test_basic_block_projection_shortcut_on_channel_change():
    """Where the channels grow (64 -> 128, stride 2), the shortcut is downsample = 1x1 conv (stride 2) + BN:
    with conv2 zeroed and the 1x1 weight 1 from input channel 0, out = relu(x[:, 0, ::2, ::2]) / sqrt(1 + eps)."""
    blk = unet.BasicBlock(2, 4, stride=2).eval()
    with torch.no_grad():
        blk.conv2.weight.zero_()
        blk.downsample[0].weight.zero_()
        blk.downsample[0].weight[:, 0] = 1.0
    x = torch.arange(32, dtype=torch.float32).view(1, 2, 4, 4) - 5
    with torch.no_grad():
        out = blk(x)
    want = x[:, :1, ::2, ::2].clamp(min=0).expand(1, 4, 2, 2) / math.sqrt(1 + 1e-5)
    assert torch.allclose(out, want, atol=1e-5)


def test_resnet_stem_maxpool_is_3x3_stride2_pad1():
    """torchvision's ResNet stem: MaxPool2d(3, stride 2, padding 1). On -(4r + c) (4 x 4) the 3x3 windows
    centred at rows/cols 0 and 2 give [[0, -1], [-4, -5]] (a 2x2 pool would give [[0, -2], [-8, -10]])."""
    enc = unet.ResNet18Encoder(3, 8)
    x = -torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    assert torch.equal(enc.maxpool(x), torch.tensor([[[[0.0, -1.0], [-4.0, -5.0]]]]))


def test_resnet_unet_has_batchnorm_after_every_convolution():
    """Region paper Sec. IV-C: "batch normalization is added after each convolution layer". In forward order,
    every Conv2d but the 1-channel head is followed directly by a BatchNorm2d of its output width, and has no
    bias. Width 8: 20 encoder convolutions + 5 skip 1x1 + 4 decoder + 3 full-resolution = 32 conv+BN pairs."""
    m = unet.ResNetUNet(3, 1, 8).eval()
    calls = []
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d)):
            mod.register_forward_hook(lambda mod, i, o: calls.append(mod))
    with torch.no_grad():
        m(torch.rand(1, 3, 64, 64))
    convs = [c for c in calls if isinstance(c, nn.Conv2d) and c is not m.head]
    assert len(convs) == 32 and calls[-1] is m.head
    for i, c in enumerate(calls[:-1]):
        if isinstance(c, nn.Conv2d):
            nxt = calls[i + 1]
            assert isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == c.out_channels and c.bias is None, c


def test_resnet_unet_skip_convolutions_are_1x1():
    """Sec. IV-C: 1x1 convolutions before each increase in the number of filters: every skip1x1 is a 1x1
    convolution of the encoder stage's own width."""
    m = unet.ResNetUNet(3, 1, 8)
    convs = [s[0] for s in m.skip1x1]
    assert [c.kernel_size for c in convs] == [(1, 1)] * 5
    assert [(c.in_channels, c.out_channels) for c in convs] == [(8, 8), (8, 8), (16, 16), (32, 32), (64, 64)]


def test_build_model_normalises_with_imagenet_mean_and_std():
    """Sec. IV-D: ImageNet mean/std inside the model. A flat 0.5 image reaches the encoder and the
    full-resolution branch as (0.5 - mean) / std = 0.0655022, 0.1964286, 0.4177778 per channel."""
    model = ru.build_model(ru.parse_args([]), CPU).eval()
    seen = []
    model.encoder.conv1.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0]))
    model.full0[0].register_forward_pre_hook(lambda mod, inp: seen.append(inp[0]))
    with torch.no_grad():
        model(torch.full((1, 3, 64, 64), 0.5))
    want = torch.tensor([0.0655022, 0.1964286, 0.4177778]).view(1, 3, 1, 1).expand(1, 3, 64, 64)
    assert len(seen) == 2
    for s in seen:
        assert torch.allclose(s, want, atol=1e-6)


# ------------------------------------------------------------------------------------------- augmentation
def _bar_angles(seed, n=64):
    torch.manual_seed(seed)
    y = torch.zeros(n, 64, 64, dtype=torch.uint8)
    y[:, 31:33, 4:60] = 1
    _, ya = ru.make_augment(rotation=30.0, flip=0.0, jitter=0, blur_kernel=1)(torch.rand(n, 3, 64, 64), y)
    angles = []
    for m in ya:
        r, c = torch.nonzero(m, as_tuple=True)
        cov = torch.cov(torch.stack([c.double(), r.double()]))
        angles.append(math.degrees(0.5 * math.atan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1])))
    return ya, angles


def test_rotation_is_symmetric_plus_minus_30_degrees():
    """Sec. IV-D: rotation in [-30, +30] degrees: both directions occur (signed principal-axis angle below -15 in
    some images and above +15 in others)."""
    _, angles = _bar_angles(2)
    assert min(angles) < -15 and max(angles) > 15 and max(abs(a) for a in angles) <= 31, angles


def test_rotated_mask_is_nearest_sampled_not_eroded():
    """Masks follow the geometry with nearest-neighbour sampling: a 2 x 56 bar rotated by up to 30 degrees keeps
    about its area (112 pixels; nearest sampling of a thin bar varies by a few pixels), it is not eroded
    (bilinear + truncation to uint8 keeps only pixels whose whole neighbourhood is 1: about half)."""
    ya, _ = _bar_angles(3)
    area = ya.flatten(1).sum(1).float()
    assert float(area.min()) >= 0.8 * 112 and float(area.max()) <= 1.2 * 112, area


def test_flips_are_independent_each_with_probability_half():
    """Sec. IV-D: horizontal and vertical flips, each with probability 0.5, drawn independently: all four
    combinations occur, each in roughly a quarter of 400 images (binomial sd 8.7: 100 +- 40 is > 4 sd)."""
    torch.manual_seed(4)
    n = 400
    y = torch.zeros(n, 16, 16, dtype=torch.uint8)
    y[:, 2:12, 2:5] = 1
    y[:, 9:12, 2:10] = 1  # an L: each flip combination gives a different mask
    _, ya = ru.make_augment(rotation=0, flip=0.5, jitter=0, blur_kernel=1)(torch.rand(n, 3, 16, 16), y)
    counts = [int((ya == torch.flip(y, dims)).flatten(1).all(1).sum()) for dims in ((), (1,), (2,), (1, 2))]
    assert sum(counts) == n and all(60 <= c <= 140 for c in counts), counts


def test_saturation_blends_each_pixel_with_its_own_grey():
    """torchvision's adjust_saturation blends each pixel with its own greyscale value. With rotation, flips and
    blur off the draws are: angle, fx, fy, brightness, contrast, saturation (one torch.rand(B) each). A pixel
    (0.6, 0.4, 0.2) beside a grey pixel (0.4): brightness b, contrast c toward the mean grey, saturation s
    toward the pixel's grey, computed here by hand from the reproduced draws."""
    B = 64
    x = torch.zeros(B, 3, 1, 2)
    x[:, :, 0, 0] = torch.tensor([0.6, 0.4, 0.2])
    x[:, :, 0, 1] = 0.4
    torch.manual_seed(5)
    xa, _ = ru.make_augment(rotation=0, flip=0.0, jitter=0.2, blur_kernel=1)(x, torch.zeros(B, 1, 2))
    torch.manual_seed(5)
    d = [torch.rand(B) for _ in range(6)]
    b, c, s = (1 + (d[i] * 2 - 1) * 0.2 for i in (3, 4, 5))
    gray = lambda im: 0.299 * im[:, 0] + 0.587 * im[:, 1] + 0.114 * im[:, 2]
    h = (x * b.view(B, 1, 1, 1)).clamp(0, 1)
    h = (c.view(B, 1, 1, 1) * h + (1 - c.view(B, 1, 1, 1)) * gray(h).mean((1, 2)).view(B, 1, 1, 1)).clamp(0, 1)
    h = (s.view(B, 1, 1, 1) * h + (1 - s.view(B, 1, 1, 1)) * gray(h)[:, None]).clamp(0, 1)
    assert torch.allclose(xa, h, atol=1e-5)


def test_blur_sigma_at_most_0_2_is_nearly_identity():
    """Sec. IV-D: Gaussian blur, kernel 5, sigma in [0.01, 0.2]: at sigma <= 0.2 a neighbour's weight is at most
    exp(-1 / (2 * 0.04)) = 3.7e-6 of the centre's, so a 0/1 checkerboard moves by less than 1e-4 anywhere."""
    torch.manual_seed(6)
    x = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2).float().expand(32, 3, 16, 16).contiguous()
    xa, _ = ru.make_augment(rotation=0, flip=0.0, jitter=0)(x, torch.zeros(32, 16, 16))
    assert (xa - x).abs().max() < 1e-4


def test_blur_is_a_separable_gaussian_with_reflect_padding():
    """The blur itself, at a sigma where it shows (sigma 1, kernel 5): an impulse spreads as the outer product of
    the 5 taps exp(-r^2 / 2) / sum, r = -2..2; one row from the border, reflect padding folds the tap that falls
    outside back in (torchvision's gaussian_blur), where zero padding would lose it."""
    x = torch.zeros(1, 3, 9, 9)
    x[:, :, 4, 4] = 1.0
    x[:, :, 1, 6] = 1.0
    xa, _ = ru.make_augment(rotation=0, flip=0.0, jitter=0, blur_sigma=(1.0, 1.0))(x, torch.zeros(1, 9, 9))
    k = np.exp(-np.arange(-2, 3) ** 2 / 2.0)
    k /= k.sum()
    padded = np.pad(x[0, 0].numpy().astype(np.float64), 2, mode="reflect")
    rows = np.stack([padded[i:i + 9] for i in range(5)], 0)                      # (5, 9, 13): row shifts
    h = np.tensordot(k, rows, 1)
    want = np.tensordot(k, np.stack([h[:, j:j + 9] for j in range(5)], 0), 1)     # then column shifts
    assert want[0, 6] == pytest.approx(2 * k[1] * k[2])                           # the folded tap
    assert np.allclose(xa[0].numpy(), want[None], atol=1e-6)


# ------------------------------------------------------------------------------ dropout placement, folding
def test_block_dropout_sits_between_the_two_convolutions():
    """Block: conv -> BN -> ReLU -> dropout -> conv -> BN -> ReLU. Without BatchNorm and with p = 1 in training,
    everything after the dropout sees zeros: the output is relu(conv2.bias) = (1, 2) everywhere (dropout after
    conv2 would give 0)."""
    blk = unet.Block(1, 2, dropout=1.0, batchnorm=False).train()
    with torch.no_grad():
        blk.conv2.bias.copy_(torch.tensor([1.0, 2.0]))
        out = blk(torch.rand(1, 1, 4, 4))
    assert torch.equal(out, torch.tensor([1.0, 2.0]).view(1, 2, 1, 1).expand(1, 2, 4, 4))


def test_fold_batchnorm_by_hand():
    """Eval BN after a 1x1 conv (weight 2, no bias): s = gamma / sqrt(var + eps) = 0.5 / sqrt(3 + 1) = 0.25,
    folded weight 2 * 0.25 = 0.5, bias (0 - mean 1) * 0.25 + beta 1 = 0.75."""
    conv = nn.Conv2d(1, 1, 1, bias=False)
    bn = nn.BatchNorm2d(1, eps=1.0).eval()
    with torch.no_grad():
        conv.weight.fill_(2.0)
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(3.0)
        bn.weight.fill_(0.5)
        bn.bias.fill_(1.0)
    w, b = unet.fold_batchnorm(conv, bn)
    assert torch.allclose(w, torch.full((1, 1, 1, 1), 0.5)) and torch.allclose(b, torch.tensor([0.75]))


# ----------------------------------------------------------------------------- torchvision layout details
def test_load_torchvision_strips_module_prefix_and_unwraps_state_dict():
    """The docstring's promise: a DataParallel "module." prefix is stripped and {"state_dict": ...} unwrapped."""
    src = unet.ResNetUNet(3, 1, 64)
    torch.manual_seed(7)
    sd = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in src.encoder.state_dict().items()}
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    wrapped = {"state_dict": {"module." + k: v for k, v in sd.items()}}
    model = unet.ResNetUNet(3, 1, 64)
    model.load_torchvision_resnet18(wrapped)
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_basic_block_stride_is_on_the_first_convolution():
    """torchvision BasicBlock: the stride sits on conv1 (3x3), conv2 has stride 1. conv1 and conv2 both shift
    right by one pixel (weight[.., 1, 0] = 1), the shortcut is zeroed, BN at its initial statistics (eval):
    out[i, j] = x[2i, 2j - 3] / (1 + eps) for j >= 2 and 0 for j < 2, x[r, c] = 8r + c + 1
    (the stride on conv2 would read x[2i, 2j - 2])."""
    blk = unet.BasicBlock(1, 1, stride=2).eval()
    with torch.no_grad():
        for conv in (blk.conv1, blk.conv2):
            conv.weight.zero_()
            conv.weight[0, 0, 1, 0] = 1.0
        blk.downsample[0].weight.zero_()
        x = (torch.arange(64, dtype=torch.float32) + 1).view(1, 1, 8, 8)
        out = blk(x)
    want = torch.zeros(1, 1, 4, 4)
    for i in range(4):
        for j in range(2, 4):
            want[0, 0, i, j] = (16 * i + 2 * j - 2) / (1 + 1e-5)
    assert torch.allclose(out, want, atol=1e-4)
