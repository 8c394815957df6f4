"""PyAV clip decoding: the original's frame choice and audio path, and every failure mode."""

import collections
import contextlib
import dataclasses
import fractions
import gc
import importlib.util
import io
import math
import os
import pickle
import re
import shutil
import subprocess
import sys

import av
import numpy as np
import PIL
import pytest
from PIL import Image

from cav_mae_jax.data import decode
from cav_mae_jax.data import fbank
from cav_mae_jax.data import preprocess_benchmark
from cav_mae_jax.data import synthetic

from expected_data import DATA_DIR
from expected_data import make_expected

SMALL_SAMPLE = os.path.join(DATA_DIR, '00W1lcxW-WU_40.000.mp4')
SAMPLE_RATE = 44100


def _sine(freq_hz, seconds, rate, amplitude=0.5):
  t = np.arange(int(round(seconds * rate))) / rate
  return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def _stereo(seconds, rate=SAMPLE_RATE):
  return np.stack([_sine(440.0, seconds, rate), _sine(1000.0, seconds, rate, 0.3)])


@pytest.fixture(scope='session')
def media(tmp_path_factory):
  """Small media files with specific properties, written once per test session."""
  root = tmp_path_factory.mktemp('decode_media')
  paths = {}

  def write(name, frames=None, fps=10, audio=None, rate=SAMPLE_RATE, **kwargs):
    paths[name] = str(root / name)
    synthetic.write_mp4(paths[name], frames, fps, audio, rate, **kwargs)

  write('numbered_12.5fps.mp4', synthetic.numbered_frames(125), fractions.Fraction(25, 2),
        _stereo(10.0))
  write('silent.mp4', synthetic.numbered_frames(100), 10,
        np.zeros((2, 10 * SAMPLE_RATE), np.float32))
  write('one_second.mp4', synthetic.numbered_frames(10), 10, _stereo(1.0))
  write('thirty_seconds.mp4', synthetic.numbered_frames(150), 5, _stereo(30.0))
  write('mono_8k.mp4', synthetic.numbered_frames(100), 10, _sine(440.0, 10.0, 8000)[None], 8000)
  six = np.stack([_sine(440.0, 10.0, 48000)] + [_sine(1000.0 + 300 * k, 10.0, 48000, 0.3)
                                                for k in range(5)])
  write('six_channel_48k.mp4', synthetic.numbered_frames(100), 10, six, 48000)
  vfr_gaps = np.where(np.arange(240) % 2 == 0, 1 / 30, 1 / 15)
  write('vfr.mp4', synthetic.numbered_frames(240), 20, _stereo(12.0),
        frame_times_s=np.concatenate([[0.0], np.cumsum(vfr_gaps)[:-1]]))
  write('b_frames.mp4', synthetic.numbered_frames(250), 25, preset='medium')
  write('audio_only.mp4', audio=_stereo(2.0))
  write('video_only.mp4', synthetic.numbered_frames(20), 10)
  paths['missing.mp4'] = str(root / 'missing.mp4')
  paths['empty.mp4'] = str(root / 'empty.mp4')
  open(paths['empty.mp4'], 'wb').close()
  paths['text.mp4'] = str(root / 'text.mp4')
  with open(paths['text.mp4'], 'w') as f:
    f.write('this is not a video\n' * 50)
  data = open(paths['numbered_12.5fps.mp4'], 'rb').read()
  paths['truncated.mp4'] = str(root / 'truncated.mp4')  # Index (moov) at the end: lost.
  with open(paths['truncated.mp4'], 'wb') as f:
    f.write(data[:len(data) // 2])
  # Index at the start (faststart), media data cut: the container opens, the data ends early.
  for name, frames in (('truncated_audio_data.mp4', None),
                       ('truncated_av_data.mp4', synthetic.numbered_frames(100))):
    whole = str(root / f'whole_{name}')
    synthetic.write_mp4(whole, frames, 10, _stereo(10.0), faststart=True)
    data = open(whole, 'rb').read()
    paths[name] = str(root / name)
    with open(paths[name], 'wb') as f:
      f.write(data[:int(len(data) * 0.4)])
  # Matroska stores no stream durations in its track headers, but FFmpeg's muxer tags each
  # track with its DURATION: the same audio cut, or a track legitimately shorter than the video.
  _remux_to_matroska(str(root / 'whole_truncated_audio_data.mp4'),
                     str(root / 'whole_audio.mkv'))
  data = open(root / 'whole_audio.mkv', 'rb').read()
  paths['truncated_audio_data.mkv'] = str(root / 'truncated_audio_data.mkv')
  with open(paths['truncated_audio_data.mkv'], 'wb') as f:
    f.write(data[:int(len(data) * 0.4)])
  write('short_audio.mp4', synthetic.numbered_frames(120), 10, _stereo(6.0))
  paths['short_audio.mkv'] = str(root / 'short_audio.mkv')
  _remux_to_matroska(paths['short_audio.mp4'], paths['short_audio.mkv'])
  return paths


def _numbers(frames):
  return [synthetic.read_frame_number(frame) for frame in frames]


# ----------------------------------------------------------------------------------------
# Frames.


def test_frame_indices_follow_the_original_rule():
  # 12.5 fps, 125 frames: int(i * 12.5) - 1, clamped at 0.
  np.testing.assert_array_equal(decode.frame_indices(125, 12.5),
                                [0, 11, 24, 36, 49, 61, 74, 86, 99, 111])
  # total = min(frame_count, int(fps * 10)): a 12-s NTSC clip uses int(299.7) = 299.
  np.testing.assert_array_equal(decode.frame_indices(360, 30000 / 1001),
                                [0, 28, 58, 88, 118, 148, 178, 208, 238, 268])
  # Fewer than 10 frames repeat frames rather than invent any.
  np.testing.assert_array_equal(decode.frame_indices(5, 5.0), [0, 0, 0, 0, 1, 1, 2, 2, 3, 3])
  assert decode.frame_indices(125, 12.5).dtype == np.int32


@pytest.mark.parametrize('name', ['numbered_25fps_10s.mp4', 'numbered_ntsc_12s.mp4',
                                  'numbered_24fps_3.5s.mp4', 'numbered_vfr_12s.mp4'])
def test_frames_are_the_ones_opencv_returns_in_the_original(name):
  stored = np.load(os.path.join(DATA_DIR, 'frames_expected.npz'))
  frames, indices, fps, frame_count = decode.decode_frames(os.path.join(DATA_DIR, name))
  assert frames.shape == (10, 224, 224, 3) and frames.dtype == np.uint8
  assert fps == pytest.approx(float(stored[f'{name}/fps']), rel=1e-9)
  assert frame_count == int(stored[f'{name}/frame_count'])
  assert _numbers(frames) == stored[f'{name}/numbers'].tolist()
  np.testing.assert_array_equal(indices, stored[f'{name}/numbers'])


@pytest.mark.parametrize('name', ['numbered_12.5fps.mp4', 'b_frames.mp4', 'vfr.mp4',
                                  'one_second.mp4', 'thirty_seconds.mp4'])
def test_frames_match_opencv_read_the_original_way(media, name):
  pytest.importorskip('cv2', reason='OpenCV is the original frame reader')
  opencv = make_expected.original_frame_numbers(media[name], synthetic.read_frame_number)
  frames, indices, fps, frame_count = decode.decode_frames(media[name])
  assert fps == pytest.approx(opencv['fps'], rel=1e-9)
  assert frame_count == int(opencv['frame_count'])
  assert _numbers(frames) == indices.tolist() == opencv['numbers'].tolist()


def test_sample_video_frames_match_the_originals_stored_frames():
  frames, indices, fps, frame_count = decode.decode_frames(SMALL_SAMPLE)
  assert (fps, frame_count) == (12.5, 125)
  np.testing.assert_array_equal(indices, [0, 11, 24, 36, 49, 61, 74, 86, 99, 111])
  for i in (0, 5, 9):
    original = np.asarray(Image.open(os.path.join(DATA_DIR, f'sample_frames_orig_{i}.png')))
    difference = np.abs(frames[i].astype(np.float64) - original)
    assert difference.mean() <= 2.0, (i, difference.mean())  # Measured: identical.


# Pillow up to 12 resizes horizontally first; Pillow 13 first vertically where a downscaled image
# is more than twice as tall as wide (`decode.resize_and_crop` keeps the first order).
_PIL_RESIZES_HORIZONTALLY_FIRST = int(PIL.__version__.split('.')[0]) < 13


def _reference_resize_crop(rgb, size=224):
  """torchvision Resize(size) + CenterCrop(size) on a PIL image as Pillow up to 12 runs it (the
  horizontal pass, then the vertical), written out independently."""
  height, width = rgb.shape[:2]
  if width <= height:
    new_size = (size, int(size * height / width))
  else:
    new_size = (int(size * width / height), size)
  image = Image.fromarray(rgb).resize((new_size[0], height), Image.BILINEAR)
  image = image.resize(new_size, Image.BILINEAR)
  if _PIL_RESIZES_HORIZONTALLY_FIRST:  # one resize, as torchvision calls it, gives the same
    np.testing.assert_array_equal(
        np.asarray(image), np.asarray(Image.fromarray(rgb).resize(new_size, Image.BILINEAR)))
  left = int(round((new_size[0] - size) / 2.0))
  top = int(round((new_size[1] - size) / 2.0))
  return np.asarray(image)[top:top + size, left:left + size]


def test_frames_equal_a_pil_resize_and_crop_of_the_decoded_frame(tmp_path):
  result = synthetic.generate_dataset(tmp_path, 1, num_classes=2, duration_s=2.0, fps=10,
                                      width=160, height=120)
  path = os.path.join(result['video_dir'], 'syn_train_00000.mp4')
  frames, indices, _, _ = decode.decode_frames(path)
  with av.open(path) as container:
    every_frame = [f.to_ndarray(format='rgb24') for f in container.decode(video=0)]
  assert len(every_frame) == 20
  for frame, index in zip(frames, indices):
    reference = _reference_resize_crop(every_frame[index])
    assert np.abs(frame.astype(np.float64) - reference).mean() <= 2.0


@pytest.mark.parametrize('height,width', [
    (360, 640), (144, 256), (480, 640), (720, 1280), (1080, 1920), (640, 360), (1920, 1080),
    (224, 224), (223, 400), (226, 301), (500, 333), (101, 999), (240, 320), (999, 101),
    (700, 300)])
def test_two_pass_resize_and_crop_equals_one_resize_then_crop(height, width):
  # The horizontal pass, a column crop, then the vertical pass: bit-identical to PIL's single
  # resize followed by the crop, for downscaling, upscaling, landscape and portrait, as Pillow up
  # to 12 resizes (700 x 300 at 224, 999 x 101 at 96: Pillow 13 resizes vertically first).
  rng = np.random.default_rng(height * 10007 + width)
  noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  steps = (noise // 64 * 85).astype(np.uint8)  # Hard edges: every tap's weight matters.
  for rgb in (noise, steps):
    np.testing.assert_array_equal(decode.resize_and_crop(rgb), _reference_resize_crop(rgb))
    np.testing.assert_array_equal(decode.resize_and_crop(rgb, 96),
                                  _reference_resize_crop(rgb, 96))


# Display-matrix tags (counterclockwise degrees, as written) -> what ffmpeg's autorotate does
# with them: the libavfilter chain it inserts, and the clockwise turn that makes.
AUTOROTATE = {
    0: ([], 0),
    90: ([('transpose', 'cclock')], 270),
    -90: ([('transpose', 'clock')], 90),  # Phone footage tagged rotate=90.
    180: ([('hflip', None), ('vflip', None)], 180),
    270: ([('transpose', 'clock')], 90),
}


@pytest.fixture(scope='session')
def rotated_clips(tmp_path_factory):
  """A 640x360 clip (numbered frames on a colour gradient) once per rotation tag."""
  root = tmp_path_factory.mktemp('rotated')
  frames = synthetic.numbered_frames(20, height=360, width=640).copy()
  frames[..., 0] = np.linspace(0, 255, 640, dtype=np.uint8)[None, None, :]
  frames[..., 2] = np.linspace(255, 0, 360, dtype=np.uint8)[None, :, None]
  paths = {}
  for tag in AUTOROTATE:
    paths[tag] = str(root / f'rotate_{tag}.mp4')
    synthetic.write_mp4(paths[tag], frames, 10, _stereo(2.0), display_rotation=tag)
  paths['mirrored'] = str(root / 'mirrored.mp4')
  synthetic.write_mp4(paths['mirrored'], frames[:4], 10, display_rotation=90, display_hflip=True)
  return paths


def _autorotated_frames(path, chain):
  """Every frame through the libavfilter filters the ffmpeg command line inserts, as RGB."""
  with av.open(path) as container:
    stream = container.streams.video[0]
    graph = av.filter.Graph()
    nodes = [graph.add_buffer(template=stream)]
    nodes += [graph.add(name, args) for name, args in chain] + [graph.add('buffersink')]
    for source, sink in zip(nodes, nodes[1:]):
      source.link_to(sink)
    graph.configure()
    frames = []
    for frame in container.decode(stream):
      graph.push(frame)
      frames.append(graph.pull().to_ndarray(format='rgb24'))
  return frames


def _ffmpeg_cli_frame(path, index):
  """Frame `index` as the ffmpeg command line decodes it (autorotate on, its default), RGB."""
  command = ['ffmpeg', '-nostdin', '-v', 'error', '-i', path, '-vf', f'select=eq(n\\,{index})',
             '-frames:v', '1', '-f', 'rawvideo', '-pix_fmt', 'rgb24', '-']
  return np.frombuffer(subprocess.run(command, capture_output=True, check=True).stdout, np.uint8)


@pytest.mark.parametrize('tag', sorted(AUTOROTATE))
def test_tagged_frames_are_upright_as_ffmpeg_autorotates_them(rotated_clips, tag):
  chain, clockwise = AUTOROTATE[tag]
  reference = _autorotated_frames(rotated_clips[tag], chain)
  with av.open(rotated_clips[tag]) as container:
    decoded = list(container.decode(video=0))
  assert [decode.frame_rotation(frame) for frame in decoded] == [clockwise] * 20
  ours = [decode.upright_rgb(frame, clockwise) for frame in decoded]
  assert ours[0].shape == ((640, 360, 3) if clockwise in (90, 270) else (360, 640, 3))
  for mine, theirs in zip(ours, reference):
    np.testing.assert_array_equal(mine, theirs)  # Pixel for pixel, before any resizing.
  if shutil.which('ffmpeg'):  # The command line itself, where it is installed.
    for index in (0, 7, 19):
      np.testing.assert_array_equal(_ffmpeg_cli_frame(rotated_clips[tag], index),
                                    ours[index].reshape(-1))


@pytest.mark.parametrize('tag', sorted(AUTOROTATE))
def test_stored_frames_are_the_upright_frame_resized_and_cropped(rotated_clips, tag):
  from cav_mae_jax.data import clips, records, sources  # pylint: disable=g-import-not-at-top

  chain, clockwise = AUTOROTATE[tag]
  reference = _autorotated_frames(rotated_clips[tag], chain)
  labels = sources.ClassLabels(('/m/a',), ('A',), 'labels.csv')
  values = clips.clip_example(sources.ClipEntry('v', rotated_clips[tag], ('/m/a',)), labels)
  assert values[records.ROTATION] == clockwise
  np.testing.assert_array_equal(values[records.FRAME_INDICES],
                                decode.frame_indices(20, 10.0))  # The frame choice is unchanged.
  for jpeg, index in zip(values[records.FRAMES], values[records.FRAME_INDICES]):
    assert jpeg == decode.encode_jpeg(_reference_resize_crop(reference[index])), index
  serialized = records.serialize_example(values)
  assert (b'rotation' in serialized) == (clockwise != 0)  # Untagged: the bytes of before.
  assert int(records.parse_example(serialized)[records.ROTATION]) == clockwise


def test_mirrored_or_oblique_display_matrices_are_refused(rotated_clips):
  with pytest.raises(decode.DecodeError) as info:
    decode.decode_frames(rotated_clips['mirrored'], num_frames=4)
  assert info.value.reason == 'unsupported_rotation' and 'mirrors' in info.value.detail

  def matrix(counterclockwise_degrees, hflip=False):  # As libavutil's display.c writes it.
    radians = math.radians(counterclockwise_degrees)
    cos, sin = math.cos(radians) * 65536, math.sin(radians) * 65536
    sign = -1 if hflip else 1
    return [round(sign * cos), round(-sin), 0, round(sign * sin), round(cos), 0, 0, 0, 1 << 30]

  for counterclockwise, clockwise in ((0, 0), (90, 270), (-90, 90), (180, 180), (-180, 180),
                                      (270, 90), (450, 270)):
    assert decode.rotation_from_display_matrix(matrix(counterclockwise)) == clockwise
  with pytest.raises(ValueError, match='45 degrees'):
    decode.rotation_from_display_matrix(matrix(-45))
  with pytest.raises(ValueError, match='mirrors'):
    decode.rotation_from_display_matrix(matrix(0, hflip=True))


def test_generated_clips_give_the_frames_the_rule_names(media):
  cases = {
      'numbered_12.5fps.mp4': (12.5, 125),
      'one_second.mp4': (10.0, 10),
      'thirty_seconds.mp4': (5.0, 150),
      'vfr.mp4': (None, 240),
  }
  for name, (fps, count) in cases.items():
    frames, indices, got_fps, got_count = decode.decode_frames(media[name])
    assert got_count == count, name
    if fps is not None:
      assert got_fps == pytest.approx(fps), name
    np.testing.assert_array_equal(indices, decode.frame_indices(got_count, got_fps))
    assert _numbers(frames) == indices.tolist(), name
  # 30-s clip: only the first 10 s (5 fps -> frames 0..49) are used.
  _, indices, _, _ = decode.decode_frames(media['thirty_seconds.mp4'])
  assert indices.max() < 50
  # VFR: the average rate (20 fps) gives total 200 of 240 frames, as in OpenCV.
  _, indices, fps, _ = decode.decode_frames(media['vfr.mp4'])
  assert 19.9 < fps < 20.1 and indices.max() == 179


@pytest.mark.parametrize('reorder_window', [None, 0])
def test_reordered_frames_are_numbered_by_presentation_order(media, monkeypatch,
                                                            reorder_window):
  # x264 'medium' uses B-frames: decode order differs from presentation order, and unwanted
  # non-reference frames are skipped. With no reorder window the timestamp ranks come out
  # inconsistent, and the stream must be decoded again counting frames: same answer.
  if reorder_window is not None:
    monkeypatch.setattr(decode, '_REORDER_WINDOW', reorder_window)
  with av.open(media['b_frames.mp4']) as container:
    packets = [p for p in container.demux(video=0) if p.size]
  assert any(a.pts > b.pts for a, b in zip(packets, packets[1:]))  # Really reordered.
  frames, indices, fps, count = decode.decode_frames(media['b_frames.mp4'])
  assert (fps, count) == (25.0, 250)
  assert _numbers(frames) == indices.tolist() == [0, 24, 49, 74, 99, 124, 149, 174, 199, 224]


def _write_gop_clip(path, codec, container_format, open_gop, count=250, fps=25):
  """Numbered frames with a keyframe every 24 and B-frames, in `codec` (libx264/libx265), or
  libvpx-vp9's key frames every 24 and hidden alt-ref frames. (AV1: tests/data/av1_key24.*,
  made by tests/data/make_av1_clips.py.)"""
  params = f'keyint=24:min-keyint=24:scenecut=0:bframes=3:open-gop={int(open_gop)}'
  options = ({'x264-params': params} if codec == 'libx264' else
             {'x265-params': params + ':log-level=error'} if codec == 'libx265' else
             {'g': '24', 'keyint_min': '24', 'auto-alt-ref': '1', 'lag-in-frames': '16',
              'cpu-used': '8'})
  with av.open(str(path), 'w', format=container_format) as container:
    stream = container.add_stream(codec, rate=fps, options=options)
    stream.width, stream.height, stream.pix_fmt = 96, 64, 'yuv420p'
    stream.codec_context.thread_count = 1
    for i, pixels in enumerate(synthetic.numbered_frames(count)):
      frame = av.VideoFrame.from_ndarray(pixels, format='rgb24')
      frame.pts = i
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def _every_frame(path):
  """Every frame of the video stream, decoded in order and resized and cropped as stored."""
  with av.open(path) as container:
    return [decode.resize_and_crop(decode.upright_image(frame, 0))
            for frame in container.decode(video=0)]


def _frame_sink_after_decoding(path):
  """The frames `decode_frames` returns for `path`, asserted equal to a full decode's, and the
  sink that decoded them."""
  with decode._open(path) as container:  # pylint: disable=protected-access
    sink = decode._frame_sink(path, container, 10, 224, 1)  # pylint: disable=protected-access
    decode._drain(path, container, [sink])  # pylint: disable=protected-access
    frames = sink.frames()
  assert _numbers(frames) == sink.indices.tolist()
  reference = _every_frame(path)
  for frame, index in zip(frames, sink.indices):
    np.testing.assert_array_equal(frame, reference[index])
  return sink


@pytest.mark.parametrize('codec, container_format, open_gop', [
    ('libx264', 'mp4', False), ('libx264', 'mpegts', False), ('libx264', 'mp4', True),
    ('libx265', 'matroska', False), ('libx265', 'mp4', True), ('libvpx-vp9', 'webm', False),
    ('libvpx-vp9', 'mp4', False), ('av1', 'webm', False), ('av1', 'mp4', False)])
def test_frames_up_to_an_idr_picture_are_left_out_with_the_same_frames(
    tmp_path, codec, container_format, open_gop):
  # Keyframes every 24 frames, wanted frames every 25: after the last wanted frame before an
  # IDR picture (VP9, AV1: a key frame) nothing is needed up to it. Open GOPs (x264's open-gop I
  # pictures, HEVC's CRA) are followed by pictures that refer back: nothing is left out there.
  if codec == 'av1':  # stored: SVT-AV1, its key frames every 24 (tests/data/make_av1_clips.py)
    path = os.path.join(DATA_DIR, f'av1_key24.{container_format}')
  elif codec not in av.codecs_available:
    pytest.skip(f'this PyAV build cannot encode {codec}')
  else:
    path = str(tmp_path / f'clip.{container_format}')
    _write_gop_clip(path, codec, container_format, open_gop)
  sink = _frame_sink_after_decoding(path)
  if open_gop:
    assert sink.packets_left_out == 0
  else:  # 9 IDR pictures before the last wanted frame, 5-16 frames left out before each
    assert sink.packets_left_out > 50
  assert not sink._count_instead  # pylint: disable=protected-access


def test_a_wrong_guess_of_an_idr_picture_decodes_the_stream_again(tmp_path, monkeypatch):
  # Were a packet taken for an IDR picture that is not one, the decoder's picture there is no
  # keyframe: the stream is decoded again from the start, frames counted (same frames).
  path = str(tmp_path / 'clip.mp4')
  _write_gop_clip(path, 'libx264', 'mp4', open_gop=False)
  monkeypatch.setattr(decode, '_fresh_start_tests',
                      lambda stream: (lambda packet: True, lambda packet: False))
  sink = _frame_sink_after_decoding(path)
  assert sink.packets_left_out > 0 and sink._count_instead  # pylint: disable=protected-access


def _annex_b_units(data):
  """The NAL units of Annex B data, each with its start code."""
  starts = [i for i in range(len(data) - 2) if data[i:i + 3] == b'\0\0\1']
  starts = [i - 1 if i and data[i - 1] == 0 else i for i in starts]
  return [data[a:b] for a, b in zip(starts, starts[1:] + [len(data)])]


def _repeat_parameter_sets(source, path, unit_type, parameter_sets, frames):
  """Copies an MPEG-TS file whose first packet holds the stream's parameter sets, repeating
  them (the same bytes, as a stream may anywhere between pictures) in the packets of reference
  P pictures shown at `frames` (right after each packet's access unit delimiter)."""
  with av.open(source) as reader, av.open(path, 'w', format='mpegts') as writer:
    copy = writer.add_stream_from_template(reader.streams.video[0])
    packets = [p for p in reader.demux(video=0) if p.size]
    ranks = {pts: rank for rank, pts in enumerate(sorted(p.pts for p in packets))}
    sets = [u for u in _annex_b_units(bytes(packets[0]))
            if unit_type(u[u.index(b'\1') + 1]) in parameter_sets]
    repeated = 0
    for packet in packets:
      data = bytes(packet)
      if ranks[packet.pts] in frames:
        units = _annex_b_units(data)
        first, second = (unit_type(u[u.index(b'\1') + 1]) for u in units[:2])
        assert (first, second) in ((9, 1), (35, 1))  # a delimiter, a P slice (H.264: or B)
        data = b''.join(units[:1] + sets + units[1:])
        repeated += 1
      copied = av.Packet(data)
      copied.pts, copied.dts, copied.time_base = packet.pts, packet.dts, packet.time_base
      copied.is_keyframe, copied.stream = packet.is_keyframe, copy
      writer.mux(copied)
    assert repeated == len(frames)


@pytest.mark.parametrize('codec, nal, parameter_sets', [
    ('libx264', 'h264', {7, 8}), ('libx265', 'hevc', {32, 33, 34})])
def test_packets_with_parameter_sets_are_not_left_out(tmp_path, codec, nal, parameter_sets):
  # A picture after an IDR picture may use a parameter set sent any time before it: a packet
  # carrying one is decoded, with the packets it refers to. Here the repeated sets are the same
  # bytes (the frames are a full decode's either way); a changed set would change the pictures
  # from the IDR picture on had it been left out.
  if codec not in av.codecs_available:
    pytest.skip(f'this PyAV build cannot encode {codec}')
  plain, path = str(tmp_path / 'plain.ts'), str(tmp_path / 'repeated.ts')
  _write_gop_clip(plain, codec, 'mpegts', open_gop=False)
  # Wanted frames 49 and 74 with IDR pictures at 48 and 72: frames 50-71 are left out unless
  # a packet among them carries parameter sets, here frame 64's.
  unit_type = decode._NAL_TYPES[nal].unit_type  # pylint: disable=protected-access
  _repeat_parameter_sets(plain, path, unit_type, parameter_sets, frames={64})
  left_out = _frame_sink_after_decoding(plain).packets_left_out
  sink = _frame_sink_after_decoding(path)
  assert not sink._count_instead  # pylint: disable=protected-access
  # Decoded now: some of frames 50-64 (10 here; those before frame 49 is out of the decoder
  # were never left out); frames 65-71 still left out.
  assert 0 < left_out - sink.packets_left_out <= 15


def _vp9_header(profile, show_existing=0, frame_type=0, sync=0x498342):
  """The first 5 bytes of a VP9 frame's uncompressed header (show_frame 1, not error
  resilient), bits after the sync code 0."""
  bits = [1, 0, profile & 1, profile >> 1] + ([0] if profile == 3 else [])
  bits += [show_existing, frame_type, 1, 0] + [int(b) for b in f'{sync:024b}']
  bits += [0] * (40 - len(bits))
  return int(''.join(map(str, bits)), 2).to_bytes(5, 'big')


def test_vp9_key_frames_are_read_from_the_frame_header():
  key = decode._vp9_key_frame  # pylint: disable=protected-access
  for profile in range(4):
    assert key(_vp9_header(profile) + b'rest'), profile
    assert not key(_vp9_header(profile, frame_type=1)), profile
    assert not key(_vp9_header(profile, show_existing=1)), profile
    assert not key(_vp9_header(profile, sync=0x498343)), profile
  assert not key(b'\x00' + _vp9_header(0)[1:])  # frame_marker not 0b10
  assert not key(_vp9_header(0)[:4])


def test_av1_packets_with_a_sequence_header_are_not_left_out():
  # AV1's sequence header is its parameter set: repeated (the same bytes) in frame 64's packet,
  # inside a run that is otherwise left out (wanted frame 49, key frames at 48 and 72).
  plain = os.path.join(DATA_DIR, 'av1_key24.webm')
  path = os.path.join(DATA_DIR, 'av1_key24_sequence_header_at_64.webm')
  obus = decode._av1_obus  # pylint: disable=protected-access
  with av.open(path) as container:
    sequence_headers = {p.pts: any(kind == 1 for kind, _, _ in obus(bytes(p)))
                        for p in container.demux(video=0) if p.size}
  ranks = {pts: rank for rank, pts in enumerate(sorted(sequence_headers))}
  assert sorted(ranks[pts] for pts, has in sequence_headers.items() if has) == [
      0, 24, 48, 64, 72, 96, 120, 144, 168, 192, 216, 240]  # key frames bring one; and 64
  left_out = _frame_sink_after_decoding(plain).packets_left_out
  sink = _frame_sink_after_decoding(path)
  assert not sink._count_instead  # pylint: disable=protected-access
  assert 0 < left_out - sink.packets_left_out <= 15


def _obu(kind, payload, size_field=True):
  """An AV1 OBU without extension header, its size as leb128 (or none: the data's last OBU)."""
  if not size_field:
    return bytes([kind << 3]) + payload
  size, leb = len(payload), b''
  while True:
    leb += bytes([(size & 0x7F) | (0x80 if size >> 7 else 0)])
    size >>= 7
    if not size:
      return bytes([kind << 3 | 0x02]) + leb + payload


def test_av1_key_frames_are_read_from_the_frame_header():
  key, obus = decode._av1_key_frame, decode._av1_obus  # pylint: disable=protected-access
  sequence, delimiter = _obu(1, b'\x00\x00\x00' + bytes(20)), _obu(2, b'')
  frame = lambda first: _obu(6, bytes([first]) + bytes(300))  # a 2-byte leb128 size
  assert key(sequence + frame(0x10)) and key(delimiter + sequence + frame(0x10))
  assert key(sequence + _obu(3, b'\x10') + _obu(4, bytes(8)))  # frame header + tile group
  assert key(sequence + _obu(6, b'\x10' + bytes(8), size_field=False))
  assert not key(sequence + frame(0x30))  # frame_type INTER_FRAME
  assert not key(sequence + frame(0x00))  # a key frame not shown
  assert not key(sequence + frame(0x80))  # show_existing_frame
  assert not key(sequence)  # no frame
  assert not key(_obu(1, b'\x08' + bytes(4)) + frame(0x10))  # reduced still-picture headers
  assert obus(sequence + frame(0x10)) == [(1, 2, 23), (6, 28, 301)]
  # Not OBUs: the forbidden bit, an extension header (layers), sizes past the data.
  for data in (b'\x80' + sequence, bytes([6 << 3 | 0x06, 0, 1, 0x10]), sequence[:-1],
               b'\x32\xff'):
    assert obus(data) is None and not key(data), data


def test_nal_unit_headers_of_both_layouts():
  headers = decode._nal_headers  # pylint: disable=protected-access
  # Length-prefixed (MP4/Matroska), 4- and 2-byte prefixes.
  assert headers(b'\0\0\0\x02\x65\x88' + b'\0\0\0\x01\x06', 4) == [0x65, 0x06]
  assert headers(b'\0\x02\x41\x9a\0\x01\x65', 2) == [0x41, 0x65]
  # Data that does not divide into units claims none: a unit overrunning it, an empty unit,
  # bytes left over, or start codes where prefixes were expected.
  for data in (b'\0\x02\x41\x9a\0\x09\x65', b'\0\0\0\0\x65', b'\0\0\0\x01\x65\0\0',
               b'\0\0\0\x01\x09\xf0\0\0\0\x01\x65\x88\x84'):
    assert headers(data, 4) == [], data
  # Start codes (Annex B: MPEG-TS), 3 or 4 bytes.
  assert headers(b'\0\0\0\x01\x67\x42\0\0\x01\x65\x88', 0) == [0x67, 0x65]


def test_image_size_is_configurable(media):
  frames, _, _, _ = decode.decode_frames(media['numbered_12.5fps.mp4'], num_frames=4,
                                         image_size=64)
  assert frames.shape == (4, 64, 64, 3)
  assert _numbers(frames) == decode.frame_indices(125, 12.5, 4).tolist()


def test_encode_jpeg_uses_pil_quality():
  frame = decode.resize_and_crop(synthetic.numbered_frames(1, 64, 96)[0])
  default = decode.encode_jpeg(frame)
  assert default == decode.encode_jpeg(frame, quality=75)
  assert len(decode.encode_jpeg(frame, quality=95)) > len(default)
  restored = np.asarray(Image.open(io.BytesIO(default)))
  assert restored.shape == (224, 224, 3)
  assert np.abs(restored.astype(int) - frame).mean() < 3
  with pytest.raises(ValueError, match='uint8'):
    decode.encode_jpeg(frame.astype(np.float32))


# ----------------------------------------------------------------------------------------
# Audio.


def test_sample_audio_matches_the_ffmpeg_cli_path():
  original = np.load(os.path.join(DATA_DIR, 'sample_audio.npz'))['00W1lcxW-WU_40.000']
  waveform, source_rate = decode.decode_audio(SMALL_SAMPLE, max_seconds=None)
  assert source_rate == 44100
  assert waveform.dtype == np.int16 and waveform.shape == original.shape
  # Different ffmpeg builds' AAC decoders differ by ~1e-7, which can flip an s16 rounding.
  sample_difference = np.abs(waveform.astype(np.int32) - original)
  assert sample_difference.max() <= 1 and (sample_difference > 0).mean() < 1e-3
  ours, theirs = fbank.clip_fbank(waveform), fbank.clip_fbank(original)
  assert np.abs(ours - theirs).max() < 0.02  # Measured 0.0102.
  assert np.abs(ours - theirs).mean() < 1e-4  # Measured 7.5e-6.
  cut, _ = decode.decode_audio(SMALL_SAMPLE)
  np.testing.assert_array_equal(cut, waveform[:160000])


@pytest.mark.parametrize('name, source_rate', [('numbered_12.5fps.mp4', 44100),
                                               ('mono_8k.mp4', 8000),
                                               ('six_channel_48k.mp4', 48000)])
def test_first_channel_resampled_to_16k(media, name, source_rate):
  waveform, got_rate = decode.decode_audio(media[name])
  assert got_rate == source_rate
  assert waveform.dtype == np.int16
  assert abs(waveform.shape[0] - 160000) <= 2048  # Encoder padding, cut at 10 s.
  # Channel 0 is the 440 Hz sine at amplitude 0.5; a downmix would mix in the other tones.
  t = np.arange(waveform.shape[0]) / 16000
  signal = waveform.astype(np.float64) / 32768
  sin_part, cos_part = signal @ np.sin(2 * np.pi * 440 * t), signal @ np.cos(2 * np.pi * 440 * t)
  amplitude = 2 * np.hypot(sin_part, cos_part) / signal.shape[0]
  assert amplitude == pytest.approx(0.5, rel=0.03)
  assert (amplitude**2 / 2) / np.mean(signal**2) > 0.98  # Nearly all energy is the 440 Hz tone.


def _resampled_at_once(path: str) -> np.ndarray:
  """Channel 0 of the first audio stream, resampled to 16 kHz s16 as one frame."""
  with av.open(path) as container:
    frames = list(container.decode(audio=0))
  first = frames[0]
  samples = np.concatenate([f.to_ndarray()[0] if f.format.is_planar
                            else f.to_ndarray()[0, ::len(f.layout.channels)] for f in frames])
  frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[None]),
                                     format=first.format.name, layout='mono')
  frame.sample_rate = first.sample_rate
  frame.pts = 0
  resampler = av.AudioResampler(format='s16', layout='mono', rate=16000)
  resampled = resampler.resample(frame) + resampler.resample(None)
  return np.concatenate([f.to_ndarray().reshape(-1) for f in resampled])


@pytest.mark.parametrize('name', ['numbered_12.5fps.mp4', 'mono_8k.mp4', 'six_channel_48k.mp4',
                                  None])
def test_resampling_in_frames_gives_the_clip_at_once(media, name):
  # decode_audio feeds libswresample in frames of _RESAMPLE_CHUNK samples (what its graph keeps
  # until a collection stays small); the samples are those of the whole clip in one frame.
  path = SMALL_SAMPLE if name is None else media[name]
  waveform, _ = decode.decode_audio(path, max_seconds=None)
  np.testing.assert_array_equal(waveform, _resampled_at_once(path))


def test_audio_frames_of_no_samples_are_too_short_not_a_crash():
  with av.open(SMALL_SAMPLE) as container:
    sink = decode._AudioSink(SMALL_SAMPLE, container.streams.audio[0], 16000, None)
    sink._chunks, sink._source_format = [np.zeros(0, np.float32)], ('flt', 44100)
    with pytest.raises(decode.DecodeError, match='0 samples at 16000 Hz') as error:
      sink.waveform()
  assert error.value.reason == 'audio_too_short'


@pytest.mark.parametrize('codec, sample_format', [('pcm_s16le', 's16'), ('pcm_f32le', 'flt')])
def test_packed_samples_give_channel_zero_exactly(tmp_path, codec, sample_format):
  # Packed (interleaved) sample formats: channel 0 is every third sample of the plane. At 16 kHz
  # nothing is resampled, so the waveform is channel 0's samples exactly.
  rng = np.random.default_rng(0)
  samples = rng.integers(-20000, 20000, (3, 16000), dtype=np.int16)
  path = str(tmp_path / f'{codec}.mov')
  with av.open(path, 'w') as container:
    stream = container.add_stream(codec, rate=16000, layout='3.0')
    interleaved = samples.T.reshape(1, -1)
    if sample_format == 'flt':
      interleaved = interleaved.astype(np.float32) / 32768
    frame = av.AudioFrame.from_ndarray(interleaved, format=sample_format, layout='3.0')
    frame.sample_rate = 16000
    for packet in stream.encode(frame):
      container.mux(packet)
    for packet in stream.encode(None):
      container.mux(packet)
  with av.open(path) as container:
    assert container.streams.audio[0].codec_context.format.name == sample_format
  waveform, rate = decode.decode_audio(path)
  assert rate == 16000
  np.testing.assert_array_equal(waveform, samples[0])


def test_silent_track_is_valid_audio(media):
  clip = decode.decode_clip(media['silent.mp4'])
  assert clip.waveform.shape == (160000,)
  assert np.all(clip.waveform == 0)
  features = fbank.clip_fbank(clip.waveform)
  assert np.all(np.isfinite(features))
  np.testing.assert_allclose(features, -15.942385, atol=1e-5)


def test_one_second_clip_is_returned_as_is(media):
  clip = decode.decode_clip(media['one_second.mp4'])
  assert abs(clip.waveform.shape[0] - 16000) <= 1100
  assert clip.duration_s == pytest.approx(1.0, abs=0.1)
  features = fbank.clip_fbank(clip.waveform)
  assert features.shape[0] == fbank.num_frames(clip.waveform.shape[0])
  padded = fbank.pad_or_trim(features)
  assert padded.shape == (1024, 128) and np.all(padded[features.shape[0]:] == 0)


def test_thirty_second_clip_keeps_the_first_ten_seconds(media):
  clip = decode.decode_clip(media['thirty_seconds.mp4'])
  assert clip.waveform.shape == (160000,)
  assert clip.duration_s == pytest.approx(30.0, abs=0.1)
  everything, _ = decode.decode_audio(media['thirty_seconds.mp4'], max_seconds=None)
  assert everything.shape[0] >= 30 * 16000
  np.testing.assert_array_equal(clip.waveform, everything[:160000])
  # The original cuts a long clip's fbank (not its audio) to 1024 frames = 164080 samples.
  original_view, _ = decode.decode_audio(media['thirty_seconds.mp4'],
                                         max_seconds=decode.ORIGINAL_AUDIO_SECONDS)
  assert original_view.shape == (164080,)
  assert fbank.num_frames(original_view.shape[0]) == 1024
  # Equal up to float32 rounding of the (different) clip means: per-frame DC removal cancels
  # the mean itself; pure tones leave bins near log(eps), where that rounding shows.
  difference = np.abs(fbank.clip_fbank(original_view) - fbank.clip_fbank(everything)[:1024])
  assert difference.max() < 0.01 and difference.mean() < 1e-4


def test_decode_clip_is_decode_audio_plus_decode_frames(media):
  path = media['numbered_12.5fps.mp4']
  clip = decode.decode_clip(path)
  waveform, source_rate = decode.decode_audio(path)
  frames, indices, fps, frame_count = decode.decode_frames(path)
  np.testing.assert_array_equal(clip.waveform, waveform)
  np.testing.assert_array_equal(clip.frames, frames)
  np.testing.assert_array_equal(clip.frame_indices, indices)
  assert clip.frame_indices.dtype == np.int32
  assert (clip.source_sample_rate, clip.fps, clip.frame_count) == (source_rate, fps, frame_count)
  assert clip.duration_s == pytest.approx(10.0, abs=0.05)


def _native_threads():
  return len(os.listdir('/proc/self/task'))


@contextlib.contextmanager
def _collector_off():
  """Python's cyclic garbage collector off for the block (what it would free stays alive)."""
  was_enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if was_enabled:
      gc.enable()


@pytest.mark.skipif(not os.path.isdir('/proc/self/task'), reason='counts threads in /proc')
def test_decoding_leaves_no_threads_behind():
  # Each frame's colour conversion started a swscale pool of a thread per core that lived
  # until the garbage collector ran (20 threads per clip on 2 cores).
  decode.decode_clip(SMALL_SAMPLE)  # Codec and library set-up outside the count.
  with _collector_off():
    before = _native_threads()
    for _ in range(2):
      decode.decode_clip(SMALL_SAMPLE)
    after = _native_threads()
  assert after <= before


def _av_objects_in_cyclic_garbage(function) -> list[str]:
  """PyAV objects that only the cyclic garbage collector would free after `function`.

  Leaves out filter graphs (av.filter): since PyAV 18.1.1 a graph and its filters are a cycle by
  design (PyAV #2380), the audio resampler's among them; what that cycle holds is measured by
  test_the_resamplers_graph_holds_little_until_collected.
  """
  function()  # Codec and library set-up outside the count.
  with _collector_off():
    gc.collect()
    debug_flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
      function()
      gc.collect()
      modules = [type(o).__module__ for o in gc.garbage]
      return [f'{module}.{type(o).__qualname__}' for module, o in zip(modules, gc.garbage)
              if module.startswith('av.') and not module.startswith('av.filter.')]
    finally:
      gc.set_debug(debug_flags)
      gc.garbage.clear()


def test_decoded_frames_are_freed_without_the_garbage_collector(rotated_clips):
  # Reading a frame's display matrix through `frame.side_data` made a frame <-> container cycle,
  # which held every wanted frame's picture until a full collection (rare with TensorFlow's heap:
  # a process decoding a 720p clip grew by about 1 MB per clip).
  assert _av_objects_in_cyclic_garbage(lambda: decode.decode_clip(SMALL_SAMPLE)) == []
  assert _av_objects_in_cyclic_garbage(lambda: decode.decode_frames(rotated_clips[90])) == []


def _resident_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


@pytest.mark.skipif(not os.path.exists('/proc/self/statm'), reason='reads /proc/self/statm')
def test_the_resamplers_graph_holds_little_until_collected():
  # With PyAV 18.1.1 the resampler's graph outlives the clip until a collection; fed the clip as
  # one frame it kept ~9 MB of buffers per 10 s at 44.1 kHz, in 8192-sample frames ~16 KB.
  clips = 10
  decode.decode_audio(SMALL_SAMPLE)
  with _collector_off():
    gc.collect()
    before = _resident_bytes()
    for _ in range(clips):
      decode.decode_audio(SMALL_SAMPLE)
    grown = _resident_bytes() - before
    gc.collect()
  assert grown / clips < 2**20


@pytest.mark.parametrize('name', ['b_frames.mp4', 'numbered_12.5fps.mp4'])
def test_one_decoder_thread_gives_the_same_clip(media, monkeypatch, name):
  default = decode.decode_frames(media[name])
  seen = []
  convert = decode._FrameSink._convert

  def spy(self, frame):
    seen.append(self.stream.codec_context.thread_count)
    return convert(self, frame)

  monkeypatch.setattr(decode._FrameSink, '_convert', spy)
  single = decode.decode_frames(media[name], decoder_threads=1)
  assert seen and set(seen) == {1}
  for ours, theirs in zip(single, default):
    np.testing.assert_array_equal(ours, theirs)
  with pytest.raises(ValueError, match='decoder_threads must be >= 0'):
    decode.decode_frames(media[name], decoder_threads=-1)


def test_records_are_decoded_with_one_decoder_thread(media, monkeypatch):
  # The preprocessing and TFDS workers run a process per core: FFmpeg's threads only cost CPU.
  from cav_mae_jax.data import clips, sources  # pylint: disable=g-import-not-at-top

  threads = []
  set_threads = decode._set_decoder_threads
  monkeypatch.setattr(decode, '_set_decoder_threads',
                      lambda stream, n: (threads.append(n), set_threads(stream, n)))
  labels = sources.ClassLabels(('/m/a',), ('A',), 'labels.csv')
  clips.clip_example(sources.ClipEntry('v', media['numbered_12.5fps.mp4'], ('/m/a',)), labels)
  assert threads == [clips.DECODER_THREADS] == [1]


# ----------------------------------------------------------------------------------------
# Failures.


BAD_INPUTS = [
    ('missing.mp4', 'missing_file', 'decode_clip'),
    ('empty.mp4', 'empty_file', 'decode_clip'),
    ('text.mp4', 'unreadable_container', 'decode_clip'),
    ('truncated.mp4', 'unreadable_container', 'decode_clip'),
    ('truncated_audio_data.mp4', 'audio_decode_error', 'decode_audio'),
    ('truncated_audio_data.mkv', 'audio_decode_error', 'decode_audio'),
    ('truncated_av_data.mp4', 'audio_decode_error', 'decode_clip'),
    ('truncated_av_data.mp4', 'too_few_frames', 'decode_frames'),
    ('audio_only.mp4', 'no_video_stream', 'decode_clip'),
    ('audio_only.mp4', 'no_video_stream', 'decode_frames'),
    ('video_only.mp4', 'no_audio_stream', 'decode_clip'),
    ('video_only.mp4', 'no_audio_stream', 'decode_audio'),
]


@pytest.mark.parametrize('name, reason, function', BAD_INPUTS)
def test_bad_input_raises_decode_error_with_reason(media, name, reason, function):
  with pytest.raises(decode.DecodeError) as info:
    getattr(decode, function)(media[name])
  assert info.value.reason == reason
  assert info.value.path == media[name]
  assert media[name] in str(info.value) and reason in str(info.value)


def test_matroska_audio_is_checked_against_its_duration_tag(media):
  # Its track header has no duration; the DURATION tag says 6 s. The cut copy of a 10-s track
  # is an error (above); a track shorter than the video by design is not.
  with av.open(media['short_audio.mkv']) as container:
    audio = container.streams.audio[0]
    assert audio.duration is None
    declared = decode._duration_tag_s(audio)  # pylint: disable=protected-access
  assert declared == pytest.approx(6.0, abs=0.05)
  clip = decode.decode_clip(media['short_audio.mkv'])
  assert len(clip.waveform) == pytest.approx(6.0 * 16000, abs=0.05 * 16000)
  with pytest.raises(decode.DecodeError, match=r'decoded \d\.\d\d s of audio \(ending at '
                     r'\d\.\d\d s\), the stream declares its end at 10\.\d\d s'):
    decode.decode_audio(media['truncated_audio_data.mkv'])


def _write_matroska_with_audio_at(path, pieces, rate=16000):
  """10 s of numbered video with 16-bit PCM audio pieces (start_s, seconds) on the timeline."""
  with av.open(path, 'w', format='matroska') as container:
    video = container.add_stream('libx264', rate=10)
    video.width, video.height, video.pix_fmt = 96, 64, 'yuv420p'
    audio = container.add_stream('pcm_s16le', rate=rate, layout='mono')
    for number, picture in enumerate(synthetic.numbered_frames(100)):
      frame = av.VideoFrame.from_ndarray(picture, format='rgb24')
      frame.pts = number
      container.mux(video.encode(frame))
    container.mux(video.encode(None))
    for start_s, seconds in pieces:
      wave = (_sine(440.0, seconds, rate, 0.3) * 32767).astype(np.int16)
      for offset in range(0, len(wave), 1024):
        frame = av.AudioFrame.from_ndarray(wave[None, offset:offset + 1024], format='s16',
                                           layout='mono')
        frame.sample_rate, frame.time_base = rate, fractions.Fraction(1, rate)
        frame.pts = round(start_s * rate) + offset
        container.mux(audio.encode(frame))
    container.mux(audio.encode(None))


@pytest.mark.parametrize('pieces', [[(2.0, 8.0)], [(0.0, 4.0), (6.0, 4.0)]],
                         ids=['starts_late', 'skips_two_seconds'])
def test_matroska_audio_that_starts_late_or_skips_is_not_taken_for_a_cut_file(tmp_path, pieces):
  # Matroska's DURATION tag is the time the track ends (10 s here), not its length (8 s): such
  # audio was refused as 'decoded 8.00 s of audio, the stream declares 10.00 s', where the
  # original's ffmpeg writes its 8 s (gaps are not filled).
  path = str(tmp_path / 'audio.mkv')
  _write_matroska_with_audio_at(path, pieces)
  with av.open(path) as container:
    tag_s = decode._duration_tag_s(container.streams.audio[0])  # pylint: disable=protected-access
    assert tag_s == 10.0
  waveform, _ = decode.decode_audio(path)
  assert len(waveform) == 8 * 16000
  # Cut at 7 s on the timeline, after 5 of its 8 s: still refused, saying where it ends.
  data = open(path, 'rb').read()
  with av.open(path) as container:
    cut = next(p.pos for p in container.demux(container.streams.audio[0])
               if p.pts is not None and p.pts * p.time_base >= 7)
  with open(path, 'wb') as f:
    f.write(data[:cut])
  with pytest.raises(decode.DecodeError, match=r'decoded 5\.0\d s of audio \(ending at 7\.0\d s\), '
                     r'the stream declares its end at 10\.00 s'):
    decode.decode_audio(path)


def test_matroska_audio_past_the_probe_and_cut_files_with_a_late_start(tmp_path):
  # Audio that starts after FFmpeg's probe (~5 s): FFmpeg fills in the stream's duration from
  # the container's (10 s, from 0), which the check took for the track's length.
  late = str(tmp_path / 'late.mkv')
  _write_matroska_with_audio_at(late, [(5.0, 5.0)])
  assert len(decode.decode_audio(late)[0]) == 5 * 16000
  # 17 s from 3 s (the tag: ends at 20 s), cut at 12 s: what was decoded (9 s) is short of the
  # 10.255 s wanted because the file ends, not because the track does: refused (the late start
  # had made its end reach the 10.255 s cap).
  whole = str(tmp_path / 'whole.mkv')
  _write_matroska_with_audio_at(whole, [(3.0, 17.0)])
  assert len(decode.decode_audio(whole, max_seconds=10.255)[0]) == round(10.255 * 16000)
  data = open(whole, 'rb').read()
  with av.open(whole) as container:
    cut = next(p.pos for p in container.demux(container.streams.audio[0])
               if p.pts is not None and p.pts * p.time_base >= 12)
  cut_path = str(tmp_path / 'cut.mkv')
  with open(cut_path, 'wb') as f:
    f.write(data[:cut])
  with pytest.raises(decode.DecodeError, match=r'decoded 9\.\d\d s of audio \(ending at '
                     r'12\.\d\d s\), the stream declares its end at 20\.00 s'):
    decode.decode_audio(cut_path, max_seconds=10.255)


def _zero_one_packet(source, path, kind, number):
  """Copies `source` with the bytes of its `number`-th `kind` packet zeroed; returns that
  packet's time in seconds."""
  with av.open(source) as container:
    packet = [p for p in container.demux(getattr(container.streams, kind)[0]) if p.size][number]
    position, size, seconds = packet.pos, packet.size, float(packet.pts * packet.time_base)
  data = bytearray(open(source, 'rb').read())
  data[position:position + size] = bytes(size)
  with open(path, 'wb') as f:
    f.write(data)
  return seconds


@pytest.mark.parametrize('kind, number, function', [('audio', 20, 'decode_audio'),
                                                    ('audio', 20, 'decode_clip'),
                                                    ('video', 5, 'decode_frames'),
                                                    ('video', 5, 'decode_clip')])
def test_a_damaged_packet_refuses_the_clip_saying_which_and_when(media, tmp_path, kind, number,
                                                                 function):
  # The rule is strict on purpose (README: the original's ffmpeg and OpenCV skip the packet),
  # but the message was FFmpeg's: "[Errno 1094995529] Invalid data found when processing input:
  # 'avcodec_send_packet()'". It now names the stream and the packet's time.
  path = str(tmp_path / f'bad_{kind}.mp4')
  seconds = _zero_one_packet(media['numbered_12.5fps.mp4'], path, kind, number)
  with pytest.raises(decode.DecodeError) as info:
    getattr(decode, function)(path)
  assert info.value.reason == f'{kind}_decode_error'
  assert info.value.detail == (
      f'the {kind} packet at {seconds:.2f} s does not decode: Invalid data found when '
      "processing input; a clip with such a packet is not kept, where the original's ffmpeg "
      'and OpenCV skip the packet')


def _mpeg4_clip(path, cut=(), fps=25, frames=25):
  """An MPEG-4 Part 2 clip (no B-frames: packet i is frame i) whose packets of the frames in
  `cut` hold only their first half: its decoder conceals the rest and flags the frame corrupt."""
  with av.open(path, 'w') as out:
    stream = out.add_stream('mpeg4', rate=fps)
    stream.width, stream.height, stream.pix_fmt = 160, 96, 'yuv420p'

    def mux(packets):
      for packet in packets:
        data = bytes(packet)
        if round(packet.pts * packet.time_base * fps) in cut:
          data = data[:len(data) // 2]
        copy = av.Packet(data)
        copy.pts, copy.dts, copy.time_base = packet.pts, packet.dts, packet.time_base
        copy.is_keyframe, copy.stream = packet.is_keyframe, stream
        out.mux(copy)

    for picture in synthetic.numbered_frames(frames, height=96, width=160):
      mux(stream.encode(av.VideoFrame.from_ndarray(picture, format='rgb24')))
    mux(stream.encode())


@pytest.mark.parametrize('cut, seconds', [((4,), 0.16), ((2, 9), 0.08)])
def test_a_frame_decoded_corrupt_refuses_the_clip(tmp_path, cut, seconds):
  # The decoder conceals the damage and raises nothing: the clip was kept with guessed pictures
  # (frame 2 is not one the rule keeps, but frame 4 refers to it).
  path = str(tmp_path / 'cut.mp4')
  _mpeg4_clip(path, cut)
  with pytest.raises(decode.DecodeError) as info:
    decode.decode_frames(path)
  assert info.value.reason == 'video_decode_error'
  assert info.value.detail == (
      f'the video frame at {seconds:.2f} s decodes damaged (FFmpeg concealed errors in its '
      "data); a clip with such a frame is not kept, where the original's OpenCV takes the "
      'concealed picture')
  _mpeg4_clip(path)
  frames, indices, _, _ = decode.decode_frames(path)
  assert frames.shape == (10, 224, 224, 3) and indices.tolist()[:3] == [0, 1, 4]


@pytest.mark.parametrize('kind', ['video', 'audio'])
def test_a_file_cut_inside_a_packet_is_called_truncated(tmp_path, kind):
  # A faststart MP4 cut after its index: FFmpeg reads the last packet short and the decoder
  # fails on it. The message spoke of one bad packet that the original would skip.
  whole = str(tmp_path / 'whole.mp4')
  synthetic.write_mp4(whole, synthetic.numbered_frames(100), 10, _stereo(10.0), faststart=True)
  with av.open(whole) as container:
    packets = [p for p in container.demux(getattr(container.streams, kind)[0]) if p.size]
  packet = max(packets[len(packets) // 2:], key=lambda p: p.size)
  seconds = float(packet.pts * packet.time_base)
  cut = str(tmp_path / 'cut.mp4')
  with open(cut, 'wb') as f:
    f.write(open(whole, 'rb').read()[:packet.pos + packet.size // 2])
  with pytest.raises(decode.DecodeError) as info:
    decode.decode_clip(cut)
  assert info.value.reason == f'{kind}_decode_error'
  assert info.value.detail == (f'the {kind} packet at {seconds:.2f} s does not decode: the file '
                               f'ends inside it (byte {packet.pos + packet.size // 2}): a '
                               'truncated file')


def test_a_frame_that_cannot_be_converted_is_not_called_a_packet_that_does_not_decode(
    media, monkeypatch):
  # A ValueError of the RGB conversion reached the packet message ("does not decode", "the
  # original's ffmpeg would skip it"), which is the decoder's; PyAV's decoder errors are
  # ValueErrors too, so they are told apart by FFmpegError.
  def fail(self, frame):
    raise ValueError('no conversion to rgb24')

  monkeypatch.setattr(decode._FrameSink, '_convert', fail)  # pylint: disable=protected-access
  with pytest.raises(decode.DecodeError) as info:
    decode.decode_frames(media['numbered_12.5fps.mp4'])
  assert info.value.reason == 'video_decode_error'
  assert re.fullmatch(r'the video packet at \d+\.\d\d s: its frame cannot be converted: no '
                      'conversion to rgb24', info.value.detail), info.value.detail


@pytest.mark.parametrize('name', ['text.mp4', 'truncated.mp4'])
def test_unreadable_container_says_why_without_errno_or_the_path_again(media, name):
  with pytest.raises(decode.DecodeError) as info:
    decode.decode_clip(media[name])
  assert str(info.value) == (
      f'{media[name]}: unreadable_container (Invalid data found when processing input: not a '
      'media file FFmpeg can open, or one cut before its index)')


@pytest.mark.parametrize('name,text,listing', [
    ('list.mp4', 'ffconcat version 1.0\nfile {clip}\nfile {clip}\n', 'an FFmpeg concat list'),
    ('list.m3u8', '#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{clip}\n#EXT-X-ENDLIST\n',
     'an HLS playlist')])
def test_a_text_file_naming_other_media_files_is_not_a_clip(media, tmp_path, name, text,
                                                            listing):
  # FFmpeg probes files by content: a concat list named .mp4 opened as the media it names (a
  # clip under this file's id), and was refused only later with a misleading hint.
  clip = tmp_path / 'clip.mp4'
  shutil.copy(media['numbered_12.5fps.mp4'], clip)
  path = tmp_path / name
  path.write_text(text.format(clip=clip.name))
  with pytest.raises(decode.DecodeError) as info:
    decode.decode_clip(str(path))
  assert str(info.value) == (f'{path}: unreadable_container ({listing} (text naming other '
                             'files), not a media file)')
  decode.decode_clip(str(clip))  # the clip it names is one


def test_a_concat_list_naming_a_named_pipe_is_refused_before_it_is_opened(tmp_path):
  # Opening a concat list opens the first file it names: a FIFO blocked the tool for ever.
  os.mkfifo(tmp_path / 'segment.ts')
  path = tmp_path / 'list.mp4'
  path.write_text("ffconcat version 1.0\nfile 'segment.ts'\n")
  result = subprocess.run(
      [sys.executable, '-c', 'import sys; from cav_mae_jax.data import decode\n'
       'try:\n  decode.decode_clip(sys.argv[1])\nexcept decode.DecodeError as e:\n  print(e)',
       str(path)], capture_output=True, text=True, timeout=60, check=True,
      env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)) or '.'))
  assert result.stdout.strip() == (f'{path}: unreadable_container (an FFmpeg concat list (text '
                                   'naming other files), not a media file)')


def test_too_few_frames_says_when_the_frame_count_is_an_estimate(media, tmp_path):
  # Matroska stores no frame count: it is estimated (as OpenCV does) from the container's
  # duration, here that of the longer audio track. The message said "container declares 31
  # frames", a number the file does not hold.
  path = str(tmp_path / 'audio_longer.mkv')
  with av.open(path, 'w', format='matroska') as out:
    video = out.add_stream('libx264', rate=10)
    video.width, video.height, video.pix_fmt = 96, 64, 'yuv420p'
    audio = out.add_stream('aac', rate=SAMPLE_RATE, layout='stereo')
    for frame in synthetic.numbered_frames(5):
      out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
    out.mux(video.encode())
    samples = _stereo(3.0).astype(np.float32)
    for start in range(0, samples.shape[1], 1024):
      chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + 1024]),
                                         format='fltp', layout='stereo')
      chunk.sample_rate, chunk.pts = SAMPLE_RATE, start
      out.mux(audio.encode(chunk))
    out.mux(audio.encode())
  with pytest.raises(decode.DecodeError) as info:
    decode.decode_frames(path)
  assert info.value.reason == 'too_few_frames'
  assert re.fullmatch(
      r"decoded 5 frames, needed frame 5 \(frame count 3\d estimated from the container "
      r"duration 3\.\d\d s x 10\.000 fps, as the original's OpenCV does: the file stores no "
      r"frame count\)", info.value.detail), info.value.detail
  with pytest.raises(decode.DecodeError) as info:  # an MP4 declares its count
    decode.decode_frames(media['truncated_av_data.mp4'])
  assert 'container declares 100 frames at 10.000 fps' in info.value.detail, info.value.detail


