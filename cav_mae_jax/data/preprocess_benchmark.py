"""Timing of our preprocessing against the original's steps, behind tools/benchmark_preprocess.py.

Both sides process the same 10-s 360p clips on one pinned CPU core:
  ours:      `decode.decode_clip` (PyAV: audio to 16 kHz s16 first channel, the 10 frames,
             resize + crop), `fbank.clip_fbank` + `pad_or_trim`, 10 x `decode.encode_jpeg`.
  original:  `ffmpeg -i F -vn -ar 16000 x.wav`, `sox x.wav y.wav remix 1` (extract_audio.py),
             OpenCV seek + read + torchvision Resize/CenterCrop/ToTensor + save_image JPEG for
             10 frames (extract_video_frame.py), and one torchaudio kaldi.fbank of the WAV as the
             loader computes it (read with soundfile: torchaudio 2.9's load needs torchcodec).
`run_original` runs under another Python (cv2, torch, torchaudio, torchvision, soundfile; ffmpeg
and sox on PATH), so this module imports only the standard library at its top. Throughput is per
CPU-second (user + system time of the process and its children): what "per core" means, and
robust to other load on the machine.
"""

from __future__ import annotations

import fractions
import os
import resource
import shutil
import subprocess
import time

# pylint: disable=g-import-not-at-top,import-outside-toplevel


def cpu_seconds() -> float:
  """User + system CPU seconds of this process and its finished children."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# What `transcode_360p` writes by codec: (container, video encoder, its options, audio encoder,
# audio rate). VP9 or AV1 + Opus in WebM is what YouTube serves, and a clip cut with `-c copy`
# keeps it.
_TRANSCODES = {
    'h264': ('mp4', 'libx264', {'preset': 'medium', 'crf': '23'}, 'aac', 44100),
    'vp9': ('webm', 'libvpx-vp9', {'crf': '32', 'b': '0', 'deadline': 'good', 'cpu-used': '4'},
            'libopus', 48000),
    'av1': ('webm', 'libsvtav1', {'crf': '35', 'preset': '8'}, 'libopus', 48000),
}
CODECS = tuple(_TRANSCODES)
# The extensions of the clips `prepare_clips` writes (the synthetic ones are MP4).
CLIP_EXTENSIONS = tuple(sorted({'.' + container for container, *_ in _TRANSCODES.values()}))


def clip_extension(codec: str) -> str:
  """The file extension of `transcode_360p`'s clips of `codec`."""
  return '.' + _TRANSCODES[codec][0]


def transcode_360p(source: str, destination: str, seconds: float = 10.0,
                   gop: int | None = None, codec: str = 'h264') -> None:
  """Re-encodes the first `seconds` of a video at 640x360: H.264 + AAC stereo 44.1 kHz (MP4),
  or with `codec='vp9'` / `'av1'` VP9 (libvpx) / AV1 (SVT-AV1) + Opus stereo 48 kHz (WebM).

  `gop`: a keyframe (H.264: an IDR picture) every `gop` frames and none at scene cuts, as phones
  and streaming encoders write video; None leaves the encoder its defaults (x264: every 250
  frames, and at scene cuts; libvpx: at most every 128 frames)."""
  import av
  container, encoder, options, audio_encoder, audio_rate = _TRANSCODES[codec]
  options = dict(options)
  if gop is not None and codec == 'h264':
    options['x264-params'] = f'keyint={gop}:min-keyint={gop}:scenecut=0'
  elif gop is not None:
    options.update({'g': str(gop), 'keyint_min': str(gop)})
  with av.open(source) as inp, av.open(destination, 'w', format=container) as out:
    video_in, audio_in = inp.streams.video[0], inp.streams.audio[0]
    rate = video_in.average_rate or fractions.Fraction(25)
    video_out = out.add_stream(encoder, rate=rate, options=options)
    video_out.width, video_out.height, video_out.pix_fmt = 640, 360, 'yuv420p'
    audio_out = out.add_stream(audio_encoder, rate=audio_rate, layout='stereo')
    resampler = av.AudioResampler(format=audio_out.format.name, layout='stereo',
                                  rate=audio_rate)
    frames_written = 0
    for frame in inp.decode(video_in, audio_in):
      if frame.time is not None and frame.time >= seconds:
        continue
      if isinstance(frame, av.VideoFrame):
        scaled = frame.reformat(width=640, height=360, format='yuv420p')
        scaled.pts = frames_written
        scaled.time_base = 1 / rate
        frames_written += 1
        out.mux(video_out.encode(scaled))
      else:
        frame.pts = None
        for chunk in resampler.resample(frame):
          out.mux(audio_out.encode(chunk))
    out.mux(video_out.encode(None))
    out.mux(audio_out.encode(None))


def prepare_clips(source: str | None, count: int, directory: str,
                  gop: int | None = None, codec: str = 'h264') -> list[str]:
  """Writes `count` 10-s 360p clips into `directory` and returns their paths (`gop`, `codec`:
  those of the transcoded `source`, `transcode_360p`)."""
  if source:
    extension = clip_extension(codec)
    first = os.path.join(directory, 'clip_000' + extension)
    transcode_360p(source, first, gop=gop, codec=codec)
    paths = [first]
    for i in range(1, count):
      paths.append(os.path.join(directory, f'clip_{i:03d}{extension}'))
      shutil.copyfile(first, paths[-1])
    return paths
  from cav_mae_jax.data import synthetic
  generated = os.path.join(directory, 'synthetic')
  result = synthetic.generate_dataset(generated, count, duration_s=10.0, fps=25, width=640,
                                      height=360)
  paths = []
  for name in sorted(os.listdir(result['video_dir'])):  # Only the clips stay in `directory`.
    paths.append(os.path.join(directory, name))
    shutil.move(os.path.join(result['video_dir'], name), paths[-1])
  shutil.rmtree(generated)
  return paths


