"""ssl_coldstart.py: the Models Genesis transforms, the cluster quota and its trimming on hand-made clusters,
that selected ids index the pool, that the SSL weights reach the segmentation model, and the script end to
end on tiny synthetic data (every strategy, --resume, the tables command, bad input)."""
import csv
import functools
import json
import os
import types

import numpy as np
import pytest
import torch

import common
import interface
import ssl_coldstart as S
from conftest import run_dir_from, run_script
from test_common import isic2017_fixture
from unet import UNet

TINY = ["--split", 40, 0, 10, "--image-size", 32, "--width", 4, "--initial", 8, "--query", 4, "--rounds", 2,
        "--epochs-initial", 1, "--epochs", 1, "--batch-size", 8, "--clusters", 3, "--ssl-epochs", 1,
        "--shuffle-blocks", 200, "--mc-passes", 2, "--pseudo-step", 2, "--ensemble-size", 2]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ramp(n=4, size=32):
    """Images whose pixels are all different: an asymmetric ramp, a different offset per image, in [0, 1)."""
    base = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size) / (size * size * n)
    return base + torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) / n


# -------------------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("name", ["flip", "local_pixel_shuffling", "nonlinear_transformation", "image_painting"])
def test_transform_shape_range_change_and_seed(name):
    f = functools.partial(S.local_pixel_shuffling, n_blocks=500) if name == "local_pixel_shuffling" else getattr(S, name)
    x = ramp(8)
    a, b, c = f(x, gen(1), p=1.0), f(x, gen(1), p=1.0), f(x, gen(2), p=1.0)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1
    if name != "flip":  # p = 1: every image changes (a flip may draw the channel axis: test_flip_draws_...)
        assert all(not torch.equal(a[i], x[i]) for i in range(len(x)))
    assert not torch.equal(a, x)
    assert torch.equal(a, b) and not torch.equal(a, c)               # reproducible under a seed
    assert torch.equal(f(x, gen(1), p=0.0), x)                        # p = 0: untouched


def test_flip_draws_among_three_axes_one_of_them_the_channel():
    """The reference code's np.flip(x, axis=random.choice([0, 1, 2])) on a (1, rows, cols) image: axis 0 flips
    nothing. Three flips (p = 1) end in each of the four results: untouched (7 of the 27 axis sequences), H, W
    (7 each) or both (6); with two axes only, three flips would never leave an image untouched."""
    x = ramp(64)
    out = S.flip(x, gen(0), p=1.0)
    kinds = []
    for i in range(len(x)):
        options = [x[i], x[i].flip(-2), x[i].flip(-1), x[i].flip(-2).flip(-1)]
        kinds.append([torch.equal(out[i], o) for o in options].index(True))
    assert set(kinds) == {0, 1, 2, 3}
    # default p = 0.4: no flip 0.6; one 0.24 x 1/3; two 0.096 x 1/3; three 0.064 x 7/27: untouched 0.7286
    untouched = (S.flip(ramp(2000, 16), gen(0)) == ramp(2000, 16)).flatten(1).all(1).float().mean().item()
    assert 0.70 < untouched < 0.76  # +-3 standard deviations; two axes: 0.648