def test_a_live_recording_without_a_duration_says_so_and_how_to_repair_it(tmp_path):
  # A WebM written live (a browser's MediaRecorder; the muxer's `live` option here) stores
  # neither a frame count nor a duration. The message said only "frame count 0 at 10.000 fps".
  path = str(tmp_path / 'live.webm')
  with av.open(path, 'w', format='webm', options={'live': '1'}) as out:
    video = out.add_stream('libvpx', rate=10)
    video.width, video.height, video.pix_fmt = 96, 64, 'yuv420p'
    for frame in synthetic.numbered_frames(20):
      out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
    out.mux(video.encode())
  with pytest.raises(decode.DecodeError) as info:
    decode.decode_frames(path)
  assert info.value.reason == 'too_few_frames'
  assert info.value.detail == (
      'frame count 0 at 10.000 fps: the file stores neither a frame count nor a duration (as a '
      'live recording, e.g. a WebM from a browser, leaves it); remuxing it (ffmpeg -i IN -c copy '
      'OUT) writes its duration')


def test_single_stream_files_still_decode_their_stream(media):
  waveform, _ = decode.decode_audio(media['audio_only.mp4'])
  assert abs(waveform.shape[0] - 32000) <= 1100
  frames, indices, _, _ = decode.decode_frames(media['video_only.mp4'])
  assert _numbers(frames) == indices.tolist()


