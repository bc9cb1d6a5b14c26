"""Annotation-Efficient Polyp Segmentation via Active Learning (Huang et al., ISBI 2024; papers/polyp_weighted_cluster.md).

The uncertainty of an image is the cosine similarity between its polyp and background encoder features,
each masked by the model's own prediction (Eq. 1-2); K-means on image features weighted by that
uncertainty, with K the budget, queries the sample nearest each centroid (Eq. 4); and a feature discrepancy
loss on unlabelled images pushes the two class features apart while training (Eq. 5-7).

  python polyp_weighted_cluster.py                                            # synthetic data, CPU, about 1.5 minutes
  python polyp_weighted_cluster.py --data cvc-clinicdb --data-dir ~/data/CVC-ClinicDB --seed 0   # Table 1 protocol (GPU)
  python polyp_weighted_cluster.py --tables runs/                             # Tables 1-2 from finished runs
"""
import copy
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import common
import oracle
from unet import UNet

# Defaults per dataset. The paper's numbers for CVC-ClinicDB (Sec. 3.1); its second dataset is in-house
# (1000 train / 100 test, 3 epochs per round), so kvasir-seg (1000 images) takes that protocol. Paper silent
# on the rest, our choices: U-Net [22] as unet.UNet (padded convolutions, BatchNorm after each, no dropout
# here; [22] has none, valid convolutions and dropout at the contracting path's end), randomly
# initialised; no augmentation, inputs in [0, 1]; one Adam whose state is kept across rounds; the metrics at
# 352 x 352 against the resized masks (PraNet [20] scores at the masks' own size).
DEFAULTS = {
    "cvc-clinicdb": dict(split=[550, 0, 62],   # Sec. 3.1 (after PraNet [20]): 550 train / 62 test, seeded random here (--test-list: a fixed list); no validation set
                         image_size=352,       # Sec. 3.1
                         initial=30,           # Table 2 starts at 30 labelled; paper silent on how they are drawn: random
                         query=30, rounds=5,   # Sec. 3.1: B = 30, R = 5 (30 -> 180 labelled, Tables 1-2)
                         epochs=5,             # Sec. 3.1: 5 epochs per round on CVC-ClinicDB
                         epochs_initial=50,    # paper silent: 50 epochs (100 Adam steps) on the 30 initial images
                         batch_size=16, lr=1e-4,  # Sec. 3.1: batch 16, Adam 1e-4
                         width=64),            # Sec. 3.1: U-Net [22], whose width is 64
    "kvasir-seg": dict(split=[900, 0, 100],    # PraNet's [20] Kvasir-SEG sizes (900 / 100), seeded random here
                       image_size=352, initial=30, query=30, rounds=5,  # Sec. 3.1: same R, B, size on both datasets
                       epochs=3,               # Sec. 3.1: 3 epochs per round on the 1000-image in-house set
                       epochs_initial=50, batch_size=16, lr=1e-4, width=64),
    # CPU-sized protocol: about 1.5 minutes on 2 cores. The paper's counts (30 + 5 x 30 -> 180 labelled, 5 epochs
    # per round, batch 16, no validation set) on smaller images, a narrower U-Net and a higher learning rate.
    "synthetic": dict(split=[300, 0, 100], image_size=64, initial=30, query=30, rounds=5, epochs=5,
                      epochs_initial=40, batch_size=16, lr=1e-3, width=16),
    # Any other dataset: the CVC-ClinicDB protocol; split sizes from the data (common.default_split), the
    # initial set and B the CVC-ClinicDB shares of the pool (30 and 30 of 550: common.pool_share).
    "other": dict(split=None, image_size=352, initial=None, query=None, rounds=5, epochs=5, epochs_initial=50,
                  batch_size=16, lr=1e-4, width=64),
}
STRATEGIES = ["ours", "random", "entropy", "coreset", "asa", "wo-unc", "wo-clu", "wo-dis", "full"]  # full: the ceiling
FDL_STRATEGIES = {"ours", "wo-unc", "wo-clu"}  # train with L_fdl (Eq. 7); w/o DIS and the baselines (paper
#                                                 silent on theirs) use L_seg only
# The paper's numbers on CVC-ClinicDB: Table 1 (mIoU, Dice) and Table 2 (ablation mIoU, in %).
PAPER_TABLE1 = {(90, "random"): (0.8388, 0.8225), (90, "entropy"): (0.8293, 0.8103), (90, "asa"): (0.8307, 0.8157),
                (90, "coreset"): (0.8252, 0.8099), (90, "ours"): (0.8561, 0.8466),
                (120, "random"): (0.8610, 0.8517), (120, "entropy"): (0.8622, 0.8562), (120, "asa"): (0.8438, 0.8319),
                (120, "coreset"): (0.8452, 0.8299), (120, "ours"): (0.8697, 0.8630),
                (180, "random"): (0.8709, 0.8636), (180, "entropy"): (0.8810, 0.8753), (180, "asa"): (0.8703, 0.8740),
                (180, "coreset"): (0.8537, 0.8410), (180, "ours"): (0.8922, 0.8891)}
