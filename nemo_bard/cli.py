"""The ``automodel`` / ``nemo-bard`` front door.

Accepted forms::

    automodel finetune --config conf/bard_pbm.yaml [--nproc-per-node N] [k=v ...] [--a.b=c ...]
    automodel conf/bard_pbm.yaml [--nproc-per-node N] [--a.b=c ...]      # NeMo AutoModel 0.7's own form
    nemo-bard finetune --config conf/bard_swd.yaml stage=swd model=qwen3vl_4b step_scheduler.max_steps=10
    nemo-bard finetune --config conf/bard_pbm.yaml --print-resolved [k=v ...]   # compose only (SLURM)
    nemo-bard serve --model DIR [...]                       # the OpenAI-compatible server (nemo_bard.serve)

A config with a Hydra ``defaults:`` list (the files under ``conf/``), or any
Hydra-style ``key=value`` override, is composed with Hydra; NeMo-style
``--a.b=c`` overrides are applied on top (``OmegaConf.update``, values parsed the
way NeMo AutoModel parses them, without importing it); the resolved YAML is written into the run
directory (``checkpoint.checkpoint_dir``) and that file is handed to
``nemo_automodel.cli.app``. Any other config goes to
``nemo_automodel.cli.app`` unchanged. ``--nproc-per-node N`` (N > 1) runs
torchrun's agent (``torch.distributed.run``) on ``-m nemo_bard.cli`` so every worker re-reads the same resolved file;
on a CPU-only host the recipes run with gloo (``nemo_bard.integrations.cpu``).

Before anything heavy is imported, a BARD config is checked (sections, schedule, parallelism, the
dataset / model / teacher paths) and the run directory is locked (one run per directory; torchrun
workers share the launcher's lock). Errors a user acts on print one line and exit 2 (``--debug`` or
``NEMO_BARD_DEBUG=1`` shows the traceback); a run stopped by SIGTERM / SIGINT saves a checkpoint and
exits 128 + the signal number (resume with the same command).
"""

from __future__ import annotations

import argparse
import ast
import errno
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nemo_bard.errors import DEBUG_ENV, DiskFullError, UserError, run_reported
from nemo_bard.rundir import RunLock, check_run_dir_free, disk_full_message

COMMANDS = ("finetune", "train", "pretrain", "kd")
RESOLVED_NAME = "resolved_config.yaml"
USAGE = "automodel finetune --config CONFIG.yaml [key=value ...] [--a.b=c ...] [--nproc-per-node N] [--debug]"
# torchrun waits this long for workers to finish their step and save a checkpoint after a stop signal
SHUTDOWN_TIMEOUT_S = 900
PROG_ENV = "NEMO_BARD_PROG"
_prog = "automodel"  # the program name of this invocation (set by main)


class CLIError(UserError):
    """A usage error; the message names the argument and the fix."""


@dataclass
class Invocation:
    """A parsed command line."""

    config: Path
    nproc: int | None = None
    print_resolved: bool = False
    debug: bool = False
    hydra: list[str] = field(default_factory=list)  # Hydra overrides: key=value, ~key
    nemo: list[str] = field(default_factory=list)  # NeMo-style tokens as typed: --a.b=c, --a.b c, --flag


def nemo_overrides(tokens: list[str]) -> list[tuple[str, str]]:
    """``(dotted key, raw value)`` of NeMo-style tokens (``--a.b=c``, ``--a.b c``; a bare ``--flag`` is ``true``)."""
    out, i = [], 0
    while i < len(tokens):
        key = tokens[i].lstrip("-")
        if "=" in key:
            out.append(tuple(key.split("=", 1)))
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            out.append((key, tokens[i + 1]))
            i += 2
        else:
            out.append((key, "true"))
            i += 1
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="automodel", usage=USAGE, add_help=False, allow_abbrev=False,
                                     exit_on_error=False)
    parser.add_argument("-c", "--config")
    parser.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc")
    parser.add_argument("--print-resolved", action="store_true")
    parser.add_argument("--debug", action="store_true")
    return parser


def parse_argv(argv: list[str]) -> Invocation:
    """Parse both CLI forms (``finetune --config X`` and NeMo's ``X``) plus overrides; checks the config exists."""
    try:
        args, rest = _parser().parse_known_args(argv)
    except argparse.ArgumentError as exc:
        if exc.argument_name and "config" in exc.argument_name:
            raise CLIError(f"--config needs a path: {USAGE}") from None
        if exc.argument_name and "nproc" in exc.argument_name:
            raise CLIError("--nproc-per-node needs a number") from None
        raise CLIError(str(exc)) from None
    nproc = None
    if args.nproc is not None:
        try:
            nproc = int(args.nproc)
        except ValueError:
            raise CLIError(f"--nproc-per-node expects an integer, got {args.nproc!r}") from None
    config = args.config
    if rest and rest[0] in COMMANDS:
        rest = rest[1:]
    elif rest and not rest[0].startswith("-") and "=" not in rest[0] and config is None:
        config = rest.pop(0)
    inv = Invocation(config=Path(), nproc=nproc, print_resolved=args.print_resolved, debug=args.debug)
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("--"):
            inv.nemo.append(tok)
            if "=" not in tok and i + 1 < len(rest) and not rest[i + 1].startswith("--") and "=" not in rest[i + 1]:
                inv.nemo.append(rest[i + 1])
                i += 1
        elif "=" in tok or tok.startswith("~"):
            inv.hydra.append(tok)
        else:
            raise CLIError(f"unexpected argument {tok!r}. Usage: {USAGE}")
        i += 1
    if config is None:
        raise CLIError("no config given. Usage: automodel finetune --config conf/bard_pbm.yaml [key=value ...]")
    path = Path(config)
    if not path.is_file():
        raise CLIError(f"config file {config!r} does not exist (looked in {Path.cwd()})")
    inv.config = path.resolve()
    return inv