def _add_cover_art(source, path):
  """Copies an MP4's streams into `path` and adds a PNG cover picture (attached_pic)."""
  cover = io.BytesIO()
  Image.new('RGB', (64, 48), (200, 30, 30)).save(cover, format='PNG')
  with av.open(source) as reader, av.open(path, 'w', format='mp4') as writer:
    copies = {stream.index: writer.add_stream_from_template(stream) for stream in reader.streams}
    picture = writer.add_stream('png')
    picture.width, picture.height, picture.pix_fmt = 64, 48, 'rgb24'
    picture.disposition = av.stream.Disposition.attached_pic
    packet = av.Packet(cover.getvalue())
    packet.stream, packet.pts, packet.dts = picture, 0, 0
    writer.mux(packet)
    for packet in reader.demux():
      if packet.dts is not None:
        packet.stream = copies[packet.stream.index]
        writer.mux(packet)


def test_cover_art_is_not_the_clips_video(media, tmp_path):
  # An .m4a/.mp3 with artwork has a one-picture 'video' stream marked attached_pic: that is not
  # a video (it used to be taken as one, at 90000 fps, and fail as too_few_frames).
  music = str(tmp_path / 'music_with_cover.mp4')
  _add_cover_art(media['audio_only.mp4'], music)
  with av.open(music) as container:
    assert [s.type for s in container.streams] == ['audio', 'video']
    assert container.streams.video[0].disposition & av.stream.Disposition.attached_pic
  for function in ('decode_clip', 'decode_frames'):
    with pytest.raises(decode.DecodeError) as info:
      getattr(decode, function)(music)
    assert info.value.reason == 'no_video_stream', str(info.value)
    assert 'cover picture' in info.value.detail
  waveform, _ = decode.decode_audio(music)  # The audio is still there.
  assert abs(waveform.shape[0] - 32000) <= 1100
  # A video with an embedded thumbnail (yt-dlp --embed-thumbnail) gives the video's frames.
  video = str(tmp_path / 'video_with_cover.mp4')
  _add_cover_art(media['one_second.mp4'], video)
  frames, indices, fps, frame_count = decode.decode_frames(video)
  assert (fps, frame_count) == (10.0, 10) and _numbers(frames) == indices.tolist()


