"""Restart cost: wall time from process start to the first finished step after a restart.

  python bench/restart.py [--models demo,ditdh_s] [--dir /tmp/rae_restart_bench]

For each model, a stage-2 run of the demo (configs/demo.py; `ditdh_s` swaps in DiTDH-S's
transformer, hidden (384, 2048), depth (12, 2), heads (6, 16), on the demo's 4x4x64 latents) is
trained to its step-3 checkpoint, then restarted through the real CLI (main.py, a new process)
to run step 4, twice: with an empty compilation cache (cold) and with the cache the cold restart
filled (warm). The step-4 checkpoint is removed between the two, so both restart from step 3.

Columns: total = process start (the parent's clock just before it starts the child) to the end
of step 4; compile = JAX tracing + lowering + XLA compile or persistent-cache load (jax.monitoring
events); checkpoint restore = Checkpointer.restore (orbax read + checksum verification); data
iterator restore = the rest of loop.resume (rewinding the data pipeline), both net of the compiles
they trigger (counted under compile); other = the remainder
(interpreter and library imports, model construction, the step itself).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--config.stage1.optim.num_steps=1", "--config.checkpoint.every_steps=3",
        "--config.log.every_steps=1", "--config.data.synthetic_size=200",
        "--config.checkpoint.async_save=false"]
MODELS = {
    "demo": [],
    "ditdh_s": ["--config.model.hidden_size=(384, 2048)", "--config.model.depth=(12, 2)",
                "--config.model.num_heads=(6, 16)"],
}


def child(out_path: str, t0: float, stop_step: int) -> None:
  """main.py in this process, timing its phases; writes them to `out_path` at step `stop_step`."""
  import logging
  import jax
  from rae_jax.train import checkpoint as ckpt_lib
  from rae_jax.train import loop as loop_lib
  times = {"compile": 0.0, "restore": 0.0, "resume": 0.0, "compile_in_restore": 0.0,
           "compile_in_resume": 0.0}
  active = set()
  events = ("/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")

  def on_duration(event, duration, **_):
    if event in events:
      times["compile"] += duration
      for key in active:  # compile time is reported once, in its own column
        times[f"compile_in_{key}"] += duration
  jax.monitoring.register_event_duration_secs_listener(on_duration)

  def timed(key, fn):
    def wrapper(*a, **k):
      t = time.perf_counter()
      active.add(key)
      try:
        return fn(*a, **k)
      finally:
        active.discard(key)
        times[key] += time.perf_counter() - t
    return wrapper
  ckpt_lib.Checkpointer.restore = timed("restore", ckpt_lib.Checkpointer.restore)
  loop_lib.resume = timed("resume", loop_lib.resume)

  class Done(logging.Handler):
    def emit(self, record):
      if f"] step {stop_step}/" in record.getMessage():
        total = time.time() - t0
        with open(out_path, "w") as f:
          json.dump(dict(times, total=total), f)
  logging.getLogger().addHandler(Done())
  import runpy
  sys.argv = [os.path.join(REPO, "main.py")] + sys.argv[sys.argv.index("--") + 1:]
  runpy.run_path(os.path.join(REPO, "main.py"), run_name="__main__")


def _run(args, env, what):
  proc = subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=env,
                        capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{what} failed: {proc.stderr[-3000:]}")


def restart(work, model_args, cache, env) -> dict:
  out = os.path.join(work, "restart.json")
  t0 = time.time()
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--child", out, str(t0), "4", "--",
       "--config=configs/demo.py", f"--workdir={work}", "--mode=train_stage2", *FAST,
       *model_args, "--config.stage2.optim.num_steps=4", f"--config.compilation_cache.dir={cache}"],
      cwd=REPO, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"restart failed: {proc.stderr[-3000:]}")
  with open(out) as f:
    return json.load(f)


def main():
  if "--child" in sys.argv:
    i = sys.argv.index("--child")
    child(sys.argv[i + 1], float(sys.argv[i + 2]), int(sys.argv[i + 3]))
    return
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="demo,ditdh_s")
  p.add_argument("--dir", default=None)
  args = p.parse_args()
  root = args.dir or tempfile.mkdtemp(prefix="rae_restart_bench")
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.setdefault("JAX_PLATFORMS", "cpu")
  if env["JAX_PLATFORMS"] == "cpu":
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  rows = []
  for name in args.models.split(","):
    work = os.path.join(root, name)
    shutil.rmtree(work, ignore_errors=True)
    base = ["--config=configs/demo.py", f"--workdir={work}", *FAST, *MODELS[name],
            f"--config.compilation_cache.dir={os.path.join(root, name + '_prep_cache')}"]
    _run(base + ["--mode=train_stage1"], env, "stage 1")
    _run(base + ["--mode=stats"], env, "stats")
    _run(base + ["--mode=train_stage2", "--config.stage2.optim.num_steps=3"], env, "stage 2")
    cache = os.path.join(root, name + "_cache")
    shutil.rmtree(cache, ignore_errors=True)
    for kind in ("cold", "warm"):
      shutil.rmtree(os.path.join(work, "stage2", "checkpoints", "4"), ignore_errors=True)
      t = restart(work, MODELS[name], cache, env)
      restore = t["restore"] - t["compile_in_restore"]  # net of the compiles inside them
      resume = t["resume"] - t["compile_in_resume"]
      rows.append((name, kind, t["total"], t["compile"], restore, resume - restore,
                   t["total"] - t["compile"] - resume))
  import jax
  print(f"\nRestart cost (process start -> first finished step after a restart from a step-3 "
        f"checkpoint; {jax.devices()[0].platform}, {os.cpu_count()} CPU cores)\n")
  print("| model | compilation cache | total (s) | compile (s) | checkpoint restore (s) | "
        "data iterator restore (s) | other (s) |")
  print("|---|---|---|---|---|---|---|")
  for name, kind, total, comp, rest, data, other in rows:
    print(f"| {name} | {kind} | {total:.1f} | {comp:.1f} | {rest:.2f} | {data:.2f} | {other:.1f} |")


if __name__ == "__main__":
  main()
