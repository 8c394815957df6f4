"""Decodes a video file into what CAV-MAE stores for a clip: 16 kHz audio and 10 frames.

Audio (as the original's `ffmpeg -i F -vn -ar 16000 out.wav` then `sox out.wav ... remix 1`):
the audio stream the ffmpeg command line takes (when a file has several: the one marked
default, else the one with the most channels, else the first) is decoded with PyAV and
its FIRST channel (not a downmix) is resampled by libswresample to signed 16-bit at 16 kHz.
libswresample treats channels independently, so this is bit-identical to channel 0 of ffmpeg's
multi-channel output (the ffmpeg CLI build may decode AAC ~1e-7 differently, which flips an
occasional sample by 1 LSB; for audio that decodes to 16-bit integers (PCM, A-law, fixed-point
MP2) an ffmpeg 5.1 command line resamples through 16-bit integers and differs by a few LSB: up to 4
measured on PCM, 6 on an MP2 tone).
Audio longer than `max_seconds` is cut; shorter audio is returned as it is (padding happens in
fbank space). An all-zero (silent) track is valid audio. The original keeps the whole track and
cuts the fbank to 1024 frames, which see the first `ORIGINAL_AUDIO_SECONDS` (10.255 s); pass
that as `max_seconds` to reproduce its fbank exactly for clips longer than 10 s.

Frames (as the original's `extract_video_frame.py`), from the first video stream, as OpenCV
reads it whatever the streams' dispositions say (a file of several video streams, camera angles
say, gives the first one's frames), never a cover picture (attached_pic): with `fps` and
`frame_count` as OpenCV reports them (the stream's average frame rate; the container's frame
count, else round(duration * fps)), `total = min(frame_count, int(fps * 10))` and frame i of 10
is `int(i * (total / 10))`. The original
seeks OpenCV to that index minus one, so the frame it really stores, and the one we return, is
the decoded frame number `max(int(i * (total / 10)) - 1, 0)` (0-based, in presentation order;
OpenCV's seek numbers frames by timestamp from a keyframe, so in a variable-frame-rate stream or
one with dropped frames the original's can be a few frames off these: docs/original.md).
Each frame is converted to RGB as OpenCV converts it (libswscale to BGR24 under bicubic
interpolation, then the channels swapped: pixel for pixel OpenCV's in every pixel format
tested), with the colour matrix the original's OpenCV (<= 4.12) used whatever the stream's
colour tags say (BT.601; full range only for yuvj and gray formats: a BT.709-tagged clip is
converted as BT.601, see `_opencv_colour`), turned upright by the video stream's display
matrix (below),
resized with PIL bilinear so its shorter side is 224, and center-cropped to 224 x 224
(torchvision's `Resize(224)` + `CenterCrop(224)`). Only what is needed is decoded: decoding
stops at the last needed frame and after `max_seconds` of audio, unwanted non-reference
(e.g. B-) frames are skipped, and in H.264 and HEVC the frames between the last needed frame
before an IDR picture and that picture are left out (nothing after an IDR picture refers to an
earlier one), which leaves the other frames bit-identical. The original saves
these frames as JPEG at PIL's default quality 75: `encode_jpeg` does that, so every writer uses
one encoder.

Rotation: phone footage stores the picture sideways and a display matrix saying how to turn it.
The original's OpenCV reader (auto-rotation is on by default) and the ffmpeg command line both
return the upright picture, so we do too: `rotation_from_display_matrix` gives the clockwise
rotation ffmpeg's autorotate applies (0, 90, 180 or 270; ffprobe's "rotation of -90 degrees",
the usual phone tag, is 90 clockwise), and the RGB frame is rotated by it (`np.rot90`) before
the resize and crop. That is OpenCV's order (convert,
then rotate); with 4:2:0 chroma on whole 2 x 2 blocks it equals ffmpeg's transpose-then-convert
pixel for pixel (tested against libavfilter's transpose filters). The frame numbers are
unchanged. Untagged clips take exactly the path they took before. A display matrix that
mirrors the picture or turns it by another angle is not guessed at: `unsupported_rotation`.

Files: a local path is opened by FFmpeg directly (the fast path); any other path with a scheme
(gs://, ram://, s3://, ...) is read through `tf.io.gfile` as a Python file object, so anything
TensorFlow reads can be decoded. Remote files keep the reason codes below; a read that fails
midway is `unreadable_container`. TensorFlow is imported only for such paths.

Failures never produce zeros: they raise `DecodeError(path, reason, detail)`. Reason codes
(stable; the preprocessing quarantine counts clips by them):

  missing_file          the path does not exist, or is not a regular file (a directory, a
                        device, a named pipe), or is a broken or looping symbolic link (the
                        message says which)
  empty_file            the file has zero bytes
  unreadable_container  no demuxer can open the file, or demuxing fails (text file named
                        .mp4, an MP4 truncated before its index, random bytes), or it holds
                        no audio or video stream at all (an MP4 whose index is cut midway),
                        or reading a remote file fails
  no_audio_stream       the container has no audio stream (asked for audio)
  no_video_stream       the container has no video stream (asked for frames); a cover
                        picture (attached_pic, as in .m4a/.mp3 files) is not a video stream
  audio_decode_error    the audio decoder fails (on any one packet: the message gives its
                        time; the original's ffmpeg would skip it), or decodes much less
                        audio than the stream declares (truncated data; its header's duration
                        or, in Matroska and WebM, its DURATION tag; measured on the stream's
                        timeline, so audio that starts late or skips a stretch is not cut),
                        or this FFmpeg build has no decoder for the stream's codec
  audio_too_short       fewer than 400 samples at 16 kHz (one 25 ms fbank frame)
  video_decode_error    the video decoder (on any one packet, as for audio) or the RGB
                        conversion fails, or a frame decodes flagged corrupt (damaged data
                        FFmpeg concealed), or there is no decoder for the stream's codec
  too_few_frames        the stream has no frames, or ends before a frame the rule needs
  unsupported_rotation  the display matrix mirrors the picture or turns it by an angle that
                        is not a multiple of 90 degrees
  missing_frame         (the original's extracted layout) a frame_{i}/{video_id}.jpg is missing
  bad_frame             (the original's extracted layout) a frame is not an RGB JPEG of the
                        image size, or TensorFlow's JPEG decoder (the input pipeline's)
                        rejects it

The original's extracted layout (`read_clip_media` with `frames_dir`): its preprocessing leaves a
16 kHz audio file and a folder of `frame_{i}/{video_id}.jpg` (i = 0..9), each frame already
resized, cropped and saved as JPEG at quality 75, which is what records hold. The audio file is
decoded as above and the frames' JPEG bytes are kept as they are, so the records hold exactly the
pictures the original's loader reads. A missing frame is an error: the original's loader silently
takes an earlier frame instead.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import functools
import io
import math
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import av
from av.sidedata import sidedata as av_sidedata
import numpy as np
from PIL import Image

REASONS = (
    'missing_file',
    'empty_file',
    'unreadable_container',
    'no_audio_stream',
    'no_video_stream',
    'audio_decode_error',
    'audio_too_short',
    'video_decode_error',
    'too_few_frames',
    'unsupported_rotation',
    'missing_frame',
    'bad_frame',
)
FRAME_WINDOW_SECONDS = 10  # The original spreads its frames over the first 10 s.
ORIGINAL_AUDIO_SECONDS = (1023 * 160 + 400) / 16000  # Audio in the original's 1024 fbank frames.
MIN_AUDIO_SAMPLES = 400  # One 25 ms fbank window at 16 kHz.
_RESAMPLE_MARGIN_S = 0.05  # Extra source audio decoded past max_seconds (filter reach).
# Source samples per frame fed to libswresample. Its output does not depend on how the input is
# cut (tested), and since PyAV 18.1.1 a resampler's filter graph is a reference cycle (PyAV
# #2380) that keeps its buffers until the garbage collector runs: fed the clip at once they are
# ~9 MB for 10 s at 44.1 kHz, in 8192-sample frames ~16 KB (and 3x faster).
_RESAMPLE_CHUNK = 8192
# numpy dtypes of FFmpeg's sample formats (packed and planar).
_SAMPLE_DTYPES = {'u8': np.uint8, 's16': np.int16, 's32': np.int32, 's64': np.int64,
                  'flt': np.float32, 'dbl': np.float64}
_SAMPLE_DTYPES.update({name + 'p': dtype for name, dtype in list(_SAMPLE_DTYPES.items())})
_REORDER_WINDOW = 32  # Packets held back to rank timestamps (H.264 reorders at most 16).
# NAL unit types of the pictures after which no picture refers to one before (the decoder starts
# afresh): H.264's IDR slice; HEVC's IDR_W_RADL and IDR_N_LP, whose leading pictures (RADL) refer
# only to the IDR picture and one another. Not an open GOP's I picture, nor HEVC's CRA or BLA:
# pictures after those may refer to earlier ones. And the types of the parameter sets, which a
# picture after an IDR picture may use however early they were sent: H.264's SPS, PPS, SPS
# extension and subset SPS; HEVC's VPS, SPS and PPS.
class _NalTypes(NamedTuple):
  unit_type: Callable[[int], int]  # The type in a unit's first header byte.
  fresh_start: frozenset[int]
  parameter_sets: frozenset[int]
  size_byte: int  # The avcC/hvcC byte holding the length prefix's size - 1.


_NAL_TYPES = {'h264': _NalTypes(lambda header: header & 0x1F, frozenset({5}),
                                frozenset({7, 8, 13, 15}), 4),
              'hevc': _NalTypes(lambda header: (header >> 1) & 0x3F, frozenset({19, 20}),
                                frozenset({32, 33, 34}), 21)}
# VP9's key frame refreshes all eight reference slots and resets the probability contexts,
# segmentation and loop-filter deltas: nothing after it refers to what came before (and VP9 has
# no parameter sets). Its uncompressed header begins: frame_marker (2 bits, 0b10), profile's two
# bits (and a reserved one in profile 3), show_existing_frame 0, frame_type 0 (KEY_FRAME),
# show_frame, error_resilient_mode, then this sync code.
_VP9_SYNC_CODE = 0x498342
# AV1's shown key frame likewise (all eight reference frames refreshed, contexts reset). OBU types
# (AV1 data in MP4, Matroska and WebM is a temporal unit's OBUs, each with its size): the
# sequence header, AV1's parameter set, which a key frame may use however early it was sent (it
# usually comes with the key frame); the frame header and the frame (header and tiles), whose
# header begins show_existing_frame, frame_type (KEY_FRAME 0), show_frame.
_AV1_SEQUENCE_HEADER, _AV1_FRAME_HEADER, _AV1_FRAME = 1, 3, 6
# FFmpeg's decoders of VP9 and AV1, by the names PyAV gives them.
_VP9_DECODERS = frozenset({'vp9', 'libvpx-vp9'})
_AV1_DECODERS = frozenset({'av1', 'libdav1d', 'libaom-av1'})
_AV_TIME_BASE = 1_000_000


class DecodeError(Exception):
  """A clip that cannot be decoded; `reason` is one of `REASONS`."""

  def __init__(self, path: str | os.PathLike, reason: str, detail: str = ''):
    if reason not in REASONS:
      raise ValueError(f'unknown decode failure reason {reason!r}; expected one of {REASONS}')
    self.path = os.fspath(path)
    self.reason = reason
    self.detail = detail
    message = f'{self.path}: {reason}'
    super().__init__(f'{message} ({detail})' if detail else message)

  def __reduce__(self):
    return (DecodeError, (self.path, self.reason, self.detail))


@dataclasses.dataclass(frozen=True)
class DecodedClip:
  """What a clip contributes to a record, before fbank and JPEG encoding."""

  waveform: np.ndarray  # int16 [num_samples], 16 kHz, first channel, at most max_seconds.
  frames: np.ndarray  # uint8 [num_frames, image_size, image_size, 3], RGB.
  frame_indices: np.ndarray  # int32 [num_frames], 0-based decoded frame numbers.
  duration_s: float  # Container duration in seconds.
  source_sample_rate: int  # Sample rate of the audio stream before resampling.
  fps: float  # Frame rate as OpenCV reports it (the stream's average frame rate).
  frame_count: int  # Frame count as OpenCV reports it (container count, else estimate).
  rotation: int = 0  # Clockwise degrees applied to make the frames upright (display matrix).


def frame_indices(frame_count: int, fps: float, num_frames: int = 10) -> np.ndarray:
  """Returns the 0-based frames the original really stores: max(int(i * total / n) - 1, 0)."""
  total = min(int(frame_count), int(fps * FRAME_WINDOW_SECONDS))
  return np.array([max(int(i * (total / num_frames)) - 1, 0) for i in range(num_frames)],
                  np.int32)


def resize_and_crop(frame: np.ndarray | Image.Image, image_size: int = 224) -> np.ndarray:
  """Resizes an RGB frame (PIL bilinear) so its shorter side is image_size, then center-crops.

  `frame` is uint8 [H, W, 3] or an RGB PIL image; the result is uint8 [image_size, image_size, 3].

  Equal, pixel for pixel, to one `Image.resize` to the full size followed by the crop (what
  torchvision's `Resize` + `CenterCrop` do) as Pillow up to 12 resizes, but cheaper: PIL resizes
  in two separable passes, horizontal then vertical, through a uint8 image, so we run the
  horizontal pass, drop the columns the crop would drop, and run the vertical pass on the kept
  columns only. Pillow 13 runs the vertical pass first for a downscaled image more than twice as
  tall as wide (a 9:19.5 phone screen), which moves some pixels by one level; we keep the
  horizontal-first order whatever Pillow is installed: the original's frames were made with it,
  and the records do not depend on the Pillow version.
  """
  image = frame if isinstance(frame, Image.Image) else Image.fromarray(frame)
  width, height = image.size
  short, long = min(height, width), max(height, width)
  new_long = int(image_size * long / short)
  new_width, new_height = (image_size, new_long) if width <= height else (new_long, image_size)
  # torchvision's CenterCrop rounds half offsets with Python's round (to even).
  top = int(round((new_height - image_size) / 2.0))
  left = int(round((new_width - image_size) / 2.0))
  if new_width != width:
    image = image.resize((new_width, height), Image.BILINEAR)
  image = image.crop((left, 0, left + image_size, height))
  if new_height != height:
    image = image.resize((image_size, new_height), Image.BILINEAR)
  return np.asarray(image.crop((0, top, image_size, top + image_size)))


def encode_jpeg(frame: np.ndarray, quality: int = 75) -> bytes:
  """Encodes an RGB uint8 frame as JPEG with PIL (the original's save_image settings)."""
  if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
    raise ValueError(f'frame must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}')
  buffer = io.BytesIO()
  Image.fromarray(frame).save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


# What a path that exists but is not a regular file is, for messages (FFmpeg would block on a
# FIFO and read /dev/zero forever).
_FILE_KINDS = ((stat.S_ISFIFO, 'a named pipe (FIFO)'), (stat.S_ISCHR, 'a character device'),
               (stat.S_ISBLK, 'a block device'), (stat.S_ISSOCK, 'a socket'))


def _special_kind(mode: int) -> str:
  """What a path of `os.stat` mode `mode` that is neither a file nor a folder is."""
  return next((name for test, name in _FILE_KINDS if test(mode)), 'a special file')


def _check_file(path: str) -> None:
  """Raises missing_file or empty_file, naming what the path is when it exists (a broken or
  looping link, a device, a pipe) rather than calling it missing."""
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    if os.path.islink(path):
      raise DecodeError(path, 'missing_file',
                        f'a broken symbolic link (to {os.readlink(path)})') from None
    raise DecodeError(path, 'missing_file') from None
  except OSError as e:  # a link loop, a file where a folder should be, a folder not searchable
    raise DecodeError(path, 'missing_file', e.strerror or str(e)) from None
  if stat.S_ISDIR(mode):
    raise DecodeError(path, 'missing_file', 'a directory, not a file')
  if not stat.S_ISREG(mode):
    raise DecodeError(path, 'missing_file', f'{_special_kind(mode)}, not a regular file')
  if os.path.getsize(path) == 0:
    raise DecodeError(path, 'empty_file')


def is_local_path(path: str) -> bool:
  """Whether FFmpeg opens the path itself (no URI scheme), rather than tf.io.gfile."""
  return '://' not in path


class _RemoteFile:
  """A read-only file object over `tf.io.gfile`, for PyAV to read non-local paths.

  PyAV prints and drops exceptions raised by a file object's read, then sees the end of the
  file; so read errors are kept here instead, and `_open` reports them as
  `unreadable_container`.
  """

  def __init__(self, path: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only for remote paths)

    self._errors = tf.errors.OpError
    try:
      file_stat = tf.io.gfile.stat(path)
    except tf.errors.NotFoundError:
      raise DecodeError(path, 'missing_file') from None
    except tf.errors.OpError as e:
      raise DecodeError(path, 'unreadable_container', e.message) from None
    if file_stat.is_directory:
      raise DecodeError(path, 'missing_file', 'a directory, not a file')
    if file_stat.length == 0:
      raise DecodeError(path, 'empty_file')
    self._file = tf.io.gfile.GFile(path, 'rb')
    self.error: str | None = None

  def read(self, size: int = -1) -> bytes:
    """Up to `size` bytes (b'' at the end of the file or after a read error)."""
    if self.error is not None:
      return b''
    try:
      return self._file.read(size)
    except self._errors as e:
      self.error = e.message
      return b''

  def seek(self, offset: int, whence: int = 0) -> int:
    """Moves the read position; returns the new position."""
    try:
      self._file.seek(offset, whence)
    except self._errors as e:
      self.error = e.message
    return self._file.tell()

  def tell(self) -> int:
    """The read position."""
    return self._file.tell()

  def close(self) -> None:
    """Closes the underlying GFile."""
    self._file.close()


def ffmpeg_text(error: Exception) -> str:
  """An FFmpeg error's own words, for a one-line message: its text without PyAV's
  `[Errno N]` and the file or function name it repeats (the message names the file already)."""
  if isinstance(error, av.error.FFmpegError):
    return error.strerror or type(error).__name__
  return str(error) or type(error).__name__


def _packet_decode_error(path: str, kind: str, packet: av.Packet | None,
                         error: Exception) -> DecodeError:
  """A decoder failure on one packet: the whole clip is refused (strict on purpose), and the
  message says which stream failed and where."""
  if packet is None:
    what = f'the {kind} decoder fails at the end of the stream'
  else:
    stamp = packet.pts if packet.pts is not None else packet.dts
    when = (f'at {float(stamp * packet.time_base):.2f} s' if stamp is not None and
            packet.time_base else 'at an unknown time')
    what = f'the {kind} packet {when} does not decode'
    if _cut_by_end_of_file(path, packet):
      return DecodeError(path, f'{kind}_decode_error',
                         f'{what}: the file ends inside it (byte {packet.pos + packet.size}): '
                         'a truncated file')
  if not isinstance(error, av.error.FFmpegError):  # not the decoder: the frame's conversion
    return DecodeError(path, f'{kind}_decode_error',
                       f"{what.replace(' does not decode', '')}: its frame cannot be converted: "
                       f'{error}')
  return DecodeError(path, f'{kind}_decode_error',
                     f'{what}: {ffmpeg_text(error)}; a clip with such a packet is not kept, '
                     "where the original's ffmpeg and OpenCV skip the packet")


def _check_intact(path: str, frame: av.VideoFrame) -> None:
  """Refuses a decoded frame FFmpeg flags corrupt: its decoder met damaged data and concealed
  it (the picture is partly guessed, and so are the frames that refer to it)."""
  if frame.is_corrupt:
    time = frame.time  # None without a timestamp, NaN for one flushed without a time base
    when = (f'at {time:.2f} s' if time is not None and math.isfinite(time) else
            'at an unknown time')
    raise DecodeError(path, 'video_decode_error',
                      f'the video frame {when} decodes damaged (FFmpeg concealed errors in its '
                      "data); a clip with such a frame is not kept, where the original's OpenCV "
                      'takes the concealed picture')


def _cut_by_end_of_file(path: str, packet: av.Packet) -> bool:
  """Whether `packet` was read short because the (local) file ends inside it: FFmpeg flags a
  short read corrupt, and a file cut after its index (a faststart MP4) ends that way."""
  try:
    return (packet.is_corrupt and packet.pos is not None and packet.pos >= 0 and
            packet.pos + packet.size >= os.path.getsize(path))
  except OSError:  # a remote file: no local size
    return False


# FFmpeg demuxers of text files that name other media files (FFmpeg probes them by content, so
# a playlist named .mp4 opens too): the clip would be those files' media under this file's id.
_LIST_DEMUXERS = {'concat': 'an FFmpeg concat list', 'hls': 'an HLS playlist',
                  'dash': 'a DASH manifest'}


# The first bytes by which FFmpeg's probes recognize those of them that open the files they
# name while the container is opened (`_open_container` checks the opened format as well).
_LIST_HEADERS = ((b'ffconcat version', 'concat'), (b'#EXTM3U', 'hls'))


def _check_not_a_list(path: str) -> None:
  """Refuses a local file that starts as a concat list or an HLS playlist before FFmpeg opens
  it: opening a concat list opens the first file it names, which blocks for ever where that is
  a named pipe (FIFO), and reads a device or a huge file."""
  try:
    with open(path, 'rb') as f:
      head = f.read(max(len(header) for header, _ in _LIST_HEADERS))
  except OSError as e:
    raise DecodeError(path, 'unreadable_container', e.strerror or str(e)) from None
  for header, demuxer in _LIST_HEADERS:
    if head.startswith(header):
      raise DecodeError(path, 'unreadable_container',
                        f'{_LIST_DEMUXERS[demuxer]} (text naming other files), not a media file')


def _open_container(path: str, source: str | _RemoteFile) -> av.container.InputContainer:
  try:
    container = av.open(source, mode='r')
  except (av.error.FFmpegError, UnicodeDecodeError) as e:
    detail = ffmpeg_text(e)
    if isinstance(e, av.error.InvalidDataError):
      detail += ': not a media file FFmpeg can open, or one cut before its index'
    raise DecodeError(path, 'unreadable_container', detail) from e
  listing = _LIST_DEMUXERS.get(container.format.name)
  if listing is not None:
    container.close()
    raise DecodeError(path, 'unreadable_container',
                      f'{listing} (text naming other files), not a media file')
  return container


@contextlib.contextmanager
def _open(path: str) -> Iterator[av.container.InputContainer]:
  """Opens a media file (local: by path; otherwise through tf.io.gfile) as a PyAV container."""
  if is_local_path(path):
    _check_file(path)
    _check_not_a_list(path)
    # Absolute: FFmpeg reads a relative 'a:b.mp4' as protocol 'a' ('file:x.mp4': file x.mp4).
    with _open_container(path, os.path.abspath(path)) as container:
      yield container
    return
  remote = _RemoteFile(path)
  try:
    with _open_container(path, remote) as container:
      yield container
  except DecodeError as e:
    if remote.error is None:
      raise
    raise DecodeError(path, 'unreadable_container', f'reading failed: {remote.error}') from e
  finally:
    remote.close()
  if remote.error is not None:
    raise DecodeError(path, 'unreadable_container', f'reading failed: {remote.error}')


def _container_duration_s(container: av.container.InputContainer) -> float:
  if container.duration is not None:
    return container.duration / _AV_TIME_BASE
  return 0.0


def _stream_duration_s(stream: av.stream.Stream) -> float | None:
  if stream.duration is not None and stream.time_base is not None:
    return float(stream.duration * stream.time_base)
  return None


def _duration_tag_s(stream: av.stream.Stream) -> float | None:
  """A track's `DURATION` tag (FFmpeg's Matroska and WebM muxers write one per track,
  'HH:MM:SS.nnnnnnnnn', where the track header has no duration): the time the track ends,
  counted from 0, not its length."""
  tag = (stream.metadata or {}).get('DURATION', '')
  match = re.fullmatch(r'(\d+):([0-5]\d):(\d+(?:\.\d*)?)', tag.strip())
  if match is None:
    return None
  hours, minutes, seconds = match.groups()
  return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


@functools.cache
def _single_thread_resampler() -> dict[str, int]:
  """`AudioResampler` arguments for a graph without a thread pool, where PyAV takes them.

  PyAV 18.1.1 gave the resampler a `threads` argument, defaulting to a thread per core that
  lives as long as the graph, which is now until the garbage collector runs (see
  _RESAMPLE_CHUNK); earlier PyAVs free the graph, and its threads, when the resampler goes.
  Resampling one channel uses no threads.
  """
  try:
    av.AudioResampler(threads=1)
  except TypeError:
    return {}
  return {'threads': 1}


class _AudioSink:
  """Decodes one audio stream's packets, keeping the first channel at the source rate.

  libswresample converts and resamples each channel on its own when the layout is kept, so
  resampling channel 0 alone (once, over the whole clip) gives bit-identical samples to
  channel 0 of `ffmpeg -ar 16000`'s multi-channel output, at a fraction of the cost.
  """

  def __init__(self, path: str, stream: av.audio.stream.AudioStream, target_sample_rate: int,
               max_samples: int | None):
    self.path = path
    self.stream = stream
    self.target_sample_rate = target_sample_rate
    self.max_samples = max_samples
    self.source_sample_rate = int(stream.codec_context.sample_rate or stream.rate or 0)
    self.done = False
    self._chunks: list[np.ndarray] = []
    self._source_format: tuple[str, int] | None = None  # (sample format, sample rate).
    self._source_samples = 0
    self._source_samples_needed: int | None = None
    # The decoded audio's span on the stream's timeline (seconds; None without timestamps).
    self._first_s: float | None = None
    self._end_s: float | None = None

  def _keep_first_channel(self, frame: av.AudioFrame) -> None:
    source_format = (frame.format.name, frame.sample_rate)
    if self._source_format is None:
      self._source_format = source_format
      if self.max_samples is not None:
        # Enough source audio for max_samples outputs plus the resampling filter's reach.
        seconds = self.max_samples / self.target_sample_rate + _RESAMPLE_MARGIN_S
        self._source_samples_needed = int(seconds * frame.sample_rate) + 1
    elif source_format != self._source_format:
      raise DecodeError(self.path, 'audio_decode_error',
                        f'audio format changes mid-stream: {self._source_format} -> '
                        f'{source_format}')
    # Channel 0 straight from the first plane: no copy of the other channels (what
    # AudioFrame.to_ndarray costs), same samples.
    dtype = _SAMPLE_DTYPES.get(frame.format.name)
    if dtype is None:
      raise DecodeError(self.path, 'audio_decode_error',
                        f'unsupported sample format {frame.format.name}')
    if frame.format.is_planar:
      first = np.frombuffer(frame.planes[0], dtype, count=frame.samples).copy()
    else:
      channels = len(frame.layout.channels)
      first = np.frombuffer(frame.planes[0], dtype, count=frame.samples * channels)[::channels]
      first = first.copy()
    self._chunks.append(first)
    self._source_samples += first.shape[0]
    if frame.time is not None and frame.sample_rate:
      self._first_s = frame.time if self._first_s is None else self._first_s
      self._end_s = frame.time + frame.samples / frame.sample_rate
    if (self._source_samples_needed is not None and
        self._source_samples >= self._source_samples_needed):
      self.done = True

  def feed(self, packet: av.Packet | None) -> None:
    """Decodes a packet (None flushes the decoder)."""
    try:
      for frame in self.stream.decode(packet):
        self._keep_first_channel(frame)
        if self.done:
          return
    except (av.error.FFmpegError, ValueError) as e:
      raise _packet_decode_error(self.path, 'audio', packet, e) from e
    if packet is None:
      self.done = True

  def _resampled(self) -> np.ndarray:
    """Resamples the kept channel to target_sample_rate as int16 with libswresample."""
    if not self._chunks:
      return np.zeros(0, np.int16)
    source_format, source_rate = self._source_format
    mono = np.concatenate(self._chunks)
    resampler = av.AudioResampler(format='s16', layout='mono', rate=self.target_sample_rate,
                                  **_single_thread_resampler())
    frames = []
    try:
      for start in range(0, mono.shape[0], _RESAMPLE_CHUNK):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(mono[None, start:start + _RESAMPLE_CHUNK]),
            format=source_format, layout='mono')
        frame.sample_rate = source_rate
        frame.pts = start
        frames += resampler.resample(frame)
      frames += resampler.resample(None)
    except (av.error.FFmpegError, ValueError) as e:
      raise DecodeError(self.path, 'audio_decode_error',
                        f'resampling failed: {ffmpeg_text(e)}') from e
    if not frames:  # frames of no samples: too short, said by waveform()
      return np.zeros(0, np.int16)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames])

  def waveform(self) -> np.ndarray:
    """Returns the decoded int16 waveform, cut to max_samples; raises on truncated audio."""
    waveform = self._resampled()
    if self.max_samples is not None:
      waveform = waveform[:self.max_samples]
    waveform = np.ascontiguousarray(waveform, np.int16)
    if waveform.shape[0] < MIN_AUDIO_SAMPLES:
      raise DecodeError(self.path, 'audio_too_short',
                        f'{waveform.shape[0]} samples at {self.target_sample_rate} Hz')
    if self.max_samples is None or waveform.shape[0] < self.max_samples:  # the stream ran out
      self._check_declared_duration(waveform.shape[0] / self.target_sample_rate)
    return waveform

  def _check_declared_duration(self, decoded_s: float) -> None:
    """Raises when the stream ended well before its declared duration (truncated data).

    Measured on the stream's timeline where frames have timestamps, so that audio which starts
    late or skips a stretch (the original's ffmpeg writes it without filling the gap) is not
    taken for a cut file: a header's duration is the track's length, from its first timestamp
    to its end; Matroska's DURATION tag is the time the track ends, counted from 0.
    """
    timed = self._first_s is not None and self._end_s is not None
    # Matroska's tag first: where a track's audio starts after FFmpeg's probe (~5 s), FFmpeg
    # fills in the stream's duration from the container's, the whole file's length.
    tag_s = _duration_tag_s(self.stream)
    if tag_s is not None:
      declared_s, what = tag_s, 'declares its end at'
      covered_s = self._end_s if timed else decoded_s
    else:
      declared_s, what = _stream_duration_s(self.stream), 'declares'
      covered_s = self._end_s - self._first_s if timed else decoded_s
    if declared_s is None:
      return
    # Called only when the stream ran out before max_samples: all of it is measured.
    if covered_s < declared_s - max(0.5, 0.05 * declared_s):
      ends = f' (ending at {self._end_s:.2f} s)' if timed and tag_s is not None else ''
      raise DecodeError(self.path, 'audio_decode_error',
                        f'decoded {decoded_s:.2f} s of audio{ends}, the stream {what} '
                        f'{declared_s:.2f} s')