PAPER_TABLE2 = {"wo-unc": [75.75, 82.63, 85.04, 85.11, 86.73, 87.61], "wo-clu": [75.75, 79.31, 80.46, 83.70, 85.92, 88.48],
                "wo-dis": [75.75, 81.86, 85.03, 85.93, 86.12, 86.51], "ours": [75.75, 83.08, 85.62, 86.97, 87.94, 89.22]}


def parse_args(argv=None):
    p = common.shared_parser(__doc__, STRATEGIES, DEFAULTS)
    # Method flags
    p.add_argument("--delta", type=float, default=0.2, help="margin delta of L_fdl (Sec. 2.2: 0.2; default 0.2)")
    p.add_argument("--lam", type=float, default=0.1, help="weight lambda_c of L_fdl (Sec. 2.3: 0.1; default 0.1)")
    p.add_argument("--fdl-grad-through-mask", action="store_true", help="let L_fdl back-propagate through the "
                   "prediction y that masks the features as well as through f_E (default: off, y detached: Sec. 2.2 "
                   "pushes the features apart; through y the loss can instead be lowered by changing the "
                   "prediction, see docs/polyp_weighted_cluster.md)")
    p.add_argument("--fdl-initial", action="store_true", help="also add L_fdl in the initial training (paper "
                   "silent; Table 2 gives every variant, w/o DIS included, the same 30-labelled score, so off)")
    p.add_argument("--kmeans-init", type=int, default=10, help="K-means restarts, the best objective kept "
                   "(paper silent; default 10)")
    p.add_argument("--asa-members", type=int, default=4, help="ASA-style: bootstrap ensemble size (assumed; "
                   "the public Suggestive Annotation re-implementation uses 4; default 4)")
    p.add_argument("--asa-candidates", type=int, default=2, help="ASA-style: the top (this x B) uncertain "
                   "samples are the candidates (assumed; default 2)")
    p.add_argument("--test-list", metavar="FILE", help="a file of sample names (one per line, file extension "
                   "optional) that form the test set, e.g. PraNet's fixed 62 CVC-ClinicDB test images [20]; the rest "
                   "are split into train / val by --split (its TEST is replaced by the list's length). Default: a "
                   "seeded random split. CVC-ClinicDB's 612 frames come from 29 colonoscopy video sequences, so a random "
                   "split puts neighbouring frames of one polyp on both sides")
    p.add_argument("--tables", nargs="+", metavar="RUN_DIR", help="print Tables 1-2 from finished run folders "
                   "(or their parents) and exit without training")
    p.add_argument("--table-labeled", type=int, nargs="+", default=[90, 120, 180],
                   help="labelled counts of Table 1 (default: 90 120 180; all counts if none of these is present)")
    args = common.resolve(p.parse_args(argv), DEFAULTS, kmeans_init=1, asa_members=2, asa_candidates=1, lam=0)
    if not -1 <= args.delta < 1:  # Eq. 5 hinges a cosine, in [-1, 1]: at 1 or above L_fdl is 0 on every image
        raise common.UserError(f"--delta {args.delta}: expected a margin in [-1, 1) (Eq. 5 compares it with a cosine)")
    return args


# ----------------------------------------------------------------------------------------------------------
# The method: Eq. 1-7
# ----------------------------------------------------------------------------------------------------------
def class_features(probs, feats):
    """Eq. 1: F_c = Avg(y_c * f_E(x)) for c = 1 (polyp) and 0 (background). probs (B, H, W) are the
    prediction probabilities, downsampled to the feature size (area average; paper: "downsampled");
    feats (B, C, h, w) the encoder output. Avg is the mean over the h x w positions (the cosine of Eq. 2
    does not change if one divides by the mask's sum instead)."""
    y1 = area_mean(probs[:, None].float(), feats.shape[-2:])
    return (y1 * feats).mean((2, 3)), ((1 - y1) * feats).mean((2, 3))


def area_mean(p, size):
    """p (B, 1, H, W) area-averaged to size (h, w): F.adaptive_avg_pool2d, or block_mean on CUDA under
    --deterministic, where adaptive_avg_pool2d's backward raises (--fdl-grad-through-mask differentiates it)."""
    divides = p.shape[-2] % size[0] == 0 and p.shape[-1] % size[1] == 0
    if p.is_cuda and torch.are_deterministic_algorithms_enabled() and divides:
        return block_mean(p, size)
    return F.adaptive_avg_pool2d(p, size)


