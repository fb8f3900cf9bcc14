"""The ``automodel`` / ``nemo-bard`` front door.

Accepted forms::

    automodel finetune --config conf/bard_pbm.yaml [--nproc-per-node N] [k=v ...] [--a.b=c ...]
    automodel conf/bard_pbm.yaml [--nproc-per-node N] [--a.b=c ...]      # NeMo AutoModel 0.7's own form
    nemo-bard finetune --config conf/bard_swd.yaml stage=swd model=qwen3vl_4b step_scheduler.max_steps=10
    nemo-bard finetune --config conf/bard_pbm.yaml --print-resolved [k=v ...]   # compose only (SLURM)

A config with a Hydra ``defaults:`` list (the files under ``conf/``), or any
Hydra-style ``key=value`` override, is composed with Hydra; NeMo-style
``--a.b=c`` overrides are applied on top with NeMo's own value parsing; the
resolved YAML is written into the run directory (``checkpoint.checkpoint_dir``)
and that file is handed to ``nemo_automodel.cli.app``. Any other config goes to
``nemo_automodel.cli.app`` unchanged. ``--nproc-per-node N`` (N > 1) starts
``torchrun -m nemo_bard.cli`` so every worker re-reads the same resolved file;
on a CPU-only host the workers use gloo (``nemo_bard.cpu``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

COMMANDS = ("finetune", "train", "pretrain", "kd")
RESOLVED_NAME = "resolved_config.yaml"


class CLIError(ValueError):
    """A usage error; the message names the argument and the fix."""


def split_argv(argv: list[str]) -> tuple[Path, int | None, list[str], list[str]]:
    """Split argv into (config path, nproc, Hydra overrides, NeMo-style overrides)."""
    args = [a for a in argv if a != "--print-resolved"]
    config: str | None = None
    if args and args[0] in COMMANDS:
        args = args[1:]
    elif args and not args[0].startswith("-") and "=" not in args[0]:
        config = args.pop(0)
    nproc: int | None = None
    hydra: list[str] = []
    nemo: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if tok in ("--config", "-c"):
            if i + 1 >= len(args):
                raise CLIError("--config needs a path: automodel finetune --config conf/bard_pbm.yaml")
            config = args[i + 1]
            i += 2
        elif tok.startswith("--config="):
            config = tok.split("=", 1)[1]
            i += 1
        elif tok.startswith(("--nproc-per-node", "--nproc_per_node")):
            if "=" in tok:
                value = tok.split("=", 1)[1]
                i += 1
            else:
                if i + 1 >= len(args):
                    raise CLIError("--nproc-per-node needs a number")
                value = args[i + 1]
                i += 2
            try:
                nproc = int(value)
            except ValueError:
                raise CLIError(f"--nproc-per-node expects an integer, got {value!r}") from None
        elif tok.startswith("--"):
            if "=" not in tok and i + 1 < len(args) and not args[i + 1].startswith("--") and "=" not in args[i + 1]:
                nemo += [tok, args[i + 1]]
                i += 2
            else:
                nemo.append(tok)
                i += 1
        elif "=" in tok or tok.startswith("~"):
            hydra.append(tok)
            i += 1
        else:
            raise CLIError(
                f"unexpected argument {tok!r}. Usage: automodel finetune --config CONFIG.yaml [key=value ...] "
                "[--nproc-per-node N]"
            )
    if config is None:
        raise CLIError("no config given. Usage: automodel finetune --config conf/bard_pbm.yaml [key=value ...]")
    path = Path(config)
    if not path.is_file():
        raise CLIError(f"config file {config!r} does not exist (looked in {Path.cwd()})")
    return path.resolve(), nproc, hydra, nemo


def _needs_hydra(config: Path, hydra_overrides: list[str]) -> bool:
    import yaml

    with open(config) as f:
        raw = yaml.safe_load(f) or {}
    return bool(hydra_overrides) or (isinstance(raw, dict) and "defaults" in raw)


def _set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    node = cfg
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def compose(config: Path, hydra_overrides: list[str], nemo_overrides: list[str]) -> dict:
    """Compose ``config`` with Hydra, resolve interpolations, apply NeMo-style ``--a.b=c`` overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from nemo_automodel.components.config._arg_parser import parse_cli_argv
    from nemo_automodel.components.config.loader import translate_value

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config.parent), version_base=None):
            cfg = hydra_compose(config_name=config.stem, overrides=hydra_overrides)
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise CLIError(f"could not compose {config} with overrides {hydra_overrides}: {exc}") from None
    finally:
        GlobalHydra.instance().clear()
    _, overrides = parse_cli_argv(str(config), nemo_overrides)
    for kv in overrides:
        dotted, value = kv.split("=", 1)
        _set_dotted(resolved, dotted, translate_value(value))
    return resolved


def write_resolved(cfg: dict, config: Path) -> Path:
    """Write the resolved config into the run directory and return its path."""
    import yaml

    run_dir = (cfg.get("checkpoint") or {}).get("checkpoint_dir")
    if not run_dir:
        run_dir = os.path.join("outputs", f"{config.stem}_{time.strftime('%Y%m%d_%H%M%S')}")
        cfg.setdefault("checkpoint", {})["checkpoint_dir"] = run_dir
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESOLVED_NAME
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path.resolve()


def _is_torchrun_worker() -> bool:
    return "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ


def run_nemo_app(config: Path, extra: list[str]) -> int:
    """Hand ``config`` to ``nemo_automodel.cli.app`` in this process (CPU patches applied when needed)."""
    import nemo_bard  # noqa: F401  registers bard_vl before any from_pretrained
    from nemo_bard.cpu import apply_cpu_patches

    apply_cpu_patches()
    from nemo_automodel.cli import app

    argv = sys.argv
    sys.argv = ["automodel", str(config), *extra]
    try:
        result = app.main()
    finally:
        sys.argv = argv
    return int(result or 0)


def launch(config: Path, nproc: int | None, extra: list[str]) -> int:
    """Run in-process (one worker) or under torchrun (``nproc`` > 1)."""
    if _is_torchrun_worker():
        return run_nemo_app(config, extra)
    if nproc is None:
        import torch

        nproc = torch.cuda.device_count() if torch.cuda.is_available() else 1
    if nproc <= 1:
        return run_nemo_app(config, [*extra, "--nproc-per-node", "1"])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "nemo_bard.cli", str(config), *extra,
    ]
    print("nemo-bard: launching " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``automodel`` and ``nemo-bard`` console scripts."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        config, nproc, hydra_overrides, nemo_overrides = split_argv(argv)
        print_only = "--print-resolved" in argv
        if not print_only and (_is_torchrun_worker() or not _needs_hydra(config, hydra_overrides)):
            return launch(config, nproc, nemo_overrides)
        resolved = write_resolved(compose(config, hydra_overrides, nemo_overrides), config)
    except CLIError as exc:
        print(f"automodel: error: {exc}", file=sys.stderr)
        return 2
    if print_only:  # for launchers (SLURM): compose once, print the file every worker will read
        print(resolved, flush=True)
        return 0
    print(f"nemo-bard: resolved config written to {resolved}", flush=True)
    return launch(resolved, nproc, [])


if __name__ == "__main__":
    sys.exit(main())
