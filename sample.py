"""
Sample from a trained ADR checkpoint. The checkpoint says whether it holds an image or an audio model:
images come out as one PNG grid (a row per class), audio as one 16-bit WAV per sample plus a PNG of
their spectrograms (each word's followed by a real held-out clip of it, where the checkpoint's data is on
disk). Written to --out (default: samples/ next to the checkpoint).

    python sample.py --ckpt out/image/ckpt.pt                              # 10 images of every class
    python sample.py --ckpt out/image/ckpt.pt --class cat --n 16 --cfg 1   # 16 cats, no guidance
    python sample.py --ckpt out/image/ckpt.pt --prompt cat.jpg --keep 0.5  # complete the bottom half
    python sample.py --ckpt out/audio/ckpt.pt --prompt yes.wav --keep 0.3  # continue after 0.3 s
    python sample.py --ckpt out/any/ckpt.pt --prompt 7.png --mask center   # fill in the middle (--order random)
    python sample.py --ckpt out/any/ckpt.pt --tokens-per-step 4            # 4 tokens per backbone step
    python sample.py --ckpt out/image/ckpt.pt --mode parallel              # no recurrent state

Generation is one token at a time: the RetNet gives z_i, the diffusion head runs --steps reverse steps
to draw token i. In the default recurrent mode the RetNet carries an O(1) state from token to token (a
prompt is first read in chunkwise form); --mode parallel recomputes the whole prefix for every token,
as a model without a recurrent form must. Sampling runs in float32, and both modes give the same
samples for the same --seed. The run's time is printed, with the shares of the RetNet (backbone) and
of the diffusion head (its whole reverse chain per token).
"""

import math
import os

import torch
from PIL import Image

from cli import DEVICE_HELP, CheckpointError, OneLineErrors, add_sampling_flags, default_device, fail
from cli import check_writable, compile_head, guidance_text, load_checkpoint, number, pick_device, run, sampling_options
from cli import timed_sample, vocoder_iterations
from data import held_out_clip_per_word
from media import from_tokens, layout_shape, load_image, prepare_clip, read_wav, save_image_grid, save_spectrograms
from media import MASKS, region_to_generate, samples_per_token, save_samples_npz, to_tokens, write_wav


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
    p.add_argument("--keep", type=number(float, 0, low_ok=False), default=None, help="with --prompt: the fraction of "
                   "the image's tokens (top rows first), or the seconds of audio, to keep (default: 0.5)")
    p.add_argument("--mask", default=None, help="with --prompt: the region to generate, keeping the rest: "
                   "top, bottom, left, right (halves; for audio top/left is the start), center, random[:FRACTION] "
                   "(default 0.5), or an image file, white where to generate (needs an --order random model, "
                   "but for bottom)")
    p.add_argument("--mode", choices=["recurrent", "parallel"], default="recurrent",
                   help="carry the recurrent state (default), or recompute the whole prefix at every token")
    p.add_argument("--device", default=default_device(),
                   help=f"{DEVICE_HELP} (default: cuda when there is a GPU, else cpu)")
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
    """(tokens of the image (1, L, D), number of tokens to keep, top rows first, or None without --keep)."""
    try:
        image = load_image(path, layout["height"], layout["width"], layout["channels"])
    except ValueError as e:
        fail(f"--prompt: {e}; this is an image model: give an image file")
    if keep is None:
        return to_tokens(image[None], layout), None
    seq_len = layout_shape(layout)[0]
    if not 0 < keep < 1:
        fail(f"--keep {keep:g}: for an image it is the fraction of tokens to keep, between 0 and 1")
    kept = round(keep * seq_len)
    if not 0 < kept < seq_len:
        fail(f"--keep {keep:g} keeps {kept} of {seq_len} tokens; keep at least one and leave at least one to generate")
    return to_tokens(image[None], layout), kept


