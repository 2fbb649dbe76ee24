"""
Train ADR on spoken words: Google Speech Commands v0.02 (by default the ten digits zero .. nine, the
SC09 subset), or any folder of WAV files in word sub-folders (--audio-folder DIR/<word>/*.wav).

    python train_audio.py --size tiny --steps 2000                  # SC09 on a CPU, downloaded to ./data
    python train_audio.py --audio-folder my_words --words yes,no    # your own recordings
    torchrun --nproc_per_node=4 train_audio.py                      # one process per GPU

Each example is 1 s of 16 kHz audio (--seconds). By default (--tokens mel) a token is one frame of an 80-band
log-mel spectrogram (FFT 1024, hop 256: 16 ms apart, 63 tokens a second), as in the continuous autoregressive
speech models MELLE and FELLE: the head draws a frame's spectral envelope and a vocoder (torchaudio's
InverseMelScale and Griffin-Lim, media.vocode) finds a phase for it, which keeps words recognisable (RESULTS.md,
"Speech"). --tokens wave keeps the earlier tokens: 160-sample (10 ms) chunks of the waveform through continuous
mu-law companding (mu = 255, media.mu_law), 100 tokens of 160 values, turned straight back into a waveform; there
the small head must place every sample of a chunk in phase with the last one, and its words are not recognised.

Speech Commands is found (and downloaded if missing) with torchaudio.datasets.SPEECHCOMMANDS, which also
gives its official split: "training" trains, "testing" is the held-out set; the "validation" clips are
not used (v0.01 is used where only it is there). Recent torchaudio decodes audio through FFmpeg, so WAV files
are read here by media.read_wav instead: PCM of 8, 16, 24 or 32-bit integers or 32/64-bit floats, with plain
or extensible headers. A folder of WAVs is resampled to 16 kHz, mixed to mono, padded or trimmed to --seconds;
every 10th file of each word is held out for the test loss and bits/dim.

Writes to --out (default out/audio): ckpt.pt, log.csv, loss.png, and at every --sample-every steps one
WAV per word (samples/step_NNNNNN/<word>.wav) and spectrograms_NNNNNN.png, generated next to real clips.
"""

import os

import torch

from cli import fail, log, number, run
from data import CLIP_LENGTH, SAMPLE_RATE, load_dataset
from media import audio_layout, from_tokens, mel_layout, rms, save_spectrograms, write_wav
from trainer import Task, check_run, common_parser, rank_zero_first, sample_file_options, setup, train


def first_clip_per_class(dataset, num_classes):
    """One real waveform per class (the first one in the set), or None for a class it lacks."""
    found = []
    for c in range(num_classes):
        index = (dataset.labels == c).nonzero()
        found.append(dataset[index[0].item()][0] if len(index) else None)
    return found


def sample_writer(args, layout, words, real_set):
    """save_samples for a Task: one generated clip per word as a WAV, and a spectrogram figure with each
    generated clip next to a real clip of the same word (unconditional: numbered samples, same count)."""
    conditional = not args.unconditional
    names = words if conditional else [f"sample_{i}" for i in range(len(words))]
    real = first_clip_per_class(real_set, len(words))

    def save_samples(model, out_dir, step):
        device = next(model.parameters()).device
        labels = torch.arange(len(words), device=device) if conditional else None
        tokens = model.sample(len(names), labels, **sample_file_options(args, layout, model.config))
        waves = from_tokens(tokens.float(), layout).cpu()
        folder = os.path.join(out_dir, "samples", f"step_{step:06d}")
        os.makedirs(folder, exist_ok=True)
        for name, w in zip(names, waves):
            write_wav(os.path.join(folder, f"{name}.wav"), w, layout["sample_rate"])
        panels, titles = [], []
        for name, word, generated, clip in zip(names, words, waves, real):
            panels.append(generated), titles.append(f"{name}: generated")
            if clip is not None:
                panels.append(clip), titles.append(f"{word}: real")
        figure = os.path.join(out_dir, f"spectrograms_{step:06d}.png")
        save_spectrograms(panels, layout["sample_rate"], figure, titles, columns=6)
        generated_rms = ", ".join(f"{name} {rms(w):.3f}" for name, w in zip(names, waves))
        real_rms = sum(rms(c) for c in real if c is not None) / max(1, sum(c is not None for c in real))
        log(f"samples: {folder} (RMS {generated_rms}; real clips {real_rms:.3f}), {figure}")

    return save_samples


def main(argv=None):
    parser = common_parser("Train ADR on spoken words: Speech Commands (downloaded to --data) or a folder of WAVs.",
                           default_out=os.path.join("out", "audio"))
    parser.add_argument("--audio-folder", metavar="DIR", help="train on DIR/<word>/*.wav instead of Speech Commands "
                        "(sub-folders starting with _ are not words; WAVs of 8/16/24/32-bit PCM or float)")
    parser.add_argument("--words", help="comma-separated classes (default: zero..nine for Speech Commands, every "
                        "sub-folder for --audio-folder)")
    parser.add_argument("--tokens", choices=["mel", "wave"], default="mel", help="mel: a log-mel frame a token, "
                        "made audible by a Griffin-Lim vocoder; wave: 10 ms chunks of the mu-law waveform")
    parser.add_argument("--seconds", type=number(float, 0, low_ok=False, high=60), default=CLIP_LENGTH / SAMPLE_RATE,
                        help="clip length: clips are padded or trimmed to it")
    args = parser.parse_args(argv)
    setup(args)
    words = [w.strip() for w in args.words.split(",") if w.strip()] if args.words is not None else None
    if args.audio_folder is not None:
        source = dict(name="audio-folder", root=os.path.abspath(args.audio_folder), words=words)
    else:
        source = dict(name="speech-commands", root=os.path.abspath(args.data), words=words)
    length = round(args.seconds * SAMPLE_RATE)
    if length < SAMPLE_RATE // 10:  # the spectrograms (the mel tokens', the classifier's) need whole windows
        fail(f"--seconds {args.seconds:g}: clips must last at least 0.1 s")
    if args.tokens == "mel":
        layout = mel_layout(sample_rate=SAMPLE_RATE, length=length)
    elif length % 160:
        fail(f"--seconds {args.seconds:g}: --tokens wave cuts clips into 10 ms chunks; give a multiple of 0.01 s")
    else:
        layout = audio_layout(sample_rate=SAMPLE_RATE, length=length, chunk=160, mu=255.0)
    check_run(args, source, layout)
    train_set, test_set, words = rank_zero_first(args, lambda: load_dataset(source, layout))
    source["words"] = words  # the classes, in label order, as evaluate.py must read them again
    save_samples = sample_writer(args, layout, words, test_set if test_set is not None else train_set)
    train(args, Task(train_set, test_set, layout, [] if args.unconditional else words, save_samples, source))


if __name__ == "__main__":
    run(main)
