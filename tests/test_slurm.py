"""The tiny workflow on a real one-node SLURM cluster, submitted through profiles/slurm.

munged, slurmctld and slurmd (Debian's `munge` and `slurm-wlm`; .ci/run installs them) run on
localhost as root, with their key, sockets, state and logs in a temporary folder and on free
ports, so nothing of the machine's own configuration is read or changed. Snakemake runs with
`--profile profiles/slurm` as shipped, plus flags for this cluster (no account, status polls
with squeue, a first poll after 5 s): snakemake-executor-plugin-slurm submits every job with
`sbatch`, to the partition and with the CPUs, memory, time limit and GPU the profile gives its
rule. The node has one pretend GPU (a GRES on /dev/null), so `--gpus=1` is granted; both runs
set `train.device: cpu`.

No slurmdbd (it needs a MariaDB server): `AccountingStorageType=accounting_storage/none`, and
`sacct` answers "accounting storage is disabled". The plugin works without it when told to poll
job states with `squeue` (`--slurm-status-command squeue`), which lists finished jobs for
MinJobAge (an hour here). The scheduler records checked are slurmctld's own: `squeue`/`scontrol
show job` (a batch job, completed, its partition, CPUs, memory, time limit and GPU), its log of
batch submissions, and its job-completion log (`jobcomp/filetxt`).

The outputs must equal a local run's byte for byte — model files included — except the logs,
benchmark timings and TensorBoard event files, which carry wall-clock times by design.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import REPO

pytestmark = pytest.mark.slow

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "sinfo")
NODE = "ambientnode"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
CONFIGS = ("config/tiny.yaml", "cpu.yaml")
# Both runs train with two threads (the profile's eight CPUs are still what sbatch asks for):
# a CI machine has two cores, and eight threads on two cores take twice as long.
SAME = ("--set-threads", "train_model=2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_env(root: Path) -> dict[str, str]:
    """Environment of the SLURM clients and of the jobs (sbatch exports it to them)."""
    conf = root / "slurm.conf"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["SLURM_CONF"] = str(conf)
    # Inside each job the jobstep plugin drops every SLURM_* variable but the job's identity,
    # SLURM_CONF too, before its `srun`; on a cluster srun then reads /etc/slurm/slurm.conf.
    # This one lives in a temporary folder, so an `srun` first on PATH passes it on.
    shim = root / "bin"
    shim.mkdir(mode=0o755)
    srun = shutil.which("srun", path=SYSTEM_PATH)
    (shim / "srun").write_text(f'#!/bin/sh\nSLURM_CONF="{conf}" exec {srun} "$@"\n')
    (shim / "srun").chmod(0o755)
    # The rules call the `ambient-med` console script installed beside this interpreter.
    path = [str(shim), str(Path(sys.executable).parent), env.get("PATH", SYSTEM_PATH)]
    env["PATH"] = os.pathsep.join(path)
    return env


def _profile_partitions() -> set[str]:
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    names = {profile.get("default-resources", {}).get("slurm_partition", "cpu")}
    for resources in profile.get("set-resources", {}).values():
        if "slurm_partition" in resources:
            names.add(resources["slurm_partition"])
    return names


def _slurm_conf(root: Path, ctld_port: int, node_port: int) -> str:
    partitions = sorted(_profile_partitions())
    lines = [
        "ClusterName=ambienttest",
        f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={node_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge' / 'munge.socket'}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # No cgroups in a container: plain process tracking, no task confinement.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={root / 'log' / 'jobcomp.txt'}",
        "MinJobAge=3600",
        "MpiDefault=none",
        "SchedulerType=sched/builtin",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "GresTypes=gpu",
        # The node below claims more CPUs and memory than a CI machine has, so that the
        # profile's requests fit; nothing here enforces them.
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs=16 RealMemory=256000 Gres=gpu:1 State=UNKNOWN",
    ]
    for i, name in enumerate(partitions):
        default = "YES" if i == 0 else "NO"
        lines.append(f"PartitionName={name} Nodes={NODE} Default={default} MaxTime=INFINITE")
    return "\n".join(lines) + "\n"


def _daemon(root: Path, env: dict[str, str], name: str, *args: str) -> subprocess.Popen:
    """Starts a daemon in the foreground (so that the fixture can stop it), output to log/."""
    with (root / "log" / f"{name}.out").open("wb") as out:
        return subprocess.Popen(
            [shutil.which(name, path=SYSTEM_PATH), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _logs(root: Path) -> str:
    out = []
    for log in sorted((root / "log").glob("*")) + [root / "munge" / "munged.log"]:
        if log.is_file():
            out.append(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-25:]))
    return "\n".join(out)


@pytest.fixture(scope="module")
def slurm():
    """A one-node SLURM cluster on localhost; yields (root folder, environment for clients)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root on Linux (slurmd starts jobs as root)")
    missing = [b for b in BINARIES if not shutil.which(b, path=SYSTEM_PATH)]
    if missing:
        pytest.skip(
            f"SLURM/munge not installed ({', '.join(missing)} missing): .ci/run installs "
            "them with `apt-get install slurm-wlm munge`"
        )
    # munged insists that every folder above its socket is world-searchable, which
    # pytest's per-user temporary root is not.
    root = Path(tempfile.mkdtemp(prefix="ambient-med-slurm-"))
    root.chmod(0o755)
    procs: list[subprocess.Popen] = []
    try:
        munge = root / "munge"
        munge.mkdir(mode=0o755)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for sub in ("state", "spool", "log"):
            (root / sub).mkdir(mode=0o755)
        conf = root / "slurm.conf"
        conf.write_text(_slurm_conf(root, _free_port(), _free_port()))
        # One pretend GPU, so that the profile's `gpu: 1` is granted (`--gpus=1`); slurmd
        # needs a device file for it and sets CUDA_VISIBLE_DEVICES=0 in the job.
        (root / "gres.conf").write_text("Name=gpu Count=1 File=/dev/null\n")
        env = _slurm_env(root)
        procs.append(
            _daemon(
                root,
                env,
                "munged",
                "--foreground",
                f"--key-file={key}",
                f"--socket={munge / 'munge.socket'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            )
        )
        deadline = time.monotonic() + 30
        while not (munge / "munge.socket").exists():
            if time.monotonic() > deadline or procs[0].poll() is not None:
                pytest.fail("munged did not start:\n" + _logs(root))
            time.sleep(0.2)
        procs.append(_daemon(root, env, "slurmctld", "-D", "-f", str(conf)))
        procs.append(_daemon(root, env, "slurmd", "-D", "-f", str(conf), "-N", NODE))
        deadline = time.monotonic() + 60
        while True:
            state = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True
            ).stdout.split()
            if state and all(s == "idle" for s in state):
                break
            stuck = any(s.startswith(("inval", "drain", "fail")) for s in state)
            if stuck or time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                pytest.fail(f"the SLURM node did not come up (sinfo: {state}):\n" + _logs(root))
            time.sleep(0.5)
        yield root, env
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _workdir(folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(REPO / "Snakefile", folder / "Snakefile")
    for sub in ("config", "envs"):
        shutil.copytree(REPO / sub, folder / sub)
    # Both runs train on the CPU, also where the job's CUDA_VISIBLE_DEVICES=0 names a real GPU.
    (folder / "cpu.yaml").write_text("train:\n  device: cpu\n")
    return folder


def _snakemake(work: Path, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        # The SLURM job logs (kept when a job fails) say what happened inside the jobs.
        for log in sorted((work / ".snakemake" / "slurm_logs").rglob("*.log")):
            out += f"\n--- {log}\n" + "\n".join(log.read_text().splitlines()[-30:])
        pytest.fail(f"snakemake {' '.join(args)} failed:\n{out}")
    return out


def _show_job(job_id: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job_id],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _time_limit(minutes: int) -> str:
    days, rest = divmod(minutes, 24 * 60)
    clock = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{clock}" if days else clock


def _outputs(work: Path) -> dict[str, bytes]:
    """Every file under data/ and results/ but logs, timings and TensorBoard events (these
    carry wall-clock times by design)."""
    files = {}
    for top in ("data", "results"):
        for path in sorted((work / top).rglob("*")):
            rel = path.relative_to(work)
            if path.is_file() and not {"logs", "benchmarks", "tb"} & set(rel.parts):
                files[str(rel)] = path.read_bytes()
    return files


def test_tiny_workflow_through_slurm_matches_a_local_run(slurm, tmp_path):
    root, env = slurm
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())

    local = _workdir(tmp_path / "local")
    local_out = _snakemake(local, env, "train", "--cores", "2", *SAME, "--configfile", *CONFIGS)
    # The jobs of target `train`: demo_data, ingest, corrupt, train_model per cohort, and
    # `train` itself (a local rule with nothing to run).
    dag = Counter(re.findall(r"^localrule (\w+):$", local_out, re.M))
    assert dag["train_model"] >= 1 and dag["train"] == 1, local_out

    cluster = _workdir(tmp_path / "cluster")
    out = _snakemake(
        cluster,
        env,
        "train",
        "--profile",
        str(REPO / "profiles" / "slurm"),
        *SAME,
        "--configfile",
        *CONFIGS,
        "--retries",
        "0",
        # This cluster has no accounts (the plugin would guess one with sacct).
        "--slurm-no-account",
        # No accounting database: poll slurmctld with squeue. The plugin polls 5 s after a
        # submission (40 s by default), then 10 s later than the previous poll each time.
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "5",
        "--seconds-between-status-checks",
        "5",
    )

    # Every job this private cluster has seen, by slurmctld's account: one per job of the
    # local run; Snakemake ran none itself but `train`.
    ids = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--format=%i"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    ctld_log = (root / "log" / "slurmctld.log").read_text()
    jobcomp = (root / "log" / "jobcomp.txt").read_text()
    assert sorted(re.findall(r"^JobId=(\d+) ", jobcomp, re.M)) == sorted(ids), jobcomp
    jobs = []
    for slurm_id in ids:
        job = _show_job(slurm_id, env)
        # A batch job (sbatch), submitted over slurmctld's batch-submission RPC, and finished.
        assert job["BatchFlag"] == "1" and job["JobState"] == "COMPLETED", job
        assert f"_slurm_rpc_submit_batch_job: JobId={slurm_id} " in ctld_log
        assert re.search(rf"^JobId={slurm_id} .*JobState=COMPLETED", jobcomp, re.M), jobcomp
        # The plugin's comment names the rule: rule_<name>[_wildcards_<values>].
        rule = re.fullmatch(r"rule_(\w+?)(_wildcards_.*)?", job["Comment"]).group(1)
        jobs.append((rule, job))
    assert Counter(re.findall(r"^localrule (\w+):$", out, re.M)) == Counter(["train"]), out
    assert Counter(rule for rule, _ in jobs) == dag - Counter(["train"]), (ids, out)

    # The profile's per-rule resources reached sbatch.
    defaults = profile["default-resources"]
    for rule, job in jobs:
        wanted = {**defaults, **profile["set-resources"].get(rule, {})}
        assert job["Partition"] == wanted["slurm_partition"], (rule, job)
        assert job["MinMemoryNode"] == f"{wanted['mem_mb']}M", (rule, job)
        assert job["TimeLimit"] == _time_limit(wanted["runtime"]), (rule, job)
        if "cpus_per_task" in wanted:
            assert job["NumCPUs"] == str(wanted["cpus_per_task"]), (rule, job)
        if wanted.get("gpu"):
            assert job.get("TresPerJob") == f"gres:gpu:{wanted['gpu']}", (rule, job)
        else:
            assert "gpu" not in job.get("TresPerJob", ""), (rule, job)

    # Same config, same outputs: the cluster's files equal the local run's.
    here, there = _outputs(local), _outputs(cluster)
    for name in ("results/demo/corrupt/kspace.h5", "results/demo/train/model.pt"):
        assert name in here
    assert sorted(there) == sorted(here)
    differ = [name for name in here if here[name] != there[name]]
    assert not differ, f"differ between the local and the SLURM run: {differ}"