def rotation_from_display_matrix(matrix: Sequence[int]) -> int:
  """Clockwise degrees (0, 90, 180, 270) that ffmpeg's autorotate turns a frame by.

  `matrix` is FFmpeg's 3 x 3 display matrix (9 int32, 16.16 fixed point), as stored in an
  MP4's track header. Raises ValueError for a matrix that mirrors the picture or turns it by
  an angle that is not a multiple of 90 degrees.
  """
  a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
  if a * d - b * c <= 0:
    raise ValueError('the display matrix mirrors the picture (or is degenerate)')
  # ffmpeg's get_rotation: -round(av_display_rotation_get(matrix)), taken modulo 360.
  theta = round(math.degrees(math.atan2(b / math.hypot(b, d), a / math.hypot(a, c)))) % 360
  if theta % 90:
    raise ValueError(f'the display matrix turns the picture by {theta} degrees, not a '
                     'multiple of 90')
  return theta


def frame_rotation(frame: av.VideoFrame) -> int:
  """Clockwise degrees that make a decoded frame upright (0 when it has no display matrix)."""
  # Not `frame.side_data`: PyAV keeps that container on the frame, and the container refers back
  # to the frame, a reference cycle that holds the decoded picture (1.4 MB at 720p) until Python's
  # cyclic garbage collector frees it, which can take thousands of clips in a process with a
  # large heap (TensorFlow's). A container of our own refers to the frame one way only.
  side_data = av_sidedata.SideDataContainer(frame).get('DISPLAYMATRIX')
  if side_data is None:
    return 0
  return rotation_from_display_matrix(np.frombuffer(bytes(side_data), np.int32))