def test_an_mp4_whose_index_is_cut_midway_is_unreadable(media, tmp_path):
  # Cut inside the moov atom, FFmpeg opens the file with no streams or an unidentified 'data'
  # one: a damaged file, not a clip without audio (it used to be no_audio_stream).
  data = open(media['numbered_12.5fps.mp4'], 'rb').read()
  moov = data.rfind(b'moov')
  for cut in (8, 200):
    path = str(tmp_path / f'moov_cut_{cut}.mp4')
    with open(path, 'wb') as f:
      f.write(data[:moov + cut])
    with av.open(path) as container:
      assert not container.streams.audio and not container.streams.video
    for function in ('decode_clip', 'decode_audio', 'decode_frames'):
      with pytest.raises(decode.DecodeError) as info:
        getattr(decode, function)(path)
      assert info.value.reason == 'unreadable_container', (cut, str(info.value))
      assert 'no audio or video stream' in info.value.detail


def _remux_to_matroska(source, path):
  """Copies a file's packets into a Matroska file."""
  with av.open(source) as reader, av.open(path, 'w', format='matroska') as writer:
    copies = {stream.index: writer.add_stream_from_template(stream) for stream in reader.streams}
    for packet in reader.demux():
      if packet.dts is not None:
        packet.stream = copies[packet.stream.index]
        writer.mux(packet)


