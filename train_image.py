"""
Train ADR on CIFAR-10, MNIST, Fashion-MNIST, or any folder of images.

    python train_image.py                                   # CIFAR-10, class-conditional, base model, one GPU
    python train_image.py --dataset mnist --size tiny       # digits on a CPU
    python train_image.py --image-folder DIR                # DIR/<class>/*.png|jpg, or DIR/train/<class>/...
    torchrun --nproc_per_node=4 train_image.py              # DistributedDataParallel, one process per GPU

Images become tokens of p x p patches in raster order: CIFAR-10 and folders at 32x32 RGB (64 tokens of 48
values with 4x4 patches), MNIST and Fashion-MNIST at their native 28x28 grayscale (49 tokens of 16 values).
Writes to --out (default out/image): ckpt.pt, samples_<step>.png (one row per class), log.csv and loss.png.
"""

import os

import torch

from cli import fail, log, number, run
from data import IMAGE_DATASETS, default_image_layout, load_dataset
from media import from_tokens, save_image_grid
from trainer import Task, check_run, common_parser, rank_zero_first, sample_file_options, setup, train


def sample_grid_writer(args, layout, class_names, per_row=10):
    """save_samples for a Task: a grid with one row of samples per class (10 x 10 when unconditional)."""

    def save_samples(model, out_dir, step):
        device = model.pos_emb.device
        labels = torch.arange(len(class_names), device=device).repeat_interleave(per_row) if class_names else None
        n = len(labels) if class_names else per_row * per_row
        tokens = model.sample(n, labels, **sample_file_options(args, layout, model.config))
        path = os.path.join(out_dir, f"samples_{step:06d}.png")
        save_image_grid(from_tokens(tokens.float(), layout), path, nrow=per_row)
        log(f"samples: {path}" + (f" (rows: {', '.join(class_names)})" if class_names else ""))

    return save_samples


def main(argv=None):
    parser = common_parser("Train ADR on CIFAR-10, MNIST or Fashion-MNIST (downloaded to --data), or on a folder "
                           "of images.", default_out=os.path.join("out", "image"))
    parser.add_argument("--dataset", choices=IMAGE_DATASETS, default="cifar10", help="the dataset to download")
    parser.add_argument("--patch", type=number(int, 1), default=4, help="tokens are patch x patch pixels (it must "
                        "divide the image size: 28 for MNIST and Fashion-MNIST, 32 for the others)")
    parser.add_argument("--image-folder", metavar="DIR", help="train on DIR/<class>/*.png|jpg (or "
                        "DIR/train/<class>/... with an optional DIR/test/), read as 32x32 RGB, instead of --dataset")
    args = parser.parse_args(argv)
    setup(args)
    if args.image_folder:
        source = dict(name="image-folder", root=os.path.abspath(args.image_folder))
    else:
        source = dict(name=args.dataset, root=os.path.abspath(args.data))
    layout = default_image_layout(source["name"], args.patch)
    if layout["height"] % args.patch:
        fail(f"--patch {args.patch} does not divide the {layout['height']}x{layout['width']} images; use a divisor")
    check_run(args, source, layout)
    train_set, test_set, class_names = rank_zero_first(args, lambda: load_dataset(source, layout))
    test = f", {len(test_set)} test" if test_set is not None else ""
    log(f"data: {source['name']} in {source['root']}: {len(train_set)} train{test} images, {len(class_names)} classes")
    if args.unconditional:
        class_names = []
    save_samples = sample_grid_writer(args, layout, class_names)
    train(args, Task(train_set, test_set, layout, class_names, save_samples, source))


if __name__ == "__main__":
    run(main)