# How the original's OpenCV turns YUV into RGB. OpenCV up to 4.12 (the original's preprocessing is
# from 2022-2023; opencv-python 4.7 then) sets up libswscale without colour details, so every
# YUV frame is converted with the BT.601 matrix and, as libswscale assumes from the pixel format
# alone, full range only for the JPEG (`yuvj*`) and gray formats: a BT.709-tagged stream (the
# original's VGGSound sample KlsG1EnBEjc_000361.mp4 is one) or a `yuv420p` frame flagged full
# range is converted as BT.601 limited range. OpenCV from 4.13 honours the tags, and so does
# PyAV unless told otherwise; the original's frames of a BT.709 clip differ from those by up to
# 22 levels (pure red: 232 instead of 254). RGB and palette frames have no matrix.
_OPENCV_MATRIX = 'ITU601'
_OPENCV_FULL_RANGE_PREFIXES = ('yuvj', 'gray', 'ya')


def _opencv_colour(pixel_format: av.VideoFormat) -> dict[str, str]:
  """`to_ndarray` arguments giving OpenCV's (<= 4.12) YUV -> RGB matrix and range."""
  if pixel_format.is_rgb or pixel_format.has_palette:
    return {}
  full = pixel_format.name.startswith(_OPENCV_FULL_RANGE_PREFIXES)
  return {'src_colorspace': _OPENCV_MATRIX, 'src_color_range': 'JPEG' if full else 'MPEG'}


