"""
Score a checkpoint by its samples, offline: a small classifier trained on the checkpoint's own data says
how often a sample is recognised as the class it was asked for, and how far the samples lie from real
held-out examples in the classifier's features (a Fréchet distance, next to the same distance between two
halves of real data: the floor a perfect model would reach with this many examples). Both distances are given
for one random choice of the real examples and averaged over 20 such choices; the average is the steadier number.

    python evaluate.py --ckpt out/image/ckpt.pt                      # up to 50 samples per class
    python evaluate.py --ckpt out/image/ckpt.pt --n 20 --json s.json # the same numbers, also as JSON
    python evaluate.py --ckpt out/audio/ckpt.pt --cfg 1              # sampling flags as in sample.py

The checkpoint says which data it was trained on (--data points elsewhere). The classifier (a CNN on the
pixels of images, or on the log-mel spectrogram of clips) is trained on that data's training split the first
time, and cached next to the data as adr-classifier-<dataset>-<fingerprint>.pt with its held-out accuracy.

These numbers follow the idea of FID and Inception Score (features and predictions of a classifier), but not
their values: the classifier is small and trained on the dataset itself, not Inception-v3 on ImageNet, so they
compare models scored here, on the same data and with the same number of samples, and nothing else.
"""

import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import DEVICE_HELP, CheckpointError, OneLineErrors, add_sampling_flags, check_writable, check_writable_file
from cli import compile_head, default_device, fail, format_time, held_out_bpd, load_checkpoint, log, number
from cli import guidance_text, pick_device, run, sampling_options, timed_sample, vocoder_iterations, warn
from data import fingerprint, load_dataset
from media import OutputError, atomic_output, dequantise, from_tokens, quantise, save_image_grid, save_samples_npz
from media import mel_frames, to_tokens

# ----------------------------------------------------------------------------------------------
# The classifier: three stages of 3x3 convolutions, global average pooling, a linear layer. Its penultimate
# activations are the features of the Fréchet distance.


CLASSIFIER_VERSION = "cnn-32-64-128 v1"  # cached classifiers of another version are trained again
REFERENCE_SPLITS = 20  # random splits of the held-out data the Fréchet distances are averaged over