def audio_prompt(path, layout, keep):
    """(tokens of the clip (1, L, D), number of tokens to keep: whole chunks within --keep seconds, or None)."""
    try:
        waveform, rate = read_wav(path)
    except (ValueError, OSError) as e:
        fail(f"--prompt: {e}; this is an audio model: give a WAV file")
    rate_out, length = layout["sample_rate"], layout["length"]
    clip = to_tokens(prepare_clip(waveform, rate, rate_out, length)[None], layout)
    if keep is None:
        return clip, None
    seconds = waveform.shape[1] / rate
    if keep > seconds:
        fail(f"--prompt {path} lasts {seconds:.3f} s, shorter than --keep {keep:g} s")
    kept = int(keep * rate_out) // samples_per_token(layout)
    seq_len = layout_shape(layout)[0]
    if not 0 < kept < seq_len:
        chunk_s = samples_per_token(layout) / rate_out
        fail(f"--keep {keep:g} s keeps {kept} chunks of {chunk_s:g} s; keep at least one and less than the "
             f"{length / rate_out:g} s clip")
    return clip, kept


def known_tokens(args, layout, config):
    """(tokens of the prompt (1, L, D) or None, (L,) bool: the tokens kept from it, tokens kept as a prefix or
    None), from --prompt with --keep (a prefix) or --mask (any region to generate)."""
    if args.prompt is None:
        if args.mask is not None or args.keep is not None:
            flag = "--mask" if args.mask is not None else "--keep"
            fail(f"{flag} needs --prompt FILE: the image or clip to complete")
        return None, None, None
    if args.mask is not None and args.keep is not None:
        fail("--keep and --mask both say what to keep from the prompt: give one of them")
    if not os.path.isfile(args.prompt):
        fail(f"--prompt {args.prompt}: no such file")
    keep = None if args.mask is not None else (0.5 if args.keep is None else args.keep)
    full, kept = (image_prompt if layout["kind"] == "image" else audio_prompt)(args.prompt, layout, keep)
    seq_len = layout_shape(layout)[0]
    if kept is not None:
        return full, torch.arange(seq_len) < kept, kept
    name = args.mask.partition(":")[0]
    if name not in MASKS and layout["kind"] == "audio":
        fail(f"--mask {args.mask}: an audio model takes {', '.join(MASKS[:-1])} or random[:FRACTION], not a mask image")
    if name not in MASKS and not os.path.isfile(args.mask):
        fail(f"--mask {args.mask}: use {', '.join(MASKS[:-1])}, random[:FRACTION] or an image file of the mask")
    check_mask(args.mask, layout)
    try:
        generate = region_to_generate(layout, args.mask, args.seed)
    except ValueError as e:
        fail(f"--mask {args.mask}: {e}")
    if generate.all() or not generate.any():
        fail(f"--mask {args.mask} leaves {'nothing' if generate.all() else 'everything'} of the prompt to keep or "
             f"generate: it must cover some tokens, not all")
    prefix = (generate == (torch.arange(seq_len) >= int((~generate).sum()))).all()
    if config.order == "raster" and not prefix:
        fail(f"--mask {args.mask}: this model was trained in raster order and can only continue a prompt's first "
             f"tokens (--mask bottom, --keep); train with --order random to fill in other regions")
    return full, ~generate, None