# PIL's transposes that turn a picture clockwise by 90, 180 and 270 degrees.
_CLOCKWISE = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180,
              270: Image.Transpose.ROTATE_90}


def upright_image(frame: av.VideoFrame, rotation: int) -> Image.Image:
  """The frame as an RGB PIL image, turned clockwise by `rotation` degrees.

  Converted as the original's OpenCV reader converts: libswscale to BGR24 with bicubic
  interpolation (OpenCV's `SWS_BICUBIC`), then the channels swapped (its `cvtColor`; here PIL's
  raw BGR unpacker, which costs no more than a plain copy). For 8-bit 4:2:0 and 4:4:4 sources
  swscale's unscaled converter ignores the interpolation, so this equals a plain RGB24
  conversion; for 10-bit and 4:2:2 sources the chroma upsampling follows the flag, and an RGB24
  bilinear conversion differed from OpenCV's pixels by up to 12 levels.

  The colour matrix and range are the ones the original's OpenCV used (`_opencv_colour`), not
  the stream's tags: BT.601 always, full range only for the `yuvj*` and gray formats.

  One swscale thread: PyAV's default starts a pool of a thread per core for every conversion
  (no faster for one frame of this size, same pixels), and the pools lived until the garbage
  collector ran: 20 idle threads per clip on 2 cores, one per core per frame on a large host.
  """
  bgr = np.ascontiguousarray(frame.to_ndarray(format='bgr24', interpolation='BICUBIC',
                                              threads=1, **_opencv_colour(frame.format)))
  image = Image.frombuffer('RGB', (bgr.shape[1], bgr.shape[0]), bgr, 'raw', 'BGR', 0, 1)
  return image.transpose(_CLOCKWISE[rotation]) if rotation else image