def _remux_with_unknown_codec(source, path, codec_id, unknown_id):
  """Copies an MP4 into Matroska and renames one track's codec ID to one FFmpeg does not know."""
  _remux_to_matroska(source, path)
  data = open(path, 'rb').read()
  assert data.count(codec_id) == 1 and len(codec_id) == len(unknown_id)
  with open(path, 'wb') as f:
    f.write(data.replace(codec_id, unknown_id))


@pytest.mark.parametrize('kind, codec_id, reason, function', [
    ('audio', b'A_AAC', 'audio_decode_error', 'decode_audio'),
    ('audio', b'A_AAC', 'audio_decode_error', 'decode_clip'),
    ('video', b'V_MPEG4/ISO/AVC', 'video_decode_error', 'decode_frames'),
    ('video', b'V_MPEG4/ISO/AVC', 'video_decode_error', 'decode_clip'),
])
def test_a_stream_without_a_decoder_is_a_decode_error(media, tmp_path, kind, codec_id, reason,
                                                      function):
  # A codec this FFmpeg build does not know (or a damaged header naming none) leaves PyAV's
  # stream without a codec context; that used to escape as an AttributeError, which failed the
  # whole shard in tools/preprocess.py instead of quarantining the clip (found by fuzzing).
  path = str(tmp_path / f'unknown_{kind}_codec.mkv')
  _remux_with_unknown_codec(media['numbered_12.5fps.mp4'], path, codec_id,
                            codec_id[:2] + b'Z' * (len(codec_id) - 2))
  with av.open(path) as container:
    assert getattr(container.streams, kind)[0].codec_context is None
  with pytest.raises(decode.DecodeError) as info:
    getattr(decode, function)(path)
  assert info.value.reason == reason, str(info.value)
  assert f'no decoder for {kind} stream' in info.value.detail