def block_mean(p, size):
    """The mean of each H/h x W/w block of p (B, C, H, W): adaptive_avg_pool2d's numbers where h, w divide H, W
    (tested), with a backward that is an expand (deterministic)."""
    (h, w), (H, W) = size, p.shape[-2:]
    return p.reshape(*p.shape[:-2], h, H // h, w, W // w).mean((-3, -1))


def uncertainty(f1, f0):
    """Eq. 2: I(x) = cos(F_1(x), F_0(x)); high where polyp and background features look alike."""
    return F.cosine_similarity(f1, f0, dim=1, eps=1e-8)


def fdl_loss(f1, f0, delta):
    """Eq. 5: L_fdl = E_{x in D_U} max[0, cos(F_1(x), F_0(x)) - delta]."""
    return torch.clamp(uncertainty(f1, f0) - delta, min=0).mean()


def discrepancy_loss(model, xu, delta, through_mask=False):
    """Eq. 5 on an unlabelled batch xu (network input, training mode). The prediction y that masks the features
    (Eq. 1) is detached by default (paper silent), so the gradient moves the encoder features F_1, F_0 apart (Sec. 2.2:
    "magnify the differentiation between the features"). With through_mask the gradient also reaches y, and the loss
    can then be lowered by changing the prediction instead (--fdl-grad-through-mask; measured in the docs). Either
    way the decoder runs in training mode on xu, so its BatchNorm running statistics take in the unlabelled batch
    too (paper silent); --lam 0 skips this pass (wo-dis's training)."""
    feats = model.encode(xu)
    with torch.set_grad_enabled(through_mask and torch.is_grad_enabled()):
        probs = torch.sigmoid(model.decode(feats).float()[:, 0])
    return fdl_loss(*class_features(probs, feats[-1].float()), delta)


@torch.inference_mode()
def score(model, x, idx, batch_size, device, amp=False):
    """One eval-mode pass over x[idx]: image features F(x) = Avg(f_E(x)) (Eq. 3), I(x) (Eq. 2) and the mean
    pixel binary entropy (the Entropy baseline). Returns CPU tensors (N, C), (N,), (N,)."""
    def encode_decode(net, xb):  # f_E, the output of the encoder (the U-Net's last encoder stage), and logits
        feats = net.encode(xb)
        return feats[-1], net.decode(feats)

    out = {"feat": [], "unc": [], "ent": []}
    for _, (f_e, logits) in common.forward_batches(model, x, idx, batch_size, device, amp, fn=encode_decode):
        f_e, probs = f_e.float(), torch.sigmoid(logits.float()[:, 0])
        out["feat"].append(f_e.mean((2, 3)).cpu())                        # Eq. 3
        out["unc"].append(uncertainty(*class_features(probs, f_e)).cpu())  # Eq. 1-2
        out["ent"].append(common.entropy_scores(probs, reduce="mean").cpu())
    if not out["feat"]:
        return torch.zeros(0, model.feature_channels), torch.zeros(0), torch.zeros(0)
    return tuple(torch.cat(out[k]) for k in ("feat", "unc", "ent"))


def weighted_kmeans(feats, weights, k, seed, n_init=10):
    """Eq. 4: partition the pool into K groups minimising sum_k sum_{x in S_k} I(x) ||F(x) - mu_k||^2, mu_k the
    I-weighted mean of S_k (our reading of "the cluster centroid"), by Lloyd's algorithm run to convergence
    (Sec. 2.1). scikit-learn's KMeans with sample_weight minimises exactly this: its inertia_ is
    sum_i w_i ||x_i - mu_{label_i}||^2, its centres are the weighted means, and its k-means++ seeding is weighted
    too (the tests check the first two by hand). Eq. 4 as printed also carries a factor 1/|S_k|. We read it as
    K-means' equivalent pairwise form leaking into the centroid form (sum_k 1/(2|S_k|) sum_{x,y in S_k} ||x - y||^2
    is K-means); kept as a factor it would weigh each cluster's mean spread equally whatever its size, a
    different partition (the tests show one), which Lloyd's algorithm does not optimise. Returns (centres (K, C),
    labels (N,), objective)."""
    km = common.kmeans(feats, k, seed, n_init, weight=weights)
    return km.cluster_centers_, km.labels_, float(km.inertia_)


def sq_distances(a, b):
    """Squared Euclidean distances (N, K) in float64 as ||a||^2 - 2 a.b + ||b||^2, without the (N, K, C) array."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None], 0)


def nearest_to_centroids(feats, centres, labels):
    """Sec. 2.1: from each cluster, the member nearest its centroid; never the same sample twice (a cluster
    without an unused member takes the unused sample nearest its centroid). Positions into feats."""
    dist = sq_distances(feats, centres)  # (N, K)
    chosen = []
    for k in range(len(centres)):
        members = np.flatnonzero(labels == k)
        order = np.r_[members[np.argsort(dist[members, k], kind="stable")], np.argsort(dist[:, k], kind="stable")]
        chosen.append(next(int(i) for i in order if int(i) not in chosen))
    return np.array(chosen, dtype=np.int64)


def class_mean_iou(pred, gt):
    """mIoU per image: the mean of the background and polyp IoU (common.dice_iou: both empty = 1), averaged over the
    images like Dice (not from one confusion matrix over all test pixels). Paper silent on the definition. Table 1's
    mIoU exceeds its Dice in 14 of the 15 CVC-ClinicDB cells (not ASA at 180: 0.8703 vs 0.8740) and in 3 of the 15
    in-house cells (Dice is higher in the other 12); a polyp-only IoU never exceeds Dice (IoU <= Dice per image, so
    also on average), so the class mean it is. PROPOSED for common.py: a class-mean IoU next to dice_iou, if another
    script reports mIoU."""
    return (common.dice_iou(pred, gt)[1] + common.dice_iou(~pred, ~gt)[1]) / 2


@torch.inference_mode()
def evaluate(model, x, y, idx, batch_size, device, amp=False):
    """Dice, IoU (polyp) and mIoU (background and polyp) per image over the whole set; numpy arrays."""
    d, i, m = [], [], []
    for b, p in common.predict_batches(model, x, idx, batch_size, device, amp):
        dice, iou = common.dice_iou(p > 0.5, y[b] > 0)
        d.append(dice)
        i.append(iou)
        m.append(class_mean_iou(p > 0.5, y[b] > 0))
    return tuple(torch.cat(t).cpu().numpy() if t else np.zeros(0) for t in (d, i, m))  # no test set: empty


@torch.inference_mode()
def fg_share(model, x, y, idx, args, device):
    """The predicted polyp share of the pixels of x[idx] (threshold 0.5) and the true one: a prediction that
    grows far beyond the truth is how L_fdl through the mask shows (docs). Ground truth of the pool is read for
    this log line only, never by a query rule (nan where y is None: the pool has no masks, common.pool_truth).
    ("", "") for an empty set."""
    if len(idx) == 0:
        return "", ""
    pred = sum(float((p > 0.5).sum()) for _, p in common.predict_batches(model, x, idx, args.batch_size, device, args.amp))
    n = len(idx) * x.shape[-1] * x.shape[-2]
    true = float(y[torch.as_tensor(np.asarray(idx), device=y.device)].float().mean()) if y is not None else np.nan
    return pred / n, true


def use_test_list(data, args):
    """--test-list FILE: the named samples become the dataset's official test set (common.make_splits then takes
    all of them; validation and the training pool are drawn, seeded, from the rest) and --split's TEST its
    length. Names are sample ids (file stems); a line may keep its extension or folder; '#' starts a comment."""
    try:  # utf-8-sig: a byte-order mark (Windows editors) is not part of the first name
        lines = open(args.test_list, encoding="utf-8-sig").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise common.UserError(f"--test-list {args.test_list}: cannot read it (" + (
            e.strerror if isinstance(e, OSError) else "not UTF-8 text: save it as UTF-8, one sample id per line") + ")"
            + (" (the run's own, from its config.json: put the file back there, or correct the path in config.json)"
               if args.resume else ""))
    names = [l.split("#", 1)[0].strip() for l in lines]
    names = [n for n in names if n]
    where = {sid: i for i, sid in enumerate(data.ids)}
    stem = lambda n: n if n in where else os.path.splitext(os.path.basename(n))[0]
    missing = [n for n in names if stem(n) not in where]
    if missing or not names:
        raise common.UserError(f"--test-list {args.test_list}: " + (
            f"{len(missing)} of its {len(names)} names are not samples of --data {args.data} ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); expected one sample id (file stem, e.g. {data.ids[0]}) per line"
            if missing else "no names in it; expected one sample id (file stem) per line"))
    test = np.unique([where[stem(n)] for n in names])
    rest = np.setdiff1d(np.asarray(data.official.get("train", np.arange(len(data)))), test)
    data.official = dict(data.official, train=rest, test=test)
    if "val" in data.official:
        data.official["val"] = np.setdiff1d(data.official["val"], test)
    n_val = args.split[1] if args.split else 0
    args.split = [args.split[0] if args.split else len(rest) - n_val, n_val, len(test)]


# ----------------------------------------------------------------------------------------------------------
# Baselines: Core-set and ASA-style selection (entropy and random are common.py's)
# ----------------------------------------------------------------------------------------------------------
def kcenter_greedy(feats, labeled_mask, k):
    """Core-set (Sener & Savarese 2018), k-center greedy: starting from the labelled points, repeatedly add
    argmax_i min_{j in S} ||x_i - x_j|| (Euclidean). Returns the k chosen unlabelled positions in order."""
    x = torch.as_tensor(feats).float()
    lab = torch.as_tensor(np.asarray(labeled_mask, bool))
    chosen = []
    if lab.any():
        d = torch.cdist(x, x[lab]).min(1).values
    else:  # nothing labelled yet: start from the point nearest the mean (deterministic)
        chosen = [int(torch.argmin(((x - x.mean(0)) ** 2).sum(1)))]
        d = torch.cdist(x, x[chosen])[:, 0]
    while len(chosen) < k:
        d[lab] = -1
        d[chosen] = -1
        j = int(torch.argmax(d))
        if d[j] < 0:
            break
        chosen.append(j)
        d = torch.minimum(d, torch.cdist(x, x[j:j + 1])[:, 0])
    return np.array(chosen, dtype=np.int64)


def asa_representative(cand, pool, labelled, k):
    """ASA-style "distribution discrepancy" step (assumed; PROTOCOLS.md): greedily pick, among the candidate
    features, the one maximising mean cos(c, pool) - mean cos(c, labelled); each pick joins the labelled
    set. Returns positions into cand, in the order chosen."""
    norm = lambda a: F.normalize(torch.as_tensor(a).float(), dim=1)
    c, u, s = norm(cand), norm(pool), norm(labelled)
    to_pool = (c @ u.T).mean(1)
    sum_lab, n_lab = (c @ s.T).sum(1), len(s)
    chosen = []
    for _ in range(min(k, len(c))):
        gain = to_pool - sum_lab / max(1, n_lab)
        gain[chosen] = -float("inf")
        j = int(torch.argmax(gain))
        chosen.append(j)
        sum_lab, n_lab = sum_lab + c @ c[j], n_lab + 1
    return np.array(chosen, dtype=np.int64)


def asa_uncertainty(model, x, y, labeled, pool, args, device, rng):
    """ASA-style uncertainty (assumed): M copies of the current model, each fine-tuned --epochs epochs on a
    bootstrap resample of the labelled set; pixel variance across them, averaged over pixels."""
    probs = []
    for _ in range(args.asa_members):
        member = copy.deepcopy(model)
        boot = rng.choice(labeled, len(labeled), replace=True)
        common.train(member, torch.optim.Adam(member.parameters(), lr=args.lr), x, y, boot, args.epochs,
                     args.batch_size, device=device, amp=args.amp,
                     generator=torch.Generator().manual_seed(int(rng.integers(2 ** 31))))
        probs.append(common.predict(member, x, pool, args.batch_size, device, args.amp))
    return common.ensemble_variance(torch.stack(probs)).cpu()


def select(args, model, x, y, labeled, pool, device, rng):
    """Positions into pool of the samples to query, and the pool's scores for the log and figures (info["rule"]:
    the score each pick is shown with in picks/round_K.png)."""
    k, s = min(args.query, len(pool)), args.strategy
    feat, unc, ent = score(model, x, pool, args.batch_size, device, args.amp)
    info = {"unc": unc.numpy(), "ent": ent.numpy(), "feat": feat.numpy()}
    info["rule"] = info["ent"] if s == "entropy" else info["unc"]
    if s == "random":
        return common.query_random(np.arange(len(pool)), k, rng), info
    if s == "entropy":  # mean binary entropy over pixels (the ranking equals the sum's: same image size)
        return common.top_k(np.arange(len(pool)), info["ent"], k), info
    if s == "wo-clu":   # Table 2 "w/o CLU": the B most uncertain by I(x)
        return common.top_k(np.arange(len(pool)), info["unc"], k), info
    if s in ("coreset", "asa"):
        lab_feat = score(model, x, labeled, args.batch_size, device, args.amp)[0]
        if s == "coreset":  # k-center greedy on F(x), starting from the labelled set
            both = torch.cat([lab_feat, feat])
            mask = np.r_[np.ones(len(labeled), bool), np.zeros(len(pool), bool)]
            info["min_dist_labeled"] = info["rule"] = torch.cdist(feat, lab_feat).min(1).values.numpy()
            return kcenter_greedy(both, mask, k) - len(labeled), info
        info["asa_variance"] = info["rule"] = asa_uncertainty(model, x, y, labeled, pool, args, device, rng).numpy()
        cand = common.top_k(np.arange(len(pool)), info["asa_variance"], min(len(pool), args.asa_candidates * k))
        return cand[asa_representative(feat[cand], feat, lab_feat, k)], info
    # ours, wo-dis: Eq. 4 weighted by I(x); wo-unc: the same K-means unweighted ("w/o UNC")
    if k >= len(pool):  # the whole pool: one cluster per sample
        info["cluster"], info["centroid_dist"] = np.arange(len(pool)), np.zeros(len(pool))
        return np.arange(len(pool)), info
    weights = np.ones(len(pool)) if s == "wo-unc" else np.clip(info["unc"], 1e-6, None)  # I >= 0: ReLU features
    centres, labels, _ = weighted_kmeans(info["feat"], weights, k, int(rng.integers(2 ** 31)), args.kmeans_init)
    info["cluster"], info["centres"] = labels, centres
    info["centroid_dist"] = np.sqrt(sq_distances(info["feat"], centres)[np.arange(len(pool)), labels])
    return nearest_to_centroids(info["feat"], centres, labels), info


# ----------------------------------------------------------------------------------------------------------
# The active-learning loop
# ----------------------------------------------------------------------------------------------------------
def fdl_training(rnd, args, x, pool, gen_u, device):
    """Training with L = L_seg + lambda_c L_fdl (Eq. 5-7, Sec. 2.2-2.3): L_fdl on unlabelled batches of the pool,
    drawn with gen_u, one of --batch-size per labelled step (paper silent), for the strategies that use it
    (FDL_STRATEGIES) after the initial training (--fdl-initial: also in it). Returns common.train_epochs's
    extra_loss (None: L_seg alone) and fdl_of_epoch(), the mean L_fdl of the steps since it was last called."""
    use_fdl = (args.strategy in FDL_STRATEGIES and (rnd > 0 or args.fdl_initial) and len(pool) > 0
               and args.lam > 0)  # --lam 0 trains exactly as w/o DIS (no extra forward through BatchNorm)
    fdl_log = []
    pool_t = torch.as_tensor(pool, device=device, dtype=torch.long)

    def extra_loss(model):  # Eq. 5 on an unlabelled batch gathered by index from the device-resident pool
        b = pool_t[torch.randperm(len(pool_t), generator=gen_u)[: args.batch_size].to(device)]
        xu = common.to_input(x[b]).contiguous(memory_format=common.memory_format(device))
        loss = discrepancy_loss(model, xu, args.delta, args.fdl_grad_through_mask)
        fdl_log.append(loss.detach())
        return args.lam * loss  # Eq. 7

    def fdl_of_epoch():
        fdl = torch.stack(fdl_log).mean().item() if fdl_log else 0.0
        fdl_log.clear()
        return fdl

    return extra_loss if use_fdl else None, fdl_of_epoch


def summary(run, args):
    """summary.json's own entries, the final mIoU beside the paper's CVC-ClinicDB numbers at 180 labelled (Table 1;
    Table 2's mIoU for the ablations), and the end of the last line: run.finish's two arguments."""
    rows = run.read_csv("rounds.csv")
    paper = PAPER_TABLE1.get((180, args.strategy), (PAPER_TABLE2[args.strategy][-1] / 100, None)
                             if args.strategy in PAPER_TABLE2 else (None, None))
    return ({"final_miou": float(rows[-1]["miou_mean"]),  # Tables 1-2, CVC-ClinicDB, 180 labelled
             "paper_cvc_180": {"miou": paper[0], "dice": paper[1]}},
            f" miou {float(rows[-1]['miou_mean']):.4f}")


def main(argv=None):
    args = parse_args(argv)
    if args.tables:
        return tables(args.tables, args.table_labeled)
    run, device = common.Run.start(__file__, args, parse_args)

    # ---- data: official layout -> uint8 cache -> seeded split, all of it on the device as uint8 ----
    data = common.load_data(args.data, args.data_dir, args.image_size, 3, args.seed,
                            n=sum(args.split) if args.split else None, workers=args.workers)
    if args.test_list:  # a fixed test set (PraNet's 62 CVC-ClinicDB images [20]); train / val drawn from the rest
        use_test_list(data, args)
    # other data: the CVC-ClinicDB shares, 30 initial (Table 2) and B = 30 (Sec. 3.1) of the 550 pool
    train_ids, val_ids, test_ids = common.split_data(run, data, args, 30, 30, 550)
    common.check_budget(len(train_ids), args.initial, args.query, args.rounds)
    rounds, epochs0, steps = common.ceiling(args, len(train_ids))  # --strategy full: the ceiling
    x, y = common.to_device(data, device)

    # ---- model, optimiser, sets ----
    model = common.prepare_model(UNet(3, 1, args.width), device, args.compile)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)  # fine-tuned across rounds (Sec. 2)
    rng = np.random.default_rng([args.seed, 1])  # initial draw and queries
    gen = torch.Generator().manual_seed(args.seed)  # batch order of the labelled set
    gen_u = torch.Generator().manual_seed(args.seed + 1)  # unlabelled batches of L_fdl
    n0 = len(train_ids) if args.strategy == "full" else args.initial
    labeled = rng.choice(train_ids, n0, replace=False)
    pool = np.setdiff1d(train_ids, labeled)
    start, state = run.resume(model, opt, rng, gen)
    oracle.restore(run, start, data, y)  # --oracle folder: the person's labels of the finished rounds
    if state:
        labeled, pool = state["labeled"], state["pool"]
        gen_u.set_state(state["rng_unlabeled"])
    progress = common.Progress(run, epochs0 + rounds * args.epochs,
                               0 if start == 0 else epochs0 + (start - 1) * args.epochs,
                               plan=common.Progress.plan(n0, args.query, rounds, epochs0, args.epochs,
                                                         len(train_ids) - n0, scored=args.strategy not in ("random", "full")))

    for rnd in range(start, rounds + 1):
        if common.pool_used_up(rnd, pool):  # nothing left to query: the finished rounds stand
            break
        # ---- selection (Sec. 2.1) ----
        t0, queried, info = time.time(), {}, None
        if rnd > 0:
            pos, info = select(args, model, x, y, labeled, pool, device, rng)
            new = pool[pos]
            assert len(set(pos.tolist())) == len(pos), "a sample was queried twice"
            queried[f"oracle-{args.strategy}"] = [data.ids[i] for i in new]
            log_pool(run, rnd, data, pool, pos, info)
            common.save_picks(run, rnd, model, data, x, {f"oracle-{args.strategy}": new},
                              dict(zip(new.tolist(), info["rule"][pos])), args.batch_size, device, args.amp)
            labeled, pool = np.concatenate([labeled, new]), np.setdiff1d(pool, new)
        else:
            # the seeded random start (paper silent: random), or the whole pool for the ceiling
            queried["full" if args.strategy == "full" else "initial"] = [data.ids[i] for i in labeled]
        select_s = time.time() - t0
        oracle.ask(run, rnd, new if rnd > 0 else labeled, data, y, model, x, args.batch_size, device, args.amp)
        t0 = time.time()

        # ---- training: L = L_seg + lambda_c L_fdl (Eq. 5-7), fine-tuning after each query (Sec. 2) ----
        epochs = epochs0 if rnd == 0 else args.epochs
        extra_loss, fdl_of_epoch = fdl_training(rnd, args, x, pool, gen_u, device)
        # the ceiling (steps): no pool left, so no L_fdl: the U-Net on the whole pool with L_seg alone
        for e, loss, _ in common.train_epochs(model, opt, x, y, labeled, epochs, args.batch_size, device=device,
                                              amp=args.amp, loss_fn=common.bce_dice_loss, extra_loss=extra_loss,
                                              generator=gen, steps=steps):
            progress.epoch(rnd, e, epochs, loss, fdl=fdl_of_epoch())  # epochs.csv: the loss and the mean L_fdl
        train_s = time.time() - t0

        # ---- evaluation on the test set (mIoU and Dice, Table 1); the round is written first ----
        dice, iou, miou = evaluate(model, x, y, test_ids, args.batch_size, device, args.amp)
        fg_pred, fg_true = fg_share(model, x, common.pool_truth(data, y), pool, args, device)
        miou_mean, miou_std = common.mean_std(miou)
        row = common.round_row(rnd, len(labeled), 0, dice, iou, train_s, select_s, miou_mean=miou_mean,
                               miou_std=miou_std, pool_left=len(pool),
                               pool_unc=float(info["unc"].mean()) if info else "",  # mean I(x) of the pool, before
                               queried_unc=float(info["unc"][pos].mean()) if info else "",
                               pool_fg_pred=fg_pred, pool_fg_true=fg_true)  # L_fdl's side effect: see fg_share
        print(f"  mIoU (background and polyp) {row['miou_mean']:.4f}")
        run.end_round(row, queried, progress, model, opt, rng, gen, labeled=labeled, pool=pool,
                      rng_unlabeled=gen_u.get_state())

    oracle.predict_rest(run, model, data, x, np.setdiff1d(train_ids, labeled), args.batch_size, device, args.amp)
    panel(run, model, data, x, pool if len(pool) else test_ids, args, device)
    return run.finish(*summary(run, args))


def log_pool(run, rnd, data, pool, pos, info):
    """pool_scores.csv (per pool sample: I(x), entropy, and the score of the strategy's own rule, with the group
    it went to) and the figures: the pool's I(x) histogram with the queried samples marked, and for K-means
    strategies the features' first two principal components with centroids and queries (the paper's Fig. 2)."""
    scores = {"uncertainty": info["unc"], "entropy": info["ent"]}
    scores.update({k: info[k] for k in ("cluster", "centroid_dist", "asa_variance", "min_dist_labeled") if k in info})
    run.log_pool_scores(rnd, [data.ids[i] for i in pool], scores,
                        {f"oracle-{run.args.strategy}": [data.ids[i] for i in pool[pos]]})
    common.plot_hist(run.path("uncertainty_hist.png"), info["unc"], 40, "I(x) = cos(F1, F0)",
                     f"pool uncertainty, round {rnd}", marks={"queried": info["unc"][pos]})
    if "centres" in info:
        mean = info["feat"].mean(0)
        axes = np.linalg.svd(info["feat"] - mean, full_matrices=False)[2][:2].T
        p, c = (info["feat"] - mean) @ axes, (info["centres"] - mean) @ axes
        common.plot(run.path("clusters.png"), {"pool": (p[:, 0], p[:, 1]), "centroids": (c[:, 0], c[:, 1]),
                                               "queried": (p[pos, 0], p[pos, 1])},
                    "PC 1 of F(x)", "PC 2", f"round {rnd}: {run.args.strategy}", kind="scatter")


def panel(run, model, data, x, ids, args, device, n=4):
    """Image / ground truth / prediction / pixel entropy for a few pool samples, I(x) in panel.csv."""
    ids = np.asarray(ids)[:n]
    probs = common.predict(model, x, ids, args.batch_size, device, args.amp)
    unc = score(model, x, ids, args.batch_size, device, args.amp)[1]
    ent = common.binary_entropy(probs)
    rows = [[data.x[i], data.y[i], (probs[j] > 0.5).float().cpu().numpy(), ent[j].cpu().numpy()]
            for j, i in enumerate(ids)]
    common.save_panel(run.path("panel.png"), rows, 4, ["image", "ground truth", "prediction", "pixel entropy"])
    if os.path.isfile(run.path("panel.csv")):  # written whole: a run resumed after (or killed while) finishing
        os.remove(run.path("panel.csv"))       # writes it again
    run.append_csv("panel.csv", [{"sample_id": data.ids[i], "uncertainty": float(u)} for i, u in zip(ids, unc)])


# ----------------------------------------------------------------------------------------------------------
# Tables 1-2 from finished runs (common.collect_runs / one_schedule / summarise / markdown_table)
# ----------------------------------------------------------------------------------------------------------
def tables(paths, budgets):
    rows = [r for r in common.collect_runs(paths) if r["script"] == "polyp_weighted_cluster" and r["finished"]]
    if not rows:
        raise common.UserError(f"--tables {' '.join(paths)}: no finished polyp_weighted_cluster run folders there")
    for data in sorted({r["data"] for r in rows}):
        mine = [r for r in rows if r["data"] == data]
        common.one_schedule(mine, data)
        stats = common.summarise(mine, ("labeled", "strategy"), ("miou_mean", "dice_mean"))
        cvc = data == "cvc-clinicdb"
        t1 = [s for s in stats if s["strategy"] in ("random", "entropy", "asa", "coreset", "ours")]
        at = [s for s in t1 if s["labeled"] in budgets] or t1
        order = ["random", "entropy", "asa", "coreset", "ours"]
        at.sort(key=lambda s: (s["labeled"], order.index(s["strategy"])))
        for s in at:
            s["paper_miou"], s["paper_dice"] = PAPER_TABLE1.get((s["labeled"], s["strategy"]), ("", "")) if cvc else ("", "")
        print(f"Table 1 on {data}: test mIoU and Dice, mean ± std over n runs (seeds)\n")
        print(common.markdown_table(at, ["labeled", "strategy", "n", "miou_mean", "dice_mean", "paper_miou", "paper_dice"],
                                    ["labelled", "method", "n", "mIoU", "Dice", "paper mIoU", "paper Dice"]))
        counts = sorted({s["labeled"] for s in stats})
        t2 = []
        for strat in ("wo-unc", "wo-clu", "wo-dis", "ours"):
            cells = {s["labeled"]: s for s in stats if s["strategy"] == strat}
            if cells:
                t2.append(dict({str(c): cells[c]["miou_mean"] for c in cells}, strategy=strat,
                               n=min(s["n"] for s in cells.values()),
                               **{f"{c}_std": cells[c]["miou_mean_std"] for c in cells}))
                if cvc:
                    t2.append(dict(zip(map(str, (30, 60, 90, 120, 150, 180)), np.array(PAPER_TABLE2[strat]) / 100),
                                   strategy=f"paper: {strat}", n=1))
        print(f"\nTable 2 on {data}: test mIoU per labelled count (ablations), mean ± std over n runs\n")
        print(common.markdown_table(t2, ["strategy", "n"] + [str(c) for c in counts], ["method", "n"] + [str(c) for c in counts]))
        print()


if __name__ == "__main__":
    common.run_main(main)