def test_shuffle_windows_by_hand():
    """Two overlapping windows on image 0, the second written last; two identical windows on image 1."""
    out, x, y0, x0, bh, bw = _by_hand(torch.device("cpu"))
    # beyond its memory budget: one image at a time, its windows in ranges; the same keys drawn, the same output
    for budget in (36, 1):  # one range per image; one window per range (the overlap spans two ranges)
        assert torch.equal(S.shuffle_windows(x, y0, x0, bh, bw, gen(0), budget=budget), out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shuffle_windows_on_cuda_whole_and_in_parts():
    """On CUDA a draw's numbers depend on its shape, so parts draw other permutations than one whole: each must
    still paint only the last window over a pixel, with its own window's original pixels."""
    for budget in (2 ** 26, 36, 1):
        _by_hand(torch.device("cuda"), budget)


def _by_hand(dev, budget=2 ** 26):
    x = torch.arange(2 * 20 * 20, dtype=torch.float32, device=dev).view(2, 1, 20, 20)
    y0, x0 = torch.tensor([[0, 3], [5, 5]], device=dev), torch.tensor([[0, 3], [5, 5]], device=dev)
    bh, bw = torch.tensor([[6, 6], [2, 2]], device=dev), torch.tensor([[6, 6], [3, 3]], device=dev)
    g = torch.Generator(device=dev)
    g.manual_seed(0)
    out = S.shuffle_windows(x, y0, x0, bh, bw, g, budget=budget)
    assert out.device.type == dev.type
    out, x, y0, x0, bh, bw = (t.cpu() for t in (out, x, y0, x0, bh, bw))
    inside = torch.zeros(2, 20, 20, dtype=torch.bool)
    a = torch.zeros(20, 20, dtype=torch.bool)
    a[0:6, 0:6] = True
    b = torch.zeros(20, 20, dtype=torch.bool)
    b[3:9, 3:9] = True
    inside[0] = a | b
    inside[1, 5:7, 5:8] = True
    assert torch.equal(out[:, 0][~inside], x[:, 0][~inside])          # outside every window: untouched
    # the last window shows a permutation of its own original pixels
    assert sorted(out[0, 0][b].tolist()) == sorted(x[0, 0][b].tolist())
    assert sorted(out[1, 0, 5:7, 5:8].flatten().tolist()) == sorted(x[1, 0, 5:7, 5:8].flatten().tolist())
    # the first window, where still visible, shows distinct pixels of the ORIGINAL first window (read, not re-read)
    vis = out[0, 0][a & ~b].tolist()
    assert len(set(vis)) == len(vis) and set(vis) <= set(x[0, 0][a].tolist())
    assert not torch.equal(out, x)
    return out, x, y0, x0, bh, bw


def test_shuffle_windows_in_parts_draws_and_paints_as_in_one():
    """The paper's size fits in one part (batch 10, 256 px, 10,000 windows: 62.5 M slots); 512 px took 5.5 GB
    of memory in one, 1.6 GB in parts (the audit of 2026-11-27). Parts must give the same pixels and leave the
    generator where one part does."""
    x, whole = ramp(5, 64), []
    for budget in (2 ** 26, 100000, 1000, 37):  # one part; one range per image; several ranges; tiny ranges
        g = gen(7)
        out = S.shuffle_windows(x, *_windows_of(x, g, 1000), g, budget=budget)
        whole = whole or [out, g.get_state()]
        assert torch.equal(out, whole[0]) and torch.equal(g.get_state(), whole[1]), budget
    assert not torch.equal(whole[0], x)


def _windows_of(x, g, n_blocks):
    """local_pixel_shuffling's windows for every image of x (p = 1)."""
    B, _, H, W = x.shape
    bh, bw = S._randint(1, H // 10, (B, n_blocks), g, x.device), S._randint(1, W // 10, (B, n_blocks), g, x.device)
    return S._randint(0, H - bh, (B, n_blocks), g, x.device), S._randint(0, W - bw, (B, n_blocks), g, x.device), bh, bw


def test_local_pixel_shuffling_moves_pixels_only_within_a_window():
    x = ramp(4, 40)
    out = S.local_pixel_shuffling(x, gen(3), p=1.0, n_blocks=300)
    H = 40
    for i in range(len(x)):
        src = {v: divmod(k, H) for k, v in enumerate(x[i, 0].flatten().tolist())}
        for k, v in enumerate(out[i, 0].flatten().tolist()):
            (r0, c0), (r1, c1) = src[v], divmod(k, H)
            assert abs(r0 - r1) < H // 10 and abs(c0 - c1) < H // 10


def test_shuffle_blocks_past_ten_times_the_reference_codes_are_refused():
    """--shuffle-blocks 100000000 grew to 24 GB and was killed by the kernel, no message (the audit of 2026-11-27)."""
    assert S.parse_args(["--shuffle-blocks", "100000"]).shuffle_blocks == 100000
    with pytest.raises(common.UserError, match="--shuffle-blocks 100001: expected at most 100000"):
        S.parse_args(["--shuffle-blocks", "100001"])


def test_zero_shuffle_blocks_leave_the_image_unchanged():
    x = ramp(4, 40)  # --shuffle-blocks 0 is accepted (resolve: at least 0): the transform is off, not a crash
    assert torch.equal(S.local_pixel_shuffling(x, gen(3), p=1.0, n_blocks=0), x)


def test_interp_matches_numpy():
    rng = np.random.default_rng(0)
    xp = 0.1 + 0.8 * np.sort(rng.random((3, 50)), axis=1)  # inputs below 0.1 and above 0.9 take the end values
    fp, v = rng.random((3, 50)), rng.random((3, 200))
    ours = S._interp(torch.tensor(v), torch.tensor(xp), torch.tensor(fp)).numpy()
    ref = np.stack([np.interp(v[i], xp[i], fp[i]) for i in range(3)])
    assert np.allclose(ours, ref, atol=1e-9)


def test_nonlinear_is_monotone_per_image_and_both_directions_occur():
    x = ramp(64, 16)
    out = S.nonlinear_transformation(x, gen(0), p=1.0)
    directions = set()
    for i in range(len(x)):
        order = torch.argsort(x[i].flatten())
        d = torch.diff(out[i].flatten()[order])
        assert (d >= -1e-6).all() or (d <= 1e-6).all()
        directions.add(bool((d >= -1e-6).all()))
    assert directions == {True, False}


def test_nonlinear_is_decreasing_half_the_time():
    """The reference code's Bezier mapping is decreasing with probability 0.5 (PROTOCOLS.md)."""
    x = torch.linspace(0, 1, 16).view(1, 1, 4, 4).expand(2000, 1, 4, 4).contiguous()
    out = S.nonlinear_transformation(x, gen(0), p=1.0).flatten(1)
    share = (out[:, -1] < out[:, 0]).float().mean().item()   # the brightest pixel mapped below the darkest
    assert 0.45 < share < 0.55   # +-4.5 standard deviations of 2000 draws


def test_painting_in_and_out():
    x = torch.full((16, 1, 64, 64), 2.0)  # a value noise cannot take
    inp = S.image_painting(x, gen(0), p=1.0, p_out=0.0)
    hole = inp != 2.0
    assert hole.flatten(1).any(1).all()                                # every image has a hole
    assert not hole[..., :3, :].any() and not hole[..., :, :3].any()    # blocks start 3 pixels in
    area = hole.flatten(1).sum(1)                                      # 1 to 5 blocks of side [H/6, H/3] = [10, 21]
    assert (area >= 10 * 10).all() and (area <= 5 * 21 * 21).all() and (inp[hole] < 1).all()
    out = S.image_painting(x, gen(0), p=1.0, p_out=1.0)
    kept = out == 2.0
    frac = kept.flatten(1).float().mean(1)
    # at least the first window of side 64 - randint(27, 36) >= 28 is kept; the rest is noise in [0, 1)
    assert (frac >= (28 / 64) ** 2 - 1e-6).all() and (frac < 1).all() and (out[~kept] < 1).all()


def test_painting_block_sides(monkeypatch):
    """The reference code's sizes at H = W = 64: in-painting blocks of side [H/6, H/3] = [10, 21], out-painting
    windows of side H - randint(3H/7, 4H/7) = [28, 37], both ends included."""
    sides, boxes = [], S._boxes
    monkeypatch.setattr(S, "_boxes", lambda H, W, y0, x0, h, w: sides.append((h, w)) or boxes(H, W, y0, x0, h, w))
    S.image_painting(torch.zeros(64, 1, 64, 64), gen(0), p=1.0)
    (h_in, w_in), (h_out, w_out) = sides
    for t, lo, hi in ((h_in, 10, 21), (w_in, 10, 21), (h_out, 28, 37), (w_out, 28, 37)):
        assert t.min() == lo and t.max() == hi   # 320 draws: every end reached


def test_painting_block_counts(monkeypatch):
    """The reference loops: in-painting `cnt = 5; while cnt > 0 and random.random() < 0.95` (0 to 5 blocks, the
    first one too only with 0.95); out-painting one window, then up to 4 more under the same loop. Box k is
    replaced by row k of the image, so the rows painted (in) or kept (out) show which boxes were drawn."""
    monkeypatch.setattr(S, "_boxes", lambda H, W, y0, x0, h, w: (
        torch.arange(H).view(1, 1, H, 1) == torch.arange(y0.shape[1]).view(1, -1, 1, 1)).expand(len(y0), -1, H, W))
    x = torch.full((4000, 1, 16, 16), 2.0)  # a value noise cannot take
    for p_out, changed, p_all, lo in ((0.0, lambda t: t != 2.0, 0.95 ** 5, 0), (1.0, lambda t: t == 2.0, 0.95 ** 4, 1)):
        rows = changed(S.image_painting(x, gen(0), p=1.0, p_out=p_out))[:, 0].all(2)  # (B, H): row painted / kept
        n = rows.sum(1)
        assert torch.equal(rows, torch.arange(16).view(1, 16) < n.view(-1, 1))  # boxes 0..n-1: the loop's order
        counts = torch.bincount(n, minlength=6)
        assert counts.nonzero().flatten().tolist() == list(range(lo, 6))
        assert abs(counts[5].item() / 4000 - p_all) < 0.02  # +-3 standard deviations
    assert abs(counts[1].item() / 4000 - 0.05) < 0.011     # out-painting: one window alone with 0.05


def test_models_genesis_order(monkeypatch):
    """Flip, local pixel shuffling, non-linear intensity, painting: the reference generate_pair's order, each
    on the one before's output; the target is the flipped image alone. Transform k adds 10^k here."""
    calls, names = [], ["flip", "local_pixel_shuffling", "nonlinear_transformation", "image_painting"]
    for k, name in enumerate(names):
        monkeypatch.setattr(S, name, lambda x, *a, name=name, k=k, **kw: calls.append(name) or x + 10 ** k)
    x = ramp(2)
    inp, target = S.models_genesis(x, gen(0))
    assert calls == names and torch.equal(target, x + 1) and torch.allclose(inp, x + 1111)


def test_models_genesis_target_is_the_flipped_clean_image():
    x = ramp(32)
    inp, target = S.models_genesis(x, gen(0), n_blocks=100)
    for i in range(len(x)):
        assert any(torch.equal(target[i], f) for f in (x[i], x[i].flip(-1), x[i].flip(-2), x[i].flip(-1).flip(-2)))
    assert not torch.equal(inp, target) and inp.min() >= 0 and inp.max() <= 1
    again = S.models_genesis(x, gen(0), n_blocks=100)
    assert torch.equal(again[0], inp) and torch.equal(again[1], target)


def test_models_genesis_input_and_target_share_the_flip(monkeypatch):
    """With the three corruptions after the flip switched off, the input is exactly the target: the flip is
    applied to both (the network restores the flipped image, it does not learn to undo a flip)."""
    for name in ("local_pixel_shuffling", "nonlinear_transformation", "image_painting"):
        monkeypatch.setattr(S, name, lambda x, gen, **k: x)
    x = ramp(32)
    inp, target = S.models_genesis(x, gen(0), n_blocks=100)
    assert torch.equal(inp, target)
    assert 0 < sum(not torch.equal(target[i], x[i]) for i in range(len(x))) < len(x)   # some flipped, some not


def test_models_genesis_runs_the_reference_codes_order(monkeypatch):
    """The official code's order: flip, local pixel shuffling, non-linear intensity, painting."""
    calls = []
    for name in ("flip", "local_pixel_shuffling", "nonlinear_transformation", "image_painting"):
        monkeypatch.setattr(S, name, lambda x, gen, name=name, **k: calls.append(name) or x)
    S.models_genesis(ramp(8), gen(0), n_blocks=10)
    assert calls == ["flip", "local_pixel_shuffling", "nonlinear_transformation", "image_painting"]


# ------------------------------------------------------------------------------ quota, ranking, indexing
def test_cluster_quota_by_hand():
    # sizes 5, 3, 2 of N = 10, C = 4: ceil(2.0, 1.2, 0.8) = 2, 2, 1 = 5; one too many; excess 0, 0.8, 0.2
    assert S.cluster_quota([5, 3, 2], 4).tolist() == [2, 1, 1]
    # equal excess (4/3 each -> 2, 2, 2 = 6, two too many): the higher cluster index gives back first
    assert S.cluster_quota([4, 4, 4], 4).tolist() == [2, 1, 1]
    # exact shares need no trimming
    assert S.cluster_quota([10, 30], 8).tolist() == [2, 6]
    # the paper's scale: C = 300 of N = 1600, k = 10: exactly C, each quota the floor or the ceiling of its share
    sizes = np.array([400, 250, 230, 190, 150, 120, 110, 70, 50, 30])
    q = S.cluster_quota(sizes, 300)
    share = 300 * sizes / 1600
    assert q.sum() == 300 and (q >= np.floor(share)).all() and (q <= np.ceil(share)).all()


def test_continue_quota_by_hand_and_equal_to_cluster_quota_from_zero():
    # have 2, 1, 1 of sizes 5, 3, 2; 3 more -> C_t = 7, shares 3.5, 2.1, 1.4. Deficits (x N = 10): 15, 11, 4
    # -> cluster 0 (then 5), cluster 1 (then 1), cluster 0 (5 > 4): +2, +1, +0
    assert S.continue_quota([5, 3, 2], [2, 1, 1], 3).tolist() == [2, 1, 0]
    # a cluster with nothing left is skipped
    assert S.continue_quota([5, 3, 2], [2, 1, 1], 3, avail=[0, 2, 1]).tolist() == [0, 2, 1]
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 60, rng.integers(2, 12))
        C = int(rng.integers(1, sizes.sum() + 1))
        assert S.continue_quota(sizes, np.zeros_like(sizes), C).tolist() == S.cluster_quota(sizes, C).tolist()


def test_take_from_clusters_nearest_first_skipping_taken():
    labels = np.array([0, 1, 0, 0, 1, 2])
    rank = np.array([2, 0, 0, 1, 1, 0])
    available = np.array([True, True, False, True, True, True])  # position 2 (cluster 0's best) is taken
    picks = S.take_from_clusters(labels, rank, available, [2, 1, 0])
    assert picks.tolist() == [3, 0, 1]


def test_cluster_query_continues_the_cumulative_quota_and_ranking():
    """Sizes 5, 3, 2: the base set C = 4 takes 2, 1, 1 (cluster_quota); 3 more make C_t = 7, shared 3.5, 2.1, 1.4,
    so the labelled set becomes 4, 2, 1 (continue_quota: +2, +1, +0), not the 2, 1, 1 + 1, 1, 1 of a quota
    recomputed for the 3 alone; each cluster goes on down its own ranking."""
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    rank = np.array([3, 0, 4, 1, 2, 2, 0, 1, 1, 0])
    train_ids = np.arange(100, 110)
    first = S.cluster_query(labels, rank, train_ids, train_ids, 4)
    assert sorted(first.tolist()) == [101, 103, 106, 109]                 # ranks 0, 1 / 0 / 0
    later = S.cluster_query(labels, rank, train_ids, np.setdiff1d(train_ids, first), 3)
    assert sorted(later.tolist()) == [100, 104, 107]                      # ranks 2, 3 / 1 / none
    assert np.bincount(labels[np.isin(train_ids, np.concatenate([first, later]))]).tolist() == [4, 2, 1]


def test_selected_ids_index_the_pool():
    """Constant images whose brightness is the feature; the pool is a scattered subset of the dataset. The
    picks must be the images nearest each cluster's mean brightness, as dataset indices."""
    # means 25.75, 124.67, 214.33; no ties in the distance to them
    groups = [[20, 21, 23, 24, 26, 27, 29, 36], [120, 121, 122, 124, 130, 131], [200, 210, 211, 212, 213, 240]]
    values = sum(groups, [])
    rng = np.random.default_rng(0)
    n = 50
    slots = np.sort(rng.choice(n, len(values), replace=False))
    pixel = np.full(n, 255, np.uint8)                                 # not in the pool: a distractor
    pixel[slots] = rng.permutation(values)
    x = torch.tensor(pixel).view(n, 1, 1, 1).expand(n, 1, 8, 8).contiguous()

    class Brightness(torch.nn.Module):
        feature_channels = 1

        def features(self, t):
            return t

    feats = S.pooled_features(Brightness(), x, slots, 3, torch.device("cpu"), grid=1)
    labels, rank, dist = S.cluster_ranking(feats.numpy() * 255, 3, 0)
    picked = S.cluster_query(labels, rank, slots, slots, 10)           # quotas 4, 3, 3 (exact)
    assert sorted(pixel[picked].tolist()) == [23, 24, 26, 27, 121, 122, 124, 211, 212, 213]
    # C_t = 15: shares 6, 4.5, 4.5 of have 4, 3, 3 -> +2 from the first group, +1 / +2 from the others (tie)
    later = pixel[S.cluster_query(labels, rank, slots, np.setdiff1d(slots, picked), 5)].tolist()
    assert sorted(later) in ([21, 29, 120, 130, 210], [21, 29, 120, 200, 210])


def test_ssl_features_are_clean_and_in_pool_order():
    # 64 px: the last encoder stage is 4 x 4, so pooling to 2 x 2 averages 4 pixels (at 32 px it is 2 x 2 already,
    # and max pooling would pass as average pooling: Sec. IV-A's AAP)
    x = torch.randint(0, 255, (12, 1, 64, 64), dtype=torch.uint8)
    train_ids = np.array([1, 4, 5, 9, 11])
    state = UNet(1, 1, 4).state_dict()
    args = S.parse_args(["--width", "4", "--image-size", "64", "--batch-size", "2", "--aap-grid", "2"])
    feats = S.ssl_features(state, x, train_ids, args, torch.device("cpu"))
    assert feats.shape == (5, 64 * 4)
    model = UNet(1, 1, 4)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        for j, i in enumerate(train_ids):  # row j is sample train_ids[j], uncorrupted
            one = torch.nn.functional.adaptive_avg_pool2d(model.features(x[i:i + 1].float() / 255), 2).flatten()
            assert np.allclose(feats[j], one.numpy(), atol=1e-5)
    assert np.array_equal(feats, S.ssl_features(state, x, train_ids, args, torch.device("cpu")))


def test_ssl_weights_loaded_into_the_segmentation_model(tmp_path):
    state = UNet(1, 1, 4).state_dict()
    seg = UNet(1, 1, 4, dropout=0.5, dropout_at="bottleneck")
    init = {k: v.clone() for k, v in seg.state_dict().items()}
    # default: everything but the 1x1 output head (trained to output intensities), as the authors' code ('outc')
    assert S.init_from_ssl(seg, state) == ["head.weight", "head.bias"]
    for k, v in seg.state_dict().items():
        assert torch.equal(v, init[k] if k.startswith("head.") else state[k]), k
    assert not torch.equal(state["head.weight"], init["head.weight"])
    assert S.init_from_ssl(seg, state, head=True) == []                 # --transfer-head: the whole network
    assert all(torch.equal(seg.state_dict()[k], v) for k, v in state.items())
    dsal = UNet(1, 1, 4, deep_supervision=S.DSAL_STAGES)
    missing = S.init_from_ssl(dsal, state)
    assert missing and all(k.startswith(("aux.", "head.")) for k in missing)
    with pytest.raises(common.UserError, match="do not fit"):
        S.init_from_ssl(UNet(1, 1, 8), state)
    # --channels 3: the reconstruction net outputs RGB; the body fits, the head never does
    rgb = UNet(3, 3, 4).state_dict()
    assert S.init_from_ssl(UNet(3, 1, 4), rgb) == ["head.weight", "head.bias"]
    with pytest.raises(common.UserError, match="do not fit"):
        S.init_from_ssl(UNet(3, 1, 4), rgb, head=True)
    torch.save({"state_dict": state, "width": 4, "image_size": 32, "pool": ["a"]}, tmp_path / "w.pt")
    args = S.parse_args(["--width", "8", "--image-size", "32"])
    with pytest.raises(common.UserError, match="pre-trained with --width 4, this run uses 8"):
        S.load_ssl_weights(str(tmp_path / "w.pt"), args, ["a"])
    args = S.parse_args(["--width", "4", "--image-size", "32", "--channels", "3"])
    with pytest.raises(common.UserError, match="pre-trained with --channels 1, this run uses 3"):
        S.load_ssl_weights(str(tmp_path / "w.pt"), args, ["a"])


def test_pretraining_settings_flags():
    a = S.parse_args([])
    assert (a.ssl_optim, a.ssl_lr, a.ssl_batch_size, a.transfer_head, a.channels, a.up) == \
        ("adam", 1e-3, a.batch_size, False, 1, "transpose")
    a = S.parse_args(["--ssl-optim", "sgd"])              # the authors' code: SGD 0.01, momentum 0.9, batch 1
    assert (a.ssl_lr, a.ssl_batch_size) == (0.01, 1)
    with pytest.raises(common.UserError, match="--transfer-head with --channels 3"):
        S.parse_args(["--transfer-head", "--channels", "3"])


def test_minmax_per_image():
    x = np.array([[[[10, 20], [30, 60]]], [[[7, 7], [7, 7]]]], np.uint8)
    assert S.minmax_uint8(x).tolist() == [[[[0, 51], [102, 255]]], [[[0, 0], [0, 0]]]]


# ------------------------------------------------------------------------------------------- end to end
def read(run, name):
    return list(csv.DictReader(open(os.path.join(run, name))))


def main(*args):
    """The script in this process (faster than a subprocess where the command line itself is not under test)."""
    return S.main([*map(str, TINY), "--device", "cpu", *map(str, args)])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ssl")
    return tmp, run_dir_from(run_script("ssl_coldstart.py", *TINY, "--out", tmp / "a"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """An ssl_weights.pt for the TINY protocol, written in process (random weights: the tests that use it check
    where weights go, not what they learned), so those tests need no pre-training subprocess."""
    args = S.parse_args([*map(str, TINY)])
    path = tmp_path_factory.mktemp("w") / "ssl_weights.pt"
    torch.manual_seed(0)
    torch.save({"state_dict": S.ssl_unet(args).state_dict(), "width": args.width, "image_size": args.image_size,
                "channels": 1, "up": "transpose", "pool": []}, path)
    return str(path)


def test_end_to_end_pipeline_and_resume(base):
    tmp, full = base
    rows = read(full, "rounds.csv")
    assert [int(r["labeled"]) for r in rows] == [8, 12, 16]
    q = read(full, "queried.csv")
    assert {r["how"] for r in q} == {"oracle-cluster"} and len({r["sample_id"] for r in q}) == len(q) == 16
    assert {r["sample_id"] for r in q} <= set(json.load(open(os.path.join(full, "splits.json")))["train"])
    # the base set follows the quota: per cluster as many as cluster_quota says, nearest the centroid first
    cl = {r["sample_id"]: (int(r["cluster"]), int(r["rank"])) for r in read(full, "clusters.csv")}
    assert len(cl) == 40
    sizes = np.bincount([c for c, _ in cl.values()], minlength=3)
    base0 = [cl[r["sample_id"]] for r in q if r["round"] == "0"]
    quota = S.cluster_quota(sizes, 8)
    assert np.bincount([c for c, _ in base0], minlength=3).tolist() == quota.tolist()
    assert sorted(base0) == sorted((c, r) for c in range(3) for r in range(quota[c]))
    assert int(rows[0]["clusters_covered"]) == (quota > 0).sum()
    for f in ("ssl_weights.pt", "ssl_epochs.csv", "ssl_panel.png", "clusters.png", "learning_curve.png",
              "panel.png", "summary.json", "checkpoint.pt"):
        assert os.path.isfile(os.path.join(full, f)), f
    interface.assert_interface("ssl_coldstart.py", full)

    # interrupted after round 1, then --resume: the same queries and the same results
    out = run_script("ssl_coldstart.py", *TINY, "--out", tmp / "b", check=False, env_extra={"ALSEG_STOP_AFTER_ROUND": "1"})
    assert out.returncode == 3
    part = os.path.join(tmp / "b", os.listdir(tmp / "b")[0])
    open(os.path.join(part, "ssl_pretrain.pt"), "w").write("a stale pre-training state")  # stopped before its removal
    resumed = run_dir_from(run_script("ssl_coldstart.py", "--resume", part))
    assert resumed == part and read(resumed, "queried.csv") == q
    assert not os.path.exists(os.path.join(part, "ssl_pretrain.pt"))  # ssl_weights.pt holds the pre-training
    seconds = torch.load(os.path.join(part, "ssl_weights.pt"), weights_only=False)["seconds"]
    assert json.load(open(os.path.join(part, "summary.json")))["ssl_s"] == seconds > 0  # the pre-training's, not the load's
    interface.assert_interface("ssl_coldstart.py", resumed, help=False)
    same = ("round", "labeled", "dice_mean", "iou_mean", "clusters_covered", "score_selected")
    assert [[r[c] for c in same] for r in read(resumed, "rounds.csv")] == [[r[c] for c in same] for r in rows]


def test_ssl_weights_reach_the_model_end_to_end(weights, tmp_path):
    """No training (--epochs-initial 0): the segmentation model is the pre-trained U-Net but its output head
    (all of it with --transfer-head), or not at all with --no-ssl-init."""
    saved = torch.load(weights, weights_only=False)["state_dict"]
    for flags, body, head in ((["--ssl-init"], True, False), (["--transfer-head"], True, True),
                              (["--no-ssl-init"], False, False)):
        run = main("--rounds", 0, "--epochs-initial", 0, *flags, "--ssl-weights", weights, "--out", tmp_path)
        model = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)["model"]
        assert all(torch.equal(model[k], v) for k, v in saved.items() if not k.startswith("head.")) == body
        assert torch.equal(model["head.weight"], saved["head.weight"]) == head
        assert not os.path.isfile(os.path.join(run, "ssl_weights.pt"))  # reused, not pre-trained again


@pytest.mark.parametrize("strategy,how", [("random", {"oracle-random"}), ("mc-dropout", {"oracle-mc-dropout"}),
                                          ("ceal", {"oracle-lowest", "oracle-highest", "oracle-band", "pseudo"}),
                                          ("ens-s", {"oracle-ens-s"}), ("ens-js", {"oracle-ens-js"}),
                                          ("suggestive", {"oracle-suggestive"}), ("dsal", {"oracle-dsal", "pseudo"})])
def test_comparators_end_to_end(weights, tmp_path, strategy, how):
    run = main("--rounds", 1, "--strategy", strategy, "--ssl-weights", weights, "--dsal-pseudo-from", 1,
               "--out", tmp_path)
    rows = read(run, "rounds.csv")
    assert [int(r["labeled"]) for r in rows] == [8, 12]
    assert [int(r["pseudo"]) for r in rows] == ([0, 2] if strategy in ("ceal", "dsal") else [0, 0])
    q = read(run, "queried.csv")
    assert {r["how"] for r in q if r["round"] == "0"} == {"oracle-random"}    # comparators: random base set
    assert {r["how"] for r in q if r["round"] == "1"} == how
    assert len({r["sample_id"] for r in q}) == len(q)
    # every round: pool_scores.csv (the pool at selection time, its scores, the group of each pick) and picks/
    ps = read(run, "pool_scores.csv")
    interface.assert_interface("ssl_coldstart.py", run, help=False)  # random too, whose pool has no score column
    for rnd in ("0", "1"):
        this = {r["sample_id"]: r["picked"] for r in ps if r["round"] == rnd}
        assert {sid: how for sid, how in this.items() if how} == {r["sample_id"]: r["how"] for r in q if r["round"] == rnd}
        assert os.path.isfile(os.path.join(run, "picks", f"round_{rnd}.png"))
    assert len([r for r in ps if r["round"] == "0"]) == 40 and len([r for r in ps if r["round"] == "1"]) == 32
    assert set(ps[0]) == {"round", "sample_id", "picked", *S.SCORE_COLUMNS[strategy]}
    assert all(r[c] != "" for r in ps if r["round"] == "1" for c in S.SCORE_COLUMNS[strategy])


def test_tables_command(base, tmp_path):
    tmp, full = base
    other = main("--seed", 1, "--ssl-weights", os.path.join(full, "ssl_weights.pt"), "--out", tmp_path / "runs")
    main("--rounds", 1, "--strategy", "random", "--no-ssl-init", "--out", tmp_path / "runs")
    out = run_script("ssl_coldstart.py", "--tables", full, tmp_path / "runs", "--out", tmp_path / "t", device=False)
    text = open(tmp_path / "t" / "ssl_coldstart_tables.md").read()
    assert os.listdir(tmp_path / "t") == ["ssl_coldstart_tables.md"] and text.strip() in out.stdout
    bad = run_script("ssl_coldstart.py", "--tables", full, "--out", tmp_path / "t" / "ssl_coldstart_tables.md",
                     device=False, check=False)  # --out a file: was a FileExistsError traceback
    assert bad.returncode == 2 and bad.stderr.startswith(f"error: --out {tmp_path / 't' / 'ssl_coldstart_tables.md'}: "
                                                         "cannot write ssl_coldstart_tables.md there")
    assert "Table I" in text and "Table II" in text and "Fig. 2" in text
    # Table II: the two cluster runs (seeds 0 and 1) are one column, mean ± std over the seeds per iteration
    d = np.array([[float(r["dice_mean"]) for r in read(run, "rounds.csv")] for run in (full, other)])
    assert "| iter | cluster k=3 AAP 256 (n=2) |" in text
    assert f"| 2 | {d[:, 2].mean():.4f} ± {d[:, 2].std(ddof=1):.4f} |" in text  # sample std over seeds
    # Table I: random with / without SSL weights, clustering only at the default k = 10 and AAP 2x2
    assert "random, w/o SSL (n=1)" in text and "cluster k=3 AAP 256, w/ SSL" not in text
    with pytest.raises(common.UserError, match="no ssl_coldstart run folder"):
        S.main(["--tables", str(tmp_path / "t"), "--out", str(tmp_path / "t")])


def test_bad_input_messages(tmp_path):
    def fails(*args):
        out = run_script("ssl_coldstart.py", *args, "--out", tmp_path, check=False)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        return out.stderr
    assert "--ssl-weights nowhere.pt: file not found" in fails(*TINY, "--ssl-weights", "nowhere.pt")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04" + bytes(200))  # a copy cut short: torch's message is long
    err = fails(*TINY, "--ssl-weights", tmp_path / "cut.pt").strip()
    assert err.startswith(f"error: --ssl-weights {tmp_path / 'cut.pt'}: unreadable (") and len(err) < 300
    assert err.endswith("expected the ssl_weights.pt of an earlier run") and "\n" not in err
    with pytest.raises(common.UserError, match="--image-size 40: expected a multiple of 16"):
        main("--image-size", 40, "--out", tmp_path)
    with pytest.raises(common.UserError, match="labelling budget 48"):
        main("--initial", 40, "--out", tmp_path)


# ------------------------------------------------ each rule end to end, with its scores replaced by known values
def test_isic2017_pool_and_test_come_from_the_official_training_images(tmp_path):
    """Sec. IV-A: the 1600 / 400 are drawn from ISIC 2017's 2000 training images; the official validation and
    test images never enter (prepare_data), and every image is min-max normalised (grayscale, --channels 1)."""
    data = common.load_data("isic2017", str(isic2017_fixture(tmp_path, (6, 2, 3))), 32, channels=1)
    train_ids = [data.ids[i] for i in data.official["train"]]
    out = S.prepare_data(data, S.parse_args(["--data", "isic2017", "--data-dir", str(tmp_path)]))
    assert out.ids == train_ids and not out.official and out.x.shape == (6, 1, 32, 32)
    assert (out.x.reshape(6, -1).min(1) == 0).all() and (out.x.reshape(6, -1).max(1) == 255).all()
    train, val, test = common.make_splits(out, (4, 0, 2), seed=0)
    assert not set(train) & set(test) and len(train) + len(test) == 6


def test_pretraining_reconstructs_the_clean_pool_images(monkeypatch, tmp_path):
    """Eq. 1 as wired in pretrain(): it trains on the pool only (never a test image), on models_genesis's
    corrupted input, with L2 between sigmoid(output) and the clean (flipped) image as its target."""
    seen, load = {}, common.load_data

    def keep(*a, **k):
        seen["data"] = load(*a, **k)
        return seen["data"]

    def train(model, opt, x, target, idx, epochs, batch_size, *, loss_fn, augment, **k):
        seen.update(idx=np.asarray(idx), loss_fn=loss_fn, augment=augment, x=x)
        raise StopIteration

    monkeypatch.setattr(common, "load_data", keep)
    monkeypatch.setattr(common, "train_epochs", train)
    with pytest.raises(StopIteration):
        main("--out", tmp_path)
    run = str(next(tmp_path.iterdir()))
    splits = json.load(open(os.path.join(run, "splits.json")))
    ids = seen["data"].ids
    assert sorted(ids[i] for i in seen["idx"]) == sorted(splits["train"]) and len(splits["test"]) == 10
    out, clean = torch.tensor([[0.0, 2.0]]), torch.tensor([[0.5, 0.2]])
    assert seen["loss_fn"](out, clean).item() == pytest.approx(((0.5 - 0.5) ** 2 + (torch.sigmoid(out[0, 1]).item() - 0.2) ** 2) / 2)
    xb = seen["x"][torch.as_tensor(seen["idx"][:8])].float() / 255
    torch.manual_seed(0)
    inp, target = seen["augment"](xb, None)
    flips = [xb, xb.flip(2), xb.flip(3), xb.flip([2, 3])]  # the target: the clean image, flipped or not
    assert all(any(torch.equal(t, f[j]) for f in flips) for j, t in enumerate(target))
    assert not torch.equal(inp, target)  # the input is corrupted


def test_pretraining_eta_leaves_out_the_first_epoch(monkeypatch, tmp_path, capsys):
    """The ssl epoch line's ETA: the epochs still to run at the mean time of this process's epochs after its
    first (set-up and warm-up; 14 s against 4 s on an H200 at the paper's size), none after the first."""
    clock = [100.0]
    monkeypatch.setattr(S, "time", types.SimpleNamespace(time=lambda: clock[0]))

    class Stop(Exception):
        pass

    def train(model, opt, x, target, idx, epochs, batch_size, **k):
        for e, end in enumerate([110.0, 113.0, 116.0, 119.0][:epochs]):
            clock[0] = end
            yield e, 0.5, 1.0
        raise Stop

    monkeypatch.setattr(common, "train_epochs", train)
    with pytest.raises(Stop):
        main("--out", tmp_path, "--ssl-epochs", 4)
    etas = [line.split("pre-training ETA ")[1] for line in capsys.readouterr().out.splitlines() if "ssl epoch" in line]
    assert etas == ["--", "0m06s", "0m03s", "0m00s"]


@pytest.fixture
def spy(monkeypatch):
    """main() in this process with no pre-training (random SSL weights) and the loaded data kept: the tests below
    replace a scorer by known values and check the picks in queried.csv against the rule."""
    seen = {}
    load = common.load_data

    def keep(*a, **k):
        seen["data"] = load(*a, **k)
        return seen["data"]

    monkeypatch.setattr(common, "load_data", keep)
    monkeypatch.setattr(S, "pretrain", lambda run, x, pool, pool_ids, args, device:
                        ({k: v.cpu() for k, v in S.ssl_unet(args).state_dict().items()}, [], 0.0))
    return seen


def picks_by_round(run):
    out = {}
    for r in read(run, "queried.csv"):
        out.setdefault(int(r["round"]), {}).setdefault(r["how"], []).append(r["sample_id"])
    return out


def known(i):
    """A known score per dataset index, all different, unrelated to the index order."""
    return float((int(i) * 7919) % 1009) + 0.5


def test_cluster_rule_end_to_end(spy, monkeypatch, tmp_path):
    """Features with three known groups of 20, 12 and 8 samples (shuffled through the pool): the base set takes
    N_Ci = ceil(C N_i / N) = 5, 3, 2 (C = 10), each group's samples nearest its mean first; later rounds continue
    the ranking: 10, 6, 4 after round 1 and 15, 9, 6 after round 2 (exact shares, no rounding)."""
    rng = np.random.default_rng(0)
    group = rng.permutation(np.repeat([0, 1, 2], [20, 12, 8]))
    offset = rng.uniform(-1, 1, 40)
    feats = np.stack([np.array([0.0, 100.0, 1000.0])[group] + offset, np.zeros(40)], 1)
    monkeypatch.setattr(S, "ssl_features", lambda state, x, train_ids, args, device: feats[:len(train_ids)])
    run = main("--initial", 10, "--query", 10, "--rounds", 2, "--epochs-initial", 0, "--epochs", 0,
               "--no-ssl-init", "--out", tmp_path)
    pool = json.load(open(os.path.join(run, "splits.json")))["train"]          # the order ssl_features saw
    dist = np.abs(offset - np.array([offset[group == g].mean() for g in range(3)])[group])  # to the group mean
    nearest = lambda g, n: {pool[j] for j in np.flatnonzero(group == g)[np.argsort(dist[group == g])][:n]}
    picks, got = picks_by_round(run), set()
    for rnd, quota in enumerate([(5, 3, 2), (10, 6, 4), (15, 9, 6)]):
        assert set(picks[rnd]) == {"oracle-cluster"}
        got |= set(picks[rnd]["oracle-cluster"])
        assert got == set().union(*(nearest(g, n) for g, n in enumerate(quota))), rnd
    ps = read(run, "pool_scores.csv")   # every round: each pool sample's cluster, rank and distance
    assert {r["round"] for r in ps} == {"0", "1", "2"} and set(ps[0]) >= {"cluster", "rank", "distance", "picked"}
    assert len([r for r in ps if r["round"] == "2"]) == 20


def test_mc_dropout_and_ens_s_query_the_highest_score_end_to_end(spy, monkeypatch, tmp_path):
    """MC dropout and ens-S with a known score per image: each round's oracle picks are the top --query of the
    pool by that score, and pool_scores.csv holds that score."""
    def fake_mc(model, x, idx, T, batch_size, device, amp=False, **k):
        idx = torch.as_tensor(np.asarray(idx))
        for b in common.batches(idx, batch_size):
            var = torch.tensor([known(i) for i in b]).view(-1, 1, 1).expand(-1, *x.shape[-2:]) / x.shape[-1] ** 2
            yield b, torch.full(var.shape, 0.5), var
    monkeypatch.setattr(common, "mc_dropout", fake_mc)
    monkeypatch.setattr(S, "ensemble_scores", lambda members, x, pool, args, device: {
        "entropy": np.array([known(i) for i in pool]), "js": -np.array([known(i) for i in pool]),
        "variance": -np.array([known(i) for i in pool])})   # js and variance rank the other way: not used by ens-s
    for strategy, col in (("mc-dropout", "mc_variance"), ("ens-s", "ens_entropy")):
        run = main("--strategy", strategy, "--epochs-initial", 0, "--epochs", 0, "--out", tmp_path / strategy)
        data, picks = spy["data"], picks_by_round(run)
        score = {data.ids[i]: known(i) for i in range(len(data))}
        pool = set(json.load(open(os.path.join(run, "splits.json")))["train"])
        ps = read(run, "pool_scores.csv")
        for rnd in range(3):
            if rnd:
                got = picks[rnd][f"oracle-{strategy}"]
                assert sorted(got, key=score.get) == sorted(pool, key=score.get)[-4:], (strategy, rnd)
                assert all(abs(float(r[col]) - score[r["sample_id"]]) < 1e-3 for r in ps if r["round"] == str(rnd))
            pool -= set(sum(picks[rnd].values(), []))


def test_dsal_rule_end_to_end(spy, monkeypatch, tmp_path):
    """DSAL ([5]): the lowest head agreement to the oracle; from --dsal-pseudo-from on, pseudo_step x (t - from + 1)
    pseudo-labels, the highest agreement among the most confident (top bin of 10), re-drawn every round and left
    in the pool; their targets are the model's masks, each image its own (here a different one per image: its
    first (i mod (H W - 1)) + 1 pixels), never the ground truth."""
    confident = lambda i: known(i) % 3 == 0.5            # about a third of the pool in the top confidence bin

    def own_mask(i, shape):
        m = torch.zeros(shape[0] * shape[1], dtype=torch.uint8)
        m[:i % (m.numel() - 1) + 1] = 1
        return m.view(shape)

    def fake(model, x, pool, args, device):
        a = np.array([known(i) for i in pool])
        conf = np.array([0.4 if confident(i) else 0.1 for i in pool])
        return a, a, a, conf, torch.stack([own_mask(int(i), tuple(x.shape[-2:])) for i in pool])
    monkeypatch.setattr(S, "dsal_scores", fake)
    run = main("--strategy", "dsal", "--dsal-pseudo-from", 1, "--epochs-initial", 0, "--epochs", 0, "--out", tmp_path)
    data, picks = spy["data"], picks_by_round(run)
    index = {data.ids[i]: i for i in range(len(data))}
    pool = set(json.load(open(os.path.join(run, "splits.json")))["train"]) - set(picks[0]["oracle-random"])
    for rnd, n_pseudo in ((1, 2), (2, 4)):
        by_score = sorted(pool, key=lambda sid: known(index[sid]))
        assert set(picks[rnd]["oracle-dsal"]) == set(by_score[:4]), rnd                     # lowest agreement
        top = [sid for sid in by_score[4:] if confident(index[sid])][-n_pseudo:]              # highest, confident
        assert set(picks[rnd]["pseudo"]) == set(top), rnd
        pool -= set(picks[rnd]["oracle-dsal"])                   # pseudo-labelled samples stay in the pool
    ck = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)
    assert sorted(data.ids[i] for i in ck["pseudo"]) == sorted(picks[2]["pseudo"])  # round 1's set is replaced
    assert len(ck["pseudo_masks"]) == len(ck["pseudo"]) == 4
    for i, mask in zip(ck["pseudo"], ck["pseudo_masks"]):  # each image's own mask, not another pseudo-label's
        assert torch.equal(mask, own_mask(int(i), tuple(mask.shape))), data.ids[i]
    assert not all(np.array_equal(np.asarray(data.y[i]).reshape(mask.shape), mask.numpy())   # not the ground truth
                   for i, mask in zip(ck["pseudo"], ck["pseudo_masks"]))
    assert int(read(run, "rounds.csv")[-1]["pseudo"]) == 4


def test_ensemble_members_start_from_different_initialisations(weights, monkeypatch, tmp_path):
    seen = []
    real = S.ensemble_scores

    def spy_members(members, *a):
        seen.append([{k: v.clone() for k, v in m.state_dict().items()} for m in members])
        return real(members, *a)
    monkeypatch.setattr(S, "ensemble_scores", spy_members)
    main("--strategy", "ens-s", "--rounds", 1, "--epochs-initial", 0, "--ensemble-size", 3, "--ssl-weights", weights,
         "--out", tmp_path)                                   # no training before round 1: the initial weights
    saved = torch.load(weights, weights_only=False)["state_dict"]
    k = "enc.0.conv1.weight"
    w = [m[k] for m in seen[0]]
    assert len(w) == 3 and not any(torch.equal(w[i], w[j]) for i in range(3) for j in range(i))
    assert not any(torch.equal(v, saved[k]) for v in w)


def test_ensemble_scores_by_hand():
    """Three images, two members: (0.5, 0.5), (0.9, 0.1) and (0.99, 0.99) everywhere. ens-S is the entropy of
    the mean (1, 1, 0.08 bits a pixel): it does not tell the first two apart, the variance (0, 0.16, 0) and
    Jensen-Shannon (0, 0.53, 0) do."""
    probs = torch.tensor([[0.5, 0.9, 0.99], [0.5, 0.1, 0.99]])

    class Member(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, xb):                     # image i is the constant i / 255
            i = (xb[:, 0, 0, 0] * 255).round().long()
            return torch.logit(probs[self.m][i]).view(-1, 1, 1, 1).expand(-1, 1, *xb.shape[-2:])
    x = torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 4, 4).contiguous()
    args = S.parse_args(["--batch-size", "2"])
    e = S.ensemble_scores([Member(0), Member(1)], x, np.arange(3), args, torch.device("cpu"))
    h = lambda p: -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    assert np.allclose(e["entropy"], 16 * np.array([1, 1, h(0.99)]), atol=1e-3)
    assert np.allclose(e["variance"], [0, 0.16, 0], atol=1e-5)
    assert np.allclose(e["js"], 16 * np.array([0, 1 - h(0.9), 0]), atol=1e-3)


