"""
Sample from a trained ADR checkpoint. The checkpoint says whether it holds an image or an audio model:
images come out as one PNG grid (a row per class), audio as one 16-bit WAV per sample plus a PNG of
their spectrograms. Written to --out (default: samples/ next to the checkpoint).

    python sample.py --ckpt out/image/ckpt.pt                              # 10 images of every class
    python sample.py --ckpt out/image/ckpt.pt --class cat --n 16 --cfg 1   # 16 cats, no guidance
    python sample.py --ckpt out/image/ckpt.pt --prompt cat.jpg --keep 0.5  # complete the bottom half
    python sample.py --ckpt out/audio/ckpt.pt --prompt yes.wav --keep 0.3  # continue after 0.3 s
    python sample.py --ckpt out/image/ckpt.pt --mode parallel              # no recurrent state

Generation is one token at a time: the RetNet gives z_i, the diffusion head runs --steps reverse steps
to draw token i. In the default recurrent mode the RetNet carries an O(1) state from token to token (a
prompt is first read in chunkwise form); --mode parallel recomputes the whole prefix for every token,
as a model without a recurrent form must. Sampling runs in float32, and both modes give the same
samples for the same --seed. The run's time is printed, with the shares of the RetNet (backbone) and
of the diffusion head (its whole reverse chain per token).
"""

import os

import torch

from media import from_tokens, layout_shape, load_image, prepare_clip, read_wav, save_image_grid, save_spectrograms
from media import save_samples_npz, to_tokens, write_wav
from trainer import CheckpointError, OneLineErrors, add_sampling_flags, default_device, fail, load_checkpoint, number
from trainer import pick_device, sampling_options, timed_sample


def parse_args(argv=None):
    p = OneLineErrors(description="Sample images or audio from an ADR checkpoint.")
    p.add_argument("--ckpt", required=True, help="ckpt.pt written by train_image.py or train_audio.py")
    p.add_argument("--out", default=None, help="output folder (default: samples/ next to the checkpoint)")
    p.add_argument("--n", type=number(int, 1), default=None,
                   help="samples per class, or in all for an unconditional model (default: 10 for images, 1 for audio)")
    p.add_argument("--class", dest="class_name", default=None, help="sample this class only (default: every class)")
    add_sampling_flags(p)
    p.add_argument("--prompt", default=None, help="an image or a WAV file to continue (images are centre-cropped and "
                   "resized to the model's size, clips mixed to mono and resampled)")
    p.add_argument("--keep", type=number(float, 0, low_ok=False), default=0.5, help="with --prompt: the fraction of "
                   "the image's tokens (top rows first), or the seconds of audio, to keep (default: 0.5)")
    p.add_argument("--mode", choices=["recurrent", "parallel"], default="recurrent",
                   help="carry the recurrent state (default), or recompute the whole prefix at every token")
    p.add_argument("--device", default=default_device(), help="cuda, cuda:N or cpu (default: cuda when there is a GPU)")
    return p.parse_args(argv)


def pick_classes(args, config, class_names):
    """The class index of each output row (None for an unconditional model) and the rows' names."""
    if config.num_classes == 0:
        if args.class_name is not None:
            fail(f"--class {args.class_name}: this checkpoint is unconditional (trained without classes); "
                 f"leave --class out")
        return [None], ["sample"]
    names = class_names or [str(c) for c in range(config.num_classes)]
    if args.class_name is None:
        return list(range(config.num_classes)), names
    if args.class_name not in names:
        fail(f"unknown class {args.class_name!r}: this checkpoint knows {', '.join(names)}")
    return [names.index(args.class_name)], [args.class_name]


def image_prompt(path, layout, keep):
    """(tokens of the image (1, L, D), number of tokens to keep)."""
    try:
        image = load_image(path, layout["height"], layout["width"], layout["channels"])
    except ValueError as e:
        fail(f"--prompt: {e}; this is an image model: give an image file")
    seq_len = layout_shape(layout)[0]
    if not 0 < keep < 1:
        fail(f"--keep {keep:g}: for an image it is the fraction of tokens to keep, between 0 and 1")
    kept = round(keep * seq_len)
    if not 0 < kept < seq_len:
        fail(f"--keep {keep:g} keeps {kept} of {seq_len} tokens; keep at least one and leave at least one to generate")
    return to_tokens(image[None], layout), kept