def _damaged_copies(data, seed, count):
  """`count` damaged copies of a file's bytes: cut short, bits flipped, header bytes replaced."""
  rng = np.random.default_rng(seed)
  copies = []
  for i in range(count):
    damaged = bytearray(data)
    kind = i % 3
    if kind == 0:
      damaged = damaged[:int(rng.integers(1, len(data)))]
    elif kind == 1:
      for position in rng.integers(0, len(data), size=int(rng.choice([1, 10, 100]))):
        damaged[position] ^= 1 << int(rng.integers(8))
    else:  # the container's headers and indexes live near the start and the end
      span = max(64, len(data) // 20)
      for position in rng.integers(0, span, size=int(rng.choice([1, 5, 20]))):
        damaged[int(position) if rng.random() < 0.5 else len(data) - 1 - int(position)] = int(
            rng.integers(256))
    copies.append(bytes(damaged))
  return copies


@pytest.mark.parametrize('container', ['mp4', 'matroska'])
def test_damaged_files_decode_or_raise_decode_error(media, tmp_path, container):
  # The contract the batch tools rely on: bad input is a DecodeError with a reason code, never
  # another exception (which fails a whole shard) and never a hang. Found by fuzzing 2,800
  # damaged copies of seven formats: streams without a decoder escaped as AttributeError.
  source = media['numbered_12.5fps.mp4']
  if container == 'matroska':
    source = str(tmp_path / 'clip.mkv')
    _remux_to_matroska(media['numbered_12.5fps.mp4'], source)
  outcomes = collections.Counter()
  for i, data in enumerate(_damaged_copies(open(source, 'rb').read(), seed=0, count=45)):
    path = str(tmp_path / f'damaged_{i}.{container}')
    with open(path, 'wb') as f:
      f.write(data)
    try:
      clip = decode.decode_clip(path, max_seconds=decode.ORIGINAL_AUDIO_SECONDS)
      assert clip.frames.shape == (10, 224, 224, 3) and clip.waveform.dtype == np.int16
      outcomes['decoded'] += 1
    except decode.DecodeError as e:
      assert e.reason in decode.REASONS and e.path == path
      outcomes[e.reason] += 1
  assert outcomes['decoded'] and len(outcomes) > 2, outcomes  # the damage is varied


def test_a_relative_name_with_a_colon_is_the_file_of_that_name(media, tmp_path, monkeypatch):
  # FFmpeg reads 'clip:1.mp4' as protocol 'clip' (refused) and 'file:x.mp4' as file x.mp4.
  monkeypatch.chdir(tmp_path)
  shutil.copy(media['numbered_12.5fps.mp4'], 'clip:1.mp4')
  shutil.copy(media['numbered_12.5fps.mp4'], 'file:x.mp4')
  shutil.copy(media['silent.mp4'], 'x.mp4')
  expected = decode.decode_clip(media['numbered_12.5fps.mp4'])
  for name in ('clip:1.mp4', 'file:x.mp4'):
    clip = decode.decode_clip(name)
    np.testing.assert_array_equal(clip.frames, expected.frames)
    np.testing.assert_array_equal(clip.waveform, expected.waveform)


def test_a_directory_is_named_as_one(tmp_path):
  folder = tmp_path / 'clip.mp4'
  folder.mkdir()
  with pytest.raises(decode.DecodeError) as info:
    decode.decode_clip(folder)
  assert (info.value.reason, info.value.detail) == ('missing_file', 'a directory, not a file')


def test_a_path_that_is_no_regular_file_is_named_for_what_it_is(tmp_path):
  # A named pipe, a device, a broken or looping link: each was "missing file" (os.path.isfile
  # is False), a misleading message for a path that is there.
  os.mkfifo(tmp_path / 'pipe.mp4')
  os.symlink(tmp_path / 'gone.mp4', tmp_path / 'broken.mp4')
  os.symlink(tmp_path / 'loop_b.mp4', tmp_path / 'loop_a.mp4')
  os.symlink(tmp_path / 'loop_a.mp4', tmp_path / 'loop_b.mp4')
  details = {}
  for path in [tmp_path / name for name in ('pipe.mp4', 'broken.mp4', 'loop_a.mp4',
                                            'absent.mp4')] + ['/dev/null']:
    with pytest.raises(decode.DecodeError) as info:
      decode.decode_clip(path)
    assert info.value.reason == 'missing_file'
    details[os.path.basename(path)] = info.value.detail
  assert details == {
      'pipe.mp4': 'a named pipe (FIFO), not a regular file',
      'broken.mp4': f"a broken symbolic link (to {tmp_path / 'gone.mp4'})",
      'loop_a.mp4': 'Too many levels of symbolic links',
      'absent.mp4': '',
      'null': 'a character device, not a regular file'}


def test_audio_shorter_than_one_fbank_window_is_an_error(tmp_path):
  short = str(tmp_path / 'short.mp4')
  synthetic.write_mp4(short, synthetic.numbered_frames(3), 10, _stereo(0.01))
  with pytest.raises(decode.DecodeError) as info:
    decode.decode_audio(short)
  assert info.value.reason == 'audio_too_short'


def test_decode_error_survives_pickling_and_rejects_unknown_reasons():
  error = decode.DecodeError('/x/y.mp4', 'too_few_frames', 'decoded 3 frames')
  copy = pickle.loads(pickle.dumps(error))
  assert (copy.path, copy.reason, copy.detail) == ('/x/y.mp4', 'too_few_frames',
                                                   'decoded 3 frames')
  assert str(copy) == '/x/y.mp4: too_few_frames (decoded 3 frames)'
  with pytest.raises(ValueError, match='unknown decode failure reason'):
    decode.DecodeError('/x/y.mp4', 'something_else')
  for reason in decode.REASONS:
    assert reason in decode.__doc__


def test_numpy_modules_do_not_import_tensorflow():
  code = ('import sys; from cav_mae_jax.data import decode, fbank, synthetic; '
          'assert "tensorflow" not in sys.modules, "tensorflow imported"')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, '-c', code], check=True, cwd=root)