def test_dsal_pseudo_by_hand():
    agreement = np.array([0.9, 0.8, 0.7, 0.95, 0.1, 0.99])
    confidence = np.array([0.40, 0.10, 0.39, 0.10, 0.40, 0.36])   # bins of 0.03: top bin 0, 2, 4; 5 the next one
    assert S.dsal_pseudo(agreement, confidence, [4], 2).tolist() == [0, 2]      # 3 and 5 are not confident enough
    assert S.dsal_pseudo(agreement, confidence, [4], 4).tolist() == [0, 2, 5, 3]   # filled by agreement
    assert S.dsal_pseudo(agreement, confidence, [], 0).tolist() == []


def test_dsal_loss_weights_and_pseudo_count(monkeypatch):
    """DSAL ([5], its code's loss_weights): 0.6 x the final head's loss + 0.3 x stage 1's + 0.1 x stage 2's;
    pseudo_step x (t - --dsal-pseudo-from + 1) pseudo-labels from iteration --dsal-pseudo-from on."""
    monkeypatch.setattr(common, "bce_dice_loss", lambda logits, target: logits.mean())
    out = (torch.full((1, 1, 2, 2), 1.0), (torch.full((1, 1, 2, 2), 10.0), torch.full((1, 1, 2, 2), 100.0)))
    assert S.dsal_loss(out, None).item() == pytest.approx(0.6 + 3 + 10)
    args = S.parse_args([*map(str, TINY), "--strategy", "dsal", "--dsal-pseudo-from", "2"])   # --pseudo-step 2
    n = 30
    monkeypatch.setattr(S, "dsal_scores", lambda model, x, pool, args, device: (
        np.linspace(0, 1, n), np.zeros(n), np.zeros(n), np.full(n, 0.4), torch.ones((n, 8, 8), dtype=torch.uint8)))
    x = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    for rnd, n_pseudo in ((1, 0), (2, 2), (3, 4), (4, 6)):
        picks = S.query("dsal", rnd, None, [], x, np.arange(n), args, torch.device("cpu"), np.random.default_rng(0))[0]
        assert len(picks.get("pseudo", [])) == n_pseudo, rnd