def conv_block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Classifier(nn.Module):
    def __init__(self, layout, num_classes, width=32):
        super().__init__()
        self.layout = layout
        audio = layout["kind"] == "audio"
        if audio:  # 40 ms windows, 20 ms hops, 32 mel bands: a 1 s clip is a 32 x 51 image
            import torchaudio

            rate = layout["sample_rate"]
            self.mel = torchaudio.transforms.MelSpectrogram(rate, n_fft=rate // 25, hop_length=rate // 50, n_mels=32)
        channels = 1 if audio else layout["channels"]
        self.input_norm = nn.BatchNorm2d(channels)
        self.features = nn.Sequential(
            conv_block(channels, width), conv_block(width, width), nn.MaxPool2d(2),
            conv_block(width, 2 * width), conv_block(2 * width, 2 * width), nn.MaxPool2d(2),
            conv_block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def embed(self, x):
        """Images (B, C, H, W) or waveforms (B, N) in [-1, 1] -> features (B, 4 * width)."""
        if self.layout["kind"] == "audio":
            x = torch.log(self.mel(x) + 1e-5)[:, None]  # (B, 1, mels, frames)
        return self.features(self.input_norm(x))

    def forward(self, x):
        return self.head(self.embed(x))


def shift(x, layout, generator):
    """Augmentation: images moved by up to 2 pixels, clips by up to 0.1 s (each example its own shift)."""
    if layout["kind"] == "image":
        padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
        dy, dx = torch.randint(0, 5, (2, len(x)), generator=generator).tolist()
        h, w = x.shape[-2:]
        return torch.stack([p[:, i : i + h, j : j + w] for p, i, j in zip(padded, dy, dx)])
    limit = layout["sample_rate"] // 10
    amounts = torch.randint(-limit, limit + 1, (len(x),), generator=generator).tolist()
    return torch.stack([torch.roll(w, a) for w, a in zip(x, amounts)])


@torch.no_grad()
def predict(classifier, x, batch_size=500):
    """(features, class probabilities) of examples x, in batches."""
    classifier.eval()
    features = torch.cat([classifier.embed(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    return features.double(), classifier.head(features).softmax(-1).double()


def all_examples(dataset):
    """A whole dataset as one tensor (N, ...) of examples in [-1, 1] and one of labels (no random flips)."""
    flip = getattr(dataset, "flip", False)
    dataset.flip = False
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    dataset.flip = flip
    return x, dataset.labels.clone()


def train_classifier(train_set, test_set, layout, num_classes, steps, seed, device, batch_size=128):
    """Train on the training split (augmented), return (classifier in eval mode, accuracy on the test split)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    classifier = Classifier(layout, num_classes).to(device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    start, last = time.time(), time.time()
    classifier.train()
    for step in range(1, steps + 1):
        index = torch.randint(0, len(train_set), (batch_size,), generator=generator).tolist()
        x, y = zip(*(train_set[i] for i in index))  # training images come flipped at random where the data says so
        x, y = shift(torch.stack(x), layout, generator).to(device), torch.tensor(y, device=device)
        loss = F.cross_entropy(classifier(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if time.time() - last >= 10 or step == steps:
            log(f"classifier step {step}/{steps} | loss {loss.item():.3f} | {format_time(time.time() - start)}")
            last = time.time()
    recalibrate_batch_norm(classifier, train_set, layout, generator, device, batch_size)
    x, y = all_examples(test_set)
    _, probs = predict(classifier, x.to(device))
    return classifier.eval(), (probs.argmax(-1).cpu() == y).double().mean().item()


@torch.no_grad()
def recalibrate_batch_norm(classifier, train_set, layout, generator, device, batch_size, batches=20):
    """Set the batch norms' statistics to plain averages over training batches of the final weights (the
    running averages of a short training run still remember its first steps)."""
    norms = [m for m in classifier.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    classifier.train()
    for _ in range(batches):
        index = torch.randint(0, len(train_set), (batch_size,), generator=generator).tolist()
        classifier(shift(torch.stack([train_set[i][0] for i in index]), layout, generator).to(device))
    for m in norms:
        m.momentum = 0.1


def classifier_steps(train_size):
    """Ten passes over the training split, at least 600 and at most 1200 steps of 128 examples (under three
    minutes on two CPU cores for MNIST)."""
    return min(1200, max(600, math.ceil(10 * train_size / 128)))


def get_classifier(source, train_set, test_set, layout, class_names, args, device):
    """The cached classifier of this data if there is one (same data, same layout), else a new one, cached.
    Returns (classifier, held-out accuracy, cache path)."""
    if layout["kind"] == "audio":  # it hears waveforms: one classifier for every token layout of the same clips
        layout = dict(kind="audio", sample_rate=layout["sample_rate"], length=layout["length"])
    identity = dict(classifier=CLASSIFIER_VERSION, source=source["name"], class_names=list(class_names), layout=layout,
                    train=fingerprint(train_set), test=fingerprint(test_set))
    name = f"adr-classifier-{source['name']}-{identity['train'][:8]}.pt"
    path = args.classifier or os.path.join(source["root"], name)
    cached = read_classifier(path, device)
    if cached is not None and not args.retrain_classifier:
        if cached.get("identity") == identity:
            classifier = Classifier(layout, len(class_names)).to(device)
            classifier.load_state_dict(cached["weights"])
            return classifier.eval(), cached["accuracy"], path
        log(f"the classifier in {path} was trained on other data: training a new one")
    steps = args.classifier_steps or classifier_steps(len(train_set))
    log(f"training a {source['name']} classifier ({steps} steps; cached for later runs) ...")
    classifier, accuracy = train_classifier(train_set, test_set, layout, len(class_names), steps, 0, device)
    state = dict(identity=identity, accuracy=accuracy, steps=steps, weights=classifier.state_dict())
    try:
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
    except OutputError as e:
        warn(f"the classifier is not cached ({e}); pass --classifier PATH to keep it")
    return classifier, accuracy, path


def read_classifier(path, device="cpu"):
    """A classifier cached by get_classifier (a dict with its identity and weights), or None where there is no
    file. Anything else at `path` is refused in one line: it is never read as code, and never overwritten."""
    if not os.path.exists(path):
        return None
    try:
        cached = torch.load(path, map_location=device, weights_only=True) if os.path.isfile(path) else None
    except Exception:
        cached = None
    if not (isinstance(cached, dict) and "identity" in cached and "weights" in cached):
        fail(f"--classifier {path} holds something other than an evaluate.py classifier; it is left as it is: "
             f"give another path")
    return cached


# ----------------------------------------------------------------------------------------------
# The metrics


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) between Gaussians fitted to feature
    sets a and b (N, F): the Fréchet (2-Wasserstein) distance of FID, computed with symmetric square roots."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)

    def sqrt_psd(m):
        values, vectors = torch.linalg.eigh(m)
        return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T

    root_a = sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def classifier_score(probs):
    """exp(E_x KL(p(y|x) || p(y))), the Inception Score's formula with this classifier: high when each
    example is confidently one class and the classes are evenly used (at most the number of classes)."""
    marginal = probs.mean(0, keepdim=True)
    kl = (probs * (probs.clamp(min=1e-12).log() - marginal.clamp(min=1e-12).log())).sum(-1)
    return kl.mean().exp().item()


def scores(classifier, samples, labels, real, splits, device, real_labels=None):
    """Samples against real examples, for a list of splits (a, b) of the real ones (index tensors of two disjoint
    halves): the Fréchet distance of the samples to real[a] and its floor, real[b] to real[a], for the first split
    and averaged over all; the accuracy of the samples (None without labels) and of real[a] (with real_labels) and
    the classifier scores of the samples and of real[a], for the first split."""
    features, probs = predict(classifier, samples.to(device))
    real_features, real_probs = predict(classifier, real.to(device))
    # in float64, as the distances are: a float32 mean would round them at the 7th digit
    fd = torch.tensor([frechet_distance(features, real_features[a]) for a, _ in splits], dtype=torch.float64)
    floor = torch.tensor([frechet_distance(real_features[b], real_features[a]) for a, b in splits], dtype=torch.float64)
    a = splits[0][0]

    def accuracy(p, y):
        return None if y is None else (p.argmax(-1).cpu() == y.cpu()).double().mean().item()

    return dict(accuracy=accuracy(probs, labels), score=classifier_score(probs),
                real_accuracy=accuracy(real_probs[a], None if real_labels is None else real_labels[a]),
                score_real=classifier_score(real_probs[a]), fd=fd[0].item(), fd_floor=floor[0].item(),
                splits=len(splits), fd_mean=fd.mean().item(), fd_floor_mean=floor.mean().item(),
                fd_floor_sd=floor.std().item() if len(splits) > 1 else 0.0)


def where_the_sound_is(tokens, layout):
    """When each clip of mel tokens (N, L, D) sounds: its first and last frame whose level (mean over the bands)
    lies above halfway from the clip's quiet (its 10th-percentile frame) to its loudest frame, in seconds."""
    frames = tokens.float().clamp(-1, 1).reshape(len(tokens), -1, layout["bands"])[:, : mel_frames(layout)]
    level = frames.mean(-1)
    quiet, loudest = level.quantile(0.1, dim=1, keepdim=True), level.amax(1, keepdim=True)
    sounding = (level > (quiet + loudest) / 2).float()
    first, last = sounding.argmax(1).double(), level.shape[1] - 1 - sounding.flip(1).argmax(1).double()
    flat = sounding.sum(1) == 0  # no frame above halfway: the clip has no sound to place (NaN)
    seconds = layout["hop"] / layout["sample_rate"]
    return first.masked_fill(flat, math.nan) * seconds, last.masked_fill(flat, math.nan) * seconds


def timing(tokens, real, layout):
    """Where the words start and end, samples (mel tokens) against real clips (waveforms): the medians, and the
    share of clips still sounding in the last 0.05 s (guidance starts words early and ends them late)."""
    result = {}
    for name, x in (("", tokens), ("real_", to_tokens(real, layout))):
        start, end = where_the_sound_is(x, layout)
        result.update({f"{name}start_s": start.nanmedian().item(), f"{name}end_s": end.nanmedian().item(),
                       f"{name}sounding_at_end": (end >= layout["length"] / layout["sample_rate"] - 0.05)
                       .double().mean().item()})
    return result


def through_the_vocoder(classifier, real, real_labels, split, layout, args, device):
    """The ceiling that mel tokens allow, for one split (a, b) of the held-out clips: the clips through tokens and
    the vocoder (in --batch-size batches, as the WAV files hold them), scored as samples are: the accuracy of
    vocoded real[a], and the Fréchet distance of vocoded real[b] to real[a] (the floor's pair, one side vocoded)."""
    a, b = split
    chosen = torch.cat([a, b])
    vocoded = torch.cat([from_tokens(to_tokens(real[i].to(device), layout), layout, args.griffin_lim_iters).cpu()
                         for i in chosen.split(args.batch_size)])
    features, probs = predict(classifier, dequantise(quantise(vocoded, layout), layout).to(device))
    real_features, _ = predict(classifier, real[a].to(device))
    accuracy = (probs[: len(a)].argmax(-1).cpu() == real_labels[a].cpu()).double().mean().item()
    return dict(vocoded_accuracy=accuracy, vocoded_fd=frechet_distance(features[len(a) :], real_features))


# ----------------------------------------------------------------------------------------------
# The command


def parse_args(argv=None):
    p = OneLineErrors(description="Score a checkpoint's samples with a classifier trained on its data: accuracy, "
                      "Fréchet distance to held-out real examples and its real-vs-real floor, bits/dim.")
    p.add_argument("--ckpt", required=True, help="ckpt.pt written by train_image.py or train_audio.py")
    p.add_argument("--n", type=number(int, 1), default=None, help="samples per class, or in all for an unconditional "
                   "model (default: 50 per class, fewer where the held-out split is too small)")
    p.add_argument("--data", default=None, help="the dataset's folder, where it is not where the checkpoint says")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--out", default=None, help="also write the scored samples here (samples.png, samples.npz)")
    p.add_argument("--batch-size", type=number(int, 1), default=500, help="samples drawn at once (default: 500)")
    p.add_argument("--bpd-examples", type=number(int, 0), default=256,
                   help="held-out examples for bits/dim (0: skip it; default: 256)")
    p.add_argument("--classifier", default=None, help="where the classifier is cached (default: next to the data)")
    p.add_argument("--classifier-steps", type=number(int, 1), default=None,
                   help="training steps of a new classifier (default: ten passes over the data, 600 to 1200)")
    p.add_argument("--retrain-classifier", action="store_true", help="train the classifier again, even if cached")
    p.add_argument("--device", default=default_device(),
                   help=f"{DEVICE_HELP} (default: cuda when there is a GPU, else cpu)")
    add_sampling_flags(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device, args.compile)
    if args.json:
        check_writable_file(args.json, "--json")
    if args.classifier:
        check_writable_file(args.classifier, "--classifier")
        read_classifier(args.classifier)  # refused now, not after the data is read
    try:
        model, ckpt = load_checkpoint(args.ckpt, device, use_ema=args.ema)
    except CheckpointError as e:
        fail(str(e))
    config, layout, class_names = model.config, ckpt["layout"], ckpt["class_names"]
    args.griffin_lim_iters = vocoder_iterations(args, layout)
    model = compile_head(model) if args.compile else model
    options = sampling_options(args, config, ckpt["sampling"])
    source = dict(ckpt.get("source") or {})
    if not source:
        fail(f"{args.ckpt} does not say which data it was trained on (it predates evaluate.py); train it again")
    if args.data:
        source["root"] = os.path.abspath(args.data)
    if args.out:
        check_writable(args.out, "--out")

    train_set, test_set, data_classes = load_dataset(source, layout)
    if test_set is None:
        fail(f"the data in {source['root']} has no held-out split to compare samples with (an image folder needs "
             f"DIR/train/<class>/ and DIR/test/<class>/)")
    if class_names and list(class_names) != list(data_classes):
        fail(f"the checkpoint's classes ({', '.join(class_names)}) are not the data's ({', '.join(data_classes)}); "
             f"point --data at the data it was trained on")
    conditional = bool(class_names)
    groups = len(class_names) if conditional else 1  # the samples come in groups of n
    most = len(test_set) // (2 * groups)
    n = args.n if args.n is not None else min(50, most)
    if n > most or n < 1:
        fail(f"{n} samples per group need {2 * n * groups} held-out examples ({n * groups} to compare with, "
             f"{n * groups} more for the real-vs-real floor), and the held-out split has {len(test_set)}: lower --n")
    classifier, classifier_accuracy, classifier_path = get_classifier(source, train_set, test_set, layout, data_classes,
                                                                      args, device)

    torch.manual_seed(args.seed)
    real, real_labels = all_examples(test_set)
    # Which real examples the samples meet, and which make the floor, moves the distance about as much as a better
    # model would, so the distances are also averaged over REFERENCE_SPLITS random splits of the held-out data. The
    # first split is drawn from the seeded global generator before sampling draws from it, as in earlier versions,
    # so a seed gives the same samples, and the same first-split numbers, as it did there.
    generator = torch.Generator().manual_seed(args.seed)
    orders = [torch.randperm(len(real))] + [torch.randperm(len(real), generator=generator)
                                            for _ in range(REFERENCE_SPLITS - 1)]
    splits = [(order[: n * groups], order[n * groups : 2 * n * groups]) for order in orders]
    labels = torch.arange(groups).repeat_interleave(n) if conditional else None
    batches, drawn, seconds = [], [], dict(total=0.0, head=0.0)
    log(f"sampling {n * groups} {'images' if layout['kind'] == 'image' else 'clips'} ...")
    for start in range(0, n * groups, args.batch_size):
        count = min(args.batch_size, n * groups - start)
        batch_labels = labels[start : start + count].to(device) if conditional else None
        tokens, spent = timed_sample(model, count, batch_labels, **options)
        batches.append(from_tokens(tokens.float().cpu(), layout, args.griffin_lim_iters))
        drawn.append(tokens.float().cpu())
        seconds = {k: seconds[k] + spent[k] for k in seconds}
    generated = torch.cat(batches)
    samples = dequantise(quantise(generated, layout), layout)  # what the PNG or WAV files hold
    result = scores(classifier, samples, labels, real, splits, device, real_labels)
    if layout.get("tokens") == "mel":  # what a perfect model of these tokens would score, heard through the vocoder
        result["griffin_lim_iters"] = args.griffin_lim_iters
        result.update(through_the_vocoder(classifier, real, real_labels, splits[0], layout, args, device))
        result.update(timing(torch.cat(drawn), real[splits[0][0]], layout))
    if args.bpd_examples:
        bpd = lambda order: held_out_bpd(model, test_set, layout, config.num_classes,  # noqa: E731
                                         args.bpd_examples, args.batch_size, device, order)
        result["bpd"], result["bpd_stderr"] = bpd("raster")
        if config.order == "random":  # the any-order model's bound: the average over random orders
            result["bpd_random_orders"], result["bpd_random_orders_stderr"] = bpd("random")
    result.update(checkpoint=os.path.abspath(args.ckpt), step=ckpt.get("step"), dataset=source["name"],
                  tokens=layout.get("tokens", layout["kind"]),
                  data=source["root"], samples=n * groups, per_class=n if conditional else None,
                  classifier=classifier_path, classifier_accuracy=classifier_accuracy, seed=args.seed,
                  sampling_s=seconds["total"], head_share=seconds["head"] / seconds["total"], **options)
    print(report(result))
    if args.json:
        with atomic_output(args.json) as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=1)
    if args.out:
        npz = os.path.join(args.out, "samples.npz")
        save_samples_npz(npz, generated, layout, labels, class_names, torch.cat(drawn))
        if layout["kind"] == "image":
            save_image_grid(generated, os.path.join(args.out, "samples.png"), nrow=min(n, 10) if conditional else 10)


def report(r):
    """One table of the numbers, with what they are measured on."""
    accuracy = lambda a: "n/a" if a is None else f"{100 * a:.1f}%"  # noqa: E731
    ratio = r["fd"] / r["fd_floor"] if r["fd_floor"] > 0 else float("inf")
    mean_ratio = r["fd_mean"] / r["fd_floor_mean"] if r["fd_floor_mean"] > 0 else float("inf")
    per = f"{r['per_class']} per class" if r["per_class"] else "unconditional"
    bpd = f"{r['bpd']:.3f} ± {r['bpd_stderr']:.3f}" if "bpd" in r else "not measured"
    if "bpd_random_orders" in r:
        bpd += (f" in raster order, {r['bpd_random_orders']:.3f} ± {r['bpd_random_orders_stderr']:.3f} averaged over "
                f"random orders")
    rows = [
        ("accuracy: the classifier names the class asked for", accuracy(r["accuracy"]), accuracy(r["real_accuracy"])),
        (f"Fréchet distance to {r['samples']} held-out real examples", f"{r['fd']:.2f}",
         f"{r['fd_floor']:.2f} (floor)"),
        ("Fréchet distance / floor", f"{ratio:.2f}x", "1x"),
        (f"mean Fréchet distance over {r['splits']} random choices of them", f"{r['fd_mean']:.2f}",
         f"{r['fd_floor_mean']:.2f} ± {r['fd_floor_sd']:.2f}"),
        ("mean Fréchet distance / mean floor", f"{mean_ratio:.2f}x", "1x"),
        ("classifier score (IS-like, at most the classes)", f"{r['score']:.2f}", f"{r['score_real']:.2f}"),
    ]
    if "start_s" in r:  # mel tokens: when the clips sound
        rows += [("where the sound starts (median, seconds)", f"{r['start_s']:.2f}", f"{r['real_start_s']:.2f}"),
                 ("where it ends (median, seconds)", f"{r['end_s']:.2f}", f"{r['real_end_s']:.2f}"),
                 ("clips still sounding in the last 0.05 s", accuracy(r["sounding_at_end"]),
                  accuracy(r["real_sounding_at_end"]))]
    vocoded = "vocoded_accuracy" in r  # a mel-token model: the real clips through the vocoder, a third column
    if vocoded:
        over = lambda fd, floor: f"{fd / floor:.2f}x" if floor > 0 else "inf"  # noqa: E731
        column = [accuracy(r["vocoded_accuracy"]), f"{r['vocoded_fd']:.2f}", over(r["vocoded_fd"], r["fd_floor"]),
                  "n/a (one draw)"]
        rows = [row + (extra,) for row, extra in zip(rows, column + ["n/a"] * (len(rows) - len(column)))]
    width = max(len(row[0]) for row in rows)
    lines = [
        f"evaluate: {r['checkpoint']} (step {r['step']}), {r['dataset']} in {r['data']}",
        f"classifier: {r['classifier']}, held-out accuracy {100 * r['classifier_accuracy']:.1f}%",
        f"samples: {r['samples']} ({per}), {r['sampler']} sampler, {r['steps']} steps, "
        f"temperature {r['temperature']:g}, "
        f"{guidance_text(r)}, seed {r['seed']}: {r['sampling_s']:.1f} s, "
        f"diffusion head {100 * r['head_share']:.0f}%",
        "",
        f"| {'metric':<{width}} | samples | real (held-out) |" + (" real through the vocoder |" if vocoded else ""),
        f"|{'-' * (width + 2)}|--------:|----------------:|" + ("-------------------------:|" if vocoded else ""),
    ]
    lines += ["".join([f"| {row[0]:<{width}} | {row[1]:>7} | {row[2]:>15} |"] + [f" {c:>24} |" for c in row[3:]])
              for row in rows]
    unit = ("bits per 8-bit mel value (not comparable with a waveform model's bits)" if r.get("tokens") == "mel"
            else "bits/dim")
    lines += ["", f"held-out {unit} (upper bound): {bpd}"]
    return "\n".join(lines)


if __name__ == "__main__":
    run(main)