def split_argv(argv: list[str]) -> tuple[Path, int | None, list[str], list[str]]:
    """Split argv into (config path, nproc, Hydra overrides, NeMo-style tokens)."""
    inv = parse_argv(argv)
    return inv.config, inv.nproc, inv.hydra, inv.nemo


def _needs_hydra(config: Path, hydra_overrides: list[str]) -> bool:
    # start-up: `--help` and config errors answer in ~0.15 s; each library loads on the path that needs it
    import yaml

    with open(config) as f:
        raw = yaml.safe_load(f) or {}
    return bool(hydra_overrides) or (isinstance(raw, dict) and "defaults" in raw)


def compose(config: Path, hydra_overrides: list[str], nemo_tokens: list[str]) -> dict:
    """Compose ``config`` with Hydra, resolve interpolations, then apply NeMo-style ``--a.b=c`` overrides
    (values parsed the way NeMo AutoModel parses them) with ``OmegaConf.update``."""
    # Hydra + OmegaConf: ~0.4 s, only when a config is composed
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config.parent), version_base=None):
            cfg = hydra_compose(config_name=config.stem, overrides=hydra_overrides)
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise CLIError(f"could not compose {config} with overrides {hydra_overrides}: {exc}") from None
    finally:
        GlobalHydra.instance().clear()
    overrides = nemo_overrides(nemo_tokens)
    if not overrides:
        return resolved
    merged = OmegaConf.create(resolved)
    for key, value in overrides:
        OmegaConf.update(merged, key, parse_value(value), merge=False)
    return OmegaConf.to_container(merged)


_SYMBOLS = {"none": None, "None": None, "true": True, "True": True, "false": False, "False": False}


def parse_value(text: str) -> object:
    """The value of a NeMo-style ``--a.b=VALUE`` token, as NeMo AutoModel 0.7 reads it (``translate_value``; the test
    suite compares the two) without importing it (it imports torch): ``none`` / ``true`` / ``false`` in either
    case of their first letter, else a Python literal (number, string, list, dict, ...), else the text itself."""
    if text in _SYMBOLS:
        return _SYMBOLS[text]
    if len(text) > 1000:
        return text
    try:
        return ast.literal_eval(text)
    except Exception:  # noqa: BLE001  anything that is not a literal stays text, as in NeMo
        return text


def check_bard_sections(cfg: dict) -> None:
    """Check a composed BARD recipe config with what needs no model (pydantic and the file system only): the
    ``bard:`` / ``block_merge:`` / ``kd:`` schema, schedule vs ``max_steps``, parallelism, dataset / model /
    teacher paths."""
    recipe = cfg.get("recipe")
    if not (isinstance(recipe, str) and recipe.startswith("nemo_bard.")):
        return
    # pydantic schema: only for BARD recipe configs
    from nemo_bard.recipes.config import check_recipe_config

    check_recipe_config(cfg)


def run_dir_of(cfg: dict) -> str | None:
    """The run directory (``checkpoint.checkpoint_dir``) of a composed config."""
    return (cfg.get("checkpoint") or {}).get("checkpoint_dir")


def write_resolved(cfg: dict, config: Path) -> Path:
    """Write the resolved config into the run directory and return its path.

    A different ``resolved_config.yaml`` already there (the config a checkpoint in that directory was trained
    with) is kept as ``resolved_config.<its time>.yaml``, so a resume, refused or not, never loses it."""
    import yaml

    run_dir = (cfg.get("checkpoint") or {}).get("checkpoint_dir")
    if not run_dir:
        run_dir = os.path.join("outputs", f"{config.stem}_{time.strftime('%Y%m%d_%H%M%S')}")
        cfg.setdefault("checkpoint", {})["checkpoint_dir"] = run_dir
    out = Path(run_dir)
    path = out / RESOLVED_NAME
    text = yaml.safe_dump(cfg, sort_keys=False)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if path.is_file() and path.read_text() != text:
            kept = _previous_name(path)
            os.replace(path, kept)
            print(f"nemo-bard: the run directory's previous resolved config is kept as {kept}", file=sys.stderr,
                  flush=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        full = disk_full_message(exc, out)
        if full is not None:
            raise DiskFullError(f"{full}: the run cannot start; free space or point paths.run_root "
                                "(checkpoint.checkpoint_dir) elsewhere") from None
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise CLIError(f"run directory {out} cannot be written ({exc.strerror}); point paths.run_root "
                       "(checkpoint.checkpoint_dir) at a writable directory") from None
    return path.resolve()


def _previous_name(path: Path) -> Path:
    """``resolved_config.<mtime>.yaml`` beside ``path`` (``-2``, ``-3`` ... when taken)."""
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(path.stat().st_mtime))
    kept, n = path.with_name(f"resolved_config.{stamp}.yaml"), 1
    while kept.exists():
        n += 1
        kept = path.with_name(f"resolved_config.{stamp}-{n}.yaml")
    return kept