def test_dsal_scores_confidence_is_the_distance_from_one_half_either_way():
    """DSAL ([5], its JBHI code's CONF_THRES filter): the confidence is the mean |p - 0.5| of the final head, so
    an image the model calls background for sure (p = 0.01: 0.49) is more confident than one at p = 0.55 (0.05);
    the pseudo-label is the final head binarised at 0.5 and the agreement Dice of the binarised heads."""
    probs = torch.tensor([0.01, 0.55])

    class Stub(torch.nn.Module):                   # image 0 is all 0, image 1 all 255
        def forward(self, xb):
            i = (xb[:, 0, 0, 0] > 0.5).long()
            logit = torch.logit(probs[i]).view(-1, 1, 1, 1).expand(-1, 1, *xb.shape[-2:])
            return logit, (logit, logit)
    x = torch.stack([torch.zeros(1, 4, 4), torch.full((1, 4, 4), 255.)]).to(torch.uint8)
    args = types.SimpleNamespace(batch_size=1, amp=False)
    agree, l_dsc, m_dsc, conf, masks = S.dsal_scores(Stub(), x, np.arange(2), args, torch.device("cpu"))
    assert conf == pytest.approx([0.49, 0.05], abs=1e-5)
    assert masks.tolist() == [[[0] * 4] * 4, [[1] * 4] * 4]
    assert agree == pytest.approx([1, 1]) and l_dsc == pytest.approx([1, 1]) and m_dsc == pytest.approx([1, 1])


