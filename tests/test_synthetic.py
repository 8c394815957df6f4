"""The synthetic audio-visual dataset: real MP4s, original datafile format, learnable classes."""

import colorsys
import csv
import errno
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import av
import numpy as np
import pytest

from cav_mae_jax.data import decode
from cav_mae_jax.data import fbank
from cav_mae_jax.data import synthetic
import limits

NUM_CLASSES = 4
CLIPS_PER_CLASS = 3


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp('synthetic')
  return synthetic.generate_dataset(root, NUM_CLASSES * CLIPS_PER_CLASS,
                                    num_classes=NUM_CLASSES, seed=3, duration_s=3.0, fps=10,
                                    width=96, height=64)


def _entries(dataset):
  with open(dataset['datafile']) as f:
    return json.load(f)['data']


def test_files_follow_the_original_datafile_and_label_formats(dataset):
  entries = _entries(dataset)
  assert len(entries) == NUM_CLASSES * CLIPS_PER_CLASS
  for entry in entries:
    assert set(entry) == {'video_id', 'wav', 'video_path', 'labels'}
    assert entry['video_path'] == entry['wav'] and os.path.isfile(entry['video_path'])
    assert entry['video_id'] == os.path.splitext(os.path.basename(entry['video_path']))[0]
  labels = [entry['labels'] for entry in entries]
  assert sorted(set(labels)) == [f'/m/syn{c:02d}' for c in range(NUM_CLASSES)]
  assert all(labels.count(label) == CLIPS_PER_CLASS for label in set(labels))  # Balanced.
  with open(dataset['labels_csv'], newline='') as f:
    rows = list(csv.reader(f))
  assert rows[0] == ['index', 'mid', 'display_name']
  assert [row[:2] for row in rows[1:]] == [[str(c), f'/m/syn{c:02d}'] for c in range(NUM_CLASSES)]
  assert rows[1][2] == 'circle / sine 160 Hz'


def test_clips_are_h264_and_aac_stereo_44k(dataset):
  path = _entries(dataset)[0]['video_path']
  with av.open(path) as container:
    video, audio = container.streams.video[0], container.streams.audio[0]
    assert video.codec_context.name == 'h264' and (video.width, video.height) == (96, 64)
    assert audio.codec_context.name == 'aac' and audio.rate == 44100
    assert audio.layout.name == 'stereo'
  clip = decode.decode_clip(path)
  assert clip.fps == 10.0 and clip.frame_count == 30 and clip.source_sample_rate == 44100
  assert abs(clip.waveform.shape[0] - 48000) <= 1100


def test_generation_is_deterministic_and_seeded(tmp_path):
  def digest(directory, seed):
    result = synthetic.generate_dataset(directory, 2, num_classes=2, seed=seed, duration_s=1.0,
                                        width=64, height=48)
    names = sorted(os.listdir(result['video_dir']))
    return [hashlib.sha256(open(os.path.join(result['video_dir'], n), 'rb').read()).hexdigest()
            for n in names]
  first = digest(tmp_path / 'a', 7)
  assert first == digest(tmp_path / 'b', 7)
  assert first != digest(tmp_path / 'c', 8)


def _audio_features(path):
  """Spectral shape during the notes (90th percentile over time, loudness removed)."""
  waveform, _ = decode.decode_audio(path)
  loud = np.percentile(fbank.clip_fbank(waveform), 90, axis=0)
  return loud - loud.mean()


def _object_hue(path):
  """Mean hue (as a point on the colour circle) of the strongly saturated pixels: the object."""
  with av.open(path) as container:  # Whole frames: the object may leave the center crop.
    frames = [frame.to_ndarray(format='rgb24') for frame in container.decode(video=0)]
  pixels = np.stack(frames[::3]).reshape(-1, 3).astype(np.float64) / 255
  saturated = pixels[(pixels.max(axis=1) - pixels.min(axis=1)) > 0.5]
  hues = np.array([colorsys.rgb_to_hsv(*p)[0] for p in saturated[::5]])
  return np.array([np.cos(2 * np.pi * hues).mean(), np.sin(2 * np.pi * hues).mean()])


