"""Writes the AV1 clips the key-frame tests decode (tests/data/av1_*), with PyAV's SVT-AV1.

Stored rather than encoded by the tests: SVT-AV1's encoder has hung inside
`svt_av1_enc_get_packet` in a test run (2026-12-05), so the suite encodes AV1 only where it
must (tests/test_decode_formats.py). Regenerate from the repository root:

  python tests/data/make_av1_clips.py

Files: av1_key24.webm and av1_key24.mp4, 250 frames showing their number
(`synthetic.numbered_frames`, 96 x 64, 25 fps) with a key frame every 24 frames (SVT-AV1's
hidden frames and show_existing_frame between them); av1_key24_sequence_header_at_64.webm, the
same stream with its sequence header repeated (the same bytes) in frame 64's packet.
"""

from __future__ import annotations

import os
import sys

import av

from cav_mae_jax.data import decode, synthetic

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DATA_DIR))  # tests/
from test_decode import _obu  # pylint: disable=g-import-not-at-top,wrong-import-position


def write(path: str, container_format: str, repeat_sequence_header_at: int | None = None) -> None:
  with av.open(path, 'w', format=container_format) as container:
    stream = container.add_stream('libsvtav1', rate=25, options={'g': '24'})
    stream.width, stream.height, stream.pix_fmt = 96, 64, 'yuv420p'
    sequence_header = None
    for i, pixels in enumerate([*synthetic.numbered_frames(250), None]):
      frame = None
      if pixels is not None:
        frame = av.VideoFrame.from_ndarray(pixels, format='rgb24')
        frame.pts = i
      for packet in stream.encode(frame):
        data = bytes(packet)
        obus = decode._av1_obus(data)  # pylint: disable=protected-access
        if sequence_header is None:  # the first key frame brings it
          sequence_header = next(_obu(1, data[start:start + size])
                                 for kind, start, size in obus if kind == 1)
        elif packet.pts == repeat_sequence_header_at:
          assert obus[0][:2] == (2, 2) and all(kind != 1 for kind, _, _ in obus)
          copy = av.Packet(data[:2] + sequence_header + data[2:])  # after the delimiter
          copy.pts, copy.dts, copy.time_base = packet.pts, packet.dts, packet.time_base
          copy.stream, packet = stream, copy
        container.mux(packet)


def main() -> None:
  write(os.path.join(DATA_DIR, 'av1_key24.webm'), 'webm')
  write(os.path.join(DATA_DIR, 'av1_key24.mp4'), 'mp4')
  write(os.path.join(DATA_DIR, 'av1_key24_sequence_header_at_64.webm'), 'webm', 64)


if __name__ == '__main__':
  main()
