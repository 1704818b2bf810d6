"""Params-only snapshots: what import_torch writes and what sampling/fine-tuning start from.

<workdir>/<stage>/weights/ holds {'params', 'ema_params'} (orbax, written to a temp dir and
renamed, so a kill never leaves half a snapshot) and meta.json (source file, which weights, the
model config). <workdir>/<stage>/checkpoints/ holds full TrainStates of our own runs; inference
prefers the newest checkpoint and falls back to the snapshot.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from rae_jax import storage
from rae_jax.atomic import recover_dir, replace_dir
from rae_jax.train import multihost

WEIGHTS = "weights"
META = "meta.json"


def weights_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, WEIGHTS)


def has_weights(workdir: str, stage: str) -> bool:
  if not storage.is_remote(workdir):
    recover_dir(weights_dir(workdir, stage))
  return storage.exists(os.path.join(weights_dir(workdir, stage), META))


def save_weights(workdir: str, stage: str, params: Any, ema_params: Optional[Any] = None,
                 meta: Optional[dict] = None) -> str:
  """Atomically (re)writes the snapshot; every process calls it, process 0 publishes it.

  Local/NFS: written to `weights.tmp` and renamed. Object stores (no directory rename): meta.json
  is the snapshot's commit marker; it is deleted first and written last, so a kill in between
  leaves no snapshot (redo the import), never a mix of two."""
  final = weights_dir(workdir, stage)
  remote = storage.is_remote(final)
  tmp = final if remote else final + ".tmp"
  if jax.process_index() == 0:
    if remote and storage.exists(os.path.join(final, META)):
      storage.remove(os.path.join(final, META))
    if storage.exists(tmp):
      storage.rmtree(tmp)
  multihost.barrier(f"save_weights {final}")
  tree = {"params": params, "ema_params": params if ema_params is None else ema_params}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(storage.abspath(os.path.join(tmp, "tree")), tree)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    storage.write_text(os.path.join(tmp, META),
                       json.dumps(dict(meta or {}), indent=2, default=str))
    if not remote:
      replace_dir(tmp, final)
  return final


def load_weights(workdir: str, stage: str, abstract: Optional[Any] = None) -> tuple[dict, dict]:
  """-> ({'params', 'ema_params'}, meta). `abstract` (ShapeDtypeStructs with shardings for the
  {'params','ema_params'} tree) restores straight into the wanted layout."""
  d = weights_dir(workdir, stage)
  if not storage.exists(os.path.join(d, META)):
    raise FileNotFoundError(f"{d}: no weights snapshot (run --mode=import_torch or train first)")
  meta = json.loads(storage.read_text(os.path.join(d, META)))
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(storage.abspath(os.path.join(d, "tree")), abstract)
  return tree, meta


def checkpoint_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "checkpoints")


def latest_checkpoint_step(workdir: str, stage: str) -> Optional[int]:
  d = checkpoint_dir(workdir, stage)
  if not storage.isdir(d):
    return None
  with ocp.CheckpointManager(storage.abspath(d), item_names=("state",)) as m:
    return m.latest_step()


def _partial_restore_args(abstract: dict) -> ocp.args.PyTreeRestore:
  """Restore only the subtree in `abstract` (the rest of the checkpoint is never read)."""
  return ocp.args.PyTreeRestore(item=abstract,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                partial_restore=True)


def load_params(workdir: str, stage: str, mesh, which: str = "ema") -> tuple[Any, str]:
  """Inference weights of a stage: newest intact training checkpoint, else the snapshot.

  Only the requested subtree (EMA or params) is read, straight into FSDP shardings over `mesh`
  whatever the layout it was saved with (so a run trained on a pod samples on one host): the
  other weights and the Adam moments are never loaded. Its checksums are verified; a damaged
  newest step is moved aside and the previous one used. which: 'ema' or 'params'.
  Returns (params, description).
  """
  from rae_jax.train import checkpoint as ckpt_lib
  from rae_jax.train import sharding as sharding_lib
  if which not in ("ema", "params"):
    raise ValueError(f"which={which!r}: use 'ema' or 'params'")
  key = "ema_params" if which == "ema" else "params"

  def abstract_of(meta_tree):
    tree = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta_tree)
    shard = sharding_lib.fsdp_shardings(tree, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                        shard)

  d = storage.abspath(checkpoint_dir(workdir, stage))
  if latest_checkpoint_step(workdir, stage) is not None:
    handlers = {**ckpt_lib.item_handlers(), "state": ocp.PyTreeCheckpointHandler()}
    with ocp.CheckpointManager(d, item_handlers=handlers) as m:

      def restore_step(step):
        meta = m.item_metadata(step)["state"]
        if meta is None or key not in meta:
          raise ckpt_lib.DamagedCheckpoint(f"{d}/{step}: no '{key}' in the state metadata")
        abstract = {key: abstract_of(dict(meta)[key])}
        out = m.restore(step, args=ocp.args.Composite(state=_partial_restore_args(abstract),
                                                      integrity=ocp.args.JsonRestore()))
        sums = dict(out.get("integrity") or {}).get("state")
        if sums:
          ckpt_lib.verify(out["state"], sums, f"checkpoint step {step} in {d}")
        return out["state"][key]

      steps = list(m.all_steps())
      if steps:
        step, params = ckpt_lib.restore_newest_intact(d, steps, restore_step, m.reload)
        return params, f"{d} step {step} ({key})"
  if has_weights(workdir, stage):
    t = storage.abspath(os.path.join(weights_dir(workdir, stage), "tree"))
    with ocp.PyTreeCheckpointer() as ckptr:
      abstract = {key: abstract_of(dict(ckptr.metadata(t).item_metadata)[key])}
      tree = ckptr.restore(t, args=_partial_restore_args(abstract))
    return tree[key], f"{weights_dir(workdir, stage)} ({key})"
  raise FileNotFoundError(
      f"no weights for '{stage}' in {workdir}: neither {checkpoint_dir(workdir, stage)} nor "
      f"{weights_dir(workdir, stage)} exists (train that stage or run --mode=import_torch)")