def _is_torchrun_worker() -> bool:
    return "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ


def run_nemo_app(config: Path, extra: list[str]) -> int:
    """Hand ``config`` to NeMo AutoModel's app in this process (inside the CPU patches on a CPU-only host)."""
    from nemo_bard.integrations.cpu import run_nemo_app as run  # torch + NeMo: imported once the config is good

    return run(str(config), extra)


def run_torchrun(torchrun_args: list[str]) -> int:
    """Run torchrun's elastic agent in this process (it starts the workers in their own sessions and hands a
    SIGTERM / SIGINT on to them, then waits up to ``--shutdown-timeout`` for them to save and stop). A failed
    worker is summed up in one line (its own error is printed above) instead of torchrun's traceback."""
    # torch: ~3.5 s, only when torchrun starts
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(torchrun_args))
    except SignalException as exc:  # the workers got the signal and have stopped (checkpoint saved)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        if code - 128 not in (signal.SIGTERM, signal.SIGINT):  # a stop by signal has said so itself
            print(f"{_prog}: error: training process rank {rank} exited with code {code} (its message is above)",
                  file=sys.stderr, flush=True)
        return code
    return 0


def launch(config: Path, nproc: int | None, extra: list[str]) -> int:
    """Run in-process (one worker) or under torchrun (``nproc`` > 1)."""
    if _is_torchrun_worker():
        return run_nemo_app(config, extra)
    if nproc is None:
        # torch: ~3.5 s, only to count GPUs for --nproc-per-node
        import torch

        nproc = torch.cuda.device_count() if torch.cuda.is_available() else 1
    if nproc <= 1:
        return run_nemo_app(config, [*extra, "--nproc-per-node", "1"])
    timeout = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    torchrun = ["--standalone", f"--nproc-per-node={nproc}", f"--shutdown-timeout={timeout}", "-m", "nemo_bard.cli",
                str(config), *extra]
    print("nemo-bard: launching torch.distributed.run " + " ".join(torchrun), flush=True)
    return run_torchrun(torchrun)


def _main(argv: list[str]) -> int:
    inv = parse_argv(argv)
    if inv.debug:
        os.environ[DEBUG_ENV] = "1"  # torchrun workers inherit it
    if not inv.print_resolved and (_is_torchrun_worker() or not _needs_hydra(inv.config, inv.hydra)):
        return launch(inv.config, inv.nproc, inv.nemo)
    composed = compose(inv.config, inv.hydra, inv.nemo)
    check_bard_sections(composed)
    run_dir = run_dir_of(composed)
    if inv.print_resolved:  # for launchers (SLURM): compose once, print the file every worker will read
        if run_dir:
            check_run_dir_free(run_dir)
        print(write_resolved(composed, inv.config), flush=True)
        return 0
    lock = RunLock(run_dir).acquire() if run_dir else None
    try:
        resolved = write_resolved(composed, inv.config)
        if lock is None:  # the run directory was chosen by write_resolved
            lock = RunLock(resolved.parent).acquire()
        print(f"nemo-bard: resolved config written to {resolved}", flush=True)
        return launch(resolved, inv.nproc, [])
    finally:
        if lock is not None:
            lock.release()


def program_name(argv0: str) -> str:
    """The name messages start with: what the user typed (``automodel`` or ``nemo-bard``, argv[0]'s basename; a
    torchrun worker inherits its launcher's through ``NEMO_BARD_PROG``), ``automodel`` for ``python -m`` / ``-c``."""
    inherited = os.environ.get(PROG_ENV)
    if inherited:
        return inherited
    name = os.path.basename(argv0)
    return name if name and name != "-c" and not name.endswith(".py") else "automodel"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``automodel`` and ``nemo-bard`` console scripts (messages name the one typed)."""
    global _prog
    if argv is None:
        _prog = program_name(sys.argv[0] if sys.argv else "")
        os.environ[PROG_ENV] = _prog  # torchrun workers report under the same name
        argv = sys.argv[1:]
    else:
        _prog = os.environ.get(PROG_ENV) or "automodel"
    if argv and argv[0] == "serve":  # nemo-bard serve --model DIR ...: the OpenAI-compatible server
        # the server's stack loads only for `nemo-bard serve`
        from nemo_bard.serve import main as serve_main

        return serve_main(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    return run_reported(_prog, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
