"""Train an IP-Adapter (frozen SD UNet, VAE, text and image encoders; trained
image projection + to_k_ip/to_v_ip), from one device to many hosts.

    python train.py --config configs/sd15_ip_adapter.py --config.model.pretrained=SD_DIR \\
        --config.model.image_encoder=ENC_DIR --config.data.json_file=data.json --config.data.image_root=imgs/
    python train.py --config configs/tiny.py ...            # a small smoke run
    python train.py --config ... --export-only [--step N]   # export a checkpoint's adapter (official format)
    python train.py --config configs/demo/clip.py           # the demo recipe's stages: clip, vae, unet,
                                                            # ip_adapter (see configs/demo/__init__.py)

Every config field can be overridden with --config.FIELD=VALUE (the config is locked: typos fail).
Resumes automatically from the latest checkpoint in the workdir. Multi-host: launch one process per host
with JAX's coordinator environment set (or --coordinator/--num-processes/--process-id); the same command
runs on 1 device, N local devices or several hosts. Logs: <workdir>/metrics.csv and a progress bar.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config()).", lock_config=True)
_EXPORT_ONLY = flags.DEFINE_bool("export_only", False, "Only export the adapter of a checkpoint, then exit.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step for --export_only (default: latest).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")


def main(argv):
    del argv
    import jax

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if _COORDINATOR.value:
        # Only affects CPU collectives (GPU/TPU use their own); must precede any backend use.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    from ipadapter_jax.training import loop

    cfg = _CONFIG.value
    if cfg is None:
        sys.exit("train.py: --config is required (e.g. --config configs/sd15_ip_adapter.py)")
    if cfg.get("task", "ip_adapter") != "ip_adapter":   # the demo's base-model stages (configs/demo/)
        from ipadapter_jax.demo import recipe

        print(f"done: {recipe.run_stage(cfg)}")
        return 0
    if _EXPORT_ONLY.value:
        print(f"exported {loop.export_checkpoint(cfg, _STEP.value)}")
        return 0
    try:
        summary = loop.train(cfg)
    except loop.TrainingError as e:
        sys.exit(f"train.py: {e}")
    print(f"done: {summary}")
    return 0


if __name__ == "__main__":
    app.run(main)
