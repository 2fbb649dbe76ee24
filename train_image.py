"""
Train ADR on CIFAR-10, or on any folder of images.

    python train_image.py                              # CIFAR-10, class-conditional, base model, one GPU
    python train_image.py --size tiny                  # a small model that trains on a CPU
    python train_image.py --image-folder DIR           # DIR/<class>/*.png|jpg, or DIR/train/<class>/... (+ DIR/test/)
    torchrun --nproc_per_node=4 train_image.py         # DistributedDataParallel, one process per GPU

Writes to --out (default out/image): ckpt.pt, samples_<step>.png (one row per class), log.csv and loss.png.
"""

import os

import torch

from data import cifar10_data, image_folder_data
from media import from_tokens, image_layout, save_image_grid
from trainer import Task, check_out, common_parser, log, rank_zero_first, setup, train


def sample_grid_writer(args, layout, class_names, per_row=10):
    """save_samples for a Task: a grid with one row of samples per class (10 x 10 when unconditional)."""

    def save_samples(model, out_dir, step):
        device = model.pos_emb.device
        labels = torch.arange(len(class_names), device=device).repeat_interleave(per_row) if class_names else None
        n = len(labels) if class_names else per_row * per_row
        tokens = model.sample(n, labels, steps=args.sample_steps, cfg_scale=args.cfg_scale if class_names else 1.0)
        path = os.path.join(out_dir, f"samples_{step:06d}.png")
        save_image_grid(from_tokens(tokens.float(), layout), path, nrow=per_row)
        log(f"samples: {path}" + (f" (rows: {', '.join(class_names)})" if class_names else ""))

    return save_samples


def main(argv=None):
    parser = common_parser("Train ADR on CIFAR-10 (downloaded to --data) or on a folder of images.",
                           default_out=os.path.join("out", "image"))
    parser.add_argument("--image-folder", metavar="DIR", help="train on DIR/<class>/*.png|jpg (or "
                        "DIR/train/<class>/... with an optional DIR/test/) instead of CIFAR-10")
    args = parser.parse_args(argv)
    setup(args)
    check_out(args)
    layout = image_layout()
    if args.image_folder:
        train_set, test_set, class_names = rank_zero_first(args, lambda: image_folder_data(args.image_folder, layout))
        source = args.image_folder
    else:
        train_set, test_set, class_names = rank_zero_first(args, lambda: cifar10_data(args.data))
        source = f"CIFAR-10 in {args.data}"
    test = f", {len(test_set)} test" if test_set is not None else ""
    log(f"data: {source}: {len(train_set)} train{test} images, {len(class_names)} classes")
    if args.unconditional:
        class_names = []
    train(args, Task(train_set, test_set, layout, class_names, sample_grid_writer(args, layout, class_names)))


if __name__ == "__main__":
    main()