# ----------------------------------------------------------------------------------------
# Files on other file systems (read through tf.io.gfile).


def _to_ram(local_path, name):
  """A copy of a local file on TensorFlow's in-memory file system (none if it is missing)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  remote = f'ram://test_decode/{name}'
  if tf.io.gfile.exists(remote):
    tf.io.gfile.remove(remote)  # ram:// appends to an existing file instead of replacing it.
  if os.path.exists(local_path):
    tf.io.gfile.copy(local_path, remote)
  return remote


def test_remote_files_keep_the_reason_codes(media):
  for name, reason, function in BAD_INPUTS:
    remote = _to_ram(media[name], name)
    with pytest.raises(decode.DecodeError) as info:
      getattr(decode, function)(remote)
    assert (info.value.reason, info.value.path) == (reason, remote), (name, str(info.value))


def test_remote_clip_decodes_as_the_local_file(media):
  for name in ('numbered_12.5fps.mp4', 'vfr.mp4'):
    local, remote = decode.decode_clip(media[name]), decode.decode_clip(_to_ram(media[name], name))
    for field in dataclasses.fields(local):
      np.testing.assert_array_equal(getattr(remote, field.name), getattr(local, field.name),
                                    err_msg=f'{name} {field.name}')


def test_a_remote_read_failing_midway_is_unreadable_container(media, monkeypatch):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  remote = _to_ram(media['numbered_12.5fps.mp4'], 'fails_midway.mp4')
  reads = []

  class FailingGFile(tf.io.gfile.GFile):
    def read(self, n=-1):
      reads.append(n)
      if len(reads) > 3:
        raise tf.errors.UnavailableError(None, None, 'connection reset by peer')
      return super().read(n)

  monkeypatch.setattr(tf.io.gfile, 'GFile', FailingGFile)
  with pytest.raises(decode.DecodeError) as info:
    decode.decode_clip(remote)
  assert info.value.reason == 'unreadable_container' and len(reads) > 3
  assert 'reading failed: connection reset by peer' in info.value.detail


def test_benchmark_preprocess_tool_missing_source_prints_one_error_line(tmp_path):
  from test_prepare import assert_one_error_line, run_tool  # pylint: disable=g-import-not-at-top
  missing = str(tmp_path / 'missing.mp4')
  result = run_tool('benchmark_preprocess', '--source', missing)
  assert_one_error_line(result.returncode, result.stderr, '--source', missing, 'no such file')


def _run_benchmark_preprocess_before_tensorflow(tmp_path, *args):
  """tools/benchmark_preprocess.py with a `tensorflow` on PYTHONPATH that ends the process:
  the timed path imports TensorFlow first, so a one-line error proves the input was refused
  before anything was measured."""
  from test_prepare import REPO  # pylint: disable=g-import-not-at-top
  tripwire = tmp_path / 'tripwire' / 'tensorflow'
  tripwire.mkdir(parents=True)
  (tripwire / '__init__.py').write_text("raise SystemExit('tensorflow was imported')\n")
  env = {k: v for k, v in os.environ.items()
         if k not in ('TF_CPP_MIN_LOG_LEVEL', 'TF_ENABLE_ONEDNN_OPTS')}
  env['PYTHONPATH'] = os.pathsep.join([str(tripwire.parent), REPO])
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'tools', 'benchmark_preprocess.py'), '--clips', '1',
       *args], capture_output=True, text=True, env=env, timeout=120, check=False)


def test_benchmark_preprocess_tool_refuses_an_empty_source(tmp_path):
  # It meant "synthetic clips" (as no --source), measured silently.
  result = _run_benchmark_preprocess_before_tensorflow(tmp_path, '--source=')
  assert result.returncode == 2 and not result.stdout
  assert result.stderr == 'error: argument --source: must not be empty (a path)\n'


def test_benchmark_preprocess_tool_refuses_a_source_it_cannot_decode(tmp_path):
  """One line with the file and decode's reason code, as preprocessing quarantines it."""
  from test_prepare import assert_one_error_line  # pylint: disable=g-import-not-at-top
  text = tmp_path / 'text.mp4'
  text.write_text('hello\n')
  result = _run_benchmark_preprocess_before_tensorflow(tmp_path, '--source', str(text))
  assert_one_error_line(result.returncode, result.stderr, f'--source {text}: cannot be decoded: '
                        'unreadable_container (')
  assert not result.stdout


@pytest.mark.parametrize('interpreter, why', [
    ('missing', 'no such file'),
    ('not_executable', 'not executable'),
    ('no_site', "cannot import cv2, numpy, soundfile, torch, torchaudio, torchvision, PIL (the "
                "original's steps need"),
    ('not_python', 'is not a Python interpreter that runs (exit status 3: boom)'),
])
def test_benchmark_preprocess_tool_checks_the_original_python_first(tmp_path, interpreter, why):
  """A missing, non-executable or unfit --original-python is one line before any measurement."""
  from test_prepare import assert_one_error_line  # pylint: disable=g-import-not-at-top
  path = tmp_path / interpreter
  if interpreter == 'not_executable':
    path.write_text('')
  elif interpreter == 'no_site':  # this Python without its site-packages: none of the modules
    path.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    path.chmod(0o755)
  elif interpreter == 'not_python':
    path.write_text('#!/bin/sh\necho boom >&2; exit 3\n')
    path.chmod(0o755)
  result = _run_benchmark_preprocess_before_tensorflow(tmp_path, '--original-python', str(path))
  assert_one_error_line(result.returncode, result.stderr, f'--original-python {path}: {why}')
  assert not result.stdout