def _nearest_neighbour_accuracy(features, labels):
  distances = np.linalg.norm(features[:, None] - features[None], axis=-1)
  np.fill_diagonal(distances, np.inf)
  return float(np.mean(labels[distances.argmin(axis=1)] == labels))


def test_sound_and_picture_both_identify_the_class_but_clips_differ(dataset):
  entries = _entries(dataset)
  labels = np.array([entry['labels'] for entry in entries])
  audio = np.stack([_audio_features(entry['video_path']) for entry in entries])
  video = np.stack([_object_hue(entry['video_path']) for entry in entries])
  # Crude features already name the class far above chance (about 0.2 here); a model must
  # still see through loudness, noise, distractors and motion.
  audio_accuracy = _nearest_neighbour_accuracy(audio, labels)
  video_accuracy = _nearest_neighbour_accuracy(video, labels)
  assert audio_accuracy >= 0.75 and video_accuracy >= 0.75, (audio_accuracy, video_accuracy)
  # Per-clip randomness: no two clips of a class are the same sound or the same picture.
  same_class = labels[:, None] == labels[None]
  np.fill_diagonal(same_class, False)
  audio_distance = np.linalg.norm(audio[:, None] - audio[None], axis=-1)
  assert np.all(audio_distance[same_class] > 0.05)
  frames = [decode.decode_frames(entry['video_path'], 2, 64)[0] for entry in entries]
  for i, j in zip(*np.nonzero(np.triu(same_class))):
    assert not np.array_equal(frames[i], frames[j])


def test_numbered_frames_survive_h264_resize_and_crop(tmp_path):
  frames = synthetic.numbered_frames(300, height=64, width=96)
  assert [synthetic.read_frame_number(f) for f in frames[::37]] == list(range(0, 300, 37))
  path = str(tmp_path / 'numbers.mp4')
  synthetic.write_mp4(path, frames, 25)
  with av.open(path) as container:
    decoded = [f.to_ndarray(format='rgb24') for f in container.decode(video=0)]
  assert [synthetic.read_frame_number(decode.resize_and_crop(f)) for f in decoded] == list(
      range(300))
  with pytest.raises(ValueError, match='at most'):
    synthetic.numbered_frames(70000)


def test_bad_arguments_raise_value_errors(tmp_path):
  with pytest.raises(ValueError, match='needs frames, audio or both'):
    synthetic.write_mp4(tmp_path / 'x.mp4')
  with pytest.raises(ValueError, match='uint8'):
    synthetic.write_mp4(tmp_path / 'x.mp4', np.zeros((2, 16, 16, 3), np.float32))
  with pytest.raises(ValueError, match='no default layout for 3 channels'):
    synthetic.write_mp4(tmp_path / 'x.mp4', audio=np.zeros((3, 4410), np.float32))
  with pytest.raises(ValueError, match='even'):
    synthetic.generate_dataset(tmp_path, 1, width=95)
  with pytest.raises(ValueError, match='num_clips'):
    synthetic.generate_dataset(tmp_path, 0)


def test_make_synthetic_tool_writes_train_and_eval(tmp_path, capsys):
  tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools',
                      'make_synthetic.py')
  spec = importlib.util.spec_from_file_location('make_synthetic', tool)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  status = module.main(['--out', str(tmp_path), '--train', '2', '--eval', '1', '--classes', '2',
                        '--duration', '1', '--width', '64', '--height', '48', '--workers', '1'])
  assert status == 0
  train = json.load(open(tmp_path / 'train.json'))['data']
  evaluation = json.load(open(tmp_path / 'eval.json'))['data']
  assert len(train) == 2 and len(evaluation) == 1
  assert evaluation[0]['video_id'] == 'syn_eval_00000'
  assert os.path.isfile(tmp_path / 'class_labels_indices.csv')
  assert 'train: 2 clips' in capsys.readouterr().out
  assert module.main(['--out', str(tmp_path), '--width', '63']) == 2