@pytest.mark.parametrize("query, split", [(35, (10, 10, 15)), (10, (3, 3, 4)), (7, (2, 2, 3))])
def test_ceal_comparator_splits_the_query_as_ceal(monkeypatch, query, split):
    """The CEAL comparator's 35 queries are CEAL's Sec. 4.2 groups, 10 lowest / 10 highest / 15 band, beside
    --pseudo-step pseudo-labels (as ceal_mcdropout.ceal_query): 2/7 of --query each to the lowest and highest,
    rounded to the nearest (10 -> 3 / 3 / 4, not 2 / 2 / 6)."""
    seen = []
    monkeypatch.setattr(common, "mc_variance", lambda model, x, idx, *a: (
        np.arange(len(idx), dtype=float), torch.zeros((len(idx), 8, 8), dtype=torch.uint8)))
    monkeypatch.setattr(common, "ceal_groups", lambda scores, *a, **k: seen.append(a[:4]) or [np.zeros(0, int)] * 4)
    args = S.parse_args([*map(str, TINY), "--query", str(query), "--pseudo-step", "20"])
    S.query("ceal", 1, None, [], torch.zeros(100, 1, 8, 8), np.arange(100), args, torch.device("cpu"), None)
    assert seen == [(*split, 20)]


def test_facility_location_takes_the_marginal_gain():
    """F(S) = sum_u max_{s in S} cos(f_s, f_u) grows most, after a (1, 0) candidate, by the (0, 1) one: a second
    copy of (1, 0) adds nothing (summed similarity alone would take the two copies)."""
    cand = np.array([[1., 0.], [1., 0.], [0., 1.]])
    pool = np.array([[1., 0.]] * 5 + [[0., 1.]] * 2)
    assert S.facility_location(cand, pool, 2).tolist() == [0, 2]