def test_benchmark_preprocess_tool_reports_a_failing_original_run_in_one_line(tmp_path):
  """The original's steps failing in their interpreter: one line with its last stderr line."""
  from test_prepare import REPO  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'benchmark_preprocess', os.path.join(REPO, 'tools', 'benchmark_preprocess.py'))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  python = tmp_path / 'python'
  python.write_text('#!/bin/sh\necho Traceback >&2; echo "ModuleNotFoundError: no cv2" >&2; '
                    'exit 1\n')
  python.chmod(0o755)
  with pytest.raises(RuntimeError) as info:
    tool.measure_original(str(python), 0, str(tmp_path))
  assert str(info.value) == (f"--original-python {python}: the original's steps failed (exit "
                             "status 1): ModuleNotFoundError: no cv2")


def test_benchmark_preprocess_tool_times_our_path_and_its_stages():
  # Without --original-python only our side runs; --stages adds the per-stage profile. Quietly:
  # no TensorFlow start-up lines on stderr (run_tool leaves TensorFlow's logging at its default).
  from test_prepare import run_tool  # pylint: disable=g-import-not-at-top
  result = run_tool('benchmark_preprocess', '--clips', '1', '--stages')
  assert result.returncode == 0, result.stderr[-2000:]
  assert not result.stderr, result.stderr
  lines = result.stdout.splitlines()
  assert 'original: not measured' in lines[0]
  ours = next(line for line in lines if line.startswith('ours'))
  assert float(ours.split()[1]) > 0  # clips per CPU-second
  stages = {line.rsplit(None, 1)[0].strip(): float(line.rsplit(None, 1)[1])
            for line in lines[lines.index('our stages on one clip, best of 5, CPU ms:') + 1:]}
  assert set(stages) == {'decode_clip (all of decoding)', 'video: decode_frames',
                         'the video decoder alone', 'audio: decode_audio', 'fbank + pad',
                         '10 x JPEG'}
  assert all(ms > 0 for ms in stages.values())
  assert stages['the video decoder alone'] <= stages['video: decode_frames'] * 1.5


def test_benchmark_preprocess_tool_transcodes_with_the_gop_asked_for(tmp_path):
  from test_prepare import assert_one_error_line, run_tool  # pylint: disable=g-import-not-at-top
  result = run_tool('benchmark_preprocess', '--source', SMALL_SAMPLE, '--gop', '25',
                    '--clips', '1')
  assert result.returncode == 0, result.stderr[-2000:]
  assert ', an IDR picture every 25 frames, source: ' in result.stdout
  clip = str(tmp_path / 'clip.mp4')
  preprocess_benchmark.transcode_360p(SMALL_SAMPLE, clip, gop=25)
  with av.open(clip) as container:  # 125 frames at 12.5 fps: IDR pictures at 0, 25, ..., 100
    keyframes = [p.pts for p in container.demux(video=0) if p.size and p.is_keyframe]
  assert len(keyframes) == 5
  result = run_tool('benchmark_preprocess', '--gop', '25')
  assert_one_error_line(result.returncode, result.stderr, '--gop 25', 'needs --source')
  result = run_tool('benchmark_preprocess', '--source', SMALL_SAMPLE, '--gop', '0')
  assert_one_error_line(result.returncode, result.stderr, '--gop 0', 'must be >= 1')


def test_benchmark_preprocess_tool_transcodes_to_vp9(tmp_path):
  from test_prepare import assert_one_error_line, run_tool  # pylint: disable=g-import-not-at-top
  result = run_tool('benchmark_preprocess', '--source', SMALL_SAMPLE, '--codec', 'vp9',
                    '--gop', '25', '--clips', '1')
  assert result.returncode == 0, result.stderr[-2000:]
  assert ', VP9 + Opus (WebM), a keyframe every 25 frames, source: ' in result.stdout
  clip = str(tmp_path / 'clip.webm')  # 2 s at 12.5 fps: key frames at 0, 5, ..., 20
  preprocess_benchmark.transcode_360p(SMALL_SAMPLE, clip, seconds=2.0, gop=5, codec='vp9')
  with av.open(clip) as container:
    assert container.format.name.startswith('matroska')
    codecs = [s.codec_context.name for s in container.streams]
    keyframes = [p.pts for p in container.demux(video=0) if p.size and p.is_keyframe]
  assert sorted(codecs) == ['opus', 'vp9'] and len(keyframes) == 5
  assert decode.decode_clip(clip).frames.shape == (10, 224, 224, 3)
  result = run_tool('benchmark_preprocess', '--codec', 'vp9')
  assert_one_error_line(result.returncode, result.stderr, '--codec vp9', 'needs --source')
  result = run_tool('benchmark_preprocess', '--source', SMALL_SAMPLE, '--codec', 'h265')
  assert_one_error_line(result.returncode, result.stderr, "argument --codec: invalid choice")


def test_of_several_video_streams_the_first_is_decoded_as_opencv_reads_it(media, tmp_path):
  """OpenCV, the original's frame reader, reads the first video stream; FFmpeg's best-stream
  ranking (taken before) prefers a default or larger one: another stream's pictures were stored
  without a word."""
  path = str(tmp_path / 'two_video.mkv')
  with av.open(media['one_second.mp4']) as reader, av.open(path, 'w', format='matroska') as writer:
    copies = {stream.index: writer.add_stream_from_template(stream) for stream in reader.streams}
    second = writer.add_stream('libx264', rate=10)  # larger, and the default
    second.width, second.height, second.pix_fmt = 192, 128, 'yuv420p'
    for stream in copies.values():
      stream.disposition = 0
    second.disposition = av.stream.Disposition.default
    for picture in np.full((10, 128, 192, 3), 200, np.uint8):
      for packet in second.encode(av.VideoFrame.from_ndarray(picture, format='rgb24')):
        writer.mux(packet)
    writer.mux(second.encode(None))
    for packet in reader.demux():
      if packet.dts is not None:
        packet.stream = copies[packet.stream.index]
        writer.mux(packet)
  with av.open(path) as container:
    video = [s for s in container.streams if s.type == 'video']
    assert len(video) == 2 and container.streams.best('video') is not video[0]
  frames, indices, fps, frame_count = decode.decode_frames(path)
  assert (fps, frame_count) == (10.0, 10) and _numbers(frames) == indices.tolist()
  # A still picture as the first video track (not marked as a cover): too few frames, saying
  # which stream was read and why.
  still = str(tmp_path / 'still_first.mkv')
  with av.open(media['one_second.mp4']) as reader, av.open(still, 'w', format='matroska') as writer:
    picture = writer.add_stream('libx264', rate=10)
    picture.width, picture.height, picture.pix_fmt = 96, 64, 'yuv420p'
    copies = {stream.index: writer.add_stream_from_template(stream) for stream in reader.streams}
    writer.mux(picture.encode(av.VideoFrame.from_ndarray(np.zeros((64, 96, 3), np.uint8),
                                                         format='rgb24')))
    writer.mux(picture.encode(None))
    for packet in reader.demux():
      if packet.dts is not None:
        packet.stream = copies[packet.stream.index]
        writer.mux(packet)
  with pytest.raises(decode.DecodeError, match=r"decoded 1 frames, needed frame \d+ \(.*; of "
                     r"video stream 0, the first of 2, which the original's OpenCV reads\)"):
    decode.decode_frames(still)


def test_of_several_audio_streams_the_ffmpeg_command_lines_is_decoded(tmp_path):
  """None default: the one with the most channels, as `ffmpeg -i F -vn -ar 16000` takes it
  (FFmpeg's best-stream ranking would take the first, mono one here)."""
  path = str(tmp_path / "two_audio.mkv")
  rate, seconds = 16000, 2
  t = np.arange(rate * seconds) / rate
  with av.open(path, "w", format="matroska") as container:
    streams = [container.add_stream("aac", rate=rate, layout=layout)
               for layout in ("mono", "stereo")]
    for stream, freq in zip(streams, (440, 1000)):
      stream.disposition = 0
      wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
      frame = av.AudioFrame.from_ndarray(np.tile(wave, (stream.layout.nb_channels, 1)),
                                         format="fltp", layout=stream.layout.name)
      frame.sample_rate = rate
      for packet in [*stream.encode(frame), *stream.encode(None)]:
        container.mux(packet)
  with av.open(path) as container:
    assert [int(s.disposition) for s in container.streams.audio] == [0, 0]
    assert container.streams.best("audio").index == 0
  audio = decode.decode_audio(path)[0].astype(np.float32)
  spectrum = np.abs(np.fft.rfft(audio[rate // 4:rate // 4 + rate]))
  assert abs(int(np.argmax(spectrum)) - 1000) <= 2  # 1 Hz bins: the stereo stream's tone


def test_an_extracted_frame_is_checked_with_the_input_pipelines_jpeg_decoder(tmp_path):
  # PIL reads past some damage that TensorFlow's decoder (the one training uses) refuses; the
  # record of such a frame stopped training later, naming no file. Damaged copies (20 flipped
  # bits each) of a quality-75 frame: each is refused as a bad_frame or TensorFlow decodes it.
  tf = pytest.importorskip('tensorflow')
  rng = np.random.default_rng(0)
  picture = (np.indices((224, 224)).sum(0)[..., None] * np.array([1, 2, 3]) % 256
             + rng.integers(0, 40, (224, 224, 3))).clip(0, 255).astype(np.uint8)
  good = decode.encode_jpeg(picture)
  path = tmp_path / 'frame.jpg'
  by_tensorflow = []
  for _ in range(300):
    damaged = bytearray(good)
    for position in rng.integers(0, len(good), 20):
      damaged[position] ^= 1 << int(rng.integers(0, 8))
    path.write_bytes(bytes(damaged))
    try:
      kept = decode.read_extracted_frame(str(path))
    except decode.DecodeError as e:
      assert e.reason == 'bad_frame' and str(path) in e.detail, e
      if "JPEG decoder (TensorFlow) rejects it" in e.detail:
        by_tensorflow.append(e.detail)
      continue
    assert kept == bytes(damaged)  # stored as it is, and the input pipeline can decode it
    assert tf.io.decode_jpeg(kept, channels=3, dct_method='INTEGER_ACCURATE').shape == (224, 224, 3)
  assert by_tensorflow, 'no damaged copy that only TensorFlow refuses: the test checks nothing'
  assert 'Invalid JPEG data' in by_tensorflow[0]


def test_an_extracted_frame_that_is_a_named_pipe_is_refused_not_waited_for(tmp_path):
  # open() + read() of a FIFO blocks until a writer comes: a frame folder holding one (or
  # /dev/zero linked in) hung the preprocessing worker.
  os.mkfifo(tmp_path / 'frame_5.jpg')
  for path, kind in ((tmp_path / 'frame_5.jpg', 'a named pipe (FIFO)'),
                     ('/dev/zero', 'a character device')):
    with pytest.raises(decode.DecodeError) as info:
      decode.read_extracted_frame(str(path))
    assert info.value.reason == 'bad_frame'
    assert info.value.detail == f'{path} is {kind}, not a file'


def test_an_audio_file_says_it_has_no_video_for_the_records_frames(media):
  # An audio-only list (.wav, .m4a) given to preprocessing: "no video stream" alone did not say
  # that every record holds frames, whatever model reads it.
  with pytest.raises(decode.DecodeError) as info:
    decode.decode_clip(media['audio_only.mp4'])
  assert info.value.reason == 'no_video_stream'
  assert info.value.detail.startswith("an audio-only file: a record holds frames of the clip's")