def test_make_synthetic_tool_bad_values_print_one_error_line(tmp_path):
  from test_prepare import assert_one_error_line, run_tool  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'out')
  result = run_tool('make_synthetic', '--out', out, '--train', '0')
  assert_one_error_line(result.returncode, result.stderr, 'argument --train: 0', 'must be >= 1')
  result = run_tool('make_synthetic', '--out', out, '--eval', '-1')
  assert_one_error_line(result.returncode, result.stderr, 'argument --eval: -1', 'must be >= 0')
  assert not os.path.exists(out)


def _clips_left(video_dir):
  """The files in `video_dir`, each .mp4 checked to decode in full (a complete clip)."""
  names = sorted(os.listdir(video_dir))
  for name in names:
    if name.endswith('.mp4'):
      assert decode.decode_clip(os.path.join(video_dir, name)).frame_count > 0, name
  return names


def test_make_synthetic_tool_under_a_file_size_limit_leaves_no_truncated_clip(tmp_path):
  """A write that fails midway (a full disk, here a file-size limit smaller than a clip) left
  truncated MP4s under their final names, which tools reading the folder took for clips; the
  pool's other workers, ended midway, must not leave their temporaries either."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / 'out'
  result = subprocess.run(  # files of 8 KiB at most: Python ignores SIGXFSZ, writes get EFBIG
      limits.file_size_limited([
          sys.executable, os.path.join(repo, 'tools', 'make_synthetic.py'), '--out', str(out),
          '--train', '4', '--eval', '2', '--classes', '2', '--duration', '1', '--width', '64',
          '--height', '48', '--workers', '2'], 8),
      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=repo), timeout=120,
      check=False)
  video_dir = out / 'video' / 'train'
  # One line naming a clip (not its temporary), exit status 2.
  assert result.returncode == 2 and re.fullmatch(
      rf'error: --out {re.escape(str(video_dir))}/syn_train_0000\d\.mp4: File too large\n',
      result.stderr), result.stderr
  assert all(name.endswith('.mp4') for name in _clips_left(video_dir))
  assert not os.path.exists(out / 'train.json')


def _failing_after(write, count):
  """`write`, which after `count` calls writes a few bytes and raises ENOSPC naming no file, as
  a write to a full disk does."""
  calls = []

  def wrapped(path, *args, **kwargs):
    calls.append(path)
    if len(calls) <= count:
      return write(path, *args, **kwargs)
    with open(path, 'wb') as f:
      f.write(b'\0' * 100)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  return wrapped


def test_a_full_disk_leaves_no_partial_clip_and_names_the_clip(tmp_path, monkeypatch):
  monkeypatch.setattr(synthetic, 'write_mp4', _failing_after(synthetic.write_mp4, 1))
  with pytest.raises(OSError) as info:
    synthetic.generate_dataset(tmp_path, 3, num_classes=2, duration_s=1.0, width=32,
                               height=24)
  video_dir = tmp_path / 'video' / 'train'
  assert info.value.errno == errno.ENOSPC
  assert info.value.filename == str(video_dir / 'syn_train_00001.mp4')
  assert _clips_left(video_dir) == ['syn_train_00000.mp4']


def test_a_full_disk_leaves_no_partial_datafile_and_names_it(tmp_path, monkeypatch):
  def partial_json(data, f, **kwargs):
    del data, kwargs
    f.write('{"data": [')
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(synthetic.json, 'dump', partial_json)
  with pytest.raises(OSError) as info:
    synthetic.generate_dataset(tmp_path, 1, num_classes=2, duration_s=1.0, width=32,
                               height=24)
  assert info.value.filename == str(tmp_path / 'train.json')
  assert sorted(os.listdir(tmp_path)) == ['video']
  assert _clips_left(tmp_path / 'video' / 'train') == ['syn_train_00000.mp4']