def check_mask(spec, layout):
    """--mask random:FRACTION takes a fraction between 0 and 1; a mask image is as large as the model's images
    (resizing it would move the region between tokens unseen)."""
    name, colon, fraction = spec.partition(":")
    if name == "random" and colon:
        try:
            value = float(fraction)
        except ValueError:
            value = math.nan
        if not 0 < value <= 1:
            fail(f"--mask {spec}: the fraction of the tokens to generate is above 0 and at most 1, e.g. random:0.25")
    elif name not in MASKS:
        try:
            with Image.open(spec) as image:
                size = image.size
        except Exception:
            fail(f"--mask {spec}: cannot read it as an image")
        if size != (layout["width"], layout["height"]):
            fail(f"--mask {spec} is {size[0]}x{size[1]} pixels and the model's images are {layout['width']}x"
                 f"{layout['height']}: draw the mask at that size")
    elif colon:
        fail(f"--mask {spec}: only random takes a fraction (random:FRACTION)")


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device, args.compile)
    try:
        model, ckpt = load_checkpoint(args.ckpt, device, use_ema=args.ema)
    except CheckpointError as e:
        fail(str(e))
    config, layout = model.config, ckpt["layout"]
    kind, args.griffin_lim_iters = layout["kind"], vocoder_iterations(args, layout)
    model = compile_head(model) if args.compile else model
    n = args.n or (10 if kind == "image" else 1)
    options = sampling_options(args, config, ckpt["sampling"])
    classes, row_names = pick_classes(args, config, ckpt["class_names"])
    full_prompt, keep, prefix = known_tokens(args, layout, config)
    count = n * len(classes)
    known = None if full_prompt is None else dict(known=full_prompt.repeat(count, 1, 1), mask=keep)
    labels = None if classes[0] is None else torch.tensor(classes, device=device).repeat_interleave(n)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "samples")
    check_writable(out, "--out")

    torch.manual_seed(args.seed)
    tokens, seconds = timed_sample(model, count, labels, mode=args.mode, **options, **(known or {}))
    total, kept = seconds["total"], 0 if keep is None else int(keep.sum())
    what = f"{count} {'image' if kind == 'image' else 'clip'}{'s' if count > 1 else ''} of {config.seq_len} tokens"
    what += f" ({kept} from the prompt)" if kept else ""
    print(f"sampled {what} in {total:.2f} s ({args.mode} mode, {options['sampler']}, {options['steps']} steps, "
          f"{guidance_text(options)}): "
          f"{total / count:.3f} s/sample, {count * (config.seq_len - kept) / total:.0f} tokens/s; "
          f"backbone {100 * seconds['backbone'] / total:.0f}%, diffusion head {100 * seconds['head'] / total:.0f}%")

    samples = from_tokens(tokens.float().cpu(), layout, args.griffin_lim_iters)
    all_names = ckpt["class_names"] or [str(c) for c in range(config.num_classes)]  # what the labels index
    save_samples_npz(os.path.join(out, "samples.npz"), samples, layout, labels, all_names, tokens.float().cpu())
    blank = -1.0 if layout.get("tokens") == "mel" else 0.0  # grey, or silence, where generated
    masked = None if full_prompt is None else torch.where(keep[None, :, None], full_prompt, blank)
    if kind == "image":
        save_images(samples, masked, layout, n, len(classes), out)
    else:
        source, conditional = ckpt.get("source") or {}, classes[0] is not None
        real = held_out_clip_per_word(source, row_names, layout["sample_rate"], layout["length"]) if conditional else []
        if conditional and not real:
            print(f"no real clips beside the samples: the data ({source.get('root', 'not recorded')}) is not here")
        save_audio(samples, masked, prefix, layout, n, row_names, real or [None] * len(row_names), out,
                   args.griffin_lim_iters)


def save_images(images, masked, layout, n, rows, out):
    """A grid with a row per class; with a prompt, each row starts with it, the part to generate grey."""
    if masked is None:
        path = os.path.join(out, "samples.png")
        save_image_grid(images, path, nrow=n if rows > 1 else min(n, 10))
    else:
        shown = from_tokens(masked, layout)
        cells = torch.cat([torch.cat([shown, row]) for row in images.split(n)])
        path = os.path.join(out, "completions.png")
        save_image_grid(cells, path, nrow=n + 1)
    print(f"wrote {path}")


def save_audio(waves, masked, prefix, layout, n, row_names, real, out, griffin_lim_iters):
    """One WAV per sample, named after its class, and their spectrograms, after the prompt's (prompt.wav holds
    what is kept of it: its first --keep seconds, or the whole clip with the --mask region silent), each class's
    followed by its real held-out clip where `real` (a waveform or None per row name) has one."""
    rate = layout["sample_rate"]
    names = [f"{name}_{k}" for name in row_names for k in range(n)]
    panels, titles = [], []
    if masked is not None:
        kept = from_tokens(masked, layout, griffin_lim_iters)[0]
        if prefix is not None:
            kept = kept[: prefix * samples_per_token(layout)]
        write_wav(os.path.join(out, "prompt.wav"), kept, rate)
        panels.append(kept), titles.append("prompt (what is kept)")
    for name, waveform in zip(names, waves):
        write_wav(os.path.join(out, f"{name}.wav"), waveform, rate)
    for row, (row_name, clip) in enumerate(zip(row_names, real)):
        panels += list(waves[row * n : (row + 1) * n])
        titles += names[row * n : (row + 1) * n]
        if clip is not None:
            panels.append(clip), titles.append(f"{row_name}: real")
    save_spectrograms(panels, rate, os.path.join(out, "spectrograms.png"), titles)
    prompt_note = " and prompt.wav" if masked is not None else ""
    print(f"wrote {len(names)} WAV files{prompt_note} and spectrograms.png to {out}")


if __name__ == "__main__":
    run(main)