def test_ensemble_members_train_on_bootstrap_resamples(monkeypatch):
    """ens-S / ens-JS / Suggestive: each member on its own resample of the labelled set, drawn with replacement,
    as many draws as labelled images."""
    seen = []
    monkeypatch.setattr(common, "train", lambda m, o, x, t, idx, *a, **k: seen.append(np.asarray(idx).copy()))
    labeled, args = np.arange(100, 120), types.SimpleNamespace(batch_size=4, amp=False)
    S.train_members([None] * 4, [None] * 4, None, None, labeled, 1, None, args, "cpu", np.random.default_rng(0), None)
    assert len(seen) == 4 and all(len(i) == 20 and set(i) <= set(labeled) for i in seen)
    assert all(len(set(i)) < 20 for i in seen) and len({tuple(i) for i in seen}) == 4


def test_cluster_ranking_ranks_by_l2_distance():
    """One cluster centred at 0: L2 distances 3, 2.83, 2.24 (L1 would give 3, 4, 3, another order)."""
    labels, rank, dist = S.cluster_ranking(np.array([[3., 0.], [-2., -2.], [-1., 2.]]), 1, 0)
    assert labels.tolist() == [0, 0, 0] and rank.tolist() == [2, 1, 0]
    assert dist == pytest.approx([3, 8 ** 0.5, 5 ** 0.5])