def audio_prompt(path, layout, keep):
    """(tokens of the clip (1, L, D), number of tokens to keep: whole chunks within --keep seconds)."""
    try:
        waveform, rate = read_wav(path)
    except ValueError as e:
        fail(f"--prompt: {e}; this is an audio model: give a 16-bit PCM WAV file")
    rate_out, length = layout["sample_rate"], layout["length"]
    seconds = waveform.shape[1] / rate
    if keep > seconds:
        fail(f"--prompt {path} lasts {seconds:.3f} s, shorter than --keep {keep:g} s")
    kept = int(keep * rate_out) // layout["chunk"]
    seq_len = layout_shape(layout)[0]
    if not 0 < kept < seq_len:
        chunk_s = layout["chunk"] / rate_out
        fail(f"--keep {keep:g} s keeps {kept} chunks of {chunk_s:g} s; keep at least one and less than the "
             f"{length / rate_out:g} s clip")
    clip = prepare_clip(waveform, rate, rate_out, length)
    return to_tokens(clip[None], layout), kept


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    try:
        model, ckpt = load_checkpoint(args.ckpt, device, use_ema=args.ema)
    except CheckpointError as e:
        fail(str(e))
    config, layout = model.config, ckpt["layout"]
    kind = layout["kind"]
    n = args.n or (10 if kind == "image" else 1)
    options = sampling_options(args, config)
    classes, row_names = pick_classes(args, config, ckpt["class_names"])
    full_prompt, prompt, kept = None, None, 0
    if args.prompt is not None:
        if not os.path.isfile(args.prompt):
            fail(f"--prompt {args.prompt}: no such file")
        full_prompt, kept = (image_prompt if kind == "image" else audio_prompt)(args.prompt, layout, args.keep)
        prompt = full_prompt[:, :kept].repeat(n * len(classes), 1, 1)
    labels = None if classes[0] is None else torch.tensor(classes, device=device).repeat_interleave(n)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "samples")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        fail(f"--out {out}: cannot create the folder ({e.strerror})")

    torch.manual_seed(args.seed)
    tokens, seconds = timed_sample(model, n * len(classes), labels, prompt=prompt, mode=args.mode, **options)
    total, count = seconds["total"], tokens.shape[0]
    what = f"{count} {'image' if kind == 'image' else 'clip'}{'s' if count > 1 else ''} of {config.seq_len} tokens"
    what += f" ({kept} from the prompt)" if kept else ""
    print(f"sampled {what} in {total:.2f} s ({args.mode} mode, cfg {options['cfg_scale']:g}): "
          f"{total / count:.3f} s/sample, {count * (config.seq_len - kept) / total:.0f} tokens/s; "
          f"backbone {100 * seconds['backbone'] / total:.0f}%, diffusion head {100 * seconds['head'] / total:.0f}%")

    samples = from_tokens(tokens.float().cpu(), layout)
    all_names = ckpt["class_names"] or [str(c) for c in range(config.num_classes)]  # what the labels index
    save_samples_npz(os.path.join(out, "samples.npz"), samples, layout, labels, all_names)
    if kind == "image":
        save_images(samples, full_prompt, kept, layout, n, len(classes), out)
    else:
        save_audio(samples, full_prompt, kept, layout, n, row_names, out)


def save_images(images, full_prompt, kept, layout, n, rows, out):
    """A grid with a row per class; with a prompt, each row starts with the prompt, its missing part grey."""
    if full_prompt is None:
        path = os.path.join(out, "samples.png")
        save_image_grid(images, path, nrow=n if rows > 1 else min(n, 10))
    else:
        shown = full_prompt.clone()
        shown[:, kept:] = 0  # 0 is mid-grey in [-1, 1]
        shown = from_tokens(shown, layout)
        cells = torch.cat([torch.cat([shown, row]) for row in images.split(n)])
        path = os.path.join(out, "completions.png")
        save_image_grid(cells, path, nrow=n + 1)
    print(f"wrote {path}")


def save_audio(waves, full_prompt, kept, layout, n, row_names, out):
    """One WAV per sample, named after its class, and their spectrograms (after the original prompt clip)."""
    rate = layout["sample_rate"]
    names = [f"{name}_{k}" for name in row_names for k in range(n)]
    panels, titles = [], []
    if full_prompt is not None:
        original = from_tokens(full_prompt, layout)[0]
        write_wav(os.path.join(out, "prompt.wav"), original[: kept * layout["chunk"]], rate)
        panels.append(original), titles.append(f"prompt (first {kept * layout['chunk'] / rate:.2f} s kept)")
    for name, waveform in zip(names, waves):
        write_wav(os.path.join(out, f"{name}.wav"), waveform, rate)
    panels += list(waves)
    titles += names
    save_spectrograms(panels, rate, os.path.join(out, "spectrograms.png"), titles)
    prompt_note = " and prompt.wav" if full_prompt is not None else ""
    print(f"wrote {len(names)} WAV files{prompt_note} and spectrograms.png to {out}")


if __name__ == "__main__":
    main()