def run_ours(paths: list[str]) -> dict:
  """Times our path on every clip; returns clip count, CPU and wall seconds."""
  from cav_mae_jax.data import clips
  from cav_mae_jax.data import decode
  from cav_mae_jax.data import fbank
  threads = clips.DECODER_THREADS  # As the preprocessing workers decode,
  clips.keep_freed_memory()  # and keep memory.
  decode.decode_clip(paths[0], decoder_threads=threads)  # Warm-up: imports, codec setup.
  cpu, wall = cpu_seconds(), time.perf_counter()
  for path in paths:
    clip = decode.decode_clip(path, decoder_threads=threads)
    features = fbank.pad_or_trim(fbank.clip_fbank(clip.waveform))
    jpegs = [decode.encode_jpeg(frame) for frame in clip.frames]
    assert features.shape == (1024, 128) and len(jpegs) == 10
  return {'clips': len(paths), 'cpu_s': cpu_seconds() - cpu,
          'wall_s': time.perf_counter() - wall}


def stage_times(path: str, repeats: int = 5) -> dict[str, float]:
  """Best-of-`repeats` CPU milliseconds of each stage of our path on one clip (the profile).

  Decoding runs as the preprocessing workers run it (`clips.DECODER_THREADS`)."""
  import av
  from cav_mae_jax.data import clips
  from cav_mae_jax.data import decode
  from cav_mae_jax.data import fbank
  threads = clips.DECODER_THREADS
  clip = decode.decode_clip(path, decoder_threads=threads)

  class DecodeOnly(decode._FrameSink):  # pylint: disable=protected-access
    """`decode_frames`' decoding (the same pictures decoded, skipped and left out), without
    converting the wanted ones."""

    def _convert(self, frame):
      return None

  def video_decoder_alone():
    with av.open(path) as container:
      sink = DecodeOnly(path, container, container.streams.video[0], len(clip.frame_indices),
                        clip.frames.shape[1], threads)
      decode._drain(path, container, [sink])  # pylint: disable=protected-access

  stages = {'decode_clip (all of decoding)':
                lambda: decode.decode_clip(path, decoder_threads=threads),
            '  video: decode_frames': lambda: decode.decode_frames(path, decoder_threads=threads),
            '    the video decoder alone': video_decoder_alone,
            '  audio: decode_audio': lambda: decode.decode_audio(path),
            'fbank + pad': lambda: fbank.pad_or_trim(fbank.clip_fbank(clip.waveform)),
            '10 x JPEG': lambda: [decode.encode_jpeg(f) for f in clip.frames]}
  result = {}
  for name, stage in stages.items():
    times = []
    for _ in range(repeats):
      start = cpu_seconds()
      stage()
      times.append(cpu_seconds() - start)
    result[name] = 1000 * min(times)
  return result


def run_original(paths: list[str], work_dir: str) -> dict:
  """Times the original's preprocessing steps (run under a Python with cv2 and torchaudio)."""
  import cv2
  import numpy as np
  import soundfile
  import torch
  import torchaudio
  import torchvision.transforms as transforms
  from PIL import Image
  from torchvision.utils import save_image
  torch.set_num_threads(1)
  cv2.setNumThreads(1)
  preprocess = transforms.Compose(
      [transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor()])

  def one_clip(path, index):
    intermediate = os.path.join(work_dir, f'{index}_intermediate.wav')
    wav = os.path.join(work_dir, f'{index}.wav')
    subprocess.run(['ffmpeg', '-nostdin', '-v', 'error', '-y', '-i', path, '-vn', '-ar',
                    '16000', intermediate], check=True)
    subprocess.run(['sox', intermediate, wav, 'remix', '1'], check=True)
    os.remove(intermediate)
    capture = cv2.VideoCapture(path)
    fps = capture.get(cv2.CAP_PROP_FPS)
    total = min(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), int(fps * 10))
    for i in range(10):
      capture.set(cv2.CAP_PROP_POS_FRAMES, int(i * (total / 10)) - 1)
      _, frame = capture.read()
      image = Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
      save_image(preprocess(image), os.path.join(work_dir, f'{index}_frame_{i}.jpg'))
    capture.release()
    samples, rate = soundfile.read(wav, dtype='int16')
    waveform = torch.from_numpy(samples.astype(np.float32) / 32768.0)[None]
    waveform = waveform - waveform.mean()
    features = torchaudio.compliance.kaldi.fbank(
        waveform, htk_compat=True, sample_frequency=rate, use_energy=False,
        window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)
    assert features.shape[1] == 128

  one_clip(paths[0], 'warmup')
  cpu, wall = cpu_seconds(), time.perf_counter()
  for index, path in enumerate(paths):
    one_clip(path, index)
  return {'clips': len(paths), 'cpu_s': cpu_seconds() - cpu,
          'wall_s': time.perf_counter() - wall}