def upright_rgb(frame: av.VideoFrame, rotation: int) -> np.ndarray:
  """The frame as RGB uint8 [H, W, 3], turned clockwise by `rotation` degrees (`upright_image`)."""
  return np.asarray(upright_image(frame, rotation))


def _nal_headers(data: bytes, length_size: int) -> list[int]:
  """The first header byte of each NAL unit of an H.264/HEVC access unit.

  `length_size`: the bytes of each unit's length prefix (MP4 and Matroska store units so:
  avcC/hvcC), or 0 for units after start codes (Annex B: MPEG-TS, raw streams). Length-prefixed
  data that does not divide exactly into units (a unit overrunning it, an empty unit, bytes left
  over: not this layout) gives no units.
  """
  headers = []
  if length_size:
    position = 0
    while position < len(data):
      size = int.from_bytes(data[position:position + length_size], 'big')
      position += length_size
      if size == 0 or position + size > len(data):
        return []
      headers.append(data[position])
      position += size
    return headers
  start = data.find(b'\x00\x00\x01')
  while 0 <= start < len(data) - 3:
    headers.append(data[start + 3])
    start = data.find(b'\x00\x00\x01', start + 3)
  return headers


def _vp9_key_frame(data: bytes) -> bool:
  """Whether VP9 data (a frame, or a superframe, whose first frame is read) holds a key frame
  (`_VP9_SYNC_CODE`)."""
  if len(data) < 5:
    return False
  bits = int.from_bytes(data[:5], 'big')

  def field(start: int, size: int) -> int:
    return (bits >> (40 - start - size)) & ((1 << size) - 1)

  if field(0, 2) != 2:
    return False
  at = 5 if field(2, 2) == 3 else 4  # profile 3 (both bits set) has a reserved bit
  return field(at, 2) == 0 and field(at + 4, 24) == _VP9_SYNC_CODE


def _av1_obus(data: bytes) -> list[tuple[int, int, int]] | None:
  """(type, payload start, payload size) of each OBU of AV1 data in the low-overhead format;
  None where the data does not divide into OBUs, or an OBU has an extension header (a layered
  stream, not read here)."""
  obus, position = [], 0
  while position < len(data):
    header = data[position]
    if header & 0x84:  # the forbidden bit, or obu_extension_flag
      return None
    position += 1
    if header & 0x02:  # obu_has_size_field: leb128
      size = shift = 0
      while True:
        if position >= len(data) or shift > 49:
          return None
        byte = data[position]
        position += 1
        size |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
          break
    else:
      size = len(data) - position
    if position + size > len(data):
      return None
    obus.append(((header >> 3) & 0x0F, position, size))
    position += size
  return obus


def _av1_still_picture_headers(data: bytes,
                               obus: list[tuple[int, int, int]] | None) -> bool:
  """Whether a sequence header among `obus` (`_av1_obus(data)`) sets reduced_still_picture_header
  (frame headers then start otherwise), or the data does not divide into OBUs (None)."""
  return obus is None or any(kind == _AV1_SEQUENCE_HEADER and (not size or data[start] & 0x08)
                             for kind, start, size in obus)


def _av1_key_frame(data: bytes) -> bool:
  """Whether AV1 data (a temporal unit) begins with a shown key frame (`_AV1_FRAME`)."""
  obus = _av1_obus(data)
  if _av1_still_picture_headers(data, obus):
    return False
  for kind, start, size in obus:
    if kind in (_AV1_FRAME_HEADER, _AV1_FRAME):
      # show_existing_frame 0, frame_type KEY_FRAME, show_frame 1.
      return size > 0 and data[start] & 0xF0 == 0x10
  return False


def _unit_types(stream: av.video.stream.VideoStream,
                ) -> tuple[_NalTypes, Callable[[av.Packet], set[int] | None]] | None:
  """The codec's `_NalTypes` and a function giving the NAL unit types of a packet (None where
  its data does not divide into units); None for codecs other than H.264 and HEVC, or codec
  data of a layout not known here."""
  codec = stream.codec_context.name
  if codec not in _NAL_TYPES:
    return None
  types = _NAL_TYPES[codec]
  extradata = stream.codec_context.extradata or b''
  if extradata[:1] == b'\x01':  # avcC / hvcC (configuration version 1)
    if len(extradata) <= types.size_byte or (extradata[types.size_byte] & 3) == 2:  # 3-byte
      return None
    length_size = (extradata[types.size_byte] & 3) + 1
  elif not extradata or extradata.startswith((b'\x00\x00\x01', b'\x00\x00\x00\x01')):
    length_size = 0  # Annex B
  else:
    return None

  def unit_types(packet: av.Packet) -> set[int] | None:
    headers = _nal_headers(bytes(packet), length_size)
    return {types.unit_type(header) for header in headers} if headers else None

  return types, unit_types


_PacketTest = Callable[[av.Packet], bool]


