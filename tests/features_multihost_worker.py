"""One process of the 2-process feature test: clip ids and rows of batches split over processes.

  python tests/features_multihost_worker.py PROCESS_ID NUM_PROCESSES COORDINATOR_PORT RECORDS_DIR

Each process sees 4 CPU devices (XLA_FLAGS set by the caller) and joins the other through
`jax.distributed` (multihost_worker's launch helpers). It prints one JSON line: the ids and outputs of an in-memory pass
(13 rows, global batch 8), of a records pass with a subset list (each process reads its own
shards), the clips the retrieval evaluator takes, and every process's strings gathered.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(process_id: int, num_processes: int, port: int, records_dir: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from multihost_worker import initialize_distributed  # pylint: disable=import-outside-toplevel
  initialize_distributed(process_id, num_processes, port)
  from cav_mae_jax.eval import clips, features  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from test_features import tiny_config  # pylint: disable=import-outside-toplevel
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  arrays = {"audio": np.arange(26, dtype=np.float32).reshape(13, 2)}
  array_ids, array_out = features.run_on_mesh(
      lambda p, b: {"x": b["audio"] * p}, 2.0, clips.array_batches(arrays, 8), mesh,
      input_keys=("audio",))
  # The same pass on a mesh asked for with the processes' devices interleaved (as TPU's
  # topology-aware order can give): make_mesh makes it process-major again.
  interleaved = sorted(jax.devices(), key=lambda d: (d.id % jax.local_device_count(),
                                                     d.process_index))
  interleaved_mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)),
                                        interleaved)
  interleaved_ids, interleaved_out = features.run_on_mesh(
      lambda p, b: {"x": b["audio"] * p}, 2.0, clips.array_batches(arrays, 8), interleaved_mesh,
      input_keys=("audio",))
  subset = ["clip0", "clip1", "clip2", "clip4", "clip6"]
  record_ids, record_out = features.run_on_mesh(
      lambda p, b: {"mean": b["audio"].mean(axis=(1, 2)) + p}, 0.0,
      clips.record_batches(tiny_config(records_dir), 8, video_ids=subset), mesh)
  retrieval_audio, _ = retrieval_evaluator(mesh, records_dir).features(0.0)
  print(json.dumps({"array_ids": list(array_ids), "array_x": array_out["x"].tolist(),
                    "retrieval_audio": retrieval_audio.reshape(-1).tolist(),
                    "interleaved_requested": [d.process_index for d in interleaved],
                    "interleaved_ids": list(interleaved_ids),
                    "interleaved_x": interleaved_out["x"].tolist(),
                    "record_ids": list(record_ids), "record_mean": record_out["mean"].tolist(),
                    "gathered": clips.allgather_strings([f"p{process_id}"] * (process_id + 1))}),
        flush=True)
  jax.distributed.shutdown()


def retrieval_evaluator(mesh, records_dir: str, max_clips: int = 4):
  """A retrieval evaluator of the records whose 'features' are each clip's mean fbank value."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.eval import common, retrieval  # pylint: disable=import-outside-toplevel
  from test_features import tiny_config  # pylint: disable=import-outside-toplevel
  entry = ml_collections.ConfigDict(dict(
      type="retrieval", split="eval", dir="", every_steps=0, every_epochs=0.0, at_start=False,
      batch_size=8, max_clips=max_clips))
  features = lambda p, b: (b["audio"].mean(axis=(1, 2))[:, None] + p,  # noqa: E731
                           b["image"].mean(axis=(1, 2, 3))[:, None])
  return retrieval.RetrievalEvaluator("retrieval", entry, {"features": features}, mesh,
                                      common.records_batch_source(tiny_config(records_dir)))


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