def test_comparator_rules_pick_by_their_own_score(monkeypatch):
    """query() with the scorers replaced by known, differently ordered scores: ens-S takes the top --query by the
    ensemble-mean entropy, ens-JS by Jensen-Shannon, MC dropout by the variance; Suggestive Annotation chooses
    among the K = 2k most variable; the CEAL comparator pseudo-labels pseudo_step new samples every iteration,
    20 x t in all (CEAL Sec. 4.2, as ceal_mcdropout.py's default --pseudo-mode total), beside --query oracle picks."""
    args = S.parse_args([*map(str, TINY)])                      # --query 4, --pseudo-step 2
    rng = np.random.default_rng(0)
    pool, x = np.arange(100, 120), torch.zeros(120, 1, 8, 8, dtype=torch.uint8)
    e = {k: rng.permutation(20).astype(float) for k in ("entropy", "js", "variance")}
    mc = rng.permutation(20).astype(float)
    monkeypatch.setattr(S, "ensemble_scores", lambda members, x, pool, args, device: e)
    monkeypatch.setattr(S, "pooled_features", lambda m, x, idx, *a, **k: torch.as_tensor(
        np.random.default_rng(1).random((len(idx), 5)), dtype=torch.float32))
    monkeypatch.setattr(common, "mc_variance", lambda model, x, idx, *a: (
        mc[np.asarray(idx) - 100], torch.zeros((len(idx), 8, 8), dtype=torch.uint8)))
    top = lambda s, k: set(np.argsort(-s)[:k].tolist())
    query = lambda strategy, rnd=1: S.query(strategy, rnd, None, [None, None], x, pool, args, torch.device("cpu"), rng)
    for strategy, score in (("ens-s", e["entropy"]), ("ens-js", e["js"]), ("mc-dropout", mc)):
        picks = query(strategy)[0]
        assert set(picks[f"oracle-{strategy}"].tolist()) == top(score, 4), strategy
    picks, cols = query("suggestive")[:2]
    assert set(np.flatnonzero(cols["sa_candidate"]).tolist()) == top(e["variance"], 8)
    assert len(picks["oracle-suggestive"]) == 4 and set(picks["oracle-suggestive"].tolist()) <= top(e["variance"], 8)
    for rnd in (1, 3):
        picks = query("ceal", rnd)[0]
        assert len(picks["pseudo"]) == 2 and sum(len(picks[h]) for h in picks if h != "pseudo") == 4
        every = np.concatenate(list(picks.values()))
        assert len(set(every.tolist())) == len(every)


def test_facility_location_greedy_by_hand():
    """F(S) = sum over the pool of max_{s in S} cos(f_s, f_u), greedy. Pool: 8 along [1, 0], 2 along [0, 1];
    candidates [1, 1]/sqrt 2, [0, 1], [1, 0]. First pick: [1, 0] (gain 8 x 2 + 2 x 1 = 18 over 17.07 and 12,
    each pool sample starting at cos -1); then [0, 1] (gain 2 x 1) over the diagonal (2 x 0.71: its cos to the
    8 is below their 1 now)."""
    pool = np.array([[1., 0.]] * 8 + [[0., 1.]] * 2)
    cand = np.array([[1., 1.], [0., 1.], [1., 0.]])
    assert S.facility_location(cand, pool, 2).tolist() == [2, 1]
    assert S.facility_location(cand, pool, 3).tolist() == [2, 1, 0]


def test_suggestive_annotation_picks_the_representative_candidates(monkeypatch):
    """Suggestive Annotation: among the K = 2k most variable pool samples (positions 0-7 here, variance falling
    with the position), the k chosen by facility location over the pool. Positions 0-3 have features of their
    own (outliers); 4-7 each have three near copies among the other pool samples: facility location takes 4-7,
    the top-k by variance would take 0-3."""
    args = S.parse_args([*map(str, TINY)])  # --query 4
    pool, x = np.arange(100, 120), torch.zeros(120, 1, 8, 8, dtype=torch.uint8)
    eye = np.eye(8)
    feats = np.array([eye[p] if p < 8 else eye[4 + (p - 8) % 4] + 0.1 * eye[(p - 8) % 4] for p in range(20)])
    e = {"entropy": np.zeros(20), "js": np.zeros(20), "variance": np.arange(20, 0, -1.0)}
    monkeypatch.setattr(S, "ensemble_scores", lambda members, x, pool, args, device: e)
    monkeypatch.setattr(S, "pooled_features", lambda m, x, idx, *a, **k: torch.as_tensor(
        feats[np.asarray(idx) - 100], dtype=torch.float32))
    picks, cols = S.query("suggestive", 1, None, [None, None], x, pool, args, torch.device("cpu"),
                          np.random.default_rng(0))[:2]
    assert np.flatnonzero(cols["sa_candidate"]).tolist() == list(range(8))
    assert sorted(picks["oracle-suggestive"].tolist()) == [4, 5, 6, 7]  # positions into the pool


def test_tables_keep_base_set_and_schedule_apart(tmp_path):
    """Run folders written by hand: random queries after a clustered base set are not pooled with random ones,
    and runs with other epochs are never pooled with the default schedule."""
    def fake_run(name, dice, **flags):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        a = dict(vars(S.parse_args(["--strategy", flags.pop("strategy", "random")])), **flags)
        json.dump({"script": "ssl_coldstart", "args": a}, open(d / "config.json", "w"))
        with open(d / "rounds.csv", "w") as f:
            f.write("round,labeled,pseudo,dice_mean,dice_std,iou_mean,train_s,select_s\n")
            f.write(f"0,40,0,{dice},0,0,0,0\n")
        json.dump({"final_dice": dice}, open(d / "summary.json", "w"))  # finished: the tables leave out others
    fake_run("a", 0.5, cold_start="random")
    fake_run("b", 0.7, cold_start="random", seed=1)
    fake_run("c", 0.1, cold_start="cluster")
    args = S.parse_args(["--tables", str(tmp_path / "runs"), "--out", str(tmp_path / "t")])
    text = open(S.tables(args)).read()
    assert "| 40 | 0.1000 | 0.6000 ± " in text                         # columns: "random, cluster base set", "random"
    assert "random, cluster base set, w/ SSL (n=1)" in text and "random, w/ SSL (n=2)" in text
    fake_run("d", 0.9, cold_start="random", epochs=7)
    text = open(S.tables(args)).read()
    assert "random, 50+10 epochs, w/ SSL (n=2)" in text and "random, 50+7 epochs, w/ SSL (n=1)" in text


def test_comparators_pseudo_step_scales_with_the_pool_on_other_data(tmp_path):
    """As in ceal_mcdropout.py: on other data the CEAL comparator pseudo-labels the ISIC share, 20 of 1600."""
    root = common.write_folder(common.make_synthetic(200, 32, 3, seed=0), str(tmp_path / "data"))
    i = TINY.index("--pseudo-step")  # TINY's step 2 left out: the default's
    run = S.main([*map(str, TINY[:i] + TINY[i + 2:]), "--device", "cpu", "--data", "folder", "--data-dir", root, "--split", "128", "0", "20",
                  "--strategy", "ceal", "--no-ssl-init", "--rounds", "1", "--out", str(tmp_path / "runs")])
    assert json.load(open(os.path.join(run, "config.json")))["args"]["pseudo_step"] == 2  # 128 x 20 / 1600
    assert [int(r["pseudo"]) for r in read(run, "rounds.csv")] == [0, 2]