def _fresh_start_tests(stream: av.video.stream.VideoStream
                       ) -> tuple[_PacketTest, _PacketTest] | None:
  """Two tests of a packet of `stream`: whether it holds a picture the decoder starts afresh at
  (`_NAL_TYPES`' IDR pictures, VP9's key frame, AV1's shown key frame: the container's keyframe
  flag and the picture's own header must both say so), and whether it may carry parameter sets
  (`_NAL_TYPES`', AV1's sequence header; VP9 has none), as it does where its data does not
  divide into NAL units or OBUs. None for codecs other than H.264, HEVC, VP9 and AV1, or codec
  data of a layout not known here."""
  name = stream.codec_context.name
  if name in _VP9_DECODERS:
    return (lambda packet: packet.is_keyframe and _vp9_key_frame(bytes(packet)),
            lambda packet: False)
  if name in _AV1_DECODERS:
    extradata = stream.codec_context.extradata or b''
    # av1C: 4 bytes, then the sequence header's OBUs (in-band data: the OBUs themselves)
    config = extradata[4:] if extradata[:1] == b'\x81' else extradata
    if _av1_still_picture_headers(config, _av1_obus(config)):
      return None

    def may_carry_sequence_header(packet: av.Packet) -> bool:
      obus = _av1_obus(bytes(packet))
      return obus is None or any(kind == _AV1_SEQUENCE_HEADER for kind, _, _ in obus)

    return (lambda packet: packet.is_keyframe and _av1_key_frame(bytes(packet)),
            may_carry_sequence_header)
  known = _unit_types(stream)
  if known is None:
    return None
  types, unit_types = known

  def starts_afresh(packet: av.Packet) -> bool:
    return packet.is_keyframe and bool((unit_types(packet) or set()) & types.fresh_start)

  def may_carry_parameter_sets(packet: av.Packet) -> bool:
    found = unit_types(packet)
    return found is None or bool(found & types.parameter_sets)

  return starts_afresh, may_carry_parameter_sets


def _set_decoder_threads(stream: av.video.stream.VideoStream, threads: int) -> None:
  """Sets the video decoder's thread count before its first packet; 0 keeps FFmpeg's choice."""
  if threads < 0:
    raise ValueError(f'decoder_threads must be >= 0 (0: FFmpeg chooses), got {threads}')
  if threads:
    stream.codec_context.thread_count = threads


class _FrameSink:
  """Decodes one video stream's packets until the frames the original stores are collected.

  A frame's number is its presentation rank, i.e. the rank of its packet's timestamp among the
  stream's packets (what counting decoded frames gives). Packets are held back
  `_REORDER_WINDOW` packets, longer than any H.264/HEVC reordering, so a packet's rank is known
  before it is decoded; the decoder then skips non-reference frames that are not wanted, which
  leaves every other frame bit-identical. In H.264 and HEVC the held-back packets also show a
  coming IDR picture (in VP9 and AV1 a key frame), after which no picture refers to an earlier
  one: once every wanted frame before it is kept, the packets up to it are left out
  (`_unneeded`), unless one of them carries parameter sets. A stream whose timestamps cannot rank
  its frames (missing or repeated), or whose ranks turn out inconsistent, or whose picture after
  packets left out is no keyframe to the decoder, is decoded again from the start and its frames
  counted one by one. So is one whose timestamps follow the decode order, not the presentation
  order (H.264 with B-frames in AVI, which stores no presentation times): its decoder reorders
  (`has_b_frames`) but no packet came with an earlier timestamp than one before it, or frames
  came out of the decoder, which gives them in presentation order, with decreasing timestamps.
  """

  def __init__(self, path: str, container: av.container.InputContainer,
               stream: av.video.stream.VideoStream, num_frames: int, image_size: int,
               decoder_threads: int = 0):
    self.path = path
    self.stream = stream
    self.image_size = image_size
    self.decoder_threads = decoder_threads
    _set_decoder_threads(stream, decoder_threads)
    # The average rate, as OpenCV's get_fps (cap_ffmpeg_impl) reads it. Where a stream has none
    # (raw elementary streams), OpenCV falls back to 1 / the codec's time base; we take FFmpeg's
    # guessed rate first, a frame rate, then 1 / the stream's time base.
    rate = stream.average_rate or stream.guessed_rate or (
        1 / stream.time_base if stream.time_base else None)
    self.fps = float(rate) if rate else 0.0
    frame_count = int(stream.frames or 0)
    duration_s = None  # the duration a missing frame count is estimated from
    # Where the frame count comes from, for messages: the file's own count, or (a container
    # such as Matroska stores none) OpenCV's estimate from a duration.
    self._count_source = f'container declares {frame_count} frames at {self.fps:.3f} fps'
    if frame_count == 0:
      duration_s = _container_duration_s(container)
      of = 'container'
      if not duration_s:
        duration_s, of = _stream_duration_s(stream) or 0.0, 'stream'
      frame_count = int(np.floor(duration_s * self.fps + 0.5))
      self._count_source = (
          f'frame count {frame_count} estimated from the {of} duration {duration_s:.2f} s x '
          f"{self.fps:.3f} fps, as the original's OpenCV does: the file stores no frame count")
    videos = _clip_video_streams(container)
    if len(videos) > 1:  # a still picture as the first video track, say
      self._count_source += (f'; of video stream {stream.index}, the first of {len(videos)}, '
                             "which the original's OpenCV reads")
    self.frame_count = frame_count
    self.indices = frame_indices(frame_count, self.fps, num_frames)
    if frame_count <= 0 or self.fps <= 0:
      # A live recording (a browser's MediaRecorder WebM, a stream dump) stores neither a count
      # nor a duration: the original's OpenCV then has no frame count to spread its 10 frames
      # over. Say so, and how such a file is repaired, rather than only "frame count 0".
      unknown_length = ''
      if duration_s == 0:  # (estimated above from no duration at all)
        unknown_length = (': the file stores neither a frame count nor a duration (as a live '
                          'recording, e.g. a WebM from a browser, leaves it); remuxing it '
                          '(ffmpeg -i IN -c copy OUT) writes its duration')
      raise DecodeError(path, 'too_few_frames',
                        f'frame count {frame_count} at {self.fps:.3f} fps{unknown_length}')
    self._wanted = set(self.indices.tolist())
    self._frames: dict[int, np.ndarray] = {}
    self._frame_pts: dict[int, int] = {}
    self._target_pts: dict[int, int] = {}  # pts -> frame number, for wanted packets.
    self._seen_pts: list[int] = []  # Sorted timestamps of the packets demuxed so far.
    self._pending: collections.deque[av.Packet] = collections.deque()
    self._count_instead = False  # Timestamps cannot rank frames: count them in a new pass.
    self._reordered = False  # A packet's timestamp came before an earlier packet's.
    self._output_pts: int | None = None  # The timestamp of the last frame decoded.
    self._starts_afresh, self._may_carry_parameter_sets = (
        _fresh_start_tests(stream) or (None, None))
    self._parameter_sets_at: dict[int, bool] = {}  # pts -> may carry parameter sets (cache).
    self._fresh_pts: set[int] = set()  # Timestamps of the IDR pictures among the held back.
    self._resume_pts: int | None = None  # The IDR picture decoding resumes at.
    self.packets_left_out = 0  # Packets not decoded because an IDR picture follows.
    self.rotation: int | None = None  # Clockwise degrees applied; known at the first frame.
    self.done = False

  def _convert(self, frame: av.VideoFrame) -> np.ndarray:
    """A wanted frame, upright, resized and cropped."""
    try:
      rotation = frame_rotation(frame)
    except ValueError as e:
      raise DecodeError(self.path, 'unsupported_rotation', str(e)) from None
    if self.rotation is None:
      self.rotation = rotation
    elif rotation != self.rotation:
      raise DecodeError(self.path, 'video_decode_error', f'the display rotation changes from '
                        f'{self.rotation} to {rotation} degrees within the stream')
    return resize_and_crop(upright_image(frame, rotation), self.image_size)

  def feed(self, packet: av.Packet | None) -> None:
    """Takes the next packet in decode order (None at the end of the stream)."""
    if packet is None:
      while self._pending and not self.done:
        self._decode(self._pending.popleft())
      if not self.done:
        self._decode(None)
        self.done = True
      return
    if not packet.is_discard:
      position = (bisect.bisect_left(self._seen_pts, packet.pts)
                  if packet.pts is not None else None)
      if position is None or (position < len(self._seen_pts) and
                              self._seen_pts[position] == packet.pts):
        self._count_instead = self.done = True
        return
      self._reordered = self._reordered or position < len(self._seen_pts)
      self._seen_pts.insert(position, packet.pts)
      if self._starts_afresh is not None and self._starts_afresh(packet):
        self._fresh_pts.add(packet.pts)
    self._pending.append(packet)
    while len(self._pending) > _REORDER_WINDOW and not self.done:
      self._decode(self._pending.popleft())

  def _unneeded(self, packet: av.Packet) -> bool:
    """Whether `packet`, due to be decoded, can be left out: an IDR picture follows among the
    held-back packets, it and every packet up to that picture come before the picture in
    presentation order too and carry no parameter sets, and every wanted frame before the
    picture is already kept (nothing from the IDR picture on refers to what comes before it
    but the parameter sets)."""
    if not self._fresh_pts:
      return False
    before = [packet]
    for held in self._pending:
      if held.pts in self._fresh_pts:
        fresh_rank = bisect.bisect_left(self._seen_pts, held.pts)
        break
      before.append(held)
    else:
      return False
    if any(p.is_discard or p.pts is None or
           bisect.bisect_left(self._seen_pts, p.pts) >= fresh_rank for p in before):
      return False
    if any(index < fresh_rank and index not in self._frames for index in self._wanted):
      return False
    # A parameter set sent before the IDR picture may be one it uses (H.264, HEVC and AV1
    # allow them anywhere between pictures): such a packet, and the packets it refers to, are
    # decoded.
    for p in before:
      if p.pts not in self._parameter_sets_at:
        self._parameter_sets_at[p.pts] = self._may_carry_parameter_sets(p)
      if self._parameter_sets_at[p.pts]:
        return False
    self._resume_pts = held.pts
    return True

  def _decode(self, packet: av.Packet | None) -> None:
    """Decodes one packet, skipping it if it is an unwanted non-reference frame, leaving it out
    if an IDR picture follows and nothing wanted before that picture is left (`_unneeded`)."""
    if packet is not None:
      self._fresh_pts.discard(packet.pts)
      if self._unneeded(packet):
        self.packets_left_out += 1
        return
      rank = None
      if not packet.is_discard:
        rank = bisect.bisect_left(self._seen_pts, packet.pts)
      if rank in self._wanted:
        self._target_pts[packet.pts] = rank
      self.stream.codec_context.skip_frame = 'DEFAULT' if rank in self._wanted else 'NONREF'
    try:
      for frame in self.stream.decode(packet):
        _check_intact(self.path, frame)
        if self._resume_pts is not None and frame.pts == self._resume_pts:
          self._resume_pts = None
          if not frame.key_frame:  # The decoder did not start afresh: decode it all again.
            self._count_instead = self.done = True
            return
        if frame.pts is not None:
          if self._output_pts is not None and frame.pts <= self._output_pts:
            self._count_instead = self.done = True  # Timestamps in decode order.
            return
          self._output_pts = frame.pts
        index = self._target_pts.get(frame.pts)
        if index is not None and index not in self._frames:
          self._frames[index] = self._convert(frame)
          self._frame_pts[index] = frame.pts
    except (av.error.FFmpegError, ValueError) as e:
      raise _packet_decode_error(self.path, 'video', packet, e) from e
    if len(self._frames) == len(self._wanted):
      self.done = True

  def _ranks_consistent(self) -> bool:
    """Whether each kept frame's rank still holds against every timestamp seen."""
    return all(bisect.bisect_left(self._seen_pts, pts) == index
               for index, pts in self._frame_pts.items())

  def _count_frames(self) -> None:
    """Decodes the stream again from the start, numbering frames by counting them."""
    self._frames = {}
    count = 0
    with _open(self.path) as container:
      stream = container.streams[self.stream.index]
      _set_decoder_threads(stream, self.decoder_threads)
      for packet in _packets(self.path, container, [stream]):
        try:
          for frame in stream.decode(packet if packet.size else None):
            _check_intact(self.path, frame)
            if count in self._wanted:
              self._frames[count] = self._convert(frame)
            count += 1
        except (av.error.FFmpegError, ValueError) as e:
          raise _packet_decode_error(self.path, 'video', packet if packet.size else None,
                                     e) from e
        if count > max(self._wanted):
          break
    self._decoded_count = count

  def frames(self) -> np.ndarray:
    """Returns the wanted frames [num_frames, size, size, 3]; raises if the stream ended early."""
    if self.stream.codec_context.has_b_frames and not self._reordered:
      self._count_instead = True  # Timestamps in decode order: the decoder reorders, they never.
    if (self._count_instead or len(self._frames) < len(self._wanted) or
        not self._ranks_consistent()):
      self._count_frames()
      missing = sorted(self._wanted - set(self._frames))
      if missing:
        raise DecodeError(
            self.path, 'too_few_frames',
            f'decoded {self._decoded_count} frames, needed frame {missing[0]} '
            f'({self._count_source})')
    return np.stack([self._frames[i] for i in self.indices.tolist()])


