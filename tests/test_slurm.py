"""examples/slurm/*.sbatch, unchanged, under a real single-node SLURM (scripts/slurm_local.sh) in their CPU form.

The `slurm` tests (`pytest -m slurm -n 0 tests/test_slurm.py`; the default run deselects them) start SLURM on
localhost, then submit the tiny PBM and SWD runs, a slow PBM run that reaches its time limit and one that is
requeued with `scontrol requeue`; both must resume to the losses of the uninterrupted run. The tests only set
environment variables and sbatch options; they skip when SLURM cannot be started here (not root, no apt-get).
The other tests run the scripts' resource logic with bash alone (``NEMO_BARD_SLURM_DRY_RUN=1``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e_utils import REPO, training_log

SCRIPTS = {stage: REPO / "examples" / "slurm" / f"bard_{stage}.sbatch" for stage in ("pbm", "swd")}
SLURM_LOCAL = REPO / "scripts" / "slurm_local.sh"
TINY = REPO / "conf" / "bard_tiny.yaml"
CPU_OPTS = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1"]  # the scripts ask for 8 nodes x 8 GPUs
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}


# ------------------------------------------------------------------ the scripts' resource logic (bash only)
def dry_run(stage: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """The sbatch script as SLURM would start it, stopped after it has chosen workers per node and config."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_", "NEMO_BARD_"))}
    full = {**base, "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_ID": "4242", "NEMO_BARD_SLURM_DRY_RUN": "1", **env}
    return subprocess.run(["bash", str(SCRIPTS[stage]), "x=1"], env=full, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("env, workers", [
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8"}, 4),  # what SLURM gives this node wins
    ({"SLURM_GPUS_PER_NODE": "8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "h100:8"}, 8),  # typed GPUs
    ({"SLURM_GPUS_PER_NODE": "a100:2,v100:2"}, 4),
    ({"SLURM_GPUS_PER_NODE": "h100"}, 1),  # a type without a count: one
    ({"SLURM_JOB_GPUS": "0,1,2"}, 3),  # --gres=gpu:3 on an older SLURM
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, 2),
    ({"NEMO_BARD_SLURM_CPU": "1", "SLURM_GPUS_PER_NODE": "0"}, 1),  # CPU form: one worker ...
    ({"NEMO_BARD_SLURM_CPU": "1", "NEMO_BARD_NPROC_PER_NODE": "2"}, 2),  # ... unless asked for more
])
def test_workers_per_node_from_what_slurm_sets(tmp_path, env, workers):
    proc = dry_run("pbm", tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    assert f"workers per node: {workers}" in proc.stdout


@pytest.mark.parametrize("env", [{}, {"SLURM_GPUS_PER_NODE": "0"}, {"SLURM_GPUS_ON_NODE": "0"}])
def test_no_gpus_is_one_line_naming_the_fix(tmp_path, env):
    proc = dry_run("pbm", tmp_path, **env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("nemo-bard: error: no GPUs in this allocation") and "NEMO_BARD_SLURM_CPU=1" in lines[0]


def test_rendezvous_port_is_the_jobs_own(tmp_path):
    """Two jobs on one node never share torchrun's rendezvous (a MASTER_PORT in the submitter's environment,
    which sbatch exports to the job, is not used); NEMO_BARD_RDZV_PORT sets it."""
    ports = {job: dry_run("pbm", tmp_path, SLURM_GPUS_ON_NODE="8", SLURM_JOB_ID=job, MASTER_PORT="29500").stdout
             for job in ("4242", "4243")}
    assert "rendezvous port: 24242" in ports["4242"] and "rendezvous port: 24243" in ports["4243"]
    fixed = dry_run("pbm", tmp_path, SLURM_GPUS_ON_NODE="8", NEMO_BARD_RDZV_PORT="31000").stdout
    assert "rendezvous port: 31000" in fixed


def test_cpu_form_defaults_to_the_tiny_config(tmp_path):
    pbm = dry_run("pbm", tmp_path, NEMO_BARD_SLURM_CPU="1")
    swd = dry_run("swd", tmp_path, NEMO_BARD_SLURM_CPU="1")
    assert "config: conf/bard_tiny.yaml x=1" in pbm.stdout
    assert "config: conf/bard_tiny.yaml stage=swd x=1" in swd.stdout
    assert "config: conf/bard_swd.yaml stage=swd x=1" in dry_run("swd", tmp_path, SLURM_GPUS_ON_NODE="8").stdout


def test_scripts_append_to_a_log_sbatch_can_open_and_differ_only_in_stage():
    pbm, swd = (SCRIPTS[s].read_text().splitlines() for s in ("pbm", "swd"))
    directives = [line for line in pbm if line.startswith("#SBATCH")]
    assert "#SBATCH --output=%x-%j.out" in directives  # sbatch creates no directories: none in the default path
    assert any(d.startswith("#SBATCH --open-mode=append") for d in directives)
    assert any(d.startswith("#SBATCH --signal=B:USR1@") for d in directives)
    assert any(d.startswith("#SBATCH --requeue") for d in directives)
    differ = [(a, b) for a, b in zip(pbm, swd) if a != b and not a.startswith("# ")]  # comments name their stage
    assert len(pbm) == len(swd) and all("pbm" in a and "swd" in b for a, b in differ), differ


# ------------------------------------------------------------------ a real SLURM
def _slurm_env(conf: str) -> dict[str, str]:
    """What the jobs inherit (sbatch exports the submitter's environment): this checkout and this interpreter's
    console scripts (nemo-bard, torchrun) first, the CPU form, one compute thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEMO_BARD_"))}
    return {**env, "SLURM_CONF": conf, "PATH": os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]]),
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "NEMO_BARD_SLURM_CPU": "1", "CONFIG": str(TINY)}


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """A running single-node SLURM (started by scripts/slurm_local.sh, stopped again if this fixture started it);
    the environment to submit jobs with."""
    if os.geteuid() != 0:
        pytest.skip("SLURM tests need root (scripts/slurm_local.sh runs munged, slurmctld and slurmd)")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM tests: slurmctld is not installed and there is no apt-get to install it")
    running = subprocess.run(["bash", str(SLURM_LOCAL), "status"], capture_output=True, timeout=30).returncode == 0
    start = subprocess.run(["bash", str(SLURM_LOCAL), "start"], capture_output=True, text=True, timeout=900)
    found = re.search(r"^SLURM_CONF=(.+)$", start.stdout, re.M)
    if start.returncode != 0 or not found:
        reason = (start.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"SLURM could not be started here (scripts/slurm_local.sh start): {reason}")
    env = _slurm_env(found.group(1))
    yield env
    if not running:
        subprocess.run(["bash", str(SLURM_LOCAL), "stop"], capture_output=True, timeout=120)


def sbatch(env: dict[str, str], cwd: Path, stage: str, *opts: str, args: tuple[str, ...] = ()) -> str:
    """Submit ``examples/slurm/bard_<stage>.sbatch`` from ``cwd`` (a directory without logs/); the job id."""
    proc = subprocess.run(["sbatch", "--parsable", *CPU_OPTS, *opts, str(SCRIPTS[stage]), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(env: dict[str, str], job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(env: dict[str, str], job: str, timeout: float, restarts: int = 0) -> dict[str, str]:
    """Wait (at most ``timeout`` s) until ``job`` ended after at least ``restarts`` requeues; its record."""
    end = time.time() + timeout
    while time.time() < end:
        info = job_info(env, job)
        if info.get("JobState") in FINAL_STATES and int(info.get("Restarts", 0)) >= restarts:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job], env=env, timeout=30)
    raise AssertionError(f"job {job} did not end in {timeout} s: {job_info(env, job)}")


def requeue_after(env: dict[str, str], job: str, run: Path, steps: int, timeout: float) -> threading.Thread:
    """``scontrol requeue JOB`` as soon as ``steps`` steps of its first run are in ``run``/training.jsonl."""
    def watch() -> None:
        end = time.time() + timeout
        while time.time() < end:
            log = run / "training.jsonl"
            if log.exists() and len(log.read_text().splitlines()) >= steps:
                subprocess.run(["scontrol", "requeue", job], env=env, timeout=30)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def slow(seconds: float) -> str:
    """Hydra override: sleep before every step of the job's first run (tests/fault_callbacks.py)."""
    return f"+callbacks=[{{_target_:tests.fault_callbacks.SlowSteps,seconds:{seconds},restart:0}}]"


@pytest.fixture(scope="module")
def jobs(slurm, tiny_bard_dir, tmp_path_factory):
    """Every job submitted at once (the node runs two at a time): an uninterrupted PBM run, then SWD on its
    stage exports; a PBM run that reaches its 3-minute time limit; one requeued after two steps; and three GPU
    requests (fake GPUs of the local node) answered by the scripts' dry run."""
    from nemo_bard.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("slurm")
    submit = root / "submit"  # like a fresh clone: no logs/ directory
    submit.mkdir()
    data = write_synthetic_dataset(root / "data", rows=48, seed=0)
    common = (f"paths.model={tiny_bard_dir}", f"paths.data={data}")
    dry = {**slurm, "NEMO_BARD_SLURM_CPU": "0", "NEMO_BARD_SLURM_DRY_RUN": "1"}
    ids = {
        "gpus": sbatch(dry, submit, "pbm", "--gpus-per-node=fake:2", "--job-name=gpus"),
        "gres": sbatch(dry, submit, "pbm", "--gres=gpu:1", "--job-name=gres"),
        "nogpu": sbatch(dry, submit, "pbm", "--job-name=nogpu"),
        "pbm": sbatch(slurm, submit, "pbm", args=(*common, f"paths.run_root={root / 'ref'}")),
        # SLURM sends SIGUSR1 up to ~60 s earlier than asked (its timer is coarse): 60-120 s into this 3-minute job.
        # Slowed to 16 s a step, the run is still training then on an idle machine (it would need ~2.5 min) and,
        # stopped at the next step, ends well before the limit.
        "limit": sbatch(slurm, submit, "pbm", "--time=3", "--signal=B:USR1@60",
                        args=(*common, f"paths.run_root={root / 'limit'}", slow(16))),
    }
    ids["swd"] = sbatch(slurm, submit, "swd", f"--dependency=afterok:{ids['pbm']}",
                        args=(*common, f"paths.run_root={root / 'ref'}"))
    ids["requeue"] = sbatch(slurm, submit, "pbm", args=(*common, f"paths.run_root={root / 'requeue'}", slow(4)))
    watcher = requeue_after(slurm, ids["requeue"], root / "requeue" / "bard_pbm_tiny", steps=2, timeout=420)
    try:
        yield {"env": slurm, "ids": ids, "root": root, "submit": submit}
    finally:
        watcher.join(timeout=1)
        subprocess.run(["scancel", *ids.values()], env=slurm, capture_output=True, timeout=30)


def job_log(jobs: dict, name: str, job_name: str = "bard-pbm") -> str:
    """The job's log: <job name>-<job id>.out in the submit directory."""
    return (jobs["submit"] / f"{job_name}-{jobs['ids'][name]}.out").read_text(errors="replace")


def assert_same_losses(reference: Path, run: Path) -> None:
    a, b = training_log(reference), training_log(run)
    assert sorted(b) == sorted(a) == list(range(8))
    for step in a:
        assert b[step]["block_size"] == a[step]["block_size"]
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-6), step


def stop_checkpoint(log: str, run: Path) -> int:
    """The step after which the first run stopped on SIGTERM, checked to have its checkpoint on disk."""
    found = re.search(rf"automodel: stopped by signal SIGTERM after step (\d+) \(checkpoint ({re.escape(str(run))}"
                      r"/epoch_\d+_step_(\d+)) saved\)", log)
    assert found, log[-3000:]
    assert found.group(1) == found.group(3) and Path(found.group(2), "model").is_dir()
    return int(found.group(1))


def appended_runs(log: str) -> list[str]:
    """Restart counts of the runs written to one log, in order."""
    return re.findall(r"^nemo-bard: resolved config: .* \(restart (\d+),", log, re.M)


@pytest.mark.slurm
def test_gpu_requests_and_no_gpu_error(jobs):
    env, ids = jobs["env"], jobs["ids"]
    for name, workers in (("gpus", 2), ("gres", 1)):
        assert wait_job(env, ids[name], 120)["JobState"] == "COMPLETED"
        assert f"workers per node: {workers}" in job_log(jobs, name, name)
    info = wait_job(env, ids["nogpu"], 120)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    assert job_log(jobs, "nogpu", "nogpu").startswith("nemo-bard: error: no GPUs in this allocation")


@pytest.mark.slurm
def test_pbm_then_swd(jobs):
    env, ids, root = jobs["env"], jobs["ids"], jobs["root"]
    assert wait_job(env, ids["pbm"], 300)["JobState"] == "COMPLETED", job_log(jobs, "pbm")[-3000:]
    run = root / "ref" / "bard_pbm_tiny"
    log = training_log(run)
    assert sorted(log) == list(range(8)) and [log[s]["block_size"] for s in range(8)] == [4] * 4 + [8] * 4
    assert all((run / "stages" / f"b{b}" / "config.json").is_file() for b in (4, 8))
    assert "nemo-bard: training processes exited with code 0" in job_log(jobs, "pbm")
    info = wait_job(env, ids["swd"], 300)
    assert info["JobState"] == "COMPLETED", job_log(jobs, "swd", "bard-swd")[-3000:]
    swd = training_log(root / "ref" / "bard_swd_tiny")
    assert sorted(swd) == list(range(6)) and all(rec["loss"] == rec["loss"] for rec in swd.values())
    cfg = yaml.safe_load((root / "ref" / "bard_swd_tiny" / "resolved_config.yaml").read_text())
    assert cfg["recipe"] == "nemo_bard.recipes.swd.BardSWDRecipe"


def assert_stopped_and_resumed(jobs: dict, name: str, timeout: int) -> str:
    """Job ``name`` was stopped once with a checkpoint (exit 143, not SIGKILLed), requeued, appended to its log and
    ended with the uninterrupted run's losses; returns its log."""
    env, ids, root = jobs["env"], jobs["ids"], jobs["root"]
    info = wait_job(env, ids[name], timeout, restarts=1)
    log = job_log(jobs, name)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    run = root / name / "bard_pbm_tiny"
    assert "nemo-bard: training processes exited with code 143" in log  # not SIGKILLed (137)
    assert stop_checkpoint(log, run) < 7
    assert appended_runs(log) == ["0", "1"]  # one log, both runs (--open-mode=append)
    wait_job(env, ids["pbm"], 300)
    assert_same_losses(root / "ref" / "bard_pbm_tiny", run)
    return log


@pytest.mark.slurm
def test_time_limit_stops_with_a_checkpoint_requeues_and_resumes(jobs):
    """SIGUSR1 before the limit -> SIGTERM to the training processes -> checkpoint at the next step, requeue; the
    requeued run appends to the same log and ends with the uninterrupted run's losses."""
    log = assert_stopped_and_resumed(jobs, "limit", 420)
    assert "nemo-bard: time limit near: stopping at the next step with a checkpoint" in log
    assert "DUE TO TIME LIMIT" not in log  # stopped before SLURM's own SIGTERM / SIGKILL at the limit


@pytest.mark.slurm
def test_scontrol_requeue_checkpoints_and_resumes(jobs):
    """`scontrol requeue` (as preemption: SIGTERM to the job, SIGKILL after KillWait): checkpoint at the next step,
    the requeued run resumes to the uninterrupted run's losses."""
    log = assert_stopped_and_resumed(jobs, "requeue", 420)
    assert "DUE TO JOB REQUEUE" in log