def test_a_kill_while_the_ssl_weights_are_saved_leaves_no_half_file(tmp_path, monkeypatch):
    """ssl_weights.pt is written to a temporary name and then renamed: a kill mid-write leaves no ssl_weights.pt
    for --resume to load (and fail on), so the resume pre-trains again."""
    save = torch.save

    def killed(obj, path, *a, **k):
        if "ssl_weights" not in str(path):  # the epochs' ssl_pretrain.pt
            return save(obj, path, *a, **k)
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(S.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        main("--out", tmp_path)
    run = str(next(tmp_path.iterdir()))
    assert not os.path.exists(os.path.join(run, "ssl_weights.pt"))


def test_a_new_adam_each_round_and_the_authors_batch(tmp_path, monkeypatch):
    """The authors' train.py builds a new Adam (1e-4) on every call, one call per iteration, and run.sh has
    batch_size=10: each round's training gets a fresh Adam with no state, at --lr; the ISIC and other rows
    default to batch 10. The members of an ensemble keep theirs (the Keras DSAL code compiles once)."""
    seen = []

    def train(model, opt, x, target, idx, epochs, batch_size, **kw):
        seen.append((model, opt, len(opt.state), opt.param_groups[0]["lr"]))
        opt.state[next(iter(model.parameters()))] = {"step": torch.tensor(1.0)}  # as if it had stepped
        return [(e, 0.0, 0.0) for e in range(epochs)]

    monkeypatch.setattr(S.common, "train_epochs", train)
    S.main(["--device", "cpu", *map(str, TINY), "--strategy", "ens-s", "--lr", "0.003", "--out", str(tmp_path)])
    seen = [s for s in seen if s[3] != 1e-3]  # not the self-supervised pre-training (--ssl-lr 1e-3)
    mains = [s for s in seen if s[0] is seen[0][0]]  # the segmentation model trains first in each round
    members = [s for s in seen if s[0] is not seen[0][0]]
    assert len(mains) == 3 and len({id(s[1]) for s in mains}) == 3  # rounds 0, 1, 2
    assert all(isinstance(s[1], torch.optim.Adam) and s[2] == 0 and s[3] == 0.003 for s in mains)
    assert len(members) == 2 * 3 and [s[2] for s in members[2:]] == [1] * 4  # each member's Adam kept
    for data in ("isic2017", "kvasir-seg"):
        assert S.parse_args(["--data", data, "--data-dir", "x"]).batch_size == 10


@pytest.mark.parametrize("optim, every, saved", [("adam", 0, 2), ("sgd", 3600, 1)])  # 3600: no 2nd save in a test
def test_a_run_stopped_while_pre_training_goes_on_from_its_last_save(tmp_path, monkeypatch, optim, every, saved):
    """A kill during the Models Genesis pre-training loses what followed the last ssl_pretrain.pt (written after
    the first epoch, then once SAVE_EVERY_S has passed: with 0, every epoch): --resume goes on from it (model,
    optimiser, the SGD schedule, both generators), and the pre-trained weights, their losses, ssl_epochs.csv and
    the run's picks equal those of a run never stopped."""
    monkeypatch.setattr(S, "SAVE_EVERY_S", every)
    flags = ("--ssl-epochs", 4, "--ssl-optim", optim, "--rounds", 1)
    save, saves = torch.save, []
    monkeypatch.setattr(S.torch, "save", lambda obj, path, *a, **k: (saves.append(obj.get("epoch")), save(obj, path)))
    whole = main(*flags, "--out", tmp_path / "whole")
    every_epoch = [1, 2, 3] if every == 0 else [1]  # (the fourth, the last, is in ssl_weights.pt: no "epoch")
    assert saves[:len(every_epoch) + 1] == every_epoch + [None]
    monkeypatch.setattr(S.torch, "save", save)
    train = common.train_epochs

    def stopped(*a, **k):  # a kill after the second epoch's end (its loop body, any save, ran)
        for e, *b in train(*a, **k):
            yield e, *b
            if e == 1 and a[5] == 4:  # a[5]: the epochs asked for
                raise KeyboardInterrupt

    monkeypatch.setattr(S.common, "train_epochs", stopped)
    with pytest.raises(KeyboardInterrupt):
        main(*flags, "--out", tmp_path / "cut")
    monkeypatch.setattr(S.common, "train_epochs", train)
    cut = str(next((tmp_path / "cut").iterdir()))
    state = torch.load(os.path.join(cut, "ssl_pretrain.pt"), weights_only=False)
    assert state["epoch"] == saved and len(state["losses"]) == saved
    torch.save(dict(state, seconds=1000.0), os.path.join(cut, "ssl_pretrain.pt"))  # as if the stopped part ran long
    with open(os.path.join(cut, "ssl_epochs.csv"), "a") as f:
        f.write("3,0.1")  # a row cut short by the kill
    assert S.main(["--resume", cut]) == cut
    a, b = (torch.load(os.path.join(r, "ssl_weights.pt"), weights_only=False) for r in (whole, cut))
    assert a["losses"] == b["losses"] and len(a["losses"]) == 4
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert [r["loss"] for r in read(cut, "ssl_epochs.csv")] == [r["loss"] for r in read(whole, "ssl_epochs.csv")]
    assert read(cut, "queried.csv") == read(whole, "queried.csv")
    assert not os.path.exists(os.path.join(cut, "ssl_pretrain.pt"))  # ssl_weights.pt holds it now
    assert b["seconds"] >= 1000 and json.load(open(os.path.join(cut, "summary.json")))["wall_s"] >= 1000  # counted


def test_pre_training_stopped_on_another_device_goes_on_with_fresh_corruptions(tmp_path, monkeypatch, capsys):
    """--resume may change --device: a CUDA generator's state cannot be set on the CPU (nor the reverse), so
    the corruptions are drawn afresh from the next epoch, said in a note; model, optimiser and order carry on."""
    train = common.train_epochs

    def stopped(*a, **k):  # a kill after the first epoch's end (its loop body, the save, ran)
        for e, *b in train(*a, **k):
            yield e, *b
            if a[5] == 3:
                raise KeyboardInterrupt

    monkeypatch.setattr(S.common, "train_epochs", stopped)
    with pytest.raises(KeyboardInterrupt):
        main("--ssl-epochs", 3, "--rounds", 1, "--out", tmp_path)
    monkeypatch.setattr(S.common, "train_epochs", train)
    run = str(next(tmp_path.iterdir()))
    path = os.path.join(run, "ssl_pretrain.pt")
    state = torch.load(path, weights_only=False)
    first = next(iter(state["model"]))  # another run's file (another width): was a size-mismatch traceback
    torch.save(dict(state, model=dict(state["model"], **{first: torch.zeros(1)})), path)
    with pytest.raises(common.UserError, match=f"{path}: unreadable, or not this run's \\(RuntimeError\\); remove it"):
        S.main(["--resume", run])
    torch.save(dict(state, device="cuda", gen=torch.zeros(16, dtype=torch.uint8)), path)  # as a GPU run saves it
    assert S.main(["--resume", run]) == run
    assert "note: pre-training started on cuda, goes on on cpu: its corruptions from epoch 2 on are drawn afresh" \
        in capsys.readouterr().out
    assert len(read(run, "ssl_epochs.csv")) == 3


def test_tables_leave_out_unfinished_runs(tmp_path):
    """A run without summary.json (stopped by ALSEG_STOP_AFTER_ROUND, crashed, still running) is no final
    result: its rounds are in none of the tables (Fig. 2 would show its last round as "after the last
    iteration"), and a line counts it; with no finished run at all, one line says so."""
    def fake_run(name, dices, seed, finished):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        a = dict(vars(S.parse_args(["--strategy", "random", "--seed", str(seed)])))
        json.dump({"script": "ssl_coldstart", "args": a}, open(d / "config.json", "w"))
        with open(d / "rounds.csv", "w") as f:
            f.write("round,labeled,pseudo,dice_mean,dice_std,iou_mean,train_s,select_s\n")
            f.writelines(f"{k},{40 + 10 * k},0,{dice},0,0,0,0\n" for k, dice in enumerate(dices))
        if finished:
            json.dump({"final_dice": dices[-1]}, open(d / "summary.json", "w"))
    fake_run("stopped", [0.3, 0.9], 1, finished=False)
    args = S.parse_args(["--tables", str(tmp_path / "runs"), "--out", str(tmp_path / "t")])
    with pytest.raises(common.UserError, match="no finished ssl_coldstart runs there \\(1 unfinished: no readable "
                                               "summary.json"):
        S.tables(args)
    fake_run("done", [0.5, 0.6, 0.7], 0, finished=True)
    text = open(S.tables(args)).read()
    assert "| 50 | 0.6000 |" in text and "| 50 | 0.6000 ±" not in text  # Table I: the finished run alone (n = 1)
    assert "| random | w/ SSL | random | 60 | 1 | 0.7000 |" in text     # Fig. 2: its last round
    assert "0.9000" not in text and "0.3000" not in text  # the stopped run's rounds, in no table
    assert "(1 unfinished run(s) left out: no readable summary.json" in text