def _packets(path: str, container: av.container.InputContainer,
             streams: list[av.stream.Stream]) -> Iterator[av.Packet]:
  """Yields demuxed packets of the given streams, mapping demuxer failures to DecodeError."""
  iterator = container.demux(streams)
  while True:
    try:
      packet = next(iterator)
    except StopIteration:
      return
    except av.error.FFmpegError as e:
      raise DecodeError(path, 'unreadable_container',
                        f'demuxing failed: {ffmpeg_text(e)}') from e
    yield packet


def _drain(path: str, container: av.container.InputContainer,
           sinks: list[_AudioSink | _FrameSink]) -> None:
  """Feeds packets to the sinks until each is done, flushing the ones the file ends before."""
  by_index = {sink.stream.index: sink for sink in sinks}
  for packet in _packets(path, container, [sink.stream for sink in sinks]):
    sink = by_index[packet.stream.index]
    if not sink.done:
      # PyAV ends each stream with an empty packet; decoding it flushes the decoder.
      sink.feed(packet if packet.size else None)
    if all(s.done for s in sinks):
      return
  for sink in sinks:
    if not sink.done:
      sink.feed(None)


def _check_media_streams(path: str, container: av.container.InputContainer) -> None:
  """Raises unreadable_container for a container without any audio or video stream.

  An MP4 whose index (moov) is cut midway opens with no streams or only an unidentified
  'data' one; that is a damaged file, not a clip missing one modality.
  """
  if not container.streams.audio and not container.streams.video:
    kinds = ', '.join(stream.type for stream in container.streams) or 'none'
    raise DecodeError(path, 'unreadable_container',
                      f'no audio or video stream (streams: {kinds}); the container index may '
                      'be truncated or damaged')


def _cli_audio_stream(container: av.container.InputContainer) -> av.audio.AudioStream:
  """The audio stream the ffmpeg command line (the original's audio path) takes by default.

  ffmpeg ranks audio streams by the default disposition, then by channel count, and takes the
  lowest index among equals. FFmpeg's `av_find_best_stream` (PyAV's `streams.best`) agrees on
  the default stream but, among several none of which is default, ranks by what it probed and
  may take another (e.g. a mono stream before a stereo one).
  """
  default = av.stream.Disposition.default
  return max(container.streams.audio,
             key=lambda s: (bool(s.disposition & default), _channels(s), -s.index))


def _channels(stream: av.audio.AudioStream) -> int:
  """The stream's channel count; 0 for a stream this FFmpeg build has no decoder for."""
  return stream.codec_context.channels if stream.codec_context is not None else 0


def _check_decoder(path: str, stream: av.stream.Stream, reason: str) -> None:
  """Raises `reason` when FFmpeg has no decoder for the chosen stream's codec.

  PyAV then gives the stream no codec context: the codec is unknown to this FFmpeg build (an
  unsupported format, or a damaged header naming no real codec).
  """
  if stream.codec_context is None:
    raise DecodeError(path, reason, f'no decoder for {stream.type} stream {stream.index}: its '
                      'codec is unknown to this FFmpeg build (unsupported or damaged header)')


def _audio_sink(path: str, container: av.container.InputContainer, target_sample_rate: int,
                max_seconds: float | None) -> _AudioSink:
  _check_media_streams(path, container)
  if not container.streams.audio:
    raise DecodeError(path, 'no_audio_stream')
  stream = _cli_audio_stream(container)
  _check_decoder(path, stream, 'audio_decode_error')
  max_samples = None if max_seconds is None else int(round(max_seconds * target_sample_rate))
  return _AudioSink(path, stream, target_sample_rate, max_samples)


def _clip_video_streams(container: av.container.InputContainer) -> list[av.stream.Stream]:
  """The video streams that may be the clip's video, in file order: not a cover picture
  (attached_pic: the artwork of an .m4a/.mp3, a thumbnail embedded in an MP4), which is one
  still image."""
  return [stream for stream in container.streams.video
          if not stream.disposition & av.stream.Disposition.attached_pic]


def _frame_sink(path: str, container: av.container.InputContainer, num_frames: int,
                image_size: int, decoder_threads: int) -> _FrameSink:
  _check_media_streams(path, container)
  videos = _clip_video_streams(container)
  if not videos:
    raise DecodeError(path, 'no_video_stream',
                      'only a cover picture (attached_pic), no video' if container.streams.video
                      else 'an audio-only file: a record holds frames of the clip\'s video too '
                      '(audio-only models train on the same records)' if container.streams.audio
                      else '')
  # The original's frames are OpenCV's, which reads the first video stream whatever the
  # dispositions say (FFmpeg's best-stream ranking takes the default one, or the largest).
  stream = videos[0]
  _check_decoder(path, stream, 'video_decode_error')
  return _FrameSink(path, container, stream, num_frames, image_size, decoder_threads)


def decode_audio(path: str | os.PathLike,
                 target_sample_rate: int = 16000,
                 max_seconds: float | None = 10.0) -> tuple[np.ndarray, int]:
  """Returns (int16 first-channel waveform at target_sample_rate, source sample rate)."""
  path = os.fspath(path)
  with _open(path) as container:
    sink = _audio_sink(path, container, target_sample_rate, max_seconds)
    _drain(path, container, [sink])
    return sink.waveform(), sink.source_sample_rate


def decode_frames(path: str | os.PathLike,
                  num_frames: int = 10,
                  image_size: int = 224,
                  *,
                  decoder_threads: int = 0) -> tuple[np.ndarray, np.ndarray, float, int]:
  """Returns (upright uint8 RGB frames [n, size, size, 3], int32 indices, fps, frame count).

  `decoder_threads` as `decode_clip`.
  """
  path = os.fspath(path)
  with _open(path) as container:
    sink = _frame_sink(path, container, num_frames, image_size, decoder_threads)
    _drain(path, container, [sink])
    return sink.frames(), sink.indices, sink.fps, sink.frame_count


# `frame_indices` of frames read from the original's extracted layout: their source frame numbers
# are not known (nor its fps or frame count, stored as 0).
EXTRACTED_FRAME_INDEX = -1


@dataclasses.dataclass(frozen=True)
class ClipMedia:
  """What a record keeps of a clip's media: its audio, its frames as JPEG, and source facts."""

  waveform: np.ndarray  # int16 [num_samples], 16 kHz, first channel, at most max_seconds.
  jpeg_frames: list[bytes]  # [num_frames] JPEG (quality 75) of the frames DecodedClip holds.
  frame_indices: np.ndarray  # int [num_frames]; EXTRACTED_FRAME_INDEX for the extracted layout.
  duration_s: float  # Container duration in seconds (of the audio file, extracted layout).
  source_sample_rate: int  # Sample rate of the audio stream before resampling.
  fps: float  # As DecodedClip; 0.0 for the extracted layout.
  frame_count: int  # As DecodedClip; 0 for the extracted layout.
  rotation: int = 0  # As DecodedClip.


def extracted_frame_path(frames_dir: str, video_id: str, index: int) -> str:
  """Where the original's extract_video_frame.py writes frame `index` of a clip."""
  return f'{frames_dir.rstrip("/")}/frame_{index}/{video_id}.jpg'


def read_extracted_frame(path: str, image_size: int = 224) -> bytes:
  """One extracted frame's JPEG bytes, checked to be an RGB JPEG of image_size x image_size."""
  if is_local_path(path):
    try:
      mode = os.stat(path).st_mode
      if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # reading a FIFO would block
        raise DecodeError(path, 'bad_frame', f'{path} is {_special_kind(mode)}, not a file')
      with open(path, 'rb') as f:
        data = f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
      raise DecodeError(path, 'missing_frame', f'no file {path}') from None
    except OSError as e:
      raise DecodeError(path, 'bad_frame', f'{path} cannot be read: {e.strerror}') from None
  else:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only for remote paths)
    try:
      with tf.io.gfile.GFile(path, 'rb') as f:
        data = f.read()
    except tf.errors.NotFoundError:
      raise DecodeError(path, 'missing_frame', f'no file {path}') from None
    except tf.errors.OpError as e:
      raise DecodeError(path, 'bad_frame', f'{path} cannot be read: {e.message}') from None
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      kind, mode, size = image.format, image.mode, image.size
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types)
    raise DecodeError(path, 'bad_frame', f'{path} is not a readable image ({e})') from None
  if kind != 'JPEG' or mode != 'RGB' or size != (image_size, image_size):
    raise DecodeError(path, 'bad_frame', f'{path} is {kind} {mode} {size[0]}x{size[1]}, '
                      f'expected an RGB JPEG of {image_size}x{image_size}')
  # PIL reads past some damage that libjpeg as TensorFlow calls it refuses (about 1 in 100
  # copies of a frame with 20 flipped bits): such a record would stop training later.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (writers of records have it)
  from cav_mae_jax.data import augment  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.data import records  # pylint: disable=g-import-not-at-top
  try:
    augment.decode_one_jpeg(data)
  except tf.errors.OpError as e:
    raise DecodeError(path, 'bad_frame', f'{path} is damaged: the input pipeline\'s JPEG decoder '
                      f'(TensorFlow) rejects it: {records.op_error_text(e)}') from None
  return data


def _is_dir(path: str) -> bool:
  if is_local_path(path):
    return os.path.isdir(path)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only for remote paths)
  return tf.io.gfile.isdir(path)


def read_clip_media(path: str | os.PathLike, frames_dir: str = '', video_id: str = '', *,
                    num_frames: int = 10, image_size: int = 224,
                    target_sample_rate: int = 16000,
                    max_seconds: float | None = 10.0,
                    decoder_threads: int = 0) -> ClipMedia:
  """A video's audio and JPEG-encoded frames (`decode_clip`), or, with `frames_dir`, the
  original's extracted layout: `path` is the audio file and the frames are read as stored."""
  path = os.fspath(path)
  if not frames_dir:
    clip = decode_clip(path, num_frames=num_frames, image_size=image_size,
                       target_sample_rate=target_sample_rate, max_seconds=max_seconds,
                       decoder_threads=decoder_threads)
    return ClipMedia(clip.waveform, [encode_jpeg(frame) for frame in clip.frames],
                     clip.frame_indices, clip.duration_s, clip.source_sample_rate, clip.fps,
                     clip.frame_count, clip.rotation)
  try:
    frames = [read_extracted_frame(extracted_frame_path(frames_dir, video_id, i), image_size)
              for i in range(num_frames)]
  except DecodeError as e:
    if e.reason == 'missing_frame' and not _is_dir(frames_dir):
      raise DecodeError(e.path, 'missing_frame', f'{e.detail}: the frames folder {frames_dir} '
                        '(the entry\'s video_path) does not exist') from None
    raise
  with _open(path) as container:
    sink = _audio_sink(path, container, target_sample_rate, max_seconds)
    _drain(path, container, [sink])
    return ClipMedia(sink.waveform(), frames, np.full(num_frames, EXTRACTED_FRAME_INDEX),
                     _container_duration_s(container), sink.source_sample_rate, fps=0.0,
                     frame_count=0)


def decode_clip(path: str | os.PathLike,
                *,
                num_frames: int = 10,
                image_size: int = 224,
                target_sample_rate: int = 16000,
                max_seconds: float | None = 10.0,
                decoder_threads: int = 0) -> DecodedClip:
  """Decodes a clip's audio and frames in one pass over the file.

  `decoder_threads`: the video decoder's threads. 0 lets FFmpeg choose (a thread per core:
  lower latency for one clip); 1 where each process is one core's worth of work, as the
  preprocessing and TFDS workers are, since FFmpeg's threads there only cost CPU time (a 360p
  camera clip, unpinned on 2 cores: median 233 ms of CPU with them, 192 without). The frames are
  the same either way.
  """
  path = os.fspath(path)
  with _open(path) as container:
    audio = _audio_sink(path, container, target_sample_rate, max_seconds)
    video = _frame_sink(path, container, num_frames, image_size, decoder_threads)
    _drain(path, container, [audio, video])
    return DecodedClip(
        waveform=audio.waveform(),
        frames=video.frames(),
        frame_indices=video.indices,
        duration_s=_container_duration_s(container),
        source_sample_rate=audio.source_sample_rate,
        fps=video.fps,
        frame_count=video.frame_count,
        rotation=video.rotation or 0)
